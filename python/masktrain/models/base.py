"""What `cache` (and later `train`) needs from a model family, and nothing more.

A family turns pixels into normalised latents and captions into text embeddings, and says how
its VAE compresses space and time. Weights come from the value of a flag: ``tiny`` (the built-in
tiny model, random weights from a fixed seed), a local diffusers folder, or a single
``.safetensors`` file. Nothing is ever downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

TINY = "tiny"


class ModelLoadError(ValueError):
    """A weights flag points at something we cannot load; the message names the flag and path."""


@dataclass
class TextEncoder:
    """A tokenizer and encoder pair with the family's sequence length."""

    tokenizer: Any
    model: torch.nn.Module
    max_length: int


class ModelFamily(Protocol):
    name: str
    """The ``--arch`` value and the suffix of cache file names."""
    text_flag: str
    """The flag that names the text encoder (``--t5`` or ``--text_encoder``)."""

    def load_vae(self, spec: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module: ...

    def load_text_encoder(self, spec: str, device: torch.device, dtype: torch.dtype) -> TextEncoder: ...

    def spatial_factor(self, vae: torch.nn.Module) -> int:
        """Pixels per latent cell along each side (8, or 16 for WAN 2.2 TI2V-5B)."""
        ...

    def temporal_factor(self, vae: torch.nn.Module) -> int: ...

    def encode_pixels(self, vae: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, F, H, W) in [-1, 1] -> normalised latents (B, C, F', H/s, W/s)."""
        ...

    def encode_text(self, encoder: TextEncoder, captions: list[str]) -> list[torch.Tensor]:
        """One (tokens, dim) embedding per caption, trimmed to its real length."""
        ...


def diffusers_folder(spec: str, flag: str, subfolder: str) -> tuple[Path, str | None]:
    """A diffusers model folder, either the component itself (``config.json`` inside) or a
    pipeline folder holding it as ``subfolder``."""
    path = Path(spec).expanduser()
    if not path.exists():
        raise ModelLoadError(f"{flag} {spec}: no such file or directory")
    if path.is_dir():
        if (path / "config.json").is_file():
            return path, None
        if (path / subfolder / "config.json").is_file():
            return path, subfolder
        raise ModelLoadError(
            f"{flag} {spec}: not a diffusers folder (no config.json, nor {subfolder}/config.json)"
        )
    raise ModelLoadError(
        f"{flag} {spec}: single-file weights are not supported for this component yet; "
        "pass a local diffusers folder or 'tiny'"
    )


def seeded(build: Any) -> Any:
    """Build a tiny model with a fixed seed (0) without touching the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build()


def pretrained_vae(model_class: Any, spec: str) -> torch.nn.Module:
    path, subfolder = diffusers_folder(spec, "--vae", "vae")
    return model_class.from_pretrained(path, subfolder=subfolder, local_files_only=True)


def pretrained_text_encoder(model_class: Any, spec: str, flag: str) -> tuple[torch.nn.Module, Any]:
    """A transformers encoder and its tokenizer from a component folder (both inside) or a
    pipeline folder (``text_encoder/`` and ``tokenizer/``)."""
    from transformers import AutoTokenizer

    path, subfolder = diffusers_folder(spec, flag, "text_encoder")
    model = model_class.from_pretrained(path, subfolder=subfolder or "", local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(
        path / "tokenizer" if subfolder else path, local_files_only=True
    )
    return model, tokenizer


@torch.no_grad()
def encode_posterior_mean(vae: Any, pixels: torch.Tensor) -> torch.Tensor:
    """The VAE's posterior mean (as musubi-tuner caches it, so caches are reproducible),
    normalised with the VAE's ``latents_mean`` / ``latents_std``."""
    latents = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist.mode()
    return normalise_latents(latents, vae.config.latents_mean, vae.config.latents_std)


def normalise_latents(latents: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """``(z - mean) / std`` per channel, as diffusers' pipelines and training scripts do."""
    shape = (1, len(mean), 1, 1, 1)
    mean_t = torch.tensor(mean, dtype=latents.dtype, device=latents.device).view(shape)
    inv_std = 1.0 / torch.tensor(std, dtype=latents.dtype, device=latents.device).view(shape)
    return (latents - mean_t) * inv_std


def to_device(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Frozen, in eval mode, on `device`; cast only when the dtype changes (diffusers warns about
    casting models that keep some modules in float32)."""
    if next(model.parameters()).dtype != dtype:
        model = model.to(dtype=dtype)
    return model.to(device=device).eval().requires_grad_(False)
