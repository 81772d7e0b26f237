"""``masktrain plan``'s job: from ``train``'s flags to the plan's lines. The transformer's config
comes from ``--dit`` (a released model's name, or its file's header or folder: no weight is
read), the largest bucket from ``--resolution`` or the dataset (``plan.largest_bucket``), the
budget from ``--vram`` or the CUDA card."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from masktrain import catalog
from masktrain.config.train import OPTIMIZER_ALIASES, TrainConfig
from masktrain.errors import FlagError, ModelLoadError
from masktrain.models import get_family
from masktrain.models.base import ModelFamily
from masktrain.models.block_swap import check_blocks_to_swap
from masktrain.plan import largest_bucket
from masktrain.plan.activations import StepShape
from masktrain.plan.estimate import GIB, Planner, PlanSettings
from masktrain.plan.report import fit_line, settings_line, table

TI2V_CHANNELS = 48
"""The WAN 2.2 TI2V-5B transformer's latent channels: its VAE is 16x, not 8x."""
CLIP_TOKENS = 257
"""Tokens of one image's CLIP ViT-H/14 embedding (WAN 2.1 I2V): 16 x 16 patches and the class
token; FLF2V's position table (``pos_embed_seq_len``) holds two images' worth."""


@dataclass(frozen=True)
class Denoiser:
    """The transformer a plan is for."""

    config: Mapping[str, Any]
    words: str
    experts: int


def planner_for(config: TrainConfig, bucket: largest_bucket.Bucket) -> tuple[Planner, Denoiser]:
    """The planner of a ``train`` run's `config` for its largest `bucket`."""
    family = get_family(config.arch)
    if family.spec.unplanned is not None:
        raise FlagError(f"masktrain plan does not cover --arch {family.name} yet: {family.spec.unplanned}")
    denoiser = _denoiser(family, *config.denoisers)
    mode = catalog.mode_of(family.spec, config.task or config.model_version)
    # Qwen-Image-Edit: planned with one control image, as the cache encodes it (items with more
    # hold more tokens); Layered's one control is its base image, at the target's size
    if mode is not None and mode.kind == "edit":
        shape = step_shape(family, denoiser.config, bucket, 1, _edit_control_grid(family, bucket))
    else:
        controls = 1 if mode is not None and mode.kind == "layered" else 0
        shape = step_shape(family, denoiser.config, bucket, controls)
    return Planner(family, denoiser.config, shape, settings_for(config, denoiser.experts)), denoiser


def step_shape(
    family: ModelFamily,
    config: Mapping[str, Any],
    bucket: largest_bucket.Bucket,
    controls: int = 0,
    control_grid: tuple[int, int] | None = None,
) -> StepShape:
    """The batch a denoiser of `config` trains on for `bucket`: the cache's own latent grid when it
    has one, else the pixels at the VAE's factors (16x for WAN 2.2 TI2V-5B's 48 channels); with
    `controls` control images (Qwen-Image-Edit) of latent size `control_grid` (None: the
    target's)."""
    inputs = family.denoiser_inputs(config)
    spatial = family.spec.spatial_factor
    if family.name == "wan" and inputs.latent_channels == TI2V_CHANNELS:
        spatial = 16
    frames, height, width = bucket.latent or (
        (bucket.frames - 1) // family.spec.temporal_factor + 1,
        bucket.height // spatial,
        bucket.width // spatial,
    )
    images, image_tokens = 0, 0
    if inputs.image_dim is not None:  # WAN 2.1 I2V / FLF2V: CLIP tokens beside the text's
        pairs = config.get("pos_embed_seq_len")
        images, image_tokens = (1, CLIP_TOKENS) if pairs is None else (2, int(pairs) // 2)
    return StepShape(
        inputs.latent_channels,
        frames,
        height,
        width,
        _text_tokens(family, bucket),
        inputs.text_dim,
        conditioning_channels=inputs.conditioning_channels,
        images=images,
        image_tokens=image_tokens,
        image_dim=inputs.image_dim or 0,
        controls=controls,
        control_grid=control_grid,
    )


def settings_for(config: TrainConfig, experts: int) -> PlanSettings:
    """What of a ``train`` run's `config` changes its memory."""
    memory, network = config.memory, config.network
    optimizer = config.optim.optimizer_type.lower()
    return PlanSettings(
        dtype=torch.float32 if config.mixed_precision == "no" else torch.bfloat16,
        fp8=memory.fp8_mode,
        blocks_to_swap=memory.blocks_to_swap,
        pinned=memory.use_pinned_memory_for_block_swap,
        checkpointing=config.gradient_checkpointing,
        offload_activations=memory.gradient_checkpointing_cpu_offload,
        offload_inactive_dit=memory.offload_inactive_dit,
        attention=memory.attention,
        optimizer=OPTIMIZER_ALIASES.get(optimizer, optimizer),  # musubi's class paths too
        rank=network.network_dim,
        include=network.include_patterns,
        exclude=network.exclude_patterns,
        prior=config.mask.prior_preservation_weight > 0,
        ema_teacher=config.mask.prior_teacher_mode == "ema",
        experts=experts,
        lora_per_expert=config.lora_per_expert,
    )


def plan_lines(config: TrainConfig, bucket: largest_bucket.Bucket) -> list[str]:
    """What ``masktrain plan`` prints for a ``train`` run's `config` and its largest `bucket`."""
    planner, denoiser = planner_for(config, bucket)
    settings = planner.settings
    check_blocks_to_swap(settings.blocks_to_swap, planner.blocks)
    shape = planner.shape
    frames = f", {bucket.frames} frames" if bucket.frames > 1 else ""
    lines = [
        f"masktrain plan: {denoiser.words}, {planner.blocks} blocks",
        f"largest bucket: {bucket.width}x{bucket.height}{frames} from {bucket.source} (latents "
        f"{shape.channels}x{shape.frames}x{shape.height}x{shape.width}{_conditioning_words(shape)})",
        f"settings: {settings_line(settings, planner.blocks)}",
        "",
        table(planner.plan()),
        "",
    ]
    budget = card_budget(config.memory.vram)
    if budget is None:
        lines.append(
            "no --vram and no CUDA card: pass --vram GiB for the smallest --blocks_to_swap that fits"
        )
    else:
        chosen = planner.smallest_swap(budget)
        lines.append(fit_line(budget, chosen, planner.blocks - 1, settings.checkpointing))
    return lines


def _edit_control_grid(family: ModelFamily, bucket: largest_bucket.Bucket) -> tuple[int, int]:
    """The latent (height, width) of a Qwen-Image-Edit control image: the cache encodes each at
    about 1024 x 1024 pixels (``cache.edit``; ``control_resolution`` may set another area), taken
    here at the bucket's aspect."""
    from masktrain.models.qwen_vl import VAE_IMAGE_SIZE, area_size

    width, height = area_size(bucket.width, bucket.height, VAE_IMAGE_SIZE)
    factor = family.spec.spatial_factor
    return height // factor, width // factor


def _conditioning_words(shape: StepShape) -> str:
    """The conditioning of a batch, as the plan's second line says it beside the latents."""
    extra = shape.conditioning_channels
    channels = f" + {extra} conditioning channels" if extra else ""
    clip = f" + {shape.images * shape.image_tokens} CLIP tokens" if shape.images else ""
    if shape.controls:
        grid = shape.control_grid or (shape.height, shape.width)
        channels += f" + {shape.controls} control image(s) of latents {grid[0]}x{grid[1]}"
    return f"{channels}, {shape.text_tokens} text tokens{clip}"


def _text_tokens(family: ModelFamily, bucket: largest_bucket.Bucket) -> int:
    """A family that pads every caption (``ArchSpec.text_padded``: WAN's 512) holds that many
    tokens; another's batches are as long as their longest caption, which the cache tells
    (``ArchSpec.text_tokens`` when it does not: 512 covers a long Qwen-Image caption)."""
    spec = family.spec
    if spec.text_padded or bucket.text_tokens is None:
        return spec.text_tokens
    return bucket.text_tokens


def card_budget(vram: float | None) -> int | None:
    """The bytes a plan must fit: ``--vram`` GiB, else the CUDA card's total, else None."""
    if vram is not None:
        return int(vram * GIB)
    if torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(0).total_memory)
    return None


def _denoiser(family: ModelFamily, dit: str, dit_high_noise: str | None) -> Denoiser:
    released = family.spec.released.get(dit)
    experts = 2 if dit_high_noise else 1
    if released is not None:
        return Denoiser(
            dict(released.config), f"{released.title} (--dit {dit})", max(experts, released.experts)
        )
    config = family.transformer_config(dit, "--dit")
    if config is None:
        raise ModelLoadError(f"--dit {dit}: not a {family.spec.title} transformer")
    return Denoiser(config, f"--dit {dit}", experts)
