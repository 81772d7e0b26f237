"""The mask flags: validation messages (the guide's table), warnings, banner and the FATAL check."""

from __future__ import annotations

import subprocess
import sys

import pytest

from masktrain import MaskTrainError
from masktrain.config.mask_loss import (
    DEFAULT_CACHE_HINT,
    MaskLossSettings,
    banner,
    require_mask_weights,
    validate,
)
from masktrain.errors import MaskOptionError, MissingMaskWeightsError

MIN_WEIGHT = "--mask_min_weight must be in range [0, 1)"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(use_mask_loss=True, mask_gamma=0.0), "--mask_gamma must be > 0"),
        (dict(use_mask_loss=True, mask_gamma=-1.0), "--mask_gamma must be > 0"),
        (dict(use_mask_loss=True, mask_gamma=float("nan")), "--mask_gamma must be > 0"),
        (dict(use_mask_loss=True, mask_min_weight=1.0), MIN_WEIGHT),
        (dict(use_mask_loss=True, mask_min_weight=-0.1), MIN_WEIGHT),
        (
            dict(use_mask_loss=True, prior_preservation_weight=-1.0),
            "--prior_preservation_weight must be >= 0",
        ),
        (
            dict(use_mask_loss=True, prior_preservation_weight=1, prior_mask_threshold=0.0),
            "--prior_mask_threshold must be in range (0, 1)",
        ),
        (
            dict(use_mask_loss=True, prior_preservation_weight=1, prior_mask_threshold=1.0),
            "--prior_mask_threshold must be in range (0, 1)",
        ),
        # Checked without --use_mask_loss too: a bad value is a typo either way.
        (dict(mask_gamma=0.0), "--mask_gamma must be > 0"),
    ],
)
def test_errors_carry_the_guides_messages(options: dict, message: str) -> None:
    with pytest.raises(MaskOptionError) as raised:  # raised when the settings are built
        validate(MaskLossSettings(**options))
    assert str(raised.value) == message
    assert isinstance(raised.value, ValueError)
    assert isinstance(raised.value, MaskTrainError)


def test_prior_preservation_requires_mask_loss() -> None:
    with pytest.raises(
        MaskOptionError, match=r"^--prior_preservation_weight > 0 requires --use_mask_loss\. "
    ):
        validate(MaskLossSettings(prior_preservation_weight=1.0))


def test_recommended_settings_have_no_warnings() -> None:
    # The guide's two recommended recipes.
    assert validate(MaskLossSettings(use_mask_loss=True, mask_gamma=0.7, mask_min_weight=0.05)) == []
    with_prior = MaskLossSettings(
        use_mask_loss=True,
        mask_gamma=0.7,
        prior_preservation_weight=1.0,
        prior_mask_threshold=0.1,
        normalize_per_sample=True,
    )
    assert validate(with_prior) == []
    assert validate(MaskLossSettings()) == []


def test_zero_floor_without_prior_warns_about_phantom_limbs() -> None:
    [warning] = validate(MaskLossSettings(use_mask_loss=True))
    assert warning.startswith(
        "--mask_min_weight 0 with --use_mask_loss and no --prior_preservation_weight: cells with mask "
        "weight 0 get no gradient at all"
    )
    assert "phantom limbs" in warning


def test_floor_with_prior_warns_with_the_reference_text() -> None:
    settings = MaskLossSettings(use_mask_loss=True, mask_min_weight=0.05, prior_preservation_weight=1.0)
    assert validate(settings) == [
        "--prior_preservation_weight=1.0 with --mask_min_weight=0.05: Non-zero mask_min_weight reduces prior "
        "preservation effect. Recommend --mask_min_weight 0.0"
    ]


def test_threshold_without_prior_warns() -> None:
    settings = MaskLossSettings(use_mask_loss=True, mask_min_weight=0.05, prior_mask_threshold=0.1)
    assert validate(settings) == [
        "--prior_mask_threshold=0.1 has no effect without --prior_preservation_weight > 0"
    ]


def test_mask_flags_without_mask_loss_warn() -> None:
    settings = MaskLossSettings(mask_gamma=0.7, normalize_per_sample=True)
    assert validate(settings) == [
        "--mask_gamma, --normalize_per_sample has no effect without --use_mask_loss"
    ]


def test_banner_with_prior_preservation() -> None:
    settings = MaskLossSettings(
        use_mask_loss=True,
        mask_gamma=0.7,
        prior_preservation_weight=1.0,
        prior_mask_threshold=0.1,
        normalize_per_sample=True,
    )
    assert banner(settings).splitlines() == [
        "=" * 60,
        "MASKED PRIOR PRESERVATION TRAINING ENABLED",
        "=" * 60,
        "  mask_min_weight: 0.0",
        "  mask_gamma: 0.7",
        "  prior_preservation_weight: 1.0",
        "  prior_mask_threshold: 0.1 (threshold mode)",
        "  normalize_per_sample: True",
        "-" * 60,
        "PRIOR PRESERVATION: Unmasked regions will match base model.",
        "                    Costs one extra no-grad forward (adapters off) per step",
        "                    whose batch has a prior region.",
        "-" * 60,
        "IMPORTANT: Masks must be baked into latent cache!",
        "If you see 'batch has no mask_weights' errors, re-run the cache:",
        "  masktrain cache --dataset_config ... (with alpha_mask = true or mask_directory set)",
        "=" * 60,
    ]
    assert "1.3-1.7x" not in banner(settings)


def test_banner_continuous_mode_with_floor_note() -> None:
    settings = MaskLossSettings(use_mask_loss=True, mask_min_weight=0.05, prior_preservation_weight=0.5)
    lines = banner(settings, "my hint").splitlines()
    assert "  prior_mask_threshold: None (continuous mode)" in lines
    assert lines[lines.index("                    whose batch has a prior region.") + 1 :][:2] == [
        "  NOTE: mask_min_weight=0.05 reduces prior effect.",
        "        Recommend --mask_min_weight 0.0 with prior preservation.",
    ]
    assert "  my hint" in lines


def test_banner_without_prior_preservation() -> None:
    settings = MaskLossSettings(use_mask_loss=True, mask_gamma=0.7, mask_min_weight=0.05)
    assert banner(settings, "  3. Re-run masktrain cache").splitlines() == [
        "=" * 60,
        "MASK-WEIGHTED LOSS TRAINING ENABLED",
        "=" * 60,
        "  mask_min_weight: 0.05",
        "  mask_gamma: 0.7",
        "  normalize_per_sample: False",
        "-" * 60,
        "IMPORTANT: Masks must be baked into latent cache!",
        "If you see 'batch has no mask_weights' errors, re-run the cache:",
        "  Re-run masktrain cache",  # a hint given with the FATAL list's "  3. " loses it here
        "=" * 60,
    ]


FATAL = [
    "FATAL: --use_mask_loss is enabled but batch has no mask_weights!",
    "This means masks were NOT baked into your latent cache.",
    "To fix:",
    "  1. Add 'alpha_mask = true' and/or 'mask_directory = \"/path/to/masks\"' in dataset TOML",
    "  2. Re-run caching: masks are stored in the cache, and changed items are rebuilt in place",
    "  3. masktrain cache --dataset_config ... (with alpha_mask = true or mask_directory set)",
    "  4. Then re-run training",
]


def test_require_mask_weights_raises_the_fatal_message() -> None:
    with pytest.raises(MissingMaskWeightsError) as raised:
        require_mask_weights(False, DEFAULT_CACHE_HINT)
    assert str(raised.value).splitlines() == FATAL
    assert isinstance(raised.value, MaskOptionError)


def test_require_mask_weights_uses_the_cache_hint() -> None:
    for hint in ("Recache with the tiny model", "  3. Recache with the tiny model"):
        with pytest.raises(MissingMaskWeightsError) as raised:
            require_mask_weights(False, hint)
        assert str(raised.value).splitlines()[5] == "  3. Recache with the tiny model"


def test_require_mask_weights_passes_with_masks() -> None:
    require_mask_weights(True, DEFAULT_CACHE_HINT)
    require_mask_weights(True)


def test_module_does_not_import_torch() -> None:
    # The CLI may build and check the flags before it imports torch.
    code = "import sys, masktrain.config.mask_loss; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
