"""--prior_decay_schedule / --prior_decay_timestep_start / --prior_decay_warmup_ratio against the
reference's pinned values (DustyL/blissful-tuner ``tests/test_prior_scheduling.py`` @289c641e):
linear and cosine fall-off below the pivot, the warm-up; the per-sample weights in the reducer; a
sample with weight 0 runs no teacher; the flags that cannot work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import cached, train_config
from masktrain.config import MaskLossSettings
from masktrain.errors import MaskOptionError
from masktrain.loss import masked_loss
from masktrain.train.loop import run as run_train
from masktrain.train.prior_schedule import prior_weights


def _settings(**kwargs) -> MaskLossSettings:
    return MaskLossSettings(
        use_mask_loss=True,
        prior_preservation_weight=2.0,
        normalize_per_sample=True,
        prior_decay_timestep_start=300.0,
        **kwargs,
    )


def test_linear_and_cosine_fall_off_below_the_pivot() -> None:
    linear = prior_weights(
        _settings(prior_decay_schedule="linear"), torch.tensor([0.0, 150, 300, 900]), 0, 100
    )
    assert linear.tolist() == pytest.approx([0, 1, 2, 2])
    cosine = prior_weights(
        _settings(prior_decay_schedule="cosine"), torch.tensor([0.0, 75, 150, 300, 900]), 0, 100
    )
    assert cosine.tolist() == pytest.approx([0, 0.2928932, 1, 2, 2], abs=1e-4)


def test_the_warm_up_ramps_the_weight() -> None:
    # warm-up 0.1 of 1000 steps = 100 steps; at step 50 half the weight; t at the pivot
    weights = prior_weights(_settings(prior_decay_warmup_ratio=0.1), torch.tensor([300.0]), 50, 1000)
    assert weights.tolist() == pytest.approx([1.0])
    assert prior_weights(
        _settings(prior_decay_warmup_ratio=0.1), torch.tensor([300.0]), 0, 1000
    ).tolist() == [0.0]


def test_per_sample_weights_in_the_reducer() -> None:
    # the reference's case: target pixel 1 / 3, prior 10 / 20, masks [1, 0], weights [1, 0], thr 0.1
    settings = MaskLossSettings(
        use_mask_loss=True, prior_preservation_weight=1.0, prior_mask_threshold=0.1, normalize_per_sample=True
    )
    loss = torch.tensor([[1.0, 1.0], [3.0, 3.0]]).view(2, 1, 1, 1, 2)
    prior = torch.tensor([[10.0, 10.0], [20.0, 20.0]]).view(2, 1, 1, 1, 2)
    mask = torch.tensor([[1.0, 0.0], [1.0, 0.0]]).view(2, 1, 1, 1, 2)
    got = masked_loss(loss, mask, settings, prior_loss=prior, prior_weights=torch.tensor([1.0, 0.0]))
    assert float(got) == pytest.approx(2.0 + 5.0)  # targets (1 + 3) / 2; prior (10 * 1 + 20 * 0) / 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"prior_decay_schedule": "cosine", "normalize_per_sample": False},
            "requires --normalize_per_sample",
        ),
        ({"prior_decay_schedule": "step"}, "--prior_decay_schedule must be one of constant, linear, cosine"),
        ({"prior_decay_timestep_start": 0.0}, "--prior_decay_timestep_start must be in (0, 1000]"),
        ({"prior_decay_warmup_ratio": 1.5}, "--prior_decay_warmup_ratio must be in [0, 1]"),
    ],
)
def test_flags_that_cannot_work(kwargs: dict, message: str) -> None:
    settings = {
        "use_mask_loss": True,
        "prior_preservation_weight": 1.0,
        "normalize_per_sample": True,
        **kwargs,
    }
    with pytest.raises(
        MaskOptionError, match=message.replace("(", r"\(").replace("]", r"\]").replace("[", r"\[")
    ):
        MaskLossSettings(**settings)


def test_a_run_warming_up_skips_the_teacher_at_first(tmp_path: Path) -> None:
    toml = cached(tmp_path / "data", "wan")
    mask = MaskLossSettings(
        use_mask_loss=True,
        prior_preservation_weight=1.0,
        prior_mask_threshold=0.1,
        normalize_per_sample=True,
        prior_decay_warmup_ratio=0.5,
    )
    out = tmp_path / "out"
    run_train(train_config(toml, out, max_train_steps=4, mask=mask))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # step 0 of the warm-up: every sample's weight is 0, so no teacher and no prior term
    assert records[0]["teacher_ran"] == 0.0 and records[0]["prior_loss"] == 0.0
    assert records[-1]["teacher_ran"] == 1.0 and records[-1]["prior_loss"] > 0
