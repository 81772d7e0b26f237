"""``masktrain cache``: latents, mask weights and text embeddings for a dataset TOML."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from masktrain import catalog
from masktrain.cli.options import existing_file, option, text_encoder_options
from masktrain.cli.outcome import run_job

if TYPE_CHECKING:
    from masktrain.config.cache import MaskPoolingMode


@click.command("cache")
@option("dataset_config", type=existing_file(), required=True, help="The dataset TOML.")
@option(
    "arch", type=click.Choice(catalog.ARCH_NAMES), required=True, help=f"Model family: {catalog.described()}."
)
@option("vae", required=True, help="VAE: 'tiny', a local diffusers folder or a .safetensors file.")
@text_encoder_options
@option("device", default=None, help="Encoding device [default: cuda when available, else cpu].")
@option("batch_size", type=click.IntRange(min=1), default=4, show_default=True)
@option(
    "num_workers",
    type=click.IntRange(min=1),
    default=None,
    help="Threads for image preparation [default: one per core].",
)
@option(
    "cache_mask_gamma",
    type=float,
    default=1.0,
    show_default=True,
    help="Bake mask**gamma into the cached weights (pixel resolution, before pooling).",
)
@option(
    "cache_mask_min_weight",
    type=float,
    default=0.0,
    show_default=True,
    help="Bake the floor m*(1-w)+w into the cached weights, after the gamma.",
)
@option(
    "mask_pooling",
    type=click.Choice(["area", "max", "nearest"]),
    default="area",
    show_default=True,
    help="How mask pixels (and a mask video's frames) become one latent weight: area = the exact "
    "mean, max = the brightest pixel (small subjects survive), nearest = the middle pixel and frame.",
)
@option(
    "task",
    default=None,
    help="musubi-tuner's --task (WAN): i2v-14B, flf2v-14B or i2v-A14B cache image-to-video "
    "conditioning beside each clip (docs/conditioning.md).",
)
@option(
    "model_version",
    default=None,
    help="musubi-tuner's --model_version (Qwen-Image): edit, edit-2509 or edit-2511 cache each item's "
    "control images and a text embedding that read them; layered each item's RGBA layers "
    "(multiple_target, --vae the Layered VAE) (docs/conditioning.md).",
)
@option(
    "clip",
    default=None,
    help="WAN 2.1 I2V / FLF2V: the CLIP vision model ('tiny', a CLIPVisionModelWithProjection folder "
    "or ComfyUI's clip_vision_h.safetensors).",
)
@option("one_frame", is_flag=True, default=False, help="WAN one-frame training (control images).")
@option(
    "i2v",
    is_flag=True,
    default=False,
    help="musubi-tuner's --i2v: image-to-video conditioning without --task (i2v-14B with --clip, "
    "else i2v-A14B).",
)
@option(
    "skip_existing",
    switch=True,
    default=True,
    show_default=True,
    help="Skip items whose cache file is up to date.",
)
def cache(
    dataset_config: Path,
    arch: str,
    vae: str,
    device: str | None,
    batch_size: int,
    num_workers: int | None,
    cache_mask_gamma: float,
    cache_mask_min_weight: float,
    mask_pooling: MaskPoolingMode,
    skip_existing: bool,
    task: str | None,
    model_version: str | None,
    clip: str | None,
    one_frame: bool,
    i2v: bool,
    **text_encoders: str | bool | None,
) -> None:
    """Cache latents, mask weights and text embeddings for a dataset TOML."""
    from masktrain.config.cache import CacheConfig
    from masktrain.config.text_encoder import split_flags

    def job() -> bool:
        text, tokenizers, fp8_text = split_flags(text_encoders)
        config = CacheConfig.from_flags(
            dataset_config=dataset_config,
            arch=arch,
            vae=vae,
            text_encoders=text,
            tokenizers=tokenizers,
            fp8_text=fp8_text,
            device=device,
            batch_size=batch_size,
            skip_existing=skip_existing,
            num_workers=num_workers,
            cache_mask_gamma=cache_mask_gamma,
            cache_mask_min_weight=cache_mask_min_weight,
            mask_pooling=mask_pooling,
            task=_task(arch, task, model_version, i2v, clip is not None),
            clip=clip,
            one_frame=one_frame,
        )
        from masktrain.cache import run  # torch: only once the flags are known to be good

        return any(summary.failed for summary in run(config))

    raise SystemExit(1 if run_job(job) else 0)


def _task(arch: str, task: str | None, model_version: str | None, i2v: bool, clip: bool) -> str | None:
    """The one of ``--task`` / ``--model_version`` given: the family's flag (the other is an error).
    musubi-tuner's WAN cache names no task: its ``--i2v`` (or ``--clip``, which implies it) is
    ``i2v-14B`` with a CLIP model and ``i2v-A14B`` without, unless ``--task`` says otherwise."""
    from masktrain.errors import CacheConfigError

    spec = catalog.arch(arch)
    for flag, value in (("--task", task), ("--model_version", model_version)):
        if value is not None and flag != spec.task_flag:
            raise CacheConfigError(f"{flag} is not used with --arch {arch}; use {spec.task_flag}")
    if spec.task_flag != "--task":
        return model_version
    if task is None and (i2v or clip):
        return "i2v-14B" if clip else "i2v-A14B"
    return task
