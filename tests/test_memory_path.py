"""The 24 GB path on the CPU: fp8 base weights (numerics against the full-precision reference,
LoRA on top, loading while reading, ComfyUI fp8 files), block swap (same loss and LoRA gradients
as without it, and the per-block layout log through teacher, student and backward), activation
offload, the idle WAN 2.2 expert on the host, fp8 text encoders, and the flag errors.

On the CPU the swap's copies are no-ops (the device is the host), but every hook, the schedule
and the restore run; the layout log says where the schedule keeps each block."""

import dataclasses
import json
import logging
import re
from pathlib import Path

import pytest
import safetensors.torch
import torch

from helpers import cached, train_config
from masktrain.cli.train import config_from_args
from masktrain.config import MemorySettings
from masktrain.data.cached_items import find_cached_items
from masktrain.data.loader import load_batch
from masktrain.denoiser import lora
from masktrain.errors import ModelLoadError, SettingError, TrainConfigError
from masktrain.models import get_family, qwen_image, wan
from masktrain.models.fp8 import FP8, FP8_MAX, Fp8Linear, dequantize, error_bound, quantize, quantize_model
from masktrain.models.placement import is_lora
from masktrain.models.single_file import Fp8Load
from masktrain.train.build import build_experts
from masktrain.train.loop import run as run_train
from masktrain.train.step import compute_loss

CPU = torch.device("cpu")
TINY_FAMILIES = {"wan": wan, "qwen_image": qwen_image}


# --- fp8 numerics ---------------------------------------------------------------------------------


def _weight(out_features: int, in_features: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator) * 0.05
    weight[3, 5] = 2.5  # an outlier: with block scales it costs precision only in its own block
    weight[7] = 0.0  # an all-zero row
    return weight


@pytest.mark.parametrize(
    ("in_features", "mode", "scale_shape"),
    [(128, "scaled", (16, 2, 1)), (24, "scaled", (16, 1)), (128, "e4m3", None)],
)
def test_quantise_dequantise_error_is_within_half_an_e4m3_step(in_features, mode, scale_shape) -> None:
    weight = _weight(16, in_features)
    quantized, scale = quantize(weight, mode)
    assert quantized.dtype == FP8
    assert (None if scale is None else tuple(scale.shape)) == scale_shape
    error = (dequantize(quantized, scale, torch.float32) - weight).abs()
    bound = error_bound(weight, scale)
    assert bool((error <= bound).all()), float((error - bound).max())
    if scale is not None:
        # Each block's largest weight maps to exactly +-448: e4m3's range is used in full.
        grouped = quantized.float().view(16, -1, in_features // scale.shape[1]) if scale.ndim == 3 else None
        top = (grouped if grouped is not None else quantized.float()).abs().amax(dim=-1)
        assert bool(((top == FP8_MAX) | (top == 0)).all())
        # The outlier's block has its own scale; the neighbouring block of its row does not pay for it.
        if scale.ndim == 3:
            assert float(scale[3, 0]) == pytest.approx(2.5 / FP8_MAX) and float(scale[3, 1]) < 0.5 / FP8_MAX


def test_fp8_linear_output_is_within_the_bound_of_the_full_precision_linear() -> None:
    weight = _weight(32, 128)
    linear = torch.nn.Linear(128, 32)
    with torch.no_grad():
        linear.weight.copy_(weight)
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(1))
    fp8 = Fp8Linear.from_linear(linear, "scaled")
    with torch.no_grad():
        reference, got = linear(x), fp8(x)
    quantized, scale = quantize(weight, "scaled")
    # Every output element is off by at most sum_j |x_j| * (the weight's error bound) (+ float32 rounding).
    bound = x.abs() @ error_bound(weight, scale).T + 1e-5
    assert bool(((got - reference).abs() <= bound).all())
    # Relative to the output's size the error is e4m3's ~2-3 %, measured: below 4 % here.
    assert float((got - reference).norm() / reference.norm()) < 0.04
    assert torch.equal(fp8.weight, quantized) and torch.equal(fp8.scale, scale)


def _fp8_tiny(arch: str, mode: str = "scaled") -> torch.nn.Module:
    return get_family(arch).load_transformer("tiny", "--dit", CPU, torch.float32, fp8=mode)


def _inputs(arch: str) -> tuple[torch.Tensor, torch.Tensor, object]:
    from masktrain.models.base import TextBatch

    generator = torch.Generator().manual_seed(3)
    channels, width = (16, 32) if arch == "wan" else (4, 16)  # latent channels, text width
    noisy = torch.randn(2, channels, 1, 8, 8, generator=generator)
    text = torch.randn(2, 7, width, generator=generator)
    return noisy, torch.tensor([0.3, 0.8]), TextBatch(hidden=text, mask=None)


@pytest.mark.parametrize("arch", ["wan", "qwen_image"])
def test_lora_trains_on_the_fp8_base_and_adapters_off_is_the_fp8_base_exactly(arch: str) -> None:
    family = get_family(arch)
    base = _fp8_tiny(arch)
    model = _fp8_tiny(arch)
    lora.add_lora(model, family, rank=4, alpha=4.0)
    linears = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert any(isinstance(m, Fp8Linear) for m in linears)
    # peft's lora_A / lora_B are plain float32 Linear layers; only the base layers are fp8.
    for name, module in model.named_modules():
        if is_lora(name) and isinstance(module, torch.nn.Linear):
            assert type(module) is torch.nn.Linear and module.weight.dtype == torch.float32
    with torch.no_grad():
        for param in lora.lora_parameters(model):
            param.normal_(0, 0.1)  # LoRA B is zero at init: make the adapter matter
    noisy, sigmas, text = _inputs(arch)
    out = family.predict(model, noisy, sigmas, text)
    out.square().mean().backward()
    grads = [p.grad for p in lora.lora_parameters(model)]
    # Every LoRA weight gets a gradient through the fp8 layers (Qwen-Image's last block's text
    # stream feeds nothing, so its few LoRA layers get none, as in bf16).
    assert sum(g is not None and bool(g.abs().sum() > 0) for g in grads) > 0.75 * len(grads)
    assert all(p.grad is None for n, p in model.named_parameters() if not is_lora(n))
    with torch.no_grad(), lora.adapters_disabled(model):
        teacher = family.predict(model, noisy, sigmas, text)
        reference = family.predict(base, noisy, sigmas, text)
    assert torch.equal(teacher, reference)
    assert not torch.equal(out.detach(), reference)


@pytest.mark.parametrize("arch", ["wan", "qwen_image"])
def test_fp8_base_targets_the_block_linears_only(arch: str) -> None:
    model = _fp8_tiny(arch)
    targets = TINY_FAMILIES[arch].FP8_TARGETS
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            assert isinstance(module, Fp8Linear) == targets.matches(name), name
    others = {p.dtype for n, p in model.named_parameters() if not n.endswith(".weight") or "norm" in n}
    assert others == {torch.float32}


# --- loading while reading ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def four_block_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny transformers with four blocks, saved as sharded diffusers folders."""
    root = tmp_path_factory.mktemp("folders")
    folders = {}
    for arch, module in TINY_FAMILIES.items():
        folders[arch] = root / arch
        module.tiny_transformer(layers=4).save_pretrained(folders[arch], max_shard_size="60KB")
        assert len(list(folders[arch].glob("*.safetensors"))) > 1
    return folders


@pytest.mark.parametrize("arch", ["wan", "qwen_image"])
@pytest.mark.parametrize("mode", ["scaled", "e4m3"])
def test_a_sharded_folder_is_quantised_while_read_as_in_memory(arch, mode, four_block_folders) -> None:
    family = get_family(arch)
    loaded = family.load_transformer(str(four_block_folders[arch]), "--dit", CPU, torch.float32, fp8=mode)
    in_memory = TINY_FAMILIES[arch].tiny_transformer(layers=4)
    quantize_model(in_memory, TINY_FAMILIES[arch].FP8_TARGETS, mode)
    expected = in_memory.state_dict()
    state = loaded.state_dict()
    assert state.keys() == expected.keys()
    for key, tensor in expected.items():
        assert state[key].dtype == tensor.dtype and torch.equal(state[key], tensor), key


def _comfy_fp8_file(path: Path, layout: str) -> tuple[Path, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """A tiny Qwen-Image transformer (ComfyUI keeps diffusers names) saved as ComfyUI saves fp8:
    ``legacy``: ``scaled_fp8`` marker, per-tensor float32 ``scale_weight``, ``scale_input``;
    ``mixed``: per-row ``weight_scale`` and a ``comfy_quant`` JSON record. Returns the file and
    each block Linear's (fp8 weight, scale) as written."""
    model = qwen_image.tiny_transformer()
    state = {f"model.diffusion_model.{k}": v for k, v in model.state_dict().items()}
    written = {}
    for name, module in model.named_modules():
        if not (isinstance(module, torch.nn.Linear) and name.startswith("transformer_blocks.")):
            continue
        key = f"model.diffusion_model.{name}"
        weight = module.weight.detach()
        if layout == "legacy":
            scale = weight.abs().amax() / FP8_MAX
            state[f"{key}.scale_weight"] = scale.reshape(())
            state[f"{key}.scale_input"] = torch.ones(())
        else:
            scale = weight.abs().amax(dim=1) / FP8_MAX
            state[f"{key}.weight_scale"] = scale
            record = json.dumps({"format": "float8_e4m3fn"}).encode()
            state[f"{key}.comfy_quant"] = torch.tensor(list(record), dtype=torch.uint8)
        quantized = (weight / (scale if scale.ndim == 0 else scale[:, None])).to(FP8)
        state[f"{key}.weight"] = quantized
        written[name] = (quantized, scale)
    if layout == "legacy":
        state["model.diffusion_model.scaled_fp8"] = torch.zeros(0, dtype=FP8)  # as ComfyUI writes it
    safetensors.torch.save_file(state, path)
    return path, written


TINY_QWEN_OVERRIDES = {"axes_dims_rope": (8, 4, 4)}


@pytest.mark.parametrize("layout", ["legacy", "mixed"])
def test_a_comfyui_fp8_file_loads_with_the_weights_its_scales_say(tmp_path: Path, layout: str) -> None:
    from masktrain.models.qwen_image_checkpoint import load_transformer_file

    path, written = _comfy_fp8_file(tmp_path / f"qwen_fp8_{layout}.safetensors", layout)
    fp8 = Fp8Load("scaled", qwen_image.FP8_TARGETS, torch.float32)
    kept = load_transformer_file(path, "--dit", torch.float32, fp8, overrides=TINY_QWEN_OVERRIDES)
    dequantised = load_transformer_file(path, "--dit", torch.float32, overrides=TINY_QWEN_OVERRIDES)
    for name, (quantized, scale) in written.items():
        module = kept.get_submodule(name)
        assert isinstance(module, Fp8Linear)
        assert torch.equal(module.weight, quantized)  # as stored: never re-quantised
        assert module.scale is not None and torch.equal(module.scale.flatten(), scale.float().flatten())
        per_row = scale if scale.ndim == 0 else scale[:, None]
        expected = quantized.float() * per_row
        plain = dequantised.get_submodule(name)
        assert type(plain) is torch.nn.Linear and torch.equal(plain.weight, expected)
        assert torch.equal(dequantize(module.weight, module.scale, torch.float32), expected)
    noisy, sigmas, text = _inputs("qwen_image")
    family = get_family("qwen_image")
    with torch.no_grad():
        torch.testing.assert_close(
            family.predict(kept, noisy, sigmas, text), family.predict(dequantised, noisy, sigmas, text)
        )


def test_a_quantisation_other_than_fp8_is_refused_by_name(tmp_path: Path) -> None:
    path, _ = _comfy_fp8_file(tmp_path / "mixed.safetensors", "mixed")
    state = safetensors.torch.load_file(path)
    key = next(k for k in state if k.endswith(".comfy_quant"))
    state[key] = torch.tensor(list(json.dumps({"format": "nvfp4"}).encode()), dtype=torch.uint8)
    safetensors.torch.save_file(state, path)
    from masktrain.models.qwen_image_checkpoint import load_transformer_file

    with pytest.raises(ModelLoadError, match=r"quantised as 'nvfp4'; only fp8"):
        load_transformer_file(path, "--dit", torch.float32, overrides=TINY_QWEN_OVERRIDES)


# --- block swap, activation offload, two experts --------------------------------------------------


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {arch: cached(tmp_path_factory.mktemp(arch), arch) for arch in TINY_FAMILIES}


def _step(
    arch: str, toml: Path, out: Path, dit: str, **settings: object
) -> tuple[float, torch.Tensor, object]:
    """One batch through the training step: (loss, the LoRA gradients, the experts)."""
    memory = {k: v for k, v in settings.items() if k in {f.name for f in dataclasses.fields(MemorySettings)}}
    other = {k: v for k, v in settings.items() if k not in memory}
    config = train_config(
        toml, out, arch, dit=dit, gradient_checkpointing=True, memory=MemorySettings(**memory), **other
    )
    family = get_family(arch)
    experts = build_experts(config, family, CPU, torch.float32)
    with torch.no_grad():
        for param in lora.lora_parameters(experts.low):
            param.normal_(0, 0.05)  # a trained-looking LoRA, so the prior term is not zero
    batch = load_batch(0, find_cached_items(toml, arch)[:2])
    try:
        result = compute_loss(config, family, experts, batch, 0, CPU, torch.float32, None)
        result.loss.backward()
    finally:
        experts.mark("after backward")
        experts.restore_layout("after backward")
    assert result.prior > 0
    # (Qwen-Image's last block's text stream feeds nothing: its LoRA gets no gradient)
    grads = torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for _, p in experts.trainable()]
    )
    return float(result.loss.detach()), grads, experts


def _layouts(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    found = []
    for record in caplog.records:
        match = re.fullmatch(r"block swap --dit: (.+): ([DH]+)", record.getMessage())
        if match:
            found.append((match[1], match[2]))
    return found


@pytest.mark.parametrize("arch", ["wan", "qwen_image"])
def test_block_swap_gives_the_same_loss_and_gradients_and_keeps_its_layout(
    arch, datasets, four_block_folders, tmp_path, caplog
) -> None:
    dit = str(four_block_folders[arch])
    fp8 = {"fp8_base": True, "fp8_scaled": True}
    loss, grads, _ = _step(arch, datasets[arch], tmp_path / "plain", dit, **fp8)
    caplog.set_level(logging.DEBUG, logger="masktrain.models.block_swap")
    swapped_loss, swapped_grads, experts = _step(
        arch, datasets[arch], tmp_path / "swap", dit, blocks_to_swap=2, **fp8
    )
    assert swapped_loss == loss and torch.equal(swapped_grads, grads)
    # Blocks 0-1 resident, 2-3 on the host between steps; the teacher's no-grad forward sends
    # each swapped block back after use and the layout is restored before the student; the
    # student keeps the last block for the backward pass, whose schedule returns the rest.
    assert _layouts(caplog) == [
        ("placed", "DDHH"),
        ("before the teacher", "DDHH"),
        ("after the teacher", "DDHH"),
        ("restored after the teacher", "DDHH"),
        ("after the student forward", "DDHD"),
        ("after backward", "DDHH"),
        ("restored after backward", "DDHH"),
    ]
    (swap,) = experts.swaps.values()
    # Every swapped block arrived by prefetch (none on demand): 2 for the teacher, 2 for the
    # student, 1 for backward (block 3 stayed).
    assert (swap.loads_on_demand, swap.copies) == (0, 5)


def test_activation_offload_and_all_but_one_block_swapped_change_nothing(
    datasets, four_block_folders, tmp_path
):
    dit = str(four_block_folders["wan"])
    loss, grads, _ = _step("wan", datasets["wan"], tmp_path / "plain", dit)
    for settings in (
        {"gradient_checkpointing_cpu_offload": True},
        {"gradient_checkpointing_cpu_offload": True, "blocks_to_swap": 3},
    ):
        got_loss, got_grads, experts = _step("wan", datasets["wan"], tmp_path / "x", dit, **settings)
        assert got_loss == loss and torch.equal(got_grads, grads), settings
        for swap in experts.swaps.values():
            assert swap.loads_on_demand == 0 and swap.layout() == "DHHH"


def test_lora_weights_are_never_swapped_moved_or_quantised(datasets, four_block_folders, tmp_path) -> None:
    dit = str(four_block_folders["wan"])
    _, _, experts = _step("wan", datasets["wan"], tmp_path / "s", dit, blocks_to_swap=3, fp8_base=True)
    (swap,) = experts.swaps.values()
    slot_tensors = {(id(slot.module), slot.name) for slot in swap.swappable_slots()}
    for name, module in experts.low.named_modules():
        if is_lora(name) and isinstance(module, torch.nn.Linear):
            assert (id(module), "weight") not in slot_tensors
            assert type(module) is torch.nn.Linear and module.weight.dtype == torch.float32
    assert {type(slot.module) for slot in swap.swappable_slots()} == {Fp8Linear}
    assert all(not param.requires_grad for slot in swap.swappable_slots() for param in [slot.current()])


def test_two_experts_with_swap_and_the_idle_expert_on_the_host(datasets, tmp_path) -> None:
    toml = datasets["wan"]
    two = {"dit_high_noise": "tiny", "timestep_boundary": 0.5}
    loss, grads, _ = _step("wan", toml, tmp_path / "plain", "tiny", **two)
    got_loss, got_grads, experts = _step(
        "wan", toml, tmp_path / "swap", "tiny", blocks_to_swap=1, offload_inactive_dit=True, **two
    )
    assert got_loss == loss and torch.equal(got_grads, grads)
    assert len(experts.swaps) == 2 and experts.idle_slots is not None and len(experts.idle_slots) == 2


@pytest.mark.parametrize("arch", ["wan", "qwen_image"])
def test_the_done_when_command_trains_and_writes_a_lora(arch, datasets, tmp_path) -> None:
    config = config_from_args(
        [
            *f"--dataset_config {datasets[arch]} --arch {arch} --dit tiny --output_dir {tmp_path}".split(),
            *"--fp8_base --fp8_scaled --blocks_to_swap 1 --gradient_checkpointing".split(),
            *"--gradient_checkpointing_cpu_offload --use_mask_loss --prior_preservation_weight 1".split(),
            *"--prior_mask_threshold 0.1 --device cpu --max_train_steps 2 --network_dim 4".split(),
        ]
    )
    lora_path = run_train(config)
    tensors = safetensors.torch.load_file(lora_path)
    assert tensors and all(
        t.dtype == torch.float32 and bool(torch.isfinite(t).all()) for t in tensors.values()
    )
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and records[1]["prior_loss"] > 0


# --- fp8 text encoders ----------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["wan", "qwen_image"])
def test_an_fp8_text_encoder_encodes_close_to_the_full_precision_one(arch: str) -> None:
    family = get_family(arch)
    full = family.load_text_encoder("tiny", CPU, torch.float32)
    fp8 = family.load_text_encoder("tiny", CPU, torch.float32, fp8=True)
    assert any(isinstance(m, Fp8Linear) for m in fp8.model.modules())
    captions = ["a photo of a woman", "a red car on a street"]
    for got, expected in zip(
        family.encode_text(fp8, captions), family.encode_text(full, captions), strict=True
    ):
        assert got.shape == expected.shape and bool(torch.isfinite(got).all())
        # e4m3 weights (~3 % per weight) through two tiny layers: measured < 6 % of the norm.
        assert float((got - expected).norm() / expected.norm()) < 0.06


def test_fp8_text_caches_are_a_separate_version(datasets) -> None:
    from masktrain.cache.text import TextCacher
    from masktrain.config import CacheConfig
    from masktrain.config.dataset import load_dataset_config
    from masktrain.data.discovery import discover

    family = get_family("wan")
    toml = datasets["wan"]
    item = discover(load_dataset_config(toml).datasets[0]).items[0]
    prints = []
    for fp8 in (False, True):
        config = CacheConfig(toml, "wan", "tiny", "tiny", device="cpu", fp8_text_encoder=fp8)
        encoder = family.load_text_encoder("tiny", CPU, torch.float32, fp8=fp8)
        prints.append(TextCacher(config, family, encoder).fingerprint(item))
    assert prints[0] != prints[1]


# --- flags ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ("--fp8_scaled", "--fp8_scaled needs --fp8_base"),
        ("--blocks_to_swap 1", "--blocks_to_swap needs --gradient_checkpointing"),
        (
            "--gradient_checkpointing_cpu_offload",
            "--gradient_checkpointing_cpu_offload needs --gradient_checkpointing",
        ),
        ("--offload_inactive_dit", "--offload_inactive_dit needs two experts (--dit_high_noise)"),
        ("--sdpa --xformers", "choose one attention backend, not --sdpa and --xformers"),
    ],
)
def test_memory_flag_errors_name_the_flag(flags: str, message: str, tmp_path: Path) -> None:
    toml = tmp_path / "d.toml"
    toml.write_text("")
    base = f"--dataset_config {toml} --arch wan --dit tiny --output_dir {tmp_path}".split()
    with pytest.raises(TrainConfigError, match=re.escape(message)):
        config_from_args([*base, *flags.split()])


@pytest.mark.parametrize(("flag", "package"), [("flash_attn", "flash-attn"), ("sage_attn", "sageattention")])
def test_a_missing_attention_package_is_one_line_naming_what_to_install(flag: str, package: str) -> None:
    import importlib.util

    module = {"flash_attn": "flash_attn", "sage_attn": "sageattention"}[flag]
    if importlib.util.find_spec(module) is not None:
        pytest.skip(f"{module} is installed")
    with pytest.raises(TrainConfigError) as error:
        MemorySettings(attention=flag)
    assert str(error.value) == f"--{flag} needs the {package} package: pip install {package}"


def test_swapping_every_block_is_an_error_naming_the_maximum(datasets, tmp_path) -> None:
    config = train_config(
        datasets["wan"], tmp_path, gradient_checkpointing=True, memory=MemorySettings(blocks_to_swap=2)
    )
    with pytest.raises(
        TrainConfigError, match=r"--blocks_to_swap 2: this transformer has 2 blocks, so at most 1"
    ):
        build_experts(config, get_family("wan"), CPU, torch.float32)


def test_the_fp8_text_flag_of_another_family_is_an_error(tmp_path: Path) -> None:
    from masktrain.config import CacheConfig

    with pytest.raises(SettingError, match="--fp8_vl is not used with --arch wan; use --fp8_t5"):
        CacheConfig.from_flags(
            dataset_config=tmp_path,
            arch="wan",
            vae="tiny",
            text_encoders={"--t5": "tiny"},
            fp8_text={"--fp8_vl": True, "--fp8_t5": False},
        )
