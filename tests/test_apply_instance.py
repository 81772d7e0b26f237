"""``masktrain masks apply-instance``: the subject-only tiered mask against numpy and OpenCV (the
reference tool's ``cv2.dilate`` with a square kernel), the --missing policies, the aspect check."""

from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from helpers import tiered
from masktrain.cli import main
from masktrain.config.masks import ApplyInstanceConfig
from masktrain.errors import AspectMismatchError, DataError
from masktrain.masks.apply_instance import run, subject_only


def _save(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _read(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


def _instance(h: int, w: int, seed: int) -> np.ndarray:
    """A blob of the subject (255) with a few grey pixels (127 and 128, around the 127 cut)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    mask = np.where(((x - w * 0.4) / (w * 0.3)) ** 2 + ((y - h * 0.5) / (h * 0.4)) ** 2 < 1, 255, 0)
    mask = mask.astype(np.uint8)
    mask[rng.integers(0, h, 20), rng.integers(0, w, 20)] = rng.choice([127, 128], 20)
    return mask


@pytest.mark.parametrize("pixels", [0, 1, 3])
def test_subject_only_is_the_reference_tools_arithmetic(pixels: int) -> None:
    weighted, instance = tiered(48, 64, 1), _instance(48, 64, 2)
    binary = ((instance > 127) * 255).astype(np.uint8)
    if pixels:
        binary = cv2.dilate(binary, np.ones((2 * pixels + 1, 2 * pixels + 1), np.uint8))
    expected = weighted.copy()
    expected[binary <= 127] = 0  # out = wmask.copy(); out[imask <= 127] = 0
    assert np.array_equal(subject_only(weighted, instance, pixels), expected)
    assert (expected == 0).sum() > (weighted == 0).sum()  # a bystander region was cut


def test_the_command_writes_subject_only_masks_and_applies_the_missing_policy(tmp_path: Path) -> None:
    weighted_dir, instance_dir, out = tmp_path / "weighted", tmp_path / "instance", tmp_path / "out"
    for index in range(3):
        _save(weighted_dir / f"img{index}.png", tiered(48, 64, index))
    _save(weighted_dir / "photo.jpg", tiered(48, 64, 9))  # JPEG weighted masks are read too
    _save(instance_dir / "img0.png", _instance(48, 64, 0))
    _save(instance_dir / "img1.png", _instance(24, 32, 1))  # half size: same aspect, resized
    _save(instance_dir / "photo.png", _instance(48, 64, 3))
    result = CliRunner().invoke(
        main,
        [
            "masks",
            "apply-instance",
            "--weighted-masks",
            str(weighted_dir),
            "--instance-masks",
            str(instance_dir),
            "--output",
            str(out),
            "--dilate",
            "1",
            "--missing",
            "zero",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "4 written (0 copied and 1 zeroed without an instance mask), 0 skipped" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["img0.png", "img1.png", "img2.png", "photo.png"]
    assert np.array_equal(_read(out / "img0.png"), subject_only(tiered(48, 64, 0), _instance(48, 64, 0), 1))
    upsized = cv2.resize(_instance(24, 32, 1), (64, 48), interpolation=cv2.INTER_NEAREST_EXACT)
    assert np.array_equal(_read(out / "img1.png"), subject_only(tiered(48, 64, 1), upsized, 1))
    assert not _read(out / "img2.png").any()
    assert _read(out / "photo.png").shape == (48, 64)

    copy = run(ApplyInstanceConfig(weighted_dir, instance_dir, tmp_path / "copy"))
    assert copy.copied == ["img2.png"] and np.array_equal(
        _read(tmp_path / "copy" / "img2.png"), tiered(48, 64, 2)
    )
    skip = run(ApplyInstanceConfig(weighted_dir, instance_dir, tmp_path / "skip", missing="skip"))
    assert skip.skipped == ["img2.png"] and not (tmp_path / "skip" / "img2.png").exists()
    with pytest.raises(DataError, match=r"no instance mask for 1 weighted mask\(s\) \(first: img2\.png\)"):
        run(ApplyInstanceConfig(weighted_dir, instance_dir, tmp_path / "error", missing="error"))
    assert not (tmp_path / "error").exists()  # checked before anything is written


def test_an_instance_mask_of_another_aspect_is_an_error_naming_both(tmp_path: Path) -> None:
    _save(tmp_path / "w" / "a.png", tiered(48, 64, 0))
    _save(tmp_path / "i" / "a.png", _instance(64, 64, 0))
    with pytest.raises(
        AspectMismatchError,
        match=r"i/a\.png \(64x64\) does not have the aspect ratio of .*w/a\.png \(64x48\)",
    ):
        run(ApplyInstanceConfig(tmp_path / "w", tmp_path / "i", tmp_path / "o"))
    result = CliRunner().invoke(
        main,
        [
            "masks",
            "apply-instance",
            "--weighted-masks",
            str(tmp_path / "w"),
            "--instance-masks",
            str(tmp_path / "i"),
            "--output",
            str(tmp_path / "w"),
        ],
    )
    assert result.exit_code == 2 and "--output is --weighted-masks" in result.output
