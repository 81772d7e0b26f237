"""What ``masktrain train`` checks after its flags and before any model loads: the things that
need the file system or the process group. Torch-free (cache headers only).

- no live run writes ``--output_dir`` (``train.checkpoint.hold_output_dir`` takes it for this run
  after these checks; this look names the other run before anything else);
- ``--resume`` names a complete checkpoint of the same LoRA (``resume.py``), and a run whose
  checkpoint already reached ``--max_train_steps`` is complete: nothing to train;
- without ``--resume``, ``--output_dir`` holds no other run's checkpoints (``--overwrite``
  starts over);
- ``--output_dir`` can be written, and every folder the dataset reads can be read;
- the dataset, listed as ``cache`` lists it, is cached for this ``--arch`` and up to date
  (``data/cached_items.py``; ``--skip_stale`` leaves out what is not), and with
  ``--use_mask_loss`` every dataset's cache holds mask weights;
- every process gets at least one batch per epoch;
- the warm-up fits in the run, now that the number of steps is known (``--max_train_epochs``);
- ``--validation_dataset_config`` is cached for this ``--arch``, with masks;
- a cache that holds masks while ``--use_mask_loss`` is off gets a warning (the masks are unused);
- the cache's mask pooling (``cache --mask_pooling``) is logged when it is not ``area``, and files
  of one dataset that mix pooling modes get a warning.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

from masktrain import atomic, catalog
from masktrain.config import mask_loss
from masktrain.config.dataset import DatasetConfig, load_dataset_config
from masktrain.config.train import TrainConfig, check_schedule
from masktrain.data import cache_format as fmt
from masktrain.data.cached_items import CachedItem, epoch_batches, find_cached_items
from masktrain.data.dataset_paths import check_readable, check_writable
from masktrain.data.freshness import baked_transform
from masktrain.errors import CachedDataError, MissingMaskWeightsError, TrainConfigError
from masktrain.train.resume import checkpoint_step

log = logging.getLogger(__name__)


def validation_items(datasets: DatasetConfig, arch: str, condition: str | None = None) -> list[CachedItem]:
    """The validation dataset's cached items (made for the run's mode `condition`); each must hold
    mask weights (the regions)."""
    items = find_cached_items(datasets, arch, condition=condition)
    unmasked = [item.latent_path.name for item in items if not item.has_mask]
    if unmasked:
        raise CachedDataError(
            f"--validation_dataset_config {datasets.source}: {len(unmasked)} item(s) have no mask weights "
            f"(first: {unmasked[0]}); validation by region needs masks: cache the dataset with its masks"
        )
    return items


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
    resume_step: int | None
    """The step of the ``--resume`` checkpoint."""
    validation_items: list[CachedItem]
    """The ``--validation_dataset_config`` items (none without it)."""

    @property
    def complete(self) -> bool:
        """The checkpoint resumed from already reached the run's last step."""
        return self.resume_step is not None and self.resume_step >= self.total_steps


def output_dir_busy(folder: Path, holder: str) -> str:
    """The refusal of a run whose ``--output_dir`` a live run (`holder`) is writing."""
    return (
        f"--output_dir {folder} is being written by {holder}: one run per output folder; wait for it to "
        "end (or stop it), or choose another --output_dir"
    )


def preflight(config: TrainConfig, world: int) -> TrainPlan:
    """The run's plan for `world` processes, or the error that would otherwise stop it later."""
    holder = atomic.owner(config.output_dir)
    if holder is not None:
        raise TrainConfigError(output_dir_busy(config.output_dir, holder))
    resume_step = checkpoint_step(config)
    if config.resume is None and not config.overwrite:
        previous = sorted(config.output_dir.glob("step-*")) if config.output_dir.is_dir() else []
        if previous:
            raise TrainConfigError(
                f"--output_dir {config.output_dir} holds the checkpoints of a run ({previous[-1].name}); "
                f"pass --resume {previous[-1]} to continue it, --overwrite to start over, or another "
                "--output_dir"
            )
    check_writable(config.output_dir, "--output_dir", TrainConfigError)
    _warn_distilled(config)
    datasets = load_dataset_config(config.dataset_config)
    check_readable(datasets)
    items = find_cached_items(datasets, config.arch, skip_stale=config.skip_stale, condition=config.condition)
    if config.mask.use_mask_loss:
        _check_masks(config, datasets, items)
        sampled = _sampled_metadata(items)
        _check_baked(config, sampled)
        _check_pooling(config, datasets, sampled)
    else:
        masked = sum(item.has_mask for item in items)
        if masked:
            log.warning(
                "%d of %d cached items hold mask weights, but --use_mask_loss is off: the masks are not "
                "used; add --use_mask_loss (masktrain inspect --dataset_config %s shows what they weight)",
                masked,
                len(items),
                config.dataset_config,
            )
    batches_per_epoch = len(epoch_batches(items, config.seed, 0)) // world
    if batches_per_epoch == 0:
        raise CachedDataError(f"{config.dataset_config}: fewer batches than processes ({world}); add data")
    steps_per_epoch = math.ceil(batches_per_epoch / config.optim.gradient_accumulation_steps)
    total_steps = config.max_train_steps
    if config.max_train_epochs is not None:
        total_steps = config.max_train_epochs * steps_per_epoch
    check_schedule(config.optim.lr_scheduler, config.optim.lr_warmup_steps, total_steps)
    validation = []
    if config.validation_dataset_config is not None:
        validation_datasets = load_dataset_config(config.validation_dataset_config)
        check_readable(validation_datasets)
        validation = validation_items(validation_datasets, config.arch, config.condition)
    return TrainPlan(items, batches_per_epoch, steps_per_epoch, total_steps, resume_step, validation)


def _check_masks(config: TrainConfig, datasets: DatasetConfig, items: list[CachedItem]) -> None:
    """The guide's FATAL, at start-up: a dataset whose cache holds no mask weights at all would
    stop the run at its first batch, hours in."""
    masked = {item.dataset for item in items if item.has_mask}
    for number in sorted({item.dataset for item in items} - masked):
        folder = datasets.datasets[number].cache_directory
        raise MissingMaskWeightsError(
            f"{config.dataset_config}: [[datasets]] #{number + 1} ({folder}): "
            + mask_loss.missing_mask_message()
        )


def _warn_distilled(config: TrainConfig) -> None:
    """A step-distilled version (Z-Image Turbo, FLUX.2 klein) trains, but its base trains better
    (musubi-tuner's advice), and the masked prior keeps the distilled model's behaviour."""
    spec = catalog.arch(config.arch)
    version = config.task or config.model_version
    task = catalog.task_of(spec, version)
    if task is None or task.distilled_base is None:
        return
    log.warning(
        "%s %s is a step-distilled model: training it works, but a LoRA trains better on the base "
        "(%s %s) and then runs on either; the masked prior's teacher is the distilled model as loaded",
        spec.task_flag,
        version,
        spec.task_flag,
        task.distilled_base,
    )


_BAKED_SAMPLE = 16
"""Cache files per dataset whose recorded mask transform and pooling are read (the reference
samples 16)."""


def _sampled_metadata(items: list[CachedItem]) -> list[tuple[int, fmt.CacheMetadata | None]]:
    """(dataset index, metadata) of up to :data:`_BAKED_SAMPLE` latent files per dataset, read
    once for :func:`_check_baked` and :func:`_check_pooling`."""
    sampled: dict[int, int] = {}
    found = []
    for item in items:
        if sampled.get(item.dataset, 0) >= _BAKED_SAMPLE:
            continue
        sampled[item.dataset] = sampled.get(item.dataset, 0) + 1
        found.append((item.dataset, fmt.read_metadata(item.latent_path)))
    return found


def _check_baked(config: TrainConfig, sampled: list[tuple[int, fmt.CacheMetadata | None]]) -> None:
    """The cache-time mask transform (``cache --cache_mask_gamma / --cache_mask_min_weight``) the
    sampled files record, against the training flags: gamma or floor applied twice, values that
    differ across files (warnings), and a baked floor at or above --prior_mask_threshold, which
    empties the threshold-mode prior region (an error)."""
    pairs: set[tuple[float, float]] = set()
    checked, recorded = len(sampled), 0
    for _, metadata in sampled:
        baked = None if metadata is None else baked_transform(metadata.extra)
        if baked is not None:
            recorded += 1
            pairs.add(baked)
    settings = config.mask
    if not pairs:
        return
    if len(pairs) > 1:
        shown = ", ".join(f"(gamma={g:g}, min_weight={w:g})" for g, w in sorted(pairs))
        log.warning(
            "Mixed cache mask metadata detected across sampled cache files: %s; use a fresh "
            "cache_directory and re-cache with one --cache_mask_gamma / --cache_mask_min_weight",
            shown,
        )
    gamma, floor = max(pairs, key=lambda pair: pair[1])
    log.info(
        "cache-time mask transform: %s (%d of %d sampled cache files record it)",
        sorted(pairs),
        recorded,
        checked,
    )
    threshold = settings.prior_mask_threshold
    if settings.prior_preservation_weight > 0 and threshold is not None and floor >= threshold:
        raise TrainConfigError(
            f"the cache's baked --cache_mask_min_weight {floor:g} >= --prior_mask_threshold {threshold:g}: "
            "no cell is below the threshold, so threshold-mode prior preservation would do nothing; "
            "re-cache with --cache_mask_min_weight 0 or raise --prior_mask_threshold"
        )
    if len(pairs) == 1:
        if gamma != 1.0 and settings.mask_gamma != 1.0:
            log.warning(
                "the cache baked --cache_mask_gamma %g and --mask_gamma is %g: This will apply gamma twice "
                "(once in cache-time pixel space, once at training time in latent space)",
                gamma,
                settings.mask_gamma,
            )
        if floor != 0.0 and settings.mask_min_weight != 0.0:
            log.warning(
                "the cache baked --cache_mask_min_weight %g and --mask_min_weight is %g: This will apply a "
                "floor twice",
                floor,
                settings.mask_min_weight,
            )


def _check_pooling(
    config: TrainConfig, datasets: DatasetConfig, sampled: list[tuple[int, fmt.CacheMetadata | None]]
) -> None:
    """How the sampled files pooled mask pixels onto the latent grid (``cache --mask_pooling``; a
    file that does not say was pooled by ``area``): one info line when some file is not ``area``,
    and a warning per dataset whose files mix modes (its cells would be weighted by two rules)."""
    by_dataset: dict[int, set[str]] = {}
    for number, metadata in sampled:
        mode = "area" if metadata is None else metadata.extra.get(fmt.KEY_MASK_POOLING, "area")
        by_dataset.setdefault(number, set()).add(mode)
    modes = set().union(*by_dataset.values())
    if modes != {"area"}:
        log.info("cache pooled masks with %s (cache --mask_pooling)", " and ".join(sorted(modes)))
    for number, mixed in sorted(by_dataset.items()):
        if len(mixed) > 1:
            log.warning(
                "%s: [[datasets]] #%d (%s): the sampled cache files mix mask pooling modes (%s); re-cache "
                "with one: masktrain cache --dataset_config %s --arch %s --mask_pooling MODE",
                config.dataset_config,
                number + 1,
                datasets.datasets[number].cache_directory,
                ", ".join(sorted(mixed)),
                config.dataset_config,
                config.arch,
            )
