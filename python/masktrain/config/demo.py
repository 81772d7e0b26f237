"""The settings of ``masktrain demo``, checked when built."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from masktrain import catalog
from masktrain.errors import FlagError

DEFAULT_STEPS = 200
"""Optimizer steps per run of the default demo."""

SCENARIOS = ("all", "random", "bleed")
"""``random``: a new background per photo (one seed); ``bleed``: every training photo in one room
(three seeds); ``all``: both."""

LATENT_CELLS = 16
"""Side of the demo's latent grid: the default image side is this many cells of the tiny VAE."""


@dataclass(frozen=True)
class DemoConfig:
    output_dir: Path
    """Where the datasets, caches, runs and the report go."""
    arch: str = "wan"
    """Model family (always its built-in tiny models)."""
    steps: int = DEFAULT_STEPS
    """Optimizer steps per run."""
    seed: int = 42
    """Seeds the dataset, the runs (the same seed for all) and the evaluation noise; the bleed
    scenario uses it and the next two."""
    train_items: int = 16
    """Training images."""
    heldout_items: int = 8
    """Held-out images for the evaluation."""
    image_size: int | None = None
    """Side of the square images; default 16 latent cells with the family's tiny VAE (128 pixels
    for wan, whose tiny VAE is 8x; 64 for qwen_image, whose tiny VAE is 4x)."""
    batch_size: int = 2
    """Training batch size (the dataset TOML's batch_size)."""
    eval_draws: int = 8
    """Noise draws (noise and noise level) per held-out item."""
    scenario: str = "all"
    """Which scenarios run (SCENARIOS)."""

    def __post_init__(self) -> None:
        if self.arch not in catalog.ARCHES:
            raise FlagError(f"--arch must be {' or '.join(catalog.ARCH_NAMES)}, not {self.arch!r}")
        if self.scenario not in SCENARIOS:
            raise FlagError(f"--scenario must be {', '.join(SCENARIOS)}, not {self.scenario!r}")
        if self.steps < 1:
            raise FlagError("--steps must be >= 1")
        if self.size % 16 or self.size < 32:
            raise FlagError("image_size must be a multiple of 16 and at least 32")
        if min(self.train_items, self.heldout_items, self.batch_size, self.eval_draws) < 1:
            raise FlagError("train_items, heldout_items, batch_size and eval_draws must be >= 1")

    @property
    def size(self) -> int:
        return self.image_size or catalog.arch(self.arch).tiny_vaes["tiny"] * LATENT_CELLS
