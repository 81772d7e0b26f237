"""Decoding against PIL / OpenCV: exact RGB, alpha of every mode that carries it, mask luma,
16-bit precision, EXIF orientation, and the formats users have."""

from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from masktrain import _native


def photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_rgba_alpha_and_exact_rgb_never_composited(tmp_path: Path) -> None:
    rgba = np.dstack([photo(20, 30), np.random.default_rng(1).integers(0, 256, (20, 30), dtype=np.uint8)])
    rgba[:5, :, 3] = 0  # transparent, but RGB is not black there
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    rgb, alpha = _native.decode_image(tmp_path / "a.png")
    np.testing.assert_array_equal(rgb, rgba[..., :3])
    np.testing.assert_array_equal(alpha, np.array(Image.open(tmp_path / "a.png").getchannel("A")))


def test_la_alpha(tmp_path: Path) -> None:
    la = np.random.default_rng(2).integers(0, 256, (16, 12, 2), dtype=np.uint8)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    rgb, alpha = _native.decode_image(tmp_path / "la.png")
    pil = Image.open(tmp_path / "la.png")
    np.testing.assert_array_equal(alpha, np.array(pil.getchannel("A")))
    np.testing.assert_array_equal(rgb, np.array(pil.convert("RGB")))


def test_palette_with_trns_alpha(tmp_path: Path) -> None:
    indices = np.random.default_rng(3).integers(0, 4, (10, 14), dtype=np.uint8)
    image = Image.fromarray(indices, "P")
    image.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 200, 200, 200])
    image.info["transparency"] = bytes([0, 128, 255, 64])
    image.save(tmp_path / "p.png", transparency=bytes([0, 128, 255, 64]))
    rgb, alpha = _native.decode_image(tmp_path / "p.png")
    pil = Image.open(tmp_path / "p.png").convert("RGBA")
    np.testing.assert_array_equal(alpha, np.array(pil.getchannel("A")))
    np.testing.assert_array_equal(rgb, np.array(pil)[..., :3])


def test_palette_without_transparency_has_no_alpha(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((4, 4), np.uint8), "P").save(tmp_path / "p.png")
    _, alpha = _native.decode_image(tmp_path / "p.png")
    assert alpha is None


def test_sixteen_bit_rgba_keeps_alpha_precision(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    rgba16 = rng.integers(0, 65536, (9, 11, 4), dtype=np.uint16)
    cv2.imwrite(str(tmp_path / "a16.png"), rgba16[..., [2, 1, 0, 3]])  # OpenCV writes BGRA
    rgb, alpha = _native.decode_image(tmp_path / "a16.png")
    assert alpha is not None and alpha.dtype == np.uint16
    np.testing.assert_array_equal(alpha, rgba16[..., 3])
    # RGB to 8 bits rounds: round(v / 257).
    np.testing.assert_array_equal(rgb, ((rgba16[..., :3].astype(np.uint32) + 128) // 257).astype(np.uint8))


def test_rgb_mask_luma_matches_pil_convert_l(tmp_path: Path) -> None:
    rgb = photo(33, 47, seed=5)
    for name in ("m.png", "m.bmp", "m.webp"):
        path = tmp_path / name
        Image.fromarray(rgb).save(path, **({"lossless": True} if name.endswith("webp") else {}))
        np.testing.assert_array_equal(_native.load_mask(path), np.array(Image.open(path).convert("L")), name)
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 7, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(
        _native.load_mask(tmp_path / "rgba.png"), np.array(Image.open(tmp_path / "rgba.png").convert("L"))
    )


def test_gray_and_palette_masks(tmp_path: Path) -> None:
    gray = np.random.default_rng(6).integers(0, 256, (8, 9), dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / "g.png")
    np.testing.assert_array_equal(_native.load_mask(tmp_path / "g.png"), gray)
    p = Image.fromarray(gray // 64, "P")
    p.putpalette([0, 0, 0, 80, 80, 80, 128, 128, 128, 255, 255, 255])
    p.save(tmp_path / "p.png")
    np.testing.assert_array_equal(_native.load_mask(tmp_path / "p.png"), np.array(p.convert("L")))


def test_sixteen_bit_mask_is_not_clipped(tmp_path: Path) -> None:
    mask16 = np.array([[0, 257, 32768, 65535], [1000, 20000, 40000, 60000]], np.uint16)
    cv2.imwrite(str(tmp_path / "m16.png"), mask16)
    ours = _native.load_mask(tmp_path / "m16.png")
    assert ours.dtype == np.uint16
    np.testing.assert_array_equal(ours, mask16)
    # The reference's PIL convert("L") clips 16-bit values: everything >= 255 becomes 255.
    assert np.array(Image.open(tmp_path / "m16.png").convert("L")).max() == 255


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("suffix", [".png", ".webp", ".jpg"])
def test_exif_orientation_matches_pil_exif_transpose(tmp_path: Path, orientation: int, suffix: str) -> None:
    rgb = np.zeros((12, 20, 3), np.uint8)
    rgb[:6, :10] = (250, 10, 10)  # a marked corner makes every transform distinguishable
    rgb[6:, 15:] = (10, 250, 10)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"o{orientation}{suffix}"
    options = {"lossless": True} if suffix == ".webp" else {"quality": 95} if suffix == ".jpg" else {}
    Image.fromarray(rgb).save(path, exif=exif, **options)
    ours, _ = _native.decode_image(path)
    theirs = np.array(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
    assert ours.shape == theirs.shape
    # PNG and lossless WebP decode identically; JPEG decoders (zune-jpeg vs libjpeg-turbo)
    # differ by a few levels, so JPEG gets a tolerance.
    tolerance = 6 if suffix == ".jpg" else 0
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= tolerance


def test_exif_orientation_applies_to_masks(tmp_path: Path) -> None:
    mask = np.zeros((4, 8), np.uint8)
    mask[0, 0] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 clockwise to display
    Image.fromarray(mask).save(tmp_path / "m.png", exif=exif)
    ours = _native.load_mask(tmp_path / "m.png")
    np.testing.assert_array_equal(ours, np.array(ImageOps.exif_transpose(Image.open(tmp_path / "m.png"))))
    assert ours.shape == (8, 4)


def test_jpeg_decode_close_to_pil(tmp_path: Path) -> None:
    y, x = np.mgrid[0:64, 0:96]
    rgb = np.stack([x * 2, y * 3, (x + y) % 255], -1).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.jpg", quality=90)
    ours, alpha = _native.decode_image(tmp_path / "a.jpg")
    assert alpha is None
    theirs = np.array(Image.open(tmp_path / "a.jpg"))
    assert np.abs(ours.astype(int) - theirs.astype(int)).mean() < 1.0


def test_upper_case_extensions_and_bmp(tmp_path: Path) -> None:
    # PIL writes RGBA as a 32-bit BI_RGB BMP, whose fourth byte is not alpha; PIL reads it back
    # as RGB and so do we.
    rgba = np.dstack([photo(6, 5, 8), np.arange(30, dtype=np.uint8).reshape(6, 5) * 8])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "A.BMP")
    rgb, alpha = _native.decode_image(tmp_path / "A.BMP")
    pil = Image.open(tmp_path / "A.BMP")
    assert alpha is None and pil.mode == "RGB"
    np.testing.assert_array_equal(rgb, np.array(pil))
    assert [p.name for p in _native.list_images(tmp_path)] == ["A.BMP"]
