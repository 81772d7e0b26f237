"""`masktrain convert-alpha` end to end, run as a real subprocess on folders generated here.

Every expected pixel comes from an independent reference (PIL, OpenCV, numpy), never from the
native module under test.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

H, W = 48, 64
#: JPEG decoders (libjpeg in PIL, the Rust core's decoder) may differ by a couple of levels
#: after the IDCT; at 4:4:4 and quality 95 the measured difference is at most 2.
JPEG_TOLERANCE = 3


# --- image generation ----------------------------------------------------------------------


def rgb(seed: int, h: int = H, w: int = W, dtype: type = np.uint8) -> np.ndarray:
    top = np.iinfo(dtype).max
    return np.random.default_rng(seed).integers(0, top + 1, (h, w, 3), dtype=dtype)


def gray(seed: int, h: int = H, w: int = W, dtype: type = np.uint8) -> np.ndarray:
    top = np.iinfo(dtype).max
    return np.random.default_rng(seed).integers(0, top + 1, (h, w), dtype=dtype)


def save_cv2(path: Path, array: np.ndarray) -> None:
    """Write with OpenCV (for 16-bit PNGs); `array` is RGB or gray, converted to OpenCV's BGR."""
    if array.ndim == 3:
        array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    ok, encoded = cv2.imencode(path.suffix, array)
    assert ok
    path.write_bytes(encoded.tobytes())


def rgba_with_hidden_colour(seed: int) -> Image.Image:
    """RGBA whose left half is fully transparent but not black: the RGB there must survive."""
    pixels = np.dstack([rgb(seed), gray(seed + 1)])
    pixels[:, : W // 2, 3] = 0
    assert pixels[:, : W // 2, :3].any()
    return Image.fromarray(pixels, "RGBA")


def palette_image(seed: int) -> Image.Image:
    image = Image.fromarray(np.random.default_rng(seed).integers(0, 16, (H, W), dtype=np.uint8), "P")
    image.putpalette(np.random.default_rng(seed + 1).integers(0, 256, 16 * 3, dtype=np.uint8).tobytes())
    return image


@dataclass
class Expected:
    rgb: np.ndarray
    alpha: np.ndarray
    sixteen_bit: bool = False
    tolerance: int = 0


def build_mixed(root: Path) -> tuple[Path, Path, dict[str, Expected]]:
    """The issue's mixed folder. Returns (images, masks, expected outputs by stem)."""
    images, masks = root / "images", root / "masks"
    images.mkdir()
    masks.mkdir()
    expected: dict[str, Expected] = {}

    # RGBA: RGB as stored (not composited); gray mask exactly.
    source = rgba_with_hidden_colour(1)
    source.save(images / "rgba.png")
    Image.fromarray(gray(2), "L").save(masks / "rgba.png")
    expected["rgba"] = Expected(np.asarray(source)[..., :3], gray(2))

    # LA: gray replicated; an RGB mask becomes PIL's convert("L").
    la = Image.fromarray(np.dstack([gray(3), gray(4)]), "LA")
    la.save(images / "la.png")
    colour_mask = Image.fromarray(rgb(5), "RGB")
    colour_mask.save(masks / "la.png")
    expected["la"] = Expected(np.repeat(gray(3)[..., None], 3, axis=2), np.asarray(colour_mask.convert("L")))

    # Palette, with a same-aspect mask at 3/4 size: enlarged like PIL's NEAREST.
    palette = palette_image(6)
    palette.save(images / "palette.png")
    small = Image.fromarray(gray(7, H * 3 // 4, W * 3 // 4), "L")
    small.save(masks / "palette.png")
    expected["palette"] = Expected(
        np.asarray(palette.convert("RGB")), np.asarray(small.resize((W, H), Image.Resampling.NEAREST))
    )

    # 16-bit image + 8-bit mask: a 16-bit output, the mask widened exactly (v * 257).
    save_cv2(images / "deep.png", rgb(8, dtype=np.uint16))
    Image.fromarray(gray(9), "L").save(masks / "deep.png")
    expected["deep"] = Expected(rgb(8, dtype=np.uint16), gray(9).astype(np.uint16) * 257, sixteen_bit=True)

    # 8-bit image + 16-bit mask: a 16-bit output, the RGB widened exactly.
    Image.fromarray(rgb(10)).save(images / "deepmask.png")
    save_cv2(masks / "deepmask.png", gray(11, dtype=np.uint16))
    expected["deepmask"] = Expected(
        rgb(10).astype(np.uint16) * 257, gray(11, dtype=np.uint16), sixteen_bit=True
    )

    # JPEG (4:4:4), compared with PIL's decode within JPEG_TOLERANCE.
    Image.fromarray(rgb(12)).save(images / "photo.jpg", quality=95, subsampling=0)
    Image.fromarray(gray(13), "L").save(masks / "photo.png")
    jpeg = np.asarray(Image.open(images / "photo.jpg").convert("RGB"))
    expected["photo"] = Expected(jpeg, gray(13), tolerance=JPEG_TOLERANCE)

    # Lossless WebP image and WebP mask.
    Image.fromarray(rgb(14)).save(images / "web.webp", lossless=True)
    Image.fromarray(gray(15), "L").save(masks / "web.webp", lossless=True)
    expected["web"] = Expected(rgb(14), gray(15))

    # Upper-case extensions: the output is still {stem}.png.
    Image.fromarray(rgb(16)).save(images / "SHOUT.PNG", format="PNG")
    Image.fromarray(gray(17), "L").save(masks / "SHOUT.BMP", format="BMP")
    (images / "SHOUT.txt").write_text("loud caption", encoding="utf-8")
    expected["SHOUT"] = Expected(rgb(16), gray(17))

    # Unicode stem, with a unicode caption.
    Image.fromarray(rgb(18)).save(images / "café_ü.png")
    Image.fromarray(gray(19), "L").save(masks / "café_ü.png")
    (images / "café_ü.txt").write_text("crème brûlée, ü", encoding="utf-8")
    expected["café_ü"] = Expected(rgb(18), gray(19))

    # Failures and misses: no mask; aspect off by far more than 1%; truncated; duplicate mask stem.
    Image.fromarray(rgb(20)).save(images / "lonely.png")
    (images / "lonely.txt").write_text("never copied", encoding="utf-8")
    Image.fromarray(rgb(21)).save(images / "skewed.png")
    Image.fromarray(gray(22, W, W), "L").save(masks / "skewed.png")
    (images / "skewed.txt").write_text("never copied", encoding="utf-8")
    Image.fromarray(rgb(23)).save(images / "broken.png")
    whole = (images / "broken.png").read_bytes()
    (images / "broken.png").write_bytes(whole[: len(whole) // 2])
    Image.fromarray(gray(24), "L").save(masks / "broken.png")
    Image.fromarray(rgb(25)).save(images / "twin.png")
    Image.fromarray(gray(26), "L").save(masks / "twin.png")
    Image.fromarray(gray(26), "L").save(masks / "twin.jpg")

    (images / "notes.md").write_text("not an image", encoding="utf-8")
    (images / "rgba.txt").write_text("a caption", encoding="utf-8")
    return images, masks, expected


def build_clean(root: Path, stems: tuple[str, ...] = ("a", "b", "c")) -> tuple[Path, Path]:
    images, masks = root / "images", root / "masks"
    images.mkdir()
    masks.mkdir()
    for seed, stem in enumerate(stems):
        Image.fromarray(rgb(100 + seed)).save(images / f"{stem}.png")
        Image.fromarray(gray(200 + seed), "L").save(masks / f"{stem}.png")
        (images / f"{stem}.txt").write_text(f"caption {stem}", encoding="utf-8")
    return images, masks


# --- running and reading -------------------------------------------------------------------


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUTF8": "1"}
    return subprocess.run(
        [sys.executable, "-m", "masktrain.cli", "convert-alpha", *map(str, args)],
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=env,
        timeout=120,
    )


def convert(images: Path, masks: Path, out: Path, *extra: str | Path) -> subprocess.CompletedProcess[str]:
    return run_cli("--image_directory", images, "--mask_directory", masks, "--output_directory", out, *extra)


def summary(converted: int, skipped: int, missing: int, failed: int) -> str:
    return f"convert-alpha: {converted} converted, {skipped} skipped, {missing} missing mask, {failed} failed"


def read_rgba(path: Path, sixteen_bit: bool) -> np.ndarray:
    """8-bit outputs through PIL; 16-bit ones through OpenCV, which keeps all 16 bits."""
    if not sixteen_bit:
        with Image.open(path) as image:
            assert (image.format, image.mode) == ("PNG", "RGBA"), path
            return np.asarray(image)
    pixels = cv2.imdecode(np.frombuffer(path.read_bytes(), np.uint8), cv2.IMREAD_UNCHANGED)
    assert pixels.dtype == np.uint16 and pixels.shape[2] == 4, path
    return cv2.cvtColor(pixels, cv2.COLOR_BGRA2RGBA)


def file_names(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


# --- tests ---------------------------------------------------------------------------------


def test_mixed_folder_converts_exactly_the_expected_files_and_summary(tmp_path: Path) -> None:
    images, masks, expected = build_mixed(tmp_path)
    out = tmp_path / "out"

    result = convert(images, masks, out)

    assert result.returncode == 1, result.stderr
    captions = {"rgba.txt", "SHOUT.txt", "café_ü.txt"}
    assert file_names(out) == {f"{stem}.png" for stem in expected} | captions
    for stem, want in expected.items():
        got = read_rgba(out / f"{stem}.png", want.sixteen_bit)
        assert got.shape == (H, W, 4), stem
        rgb_diff = np.abs(got[..., :3].astype(np.int64) - want.rgb.astype(np.int64)).max()
        assert rgb_diff <= want.tolerance, f"{stem}: RGB differs by {rgb_diff}"
        np.testing.assert_array_equal(got[..., 3], want.alpha, err_msg=stem)
    assert (out / "rgba.txt").read_text(encoding="utf-8") == "a caption"
    assert (out / "SHOUT.txt").read_text(encoding="utf-8") == "loud caption"
    assert (out / "café_ü.txt").read_text(encoding="utf-8") == "crème brûlée, ü"

    stderr = result.stderr
    assert summary(9, 0, 1, 3) in stderr
    # The progress bar ran over every paired item: 9 converted plus the truncated and skewed ones.
    assert "11/11" in stderr
    assert "lonely.png" in stderr
    failures = {line for line in stderr.splitlines() if line.startswith("ERROR: failed: ")}
    assert len(failures) == 3, stderr
    (skewed,) = [line for line in failures if f"{images / 'skewed.png'}:" in line]
    assert "aspect" in skewed and "64x48" in skewed and "64x64" in skewed
    (broken,) = [line for line in failures if f"{images / 'broken.png'}:" in line]
    assert "truncated" in broken
    (twin,) = [line for line in failures if f"{images / 'twin.png'}:" in line]
    assert "duplicate" in twin and str(masks / "twin.png") in twin and str(masks / "twin.jpg") in twin


def test_clean_folder_exits_zero_with_dashed_aliases(tmp_path: Path) -> None:
    images, masks = build_clean(tmp_path)
    out = tmp_path / "nested" / "out"

    result = run_cli("--image-directory", images, "--mask-directory", masks, "--output-directory", out)

    assert result.returncode == 0, result.stderr
    assert summary(3, 0, 0, 0) in result.stderr
    assert file_names(out) == {"a.png", "b.png", "c.png", "a.txt", "b.txt", "c.txt"}
    got = read_rgba(out / "b.png", sixteen_bit=False)
    np.testing.assert_array_equal(got[..., :3], rgb(101))
    np.testing.assert_array_equal(got[..., 3], gray(201))


def test_caption_directory_and_extension_are_honoured(tmp_path: Path) -> None:
    images, masks = build_clean(tmp_path, ("a", "b"))
    captions = tmp_path / "captions"
    captions.mkdir()
    (captions / "a.caption").write_text("from the caption directory", encoding="utf-8")
    (captions / "b.txt").write_text("wrong extension", encoding="utf-8")

    for flags in (
        ("--caption_directory", captions, "--caption_extension", ".caption"),
        ("--caption-directory", captions, "--caption-extension", ".caption"),
    ):
        out = tmp_path / f"out{flags[0]}"
        result = convert(images, masks, out, *flags)
        assert result.returncode == 0, result.stderr
        # The image directory's .txt captions are not the ones asked for.
        assert file_names(out) == {"a.png", "b.png", "a.caption"}
        assert (out / "a.caption").read_text(encoding="utf-8") == "from the caption directory"


def test_dry_run_writes_nothing(tmp_path: Path) -> None:
    images, masks = build_clean(tmp_path)
    for flag in ("--dry_run", "--dry-run"):
        out = tmp_path / "out"
        result = convert(images, masks, out, flag)
        assert result.returncode == 0, result.stderr
        assert not out.exists()
        assert "Would merge" in result.stderr
        assert summary(0, 0, 0, 0) in result.stderr


def test_skip_existing_skips_and_a_plain_run_reconverts(tmp_path: Path) -> None:
    images, masks = build_clean(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.png").write_bytes(b"kept as is")
    (out / "b.png").write_bytes(b"kept as is")

    # The second run finds c.png from the first one too.
    for flag, counts in (("--skip_existing", (1, 2, 0, 0)), ("--skip-existing", (0, 3, 0, 0))):
        result = convert(images, masks, out, flag)
        assert result.returncode == 0, result.stderr
        assert summary(*counts) in result.stderr
        assert (out / "a.png").read_bytes() == b"kept as is"
        assert (out / "b.png").read_bytes() == b"kept as is"
        assert not (out / "a.txt").exists()
        assert (out / "c.txt").exists()

    result = convert(images, masks, out)
    assert result.returncode == 0, result.stderr
    assert summary(3, 0, 0, 0) in result.stderr
    np.testing.assert_array_equal(read_rgba(out / "a.png", sixteen_bit=False)[..., 3], gray(200))
    assert file_names(out) == {"a.png", "b.png", "c.png", "a.txt", "b.txt", "c.txt"}


def test_stale_temporary_files_are_removed(tmp_path: Path) -> None:
    images, masks = build_clean(tmp_path, ("a",))
    out = tmp_path / "out"
    out.mkdir()
    (out / ".a.png.4242.ThreadId7.masktrain-tmp").write_bytes(b"torn")

    result = convert(images, masks, out)

    assert result.returncode == 0, result.stderr
    assert file_names(out) == {"a.png", "a.txt"}


def test_unicode_stems_round_trip(tmp_path: Path) -> None:
    stems = ("café_ü", "日本語", "naïve space")
    images, masks = build_clean(tmp_path, stems)
    out = tmp_path / "out"

    result = convert(images, masks, out)

    assert result.returncode == 0, result.stderr
    assert file_names(out) == {f"{s}{ext}" for s in stems for ext in (".png", ".txt")}
    for seed, stem in enumerate(stems):
        got = read_rgba(out / f"{stem}.png", sixteen_bit=False)
        np.testing.assert_array_equal(got[..., :3], rgb(100 + seed))
        np.testing.assert_array_equal(got[..., 3], gray(200 + seed))
        assert (out / f"{stem}.txt").read_text(encoding="utf-8") == f"caption {stem}"


def test_mask_within_one_percent_aspect_is_stretched_onto_the_image(tmp_path: Path) -> None:
    images, masks = build_clean(tmp_path, ("a",))
    # 2.01 against 2.0 is 0.5% off: accepted, and shrunk with OpenCV's INTER_AREA.
    big = gray(300, 100, 201)
    Image.fromarray(big, "L").save(masks / "a.png")
    Image.fromarray(rgb(301, 50, 100)).save(images / "a.png")
    out = tmp_path / "out"

    result = convert(images, masks, out)

    assert result.returncode == 0, result.stderr
    got = read_rgba(out / "a.png", sixteen_bit=False)
    np.testing.assert_array_equal(got[..., :3], rgb(301, 50, 100))
    np.testing.assert_array_equal(got[..., 3], cv2.resize(big, (100, 50), interpolation=cv2.INTER_AREA))


@pytest.mark.skipif(sys.platform != "linux", reason="needs a file system that allows non-UTF-8 names")
def test_a_non_utf8_file_name_fails_alone(tmp_path: Path) -> None:
    images, masks = build_clean(tmp_path, ("a",))
    bad = b"bad\xff.png"
    Image.fromarray(rgb(400)).save(os.path.join(os.fsencode(images), bad), format="PNG")
    Image.fromarray(gray(401), "L").save(os.path.join(os.fsencode(masks), bad), format="PNG")
    out = tmp_path / "out"

    result = convert(images, masks, out)

    assert result.returncode == 1, result.stderr
    assert summary(1, 0, 0, 1) in result.stderr
    assert "not valid UTF-8" in result.stderr
    assert file_names(out) == {"a.png", "a.txt"}


@pytest.mark.parametrize("missing", ["--image_directory", "--mask_directory"])
def test_missing_input_directory_is_a_usage_error(tmp_path: Path, missing: str) -> None:
    images, masks = build_clean(tmp_path)
    dirs = {"--image_directory": images, "--mask_directory": masks}
    dirs[missing] = tmp_path / "does-not-exist"
    out = tmp_path / "out"

    result = run_cli(*[x for pair in dirs.items() for x in pair], "--output_directory", out)

    assert result.returncode == 2
    assert missing in result.stderr
    assert "does-not-exist" in result.stderr
    assert not out.exists()


@pytest.mark.parametrize("same_as", ["images", "masks"])
def test_output_directory_equal_to_an_input_is_a_usage_error(tmp_path: Path, same_as: str) -> None:
    images, masks = build_clean(tmp_path)
    before = {p.name: p.read_bytes() for p in (images if same_as == "images" else masks).iterdir()}
    out = images if same_as == "images" else masks

    result = convert(images, masks, out)

    assert result.returncode == 2
    assert "--output_directory" in result.stderr and "overwrite the originals" in result.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_importing_the_cli_leaves_torch_out() -> None:
    code = "import sys, masktrain.cli; assert 'torch' not in sys.modules, 'torch imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
