"""The base model is checked before it can poison a run (red-team 2026-12, N11, N12, N21), on
hostile single files of a small WAN transformer (1 head of 128, so the released head dim applies
and the real commands read it; text dim 32 like the tiny UMT5) built with diffusers:

- N12: weights stored as int8 or bool are refused by name from the header, before any tensor is
  read, with or without ``--fp8_base``; an fp8 scale of the wrong shape is one line on both paths.
- N21: a NaN or infinite weight is the model's fault, named with its tensor (not "training
  diverged ... lower --learning_rate"), and is never clamped to 448 by ``--fp8_base``; an fp8
  scale of 0 is refused; a file missing its last blocks is a warning naming the released depths.
- N11: a transformer that does not take the cache's latents or text embeddings, or the sampling
  VAE's / text encoder's, is one line naming both numbers, from the headers before it loads.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate import init_empty_weights
from click.testing import CliRunner
from diffusers import QwenImageTransformer2DModel, WanTransformer3DModel
from safetensors.torch import save_file

from helpers import cached, train_config, words
from masktrain import catalog
from masktrain.cli import main
from masktrain.config import MemorySettings
from masktrain.data.cached_items import find_cached_items
from masktrain.denoiser.experts import load_for_sampling
from masktrain.errors import ModelLoadError
from masktrain.models import fit, get_family, wan, wan_checkpoint
from masktrain.models.single_file import Fp8Load
from masktrain.train.build import check_cache_fits
from reference import wan_dit_original

CPU, F32 = torch.device("cpu"), torch.float32
COMFY = "model.diffusion_model."
Q1 = COMFY + "blocks.1.self_attn.q.weight"  # the tensor the report spoils
SMALL_WAN: dict[str, Any] = {  # the tiny transformer with one released-size head
    key: value for key, value in wan.TINY_TRANSFORMER.items() if key != "rope_max_seq_len"
} | {"num_attention_heads": 1, "attention_head_dim": 128}
FLOAT_ONLY = (
    "masktrain reads float and fp8 checkpoints (float32, bf16, fp16, float8_e4m3fn, float8_e5m2): "
    "use such a file"
)
DAMAGED = "the model file is damaged; download or convert it again"


def wan_state(**config: Any) -> dict[str, torch.Tensor]:
    """A small WAN transformer's weights under ComfyUI's names (random, seeded)."""
    torch.manual_seed(0)
    model = WanTransformer3DModel(**(SMALL_WAN | config))
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn_like(param) * 0.02)
    return {
        COMFY + wan_dit_original(k): v.detach().clone().contiguous() for k, v in model.state_dict().items()
    }


def write(path: Path, state: dict[str, torch.Tensor]) -> Path:
    save_file(state, str(path))
    return path


def spoiled(value: float, dtype: torch.dtype = torch.float32, key: str = Q1) -> dict[str, torch.Tensor]:
    """The small WAN's weights with one element of `key` set to `value`, stored as `dtype`."""
    state = wan_state()
    tensor = state[key].clone()
    tensor[0, 0] = value
    state[key] = tensor.to(dtype)
    return state


def fp8_scaled(scale: torch.Tensor) -> dict[str, torch.Tensor]:
    """ComfyUI's fp8_scaled layout for ``Q1``: the weight in e4m3, its ``scale_weight`` and the marker."""
    state = wan_state()
    state[Q1] = state[Q1].to(torch.float8_e4m3fn)
    state[Q1.replace(".weight", ".scale_weight")] = scale
    state[COMFY + "scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    return state


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four items cached with the tiny VAE (16 channels) and the tiny UMT5 (32 wide)."""
    return cached(tmp_path_factory.mktemp("data"), "wan")


def train(toml: Path, dit: Path, out: Path, extra: str = "") -> Any:
    line = "train --dataset_config {toml} --arch wan --dit {dit} --device cpu --network_dim 4 "
    line += "--max_train_steps 1 --output_dir {out} " + extra
    return CliRunner().invoke(main, words(line, toml=toml, dit=dit, out=out))


def last_line(result: Any) -> str:
    return str(result.output.splitlines()[-1])


# --- N12: dtypes masktrain does not read ------------------------------------------------------------


@pytest.mark.parametrize(("dtype", "word"), [(torch.int8, "int8"), (torch.bool, "bool")])
@pytest.mark.parametrize("fp8", ["", "--fp8_base", "--fp8_base --fp8_scaled"])
def test_integer_or_boolean_weights_are_refused_by_name(
    dataset: Path, tmp_path: Path, dtype: torch.dtype, word: str, fp8: str
) -> None:
    """The report's int8 / bool ``blocks.1.self_attn.q.weight``: a traceback without --fp8_base,
    quantised and trained on with it. Now exit 2 and the README's "refused by name"."""
    state = wan_state()
    state[Q1] = (state[Q1] * 100).to(dtype)
    dit = write(tmp_path / f"{word}.safetensors", state)
    result = train(dataset, dit, tmp_path / "out", fp8)
    assert result.exit_code == 2, result.output
    assert last_line(result) == f"Error: --dit {dit}: holds {word} weights ({Q1}); {FLOAT_ONLY}"
    assert not (tmp_path / "out" / "lora.safetensors").exists()


def test_the_dtype_is_refused_from_the_header_before_any_tensor_is_read(tmp_path: Path) -> None:
    """blocks.0 holds a NaN (found only by reading it) and blocks.1 an int8 weight: the int8 is
    what is named, so no tensor was read."""
    state = spoiled(math.nan, key=COMFY + "blocks.0.self_attn.q.weight")
    state[Q1] = state[Q1].to(torch.int8)
    dit = write(tmp_path / "both.safetensors", state)
    for fp8 in (None, Fp8Load("scaled", wan.FP8_TARGETS, F32)):
        with pytest.raises(ModelLoadError, match=re.escape(f"holds int8 weights ({Q1})")):
            wan_checkpoint.load_transformer_file(dit, "--dit", F32, fp8)


@pytest.mark.parametrize("fp8", ["", "--fp8_base"])
def test_an_fp8_scale_of_the_wrong_shape_is_one_line_with_or_without_fp8_base(
    dataset: Path, tmp_path: Path, fp8: str
) -> None:
    dit = write(tmp_path / "scale7.safetensors", fp8_scaled(torch.ones(7)))
    result = train(dataset, dit, tmp_path / "out", fp8)
    assert result.exit_code == 2, result.output
    scale = Q1.replace(".weight", ".scale_weight")
    assert last_line(result) == (
        f"Error: --dit {dit}: the fp8 scale '{scale}' has shape [7]; expected one per tensor or per row"
    )


# --- N21: a damaged base model ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "dtype"),
    [
        (math.nan, torch.float32),
        (math.inf, torch.float32),
        (-math.inf, torch.bfloat16),
        (math.nan, torch.float8_e4m3fn),
    ],
    ids=["nan", "inf", "-inf-bf16", "nan-fp8"],
)
@pytest.mark.parametrize("fp8", ["", "--fp8_base"])
def test_a_non_finite_weight_is_named_as_the_models_fault(
    dataset: Path, tmp_path: Path, value: float, dtype: torch.dtype, fp8: str
) -> None:
    """Not "training diverged ... lower --learning_rate" at step 1, and with --fp8_base an
    infinity is not clamped to 448 and trained on: exit 2 at load, naming the file and tensor."""
    dit = write(tmp_path / "damaged.safetensors", spoiled(value, dtype))
    result = train(dataset, dit, tmp_path / "out", fp8)
    assert result.exit_code == 2, result.output
    assert last_line(result) == f"Error: --dit {dit}: tensor '{Q1}' holds NaN or infinity: {DAMAGED}"
    assert "diverged" not in result.output and not (tmp_path / "out" / "lora.safetensors").exists()


@pytest.mark.parametrize("fp8", ["", "--fp8_base"])
def test_an_fp8_scale_of_zero_is_refused(dataset: Path, tmp_path: Path, fp8: str) -> None:
    dit = write(tmp_path / "scale0.safetensors", fp8_scaled(torch.zeros(())))
    result = train(dataset, dit, tmp_path / "out", fp8)
    assert result.exit_code == 2, result.output
    scale = Q1.replace(".weight", ".scale_weight")
    assert last_line(result) == (
        f"Error: --dit {dit}: the fp8 scale '{scale}' is 0, which makes '{Q1}' all zeros: {DAMAGED}"
    )


def test_a_folder_with_a_non_finite_weight_is_refused(tmp_path: Path) -> None:
    """A diffusers folder loads through ``from_pretrained`` (without --fp8_base): checked after it."""
    model = wan.tiny_transformer()
    with torch.no_grad():
        model.blocks[1].attn1.to_q.weight[0, 0] = math.inf
    model.save_pretrained(tmp_path / "dit")
    with pytest.raises(ModelLoadError) as error:
        get_family("wan").load_transformer(str(tmp_path / "dit"), "--dit", CPU, F32)
    assert str(error.value) == (
        f"--dit {tmp_path / 'dit'}: tensor 'blocks.1.attn1.to_q.weight' holds NaN or infinity: the model is "
        "damaged; download or convert it again"
    )


def test_a_transformer_missing_its_last_blocks_gets_a_warning_naming_the_released_depths() -> None:
    """Decided: such a file is a consistent smaller model, so it loads, with a warning when its
    width is a released model's and its depth none of theirs; a width no release has (a custom or
    test model, like the report's 128-wide one) gets none."""

    def meta(heads: int, layers: int) -> torch.nn.Module:
        with init_empty_weights():
            model: torch.nn.Module = WanTransformer3DModel(num_attention_heads=heads, num_layers=layers)
        return model

    assert fit.unreleased_depth(catalog.WAN, meta(12, 29)) == (
        "is 1536 wide with 29 blocks, but the released 1536-wide WAN 2.1 / 2.2 transformers (t2v-1.3B) have "
        "30: a file missing blocks loads as a smaller model; check its download or conversion"
    )
    assert "(t2v-14B / t2i-14B / t2v-A14B / i2v-14B / flf2v-14B / i2v-A14B) have 40" in str(
        fit.unreleased_depth(catalog.WAN, meta(40, 39))
    )
    assert fit.unreleased_depth(catalog.WAN, meta(12, 30)) is None
    assert fit.unreleased_depth(catalog.WAN, meta(1, 1)) is None


# --- N11: a transformer that does not fit the cache or the sampling models ---------------------------

CACHE_TEXT = "the cache {cache} holds 32-wide text embeddings, but --dit {dit} takes 4096-wide ones: " + (
    "re-cache the dataset with this model's text encoder (masktrain cache --t5)"
)
CACHE_LATENTS = "the cache {cache} holds 16-channel latents, but --dit {dit} takes 48-channel latents: " + (
    "re-cache the dataset with this model's VAE (masktrain cache --vae)"
)
MISFITS = {
    "text4096": ({"text_dim": 4096}, CACHE_TEXT),
    "channels48": ({"in_channels": 48, "out_channels": 48}, CACHE_LATENTS),
}


@pytest.mark.parametrize("case", sorted(MISFITS))
def test_a_dit_that_does_not_fit_the_cache_is_named_from_the_headers(
    dataset: Path, tmp_path: Path, case: str
) -> None:
    config, message = MISFITS[case]
    dit = write(tmp_path / f"{case}.safetensors", wan_state(**config))
    items = find_cached_items(dataset, "wan")
    run = train_config(dataset, tmp_path / "out", dit=str(dit))
    with pytest.raises(ModelLoadError) as error:
        check_cache_fits(run, get_family("wan"), items)
    assert str(error.value) == message.format(cache=dataset.parent / "cache", dit=dit)


def test_an_image_to_video_dit_is_named_as_such(dataset: Path, tmp_path: Path) -> None:
    i2v = {"in_channels": 36, "image_dim": 8, "added_kv_proj_dim": 128}
    dit = write(tmp_path / "i2v.safetensors", wan_state(**i2v))
    run = train_config(dataset, tmp_path / "out", dit="tiny", dit_high_noise=str(dit), timestep_boundary=0.9)
    with pytest.raises(ModelLoadError) as error:
        check_cache_fits(run, get_family("wan"), find_cached_items(dataset, "wan"))
    cache = dataset.parent / "cache"
    assert str(error.value) == (
        f"--dit_high_noise {dit} takes 36 input channels, 20 of them image conditioning (an image-to-video "
        f"model), but the cache {cache} holds none: train and cache with its --task i2v-14B, flf2v-14B or "
        "i2v-A14B"
    )


def test_a_qwen_folder_that_does_not_fit_the_cache_is_named_from_its_config(tmp_path: Path) -> None:
    """A diffusers folder's config.json tells (Qwen packs 2x2 latent cells: in_channels 64 takes
    16-channel latents; the tiny Qwen VAE makes 4)."""
    toml = cached(tmp_path / "data", "qwen_image")
    family = get_family("qwen_image")
    folder = tmp_path / "dit"
    with torch.random.fork_rng():
        QwenImageTransformer2DModel(
            **(dict(family.transformer_config("tiny", "--dit")) | {"in_channels": 64, "out_channels": 16})
        ).save_pretrained(folder)
    run = train_config(toml, tmp_path / "out", "qwen_image", dit=str(folder))
    with pytest.raises(ModelLoadError) as error:
        check_cache_fits(run, family, find_cached_items(toml, "qwen_image"))
    assert str(error.value) == (
        f"the cache {tmp_path / 'data' / 'cache'} holds 4-channel latents, but --dit {folder} takes "
        "16-channel latents: re-cache the dataset with this model's VAE (masktrain cache --vae)"
    )


def test_a_loaded_dit_is_checked_against_the_feeds_too() -> None:
    family = get_family("wan")
    model = family.load_transformer("tiny", "--dit", CPU, F32)
    fit.check_loaded(family, model, "--dit", "tiny", [fit.cache_feed(Path("c"), 16, 32, "--t5")])
    with pytest.raises(
        ModelLoadError, match=r"^the cache c holds 48-channel latents, but --dit tiny takes 16"
    ):
        fit.check_loaded(family, model, "--dit", "tiny", [fit.cache_feed(Path("c"), 48, 32, "--t5")])


@pytest.fixture(scope="module")
def tiny_sampling() -> fit.Feed:
    """What ``sample --vae tiny --t5 tiny`` feeds: 16-channel latents, 32-wide embeddings."""
    family = get_family("wan")
    vae = family.load_vae("tiny", CPU, F32)
    embeddings = family.encode_text(family.load_text_encoder("tiny", CPU, F32), ["a photo"])
    return fit.sampling_feed(family, vae, "tiny", embeddings, "tiny")


SAMPLING = {
    "text4096": "--t5 tiny makes 32-wide text embeddings, but --dit {dit} takes 4096-wide ones: pass this "
    "model's text encoder to --t5",
    "channels48": "--vae tiny makes 16-channel latents, but --dit {dit} takes 48-channel latents: pass this "
    "model's VAE to --vae",
}


@pytest.mark.parametrize("case", sorted(MISFITS))
def test_a_dit_that_does_not_fit_the_sampling_models_is_named_before_it_loads(
    tiny_sampling: fit.Feed, tmp_path: Path, case: str
) -> None:
    """The file also holds a NaN weight, which loading would name: the misfit is named first."""
    state = wan_state(**MISFITS[case][0])
    state[Q1][0, 0] = math.nan
    dit = write(tmp_path / f"{case}.safetensors", state)
    with pytest.raises(ModelLoadError) as error:
        load_for_sampling(
            get_family("wan"), str(dit), None, 0.9, None, MemorySettings(), CPU, F32, [tiny_sampling]
        )
    assert str(error.value) == SAMPLING[case].format(dit=dit)
    load_for_sampling(get_family("wan"), "tiny", None, 0.9, None, MemorySettings(), CPU, F32, [tiny_sampling])


# --- N11 through the commands (needs train/loop.py, sample/sampler.py and sample/run.py to pass the feeds)


@pytest.mark.parametrize("case", sorted(MISFITS))
def test_train_names_a_dit_that_does_not_fit_the_cache_before_it_loads(
    dataset: Path, tmp_path: Path, case: str
) -> None:
    """The report's repro (a RuntimeError traceback at step 1): exit 2, one line. The file also
    holds a NaN weight, which loading would name: the misfit is named first."""
    config, message = MISFITS[case]
    state = wan_state(**config)
    state[Q1][0, 0] = math.nan
    dit = write(tmp_path / f"{case}.safetensors", state)
    result = train(dataset, dit, tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert last_line(result) == "Error: " + message.format(cache=dataset.parent / "cache", dit=dit)
    assert not (tmp_path / "out" / "lora.safetensors").exists()


@pytest.mark.parametrize("case", sorted(MISFITS))
def test_sample_names_a_dit_that_does_not_fit_the_vae_or_text_encoder(tmp_path: Path, case: str) -> None:
    dit = write(tmp_path / f"{case}.safetensors", wan_state(**MISFITS[case][0]))
    prompts = tmp_path / "p.txt"
    prompts.write_text("a photo --w 64 --h 64 --s 2\n")
    line = "sample --arch wan --dit {dit} --vae tiny --t5 tiny --device cpu --sample_prompts {p} "
    line += "--output_dir {out}"
    result = CliRunner().invoke(main, words(line, dit=dit, p=prompts, out=tmp_path / "S"))
    assert result.exit_code == 2, result.output
    assert last_line(result) == "Error: " + SAMPLING[case].format(dit=dit)
    assert not list((tmp_path / "S").rglob("*.png"))


def test_train_names_a_sampling_vae_that_does_not_fit_the_dit(dataset: Path, tmp_path: Path) -> None:
    dit = write(tmp_path / "small.safetensors", wan_state())
    prompts = tmp_path / "p.txt"
    prompts.write_text("a photo --w 64 --h 64 --s 2\n")
    extra = f"--vae tiny-ti2v --t5 tiny --sample_prompts {prompts} --sample_every_n_steps 1"
    result = train(dataset, dit, tmp_path / "out", extra)
    assert result.exit_code == 2, result.output
    assert last_line(result) == (
        f"Error: --vae tiny-ti2v makes 48-channel latents, but --dit {dit} takes 16-channel latents: pass "
        "this model's VAE to --vae"
    )
