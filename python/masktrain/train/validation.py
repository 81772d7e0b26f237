"""Validation loss by region (``--validation_dataset_config TOML --validate_every_n_steps N``): how
a user sees masking work on their own data, without sampling.

Every validation sees the same inputs: each cached item at a fixed grid of noise levels
(:data:`SIGMAS`) with fixed noise (seeded by ``--seed`` and the item's position), so two
validations differ only by the LoRA. Regions are the tiers of the RAW cached mask weight the loss
metrics use (``tiers.regions``): subject (the face, raw >= 0.75), body (hair and body) and
background (raw < 0.05). Reported, as the demo reports its runs (``region_scores``):

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

import logging

import torch

from masktrain.data.cached_items import CachedItem
from masktrain.data.loader import load_batch
from masktrain.denoiser.experts import Experts
from masktrain.device import autocast as autocast_to
from masktrain.models.base import ModelFamily
from masktrain.region_scores import RegionSums
from masktrain.tiers import REGIONS
from masktrain.train.flow_matching import noised

log = logging.getLogger(__name__)

SIGMAS = (0.2, 0.4, 0.6, 0.8)
"""The fixed grid of noise levels every item is validated at."""


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
        sums = RegionSums()
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
            condition = None
            if batch.condition is not None:  # the item's conditioning, once per noise level
                condition = batch.condition.rows(torch.zeros(count, dtype=torch.long)).to(self.device, dtype)
            try:
                with autocast_to(self.device, autocast):
                    prediction = experts.predict(self.family, noisy, sigmas, text, condition).float()
                    if self._base is None:
                        with experts.adapters_disabled():
                            base_prediction = experts.predict(self.family, noisy, sigmas, text, condition)
                            base.append(base_prediction.float().cpu())
            finally:
                experts.restore_layout("after validation")
            reference = (self._base[index] if self._base is not None else base[-1]).to(self.device)
            mask = batch.mask_weights.to(self.device).repeat_interleave(count, dim=0)
            sums.add(prediction, reference, target, mask)
        if self._base is None:
            self._base = base
        return _metrics(sums)


def _metrics(sums: RegionSums) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for name in REGIONS:
        loss = sums.loss(name)
        if loss is not None:
            metrics[f"val_loss_{name}"] = loss
    if sums.subject_improvement is not None:
        metrics["val_subject_improvement"] = sums.subject_improvement
    if sums.background_drift is not None:
        metrics["val_background_drift"] = sums.background_drift
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
