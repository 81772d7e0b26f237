"""Timestep sampling and loss weighting: formulas by hand, distributions with fixed seeds, bounds,
determinism and validation messages.

Distribution tolerances: with N = 20000 draws the standard error of a mean or median of a [0, 1]
variable is at most ~0.004, so 0.015 is over 3.5 standard errors (and the seeds are fixed).
"""

from __future__ import annotations

import math

import pytest
import torch

from masktrain import MaskTrainError, catalog
from masktrain.config.timesteps import TIMESTEP_SAMPLINGS, TimestepSettings, validate
from masktrain.errors import TimestepOptionError
from masktrain.models.base import model_timesteps
from masktrain.train.timesteps import loss_weighting, qwen_shift, sample_sigmas, shift_sigmas, sigma_table

N = 20_000
TOL = 0.015
HW = (64, 64)


def draw(seed: int = 0, n: int = N, hw: tuple[int, int] = HW, **options: object) -> torch.Tensor:
    settings = TimestepSettings(**options)  # type: ignore[arg-type]
    validate(settings)
    return sample_sigmas(settings, n, hw, torch.Generator().manual_seed(seed), "cpu")


def median(t: torch.Tensor) -> float:
    return float(t.median())


# --- formulas ---------------------------------------------------------------------------------


def test_shift_formula_by_hand() -> None:
    # s t / (1 + (s - 1) t) with s = 3: 0.5 -> 1.5 / 2 = 0.75; 0.25 -> 0.75 / 1.5 = 0.5; 0, 1 fixed.
    got = shift_sigmas(torch.tensor([0.0, 0.25, 0.5, 1.0]), 3.0)
    assert torch.allclose(got, torch.tensor([0.0, 0.5, 0.75, 1.0]))


def test_qwen_shift_by_hand() -> None:
    # mu = 0.5 + 0.4 * (tokens - 256) / 7936 with tokens = (h // 2) * (w // 2).
    assert math.isclose(qwen_shift((32, 32)), math.exp(0.5))  # 16 * 16 = 256 tokens
    assert math.isclose(qwen_shift((256, 128)), math.exp(0.9))  # 128 * 64 = 8192 tokens
    assert math.isclose(qwen_shift((129, 129)), math.exp(0.5 + 0.4 * 3840 / 7936))  # 64 * 64 = 4096
    assert math.isclose(qwen_shift((128, 128)), qwen_shift((129, 129)))  # floor division


def test_the_resolution_shift_follows_each_familys_pipeline_line() -> None:
    """diffusers' calculate_shift (256 -> 0.5, 4096 -> 1.15) on the family's token count: the cached
    grid itself for Qwen-Image 2.1 (h * w), its 2x2 patches for Qwen-Image's own line."""
    line = catalog.QWEN_IMAGE_2_1.resolution_shift
    assert math.isclose(qwen_shift((64, 64), line), math.exp(1.15))  # 4096 tokens: 1024 px at 16x
    assert math.isclose(qwen_shift((16, 16), line), math.exp(0.5))  # 256 tokens
    mu = 0.5 + (1.15 - 0.5) * (48 * 48 - 256) / (4096 - 256)
    assert math.isclose(qwen_shift((48, 48), line), math.exp(mu))
    assert catalog.QWEN_IMAGE.resolution_shift == catalog.QWEN_IMAGE_SHIFT


@pytest.mark.parametrize("shift", [1.0, 2.2, 3.0])
def test_sigma_table_is_diffusers_flow_match_euler(shift: float) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    assert torch.allclose(sigma_table(shift), scheduler.sigmas[:1000].float(), atol=1e-7)


def test_model_timesteps_are_t_times_1000() -> None:
    assert model_timesteps(torch.tensor([0.0, 0.5, 1.0])).tolist() == [0.0, 500.0, 1000.0]


# --- distributions ----------------------------------------------------------------------------


def test_uniform() -> None:
    t = draw(timestep_sampling="uniform")
    assert t.shape == (N,)
    assert t.dtype == torch.float32
    assert abs(float(t.mean()) - 0.5) < TOL
    assert float(t.min()) >= 0.0
    assert float(t.max()) < 1.0


def test_sigmoid_is_a_logistic_normal() -> None:
    t = draw(timestep_sampling="sigmoid", sigmoid_scale=2.0)
    assert 0.0 < float(t.min())
    assert float(t.max()) < 1.0
    logits = torch.logit(t.double())
    # logit(t) ~ N(0, 2): standard errors 2 / sqrt(N) = 0.014 (mean) and 2 / sqrt(2N) = 0.01 (std).
    assert abs(float(logits.mean())) < 0.06
    assert abs(float(logits.std()) - 2.0) < 0.06
    assert abs(median(t) - 0.5) < TOL


def test_shift_moves_the_median_from_half_to_three_quarters() -> None:
    plain = draw(seed=3, timestep_sampling="sigmoid")
    shifted = draw(seed=3, timestep_sampling="shift", discrete_flow_shift=3.0)
    # Same seed, same normal draw: the shift is applied to exactly the sigmoid sample.
    assert torch.allclose(shifted, shift_sigmas(plain, 3.0))
    assert abs(median(shifted) - 0.75) < TOL  # median(sigmoid(N)) = 0.5 -> 3 * 0.5 / 2


@pytest.mark.parametrize(("hw", "tokens_mu"), [((32, 32), 0.5), ((256, 128), 0.9)])
def test_qwen_shift_uses_the_latent_size(hw: tuple[int, int], tokens_mu: float) -> None:
    t = draw(hw=hw, timestep_sampling="qwen_shift")
    shift = math.exp(tokens_mu)
    assert abs(median(t) - shift / (1 + shift)) < TOL  # 0.6225 and 0.7109


def test_logsnr() -> None:
    t = draw(timestep_sampling="logsnr")
    assert 0.0 < float(t.min())
    assert float(t.max()) < 1.0
    assert abs(median(t) - 0.5) < TOL
    # logit_mean -2: median logsnr -2 -> t = sigmoid(1) = 0.7311.
    shifted = draw(timestep_sampling="logsnr", logit_mean=-2.0)
    assert abs(median(shifted) - 1 / (1 + math.exp(-1))) < TOL


def test_sigma_uniform_indexes_the_table() -> None:
    t = draw(seed=5)
    # Recompute by hand from the same generator: u -> index floor(1000 u) -> sigma (1000 - i) / 1000.
    u = torch.rand(N, generator=torch.Generator().manual_seed(5))
    expected = (1000 - (u * 1000).long()).float() / 1000
    assert torch.allclose(t, expected)
    assert abs(float(t.mean()) - 0.5005) < TOL


def test_sigma_with_shift_and_logit_normal_density() -> None:
    t = draw(seed=6, discrete_flow_shift=3.0, weighting_scheme="logit_normal")
    u = torch.sigmoid(torch.randn(N, generator=torch.Generator().manual_seed(6)))
    expected = sigma_table(3.0)[(u * 1000).long().clamp(max=999)]
    assert torch.equal(t, expected)
    # Median u = 0.5 -> index 500 -> unshifted sigma 0.5 -> shifted 0.75.
    assert abs(median(t) - 0.75) < TOL


def test_sigma_with_mode_density() -> None:
    t = draw(seed=7, weighting_scheme="mode", mode_scale=1.29)
    u = torch.rand(N, generator=torch.Generator().manual_seed(7))
    u = 1 - u - 1.29 * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    expected = sigma_table(1.0)[(u * 1000).long().clamp(0, 999)]
    assert torch.equal(t, expected)
    # Hand value of the density at u = 0.5: 1 - 0.5 - 1.29 * (0.5 - 1 + 0.5) = 0.5 (a fixed point).
    assert float(1 - 0.5 - 1.29 * (math.cos(math.pi / 4) ** 2 - 1 + 0.5)) == pytest.approx(0.5)


@pytest.mark.parametrize("sampling", TIMESTEP_SAMPLINGS)
@pytest.mark.parametrize(("low", "high"), [(875, 1000), (0, 875), (200, 300)])
def test_min_max_timestep_bound_every_sampler(sampling: str, low: int, high: int) -> None:
    t = draw(n=2000, timestep_sampling=sampling, min_timestep=low, max_timestep=high, discrete_flow_shift=3.0)
    assert float(t.min()) >= low / 1000 - 1e-6
    assert float(t.max()) <= high / 1000 + 1e-6


def test_min_max_rescale_linearly() -> None:
    # Uniform on [0, 1) rescaled to [0.875, 1.0): mean 0.9375, and exactly t * 0.125 + 0.875.
    t = draw(seed=8, timestep_sampling="uniform", min_timestep=875, max_timestep=1000)
    plain = draw(seed=8, timestep_sampling="uniform")
    assert torch.allclose(t, plain * 0.125 + 0.875)
    assert abs(float(t.mean()) - 0.9375) < TOL / 4


# --- determinism ------------------------------------------------------------------------------


@pytest.mark.parametrize("sampling", TIMESTEP_SAMPLINGS)
def test_deterministic_under_a_seeded_generator(sampling: str) -> None:
    settings = TimestepSettings(timestep_sampling=sampling, weighting_scheme="logit_normal")
    first = torch.Generator().manual_seed(11)
    second = torch.Generator().manual_seed(11)
    a = [sample_sigmas(settings, 4, HW, first, "cpu") for _ in range(3)]
    b = [sample_sigmas(settings, 4, HW, second, "cpu") for _ in range(3)]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], a[1])  # the generator advances
    # Resume: restoring the generator state repeats the next draw.
    state = first.get_state()
    following = sample_sigmas(settings, 4, HW, first, "cpu")
    first.set_state(state)
    assert torch.equal(sample_sigmas(settings, 4, HW, first, "cpu"), following)
    other = sample_sigmas(settings, 4, HW, torch.Generator().manual_seed(12), "cpu")
    assert not torch.equal(other, a[0])


# --- loss weighting ---------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["none", "logit_normal", "mode"])
def test_no_loss_weighting(scheme: str) -> None:
    assert loss_weighting(TimestepSettings(weighting_scheme=scheme), torch.tensor([0.5])) is None


def test_sigma_sqrt_weighting_by_hand() -> None:
    # sigma ** -2: 0.5 -> 4, 0.25 -> 16, 1 -> 1; 0 is evaluated at 1/1000 -> 1e6.
    got = loss_weighting(TimestepSettings(weighting_scheme="sigma_sqrt"), torch.tensor([0.5, 0.25, 1.0, 0.0]))
    assert got is not None
    assert torch.allclose(got, torch.tensor([4.0, 16.0, 1.0, 1e6]))
    assert got.dtype == torch.float32


def test_cosmap_weighting_by_hand() -> None:
    # 2 / (pi (1 - 2 s + 2 s^2)): s = 0.5 -> 2 / (pi 0.5) = 4 / pi; s = 0 or 1 -> 2 / pi;
    # s = 0.25 -> 1 - 0.5 + 0.125 = 0.625 -> 3.2 / pi.
    got = loss_weighting(TimestepSettings(weighting_scheme="cosmap"), torch.tensor([0.5, 0.0, 1.0, 0.25]))
    assert got is not None
    expected = torch.tensor([4.0, 2.0, 2.0, 3.2]) / math.pi
    assert torch.allclose(got, expected)


# --- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"timestep_sampling": "flux_shift"},
            "--timestep_sampling must be one of sigma, uniform, sigmoid, shift, qwen_shift, flux2_shift, "
            "logsnr; got 'flux_shift' (did you mean 'flux2_shift'?)",
        ),
        (
            {"weighting_scheme": "logit_norm"},
            "--weighting_scheme must be one of none, logit_normal, mode, cosmap, sigma_sqrt; "
            "got 'logit_norm' (did you mean 'logit_normal'?)",
        ),
        ({"discrete_flow_shift": 0.0}, "--discrete_flow_shift must be > 0, got 0.0"),
        ({"sigmoid_scale": -1.0}, "--sigmoid_scale must be > 0, got -1.0"),
        ({"logit_std": 0.0}, "--logit_std must be > 0, got 0.0"),
        ({"logit_mean": math.inf}, "--logit_mean must be a finite number, got inf"),
        (
            {"mode_scale": 2.0},
            "--mode_scale must be in range (-1, 1.75], got 2.0 "
            "(outside it the 'mode' density is not monotonic)",
        ),
        ({"min_timestep": -1}, "--min_timestep must be in range [0, 999], got -1"),
        ({"max_timestep": 1001}, "--max_timestep must be in range [1, 1000], got 1001"),
        ({"min_timestep": 500, "max_timestep": 500}, "--min_timestep (500) must be < --max_timestep (500)"),
    ],
)
def test_validation_messages(options: dict, message: str) -> None:
    with pytest.raises(TimestepOptionError) as raised:
        validate(TimestepSettings(**options))
    assert str(raised.value) == message
    assert isinstance(raised.value, ValueError)
    assert isinstance(raised.value, MaskTrainError)


def test_defaults_are_valid_and_match_musubi() -> None:
    settings = TimestepSettings()
    validate(settings)
    assert (settings.timestep_sampling, settings.discrete_flow_shift, settings.weighting_scheme) == (
        "sigma",
        1.0,
        "none",
    )
    assert (settings.logit_mean, settings.logit_std, settings.mode_scale) == (0.0, 1.0, 1.29)
    assert (settings.min_timestep, settings.max_timestep) == (0, 1000)


def test_sampling_an_unvalidated_bad_choice_raises_the_flag_message() -> None:
    with pytest.raises(TimestepOptionError, match="--timestep_sampling must be one of"):
        sample_sigmas(TimestepSettings(timestep_sampling="nope"), 2, HW, torch.Generator(), "cpu")
