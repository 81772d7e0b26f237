"""The prior term's teacher beyond the base model: which samples run it (per-sample gating by
``--prior_preservation_timestep_threshold`` and by the prior schedule's weights), the start-up
estimate of how many teacher passes the threshold skips, and the EMA teacher's set-up."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from masktrain.config import mask_loss
from masktrain.config.mask_loss import MaskLossSettings
from masktrain.config.train import TrainConfig
from masktrain.data.cached_items import CachedItem
from masktrain.loss import samples_with_prior_region
from masktrain.models.base import model_timesteps
from masktrain.train import checkpoint as ckpt
from masktrain.train import timesteps
from masktrain.train.ema_teacher import START_STEP, EmaTeacher
from masktrain.train.prior_schedule import prior_weights, schedule_enabled

log = logging.getLogger(__name__)

NEARLY_ALL = 0.99
"""An expected skip rate of the teacher gate at or above which the start-up line is a warning."""


@dataclass(frozen=True)
class Gating:
    gate: torch.Tensor
    """(B,) bool: the samples whose prior term (and teacher pass) is on."""
    weights: torch.Tensor | None
    """(B,) prior weights of the schedule, or None (the one --prior_preservation_weight)."""
    counts: tuple[int, int]
    """(samples with a prior region that were gated off, samples with a prior region)."""


def gate_samples(
    settings: MaskLossSettings, mask: torch.Tensor, sigmas: torch.Tensor, progress: tuple[int, int]
) -> Gating | None:
    """Per-sample gating when a threshold or a schedule asks for it (None otherwise): samples with a
    prior region, above the threshold, with a prior weight > 0."""
    threshold = settings.prior_preservation_timestep_threshold
    if threshold is None and not schedule_enabled(settings):
        return None
    model_t = model_timesteps(sigmas)
    with_region = samples_with_prior_region(mask, settings)
    gate = with_region if threshold is None else with_region & (model_t > threshold)
    weights = None
    if schedule_enabled(settings):
        step, total = progress
        weights = prior_weights(settings, model_t, step, total)
        gate = gate & (weights > 0)
    return Gating(gate, weights, (int((with_region & ~gate).sum()), int(with_region.sum())))


def ema_teacher(
    config: TrainConfig, named: list[tuple[str, torch.nn.Parameter]], total_steps: int
) -> EmaTeacher | None:
    """``--prior_teacher_mode ema``: the EMA teacher (restored from ``--resume``), or None. A resume
    that changes the teacher warns (:func:`_teacher_change`)."""
    settings = config.mask
    wanted = settings.prior_teacher_mode == "ema" and settings.prior_preservation_weight > 0
    start = max(START_STEP, int(total_steps * settings.prior_decay_warmup_ratio))
    if config.resume is not None:
        change = _teacher_change(config.resume, wanted, start)
        if change is not None:
            log.warning("%s", change)
    if not wanted:
        return None
    if start >= total_steps:
        log.warning(
            "EMA teacher is enabled, but it will not initialize within this run: ema_init_step=%d >= "
            "max_train_steps=%d. Teacher will remain in base mode for the entire run.",
            start,
            total_steps,
        )
    ema = EmaTeacher(named, settings.prior_teacher_ema_decay, start)
    if config.resume is not None:
        ema.load(ckpt.load_ema(config.resume))
    return ema


def _teacher_change(folder: Path, wanted: bool, start: int) -> str | None:
    """The warning for a resume whose prior teacher is not its checkpoint's run's (the EMA teacher
    dropped, or created): one line saying what happens to the EMA, or None.

    A warning, not a refusal: the resume itself is sound (the LoRA is the same; the teacher only
    shapes the prior term from here on) and the new mode is what the command line asks for, so a
    deliberate switch stays possible; the line says what the switch does, as Lightning warns of a
    checkpoint's callback state no callback takes and the Hugging Face Trainer of arguments that
    differ from the checkpoint's. Settings that would change the LoRA itself are refused
    (``train.resume``)."""
    try:
        mask = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("mask", {})
        step = int(json.loads((folder / "state.json").read_text(encoding="utf-8"))["step"])
        had = mask.get("prior_teacher_mode") == "ema" and float(mask.get("prior_preservation_weight", 0)) > 0
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # preflight checked both files; nothing to compare against
    if had == wanted:
        return None
    started = (folder / ckpt.EMA_FILE).is_file()
    if had:
        what = (
            f"its EMA weights ({ckpt.EMA_FILE}) are not used and later checkpoints will not hold them"
            if started
            else "the EMA had not started yet"
        )
        return (
            f"--resume {folder}: that run's prior teacher was the EMA of the LoRA (--prior_teacher_mode "
            f"ema), this run's is the base model: {what}; pass --prior_teacher_mode ema with the prior "
            "flags it had to keep the EMA teacher"
        )
    what = (
        f"the EMA starts as a copy of the LoRA of step {step}, not as an average since step {start}, so "
        "this run will differ from one that had the EMA teacher from the start"
        if step >= start
        else f"the EMA starts at step {start}, as in a run that had it from the start"
    )
    return (
        f"--resume {folder}: that run's prior teacher was the base model, this run's is the EMA of the "
        f"LoRA (--prior_teacher_mode ema): {what}"
    )


def expected_skip_rate(config: TrainConfig, items: list[CachedItem]) -> float | None:
    """``--prior_preservation_timestep_threshold``'s expected skip rate, logged once at start-up
    (``timesteps.estimate_skip_rate`` over the dataset's latent sizes); None without gating."""
    settings = config.mask
    threshold = settings.prior_preservation_timestep_threshold
    if threshold is None or not settings.use_mask_loss or settings.prior_preservation_weight <= 0:
        return None
    sizes: dict[tuple[int, int], int] = {}
    for item in items:
        hw = (int(item.latent_shape[-2]), int(item.latent_shape[-1]))
        sizes[hw] = sizes.get(hw, 0) + item.num_repeats
    boundary = config.boundary if config.dit_high_noise is not None else None  # --expert_balance alternate
    rate = timesteps.estimate_skip_rate(config.timesteps, threshold, sorted(sizes.items()), boundary=boundary)
    # Near 100% the prior term is all but off: a warning (a threshold of 1000 has one from the flags).
    nothing = rate >= NEARLY_ALL and threshold < mask_loss.NEVER_GATED
    log.log(
        logging.WARNING if nothing else logging.INFO,
        "teacher gating at timestep %g: expected to skip %.1f%% of the teacher passes (--timestep_sampling "
        "%s over the dataset's latent sizes, 20000 draws); the measured rate is prior_skip_rate in "
        "metrics.jsonl%s",
        threshold,
        100 * rate,
        config.timesteps.timestep_sampling,
        "; prior preservation does almost nothing: lower --prior_preservation_timestep_threshold"
        if nothing
        else "",
    )
    return rate
