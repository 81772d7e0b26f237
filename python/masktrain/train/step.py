"""One batch's loss, not yet backpropagated (the step of ``train.loop``):

1. noise and sigmas come from a generator seeded by (seed, epoch, batch index), so a resumed or a
   multi-process run draws exactly what an uninterrupted single-process run draws (with
   ``--expert_balance alternate``, inside the range of the expert whose turn the optimizer step is);
2. ``noisy = (1 - t)·x + t·noise``, target ``noise - x`` (flow matching, ``flow_matching.noised``);
3. with prior preservation and a prior region in the batch, the teacher prediction comes first:
   the same model with its adapters off (with ``--fp8_base``: the same fp8 base; or the EMA of the
   LoRA, ``--prior_teacher_mode ema``), under no_grad, on the same inputs; block swap's layout is
   restored right after it. Teacher gating (``prior_teacher``) can leave samples out of it;
4. the student prediction; the per-element loss (``--loss_type``) against the target and against
   the teacher, times the timestep weighting; ``loss.masked_loss_terms`` reduces both and hands
   back the weights, the prior region and the per-region sums it prepared, which the metrics read.

Qwen-Image-Layered (:func:`loss_layout`): the latent frames are the base image and its layers, and
the reducer reads them in its layered layout, (B, L, C, h, w); with
``--remove_first_image_from_target`` the base (frame 0) is neither predicted nor in the loss, by the
student and the teacher alike (musubi-tuner's ``call_dit``); it stays the control, and the reducer
drops its mask frame (``drop_base_frame``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from masktrain import catalog
from masktrain.config import mask_loss
from masktrain.config.train import TrainConfig
from masktrain.data.loader import Batch
from masktrain.denoiser.experts import Experts
from masktrain.device import autocast as autocast_to
from masktrain.loss import (
    Layout,
    MaskedLossTerms,
    has_prior_region,
    linear_fraction,
    masked_loss_terms,
    region_means,
    unreduced_loss,
)
from masktrain.models.base import Conditioning, ModelFamily, TextBatch
from masktrain.train import timesteps
from masktrain.train.ema_teacher import EmaTeacher
from masktrain.train.flow_matching import noised
from masktrain.train.prior_teacher import gate_samples

log = logging.getLogger(__name__)

CACHE_HINT = mask_loss.DEFAULT_CACHE_HINT


def batch_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The generator of one batch's noise and noise levels."""
    # Modulo 2**64, the seeds torch takes; the identity for every seed below ~1.8e7.
    return torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 1_000_003 + index) % 2**64)


@dataclass
class StepResult:
    loss: torch.Tensor
    prior: float
    tiers: dict[str, float | None]
    extras: dict[str, float]
    """``teacher_ran`` (with prior preservation), ``prior_mass`` (the mean prior region), Huber's
    ``huber_target_linear`` / ``huber_prior_linear`` shares: a silent no-op shows in the first lines."""
    gate: tuple[int, int] | None = None
    """Teacher gating: (samples with a prior region whose teacher pass was skipped, samples with a
    prior region)."""
    experts: dict[str, int] = field(default_factory=dict)
    """WAN 2.2's two experts: the samples each took (``Experts.samples``)."""


def compute_loss(
    config: TrainConfig,
    family: ModelFamily,
    experts: Experts,
    batch: Batch,
    epoch: int,
    device: torch.device,
    weight_dtype: torch.dtype,
    autocast: torch.dtype | None,
    progress: tuple[int, int] = (0, 1),
    ema: EmaTeacher | None = None,
) -> StepResult:
    """The loss of one batch (not yet backpropagated); `progress` is (optimizer steps done, the
    run's total), for the prior schedule's warm-up."""
    mask = _mask(config, batch, device)
    generator = batch_generator(config.seed, epoch, batch.index)
    latents = batch.latents.to(device)
    batch_size, _, _, height, width = latents.shape
    noise = torch.randn(latents.shape, generator=generator).to(device)
    boundary = None if experts.high is None else experts.boundary
    turn = timesteps.expert_turn(config.timesteps, boundary, progress[0])  # --expert_balance alternate
    line = catalog.arch(config.arch).resolution_shift  # qwen_shift / flux2_shift's
    sigmas = timesteps.sample_sigmas(
        config.timesteps, batch_size, (height, width), generator, "cpu", turn, line
    )
    sigmas = sigmas.to(device)
    noisy, target = noised(latents, noise, sigmas)
    layout, drop_base = loss_layout(config)
    if drop_base:  # Qwen-Image-Layered without the base: it is the control only
        noisy, target = noisy[:, :, 1:], target[:, :, 1:]
    text = family.collate_text(batch.text).to(device, weight_dtype)
    condition = None if batch.condition is None else batch.condition.to(device, weight_dtype)
    weighting = timesteps.loss_weighting(config.timesteps, sigmas)
    weighting = None if weighting is None else weighting.to(device).view(-1, 1, 1, 1, 1)

    prior_on = _prior_on(config, mask, drop_base)
    gated = None if mask is None else mask[:, :, 1:] if drop_base else mask  # the frames in the loss
    gating = gate_samples(config.mask, gated, sigmas, progress) if prior_on and gated is not None else None
    # teacher gating may leave every sample of the batch out of the teacher pass
    teacher_needed = bool(gating.gate.any()) if gating is not None else prior_on
    teacher = (
        _teacher(family, experts, noisy, sigmas, text, condition, device, autocast, ema)
        if teacher_needed
        else None
    )
    with autocast_to(device, autocast):
        prediction = experts.predict(family, noisy, sigmas, text, condition)
    experts.mark("after the student forward")
    difference = prediction.float() - target
    per_element = unreduced_loss(difference, config.loss_type, config.loss_delta)
    teacher_difference = None if teacher is None else prediction.float() - teacher
    prior_element = (
        None
        if teacher_difference is None
        else unreduced_loss(teacher_difference, config.loss_type, config.loss_delta)
    )
    if weighting is not None:
        per_element = per_element * weighting
        prior_element = None if prior_element is None else prior_element * weighting
    if layout == "layered":  # (B, C, L, h, w) -> the reducer's (B, L, C, h, w)
        per_element = per_element.transpose(1, 2)
        prior_element = None if prior_element is None else prior_element.transpose(1, 2)
    terms = masked_loss_terms(
        per_element,
        mask,
        config.mask,
        prior_loss=prior_element,
        layout=layout,
        drop_base_frame=drop_base,
        prior_gate=None if gating is None else gating.gate,
        prior_weights=None if gating is None else gating.weights,
    )
    tiers = region_means(terms.region_sums) if terms.region_sums is not None else {}
    shown = _layers_second(terms) if layout == "layered" else terms  # the differences' layout
    extras = _extras(config, shown, teacher is not None, ema, difference, teacher_difference)
    return StepResult(
        terms.target + terms.prior,
        float(terms.prior.detach()),
        tiers,
        extras,
        None if gating is None else gating.counts,
        experts.samples(sigmas),
    )


def _mask(config: TrainConfig, batch: Batch, device: torch.device) -> torch.Tensor | None:
    """The batch's mask weights on the device: required with ``--use_mask_loss``, and a batch whose
    weights are all zero (no floor) is named."""
    settings = config.mask
    if settings.use_mask_loss:
        mask_loss.require_mask_weights(batch.mask_weights is not None, CACHE_HINT)
        if (
            settings.mask_min_weight == 0
            and batch.mask_weights is not None
            and not bool(batch.mask_weights.any())
        ):
            names = ", ".join(item.latent_path.name for item in batch.items)
            log.warning("All-zero mask weights detected: the target loss is zero for the batch of %s", names)
    return batch.mask_weights.to(device) if batch.mask_weights is not None else None


def loss_layout(config: TrainConfig) -> tuple[Layout, bool]:
    """The reducer's layout of the run's latents and whether the base frame leaves the target:
    ``("layered", --remove_first_image_from_target)`` for Qwen-Image-Layered, else ``("video",
    False)``."""
    mode = catalog.mode_of(catalog.arch(config.arch), config.task or config.model_version)
    if mode is None or mode.kind != "layered":
        return "video", False
    return "layered", config.remove_first_image_from_target


def _layers_second(terms: MaskedLossTerms) -> MaskedLossTerms:
    """The reducer's layered weights and prior region, (B, L, 1, h, w), as (B, 1, L, h, w)."""
    if terms.weights is None or terms.prior_region is None:
        return terms
    weights, region = terms.weights.transpose(1, 2), terms.prior_region.transpose(1, 2)
    return terms._replace(weights=weights, prior_region=region)


def _prior_on(config: TrainConfig, mask: torch.Tensor | None, drop_base: bool = False) -> bool:
    """Whether the prior term can be non-zero for this batch (one host sync: the mask minimum)."""
    settings = config.mask
    return (
        settings.use_mask_loss
        and settings.prior_preservation_weight > 0
        and mask is not None
        and has_prior_region(mask, settings, drop_base_frame=drop_base)
    )


def _teacher(
    family: ModelFamily,
    experts: Experts,
    noisy: torch.Tensor,
    sigmas: torch.Tensor,
    text: TextBatch,
    condition: Conditioning | None,
    device: torch.device,
    autocast: torch.dtype | None,
    ema: EmaTeacher | None,
) -> torch.Tensor:
    """The teacher's prediction (float32, no grad): the base model (adapters off), or the EMA of
    the LoRA swapped in (adapters on) once it has started."""
    experts.mark("before the teacher")
    model = ema.swapped() if ema is not None and ema.started else experts.adapters_disabled()
    try:
        with torch.no_grad(), model, autocast_to(device, autocast):
            return experts.predict(family, noisy, sigmas, text, condition).float()
    finally:  # the teacher's blocks were never backpropagated: put swapped ones back
        experts.mark("after the teacher")
        experts.restore_layout("after the teacher")


def _extras(
    config: TrainConfig,
    terms: MaskedLossTerms,
    teacher_ran: bool,
    ema: EmaTeacher | None,
    difference: torch.Tensor,
    teacher_difference: torch.Tensor | None,
) -> dict[str, float]:
    """The metrics that show a silent no-op in the first lines (see :class:`StepResult`), read off
    what the reducer prepared."""
    settings = config.mask
    extras: dict[str, float] = {}
    if terms.weights is None or terms.prior_region is None:
        return extras
    with torch.no_grad():
        if settings.prior_preservation_weight > 0:
            extras["teacher_ran"] = float(teacher_ran)
            if settings.prior_teacher_mode == "ema":
                extras["teacher_ema"] = float(teacher_ran and ema is not None and ema.started)
            extras["prior_mass"] = float(terms.prior_region.mean())
        if config.loss_type == "huber":
            delta = config.loss_delta
            extras["huber_target_linear"] = linear_fraction(difference.abs() > delta, terms.weights)
            if teacher_difference is not None:
                extras["huber_prior_linear"] = linear_fraction(
                    teacher_difference.abs() > delta, terms.prior_region
                )
    return extras
