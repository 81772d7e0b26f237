"""What ``masktrain train`` checks after its flags and before any model loads: the things that
need the file system or the process group. Torch-free (cache headers only).

- ``--resume`` names a checkpoint folder;
- the dataset is cached for this ``--arch`` (every item file with its text embeddings);
- every process gets at least one batch per epoch;
- the warm-up fits in the run, now that the number of steps is known (``--max_train_epochs``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from masktrain.config.train import TrainConfig, check_schedule
from masktrain.data.cached_items import CachedItem, epoch_batches, find_cached_items
from masktrain.errors import CachedDataError, TrainConfigError


@dataclass(frozen=True)
class TrainPlan:
    items: list[CachedItem]
    """Every trainable cached item."""
    batches_per_epoch: int
    """Batches each process trains on per epoch."""
    steps_per_epoch: int
    """Optimizer steps per epoch."""
    total_steps: int
    """Optimizer steps of the whole run."""


def preflight(config: TrainConfig, world: int) -> TrainPlan:
    """The run's plan for `world` processes, or the error that would otherwise stop it later."""
    if config.resume is not None and not (config.resume / "state.json").is_file():
        raise TrainConfigError(f"--resume {config.resume}: not a masktrain checkpoint folder (no state.json)")
    items = find_cached_items(config.dataset_config, config.arch)
    batches_per_epoch = len(epoch_batches(items, config.seed, 0)) // world
    if batches_per_epoch == 0:
        raise CachedDataError(f"{config.dataset_config}: fewer batches than processes ({world}); add data")
    steps_per_epoch = math.ceil(batches_per_epoch / config.optim.gradient_accumulation_steps)
    total_steps = config.max_train_steps
    if config.max_train_epochs is not None:
        total_steps = config.max_train_epochs * steps_per_epoch
    check_schedule(config.optim.lr_scheduler, config.optim.lr_warmup_steps, total_steps)
    return TrainPlan(items, batches_per_epoch, steps_per_epoch, total_steps)
