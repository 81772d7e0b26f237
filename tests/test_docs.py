"""The documentation: ``masktrain train --help`` is the config fields' docstrings (one source, as
litgpt's ``attribute_docstrings``), and the README and ``docs/`` are a short front door over
rooms whose links all land."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest

from masktrain.cli import options
from masktrain.cli import train as train_cli
from masktrain.config.text_encoder import option_names as text_encoder_names
from masktrain.config.train import LORA_FORMATS, LR_SCHEDULERS, OPTIMIZER_TYPES, NetworkSettings

ROOT = Path(__file__).resolve().parent.parent


def docstrings(settings: type) -> dict[str, str]:
    """Each field's docstring, read here on its own (``inspect.getsource``), markup and line breaks
    as the help shows them: no double backticks, single spaces."""
    (node,) = ast.parse(inspect.getsource(settings)).body
    assert isinstance(node, ast.ClassDef)
    found = {}
    for field, after in itertools.pairwise(node.body):
        if isinstance(field, ast.AnnAssign) and isinstance(after, ast.Expr):
            assert isinstance(field.target, ast.Name) and isinstance(after.value, ast.Constant)
            found[field.target.id] = " ".join(str(after.value.value).replace("``", "").split())
    return found


def field_options() -> list[tuple[click.Option, type]]:
    """Every option of ``masktrain train`` whose name is a field of a config dataclass it builds,
    with that dataclass. The text-encoder flags are per family (``--t5``, ``--text_encoder``, ...)
    and reach ``SampleSettings`` through ``text_encoder.choose``, not by name."""
    found = []
    for param in train_cli.train.params:
        if not isinstance(param, click.Option) or param.name in text_encoder_names():
            continue
        owners = [c for c in train_cli.FIELD_OWNERS if param.name in {f.name for f in dataclasses.fields(c)}]
        if owners:
            found.append((param, owners[0]))
    return found


def test_every_field_flag_shows_its_fields_docstring_and_nothing_else() -> None:
    pairs = field_options()
    assert len(pairs) >= 80
    context = click.Context(train_cli.train)
    for option, owner in pairs:
        assert isinstance(option, options.FieldOption), f"--{option.name} has a hand-written help"
        assert option.documented_by is owner, option.name
        expected = docstrings(owner).get(str(option.name))
        assert expected, f"{owner.__name__}.{option.name} has no docstring"
        assert option.help == expected
        record = option.get_help_record(context)
        assert record is not None
        shown = record[1]
        assert shown == expected or re.fullmatch(re.escape(expected) + r"  \[[^\]]+\]", shown), shown
        assert "``" not in shown and "\n" not in shown


def test_flags_without_a_field_keep_their_own_help() -> None:
    by_field = {option.name for option, _ in field_options()}
    rest = [p for p in train_cli.train.params if isinstance(p, click.Option) and p.name not in by_field]
    assert {"sdpa", "flash_attn", "network_args", "optimizer_args", "t5", "network_module"} <= {
        p.name for p in rest
    }
    for option in rest:
        assert not isinstance(option, options.FieldOption)
        assert option.help, f"--{option.name} has no help"


def test_a_field_flag_refuses_a_written_help() -> None:
    declare = options.option("network_dim", documented_by=NetworkSettings, help="rank")
    with pytest.raises(TypeError, match="the help of a field's flag is the field's docstring"):
        declare(lambda network_dim: None)


def test_the_help_reads_as_the_docstrings_say() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "masktrain.cli", "train", "--help"], capture_output=True, text=True, check=True
    )
    shown = " ".join(result.stdout.split())
    assert "--network_dim, --network-dim INTEGER RANGE LoRA rank. [default: 16; x>=1]" in shown
    assert "Layout of OUTPUT_NAME.safetensors: comfyui (diffusion_model. names)" in shown
    assert "--mask_blur_kernel_size, --mask-blur-kernel-size, --mask_blur_radius" in shown


def test_a_choice_flag_names_every_choice_in_its_docstring() -> None:
    """The stale lists the review found (2 of 4 optimizers, 4 of 6 schedulers, 2 of 3 layouts) cannot
    come back: a choice flag's help names each choice. ``--arch``'s choices are the catalog's (click
    lists them; docs/models.md describes them), and musubi's class paths name the same optimizers."""
    help_of = {str(option.name): str(option.help) for option, _ in field_options()}
    assert all(name in help_of["optimizer_type"] for name in OPTIMIZER_TYPES)
    assert all(name in help_of["lr_scheduler"] for name in LR_SCHEDULERS)
    assert all(name in help_of["lora_format"] for name in LORA_FORMATS)
    for option, _ in field_options():
        if isinstance(option.type, click.Choice) and option.name not in ("arch", "optimizer_type"):
            for choice in option.type.choices:
                assert re.search(rf"\b{re.escape(str(choice))}\b", str(option.help)), (option.name, choice)


def test_docstrings_are_read_only_when_help_is_shown() -> None:
    """Start-up stays cheap: ``masktrain --help`` reads no source and imports no torch."""
    code = "\n".join(
        [
            "import sys",
            "from click.testing import CliRunner",
            "from masktrain.cli import main, options",
            "assert CliRunner().invoke(main, ['--help']).exit_code == 0",
            "assert options.field_help.cache_info().currsize == 0, 'docstrings read at start-up'",
            "assert CliRunner().invoke(main, ['train', '--help']).exit_code == 0",
            "assert options.field_help.cache_info().currsize > 0",
            "assert 'torch' not in sys.modules, 'torch imported'",
        ]
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# --- the README and docs/ ---------------------------------------------------------------------


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benches" / "README.md"]


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as dashes."""
    found, fenced = set(), False
    for line in page.read_text(encoding="utf-8").splitlines():
        fenced ^= line.startswith("```")
        if not fenced and line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            found.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return found


def test_the_readme_is_a_short_front_door() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) < 300
    assert "pip install . && masktrain demo --output_dir demo" in readme
    assert "bash scripts/test.sh" in readme
    for room in ("masks", "cache", "train", "memory", "sampling", "models", "musubi", "decisions", "api"):
        assert f"(docs/{room}.md)" in readme, room


def test_every_link_between_the_pages_lands() -> None:
    broken = []
    for page in pages():
        text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            landed = (page.parent / path).resolve() if path else page
            if not landed.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
            elif anchor and anchor not in anchors(landed):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert broken == []


def test_models_has_a_row_per_arch_and_variant() -> None:
    from masktrain import catalog

    table = (ROOT / "docs" / "models.md").read_text(encoding="utf-8").split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    for spec in catalog.ARCHES.values():
        assert any(r.startswith(f"| `{spec.name}` |") for r in rows), spec.name
        for name, task in spec.tasks.items():
            (row,) = [
                r for r in rows if r.startswith(f"| `{spec.name}` |") and f"`{name}`" in r.split("|")[2]
            ]
            status = row.split("|")[3].strip()
            assert status == ("refused" if task.refused else "trained"), (spec.name, name)


@pytest.mark.slow
def test_the_will_it_fit_table_is_what_the_planner_says() -> None:
    """docs/memory.md's table, regenerated (``python -m masktrain.plan.fit_table docs/memory.md``
    rewrites it after a change to the planner)."""
    from masktrain.plan.fit_table import END, START, table

    text = (ROOT / "docs" / "memory.md").read_text(encoding="utf-8")
    shown = START + text.split(START, 1)[1].split(END, 1)[0] + END
    assert shown == table(), "run: python -m masktrain.plan.fit_table docs/memory.md"
