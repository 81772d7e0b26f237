"""Prompt-file options are bounded and finite, and checked when the file is read: before any model
loads in ``masktrain sample``, and before the first step in ``train --sample_prompts``, so a typo
does not allocate gigabytes or end a long run at its first sampling (December 2026 red team, N8,
and N10's ``--l inf``, ``--fs inf``, ``--fs 1e-30``)."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from helpers import cached
from masktrain.cli import main
from masktrain.config.sample_prompts import load_prompts
from masktrain.errors import SamplePromptError


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ("--w 100000 --h 100000 --s 1", "width must be <= 4096, got 100000"),
        ("--w 64 --h 4097", "height must be <= 4096, got 4097"),
        ("--w 64 --h 64 --f 100001 --s 1", "frame_count must be <= 1025, got 100001"),
        ("--s 1001", "sample_steps must be <= 1000, got 1001"),
        ("--l inf", "--l: expected a finite number, got 'inf'"),
        ("--l nan", "--l: expected a finite number, got 'nan'"),
        ("--l 1e30", "cfg_scale must be <= 100, got 1e+30"),
        ("--fs inf", "--fs: expected a finite number, got 'inf'"),
        ("--fs 1e-30", "discrete_flow_shift must be in [0.01, 100], got 1e-30"),
        ("--fs 1e30", "discrete_flow_shift must be in [0.01, 100], got 1e+30"),
        ("--fs 0", "discrete_flow_shift must be > 0, got 0.0"),
        ("--g -inf", "--g: expected a finite number, got '-inf'"),
    ],
)
def test_an_option_out_of_bounds_is_one_line_naming_file_line_and_option(
    tmp_path: Path, options: str, message: str
) -> None:
    path = _write(tmp_path / "p.txt", f"ok --w 64 --h 64\na cat {options}\n")
    with pytest.raises(SamplePromptError) as error:
        load_prompts(path)
    assert str(error.value) == f"{path}:2: {message}"


def test_the_bounds_themselves_are_accepted(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "p.txt",
        "big --w 4096 --h 4096 --f 1025 --s 1000 --l 100 --fs 0.01\nsmall --w 1 --h 1 --l 1e-3 --fs 100\n",
    )
    big, small = load_prompts(path)
    assert (big.width, big.height, big.frames, big.steps, big.cfg_scale, big.flow_shift) == (
        4096,
        4096,
        1025,
        1000,
        100.0,
        0.01,
    )
    assert (small.width, small.cfg_scale, small.flow_shift) == (1, 1e-3, 100.0)


def test_toml_and_json_numbers_are_bounded_and_finite_too(tmp_path: Path) -> None:
    toml = _write(tmp_path / "p.toml", '[prompt]\ncfg_scale = inf\n\n[[prompt.subset]]\nprompt = "a cat"\n')
    with pytest.raises(SamplePromptError) as error:
        load_prompts(toml)
    assert str(error.value) == f"{toml} [[prompt.subset]] 1: cfg_scale: expected a finite number, got inf"
    as_json = _write(
        tmp_path / "p.json",
        json.dumps(
            ["a cat", {"prompt": "a dog", "frame_count": 2000}, {"prompt": "x", "discrete_flow_shift": 1}]
        ),
    )
    with pytest.raises(SamplePromptError) as error:
        load_prompts(as_json)
    assert str(error.value) == f"{as_json} entry 2: frame_count must be <= 1025, got 2000"
    nan = _write(tmp_path / "nan.json", '[{"prompt": "a dog", "discrete_flow_shift": NaN}]')
    with pytest.raises(
        SamplePromptError, match=r"entry 1: discrete_flow_shift: expected a finite number, got nan"
    ):
        load_prompts(nan)


def test_masktrain_sample_refuses_an_oversized_prompt_before_drawing(tmp_path: Path) -> None:
    """A side just over the bound (one that would still be drawn, unlike the report's 100000):
    exit 2, one line naming the file, the line and the option; no sample."""
    prompts = _write(tmp_path / "big.txt", "a cat --w 4112 --h 16 --s 1\n")
    out = tmp_path / "S"
    result = CliRunner().invoke(
        main,
        [
            *("sample", "--arch", "wan", "--dit", "tiny", "--vae", "tiny", "--t5", "tiny", "--device", "cpu"),
            *("--sample_prompts", str(prompts), "--output_dir", str(out)),
        ],
    )
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines()[-1] == f"Error: {prompts}:1: width must be <= 4096, got 4112"
    assert not out.exists()


@pytest.mark.slow
def test_train_refuses_a_bad_prompt_line_before_the_first_step(tmp_path: Path) -> None:
    """The report's case: the second line's ``--f 100001`` ended the run with a traceback at its
    first sampling, after a checkpoint; now the flags check refuses it before anything runs."""
    toml = cached(tmp_path / "data")
    prompts = _write(tmp_path / "pr.txt", "ok --w 64 --h 64 --s 2\nbad --w 64 --h 64 --f 100001 --s 1\n")
    out = tmp_path / "OUT"
    result = CliRunner().invoke(
        main,
        [
            *("train", "--dataset_config", str(toml), "--arch", "wan", "--dit", "tiny", "--device", "cpu"),
            *("--network_dim", "4", "--max_train_steps", "4", "--save_every_n_steps", "2"),
            *(
                "--sample_every_n_steps",
                "2",
                "--sample_prompts",
                str(prompts),
                "--vae",
                "tiny",
                "--t5",
                "tiny",
            ),
            *("--output_dir", str(out)),
        ],
    )
    assert result.exit_code == 2, result.output
    assert (
        result.output.strip().splitlines()[-1]
        == f"Error: {prompts}:2: frame_count must be <= 1025, got 100001"
    )
    assert not out.exists()
