"""Validation loss by region (``--validation_dataset_config TOML --validate_every_n_steps N``): how
a user sees masking work on their own data, without sampling.

Every validation sees the same inputs: each cached item at a fixed grid of noise levels
(:data:`SIGMAS`) with fixed noise (seeded by ``--seed`` and the item's position), so two
validations differ only by the LoRA. Regions are the tiers of the RAW cached mask weight the loss
metrics use (``loss.TIER_EDGES``): subject (the face, raw >= 0.75), body (hair and body) and
background (raw < 0.05). Reported, as the demo reports its runs:

- ``val_loss_face`` / ``val_loss_body`` / ``val_loss_background``: the flow-matching loss per
  region (mean squared error against ``noise - x``, every channel of a cell);
- ``val_subject_improvement``: ``(L_base - L_lora) / L_base`` on the subject, against the base
  model (the LoRA's adapters off, the same fp8 base under ``--fp8_base``);
- ``val_background_drift``: the mean squared difference between the LoRA's and the base's
  predictions on the background, what masked prior preservation keeps near zero.

The base predictions are computed once, at the first validation, and kept in host memory. All
passes are no-grad (block swap restores its layout after each); under several processes rank 0
validates while the others wait.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch

from masktrain.data.cached_items import CachedItem
from masktrain.data.loader import load_batch
from masktrain.models.base import ModelFamily
from masktrain.tiers import REGIONS, TIER_EDGES
from masktrain.train.experts import Experts
from masktrain.train.flow_matching import noised

log = logging.getLogger(__name__)

SIGMAS = (0.2, 0.4, 0.6, 0.8)
"""The fixed grid of noise levels every item is validated at."""


@dataclass
class _Sums:
    error: dict[str, float]
    base_error: dict[str, float]
    drift: float
    cells: dict[str, float]

    @classmethod
    def empty(cls) -> _Sums:
        zero = dict.fromkeys(REGIONS, 0.0)
        return cls(dict(zero), dict(zero), 0.0, dict(zero))


class Validator:
    """Runs the validation of one training run (see the module docstring)."""

    def __init__(self, items: list[CachedItem], family: ModelFamily, seed: int, device: torch.device) -> None:
        self.items, self.family, self.seed, self.device = items, family, seed, device
        self._base: list[torch.Tensor] | None = None

    def run(self, experts: Experts, dtype: torch.dtype, autocast: torch.dtype | None) -> dict[str, float]:
        """The metrics of the current LoRA (``val_...`` keys; an empty region's are left out), with
        the transformers in eval mode (no LoRA dropout) and back in train mode after."""
        try:
            for model in experts.modules():
                model.eval()
            return self._run(experts, dtype, autocast)
        finally:
            for model in experts.modules():
                model.train()

    @torch.no_grad()
    def _run(self, experts: Experts, dtype: torch.dtype, autocast: torch.dtype | None) -> dict[str, float]:
        sums = _Sums.empty()
        base: list[torch.Tensor] = []
        for index, item in enumerate(self.items):
            batch = load_batch(index, [item])
            assert batch.mask_weights is not None  # validation_items checked it
            count = len(SIGMAS)
            latents = batch.latents.repeat_interleave(count, dim=0)
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
            noise = torch.randn(latents.shape, generator=generator)
            sigmas = torch.tensor(SIGMAS)
            noisy, target = noised(latents, noise, sigmas)
            text = self.family.collate_text(batch.text * count).to(self.device, dtype)
            noisy, sigmas, target = noisy.to(self.device), sigmas.to(self.device), target.to(self.device)
            context = (
                torch.autocast(self.device.type, dtype=autocast) if autocast else contextlib.nullcontext()
            )
            try:
                with context:
                    prediction = experts.predict(self.family, noisy, sigmas, text).float()
                    if self._base is None:
                        with experts.adapters_disabled():
                            base.append(experts.predict(self.family, noisy, sigmas, text).float().cpu())
            finally:
                experts.restore_layout("after validation")
            reference = (self._base[index] if self._base is not None else base[-1]).to(self.device)
            mask = batch.mask_weights.to(self.device).repeat_interleave(count, dim=0)
            _add(
                sums,
                (prediction - target) ** 2,
                (reference - target) ** 2,
                (prediction - reference) ** 2,
                mask,
            )
        if self._base is None:
            self._base = base
        return _metrics(sums)


def _add(
    sums: _Sums, error: torch.Tensor, base_error: torch.Tensor, drift: torch.Tensor, mask: torch.Tensor
) -> None:
    low, high = TIER_EDGES
    channels = error.shape[1]
    regions = {"background": mask < low, "body": (mask >= low) & (mask < high), "face": mask >= high}
    for name, in_region in regions.items():
        indicator = in_region.float()
        sums.error[name] += float((error * indicator).sum())
        sums.base_error[name] += float((base_error * indicator).sum())
        sums.cells[name] += float(indicator.sum()) * channels
        if name == "background":
            sums.drift += float((drift * indicator).sum())


def _metrics(sums: _Sums) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for name in REGIONS:
        if sums.cells[name]:
            metrics[f"val_loss_{name}"] = sums.error[name] / sums.cells[name]
    if sums.cells["face"] and sums.base_error["face"]:
        metrics["val_subject_improvement"] = (sums.base_error["face"] - sums.error["face"]) / sums.base_error[
            "face"
        ]
    if sums.cells["background"]:
        metrics["val_background_drift"] = sums.drift / sums.cells["background"]
    return metrics


def describe(step: int, metrics: dict[str, float]) -> str:
    """The progress-log line of one validation."""
    parts = [
        f"{name.removeprefix('val_loss_')} {metrics[name]:.4g}"
        for name in metrics
        if name.startswith("val_loss_")
    ]
    if "val_subject_improvement" in metrics:
        parts.append(f"subject vs base {metrics['val_subject_improvement']:+.1%}")
    if "val_background_drift" in metrics:
        parts.append(f"background drift {metrics['val_background_drift']:.4g}")
    return f"validation at step {step}: " + ", ".join(parts)
