"""How a LoRA does by region against the base model: the numbers users judge masking by (the demo's
table, ``val_*`` in ``metrics.jsonl``), computed in one place for validation and the demo.

Regions are :func:`masktrain.tiers.regions` of the RAW cached mask weight: the subject is the face
(raw >= 0.75), body is hair and body, the background raw < 0.05. Over the same inputs (latents,
noise, noise levels) for both models:

- the loss per region: the flow-matching loss (squared error against ``noise - x``), every channel
  of a cell counted;
- ``subject_improvement``: ``(L_base - L_lora) / L_base`` of that loss on the subject;
- ``background_drift``: the mean squared difference between the LoRA's and the base model's
  predictions on the background, what masked prior preservation keeps near zero.

Sums are accumulated in float64 (Python floats), so validation can add its items one by one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from masktrain.tiers import REGIONS, regions


def _zeros() -> dict[str, float]:
    return dict.fromkeys(REGIONS, 0.0)


@dataclass
class RegionSums:
    """Squared errors summed per region, and the cells (times channels) they were summed over."""

    error: dict[str, float] = field(default_factory=_zeros)
    """The LoRA's squared error against the target."""
    base_error: dict[str, float] = field(default_factory=_zeros)
    """The base model's."""
    drift: float = 0.0
    """The squared LoRA-minus-base difference over the background."""
    cells: dict[str, float] = field(default_factory=_zeros)

    def add(self, lora: torch.Tensor, base: torch.Tensor, target: torch.Tensor, raw: torch.Tensor) -> None:
        """Add predictions (B, C, F, h, w) of the LoRA and the base model against `target`, with the
        raw mask (B, 1, F, h, w) or (B, F, h, w) broadcast over the channels."""
        mask = raw.unsqueeze(1) if raw.ndim == target.ndim - 1 else raw
        error, base_error, drift = (lora - target) ** 2, (base - target) ** 2, (lora - base) ** 2
        channels = target.shape[1]
        for name, in_region in regions(mask).items():
            indicator = in_region.float()
            self.error[name] += float((error * indicator).sum())
            self.base_error[name] += float((base_error * indicator).sum())
            self.cells[name] += float(indicator.sum()) * channels
            if name == "background":
                self.drift += float((drift * indicator).sum())

    def loss(self, region: str, *, base: bool = False) -> float | None:
        """The mean loss of the LoRA (or the base model) on `region`; None when it has no cells."""
        if not self.cells[region]:
            return None
        return (self.base_error if base else self.error)[region] / self.cells[region]

    @property
    def subject_improvement(self) -> float | None:
        """``(L_base - L_lora) / L_base`` on the subject; None without subject cells or base error."""
        if not self.cells["face"] or not self.base_error["face"]:
            return None
        return (self.base_error["face"] - self.error["face"]) / self.base_error["face"]

    @property
    def background_drift(self) -> float | None:
        """Mean squared LoRA-minus-base prediction on the background; None without background."""
        return self.drift / self.cells["background"] if self.cells["background"] else None
