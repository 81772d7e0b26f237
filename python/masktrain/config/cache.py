"""The settings of one ``masktrain cache`` run, checked when built."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from masktrain import catalog
from masktrain.config.device import check_device
from masktrain.config.text_encoder import choose
from masktrain.errors import CacheConfigError, SettingError

MaskPoolingMode = Literal["area", "max", "nearest"]
MASK_POOLINGS: tuple[MaskPoolingMode, ...] = ("area", "max", "nearest")
"""``--mask_pooling``'s modes (the native core's ``Pooling``)."""


@dataclass(frozen=True)
class CacheConfig:
    dataset_config: Path
    """The dataset TOML."""
    arch: str
    """Model family (``--arch``), one of ``catalog.ARCH_NAMES``."""
    vae: str
    """VAE weights: 'tiny', a diffusers folder or a .safetensors file."""
    text_encoder: str
    """Text encoder weights (the family's text flag: --t5 for wan, --text_encoder for qwen_image)."""
    device: str | None = None
    """Encoding device; default cuda when available."""
    batch_size: int = 4
    """Images (or clips of one video) per VAE call."""
    skip_existing: bool = True
    """Skip items whose cache file is up to date (--no-skip_existing rebuilds everything)."""
    num_workers: int | None = None
    """Threads of the native core for image preparation; default one per core. Applies when the
    core's thread pool starts, i.e. to the first native call of the process."""
    text_tokenizer: str | None = None
    """A tokenizer folder for a single-file text encoder (--t5_tokenizer / --text_encoder_tokenizer)."""
    fp8_text_encoder: bool = False
    """Load the text encoder's block Linear weights as float8 e4m3 (--fp8_t5 / --fp8_vl), so it
    fits beside the VAE on a small card; its embeddings are cached as a separate version."""
    cache_mask_gamma: float = 1.0
    """Bake ``mask ** gamma`` into the cached mask weights, at pixel resolution before pooling
    (the reference's cache-time transform); recorded in each file's metadata."""
    cache_mask_min_weight: float = 0.0
    """Bake the floor ``m * (1 - w) + w`` into the cached mask weights, after the gamma."""
    mask_pooling: MaskPoolingMode = "area"
    """How mask pixels become one latent weight per spatio-temporal cell: ``area`` (the exact
    mean), ``max`` (the brightest pixel: small subjects survive) or ``nearest`` (the middle pixel
    and frame). Recorded in each file's metadata; ``area`` leaves the fingerprint as it was."""
    task: str | None = None
    """musubi-tuner's ``--task`` (WAN) / ``--model_version`` (Qwen-Image): a conditioned mode
    (``i2v-14B``, ``flf2v-14B``, ``i2v-A14B``) caches its conditioning beside each item."""
    clip: str | None = None
    """WAN 2.1 I2V / FLF2V: the CLIP vision model ('tiny', a CLIPVisionModelWithProjection
    folder or ComfyUI's clip_vision_h.safetensors); its image embedding is cached per item."""
    one_frame: bool = False
    """WAN one-frame training (musubi-tuner's ``--one_frame``): control images at their frame
    positions and one target frame per item."""

    @property
    def baked(self) -> bool:
        return (self.cache_mask_gamma, self.cache_mask_min_weight) != (1.0, 0.0)

    @property
    def mode(self) -> catalog.Mode | None:
        """The conditioned mode the task trains (None: none)."""
        return catalog.mode_of(catalog.arch(self.arch), self.task)

    @property
    def condition(self) -> str:
        """What each latent file records as its mode (``catalog.condition_name``)."""
        return catalog.condition_name(catalog.arch(self.arch), self.task, self.one_frame)

    def __post_init__(self) -> None:
        catalog.arch(self.arch)
        check_device(self.device)
        if self.batch_size < 1:
            raise CacheConfigError(f"--batch_size must be >= 1, got {self.batch_size}")
        if self.num_workers is not None and self.num_workers < 1:
            raise CacheConfigError(f"--num_workers must be >= 1, got {self.num_workers}")
        if not self.vae:
            raise CacheConfigError("--vae needs a value ('tiny', a diffusers folder or a .safetensors file)")
        if not self.text_encoder:
            raise CacheConfigError(f"{catalog.arch(self.arch).text_flag} needs a value")
        if not 0 < self.cache_mask_gamma < float("inf"):
            raise CacheConfigError(f"--cache_mask_gamma must be > 0, got {self.cache_mask_gamma}")
        if not 0 <= self.cache_mask_min_weight < 1:
            raise CacheConfigError(
                f"--cache_mask_min_weight must be in [0, 1), got {self.cache_mask_min_weight}"
            )
        if self.mask_pooling not in MASK_POOLINGS:
            raise CacheConfigError(
                f"--mask_pooling must be one of {', '.join(MASK_POOLINGS)}, got {self.mask_pooling!r}"
            )
        self._check_mode()

    def _check_mode(self) -> None:
        spec = catalog.arch(self.arch)
        try:
            catalog.check_task(spec, spec.task_flag, self.task)
        except SettingError as error:
            raise CacheConfigError(str(error)) from None
        mode, task = self.mode, f"{spec.task_flag} {self.task}"
        if mode is not None and mode.clip and self.clip is None:
            raise CacheConfigError(
                f"{task} needs --clip (its CLIP image encoder: 'tiny', a CLIPVisionModelWithProjection "
                "folder or ComfyUI's clip_vision_h.safetensors)"
            )
        if self.clip is not None and (mode is None or not mode.clip):
            clip_tasks = [name for name, t in spec.tasks.items() if t.mode is not None and t.mode.clip]
            raise CacheConfigError(
                f"--clip is for {' / '.join(f'--task {name}' for name in clip_tasks) or 'WAN 2.1 I2V'} "
                "(WAN 2.1's CLIP image embedding); drop it" + ("" if self.task is None else f" for {task}")
            )
        if self.one_frame and (mode is None or mode.kind != "image_to_video"):
            raise CacheConfigError(
                "--one_frame needs an image-to-video --task (i2v-14B for one control image, flf2v-14B "
                "for two)"
            )

    @classmethod
    def from_flags(
        cls,
        *,
        dataset_config: Path,
        arch: str,
        vae: str,
        text_encoders: Mapping[str, str | None],
        device: str | None = None,
        batch_size: int = 4,
        skip_existing: bool = True,
        num_workers: int | None = None,
        fp8_text: Mapping[str, bool] | None = None,
        tokenizers: Mapping[str, str | None] | None = None,
        cache_mask_gamma: float = 1.0,
        cache_mask_min_weight: float = 0.0,
        mask_pooling: MaskPoolingMode = "area",
        task: str | None = None,
        clip: str | None = None,
        one_frame: bool = False,
    ) -> CacheConfig:
        """The config of the command line, where each family names its text encoder with its own
        flag (``catalog``: ``--t5`` for WAN, ``--text_encoder`` for Qwen-Image); `text_encoders`
        holds every such flag's value, and another family's flag is an error; so for `fp8_text`
        (``--fp8_t5``, ``--fp8_vl``)."""
        chosen = choose(arch, text_encoders, tokenizers, fp8_text, CacheConfigError)
        if chosen.weights is None:
            spec = catalog.arch(arch)
            raise CacheConfigError(
                f"--arch {arch} needs {spec.text_flag} (the {spec.text_encoder} text encoder: "
                "'tiny' or a local folder)"
            )
        return cls(
            dataset_config=dataset_config,
            arch=arch,
            vae=vae,
            text_encoder=chosen.weights,
            device=device,
            batch_size=batch_size,
            skip_existing=skip_existing,
            num_workers=num_workers,
            fp8_text_encoder=chosen.fp8,
            text_tokenizer=chosen.tokenizer,
            cache_mask_gamma=cache_mask_gamma,
            cache_mask_min_weight=cache_mask_min_weight,
            mask_pooling=mask_pooling,
            task=task,
            clip=clip,
            one_frame=one_frame,
        )
