"""Every bad input of DESIGN.md's reliability rules gets a typed error naming the file; the
classes are `masktrain.errors`' own, whether Rust or Python raised them."""

import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from masktrain import _native
from masktrain.errors import (
    AspectMismatchError,
    DuplicateMaskError,
    ImageDecodeError,
    ImageTooLargeError,
    MaskTrainError,
    MissingMaskError,
    UnsupportedFormatError,
)


def png_bytes(array: np.ndarray) -> bytes:
    from io import BytesIO

    buffer = BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def gradient(h: int = 64, w: int = 96) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 2, y * 3, (x * y) % 256], -1).astype(np.uint8)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height but carries one tiny IDAT: a bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".webp", ".bmp"])
def test_truncated_files_are_decode_errors(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"cut{suffix}"
    Image.fromarray(gradient()).save(path, **({"quality": 90} if suffix != ".png" else {}))
    data = path.read_bytes()
    for fraction in (0.5, 0.9):
        path.write_bytes(data[: int(len(data) * fraction)])
        with pytest.raises(ImageDecodeError, match="cut"):
            _native.decode_image(path)


def test_progressive_jpeg_decodes_and_its_truncation_is_caught(tmp_path: Path) -> None:
    path = tmp_path / "prog.jpg"
    Image.fromarray(gradient()).save(path, quality=90, progressive=True)
    rgb, _ = _native.decode_image(path)
    assert np.abs(rgb.astype(int) - np.array(Image.open(path)).astype(int)).mean() < 1.0
    path.write_bytes(path.read_bytes()[:-300])
    with pytest.raises(ImageDecodeError):
        _native.decode_image(path)


def test_zero_byte_file(tmp_path: Path) -> None:
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageDecodeError, match=r"empty\.png: file is empty"):
        _native.decode_image(tmp_path / "empty.png")


def test_corrupt_and_unsupported(tmp_path: Path) -> None:
    good = png_bytes(gradient())
    corrupt = bytearray(good)
    corrupt[60:200] = os.urandom(140)
    (tmp_path / "corrupt.png").write_bytes(bytes(corrupt))
    with pytest.raises(ImageDecodeError, match="corrupt"):
        _native.decode_image(tmp_path / "corrupt.png")
    (tmp_path / "notes.png").write_text("not an image at all")
    with pytest.raises(UnsupportedFormatError, match=r"notes\.png"):
        _native.decode_image(tmp_path / "notes.png")
    Image.fromarray(gradient()).save(tmp_path / "anim.gif")
    with pytest.raises(UnsupportedFormatError, match=r"anim\.gif"):
        _native.load_mask(tmp_path / "anim.gif")


def test_decompression_bomb_is_refused_before_decoding(tmp_path: Path) -> None:
    (tmp_path / "bomb.png").write_bytes(png_header_only(40_000, 40_000))
    with pytest.raises(ImageTooLargeError, match=r"bomb\.png: image is 40000x40000"):
        _native.decode_image(tmp_path / "bomb.png")
    (tmp_path / "small.png").write_bytes(png_bytes(gradient()))
    with pytest.raises(ImageTooLargeError):
        _native.decode_image(tmp_path / "small.png", pixel_limit=1000)
    _native.decode_image(tmp_path / "small.png", pixel_limit=64 * 96)


def test_missing_files_and_directories_are_os_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        _native.decode_image(tmp_path / "nope.png")
    assert info.value.filename == str(tmp_path / "nope.png")
    with pytest.raises(FileNotFoundError):
        _native.MaskIndex(tmp_path / "no_masks")
    with pytest.raises(FileNotFoundError):
        _native.list_images(tmp_path / "no_images")


def test_a_file_where_a_directory_belongs_is_an_os_error_naming_it(tmp_path: Path) -> None:
    # Root reads everything, so "unreadable directory" is exercised with a path that is a file.
    not_a_dir = tmp_path / "masks.txt"
    not_a_dir.write_text("x")
    with pytest.raises(OSError) as info:
        _native.MaskIndex(not_a_dir)
    assert info.value.filename == str(not_a_dir)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files regardless of permissions")
def test_unreadable_file_is_permission_error(tmp_path: Path) -> None:
    path = tmp_path / "locked.png"
    path.write_bytes(png_bytes(gradient()))
    path.chmod(0)
    with pytest.raises(PermissionError):
        _native.decode_image(path)


def test_errors_are_value_errors_for_callers_that_catch_broadly() -> None:
    for error in (ImageDecodeError, AspectMismatchError, DuplicateMaskError):
        assert issubclass(error, MaskTrainError)
        assert issubclass(error, ValueError)


def test_per_item_errors_in_a_batch(tmp_path: Path) -> None:
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    Image.fromarray(gradient(64, 96)).save(images / "good.png")
    Image.fromarray(gradient(64, 96)).save(images / "skewed.png")
    Image.fromarray(gradient(64, 96)).save(images / "twin.png")
    Image.fromarray(gradient(64, 96)).save(images / "bare.png")
    (images / "cut.png").write_bytes(png_bytes(gradient())[:300])
    Image.fromarray(np.full((32, 48), 200, np.uint8)).save(masks / "good.png")  # same aspect, half size
    Image.fromarray(np.full((64, 64), 200, np.uint8)).save(masks / "skewed.png")
    Image.fromarray(np.full((64, 96), 200, np.uint8)).save(masks / "twin.png")
    Image.fromarray(np.full((64, 96), 100, np.uint8)).save(masks / "twin.jpg")
    index = _native.MaskIndex(masks)
    names = ["good", "skewed", "twin", "cut", "bare", "missing"]
    paths = [images / f"{n}.png" for n in names]
    results = _native.prepare_batch(paths, [(64, 64)], mask_index=index, require_mask=True)
    by_name = dict(zip(names, results, strict=True))

    assert isinstance(by_name["good"], _native.PreparedItem) and by_name["good"].mask_source == "file"
    assert isinstance(by_name["skewed"], AspectMismatchError)
    assert "96x64" in str(by_name["skewed"]) and "64x64" in str(by_name["skewed"])
    assert isinstance(by_name["twin"], DuplicateMaskError)
    assert "twin.png" in str(by_name["twin"]) and "twin.jpg" in str(by_name["twin"])
    assert isinstance(by_name["cut"], ImageDecodeError) and "cut.png" in str(by_name["cut"])
    assert isinstance(by_name["bare"], MissingMaskError)
    assert "require_mask=true but no mask found" in str(by_name["bare"]) and "bare.png" in str(
        by_name["bare"]
    )
    assert isinstance(by_name["missing"], FileNotFoundError)


def test_the_binding_raises_the_classes_of_masktrain_errors(tmp_path: Path) -> None:
    """One class per error: what the extension raises is the object `masktrain.errors` defines
    (not a look-alike of the same name), and the extension no longer defines its own."""
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.png").write_text("not an image at all")
    (tmp_path / "small.png").write_bytes(png_bytes(gradient()))
    Image.fromarray(np.full((64, 64), 200, np.uint8)).save(tmp_path / "square.png")
    cases = [
        (lambda: _native.decode_image(tmp_path / "empty.png"), ImageDecodeError),
        (lambda: _native.load_mask(tmp_path / "notes.png"), UnsupportedFormatError),
        (lambda: _native.decode_image(tmp_path / "small.png", pixel_limit=10), ImageTooLargeError),
        (lambda: _native.prepare_mask(tmp_path / "square.png", (96, 64), (64, 64)), AspectMismatchError),
    ]
    for call, expected in cases:
        with pytest.raises(MaskTrainError) as info:
            call()
        assert type(info.value) is expected, (type(info.value), expected)
        assert type(info.value).__module__ == "masktrain.errors"

    masks = tmp_path / "masks"
    masks.mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(masks / "twin.png")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(masks / "twin.bmp")
    with pytest.raises(MaskTrainError) as info:
        _native.MaskIndex(masks).get("twin")
    assert type(info.value) is DuplicateMaskError
    (bare,) = _native.prepare_batch([tmp_path / "small.png"], [(64, 64)], alpha_mask=True, require_mask=True)
    assert type(bare) is MissingMaskError

    for name in ("MaskTrainError", "ImageDecodeError", "AspectMismatchError", "MissingMaskError"):
        assert not hasattr(_native, name), name
