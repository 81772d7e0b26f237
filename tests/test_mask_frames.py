"""``data.mask_frames``: mask videos and mask-frame folders read to gray and laid onto the source
video's timeline.

Videos are written here with PyAV. Lossless ones (FFV1, PNG frames) must come back exactly; a lossy
H.264 one is checked against its raw luma plane converted from limited range by the test's own
arithmetic, and its one warning against a drift computed here with numpy. Alignment is checked
index by index against the rules written out in each test.
"""

from __future__ import annotations

import logging
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from helpers import tiered
from mask_videos import (
    frame_times,
    raw_luma_planes,
    tier_frames,
    write_frame_folder,
    write_mask_video,
)
from masktrain.data.mask_frames import MaskFrames, align, read_mask_frames
from masktrain.errors import DataError

LOGGER = "masktrain.data.mask_frames"


LOSSY_ENCODERS = {"libx264": ("h264", {}), "mpeg4": ("mpeg4", {"b": "2M"})}
"""Lossy encoders a PyAV build may have (libx264 preferred): the codec each writes, and options for a
quality a mask video would be made at."""


def lossy_encoder() -> str | None:
    return next((name for name in LOSSY_ENCODERS if name in av.codecs_available), None)


def flat_inside(source: np.ndarray, radius: int = 3) -> np.ndarray:
    """Pixels whose whole (2r+1)^2 neighbourhood has their value: away from every edge."""
    height, width = source.shape
    padded = np.pad(source, radius, mode="edge")
    inside = np.ones(source.shape, bool)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            inside &= padded[dy : dy + height, dx : dx + width] == source
    return inside


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


# --- reading ----------------------------------------------------------------------------------------


def test_ffv1_gray_video_reads_back_exactly(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    frames = tier_frames(5)
    video = write_mask_video(tmp_path / "mask.mkv", frames, fps=8)
    with caplog.at_level(logging.WARNING, LOGGER):
        read = read_mask_frames(video)
    assert [f.dtype for f in read.frames] == [np.uint8] * 5
    assert all(np.array_equal(got, want) for got, want in zip(read.frames, frames, strict=True))
    assert read.times == pytest.approx([0.0, 0.125, 0.25, 0.375, 0.5], abs=1e-9)
    assert not read.static and read.lossy_drift is None
    assert warnings_of(caplog) == []


def test_png_frame_folder_reads_back_exactly(tmp_path: Path) -> None:
    frames = tier_frames(12)
    folder = write_frame_folder(tmp_path / "clip", frames, [f"{i:05d}" for i in range(12)])
    read = read_mask_frames(folder)
    assert len(read.frames) == 12  # 00010 and 00011 after 00009: sorted by number
    assert all(np.array_equal(got, want) for got, want in zip(read.frames, frames, strict=True))
    assert read.times is None and not read.static


def test_still_mask_is_one_static_frame(tmp_path: Path) -> None:
    still = tmp_path / "clip.png"
    Image.fromarray(tier_frames(1)[0]).save(still)
    read = read_mask_frames(still)
    assert read.static and len(read.frames) == 1
    assert np.array_equal(align(read, 7, None, tmp_path / "clip.mp4"), np.zeros(7))


def test_frame_folder_with_a_gap_names_the_missing_frame(tmp_path: Path) -> None:
    names = ["00000", "00001", "00002", "00003", "00004", "00005", "00006", "00008"]
    folder = write_frame_folder(tmp_path / "clip", tier_frames(8), names)
    with pytest.raises(DataError, match=r"clip: mask frame 00007 is missing \(found 00006 then 00008\)"):
        read_mask_frames(folder)


def test_frame_folder_with_a_non_integer_name_names_the_file(tmp_path: Path) -> None:
    folder = write_frame_folder(tmp_path / "clip", tier_frames(3), ["00000", "00001", "frame2"])
    with pytest.raises(DataError, match=r"frame2\.png: a mask frame must be named by its frame number"):
        read_mask_frames(folder)


def test_frame_folder_with_two_files_for_one_number_names_both(tmp_path: Path) -> None:
    folder = write_frame_folder(tmp_path / "clip", tier_frames(3), ["00000", "00001", "1"])
    with pytest.raises(DataError, match=r"00001\.png and 1\.png are both frame 1; keep one"):
        read_mask_frames(folder)


def test_lossy_limited_range_video_is_range_converted_and_warned_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    codec = lossy_encoder()
    if codec is None:
        pytest.skip("this PyAV build has no lossy video encoder")
    frames = [tiered(64, 96, seed) for seed in range(6)]  # curved edges the codec smears
    codec_name, options = LOSSY_ENCODERS[codec]
    video = write_mask_video(tmp_path / "mask.mp4", frames, codec=codec, pix_fmt="yuv420p", options=options)
    with caplog.at_level(logging.WARNING, LOGGER):
        read = read_mask_frames(video)
    # The raw luma, converted from limited range by hand: 16..235 -> 0..255.
    raw = raw_luma_planes(video)
    want = [np.clip(np.rint((y.astype(np.float64) - 16) * 255 / 219), 0, 255) for y in raw]
    assert all(np.array_equal(got, w.astype(np.uint8)) for got, w in zip(read.frames, want, strict=True))
    for got, stored, source in zip(read.frames, raw, frames, strict=True):
        inside = flat_inside(source)
        white = inside & (source == 255)
        assert abs(float(np.median(stored[white])) - 235) <= 4  # white is stored near 235 ...
        assert got[white].min() >= 250  # ... and read back near 255
        assert np.abs(got[inside].astype(int) - source[inside].astype(int)).max() <= 8
    tiers = np.array([0, 80, 128, 255])
    stacked = np.stack(read.frames).astype(np.int64)
    drift = np.mean(np.min(np.abs(stacked[..., None] - tiers), axis=-1) > 8)
    assert 0 < drift < 0.05  # the edges drift, the flat regions do not
    assert read.lossy_drift == pytest.approx(drift, abs=1e-12)
    messages = warnings_of(caplog)
    assert len(messages) == 1
    assert str(video) in messages[0] and f"lossy codec {codec_name}:" in messages[0]
    assert f"{drift * 100:.2f}%" in messages[0]
    assert "ffmpeg -i in.mp4 -c:v ffv1 -pix_fmt gray out.mkv" in messages[0]


def test_lossless_h264_444_keeps_tiers_without_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    if "libx264" not in av.codecs_available:
        pytest.skip("this PyAV build has no libx264")
    frames = tier_frames(3)
    options = {"qp": "0"}
    video = write_mask_video(tmp_path / "m.mkv", frames, codec="libx264", pix_fmt="yuv444p", options=options)
    with caplog.at_level(logging.WARNING, LOGGER):
        read = read_mask_frames(video)
    assert all(np.array_equal(got, want) for got, want in zip(read.frames, frames, strict=True))
    assert read.lossy_drift is None and warnings_of(caplog) == []


def test_full_range_yuvj_video_is_kept_as_stored(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    if "mjpeg" not in av.codecs_available:
        pytest.skip("this PyAV build has no mjpeg encoder")
    video = write_mask_video(tmp_path / "m.avi", tier_frames(2), codec="mjpeg", pix_fmt="yuvj420p")
    with caplog.at_level(logging.WARNING, LOGGER):
        read = read_mask_frames(video)
    assert all(np.array_equal(got, y) for got, y in zip(read.frames, raw_luma_planes(video), strict=True))
    [message] = warnings_of(caplog)  # MJPEG is lossy even when these flat blocks survive it
    assert "lossy codec mjpeg:" in message


def test_rgb_video_is_read_as_pil_luma(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    video = tmp_path / "m.mkv"
    with av.open(str(video), "w") as container:
        stream = container.add_stream("ffv1", rate=8)
        stream.width, stream.height, stream.pix_fmt = 48, 32, "bgr0"
        container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode())
    [gray] = read_mask_frames(video).frames
    assert np.array_equal(gray, np.asarray(Image.fromarray(rgb).convert("L")))


def test_gray16_ffv1_video_reads_as_uint16(tmp_path: Path) -> None:
    frames = [(f.astype(np.uint16) * 257 + np.uint16(i)) for i, f in enumerate(tier_frames(3))]
    read = read_mask_frames(write_mask_video(tmp_path / "m.mkv", frames, pix_fmt="gray16le"))
    assert [f.dtype for f in read.frames] == [np.uint16] * 3
    assert all(np.array_equal(got, want) for got, want in zip(read.frames, frames, strict=True))


def test_10bit_limited_range_video_reads_as_full_range_uint16(tmp_path: Path) -> None:
    frames = [f.astype(np.uint16) * 257 for f in tier_frames(2)]
    video = write_mask_video(tmp_path / "m.mkv", frames, pix_fmt="yuv420p10le")
    read = read_mask_frames(video)
    raw = raw_luma_planes(video, np.uint16)
    for got, y, source in zip(read.frames, raw, frames, strict=True):
        assert got.dtype == np.uint16
        want = np.clip(np.rint((y.astype(np.float64) - 64) * 65535 / 876), 0, 65535)
        assert np.array_equal(got, want.astype(np.uint16))
        assert np.abs(got.astype(int) - source.astype(int)).max() <= 65535 / 876  # one 10-bit step


# --- alignment --------------------------------------------------------------------------------------


def folder_mask(tmp_path: Path, count: int) -> MaskFrames:
    names = [f"{i:05d}" for i in range(count)]
    return read_mask_frames(write_frame_folder(tmp_path / "clip", tier_frames(count), names))


def test_shorter_folder_is_padded_with_its_last_frame(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    mask = folder_mask(tmp_path, 4)
    with caplog.at_level(logging.WARNING, LOGGER):
        on_source = align(mask, 7, None, tmp_path / "clip.mp4")
    assert on_source.tolist() == [0, 1, 2, 3, 3, 3, 3]
    assert warnings_of(caplog) == [
        f"mask {tmp_path / 'clip'} has 4 frames on the timeline of source {tmp_path / 'clip.mp4'} "
        "(7 frames); its last frame is repeated for the remaining 3"
    ]


def test_longer_folder_is_cut(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    mask = folder_mask(tmp_path, 6)
    with caplog.at_level(logging.WARNING, LOGGER):
        on_source = align(mask, 4, [0.0, 0.1, 0.2, 0.3], tmp_path / "clip.mp4")
    assert on_source.tolist() == [0, 1, 2, 3]
    [message] = warnings_of(caplog)
    assert "has 6 frames on the timeline of source" in message and "(4 frames)" in message
    assert "its last 2 are not used" in message


def test_unknown_source_length_pads_without_a_longer_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    mask = folder_mask(tmp_path, 6)
    with caplog.at_level(logging.WARNING, LOGGER):
        assert align(mask, None, [0.0, 0.1, 0.2], tmp_path / "v.mp4").tolist() == [0, 1, 2]
        assert warnings_of(caplog) == []
        assert align(mask, None, [0.1 * i for i in range(8)], tmp_path / "v.mp4").tolist() == [
            0, 1, 2, 3, 4, 5, 5, 5,
        ]  # fmt: skip
    [message] = warnings_of(caplog)
    assert "has 6 frames" in message and "(at least 8 frames)" in message


@pytest.mark.parametrize(("source_count", "padded"), [(10, 0), (13, 3)])
def test_8fps_mask_video_aligns_to_16fps_source_by_timestamps(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, source_count: int, padded: int
) -> None:
    mask = read_mask_frames(write_mask_video(tmp_path / "mask.mkv", tier_frames(5), fps=8))
    source = write_mask_video(tmp_path / "source.mkv", tier_frames(source_count), fps=16)
    times = frame_times(source)
    with caplog.at_level(logging.WARNING, LOGGER):
        on_source = align(mask, source_count, times, source)
    # Source frame i (time i/16) takes mask frame i // 2 (time k/8): frame 2k+1 sits halfway
    # between mask frames k and k+1 and goes to the earlier.
    want = [min(i // 2, 4) for i in range(source_count)]
    assert on_source.tolist() == want
    messages = warnings_of(caplog)
    if padded:
        assert messages == [
            f"mask {tmp_path / 'mask.mkv'} has 10 frames on the timeline of source {source} "
            f"({source_count} frames); its last frame is repeated for the remaining {padded}"
        ]
    else:
        assert messages == []


def test_mask_video_longer_than_source_is_cut_with_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    mask = read_mask_frames(write_mask_video(tmp_path / "mask.mkv", tier_frames(5), fps=8))
    times = [i / 16 for i in range(6)]
    with caplog.at_level(logging.WARNING, LOGGER):
        on_source = align(mask, 6, times, tmp_path / "source.mp4")
    assert on_source.tolist() == [0, 0, 1, 1, 2, 2]
    [message] = warnings_of(caplog)
    assert "has 10 frames on the timeline" in message and "(6 frames); its last 4 are not used" in message
