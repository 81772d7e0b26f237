"""The settings of ``masktrain inspect``, checked when built."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from masktrain import catalog
from masktrain.config.cache import MASK_POOLINGS, MaskPoolingMode
from masktrain.errors import FlagError


@dataclass(frozen=True)
class InspectConfig:
    dataset_config: Path
    arch: str = "wan"
    """The cache files to read (their names carry the arch) and the latent factor by default."""
    vae: str | None = None
    """Sets the latent factor when the cache cannot: a tiny VAE name, a diffusers folder (its
    config.json) or None (the arch's released VAE: 8)."""
    output_dir: Path = Path("inspect")
    mask_gamma: float = 1.0
    mask_min_weight: float = 0.0
    mask_blur_kernel_size: int = 0
    prior_mask_threshold: float | None = None
    mask_pooling: MaskPoolingMode = "area"
    """As ``cache --mask_pooling``: how uncached items' masks are pooled onto the latent grid
    (cached items show what their cache holds)."""

    def __post_init__(self) -> None:
        catalog.arch(self.arch)
        if not self.mask_gamma > 0:
            raise FlagError(f"--mask_gamma must be > 0, got {self.mask_gamma}")
        if not 0 <= self.mask_min_weight < 1:
            raise FlagError(f"--mask_min_weight must be in [0, 1), got {self.mask_min_weight}")
        blur = self.mask_blur_kernel_size
        if blur < 0 or (blur > 1 and blur % 2 == 0):
            raise FlagError(f"--mask_blur_kernel_size must be odd (or 0 to disable), got {blur}")
        if self.prior_mask_threshold is not None and not 0 < self.prior_mask_threshold <= 1:
            raise FlagError(f"--prior_mask_threshold must be in (0, 1], got {self.prior_mask_threshold}")
        if self.mask_pooling not in MASK_POOLINGS:
            modes = ", ".join(MASK_POOLINGS)
            raise FlagError(f"--mask_pooling must be one of {modes}, got {self.mask_pooling!r}")
