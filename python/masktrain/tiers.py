"""The mask tiers, defined once: the grey values a tiered mask gives each region (the guide's face
255, body 128, hair 80, background 0) and the raw-weight edges that sort a weight back into a
region (background < 0.05 <= hair and body < 0.75 <= face). ``masks tiers`` writes the values;
the loss metrics, validation, ``inspect`` and the demo sort raw weights into regions with
:func:`regions`. Torch-free (it takes torch tensors and numpy arrays alike)."""

from __future__ import annotations

from types import MappingProxyType
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    import numpy as np
    import torch

Raw = TypeVar("Raw", "np.ndarray", "torch.Tensor")

FACE, BODY, HAIR, BACKGROUND = 255, 128, 80, 0
"""The guide's grey values of a tiered mask."""

TIER_VALUES = MappingProxyType({"face": FACE, "body": BODY, "hair": HAIR, "background": BACKGROUND})
"""Region -> default grey value (``masks tiers`` takes others from its table)."""

TIER_EDGES = (0.05, 0.75)
"""Raw-weight edges of the regions the metrics report: background < 0.05 <= body (hair and body)
< 0.75 <= face. Hair (80/255 = 0.31) and body (128/255 = 0.50) fall in one region."""

REGIONS = ("face", "body", "background")
"""The regions the edges give, subject first."""


def region_of(raw: float) -> str:
    """The region of one raw weight in [0, 1]."""
    low, high = TIER_EDGES
    if raw >= high:
        return "face"
    return "body" if raw >= low else "background"


def regions(raw: Raw) -> dict[str, Raw]:
    """Region -> boolean mask of the cells of `raw` (raw weights, a torch tensor or a numpy array of
    any shape) in it, in the order of :data:`REGIONS`."""
    low, high = TIER_EDGES
    return {"face": raw >= high, "body": (raw >= low) & (raw < high), "background": raw < low}
