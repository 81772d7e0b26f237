"""The weighted mask loss: a pure torch reducer from the unreduced per-element loss (and, for
masked prior preservation, the unreduced student-vs-teacher loss) to one float32 scalar.

Semantics are the reference implementation's (``apply_masked_loss_with_prior`` of the musubi-tuner
fork, PR #901), step by step:

1. No mask, or ``use_mask_loss`` off: the plain mean, in float32.
2. Shapes. ``layout="video"``: loss ``(B, C, F, H, W)`` (a 4-D ``(B, C, H, W)`` loss is one
   frame), mask ``(B, 1, F, H, W)`` or ``(B, F, H, W)``. ``layout="layered"`` (Qwen-Image
   layered): loss ``(B, L, C, H, W)``, mask ``(B, 1, F, H, W)`` whose frames are the layers; with
   ``drop_base_frame`` the first mask frame (the base image, not in the target) is dropped.
3. ``raw = clamp(mask, 0, 1)``; with ``mask_blur_kernel_size`` k > 1 a Gaussian blur over H, W
   (sigma ``0.3·((k-1)/2 - 1) + 0.8``, replicate padding); ``w = blurred ** gamma * (1 - min) +
   min`` (an affine remap, not a clamp floor).
4. Prior region: continuous ``1 - w``; threshold mode ``raw < threshold`` (the latent-resolution,
   area-averaged mask), and then the target ignores those cells (no target/prior overlap).
5. ``L_t = sum(loss * w) / sum(w)`` over the batch, or per sample then the batch mean (samples
   without weight count as 0); with ``mask_area_scale_beta`` it is multiplied by ``mean(raw) **
   beta`` (of the unblurred raw mask; per sample under ``normalize_per_sample``).
   ``L_p = weight * (same over prior_loss and the prior region)``. Empty regions (weight sum
   <= 1e-8) contribute 0. Returns ``L_t + L_p``.

Deliberate differences from PR #901:

- Everything is computed in float32 (the mask is not rounded to a bf16 loss's precision first).
- The mask stays compact, broadcast over channels; weight sums are multiplied by C, which equals
  the sum over the expanded mask.
- ``prior_loss`` must have the loss's shape (a later reference fix); it is not silently broadcast.
- Threshold mode removes prior cells from the target only when the prior term is on
  (``prior_preservation_weight > 0``); with weight 0 the threshold has no effect, as the option
  validation says. Whether ``prior_loss`` was passed does not matter, so
  ``masked_loss(..., prior_loss=None)`` is the target term of the same call with a prior loss.
- The layered layout supports the prior term (the later reference refused it); the mask
  permutation applies to both terms alike.
- No host synchronisation: empty-region guards are ``torch.where``, not Python comparisons.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch

from masktrain.config.mask_loss import MaskLossSettings
from masktrain.tiers import REGIONS, regions

__all__ = [
    "MaskLossSettings",
    "MaskedLossTerms",
    "has_prior_region",
    "masked_loss",
    "masked_loss_terms",
    "region_losses",
    "transform_weights",
]

Layout = Literal["video", "layered"]

EPS = 1e-8
"""Weight sums at or below this count as an empty region (contribute 0)."""

_CONTINUOUS_FULL = 1.0 - 1e-6
"""Continuous mode: a mask whose raw minimum reaches this has no prior region."""


class MaskedLossTerms(NamedTuple):
    """The two terms of the reduced loss (float32, 0-dim; the loss is their sum) and what the
    reducer prepared on the way, so a training step reads its metrics off them instead of
    preparing the mask again."""

    target: torch.Tensor
    prior: torch.Tensor
    weights: torch.Tensor | None = None
    """The target weights as reduced: blur, gamma, floor, and in threshold mode without the prior
    cells; (B, 1, F, H, W) float32 (the layered layout: (B, L, 1, H, W)). None without a mask or
    with the mask loss off."""
    prior_region: torch.Tensor | None = None
    """The prior region as reduced (after teacher gating), shaped like `weights`."""
    region_sums: torch.Tensor | None = None
    """(2, 3) detached: the loss summed over each raw-weight region (``tiers.REGIONS`` order) and
    the cells times channels summed over; :func:`region_means` turns them into
    :func:`region_losses`' numbers. None without a mask."""


def transform_weights(raw: torch.Tensor, gamma: float, min_weight: float) -> torch.Tensor:
    """``clamp(raw, 0, 1) ** gamma * (1 - min_weight) + min_weight`` (the guide's pipeline).

    Clamping comes first so values drifted outside [0, 1] (interpolation, IO) cannot produce NaN
    under a fractional gamma.
    """
    weights = raw.clamp(0.0, 1.0)
    if gamma != 1.0:
        weights = weights**gamma
    if min_weight > 0:
        weights = weights * (1.0 - min_weight) + min_weight
    return weights


def blur_sigma(kernel_size: int) -> float:
    """torchvision's default sigma for a Gaussian of this kernel size: 0.3·((k-1)/2 - 1) + 0.8."""
    return 0.3 * ((kernel_size - 1) / 2 - 1) + 0.8


def blur_mask(mask: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """A Gaussian blur over the last two dimensions (H, W) of a compact mask, replicate padding,
    in float32, clamped to [0, 1]; off for a kernel size of 0 or 1."""
    if kernel_size <= 1:
        return mask
    offsets = torch.arange(kernel_size, dtype=torch.float32, device=mask.device) - (kernel_size - 1) / 2
    kernel = torch.exp(-(offsets**2) / (2 * blur_sigma(kernel_size) ** 2))
    kernel = kernel / kernel.sum()
    shape = mask.shape
    planes = mask.float().reshape(-1, 1, shape[-2], shape[-1])
    pad = kernel_size // 2
    planes = torch.nn.functional.pad(planes, (pad, pad, pad, pad), mode="replicate")
    planes = torch.nn.functional.conv2d(planes, kernel.view(1, 1, 1, -1))
    planes = torch.nn.functional.conv2d(planes, kernel.view(1, 1, -1, 1))
    return planes.reshape(shape).clamp(0.0, 1.0)


def _prepare(
    loss: torch.Tensor, mask_weights: torch.Tensor, layout: str, drop_base_frame: bool
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Return the 5-D float32 loss, the float32 mask shaped to broadcast against it (size 1 in
    the channel dimension) and the number of channels the mask is broadcast over."""
    if layout not in ("video", "layered"):
        raise ValueError(f"Unknown layout: {layout!r} (expected 'video' or 'layered')")
    if drop_base_frame and layout != "layered":
        raise ValueError("drop_base_frame=True is only valid with layout='layered'")
    if loss.ndim == 4:
        if layout != "video":
            raise ValueError(f"4D loss is only supported for layout='video', got {tuple(loss.shape)}")
        loss = loss.unsqueeze(2)  # (B, C, H, W) -> (B, C, 1, H, W)
    elif loss.ndim != 5:
        raise ValueError(f"Expected loss to be 4D or 5D, got {loss.ndim}D: {tuple(loss.shape)}")
    if mask_weights.ndim == 4:
        mask_weights = mask_weights.unsqueeze(1)  # (B, F, H, W) -> (B, 1, F, H, W)
    elif mask_weights.ndim != 5 or mask_weights.shape[1] != 1:
        raise ValueError(f"Unexpected mask_weights shape: {tuple(mask_weights.shape)}")
    mask = mask_weights.to(loss.device, torch.float32)
    if layout == "video":
        if mask.shape[0] != loss.shape[0] or mask.shape[2:] != loss.shape[2:]:
            raise ValueError(
                "mask_weights shape does not match loss shape for layout='video': "
                f"mask={tuple(mask.shape)} loss={tuple(loss.shape)}"
            )
    else:
        if drop_base_frame:
            mask = mask[:, :, 1:]
        if (
            mask.shape[0] != loss.shape[0]
            or mask.shape[2] != loss.shape[1]
            or mask.shape[3:] != loss.shape[3:]
        ):
            raise ValueError(
                "mask_weights shape does not match loss shape for layout='layered': "
                f"mask={tuple(mask.shape)} loss={tuple(loss.shape)} drop_base_frame={drop_base_frame}"
            )
        mask = mask.permute(0, 2, 1, 3, 4)  # (B, L, 1, H, W)
    channels = loss.shape[1] if layout == "video" else loss.shape[2]
    return loss.float(), mask, channels


def _per_sample_sums(
    values: torch.Tensor, weights: torch.Tensor, channels: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) sums of ``values * weights`` and of the broadcast weights (C times the compact sum)."""
    dims = (1, 2, 3, 4)
    return (values * weights).sum(dim=dims), weights.sum(dim=dims) * channels


def _region_mean(
    values: torch.Tensor,
    weights: torch.Tensor,
    channels: int,
    per_sample: bool,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """The weighted mean (per sample, then the batch mean, or over the batch), times `scale` ((B,)
    per sample, 0-dim globally) when given."""
    numerator, denominator = _per_sample_sums(values, weights, channels)
    if per_sample:
        means = torch.where(denominator > EPS, numerator / denominator.clamp_min(EPS), 0.0)
        return (means if scale is None else means * scale).mean()
    total = denominator.sum()
    mean = torch.where(total > EPS, numerator.sum() / total.clamp_min(EPS), 0.0)
    return mean if scale is None else mean * scale


def _area_scale(raw: torch.Tensor, settings: MaskLossSettings, per_sample: bool) -> torch.Tensor | None:
    """``--mask_area_scale_beta``: ``mean(raw) ** beta`` of the unblurred, untransformed mask, per
    sample or over the batch; None when off."""
    beta = settings.mask_area_scale_beta
    if beta <= 0:
        return None
    means = raw.mean(dim=(1, 2, 3, 4)) if per_sample else raw.mean()
    return means.clamp(0.0, 1.0) ** beta


def _regions(
    raw: torch.Tensor, settings: MaskLossSettings, gate: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(target weights, prior region) of a clamped compact mask: blur, gamma and floor; the prior
    region continuous ``1 - w``, or in threshold mode ``raw < threshold`` (unblurred), which the
    target then leaves out (only when the prior term is on). A per-sample `gate` ((B,) bool:
    teacher gating) empties the prior region of the samples it turns off, before that overlap
    removal, so their target keeps every cell (the reference's order)."""
    blurred = blur_mask(raw, settings.mask_blur_kernel_size)
    weights = transform_weights(blurred, settings.mask_gamma, settings.mask_min_weight)
    threshold = settings.prior_mask_threshold
    prior_region = (raw < threshold).float() if threshold is not None else 1.0 - weights
    if gate is not None:
        prior_region = prior_region * gate.to(prior_region.dtype).view(-1, *([1] * (raw.ndim - 1)))
    if settings.prior_preservation_weight > 0 and threshold is not None:
        return weights * (1.0 - prior_region), prior_region
    return weights, prior_region


def mask_regions(
    mask_weights: torch.Tensor, settings: MaskLossSettings, gate: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reducer's (target weights, prior region) of a (B, F, H, W) or (B, 1, F, H, W) mask, each
    (B, 1, F, H, W) float32: for metrics that weight by region (Huber's linear share)."""
    mask = mask_weights.unsqueeze(1) if mask_weights.ndim == 4 else mask_weights
    return _regions(mask.float().clamp(0.0, 1.0), settings, gate)


def samples_with_prior_region(mask_weights: torch.Tensor, settings: MaskLossSettings) -> torch.Tensor:
    """(B,) bool: which samples have a prior region (their raw minimum below the threshold, or
    below 1 in continuous mode), on the mask as cached (the reference's rule)."""
    threshold = settings.prior_mask_threshold
    minimum = mask_weights.reshape(mask_weights.shape[0], -1).amin(dim=1)
    return minimum < (threshold if threshold is not None else _CONTINUOUS_FULL)


def unreduced_loss(difference: torch.Tensor, loss_type: str, delta: float) -> torch.Tensor:
    """The per-element loss of ``prediction - target``: ``mse`` d², or ``huber`` ½d² where |d| <= delta
    and delta·(|d| - ½delta) beyond (the reference's ``loss_utils``; half the MSE in its quadratic
    part). The prior term uses the same type (student vs teacher)."""
    if loss_type == "mse":
        return difference**2
    if loss_type != "huber":
        raise ValueError(f"Unsupported loss_type {loss_type!r}; use mse or huber")
    if not delta > 0:
        raise ValueError("--loss_delta must be > 0 when --loss_type huber is used.")
    size = difference.abs()
    return torch.where(size <= delta, 0.5 * difference**2, delta * (size - 0.5 * delta))


def linear_fraction(beyond_delta: torch.Tensor, region: torch.Tensor) -> float:
    """Huber's share in its linear part, weighted by `region`: ``sum(mean_C(|d| > delta) * region) /
    sum(region)`` over the batch (the reference's telemetry); `beyond_delta` (B, C, F, H, W)."""
    share = beyond_delta.float().mean(dim=1, keepdim=True)
    return float((share * region).sum() / region.sum().clamp_min(EPS))


def masked_loss_terms(
    loss: torch.Tensor,
    mask_weights: torch.Tensor | None,
    settings: MaskLossSettings,
    *,
    prior_loss: torch.Tensor | None = None,
    layout: Layout = "video",
    drop_base_frame: bool = False,
    prior_gate: torch.Tensor | None = None,
    prior_weights: torch.Tensor | None = None,
) -> MaskedLossTerms:
    """:func:`masked_loss` split into its target and prior terms, with the weights, the prior
    region and the per-region sums it prepared (:class:`MaskedLossTerms`); `prior_gate` ((B,)
    bool) keeps the prior term to the samples it is on for (teacher gating); `prior_weights` ((B,),
    ``train.prior_schedule``) replaces the one prior weight: ``L_p = mean_b(q_b · w_b)``, per
    sample (the schedule needs ``normalize_per_sample``)."""
    if mask_weights is None:
        return MaskedLossTerms(loss.float().mean(), _zero(loss))
    values, mask, channels = _prepare(loss, mask_weights, layout, drop_base_frame)
    region_sums = _region_sums(values.detach(), mask, channels)
    if not settings.use_mask_loss:
        return MaskedLossTerms(loss.float().mean(), _zero(loss), region_sums=region_sums)
    if prior_loss is not None and prior_loss.shape != loss.shape:
        raise ValueError(
            f"prior_loss shape {tuple(prior_loss.shape)} does not match loss shape {tuple(loss.shape)}"
        )
    raw = mask.clamp(0.0, 1.0)
    weights, prior_region = _regions(raw, settings, prior_gate)
    per_sample = settings.normalize_per_sample
    target = _region_mean(values, weights, channels, per_sample, _area_scale(raw, settings, per_sample))
    prepared = {"weights": weights, "prior_region": prior_region, "region_sums": region_sums}
    if settings.prior_preservation_weight <= 0 or prior_loss is None:
        return MaskedLossTerms(target, _zero(target), **prepared)
    prior_values = prior_loss.float()
    if prior_values.ndim == 4:
        prior_values = prior_values.unsqueeze(2)
    if prior_weights is not None:
        scale = prior_weights.to(device=prior_values.device, dtype=torch.float32)
        prior = _region_mean(prior_values, prior_region, channels, True, scale)
    else:
        prior = (
            _region_mean(prior_values, prior_region, channels, per_sample)
            * settings.prior_preservation_weight
        )
    return MaskedLossTerms(target, prior, **prepared)


def _zero(like: torch.Tensor) -> torch.Tensor:
    return torch.zeros((), dtype=torch.float32, device=like.device)


def masked_loss(
    loss: torch.Tensor,
    mask_weights: torch.Tensor | None,
    settings: MaskLossSettings,
    *,
    prior_loss: torch.Tensor | None = None,
    layout: Layout = "video",
    drop_base_frame: bool = False,
    prior_gate: torch.Tensor | None = None,
    prior_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reduce the unreduced ``loss`` to a float32 0-dim tensor with the mask weights.

    ``prior_loss`` is the unreduced student-vs-teacher loss (same shape as ``loss``); it is used
    only when ``settings.prior_preservation_weight > 0``. Raises ``ValueError`` for shapes that do
    not fit the layout (the settings were checked when they were built).
    """
    terms = masked_loss_terms(
        loss,
        mask_weights,
        settings,
        prior_loss=prior_loss,
        layout=layout,
        drop_base_frame=drop_base_frame,
        prior_gate=prior_gate,
        prior_weights=prior_weights,
    )
    return terms.target + terms.prior


def has_prior_region(
    mask_weights: torch.Tensor | None, settings: MaskLossSettings, *, drop_base_frame: bool = False
) -> bool:
    """Whether the prior term can be non-zero for this batch, i.e. whether the teacher forward is
    worth running. One host sync (the mask minimum).

    Threshold mode: some raw weight is below the threshold. Continuous mode: some raw weight is
    below ``1 - 1e-6`` (elsewhere every processed weight is 1, so ``1 - w`` is 0). With
    ``drop_base_frame`` (layered layout) the base frame, which is not in the loss, is ignored.
    """
    if mask_weights is None or not settings.use_mask_loss or settings.prior_preservation_weight <= 0:
        return False
    if drop_base_frame:
        mask_weights = mask_weights[:, :, 1:] if mask_weights.ndim == 5 else mask_weights[:, 1:]
    if mask_weights.numel() == 0:
        return False
    minimum = float(mask_weights.amin())
    threshold = settings.prior_mask_threshold
    return minimum < (threshold if threshold is not None else _CONTINUOUS_FULL)


def region_losses(
    loss: torch.Tensor,
    mask_weights: torch.Tensor,
    layout: Layout = "video",
    *,
    drop_base_frame: bool = False,
) -> dict[str, float | None]:
    """Mean loss per tier of RAW mask weight (``tiers.regions``), for metrics: ``background`` (raw
    < 0.05), ``body`` (0.05 <= raw < 0.75: hair and body) and ``face`` (raw >= 0.75); None for an
    empty tier. Every channel of a cell counts. One host sync."""
    values, mask, channels = _prepare(loss.detach(), mask_weights, layout, drop_base_frame)
    return region_means(_region_sums(values, mask, channels))


def _region_sums(values: torch.Tensor, raw: torch.Tensor, channels: int) -> torch.Tensor:
    """(2, 3): per region of `raw`, the sum of `values` over its cells and its cells times channels."""
    sums, counts = [], []
    for in_region in regions(raw).values():
        indicator = in_region.float()
        sums.append((values * indicator).sum())
        counts.append(indicator.sum() * channels)
    return torch.stack([torch.stack(sums), torch.stack(counts)])


def region_means(region_sums: torch.Tensor) -> dict[str, float | None]:
    """Region -> mean loss (None for an empty region) of :attr:`MaskedLossTerms.region_sums`, in
    the order background, body, face. One host sync."""
    sums, counts = region_sums.tolist()
    rows = zip(REGIONS, sums, counts, strict=True)
    means = {name: (total / count if count > 0 else None) for name, total, count in rows}
    return {name: means[name] for name in ("background", "body", "face")}
