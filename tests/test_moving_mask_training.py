"""Training on video clips whose mask moves (issue 24): a clip's cached ``mask_weights`` (1, F, h, w)
differ from one latent frame to the next. On cache files written by ``cache_format.write_cache_file``
and read by train's loader: the masked-prior teacher runs for a sample when any of its latent frames
has a prior region (and only then, with and without teacher gating), the prior region is exactly the
cells of that frame, and the tier metrics (the step's, validation's) count every frame's cells, by
hand-computed counts. And ``train`` reports the cache's ``--mask_pooling``, warning on mixed modes."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from helpers import cached, train_config
from masktrain.data import cache_format as fmt
from masktrain.data.cached_items import CachedItem
from masktrain.data.loader import load_batch
from masktrain.models import get_family
from masktrain.region_scores import RegionSums
from masktrain.tiers import REGIONS
from masktrain.train import step
from masktrain.train.build import build_experts
from masktrain.train.preflight import preflight

CPU, F32 = torch.device("cpu"), torch.float32
FRAMES, H, W, CHANNELS = 3, 6, 8, 16
"""A 9-frame clip of the tiny WAN VAE at 64x48: 3 latent frames of 8x6 cells, 16 channels."""


def prior_in_last_frame() -> np.ndarray:
    """(F, h, w): frame 0 all face (1.0); frame 1 half body (0.5, no prior at threshold 0.1);
    frame 2 face but a 2x2 patch of 0 (background, the prior region): the only prior cells."""
    raw = np.ones((FRAMES, H, W), np.float32)
    raw[1, :, :4] = 0.5
    raw[2, 2:4, 2:4] = 0.0
    return raw


def no_prior() -> np.ndarray:
    """(F, h, w): face everywhere but half of frame 1 (body); no cell below the threshold."""
    raw = np.ones((FRAMES, H, W), np.float32)
    raw[1, :, :4] = 0.5
    return raw


COUNTS = {
    "prior": {"face": 48 + 24 + 44, "body": 24, "background": 4},
    "none": {"face": 120, "body": 24, "background": 0},
}
"""Cells per region of each mask, counted by hand over the three frames."""


def write_clip(folder: Path, stem: str, raw: np.ndarray, seed: int) -> CachedItem:
    """A clip's latent file and text file as ``cache`` writes them; the item train reads."""
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(CHANNELS, FRAMES, H, W, generator=generator)
    metadata = fmt.CacheMetadata(
        arch="wan", source=str(folder / f"{stem}.mkv"), mask_source="file", bucket=(64, 48), fingerprint="x"
    )
    latent_path = folder / f"{stem}_00000-009_0064x0048_wan.safetensors"
    tensors = {
        fmt.tensor_key(fmt.LATENTS, torch.float32, (FRAMES, H, W)): latents,
        fmt.tensor_key(fmt.MASK_WEIGHTS, torch.float32, (FRAMES, H, W)): torch.from_numpy(raw)[None],
    }
    fmt.write_cache_file(latent_path, tensors, metadata)
    text_path = folder / f"{stem}_wan_te.safetensors"
    text = {fmt.tensor_key(fmt.TEXT_EMBEDS, torch.float32): torch.randn(5, 32, generator=generator)}
    fmt.write_cache_file(text_path, text, dataclasses.replace(metadata, bucket=None, mask_source="none"))
    return CachedItem(latent_path, text_path, (CHANNELS, FRAMES, H, W), True, 0, 2, 1)


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, CachedItem]:
    folder = tmp_path_factory.mktemp("cache")
    return {
        "prior": write_clip(folder, "moving", prior_in_last_frame(), 1),
        "none": write_clip(folder, "still", no_prior(), 2),
    }


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    """The tiny WAN family and its experts with a non-zero LoRA (zero-initialised B would make the
    student equal the teacher, and the prior loss 0 whatever the mask)."""
    config = train_config(Path("unused.toml"), tmp_path_factory.mktemp("out"))
    family = get_family("wan")
    experts = build_experts(config, family, CPU, F32)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, parameter in experts.low.named_parameters():
            if ".lora_B." in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    return family, experts


def run_step(
    model: tuple[Any, Any], items: list[CachedItem], monkeypatch: pytest.MonkeyPatch, **mask: Any
) -> tuple[step.StepResult, int, Any]:
    """compute_loss on the batch of `items`: its result, the teacher passes and the reducer's terms."""
    family, experts = model
    config = train_config(Path("unused.toml"), Path("out"))
    config = dataclasses.replace(config, mask=dataclasses.replace(config.mask, **mask))
    teacher_passes, terms = [], []
    real_teacher, real_terms = step._teacher, step.masked_loss_terms

    def counted_teacher(*args: Any, **kwargs: Any) -> torch.Tensor:
        teacher_passes.append(1)
        return real_teacher(*args, **kwargs)

    def kept_terms(*args: Any, **kwargs: Any) -> Any:
        terms.append(real_terms(*args, **kwargs))
        return terms[-1]

    monkeypatch.setattr(step, "_teacher", counted_teacher)
    monkeypatch.setattr(step, "masked_loss_terms", kept_terms)
    result = step.compute_loss(config, family, experts, load_batch(0, items), 0, CPU, F32, None)
    return result, len(teacher_passes), terms[0]


def test_the_loader_keeps_every_latent_frame_of_the_mask(clips: dict[str, CachedItem]) -> None:
    batch = load_batch(0, [clips["prior"], clips["none"]])
    assert batch.mask_weights is not None and batch.mask_weights.shape == (2, 1, FRAMES, H, W)
    expected = np.stack([prior_in_last_frame(), no_prior()])[:, None]
    np.testing.assert_array_equal(batch.mask_weights.numpy(), expected)


def test_a_prior_region_in_one_latent_frame_runs_the_teacher(
    clips: dict[str, CachedItem], model: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    result, passes, terms = run_step(model, [clips["prior"]], monkeypatch)
    assert passes == 1 and result.extras["teacher_ran"] == 1.0
    assert result.prior > 1e-6  # a LoRA with B of 0.5 * N(0, 1) moves the prediction well past this
    region = terms.prior_region[0, 0].numpy()  # (F, h, w): the 2x2 patch of frame 2 and nothing else
    np.testing.assert_array_equal(region, (prior_in_last_frame() < 0.1).astype(np.float32))
    assert result.extras["prior_mass"] == pytest.approx(4 / (FRAMES * H * W))


def test_a_clip_without_a_prior_region_skips_the_teacher(
    clips: dict[str, CachedItem], model: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    result, passes, _ = run_step(model, [clips["none"]], monkeypatch)
    assert passes == 0 and result.extras["teacher_ran"] == 0.0 and result.prior == 0.0


def test_teacher_gating_keeps_the_sample_whose_prior_region_is_in_a_later_frame(
    clips: dict[str, CachedItem], model: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # threshold 1 (of 0..1000): every drawn timestep is above it, so only the prior region gates
    gated = dict(prior_preservation_timestep_threshold=1.0)
    result, passes, terms = run_step(model, [clips["prior"], clips["none"]], monkeypatch, **gated)
    assert result.gate == (0, 1) and passes == 1 and result.prior > 1e-6
    region = terms.prior_region[:, 0].numpy()
    np.testing.assert_array_equal(region[0], (prior_in_last_frame() < 0.1).astype(np.float32))
    assert not region[1].any()
    result, passes, _ = run_step(model, [clips["none"], clips["none"]], monkeypatch, **gated)
    assert result.gate is None and passes == 0 and result.prior == 0.0  # no prior region: no gating


def test_tier_metrics_count_every_frames_cells(
    clips: dict[str, CachedItem], model: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    both = {region: COUNTS["prior"][region] + COUNTS["none"][region] for region in REGIONS}
    assert sum(both.values()) == 2 * FRAMES * H * W
    result, _, terms = run_step(model, [clips["prior"], clips["none"]], monkeypatch)
    sums, cells = terms.region_sums.tolist()
    assert cells == [both[region] * CHANNELS for region in REGIONS]
    assert result.tiers == {
        region: pytest.approx(sums[REGIONS.index(region)] / cells[REGIONS.index(region)], rel=1e-6)
        for region in ("background", "body", "face")
    }
    # validation's region sums over the same batch: the same cells, frame by frame
    batch = load_batch(0, [clips["prior"], clips["none"]])
    assert batch.mask_weights is not None
    generator = torch.Generator().manual_seed(0)
    lora, base, target = (torch.randn(2, CHANNELS, FRAMES, H, W, generator=generator) for _ in range(3))
    sums_by_region = RegionSums()
    sums_by_region.add(lora, base, target, batch.mask_weights)
    assert sums_by_region.cells == {region: float(both[region] * CHANNELS) for region in REGIONS}
    background = (batch.mask_weights < 0.05).float()  # the drift, summed independently
    drift = float((((lora - base) ** 2) * background).sum()) / (both["background"] * CHANNELS)
    assert sums_by_region.background_drift == pytest.approx(drift, rel=1e-6)


def _record_pooling(path: Path, mode: str | None) -> None:
    """Rewrite a cache file with `mode` as its recorded pooling (None: no key, as older caches)."""
    tensors, metadata = fmt.load_cache_file(path)
    extra = {key: value for key, value in metadata.extra.items() if key != fmt.KEY_MASK_POOLING}
    if mode is not None:
        extra[fmt.KEY_MASK_POOLING] = mode
    fmt.write_cache_file(path, tensors, dataclasses.replace(metadata, extra=extra))


def test_train_reports_the_caches_mask_pooling_and_warns_on_mixed_modes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    toml = cached(tmp_path / "data", "wan")
    files = sorted((tmp_path / "data" / "cache").glob("item*_wan.safetensors"))
    assert len(files) == 4
    config = train_config(toml, tmp_path / "out")

    def lines(level: int) -> list[str]:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="masktrain.train.preflight"):
            preflight(config, 1)
        return [r.getMessage() for r in caplog.records if r.levelno == level and "pooling" in r.getMessage()]

    for path in files:  # a cache made before --mask_pooling: area, nothing said
        _record_pooling(path, None)
    assert lines(logging.INFO) == [] and lines(logging.WARNING) == []
    for path in files:
        _record_pooling(path, "max")
    assert lines(logging.INFO) == ["cache pooled masks with max (cache --mask_pooling)"]
    assert lines(logging.WARNING) == []
    _record_pooling(files[0], "area")
    _record_pooling(files[1], None)  # no key is area too
    (warning,) = lines(logging.WARNING)
    assert "[[datasets]] #1" in warning and "mix mask pooling modes (area, max)" in warning
    assert f"masktrain cache --dataset_config {toml} --arch wan --mask_pooling MODE" in warning
    assert lines(logging.INFO) == ["cache pooled masks with area and max (cache --mask_pooling)"]
