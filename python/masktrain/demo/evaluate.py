"""Score the demo's LoRAs on held-out items against the base model.

Every model sees the same held-out latents, noise and noise levels (drawn once from a seeded
generator, with the training run's timestep distribution), so the differences between runs are
the LoRAs' alone. Regions are the tiers of the RAW cached mask weight the loss and the metrics
use (``tiers.regions``): the subject is raw >= 0.75 (the face), the background raw < 0.05.

- ``subject_improvement`` and ``background_drift``: as validation computes them
  (``region_scores``): ``(L_base - L_lora) / L_base`` of the flow-matching loss on subject cells,
  and the mean squared difference between the LoRA's and the base model's predictions on
  background cells (what masked prior preservation is meant to keep near zero).
- ``bleed`` (the bleed scenario, given the held-out items' twins rendered in the training room):
  ``1 - |x_lora - z_twin|^2 / |x_base - z_twin|^2`` summed over held-out background cells, where
  ``x = noisy - sigma * v`` is a model's estimate of the clean latents and ``z_twin`` the twin's
  latents. 0: the LoRA's background is no nearer the training room than the base model's;
  positive: the LoRA paints the room (1 would be the room exactly); negative: it moved away.
  ``bleed_by_noise`` is the same ratio within each fifth of the noise levels (0-0.2, ..., 0.8-1);
  ``bleed_unseen_room`` the same score against the held-out items rendered in a room no split
  has seen: what the LoRA does to backgrounds in general rather than to the training room.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from masktrain.config.timesteps import TimestepSettings
from masktrain.data.cached_items import find_cached_items
from masktrain.data.loader import load_batch
from masktrain.denoiser.lora import load_lora_into
from masktrain.device import resolve_device
from masktrain.errors import CachedDataError, DataError
from masktrain.models import get_family
from masktrain.models.base import ModelFamily, TextBatch
from masktrain.models.loading import TINY
from masktrain.region_scores import RegionSums
from masktrain.tiers import regions
from masktrain.train import timesteps
from masktrain.train.flow_matching import noised

log = logging.getLogger(__name__)

NOISE_BINS = 5


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
    bleed: float | None = None
    """How far the LoRA moved its clean estimate on held-out backgrounds toward the training room
    (the bleed scenario only)."""
    bleed_by_noise: tuple[float, ...] | None = None
    """``bleed`` within each of NOISE_BINS equal noise-level bins (the bleed scenario only)."""
    bleed_unseen_room: float | None = None
    """``bleed`` against a room no split has seen (the bleed scenario only)."""


@dataclass
class _Inputs:
    noisy: torch.Tensor
    sigmas: torch.Tensor
    target: torch.Tensor
    text: TextBatch
    raw: torch.Tensor
    """The held-out items' raw mask weights (B, 1, F, h, w), repeated like ``noisy``."""
    background: torch.Tensor
    """1 on the background cells of `raw`, else 0."""
    twin: torch.Tensor | None
    """The twins' latents (held-out items in the training room), repeated like ``noisy``."""
    control: torch.Tensor | None
    """The held-out items' latents in a room no split has seen, repeated like ``noisy``."""


def _paired_latents(family: ModelFamily, toml: Path, heldout: list[str], draws: int) -> torch.Tensor:
    """The latents of a split that renders the held-out items again (``twin_003`` pairs with
    ``heldout_003``), repeated like the held-out ones."""
    items = find_cached_items(toml, family.name)
    names = [item.latent_path.name.split("_", 1)[1] for item in items]
    if names != heldout:
        raise CachedDataError(f"{toml}: its items {names} do not pair with the held-out items {heldout}")
    return load_batch(0, items).latents.repeat_interleave(draws, dim=0)


def _inputs(
    family: ModelFamily,
    heldout_toml: Path,
    references: tuple[Path, Path] | None,
    draws: int,
    seed: int,
    device: torch.device,
) -> _Inputs:
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
    heldout = [item.latent_path.name.split("_", 1)[1] for item in items]
    twin, control = (
        (None, None)
        if references is None
        else (_paired_latents(family, toml, heldout, draws).to(device) for toml in references)
    )
    return _Inputs(
        noisy=noisy.to(device),
        sigmas=sigmas.to(device),
        target=target.to(device),
        text=family.collate_text(texts).to(device, torch.float32),
        raw=mask.to(device),
        background=regions(mask)["background"].float().to(device),
        twin=twin,
        control=control,
    )


def bleed_distances(
    noisy: torch.Tensor,
    sigmas: torch.Tensor,
    velocity: torch.Tensor,
    reference: torch.Tensor,
    region: torch.Tensor,
) -> torch.Tensor:
    """Per sample: the squared distance, summed over the cells of `region` (B, 1, F, h, w), of the
    clean-latent estimate ``noisy - sigma * velocity`` to `reference` (all (B, C, F, h, w))."""
    estimate = noisy - sigmas.view(-1, 1, 1, 1, 1) * velocity
    return (((estimate - reference) ** 2) * region).sum(dim=(1, 2, 3, 4))


def _bleed(inputs: _Inputs, base: torch.Tensor, prediction: torch.Tensor) -> dict[str, Any]:
    """The bleed fields of one LoRA's velocity `prediction` against the base model's `base`."""
    assert inputs.twin is not None and inputs.control is not None

    def distances(reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(LoRA, base) distances to `reference`."""
        lora_distance = bleed_distances(inputs.noisy, inputs.sigmas, prediction, reference, inputs.background)
        return lora_distance, bleed_distances(inputs.noisy, inputs.sigmas, base, reference, inputs.background)

    lora_distance, base_distance = distances(inputs.twin)
    bins = (inputs.sigmas * NOISE_BINS).long().clamp(max=NOISE_BINS - 1)
    by_noise = tuple(
        float(1 - lora_distance[bins == b].sum() / base_distance[bins == b].sum())
        if bool((bins == b).any())
        else float("nan")
        for b in range(NOISE_BINS)
    )
    control_lora, control_base = distances(inputs.control)
    return {
        "bleed": float(1 - lora_distance.sum() / base_distance.sum()),
        "bleed_by_noise": by_noise,
        "bleed_unseen_room": float(1 - control_lora.sum() / control_base.sum()),
    }


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
    arch: str,
    heldout_toml: Path,
    loras: dict[str, Path],
    *,
    draws: int,
    seed: int,
    references: tuple[Path, Path] | None = None,
    device: str = "cpu",
) -> dict[str, Score]:
    """Score each LoRA file (by run name) on the held-out dataset (already cached); with
    `references`, the TOMLs of the held-out items rendered in the training room and in an unseen
    room (cached), also the bleed."""
    family = get_family(arch)
    target_device = resolve_device(device)
    inputs = _inputs(family, heldout_toml, references, draws, seed, target_device)
    base_model = family.load_transformer(TINY, "--dit", target_device, torch.float32)
    base = _predict(family, base_model, inputs)
    scores = {}
    for name, path in tqdm(loras.items(), desc="evaluate", unit="run"):
        model = family.load_transformer(TINY, "--dit", target_device, torch.float32)
        load_lora_into(model, path, family)
        prediction = _predict(family, model.eval(), inputs)
        sums = RegionSums()
        sums.add(prediction, base, inputs.target, inputs.raw)
        bleed = {} if inputs.twin is None else _bleed(inputs, base, prediction)
        scores[name] = _score(sums, bleed)
        log.debug("%s: %s", name, scores[name])
    return scores


def _score(sums: RegionSums, bleed: dict[str, Any]) -> Score:
    subject, base_subject = sums.loss("face"), sums.loss("face", base=True)
    background, base_background = sums.loss("background"), sums.loss("background", base=True)
    improvement, drift = sums.subject_improvement, sums.background_drift
    if (
        subject is None
        or base_subject is None
        or background is None
        or base_background is None
        or improvement is None
        or drift is None
    ):
        raise DataError("the held-out items have no cells in one of the evaluation regions")
    return Score(
        subject_improvement=improvement,
        background_drift=drift,
        subject_loss=subject,
        base_subject_loss=base_subject,
        background_loss=background,
        base_background_loss=base_background,
        **bleed,
    )
