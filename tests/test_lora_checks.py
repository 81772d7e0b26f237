"""A LoRA file that cannot give a right sample is refused, by ``masktrain sample`` (``load_lora_into``)
and ``masktrain convert-lora``, with one line naming the file and the layer, and nothing written:
non-finite matrices and alphas (a LoRA that diverged gives black samples), matrices made for a
model of another size, metadata that is not a number or whose rank disagrees with the matrices,
and a LoRA of another family (December 2026 red team, N9, N10, N18)."""

from pathlib import Path

import pytest
import safetensors.torch
import torch
from click.testing import CliRunner

from helpers import LORA_RANK, read_safetensors, tiny_denoiser, trained_lora
from masktrain.cli import main
from masktrain.denoiser import lora_file
from masktrain.denoiser.lora import load_lora_into, save_lora
from masktrain.errors import LoraFileError
from masktrain.models import get_family


def _saved(folder: Path, arch: str = "wan", layout: str = "comfyui") -> Path:
    path = folder / f"{arch}-{layout}.safetensors"
    if not path.exists():
        save_lora(path, trained_lora(arch), get_family(arch), layout=layout, metadata={})  # type: ignore[arg-type]
    return path


def _edited(source: Path, target: Path, edit, metadata: dict[str, str | None] | None = None) -> Path:
    """`source` with `edit(tensors)` applied and `metadata` merged in (None: no metadata at all)."""
    tensors, meta = read_safetensors(source)
    tensors = {key: value.clone() for key, value in tensors.items()}
    edit(tensors)
    merged = None if metadata is None else {k: v for k, v in {**meta, **metadata}.items() if v is not None}
    safetensors.torch.save_file(tensors, str(target), metadata=merged)
    return target


def _first(tensors: dict[str, torch.Tensor], suffix: str) -> str:
    return next(key for key in sorted(tensors) if key.endswith(suffix))


def _nan_in_b(tensors: dict[str, torch.Tensor]) -> None:
    tensors[_first(tensors, "lora_B.weight")][0, 0] = float("nan")


def _widened(tensors: dict[str, torch.Tensor]) -> None:
    """Every layer twice as wide: what a 14B LoRA is to a 1.3B --dit (the report's N9 file)."""
    for key, value in list(tensors.items()):
        if key.endswith("lora_A.weight"):
            tensors[key] = torch.cat([value, value], 1)
        elif key.endswith("lora_B.weight"):
            tensors[key] = torch.cat([value, value], 0)


def _convert(source: Path, target: Path):
    return CliRunner().invoke(
        main, ["convert-lora", "--input", str(source), "--output", str(target), "--to", "musubi"]
    )


def _sample(tmp_path: Path, lora: Path, arch: str = "wan"):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a photo --w 32 --h 32 --s 1\n")
    text_flag = "--t5" if arch == "wan" else "--text_encoder"
    return CliRunner().invoke(
        main,
        [
            *("sample", "--arch", arch, "--dit", "tiny", "--vae", "tiny", text_flag, "tiny"),
            *("--device", "cpu", "--sample_prompts", str(prompts), "--output_dir", str(tmp_path / "S")),
            *("--lora", str(lora)),
        ],
    )


def _refused(result, *parts: str) -> str:
    """The one error line of a refused command (exit 2), which holds every part."""
    assert result.exit_code == 2, result.output
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("Error: ") and "Traceback" not in result.output
    for part in parts:
        assert part in line, line
    return line


def _no_samples(tmp_path: Path) -> None:
    assert not list((tmp_path / "S").rglob("*.png")) and not list((tmp_path / "S").rglob("*.html"))


# --- N10: non-finite values -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "edit", "metadata", "message"),
    [
        (
            "nan in a matrix",
            _nan_in_b,
            {},
            "diffusion_model.blocks.0.cross_attn.k.lora_B.weight holds non-finite values (NaN or infinity)",
        ),
        (
            "per-layer alpha inf",
            lambda t: t.__setitem__(_first(t, ".alpha"), torch.tensor(float("inf"))),
            {},
            "diffusion_model.blocks.0.cross_attn.k.alpha holds non-finite values (NaN or infinity)",
        ),
        (
            "metadata alpha nan",
            lambda t: None,
            {"masktrain.alpha": "nan"},
            "masktrain.alpha = 'nan' is not a finite number",
        ),
    ],
)
def test_convert_lora_refuses_a_non_finite_lora_and_writes_nothing(
    tmp_path: Path, case: str, edit, metadata: dict[str, str], message: str
) -> None:
    bad = _edited(_saved(tmp_path), tmp_path / "bad.safetensors", edit, metadata)
    target = tmp_path / "out.safetensors"
    _refused(_convert(bad, target), str(bad), message)
    assert not target.exists() and sorted(p.name for p in tmp_path.iterdir()) == [
        "bad.safetensors",
        "wan-comfyui.safetensors",
    ]


def test_sample_refuses_a_lora_with_a_nan_and_draws_nothing(tmp_path: Path) -> None:
    bad = _edited(_saved(tmp_path), tmp_path / "nan.safetensors", _nan_in_b, {})
    _refused(
        _sample(tmp_path, bad), f"{bad}: diffusion_model.blocks.0.cross_attn.k.lora_B.weight holds non-finite"
    )
    _no_samples(tmp_path)


@pytest.mark.parametrize("layout", ["comfyui", "musubi"])
def test_load_lora_into_refuses_non_finite_alphas_by_layer(tmp_path: Path, layout: str) -> None:
    """All per-layer alphas NaN in a file without metadata (as another trainer writes it) are named
    as non-finite, not as "layers with different alphas [nan, nan, ...]" (N18)."""

    def all_nan(tensors: dict[str, torch.Tensor]) -> None:
        for key in tensors:
            if key.endswith(".alpha"):
                tensors[key] = torch.tensor(float("nan"))

    bad = _edited(_saved(tmp_path, layout=layout), tmp_path / "nan-alphas.safetensors", all_nan, None)
    model = tiny_denoiser("wan")
    with pytest.raises(LoraFileError) as error:
        load_lora_into(model, bad, get_family("wan"))
    assert str(error.value).endswith(
        ".alpha holds non-finite values (NaN or infinity); the LoRA is damaged "
        "or its training diverged: use an earlier checkpoint"
    )
    assert "different alphas" not in str(error.value) and not hasattr(model, "peft_config")


# --- N9: another model size, a rank that disagrees --------------------------------------------------


@pytest.mark.parametrize("metadata", [None, {}], ids=["no metadata", "masktrain metadata"])
def test_a_lora_for_another_model_size_is_named_before_peft_sees_it(
    tmp_path: Path, metadata: dict[str, str] | None
) -> None:
    wide = _edited(_saved(tmp_path), tmp_path / "wide.safetensors", _widened, metadata)
    model = tiny_denoiser("wan")
    with pytest.raises(LoraFileError) as error:
        load_lora_into(model, wide, get_family("wan"))
    assert str(error.value) == (
        f"{wide}: blocks.0.attn1.to_k.lora_A.weight has shape [{LORA_RANK}, 48], but this wan "
        f"transformer's layer takes [{LORA_RANK}, 24] (24 in, 24 out): the LoRA was made for a model "
        "of another size; pass the --dit it was trained on"
    )
    assert not hasattr(model, "peft_config")  # refused before add_adapter
    # convert-lora cannot know the model: a 14B LoRA converts (the tiny model only names layers)
    assert _convert(wide, tmp_path / "wide-musubi.safetensors").exit_code == 0


def test_sample_names_a_lora_for_another_model_size_in_one_line(tmp_path: Path) -> None:
    wide = _edited(_saved(tmp_path), tmp_path / "wide.safetensors", _widened, None)
    _refused(
        _sample(tmp_path, wide),
        f"{wide}: blocks.0.attn1.to_k.lora_A.weight has shape",
        "made for a model of another size",
    )
    _no_samples(tmp_path)


def test_a_metadata_rank_that_disagrees_with_the_matrices_is_refused(tmp_path: Path) -> None:
    bad = _edited(_saved(tmp_path), tmp_path / "rank8.safetensors", lambda t: None, {"masktrain.rank": "8"})
    expected = (
        f"{bad}: its metadata says masktrain.rank = 8, but "
        f"diffusion_model.blocks.0.cross_attn.k.lora_A.weight has rank {LORA_RANK} "
        f"(shape [{LORA_RANK}, 24]); the metadata disagrees with the matrices"
    )
    target = tmp_path / "out.safetensors"
    _refused(_convert(bad, target), expected)
    assert not target.exists()
    _refused(_sample(tmp_path, bad), expected)
    _no_samples(tmp_path)


def test_matrices_of_different_ranks_in_one_layer_are_refused(tmp_path: Path) -> None:
    def short_b(tensors: dict[str, torch.Tensor]) -> None:
        key = _first(tensors, "lora_B.weight")
        tensors[key] = tensors[key][:, :2].contiguous()

    bad = _edited(_saved(tmp_path), tmp_path / "b.safetensors", short_b, None)
    with pytest.raises(LoraFileError, match=r"lora_B\.weight has shape \[24, 2\], not a rank-4 LoRA matrix"):
        load_lora_into(tiny_denoiser("wan"), bad, get_family("wan"))


# --- N18: metadata that is not a number; a LoRA of another family -----------------------------------


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        (
            {"masktrain.rank": "abc"},
            "its metadata masktrain.rank = 'abc' is not a whole number >= 1; a damaged file",
        ),
        (
            {"masktrain.alpha": "x"},
            "its metadata masktrain.alpha = 'x' is not a finite number; a damaged file",
        ),
        (
            {"masktrain.alpha": "inf"},
            "its metadata masktrain.alpha = 'inf' is not a finite number; a damaged file",
        ),
    ],
)
def test_metadata_that_is_not_a_number_is_one_line(
    tmp_path: Path, metadata: dict[str, str], message: str
) -> None:
    bad = _edited(_saved(tmp_path), tmp_path / "bad.safetensors", lambda t: None, metadata)
    target = tmp_path / "out.safetensors"
    _refused(_convert(bad, target), f"{bad}: {message}")
    assert not target.exists()
    with pytest.raises(LoraFileError) as error:
        load_lora_into(tiny_denoiser("wan"), bad, get_family("wan"))
    assert str(error.value) == f"{bad}: {message}"


def test_sample_with_rank_abc_is_one_line(tmp_path: Path) -> None:
    bad = _edited(_saved(tmp_path), tmp_path / "abc.safetensors", lambda t: None, {"masktrain.rank": "abc"})
    _refused(_sample(tmp_path, bad), f"{bad}: its metadata masktrain.rank = 'abc' is not a whole number")
    _no_samples(tmp_path)


def test_a_qwen_lora_given_to_sample_arch_wan_names_its_family(tmp_path: Path) -> None:
    """The report's case: a LoRA masktrain trained for Qwen-Image, sampled with ``--arch wan``."""
    qwen = _saved(tmp_path, "qwen_image")
    line = _refused(_sample(tmp_path, qwen), f"{qwen}: this LoRA was trained for qwen_image; --arch is wan")
    assert "names no Linear layer" not in line
    _no_samples(tmp_path)


def test_check_file_tells_what_the_file_alone_tells(tmp_path: Path) -> None:
    """``lora_file.check_file``: every check that needs no model, for a caller to run before any
    loads; a good file passes."""
    lora_file.check_file(_saved(tmp_path), get_family("wan"))
    with pytest.raises(LoraFileError, match="this LoRA was trained for qwen_image; --arch is wan"):
        lora_file.check_file(_saved(tmp_path, "qwen_image"), get_family("wan"))
    nan = _edited(_saved(tmp_path), tmp_path / "nan.safetensors", _nan_in_b, {})
    with pytest.raises(LoraFileError, match=r"lora_B\.weight holds non-finite values"):
        lora_file.check_file(nan, get_family("wan"))
    abc = _edited(_saved(tmp_path), tmp_path / "abc.safetensors", lambda t: None, {"masktrain.rank": "abc"})
    with pytest.raises(LoraFileError, match=r"masktrain\.rank = 'abc' is not a whole number"):
        lora_file.check_file(abc, get_family("wan"))
