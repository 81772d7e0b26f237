"""Score the demo's LoRAs on held-out items against the base model.

Every model sees the same held-out latents, noise and noise levels (drawn once from a seeded
generator, with the training run's timestep distribution), so the differences between runs are
the LoRAs' alone. Regions are the tiers of the RAW cached mask weight the loss and the metrics
use (``loss.TIER_EDGES``): the subject is raw >= 0.75 (the face), the background raw < 0.05.

- ``subject_improvement``: ``(L_base - L_lora) / L_base`` of the flow-matching loss on subject cells.
- ``background_drift``: the mean squared difference between the LoRA's and the base model's
  predictions on background cells (what masked prior preservation is meant to keep near zero).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from masktrain.config.timesteps import TimestepSettings
from masktrain.data.cached_items import find_cached_items
from masktrain.data.loader import load_batch
from masktrain.errors import CachedDataError, DataError
from masktrain.models import get_family
from masktrain.models.base import ModelFamily, TextBatch
from masktrain.models.loading import TINY
from masktrain.tiers import TIER_EDGES
from masktrain.train import lora, timesteps
from masktrain.train.flow_matching import noised

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Score:
    subject_improvement: float
    """Fractional reduction of the subject's flow-matching loss relative to the base model."""
    background_drift: float
    """Mean squared LoRA-minus-base prediction on background cells."""
    subject_loss: float
    """The LoRA's flow-matching loss on subject cells."""
    base_subject_loss: float
    """The base model's flow-matching loss on subject cells."""
    background_loss: float
    """The LoRA's flow-matching loss on background cells."""
    base_background_loss: float
    """The base model's flow-matching loss on background cells."""


@dataclass
class _Inputs:
    noisy: torch.Tensor
    sigmas: torch.Tensor
    target: torch.Tensor
    text: TextBatch
    subject: torch.Tensor
    background: torch.Tensor


def _inputs(family: ModelFamily, heldout_toml: Path, draws: int, seed: int, device: torch.device) -> _Inputs:
    items = find_cached_items(heldout_toml, family.name)
    batch = load_batch(0, items)
    if batch.mask_weights is None:
        raise CachedDataError(f"{heldout_toml}: the held-out cache has no mask weights")
    latents = batch.latents.repeat_interleave(draws, dim=0)
    mask = batch.mask_weights.repeat_interleave(draws, dim=0)
    texts = [text for text in batch.text for _ in range(draws)]
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(latents.shape, generator=generator)
    height, width = latents.shape[-2:]
    settings = TimestepSettings()  # the training runs' defaults
    sigmas = timesteps.sample_sigmas(settings, latents.shape[0], (height, width), generator, "cpu")
    noisy, target = noised(latents, noise, sigmas)
    low, high = TIER_EDGES
    return _Inputs(
        noisy=noisy.to(device),
        sigmas=sigmas.to(device),
        target=target.to(device),
        text=family.collate_text(texts).to(device, torch.float32),
        subject=(mask >= high).float().to(device),
        background=(mask < low).float().to(device),
    )


def _region_mean(values: torch.Tensor, region: torch.Tensor) -> float:
    """Mean of ``values`` (B, C, F, h, w) over the cells where ``region`` (B, 1, F, h, w) is 1."""
    count = region.sum() * values.shape[1]
    if count == 0:
        raise DataError("the held-out items have no cells in one of the evaluation regions")
    return float((values * region).sum() / count)


@torch.no_grad()
def _predict(family: ModelFamily, model: torch.nn.Module, inputs: _Inputs, chunk: int = 16) -> torch.Tensor:
    outputs = []
    for start in range(0, inputs.noisy.shape[0], chunk):
        rows = slice(start, start + chunk)
        text = TextBatch(
            inputs.text.hidden[rows], None if inputs.text.mask is None else inputs.text.mask[rows]
        )
        outputs.append(family.predict(model, inputs.noisy[rows], inputs.sigmas[rows], text).float())
    return torch.cat(outputs)


def evaluate(
    arch: str, heldout_toml: Path, loras: dict[str, Path], *, draws: int, seed: int, device: str = "cpu"
) -> dict[str, Score]:
    """Score each LoRA file (by run name) on the held-out dataset (already cached)."""
    family = get_family(arch)
    target_device = torch.device(device)
    inputs = _inputs(family, heldout_toml, draws, seed, target_device)
    base_model = family.load_transformer(TINY, "--dit", target_device, torch.float32)
    base = _predict(family, base_model, inputs)
    base_error = (base - inputs.target) ** 2
    base_subject = _region_mean(base_error, inputs.subject)
    base_background = _region_mean(base_error, inputs.background)
    scores = {}
    for name, path in tqdm(loras.items(), desc="evaluate", unit="run"):
        model = family.load_transformer(TINY, "--dit", target_device, torch.float32)
        lora.load_lora_into(model, path)
        prediction = _predict(family, model.eval(), inputs)
        error = (prediction - inputs.target) ** 2
        subject = _region_mean(error, inputs.subject)
        scores[name] = Score(
            subject_improvement=(base_subject - subject) / base_subject,
            background_drift=_region_mean((prediction - base) ** 2, inputs.background),
            subject_loss=subject,
            base_subject_loss=base_subject,
            background_loss=_region_mean(error, inputs.background),
            base_background_loss=base_background,
        )
        log.debug("%s: %s", name, scores[name])
    return scores
