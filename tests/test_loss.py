"""The masked reducer against hand-computed values: the reference's PR #901 cases, the later
reference versions' cases that apply to masktrain, and property tests.

Tensors are mostly (B, C=1, F=1, H=1, W=N), so a row of N numbers is N latent cells.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from masktrain.errors import MaskOptionError
from masktrain.loss import (
    MaskLossSettings,
    has_prior_region,
    mask_regions,
    masked_loss,
    masked_loss_terms,
    region_losses,
    region_means,
    transform_weights,
)
from masktrain.tiers import TIER_EDGES

MASK_ON = MaskLossSettings(use_mask_loss=True)


def row(*rows: list[float], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One sample per argument, each a row of cells: shape (B, 1, 1, 1, N)."""
    return torch.tensor(rows, dtype=dtype).view(len(rows), 1, 1, 1, -1)


def close(value: torch.Tensor, expected: float, tol: float = 1e-6) -> bool:
    return math.isclose(float(value), expected, rel_tol=tol, abs_tol=tol)


# --- transform_weights -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("gamma", "floor", "expected"),
    [
        # Face 255, body 128, hair 80, background 0, i.e. raw 1, 0.50196, 0.31373, 0.
        (1.0, 0.0, [1.0, 0.5020, 0.3137, 0.0]),
        (0.5, 0.0, [1.0, 0.7085, 0.5601, 0.0]),  # sqrt(0.50196) = 0.70849
        # The guide's table prints hair 0.099; 0.31373**2 = 0.09843.
        (2.0, 0.0, [1.0, 0.2520, 0.0984, 0.0]),
        (1.0, 0.1, [1.0, 0.5518, 0.3824, 0.1]),  # 0.50196 * 0.9 + 0.1 = 0.55176
        # The guide's "recommended" row prints body 0.622 and hair 0.473; the formula it states
        # gives 0.50196**0.7 * 0.95 + 0.05 = 0.61725 * 0.95 + 0.05 = 0.63639 and 0.47201.
        (0.7, 0.05, [1.0, 0.6364, 0.4720, 0.05]),
    ],
)
def test_transform_weights_matches_the_guide_pipeline(
    gamma: float, floor: float, expected: list[float]
) -> None:
    raw = torch.tensor([255, 128, 80, 0], dtype=torch.float32) / 255
    got = transform_weights(raw, gamma, floor)
    assert torch.allclose(got, torch.tensor(expected), atol=5e-5)


def test_transform_weights_clamps_before_gamma() -> None:
    # -0.5 ** 0.5 would be NaN; clamped to 0 it is 0. 2.0 clamps to 1.
    got = transform_weights(torch.tensor([-0.5, 2.0]), 0.5, 0.0)
    assert got.tolist() == [0.0, 1.0]


# --- PR #901 cases ----------------------------------------------------------------------------


def test_equivalent_to_plain_weighted_mean_when_prior_disabled() -> None:
    # PR #901's apply_masked_loss: sum(loss * w) / sum(w) over the mask expanded to the loss.
    generator = torch.Generator().manual_seed(0)
    loss = torch.rand(2, 3, 2, 4, 4, generator=generator)
    mask = torch.rand(2, 1, 2, 4, 4, generator=generator)
    cfg = MaskLossSettings(use_mask_loss=True, mask_gamma=0.7, mask_min_weight=0.05)
    weights = (mask**0.7 * 0.95 + 0.05).expand_as(loss)
    expected = float((loss * weights).sum() / weights.sum())
    assert close(masked_loss(loss, mask, cfg), expected, 1e-5)
    # A prior weight with no prior loss passed leaves the target term alone (continuous mode).
    with_prior = MaskLossSettings(
        use_mask_loss=True, mask_gamma=0.7, mask_min_weight=0.05, prior_preservation_weight=1.0
    )
    assert close(masked_loss(loss, mask, with_prior), expected, 1e-5)


def test_threshold_mode_matches_manual_split() -> None:
    # raw [1, 1, 0, 0], threshold 0.1 -> prior region [0, 0, 1, 1], target weights [1, 1, 0, 0].
    # L_t = (1 + 1) / 2 = 1; L_p = 0.5 * (2 + 2) / 2 = 1; total 2.
    cfg = MaskLossSettings(use_mask_loss=True, prior_preservation_weight=0.5, prior_mask_threshold=0.1)
    got = masked_loss(row([1, 1, 1, 1]), row([1, 1, 0, 0]), cfg, prior_loss=row([2, 2, 2, 2]))
    assert close(got, 2.0)


def test_threshold_mode_prevents_target_prior_overlap() -> None:
    # min_weight 0.2: processed [1, 1, 0.2, 0.2]; the prior region [0, 0, 1, 1] zeroes the last two.
    # L_t = (1*1 + 1*1) / 2 = 1 (with the overlap it would be (1 + 1 + 0.8 + 0.8) / 2.4 = 1.5);
    # L_p = 1 * (2 + 2) / 2 = 2; total 3.
    cfg = MaskLossSettings(
        use_mask_loss=True, mask_min_weight=0.2, prior_preservation_weight=1.0, prior_mask_threshold=0.1
    )
    got = masked_loss(row([1, 1, 4, 4]), row([1, 1, 0, 0]), cfg, prior_loss=row([2, 2, 2, 2]))
    assert close(got, 3.0)


def test_continuous_mode_matches_manual_weighted_means() -> None:
    # w = [1, 0.5, 0.25, 0], sum 1.75; sum(loss * w) = 1 + 1 + 1 + 0 = 3 -> L_t = 3 / 1.75.
    # prior region 1 - w = [0, 0.5, 0.75, 1], sum 2.25; sum(prior * pm) = 0 + 10 + 30 + 30 = 70
    # -> L_p = 0.5 * 70 / 2.25.
    cfg = MaskLossSettings(use_mask_loss=True, prior_preservation_weight=0.5)
    got = masked_loss(row([1, 2, 4, 8]), row([1, 0.5, 0.25, 0]), cfg, prior_loss=row([6, 20, 40, 30]))
    assert close(got, 3 / 1.75 + (70 / 2.25) * 0.5)


def test_normalize_per_sample_changes_reduction() -> None:
    # Loss 1 everywhere; sample 0 has weight 1, sample 1 weight 0.
    # Global: (1 + 1) / 2 = 1. Per sample: sample means 1 and 0 (empty), batch mean (1 + 0) / 2 = 0.5.
    loss, mask = row([1, 1], [1, 1]), row([1, 1], [0, 0])
    assert close(masked_loss(loss, mask, MASK_ON), 1.0)
    per_sample = MaskLossSettings(use_mask_loss=True, normalize_per_sample=True)
    assert close(masked_loss(loss, mask, per_sample), 0.5)


def test_prior_term_is_zero_when_no_prior_region() -> None:
    # Continuous mode, mask 1 everywhere: the prior region 1 - w is 0, so L = L_t = 1.
    cfg = MaskLossSettings(use_mask_loss=True, prior_preservation_weight=1.0)
    got = masked_loss(row([1, 1]), row([1, 1]), cfg, prior_loss=row([5, 5]))
    assert close(got, 1.0)
    assert not has_prior_region(row([1, 1]), cfg)


def test_prior_term_is_zero_when_threshold_mode_has_no_background() -> None:
    # raw [1, 0.5] is nowhere below 0.1: no prior cell, target weights [1, 0.5] on loss 1 -> 1.
    cfg = MaskLossSettings(use_mask_loss=True, prior_preservation_weight=1.0, prior_mask_threshold=0.1)
    got = masked_loss(row([1, 1]), row([1, 0.5]), cfg, prior_loss=row([5, 5]))
    assert close(got, 1.0)
    assert not has_prior_region(row([1, 0.5]), cfg)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_returns_float32_scalar(dtype: torch.dtype) -> None:
    got = masked_loss(row([1, 2], dtype=dtype), row([1, 0.5], dtype=dtype), MASK_ON)
    assert got.dtype == torch.float32
    assert got.ndim == 0
    assert close(got, (1 + 1) / 1.5)  # (1*1 + 2*0.5) / (1 + 0.5)
    plain = masked_loss(row([1, 2], dtype=dtype), None, MASK_ON)
    assert plain.dtype == torch.float32
    assert plain.ndim == 0


def test_layered_layout_with_base_frame_dropped() -> None:
    # loss (B=1, L=2, C=1, H=1, W=2); mask (1, 1, F=3, 1, 2), frame 0 the base image (dropped).
    # layer 1: loss [2, 100], weight [1, 0]; layer 2: loss [4, 6], weight [0.5, 0.5].
    # L_t = (2*1 + 100*0 + 4*0.5 + 6*0.5) / (1 + 0 + 0.5 + 0.5) = 7 / 2 = 3.5.
    loss = torch.tensor([[2.0, 100.0], [4.0, 6.0]]).view(1, 2, 1, 1, 2)
    mask = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.5, 0.5]]).view(1, 1, 3, 1, 2)
    assert close(masked_loss(loss, mask, MASK_ON, layout="layered", drop_base_frame=True), 3.5)


def test_layered_layout_equals_video_layout_of_the_transposed_loss() -> None:
    generator = torch.Generator().manual_seed(1)
    loss = torch.rand(2, 2, 3, 4, 4, generator=generator)  # (B, L, C, H, W)
    mask = torch.rand(2, 1, 3, 4, 4, generator=generator)  # base + 2 layers
    prior = torch.rand(2, 2, 3, 4, 4, generator=generator)
    cfg = MaskLossSettings(
        use_mask_loss=True, mask_gamma=0.7, mask_min_weight=0.05, prior_preservation_weight=0.5
    )
    layered = masked_loss(loss, mask, cfg, prior_loss=prior, layout="layered", drop_base_frame=True)
    video = masked_loss(
        loss.permute(0, 2, 1, 3, 4), mask[:, :, 1:], cfg, prior_loss=prior.permute(0, 2, 1, 3, 4)
    )
    assert close(layered, float(video), 1e-6)


# --- later reference versions -----------------------------------------------------------------


def test_per_sample_with_prior_preservation() -> None:
    # Continuous mode, w_prior 0.5, per sample.
    # sample 0: mask [1, 0], loss [2, 9], prior [7, 10.2]; sample 1: mask [1, 1], loss [4, 6].
    # L_t: sample 0 = (2*1 + 9*0) / 1 = 2; sample 1 = (4 + 6) / 2 = 5; mean 3.5.
    # L_p: sample 0 region [0, 1] -> 10.2 / 1 = 10.2; sample 1 region [0, 0] -> 0 (still counted);
    #      mean 5.1, times 0.5 = 2.55.  Total 3.5 + 2.55 = 6.05.
    loss, mask, prior = row([2, 9], [4, 6]), row([1, 0], [1, 1]), row([7, 10.2], [3, 3])
    cfg = MaskLossSettings(use_mask_loss=True, prior_preservation_weight=0.5, normalize_per_sample=True)
    assert close(masked_loss(loss, mask, cfg, prior_loss=prior), 6.05, 1e-6)
    # Global for contrast: L_t = (2 + 4 + 6) / 3 = 4; L_p = 0.5 * 10.2 / 1 = 5.1; total 9.1.
    glob = MaskLossSettings(use_mask_loss=True, prior_preservation_weight=0.5)
    assert close(masked_loss(loss, mask, glob, prior_loss=prior), 9.1, 1e-6)


def test_mask_weights_are_clamped_before_gamma() -> None:
    # raw [-0.5, 2.0] -> clamp [0, 1] -> ** 0.5 -> [0, 1]; loss [7, 3] -> 3 / 1 = 3.
    cfg = MaskLossSettings(use_mask_loss=True, mask_gamma=0.5)
    got = masked_loss(row([7, 3]), row([-0.5, 2.0]), cfg)
    assert close(got, 3.0)


def test_bfloat16_loss_accepts_float16_mask_weights() -> None:
    generator = torch.Generator().manual_seed(2)
    loss = torch.rand(2, 4, 1, 3, 3, generator=generator).to(torch.bfloat16)
    mask = torch.rand(2, 1, 1, 3, 3, generator=generator).to(torch.float16)
    cfg = MaskLossSettings(use_mask_loss=True, mask_gamma=0.7, prior_preservation_weight=1.0)
    got = masked_loss(loss, mask, cfg, prior_loss=loss * 2)
    assert got.dtype == torch.float32
    assert torch.isfinite(got)
    # Everything is computed in float32, so it equals the float32 computation of the same values.
    expected = masked_loss(loss.float(), mask.float(), cfg, prior_loss=(loss * 2).float())
    assert float(got) == float(expected)


def test_raises_value_error_for_shape_mismatch_on_prior() -> None:
    cfg = MaskLossSettings(use_mask_loss=True, prior_preservation_weight=1.0)
    with pytest.raises(
        ValueError, match=r"prior_loss shape \(1, 1, 1, 1, 3\) does not match loss shape \(1, 1, 1, 1, 2\)"
    ):
        masked_loss(row([1, 1]), row([1, 0]), cfg, prior_loss=row([1, 1, 1]))


def test_multi_channel_matches_single_channel() -> None:
    # The weight sums run over the broadcast mask, so C cancels: a C-channel loss reduces to the
    # weighted mean of its channel mean, and C copies of one channel equal that channel.
    generator = torch.Generator().manual_seed(3)
    loss = torch.rand(2, 4, 2, 3, 3, generator=generator)
    prior = torch.rand(2, 4, 2, 3, 3, generator=generator)
    mask = torch.rand(2, 1, 2, 3, 3, generator=generator)
    for cfg in (
        MaskLossSettings(use_mask_loss=True, mask_gamma=0.7, prior_preservation_weight=0.5),
        MaskLossSettings(
            use_mask_loss=True,
            prior_preservation_weight=1.0,
            prior_mask_threshold=0.3,
            normalize_per_sample=True,
        ),
    ):
        multi = masked_loss(loss, mask, cfg, prior_loss=prior)
        single = masked_loss(loss.mean(1, keepdim=True), mask, cfg, prior_loss=prior.mean(1, keepdim=True))
        assert close(multi, float(single), 1e-6)
        one = loss[:, :1]
        repeated = masked_loss(one.repeat(1, 4, 1, 1, 1), mask, cfg, prior_loss=one.repeat(1, 4, 1, 1, 1))
        assert close(repeated, float(masked_loss(one, mask, cfg, prior_loss=one)), 1e-6)


# --- shapes, layouts and errors ---------------------------------------------------------------


def test_without_mask_or_mask_loss_it_is_the_plain_mean() -> None:
    loss = row([1, 2, 3, 6])
    assert close(masked_loss(loss, None, MASK_ON), 3.0)
    assert close(masked_loss(loss, row([1, 0, 0, 0]), MaskLossSettings()), 3.0)


def test_four_dimensional_loss_and_mask_for_video() -> None:
    # loss (B=1, C=2, H=1, W=2): channel 0 [1, 3], channel 1 [5, 7]; mask (B, F=1, H, W) [1, 0].
    # Weighted cells: 1 and 5 -> (1 + 5) / 2 = 3.
    loss = torch.tensor([[1.0, 3.0], [5.0, 7.0]]).view(1, 2, 1, 2)
    mask = torch.tensor([1.0, 0.0]).view(1, 1, 1, 2)
    assert close(masked_loss(loss, mask, MASK_ON), 3.0)


VIDEO_MISMATCH = "mask_weights shape does not match loss shape for layout='video'"
LAYERED_MISMATCH = "mask_weights shape does not match loss shape for layout='layered'"


@pytest.mark.parametrize(
    ("loss", "mask", "kwargs", "message"),
    [
        (row([1, 1]), row([1, 1]), {"layout": "frames"}, "Unknown layout: 'frames'"),
        (
            row([1, 1]),
            row([1, 1]),
            {"drop_base_frame": True},
            "drop_base_frame=True is only valid with layout='layered'",
        ),
        (torch.ones(1, 2, 2), row([1, 1]), {}, r"Expected loss to be 4D or 5D, got 3D: \(1, 2, 2\)"),
        (
            torch.ones(1, 1, 1, 2),
            row([1, 1]),
            {"layout": "layered"},
            "4D loss is only supported for layout='video'",
        ),
        (row([1, 1]), torch.ones(1, 2), {}, r"Unexpected mask_weights shape: \(1, 2\)"),
        (row([1, 1]), torch.ones(1, 2, 1, 1, 2), {}, r"Unexpected mask_weights shape: \(1, 2, 1, 1, 2\)"),
        (row([1, 1]), row([1, 1, 1]), {}, VIDEO_MISMATCH + r": mask=\(1, 1, 1, 1, 3\) loss=\(1, 1, 1, 1, 2"),
        (row([1, 1]), row([1, 1], [1, 1]), {}, VIDEO_MISMATCH),
        (
            torch.ones(1, 2, 1, 1, 2),
            torch.ones(1, 1, 2, 1, 2),
            {"layout": "layered", "drop_base_frame": True},
            LAYERED_MISMATCH + r": mask=\(1, 1, 1, 1, 2\) loss=\(1, 2, 1, 1, 2\) drop_base_frame=True",
        ),
    ],
)
def test_shape_errors(loss: torch.Tensor, mask: torch.Tensor, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        masked_loss(loss, mask, MASK_ON, **kwargs)


def test_invalid_settings_raise_the_flag_message() -> None:
    with pytest.raises(MaskOptionError, match="--mask_gamma must be > 0"):
        masked_loss(row([1]), row([1]), MaskLossSettings(use_mask_loss=True, mask_gamma=0.0))
    with pytest.raises(MaskOptionError, match=r"--mask_min_weight must be in range \[0, 1\)"):
        masked_loss(row([1]), row([1]), MaskLossSettings(use_mask_loss=True, mask_min_weight=1.0))


def test_threshold_without_prior_weight_leaves_the_target_alone() -> None:
    # Prior weight 0: the threshold has no effect (masktrain; PR #901 zeroed target cells below it).
    # w = [1, 0.05]: (1*1 + 21*0.05) / 1.05 = 2.05 / 1.05.
    cfg = MaskLossSettings(use_mask_loss=True, prior_mask_threshold=0.1)
    assert close(masked_loss(row([1, 21]), row([1, 0.05]), cfg), 2.05 / 1.05)


def test_terms_split_the_loss_and_the_target_does_not_depend_on_prior_loss() -> None:
    # Same inputs as the threshold-overlap case: target 1, prior 2.
    cfg = MaskLossSettings(
        use_mask_loss=True, mask_min_weight=0.2, prior_preservation_weight=1.0, prior_mask_threshold=0.1
    )
    loss, mask, prior = row([1, 1, 4, 4]), row([1, 1, 0, 0]), row([2, 2, 2, 2])
    terms = masked_loss_terms(loss, mask, cfg, prior_loss=prior)
    assert (float(terms.target), float(terms.prior)) == (1.0, 2.0)
    assert float(masked_loss(loss, mask, cfg)) == float(terms.target)


def test_terms_carry_what_the_reducer_prepared() -> None:
    """The weights, the prior region and the region sums the reducer hands back are what a step
    would otherwise prepare again: hand-computed here for a threshold-mode case with a floor."""
    cfg = MaskLossSettings(
        use_mask_loss=True, mask_min_weight=0.2, prior_preservation_weight=1.0, prior_mask_threshold=0.1
    )
    loss, mask, prior = (
        row([1, 2, 4, 8], [3, 3, 3, 3]),
        row([1, 0.5, 0, 0], [1, 1, 1, 0]),
        row([2] * 4, [1] * 4),
    )
    gate = torch.tensor([True, False])  # the second sample's prior term gated off
    terms = masked_loss_terms(loss, mask, cfg, prior_loss=prior, prior_gate=gate)
    assert terms.weights is not None and terms.prior_region is not None and terms.region_sums is not None
    # w = raw * 0.8 + 0.2 (0.5 -> 0.6), prior cells (raw < 0.1) out of the target of sample 0 only
    expected_weights = [[1.0, 0.6, 0.0, 0.0], [1.0, 1.0, 1.0, 0.2]]
    assert torch.allclose(terms.weights.flatten(1), torch.tensor(expected_weights))
    assert terms.prior_region.flatten(1).tolist() == [[0, 0, 1, 1], [0, 0, 0, 0]]
    # regions of the raw mask: face {1, 3, 3, 3}, body {2}, background {4, 8, 3}
    assert region_means(terms.region_sums) == {"background": 5.0, "body": 2.0, "face": 2.5}
    assert region_means(terms.region_sums) == region_losses(loss, mask)
    weights, prior_region = mask_regions(mask, cfg, gate)
    assert torch.equal(terms.weights, weights) and torch.equal(terms.prior_region, prior_region)


def test_gradient_reaches_weighted_cells_only() -> None:
    # L = (1*a + 0*b) / 1: dL/da = 1, dL/db = 0.
    loss = row([3.0, 4.0]).requires_grad_()
    masked_loss(loss, row([1, 0]), MASK_ON).backward()
    assert loss.grad is not None
    assert loss.grad.flatten().tolist() == [1.0, 0.0]


# --- has_prior_region -------------------------------------------------------------------------


def test_has_prior_region() -> None:
    continuous = MaskLossSettings(use_mask_loss=True, prior_preservation_weight=1.0)
    threshold = MaskLossSettings(use_mask_loss=True, prior_preservation_weight=1.0, prior_mask_threshold=0.1)
    assert not has_prior_region(row([1, 1]), continuous)
    assert not has_prior_region(row([1, 2]), continuous)  # clamped to 1
    assert has_prior_region(row([1, 0.999]), continuous)
    assert not has_prior_region(row([0.1, 1]), threshold)  # not below the threshold
    assert has_prior_region(row([0.05, 1]), threshold)
    assert not has_prior_region(None, continuous)
    assert not has_prior_region(row([0, 0]), MaskLossSettings(use_mask_loss=True))
    # Layered: frame 0 (the base image) is not in the loss.
    layered = torch.tensor([[0.0, 0.0], [1.0, 1.0]]).view(1, 1, 2, 1, 2)
    assert has_prior_region(layered, continuous)
    assert not has_prior_region(layered, continuous, drop_base_frame=True)


# --- region_losses ----------------------------------------------------------------------------


def test_region_losses_by_raw_weight_tier() -> None:
    # raw [1.0, 0.8 | 0.5, 0.3 | 0.04, 0.0] -> face | body | background. C = 2:
    # channel 0 [1, 3, 5, 7, 9, 11], channel 1 [3, 5, 7, 9, 11, 13].
    # face (1 + 3 + 3 + 5) / 4 = 3; body (5 + 7 + 7 + 9) / 4 = 7; background (9 + 11 + 11 + 13) / 4 = 11.
    loss = torch.tensor([[1.0, 3, 5, 7, 9, 11], [3, 5, 7, 9, 11, 13]]).view(1, 2, 1, 1, 6)
    mask = row([1.0, 0.8, 0.5, 0.3, 0.04, 0.0])
    assert region_losses(loss, mask) == {"background": 11.0, "body": 7.0, "face": 3.0}


def test_region_losses_edges_and_empty_tiers() -> None:
    assert TIER_EDGES == (0.05, 0.75)
    # 0.05 is body, 0.75 is face; no background cell -> None.
    assert region_losses(row([2, 4]), row([0.05, 0.75])) == {"background": None, "body": 2.0, "face": 4.0}
    # Layered with the base frame dropped: only the layer's [0, 1] weights count.
    loss = torch.tensor([6.0, 8.0]).view(1, 1, 1, 1, 2)
    mask = torch.tensor([[1.0, 1.0], [0.0, 1.0]]).view(1, 1, 2, 1, 2)
    got = region_losses(loss, mask, layout="layered", drop_base_frame=True)
    assert got == {"background": 6.0, "body": None, "face": 8.0}


# --- properties -------------------------------------------------------------------------------

shapes = st.tuples(*(st.integers(1, n) for n in (3, 3, 2, 3, 3)))
finite = st.floats(0, 100, width=32)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), per_sample=st.booleans())
def test_all_ones_mask_equals_plain_mean(data: st.DataObject, per_sample: bool) -> None:
    shape = data.draw(shapes)
    loss = torch.from_numpy(data.draw(arrays(np.float32, shape, elements=finite)))
    mask = torch.ones(shape[0], 1, *shape[2:])
    cfg = MaskLossSettings(use_mask_loss=True, normalize_per_sample=per_sample)
    expected = float(loss.double().mean())
    assert math.isclose(float(masked_loss(loss, mask, cfg)), expected, rel_tol=1e-5, abs_tol=1e-5)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), per_sample=st.booleans())
def test_invariant_to_scaling_the_raw_weights(data: st.DataObject, per_sample: bool) -> None:
    """Domain: gamma 1, floor 0, no prior term, raw weights in [0, 1] and a factor k > 0 with
    k * max(raw) <= 1. Clamping at 1 breaks it above that (the scaled weights saturate); a floor
    (affine, not linear), the continuous prior region (1 - w) and the threshold are not
    homogeneous either; and weight sums at or below 1e-8 are treated as empty. Weights are drawn
    from {0} and [2**-10, 1] so no non-empty sum gets near that guard."""
    shape = data.draw(shapes)
    loss = torch.from_numpy(data.draw(arrays(np.float32, shape, elements=finite)))
    weight = st.one_of(st.just(0.0), st.floats(2**-10, 1, width=32))
    mask = torch.from_numpy(data.draw(arrays(np.float32, (shape[0], 1, *shape[2:]), elements=weight)))
    assume(float(mask.max()) > 0)
    k = data.draw(st.floats(0.05, 1.0 / float(mask.max())))
    cfg = MaskLossSettings(use_mask_loss=True, normalize_per_sample=per_sample)
    base = float(masked_loss(loss, mask, cfg))
    scaled = float(masked_loss(loss, mask * k, cfg))
    assert math.isclose(base, scaled, rel_tol=1e-4, abs_tol=1e-4)


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    gamma=st.floats(0.1, 4),
    floor=st.floats(0, 0.9),
    prior_weight=st.floats(0, 2),
    threshold=st.one_of(st.none(), st.floats(0.01, 0.99)),
    per_sample=st.booleans(),
)
def test_all_zero_mask_gives_a_finite_loss(
    data: st.DataObject,
    gamma: float,
    floor: float,
    prior_weight: float,
    threshold: float | None,
    per_sample: bool,
) -> None:
    shape = data.draw(shapes)
    loss = torch.from_numpy(data.draw(arrays(np.float32, shape, elements=finite)))
    prior = torch.from_numpy(data.draw(arrays(np.float32, shape, elements=finite)))
    mask = torch.zeros(shape[0], 1, *shape[2:])
    cfg = MaskLossSettings(
        use_mask_loss=True,
        mask_gamma=gamma,
        mask_min_weight=floor,
        prior_preservation_weight=prior_weight,
        prior_mask_threshold=threshold,
        normalize_per_sample=per_sample,
    )
    got = masked_loss(loss, mask, cfg, prior_loss=prior)
    assert torch.isfinite(got)
    if floor == 0 and prior_weight == 0:
        assert float(got) == 0.0


def test_reducer_has_no_data_dependent_python_branches() -> None:
    # fullgraph tracing fails on any Python decision taken on a tensor value (`if tensor < x`,
    # `.item()`), which is what would force a host sync on a GPU each step.
    cfg = MaskLossSettings(
        use_mask_loss=True,
        mask_gamma=0.7,
        prior_preservation_weight=0.5,
        prior_mask_threshold=0.1,
        normalize_per_sample=True,
    )
    compiled = torch.compile(
        lambda loss, mask, prior: masked_loss(loss, mask, cfg, prior_loss=prior),
        backend="eager",
        fullgraph=True,
    )
    generator = torch.Generator().manual_seed(4)
    loss, mask, prior = (torch.rand(2, c, 2, 3, 3, generator=generator) for c in (3, 1, 3))
    assert float(compiled(loss, mask, prior)) == float(masked_loss(loss, mask, cfg, prior_loss=prior))
