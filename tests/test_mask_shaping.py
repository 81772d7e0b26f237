"""--mask_blur_kernel_size (alias --mask_blur_radius) and --mask_area_scale_beta against the values
the reference implementation's tests pin (DustyL/blissful-tuner ``tests/test_mask_loss.py``
@3e5acfc: blur k=3, threshold on the unblurred mask, beta global / per sample / on the raw mask),
each computed here by hand. Tensors are (B, C=1, F=1, H=1, W=N): a row of N latent cells."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from masktrain.cli.train import config_from_args
from masktrain.config.mask_loss import validate
from masktrain.errors import MaskOptionError
from masktrain.loss import MaskLossSettings, blur_mask, blur_sigma, masked_loss


def row(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32).view(len(rows), 1, 1, 1, -1)


def test_blur_k3_is_torchvisions_gaussian_and_pins_the_references_value() -> None:
    # sigma = 0.3 * ((3 - 1) / 2 - 1) + 0.8 = 0.8; kernel exp(-x^2 / (2 * 0.64)) at x = -1, 0, 1
    assert blur_sigma(3) == pytest.approx(0.8) and blur_sigma(5) == pytest.approx(1.1)
    e = math.exp(-1 / 1.28)
    a, b = e / (1 + 2 * e), 1 / (1 + 2 * e)
    assert (a, b) == pytest.approx((0.2389943, 0.5220115), abs=1e-7)
    loss, mask = row([1, 2, 3, 4, 5]), row([0, 0, 1, 1, 1])
    on = MaskLossSettings(use_mask_loss=True)
    assert float(masked_loss(loss, mask, on)) == pytest.approx(4.0)
    # A row is one pixel high: the vertical pass (replicate padding) leaves it; horizontally
    # [0, a, a + b, 1, 1] (replicate padding at both ends).
    blurred = [0.0, a, a + b, 1.0, 1.0]
    assert blur_mask(mask, 3).flatten().tolist() == pytest.approx(blurred, abs=1e-6)
    expected = sum(x * w for x, w in zip([1, 2, 3, 4, 5], blurred, strict=True)) / sum(blurred)
    assert expected == pytest.approx(3.9203352, abs=1e-6)
    got = masked_loss(loss, mask, MaskLossSettings(use_mask_loss=True, mask_blur_kernel_size=3))
    assert float(got) == pytest.approx(expected, abs=1e-5)


def test_the_prior_threshold_reads_the_unblurred_mask() -> None:
    settings = MaskLossSettings(
        use_mask_loss=True, mask_blur_kernel_size=3, prior_preservation_weight=1.0, prior_mask_threshold=0.1
    )
    # the prior region is cell 0 only (raw 0 < 0.1; blurred it would be 0.24); target over cells
    # 1, 2 (blurred weights), loss 1 -> 1; prior over cell 0, 10 -> 10
    got = masked_loss(row([1, 1, 1]), row([0, 1, 1]), settings, prior_loss=row([10, 10, 10]))
    assert float(got) == pytest.approx(11.0)


def test_area_scale_beta_global_per_sample_and_on_the_raw_mask() -> None:
    loss, mask = row([2, 2, 2, 2]), row([1, 1, 0, 0])
    assert float(masked_loss(loss, mask, MaskLossSettings(use_mask_loss=True))) == pytest.approx(2.0)
    beta = MaskLossSettings(use_mask_loss=True, mask_area_scale_beta=1.0)
    assert float(masked_loss(loss, mask, beta)) == pytest.approx(1.0)  # 2 * mean 0.5
    per_sample = MaskLossSettings(use_mask_loss=True, mask_area_scale_beta=1.0, normalize_per_sample=True)
    two = masked_loss(row([2, 2, 2, 2], [4, 4, 4, 4]), row([1, 1, 0, 0], [1, 0, 0, 0]), per_sample)
    assert float(two) == pytest.approx((2 * 0.5 + 4 * 0.25) / 2)  # 1.0
    floored = MaskLossSettings(use_mask_loss=True, mask_area_scale_beta=1.0, mask_min_weight=0.2)
    # mean of the raw mask 0.25, not of the floored weights (0.4): 2 * 0.25 = 0.5
    assert float(masked_loss(loss, row([1, 0, 0, 0]), floored)) == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mask_blur_kernel_size": 4}, "--mask_blur_kernel_size must be odd (or 0 to disable), got 4"),
        ({"mask_blur_kernel_size": -1}, "--mask_blur_kernel_size must be >= 0, got -1"),
        ({"mask_area_scale_beta": -0.1}, "--mask_area_scale_beta must be >= 0, got -0.1"),
    ],
)
def test_bad_values_are_named(kwargs: dict, message: str) -> None:
    with pytest.raises(MaskOptionError, match=f"^{re.escape(message)}$"):
        MaskLossSettings(use_mask_loss=True, **kwargs)


def test_beta_with_prior_warns_and_the_radius_alias(tmp_path: Path) -> None:
    settings = MaskLossSettings(use_mask_loss=True, mask_area_scale_beta=0.5, prior_preservation_weight=1.0)
    assert any("mask_area_scale_beta" in w and "prior" in w for w in validate(settings))
    toml = tmp_path / "d.toml"
    toml.write_text("")
    base = ["--dataset_config", str(toml), "--arch", "wan", "--dit", "tiny", "--output_dir", str(tmp_path)]
    config = config_from_args(
        [*base, "--use_mask_loss", "--mask_blur_radius", "5", "--mask_area_scale_beta", "0.5"]
    )
    assert (config.mask.mask_blur_kernel_size, config.mask.mask_area_scale_beta) == (5, 0.5)
