"""The demo's bleed scenario, its parts: the score against hand-computed values (x = noisy -
sigma * v; bleed = 1 - |x_lora - z_twin|^2 / |x_base - z_twin|^2 on background cells), the photos
it is computed on (one room for training, held-out photos with their twins), and the rule that
picks the fourth run. The scenario end to end is in test_demo.py."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from masktrain.config.demo import DemoConfig
from masktrain.demo import bleed, drawing
from masktrain.demo.bleed import BleedResult, SeedResult
from masktrain.demo.dataset import FACE, SKIN, bleed_items, write_split
from masktrain.demo.evaluate import NOISE_BINS, Score, _bleed, _Inputs, bleed_distances
from masktrain.demo.runs import Run, RunSpec


def test_distances_by_hand() -> None:
    # One sample, one channel, 1x3 cells; sigma 0.5. x = noisy - 0.5 v.
    noisy = torch.tensor([2.0, 4.0, 6.0]).view(1, 1, 1, 1, 3)
    velocity = torch.tensor([2.0, 0.0, -2.0]).view(1, 1, 1, 1, 3)  # x = [1, 4, 7]
    twin = torch.tensor([0.0, 1.0, 100.0]).view(1, 1, 1, 1, 3)
    region = torch.tensor([1.0, 1.0, 0.0]).view(1, 1, 1, 1, 3)  # the third cell is subject
    got = bleed_distances(noisy, torch.tensor([0.5]), velocity, twin, region)
    assert got.tolist() == [1.0 + 9.0]


def _inputs(sigmas: list[float]) -> _Inputs:
    count = len(sigmas)
    generator = torch.Generator().manual_seed(0)
    shape = (count, 2, 1, 2, 2)
    background = torch.ones(count, 1, 1, 2, 2)
    background[:, :, :, 0, 0] = 0  # one subject cell per sample
    return _Inputs(
        noisy=torch.randn(shape, generator=generator),
        sigmas=torch.tensor(sigmas),
        target=torch.zeros(shape),
        text=None,  # type: ignore[arg-type]  # unused by the score
        raw=1 - background,  # raw weight 1 (face) on the subject cell, 0 elsewhere
        background=background,
        twin=torch.randn(shape, generator=generator),
        control=torch.randn(shape, generator=generator),
    )


def test_bleed_is_zero_for_the_base_and_one_for_the_room_itself() -> None:
    inputs = _inputs([0.1, 0.5, 0.9])
    base = torch.randn(inputs.noisy.shape, generator=torch.Generator().manual_seed(1))
    assert _bleed(inputs, base, base)["bleed"] == 0.0
    sigmas = inputs.sigmas.view(-1, 1, 1, 1, 1)
    assert inputs.twin is not None
    paints_the_room = (inputs.noisy - inputs.twin) / sigmas  # x = z_twin exactly
    scores = _bleed(inputs, base, paints_the_room)
    assert scores["bleed"] == pytest.approx(1.0, abs=1e-6)
    assert scores["bleed_unseen_room"] < 1.0


def test_bleed_by_hand_and_by_noise_level() -> None:
    # Two samples at sigma 0.1 (bin 0) and 0.9 (bin 4); one channel, one background cell each.
    cells = (2, 1, 1, 1, 1)
    inputs = _Inputs(
        noisy=torch.tensor([1.0, 1.0]).view(cells),
        sigmas=torch.tensor([0.1, 0.9]),
        target=torch.zeros(cells),
        text=None,  # type: ignore[arg-type]
        raw=torch.zeros(cells),
        background=torch.ones(cells),
        twin=torch.tensor([0.0, 0.0]).view(cells),
        control=torch.tensor([2.0, 2.0]).view(cells),
    )
    base = torch.tensor([0.0, 0.0]).view(cells)  # x_base = [1, 1]: distance 1 + 1 to the twin
    lora = torch.tensor([5.0, 0.5]).view(cells)  # x_lora = [0.5, 0.55]: 0.25 + 0.3025
    scores = _bleed(inputs, base, lora)
    assert scores["bleed"] == pytest.approx(1 - (0.25 + 0.3025) / 2)
    by_noise = scores["bleed_by_noise"]
    assert len(by_noise) == NOISE_BINS
    assert by_noise[0] == pytest.approx(0.75) and by_noise[4] == pytest.approx(1 - 0.3025)
    assert all(math.isnan(v) for v in by_noise[1:4])  # no sample there
    # Against the control room (2): base distances 1 + 1, LoRA 2.25 + 2.1025: moved away.
    assert scores["bleed_unseen_room"] == pytest.approx(1 - (2.25 + 2.1025) / 2)


def test_the_training_photos_share_one_room_and_the_twins_pair() -> None:
    items = bleed_items(train=6, heldout=4, size=64, seed=3)
    assert {split: len(v) for split, v in items.items()} == {
        "train": 6,
        "heldout": 4,
        "twin": 4,
        "control": 4,
    }

    def room_difference(a: np.ndarray, b: np.ndarray) -> float:
        """Mean absolute difference of two photos where both show background."""
        return float(np.abs(a - b).mean())

    train = items["train"]
    # Same room, new camera noise (sigma 6 per channel: mean |difference| of two draws ~ 6.8).
    both = (train[0].mask == 0) & (train[1].mask == 0)
    same_room = room_difference(
        train[0].image[both].astype(np.float32), train[1].image[both].astype(np.float32)
    )
    assert 4 < same_room < 10
    assert all(item.caption == "a photo of sks person" for item in train)
    for heldout, twin, control, first in zip(
        items["heldout"], items["twin"], items["control"], train[:4], strict=True
    ):
        # The same subject, pose and caption; only the room differs.
        assert (heldout.mask == twin.mask).all() and (heldout.mask == control.mask).all()
        subject = heldout.mask > 0
        assert (heldout.image[subject] == twin.image[subject]).all()
        assert heldout.caption == twin.caption == control.caption != first.caption
        shared = (twin.mask == 0) & (first.mask == 0)
        # The twin is in the training room, the held-out and control photos are not.
        in_room = room_difference(
            twin.image[shared].astype(np.float32), first.image[shared].astype(np.float32)
        )
        assert in_room < 10
        for elsewhere in (heldout, control):
            other = room_difference(
                elsewhere.image[shared].astype(np.float32), first.image[shared].astype(np.float32)
            )
            assert other > 3 * in_room
    assert all((item.mask == FACE).any() and (item.mask == 0).mean() > 0.3 for item in train)


def _score(subject: float, bleed_value: float) -> Score:
    return Score(subject, 0.0, 0.0, 1.0, 0.0, 1.0, bleed=bleed_value, bleed_unseen_room=0.0)


def _result(values: dict[str, tuple[float, float]]) -> BleedResult:
    runs = [RunSpec(name, "", ()) for name in values]
    return BleedResult(
        [
            SeedResult(
                seed,
                [Run(spec, (), None, None) for spec in runs],  # type: ignore[arg-type]
                {name: _score(*pair) for name, pair in values.items()},
                {},
            )
            for seed in (1, 2)
        ]
    )


def test_the_fourth_run_is_the_lowest_bleed_that_keeps_the_subject() -> None:
    names = [spec.name for spec in bleed.NEW_OPTIONS]
    values = {"unmasked": (0.2, 0.3), "masked": (0.30, 0.2)}
    values |= {name: (0.20, 0.01) for name in names}  # all lose the subject
    values[names[1]] = (0.285, 0.05)  # keeps exactly 95%
    values[names[2]] = (0.29, 0.04)  # keeps it, lower bleed: chosen
    values[names[3]] = (0.31, 0.06)
    assert bleed.choose(_result(values)) == names[2]
    # None keeps 95%: the highest subject improvement.
    values = {"masked": (0.30, 0.2)} | {name: (0.1 + 0.01 * i, 0.0) for i, name in enumerate(names)}
    assert bleed.choose(_result(values)) == names[-1]


def test_mean_and_spread_over_seeds() -> None:
    result = _result({"masked": (0.3, 0.1)})
    assert result.mean("masked", "bleed") == pytest.approx(0.1)
    assert result.spread("masked", "bleed") == 0.0
    reported = bleed.reported_seeds(DemoConfig(output_dir=Path("demo")))
    assert reported == (42, 43, 44) and not set(bleed.SELECTION_SEEDS) & set(reported)


def test_the_bleed_picture_shows_the_photos_the_bars_and_the_curves(tmp_path: Path) -> None:
    """bleed.png is drawn from the scenario's first seed's photos and every seed's scores: a bar
    per run in its colour (the fourth run purple), the photos pasted in."""
    data = tmp_path / "data"
    for split, items in bleed_items(train=1, heldout=1, size=64, seed=3).items():
        write_split(data, split, items, 64, 1)
    names = [spec.name for spec in bleed.REPORTED_RUNS]
    by_noise = (0.01, float("nan"), 0.05, 0.08, 0.1)  # a bin no draw fell in

    def score(index: int, seed: int) -> Score:
        value = 0.02 * (index + 1) + 0.01 * seed
        return Score(0.25, 0.1, 1.0, 1.3, 1.0, 1.0, value, by_noise, value / 2)

    result = BleedResult(
        [
            SeedResult(
                seed,
                [Run(spec, (), tmp_path, tmp_path) for spec in bleed.REPORTED_RUNS],
                {name: score(index, seed) for index, name in enumerate(names)},
                {"train": data / "train.toml"},
            )
            for seed in (1, 2, 3)
        ]
    )
    drawing.write_png(drawing.bleed_figure(result), tmp_path / "bleed.png")
    with Image.open(tmp_path / "bleed.png") as picture:
        assert picture.format == "PNG" and picture.width > 800 and 1.5 < picture.width / picture.height < 2
        colours = {tuple(c) for c in np.asarray(picture.convert("RGB")).reshape(-1, 3).tolist()}
    bars = {"unmasked": (127, 127, 127), "masked": (255, 127, 14), "masked_prior": (44, 160, 44)}
    assert set(bars.values()) | {(148, 103, 189)} <= colours  # tab: grey, orange, green, purple
    assert SKIN in colours  # the photos' faces


@pytest.mark.slow
def test_the_selection_script_runs_every_option_on_the_selection_seeds(tmp_path: Path) -> None:
    script = Path(__file__).parent.parent / "scripts" / "choose_bleed_run.py"
    result = subprocess.run(
        [sys.executable, str(script), "--output_dir", str(tmp_path), "--steps", "2"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    selection = json.loads((tmp_path / "selection.json").read_text())
    names = ["unmasked", "masked", "masked_prior", *(spec.name for spec in bleed.NEW_OPTIONS)]
    assert selection["seeds"] == list(bleed.SELECTION_SEEDS) and list(selection["runs"]) == names
    assert selection["chosen"] in names[3:] and f"chosen: {selection['chosen']}" in result.stdout
    for seed in bleed.SELECTION_SEEDS:
        assert (
            tmp_path / f"seed_{seed}" / "runs" / "masked_prior_huber" / "masked_prior_huber.safetensors"
        ).is_file()
