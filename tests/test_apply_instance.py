"""``masktrain masks apply-instance``: the subject-only tiered mask against numpy and OpenCV (the
reference tool's ``cv2.dilate`` with a square kernel), the --missing policies, the aspect check (the
rule ``cache`` applies, at both edges), masks read as ``cache`` reads them (16-bit, EXIF)."""

from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from helpers import photo, read_array, save_array, tiered
from masktrain import _native
from masktrain.cli import main
from masktrain.config.masks import ApplyInstanceConfig
from masktrain.errors import AspectMismatchError, DataError
from masktrain.masks.apply_instance import run, subject_only


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
        save_array(weighted_dir / f"img{index}.png", tiered(48, 64, index))
    save_array(weighted_dir / "photo.jpg", tiered(48, 64, 9))  # JPEG weighted masks are read too
    save_array(instance_dir / "img0.png", _instance(48, 64, 0))
    save_array(instance_dir / "img1.png", _instance(24, 32, 1))  # half size: same aspect, resized
    save_array(instance_dir / "photo.png", _instance(48, 64, 3))
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
    assert np.array_equal(
        read_array(out / "img0.png"), subject_only(tiered(48, 64, 0), _instance(48, 64, 0), 1)
    )
    upsized = cv2.resize(_instance(24, 32, 1), (64, 48), interpolation=cv2.INTER_NEAREST_EXACT)
    assert np.array_equal(read_array(out / "img1.png"), subject_only(tiered(48, 64, 1), upsized, 1))
    assert not read_array(out / "img2.png").any()
    assert read_array(out / "photo.png").shape == (48, 64)

    copy = run(ApplyInstanceConfig(weighted_dir, instance_dir, tmp_path / "copy"))
    assert copy.copied == ["img2.png"] and np.array_equal(
        read_array(tmp_path / "copy" / "img2.png"), tiered(48, 64, 2)
    )
    skip = run(ApplyInstanceConfig(weighted_dir, instance_dir, tmp_path / "skip", missing="skip"))
    assert skip.skipped == ["img2.png"] and not (tmp_path / "skip" / "img2.png").exists()
    with pytest.raises(DataError, match=r"no instance mask for 1 weighted mask\(s\) \(first: img2\.png\)"):
        run(ApplyInstanceConfig(weighted_dir, instance_dir, tmp_path / "error", missing="error"))
    assert not (tmp_path / "error").exists()  # checked before anything is written


def test_an_instance_mask_of_another_aspect_is_an_error_naming_both(tmp_path: Path) -> None:
    save_array(tmp_path / "w" / "a.png", tiered(48, 64, 0))
    save_array(tmp_path / "i" / "a.png", _instance(64, 64, 0))
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


# (photo = weighted mask size, instance mask size, same aspect): exactly 1% of the photo's aspect apart
# passes and one pixel more fails, on a tall 2:3 and a wide 3:2 photo. The old absolute rule
# (|ww/wh - iw/ih| > 0.01) passed 405x600 (1.25% apart) and refused 606x400 (1%).
ASPECT_EDGES = [
    ((400, 600), (404, 600), True),
    ((400, 600), (405, 600), False),
    ((600, 400), (606, 400), True),
    ((600, 400), (607, 400), False),
]


@pytest.mark.parametrize(("photo_size", "instance_size", "same"), ASPECT_EDGES, ids=str)
def test_the_aspect_rule_is_caches_at_both_edges(
    tmp_path: Path, photo_size: tuple[int, int], instance_size: tuple[int, int], same: bool
) -> None:
    (pw, ph), (iw, ih) = photo_size, instance_size
    image = save_array(tmp_path / "images" / "a.png", photo(ph, pw, 0))
    save_array(tmp_path / "w" / "a.png", tiered(ph, pw, 0))
    save_array(tmp_path / "i" / "a.png", np.full((ih, iw), 255, np.uint8))
    # cache's decision for the photo with a mask file of the instance mask's size
    (cached,) = _native.prepare_batch(
        [image], [(64, 96), (96, 64)], mask_index=_native.MaskIndex(tmp_path / "i")
    )
    assert isinstance(cached, _native.PreparedItem if same else AspectMismatchError), cached
    config = ApplyInstanceConfig(tmp_path / "w", tmp_path / "i", tmp_path / "o")
    if same:
        assert run(config).written == 1
        assert np.array_equal(
            read_array(tmp_path / "o" / "a.png"), tiered(ph, pw, 0)
        )  # all subject: kept whole
    else:
        with pytest.raises(AspectMismatchError, match=rf"\({iw}x{ih}\) does not have the aspect ratio"):
            run(config)


def test_a_larger_instance_mask_is_shrunk_as_convert_alpha_shrinks_a_mask(tmp_path: Path) -> None:
    """Twice the weighted mask's size: OpenCV's INTER_AREA (2x2 means), then the cut at 127."""
    instance = _instance(96, 128, 4)
    save_array(tmp_path / "w" / "a.png", tiered(48, 64, 4))
    save_array(tmp_path / "i" / "a.png", instance)
    run(ApplyInstanceConfig(tmp_path / "w", tmp_path / "i", tmp_path / "o"))
    shrunk = cv2.resize(instance, (64, 48), interpolation=cv2.INTER_AREA)
    assert np.array_equal(read_array(tmp_path / "o" / "a.png"), subject_only(tiered(48, 64, 4), shrunk))


def test_16_bit_weighted_masks_keep_their_tiers(tmp_path: Path) -> None:
    """Red team N1: PIL's convert("L") turned hair (80) and body (128) of a 16-bit mask into 255."""
    weighted = np.zeros((32, 64), np.uint16)
    weighted[:, 16:32], weighted[:, 32:48], weighted[:, 48:] = 80 * 257, 128 * 257, 65535
    instance = np.full((32, 64), 255, np.uint8)
    instance[:, 56:] = 0  # a bystander's face on the right
    save_array(tmp_path / "w" / "a.png", weighted)
    save_array(tmp_path / "w" / "b.png", weighted)  # no instance mask: copied (--missing copy)
    save_array(tmp_path / "i" / "a.png", instance)
    run(ApplyInstanceConfig(tmp_path / "w", tmp_path / "i", tmp_path / "o"))
    expected = weighted.copy()
    expected[:, 56:] = 0
    with Image.open(tmp_path / "o" / "a.png") as out:
        assert out.mode == "I;16" and np.array_equal(np.asarray(out), expected)
    assert np.array_equal(_native.load_mask(tmp_path / "o" / "b.png"), weighted)
    # cache reads the copy's weights as the original's: 0, 80/255, 128/255, 1 by band
    _, original = _native.prepare_mask(tmp_path / "w" / "b.png", (64, 32), (64, 32), latent_factor=16)
    _, copied = _native.prepare_mask(tmp_path / "o" / "b.png", (64, 32), (64, 32), latent_factor=16)
    assert np.array_equal(copied, original)
    assert copied[0].tolist() == pytest.approx([0.0, 80 / 255, 128 / 255, 1.0], abs=1e-6)  # float32


def test_a_16_bit_instance_mask_is_cut_at_half_its_scale() -> None:
    weighted = tiered(48, 64, 5)
    instance = np.random.default_rng(5).integers(0, 256, (48, 64)).astype(np.uint8)
    wide = instance.astype(np.uint16) * 257  # the same mask at 16 bits
    assert np.array_equal(subject_only(weighted, wide, 1), subject_only(weighted, instance, 1))
    edge = np.array([[32767, 32768]], np.uint16)
    assert subject_only(np.array([[200, 200]], np.uint8), edge).tolist() == [[0, 200]]


def test_a_weighted_mask_is_read_upright(tmp_path: Path) -> None:
    """Red team N2: the EXIF orientation of a weighted mask was dropped, so the output lay rotated
    against the photo cache decodes (and a portrait instance mask was refused as another aspect)."""
    stored = np.zeros((32, 64), np.uint8)
    stored[:16, :32] = 255  # stored top-left, 64 wide; EXIF 6: upright 32 wide, top-right
    exif = Image.Exif()
    exif[0x0112] = 6
    (tmp_path / "w").mkdir()
    Image.fromarray(stored).save(tmp_path / "w" / "a.jpg", exif=exif.tobytes(), quality=100)
    save_array(tmp_path / "i" / "a.png", np.full((64, 32), 255, np.uint8))  # upright, as tiers writes it
    assert run(ApplyInstanceConfig(tmp_path / "w", tmp_path / "i", tmp_path / "o")).written == 1
    out = read_array(tmp_path / "o" / "a.png")
    assert out.shape == (64, 32) and np.array_equal(out, _native.load_mask(tmp_path / "w" / "a.jpg"))
    assert out[:32, 16:].mean() > 250 and out[:32, :16].mean() < 5 and out[32:].mean() < 5


def test_two_weighted_masks_with_one_basename_are_refused(tmp_path: Path) -> None:
    """Red team N20: a.jpg and a.png were both written to out/a.png, and the summary said 2 written."""
    save_array(tmp_path / "w" / "a.png", tiered(8, 8, 0))
    save_array(tmp_path / "w" / "a.jpg", tiered(8, 8, 1))
    save_array(tmp_path / "i" / "a.png", np.full((8, 8), 255, np.uint8))
    with pytest.raises(DataError, match=r"--weighted-masks .*: a\.jpg and a\.png would both make a\.png"):
        run(ApplyInstanceConfig(tmp_path / "w", tmp_path / "i", tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_dilate_is_cv2s_square_dilation_at_a_cost_that_does_not_grow_with_n() -> None:
    """Red team N19: --dilate N cost O(N²) a pixel (PIL's MaxFilter): 19 s at N = 60 on two 0.5 MP
    masks. Now a running count along the rows, then the columns: exactly ``cv2.dilate``'s square for
    every N (the border does not grow the mask; N past the mask's size), in time that does not grow
    with N."""
    import time

    from masktrain.masks.apply_instance import dilate

    rng = np.random.default_rng(7)
    masks = [_instance(48, 64, 1), _instance(1, 9, 2), _instance(9, 1, 3), np.zeros((5, 7), np.uint8)]
    masks += [np.where(rng.random((37, 53)) < p, 255, 0).astype(np.uint8) for p in (0.002, 0.05, 0.5)]
    for binary in masks:
        binary = ((binary > 127) * 255).astype(np.uint8)
        for pixels in (0, 1, 2, 5, 17, 60):
            square = np.ones((2 * pixels + 1, 2 * pixels + 1), np.uint8)
            assert np.array_equal(dilate(binary, pixels), cv2.dilate(binary, square)), (binary.shape, pixels)
    large = np.where(rng.random((1024, 512)) < 0.001, 255, 0).astype(np.uint8)  # the report's 0.5 MP mask
    for pixels in (60, 500):
        start = time.perf_counter()
        grown = dilate(large, pixels)
        assert time.perf_counter() - start < 1.0, pixels  # PIL's MaxFilter: 3.5 s at 60 on this machine
    square = np.ones((1001, 1001), np.uint8)
    assert np.array_equal(grown, cv2.dilate(large, square))
