"""Whether a denoiser fits what a run feeds it, and whether its depth is a released model's.

A run feeds its transformer latents (from the cache, or the sampling ``--vae``'s) and text
embeddings (from the cache, or the sampling text encoder's). Their channels and width must be what
the transformer takes (``ModelFamily.denoiser_inputs``): a cache made with the WAN 2.1 VAE (16
channels) for a TI2V-5B transformer (48), or with another text encoder (32 wide for a 4096-wide
UMT5 model), would otherwise stop inside a matmul at the first step, after the model loaded. A
:class:`Feed` is one such source with its numbers (:func:`cache_feed`, :func:`sampling_feed`);
:func:`check_before_loading` compares them with what the transformer's headers say
(``ModelFamily.transformer_config``: the tiny config, a file's shapes, a folder's
``config.json``), before it loads, and :func:`check_loaded` with the loaded model's config. A
mismatch is one line naming the source, the flag, both numbers and what to do.

:func:`unreleased_depth` is the warning for a file whose layers stop early (its last blocks
missing): such a file is a consistent, smaller model, so it loads; when its width is a released
model's (the catalog's ``--task`` records) and its block count is none of theirs, the log says so
once. A width no release has is a custom or test model and gets no warning.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from masktrain.catalog import ArchSpec
from masktrain.errors import ModelLoadError
from masktrain.models.base import DenoiserInputs, ModelFamily
from masktrain.models.loading import diffusers_config


@dataclass(frozen=True)
class Feed:
    """What one source feeds a denoiser, and how messages speak of it."""

    latent_channels: int
    text_dim: int | None
    """None: not known (no text embedding to read)."""
    latents_from: str
    """The source with its verb: ``the cache DIR holds``, ``--vae tiny makes``."""
    text_from: str
    latents_fix: str
    text_fix: str
    conditioning_channels: int | None = 0
    """Channels of image conditioning it feeds beside the latents (None: not known)."""
    image_dim: int | None = None
    """The width of the CLIP image embedding it feeds (None: none)."""


def cache_feed(
    directory: Path,
    latent_channels: int,
    text_dim: int | None,
    text_flag: str,
    conditioning_channels: int = 0,
    image_dim: int | None = None,
) -> Feed:
    """What the cache in `directory` feeds: its latents' channels, its text embeddings' width and
    a conditioned mode's inputs."""
    return Feed(
        latent_channels,
        text_dim,
        f"the cache {directory} holds",
        f"the cache {directory} holds",
        "re-cache the dataset with this model's VAE (masktrain cache --vae)",
        f"re-cache the dataset with this model's text encoder (masktrain cache {text_flag})",
        conditioning_channels,
        image_dim,
    )


def sampling_feed(
    family: ModelFamily,
    vae: torch.nn.Module,
    vae_spec: str,
    embeddings: Iterable[torch.Tensor],
    text_spec: str,
    conditioning_channels: int | None = 0,
    image_dim: int | None = None,
) -> Feed:
    """What sampling feeds: the loaded `vae`'s latent channels and the width of the prompts'
    `embeddings`, made by ``--vae vae_spec`` and the family's text flag ``text_spec``, and its
    mode's conditioning (channels, CLIP width)."""
    widths = {int(embedding.shape[-1]) for embedding in embeddings}
    return Feed(
        family.latent_channels(vae),
        max(widths) if widths else None,
        f"--vae {vae_spec} makes",
        f"{family.text_flag} {text_spec} makes",
        "pass this model's VAE to --vae",
        f"pass this model's text encoder to {family.text_flag}",
        conditioning_channels,
        image_dim,
    )


def check_fits(takes: DenoiserInputs, flag: str, spec: str, feeds: Iterable[Feed]) -> None:
    """What the denoiser of ``flag spec`` takes against every feed: one line for the first mismatch."""
    dit = f"{flag} {spec}"
    for feed in feeds:
        _check_conditioning(takes, dit, feed)
        if feed.latent_channels != takes.latent_channels:
            raise ModelLoadError(
                f"{feed.latents_from} {feed.latent_channels}-channel latents, but {dit} takes "
                f"{takes.latent_channels}-channel latents: {feed.latents_fix}"
            )
        if feed.text_dim is not None and feed.text_dim != takes.text_dim:
            raise ModelLoadError(
                f"{feed.text_from} {feed.text_dim}-wide text embeddings, but {dit} takes "
                f"{takes.text_dim}-wide ones: {feed.text_fix}"
            )


_I2V_TASKS = "--task i2v-14B, flf2v-14B or i2v-A14B"


def _check_conditioning(takes: DenoiserInputs, dit: str, feed: Feed) -> None:
    """The image conditioning a feed gives must be what the denoiser takes: an image-to-video
    model fed none would see zeros where its reference image goes, a text-to-video model cannot
    take the extra channels, and a WAN 2.1 I2V model needs its CLIP embedding."""
    feeds, takes_channels = feed.conditioning_channels, takes.conditioning_channels
    if feeds is not None and feeds != takes_channels:
        if not feeds:
            raise ModelLoadError(
                f"{dit} takes {takes.latent_channels + takes_channels} input channels, {takes_channels} of "
                f"them image conditioning (an image-to-video model), but {feed.latents_from} none: train "
                f"and cache with its {_I2V_TASKS}"
            )
        if not takes_channels:
            raise ModelLoadError(
                f"{feed.latents_from} {feeds} channels of image conditioning, but {dit} takes none (a "
                "text-to-video model): pass an image-to-video model, or cache and train without --task"
            )
        raise ModelLoadError(
            f"{feed.latents_from} {feeds} channels of image conditioning, but {dit} takes {takes_channels}"
        )
    if feeds is not None and takes.image_dim != feed.image_dim:
        if feed.image_dim is None:
            raise ModelLoadError(
                f"{dit} takes a {takes.image_dim}-wide CLIP image embedding (WAN 2.1 I2V / FLF2V), but "
                f"{feed.latents_from} none: use --task i2v-14B or flf2v-14B with --clip"
            )
        if takes.image_dim is None:
            raise ModelLoadError(
                f"{feed.latents_from} a CLIP image embedding, but {dit} takes none (WAN 2.2 I2V A14B "
                "has no CLIP): use --task i2v-A14B, without --clip"
            )
        raise ModelLoadError(
            f"{feed.latents_from} {feed.image_dim}-wide CLIP embeddings, but {dit} takes "
            f"{takes.image_dim}-wide ones: cache with this model's CLIP (--clip)"
        )


def check_before_loading(family: ModelFamily, spec: str, flag: str, feeds: Sequence[Feed]) -> None:
    """:func:`check_fits` from the headers of the denoiser ``flag spec``, before it loads (when
    they tell: otherwise :func:`check_loaded` does once it has)."""
    config = family.transformer_config(spec, flag) if feeds else None
    if config is not None:
        check_fits(family.denoiser_inputs(config), flag, spec, feeds)


def check_loaded(
    family: ModelFamily, transformer: torch.nn.Module, flag: str, spec: str, feeds: Sequence[Feed]
) -> None:
    """:func:`check_fits` from the loaded `transformer`'s config."""
    if feeds:
        check_fits(family.denoiser_inputs(diffusers_config(transformer)), flag, spec, feeds)


def unreleased_depth(spec: ArchSpec, transformer: torch.nn.Module) -> str | None:
    """Words for the log when `transformer` is as wide as a released model of `spec` but has a
    block count none of them has (a file missing its last blocks); None otherwise."""
    config = diffusers_config(transformer)
    width = int(getattr(config, "num_attention_heads", 0)) * int(getattr(config, "attention_head_dim", 0))
    blocks = int(getattr(config, "num_layers", 0))
    same = {name: task for name, task in spec.tasks.items() if task.width == width}
    if not same or any(task.blocks == blocks for task in same.values()):
        return None
    depths = " or ".join(str(b) for b in sorted({task.blocks for task in same.values() if task.blocks}))
    return (
        f"is {width} wide with {blocks} blocks, but the released {width}-wide {spec.title} transformers "
        f"({' / '.join(same)}) have {depths}: a file missing blocks loads as a smaller model; check its "
        "download or conversion"
    )
