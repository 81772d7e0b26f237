"""The mask flags of ``masktrain train``: their dataclass (checked when built), the warnings for
combinations that work but are probably unintended, the start-up banner and the per-batch check
that masks really reached the batch.

This module imports no torch, so the CLI builds and checks the flags before the heavy imports;
:mod:`masktrain.loss` reads :class:`MaskLossSettings` and re-exports it next to the reducer.

Messages follow the weighted-mask guide's "Argument Validation" table word for word. Decisions
where the reference implementation (the musubi-tuner fork, PR #901) differs or is silent:

- ``--prior_preservation_weight > 0`` without ``--use_mask_loss`` is an error, as in the later
  reference versions (PR #901 only warned): the prior region is defined by the mask, so the flag
  cannot work and a silent no-op would waste a run.
- ``--mask_gamma`` and ``--mask_min_weight`` are range-checked even without ``--use_mask_loss``
  (PR #901 checks them only with it): a bad value is a typo whether or not the flag is on. Mask
  flags set without ``--use_mask_loss`` draw a warning that they do nothing.
- ``--mask_min_weight 0`` with mask loss and no prior preservation warns about the guide's
  "phantom limb" problem: cells of weight 0 get no gradient at all.
- ``--prior_mask_threshold`` without prior preservation warns that it has no effect; the
  reducer honours that (PR #901 still zeroed the target weight below the threshold).
- A ``--prior_preservation_timestep_threshold`` of 1000 (the largest timestep) warns: the gate lets
  no sample through, so prior preservation does nothing (the reference logs its skip rate only).
- The banner does not promise "~1.3-1.7x training time"; it says what the teacher pass costs.
- The FATAL message no longer asks for a fresh ``cache_directory``: masktrain's cache fingerprints
  each item and rebuilds the ones whose mask settings changed.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from masktrain.errors import MaskOptionError, MissingMaskWeightsError

PRIOR_DECAY_SCHEDULES = ("constant", "linear", "cosine")
NEVER_GATED = 1000.0
"""The largest timestep (``sigma * 1000``): a teacher-gating threshold there leaves no sample above it."""
RULE = "=" * 60
THIN_RULE = "-" * 60

DEFAULT_CACHE_HINT = "masktrain cache --dataset_config ... (with alpha_mask = true or mask_directory set)"
"""How to get masks into the cache; shown in the banner and in the FATAL message."""


@dataclass(frozen=True)
class MaskLossSettings:
    """The mask flags (the guide's names), as the reducer reads them."""

    use_mask_loss: bool = False
    """Weight the per-cell loss by the cached mask; off, the loss is the plain mean."""
    mask_gamma: float = 1.0
    """Contrast of the weights: ``w = raw ** gamma`` (< 1 softer, > 1 sharper). Must be > 0."""
    mask_min_weight: float = 0.0
    """Affine floor ``w * (1 - min) + min`` applied after gamma, in [0, 1)."""
    prior_preservation_weight: float = 0.0
    """Weight of the masked prior term (student vs base model outside the mask); 0 disables it."""
    prior_mask_threshold: float | None = None
    """Threshold mode, a value in (0, 1) such as 0.1: the prior region is the cells whose raw
    (latent-resolution) weight is below it, and the target ignores those cells. Unset: the
    continuous prior region ``1 - w``."""
    normalize_per_sample: bool = False
    """Weighted mean per sample, then the batch mean (zero-weight samples count as 0), instead of
    one weighted mean over the whole batch."""
    mask_blur_kernel_size: int = 0
    """Gaussian blur of the latent-grid mask before gamma and floor (an odd kernel size in cells,
    3 or 5; 0 or 1: off; sigma as torchvision's default for the size). The threshold-mode prior
    region and the area scale read the unblurred mask."""
    prior_preservation_timestep_threshold: float | None = None
    """Teacher gating (timesteps 0..1000, ``sigma * 1000``; 300, say): the prior term, and the
    teacher pass, only for samples whose timestep is above it. Unset: every sample with a prior
    region."""
    prior_teacher_mode: str = "base"
    """The prior term's teacher: base (the model with adapters off) or ema (an EMA of the LoRA,
    from step 100, or the end of the prior's warm-up when that is later)."""
    prior_teacher_ema_decay: float = 0.999
    """The EMA teacher's decay per optimizer step."""
    prior_decay_schedule: str = "constant"
    """How the prior weight falls off below --prior_decay_timestep_start: constant, linear or
    cosine (needs --normalize_per_sample)."""
    prior_decay_timestep_start: float = 300.0
    """The timestep (0..1000) at and above which the prior weight is full."""
    prior_decay_warmup_ratio: float = 0.0
    """The share of the run over which the prior weight ramps up from 0 (needs
    --normalize_per_sample)."""
    mask_area_scale_beta: float = 0.0
    """Scale the target term by ``mean(raw mask) ** beta`` (per sample under
    --normalize_per_sample; try 0.5): small subjects weigh less. 0: off."""

    def __post_init__(self) -> None:
        check(self)


def check(settings: MaskLossSettings) -> None:
    """Raise :class:`MaskOptionError` for a value that cannot work (no warnings); runs when the
    settings are built."""
    # Chained comparisons reject NaN; infinity gets its own words (it is not "<= 0").
    if math.isinf(settings.mask_gamma) and settings.mask_gamma > 0:
        raise MaskOptionError(f"--mask_gamma must be a finite number, got {settings.mask_gamma}")
    if not 0.0 < settings.mask_gamma < math.inf:
        raise MaskOptionError("--mask_gamma must be > 0")
    if not (0.0 <= settings.mask_min_weight < 1.0):
        raise MaskOptionError("--mask_min_weight must be in range [0, 1)")
    weight = settings.prior_preservation_weight
    if math.isinf(weight) and weight > 0:
        raise MaskOptionError(f"--prior_preservation_weight must be a finite number, got {weight}")
    if not 0.0 <= weight < math.inf:
        raise MaskOptionError("--prior_preservation_weight must be >= 0")
    threshold = settings.prior_mask_threshold
    if threshold is not None and not (0.0 < threshold < 1.0):
        raise MaskOptionError("--prior_mask_threshold must be in range (0, 1)")
    blur = settings.mask_blur_kernel_size
    if blur < 0:
        raise MaskOptionError(f"--mask_blur_kernel_size must be >= 0, got {blur}")
    if blur > 1 and blur % 2 == 0:
        raise MaskOptionError(f"--mask_blur_kernel_size must be odd (or 0 to disable), got {blur}")
    gate = settings.prior_preservation_timestep_threshold
    if gate is not None and not 0.0 <= gate <= 1000.0:
        raise MaskOptionError(f"--prior_preservation_timestep_threshold must be in [0, 1000], got {gate}")
    if settings.prior_teacher_mode not in ("base", "ema"):
        raise MaskOptionError(
            f"--prior_teacher_mode must be base or ema, not {settings.prior_teacher_mode!r}"
        )
    if not 0.0 < settings.prior_teacher_ema_decay < 1.0:
        raise MaskOptionError(
            f"--prior_teacher_ema_decay must be in (0, 1), got {settings.prior_teacher_ema_decay}"
        )
    if settings.prior_decay_schedule not in PRIOR_DECAY_SCHEDULES:
        raise MaskOptionError(
            f"--prior_decay_schedule must be one of {', '.join(PRIOR_DECAY_SCHEDULES)}, "
            f"not {settings.prior_decay_schedule!r}"
        )
    if not 0.0 < settings.prior_decay_timestep_start <= 1000.0:
        raise MaskOptionError("--prior_decay_timestep_start must be in (0, 1000]")
    if not 0.0 <= settings.prior_decay_warmup_ratio <= 1.0:
        raise MaskOptionError("--prior_decay_warmup_ratio must be in [0, 1]")
    scheduled = settings.prior_decay_schedule != "constant" or settings.prior_decay_warmup_ratio > 0
    if scheduled and not settings.normalize_per_sample:
        raise MaskOptionError(
            "Timestep-adaptive prior scheduling requires --normalize_per_sample for correctness "
            "(--prior_decay_schedule / --prior_decay_warmup_ratio weight each sample's prior term)"
        )
    beta = settings.mask_area_scale_beta
    if not 0.0 <= beta < math.inf:
        raise MaskOptionError(f"--mask_area_scale_beta must be >= 0, got {beta}")
    if weight > 0 and not settings.use_mask_loss:
        raise MaskOptionError(
            "--prior_preservation_weight > 0 requires --use_mask_loss. "
            "Prior preservation keeps the unmasked region close to the base model, so it needs the mask."
        )


def validate(settings: MaskLossSettings) -> list[str]:
    """Check the flags again (they were checked when built) and return warnings (one line each)
    for combinations that work but are probably not what the user wants."""
    check(settings)
    warnings: list[str] = []
    weight, floor = settings.prior_preservation_weight, settings.mask_min_weight
    threshold = settings.prior_mask_threshold
    if not settings.use_mask_loss:
        ignored = [
            flag
            for flag, is_set in (
                ("--mask_gamma", settings.mask_gamma != 1.0),
                ("--mask_min_weight", floor != 0.0),
                ("--prior_mask_threshold", threshold is not None),
                ("--normalize_per_sample", settings.normalize_per_sample),
                ("--mask_blur_kernel_size", settings.mask_blur_kernel_size > 1),
                ("--mask_area_scale_beta", settings.mask_area_scale_beta > 0),
            )
            if is_set
        ]
        if ignored:
            warnings.append(f"{', '.join(ignored)} has no effect without --use_mask_loss")
        return warnings
    if weight == 0 and floor == 0:
        warnings.append(
            "--mask_min_weight 0 with --use_mask_loss and no --prior_preservation_weight: cells with mask "
            "weight 0 get no gradient at all, so the model may hallucinate there ('phantom limbs'). "
            "Recommend --mask_min_weight 0.05, or --prior_preservation_weight 1.0 --prior_mask_threshold 0.1"
        )
    if weight > 0 and floor > 0:
        warnings.append(
            f"--prior_preservation_weight={weight} with --mask_min_weight={floor}: Non-zero mask_min_weight "
            "reduces prior preservation effect. Recommend --mask_min_weight 0.0"
        )
    if settings.mask_area_scale_beta > 0 and weight > 0:
        warnings.append(
            f"--mask_area_scale_beta={settings.mask_area_scale_beta} with "
            f"--prior_preservation_weight={weight}: "
            "the area scale shrinks the target term of small subjects but not the prior term, so the prior "
            "weighs relatively more on them"
        )
    if (settings.prior_decay_schedule != "constant" or settings.prior_decay_warmup_ratio > 0) and weight == 0:
        warnings.append(
            "--prior_decay_schedule / --prior_decay_warmup_ratio have no effect without a prior term"
        )
    gate = settings.prior_preservation_timestep_threshold
    if gate is not None and weight > 0 and gate >= NEVER_GATED:
        warnings.append(
            f"--prior_preservation_timestep_threshold {gate:g}: no timestep is above it (timesteps run "
            f"0..{NEVER_GATED:g}), so the teacher never runs and prior preservation does nothing; "
            "lower it (300, say) or leave it unset"
        )
    if settings.prior_preservation_timestep_threshold is not None and weight == 0:
        warnings.append(
            "--prior_preservation_timestep_threshold has no effect without --prior_preservation_weight > 0"
        )
    if threshold is not None and weight == 0:
        warnings.append(
            f"--prior_mask_threshold={threshold} has no effect without --prior_preservation_weight > 0"
        )
    return warnings


def _hint(cache_hint: str) -> str:
    # Callers may pass the hint with the FATAL list's "  3. " already in front; strip it so the
    # banner and the numbered list both read right.
    return re.sub(r"^\s*3\.\s*", "", cache_hint)


def banner(settings: MaskLossSettings, cache_hint: str = DEFAULT_CACHE_HINT) -> str:
    """The block printed once before training when ``--use_mask_loss`` is on (the reference
    banner, so users of the guide recognise it)."""
    prior = settings.prior_preservation_weight > 0
    title = "MASKED PRIOR PRESERVATION TRAINING ENABLED" if prior else "MASK-WEIGHTED LOSS TRAINING ENABLED"
    lines = [
        RULE,
        title,
        RULE,
        f"  mask_min_weight: {settings.mask_min_weight}",
        f"  mask_gamma: {settings.mask_gamma}",
    ]
    if prior:
        threshold = settings.prior_mask_threshold
        mode = "threshold mode" if threshold is not None else "continuous mode"
        lines += [
            f"  prior_preservation_weight: {settings.prior_preservation_weight}",
            f"  prior_mask_threshold: {threshold} ({mode})",
        ]
    lines.append(f"  normalize_per_sample: {settings.normalize_per_sample}")
    if prior and settings.prior_preservation_timestep_threshold is not None:
        lines.append(
            f"  prior_preservation_timestep_threshold: {settings.prior_preservation_timestep_threshold}"
        )
    if settings.mask_blur_kernel_size > 1:
        lines.append(f"  mask_blur_kernel_size: {settings.mask_blur_kernel_size}")
    if settings.mask_area_scale_beta > 0:
        lines.append(f"  mask_area_scale_beta: {settings.mask_area_scale_beta}")
    if prior:
        lines += [
            THIN_RULE,
            "PRIOR PRESERVATION: Unmasked regions will match base model.",
            "                    Costs one extra no-grad forward (adapters off) per step",
            "                    whose batch has a prior region.",
        ]
        if settings.mask_min_weight > 0:
            lines += [
                f"  NOTE: mask_min_weight={settings.mask_min_weight} reduces prior effect.",
                "        Recommend --mask_min_weight 0.0 with prior preservation.",
            ]
    lines += [
        THIN_RULE,
        "IMPORTANT: Masks must be baked into latent cache!",
        "If you see 'batch has no mask_weights' errors, re-run the cache:",
        f"  {_hint(cache_hint)}",
        RULE,
    ]
    return "\n".join(lines)


def missing_mask_message(cache_hint: str = DEFAULT_CACHE_HINT) -> str:
    """The FATAL message for a batch without mask weights."""
    return "\n".join(
        [
            "FATAL: --use_mask_loss is enabled but batch has no mask_weights!",
            "This means masks were NOT baked into your latent cache.",
            "To fix:",
            "  1. Add 'alpha_mask = true' and/or 'mask_directory = \"/path/to/masks\"' in dataset TOML",
            "  2. Re-run caching: masks are stored in the cache, and changed items are rebuilt in place",
            f"  3. {_hint(cache_hint)}",
            "  4. Then re-run training",
        ]
    )


def require_mask_weights(has_mask_weights: bool, cache_hint: str = DEFAULT_CACHE_HINT) -> None:
    """Raise :class:`MissingMaskWeightsError` unless the batch has mask weights. The loop calls
    this on every batch while ``--use_mask_loss`` is on (the reference checked only step 0, so a
    later maskless batch trained silently without the mask)."""
    if not has_mask_weights:
        raise MissingMaskWeightsError(missing_mask_message(cache_hint))
