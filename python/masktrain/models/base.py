"""What `cache` and `train` need from a model family, and nothing more.

A family turns pixels into normalised latents and captions into text embeddings, and says how
its VAE compresses space and time (for `cache`); it loads the denoiser, runs it on a noisy latent
(`predict`), batches cached text embeddings the way its pipeline does, and names its LoRA targets
and their ComfyUI key names (for `train`). Weights come from the value of a flag: ``tiny`` (the
built-in tiny model, random weights from a fixed seed), a local diffusers folder, or a single
``.safetensors`` file. Nothing is ever downloaded.

Gradient checkpointing is diffusers' own: ``transformer.enable_gradient_checkpointing()`` works
for both families (it checkpoints each transformer block, and only while grad is enabled, so a
``no_grad`` teacher pass never checkpoints).
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


@dataclass(frozen=True)
class TextBatch:
    """Text conditioning for one batch, laid out as the family's pipeline passes it."""

    hidden: torch.Tensor
    """(B, L, D) embeddings; padding rows are zeros."""
    mask: torch.Tensor | None
    """(B, L) long, 1 for real tokens and 0 for padding; None when there is no padding (or the
    family's denoiser takes no mask, as WAN's)."""

    def to(self, device: torch.device | str, dtype: torch.dtype) -> TextBatch:
        """Embeddings to `device` and `dtype`; the mask keeps its integer dtype."""
        mask = None if self.mask is None else self.mask.to(device)
        return TextBatch(hidden=self.hidden.to(device=device, dtype=dtype), mask=mask)


@dataclass(frozen=True)
class LoraTargets:
    """Which modules of the denoiser get LoRA by default: every ``nn.Linear`` whose name (as in
    ``named_modules()``) fully matches one of ``include`` and none of ``exclude``."""

    include: tuple[str, ...]
    """Regexes for where LoRA may go (the transformer blocks)."""
    exclude: tuple[str, ...]
    """Regexes for Linear layers inside those blocks that stay untouched."""


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

    def load_transformer(
        self, spec: str, flag: str, device: torch.device, dtype: torch.dtype
    ) -> torch.nn.Module:
        """The denoiser, frozen and in eval mode: ``tiny``, a local diffusers folder (the component
        or a pipeline with ``transformer/``) or a single ``.safetensors`` file; `flag` names the
        value in errors."""
        ...

    def collate_text(self, embeds: list[torch.Tensor]) -> TextBatch:
        """Trimmed (tokens, dim) embeddings -> one padded batch, as the family's pipeline pads."""
        ...

    def predict(
        self, transformer: torch.nn.Module, noisy: torch.Tensor, sigmas: torch.Tensor, text: TextBatch
    ) -> torch.Tensor:
        """The flow-matching prediction (velocity) for noisy latents (B, C, F, h, w) at noise levels
        `sigmas` (B,) in [0, 1]; same shape as `noisy`. Inputs must already be on the model's
        device; dtypes are the caller's (autocast or a matching cast)."""
        ...

    def lora_targets(self) -> LoraTargets:
        """The default LoRA target patterns (attention and feed-forward Linear layers)."""
        ...

    def comfy_key(self, module_name: str) -> str:
        """A diffusers module name -> the module path ComfyUI (the original checkpoint) uses."""
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
    raise ModelLoadError(f"{flag} {spec}: expected 'tiny', a diffusers folder or a .safetensors file")


def weights_identity(spec: str, model: Any) -> str:
    """What identifies the weights a cache was made with, for its fingerprint: the flag's value,
    the model's config (so a change to a built-in tiny model counts), and for weights on disk
    each file's size and modification time (so new weights at the same path count)."""
    import hashlib
    import json

    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        config = config.to_dict()
    # Private keys are bookkeeping (diffusers' _use_default_values is in set order, which changes
    # from process to process).
    config = {k: v for k, v in dict(config or {}).items() if not str(k).startswith("_")}
    parts: dict[str, Any] = {"spec": spec, "config": config}
    path = Path(spec).expanduser()
    if spec != TINY and path.exists():
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        parts["files"] = [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    canonical = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def seeded(build: Any) -> Any:
    """Build a tiny model with a fixed seed (0) without touching the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build()


def is_single_file(spec: str) -> bool:
    return spec.lower().endswith(".safetensors") and not Path(spec).expanduser().is_dir()


def load_transformer_from(
    model_class: Any, arch: str, spec: str, flag: str, dtype: torch.dtype
) -> torch.nn.Module:
    """A non-tiny denoiser: a single ``.safetensors`` file (ComfyUI / original layout) or a local
    diffusers folder, read straight into `dtype` (no float32 detour for a 14B model)."""
    if is_single_file(spec):
        from masktrain.models.single_file import load_transformer_file

        path = Path(spec).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"{flag} {spec}: no such file")
        return load_transformer_file(arch, path, flag, dtype=dtype)
    path, subfolder = diffusers_folder(spec, flag, "transformer")
    return model_class.from_pretrained(path, subfolder=subfolder, local_files_only=True, torch_dtype=dtype)


def pretrained_vae(model_class: Any, arch: str, spec: str) -> torch.nn.Module:
    """A non-tiny VAE: a single ``.safetensors`` file (ComfyUI / original layout) or a local
    diffusers folder."""
    if is_single_file(spec):
        from masktrain.models.single_file import load_vae_file

        path = Path(spec).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"--vae {spec}: no such file")
        return load_vae_file(arch, path, "--vae")
    path, subfolder = diffusers_folder(spec, "--vae", "vae")
    return model_class.from_pretrained(path, subfolder=subfolder, local_files_only=True)


def pretrained_text_encoder(model_class: Any, spec: str, flag: str) -> tuple[torch.nn.Module, Any]:
    """A transformers encoder and its tokenizer from a component folder (both inside) or a
    pipeline folder (``text_encoder/`` and ``tokenizer/``)."""
    from transformers import AutoTokenizer

    if is_single_file(spec):
        from masktrain.models.single_file import text_encoder_file_error

        raise text_encoder_file_error(flag, spec)
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
