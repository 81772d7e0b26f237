"""Video datasets without a model: musubi-tuner's clip extraction and frame dropping against
hand-computed lists, PyAV decoding onto the bucket, bad files, and the mask's latent grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import reference
from helpers import frame, write_video
from masktrain import _native
from masktrain.data.video import ClipSettings, decode_video, kept_frames
from masktrain.errors import AspectMismatchError, VideoDecodeError


def settings(extraction: str, targets: tuple[int, ...], **changes: object) -> ClipSettings:
    values: dict = dict(
        target_frames=targets,
        extraction=extraction,
        stride=1,
        sample=1,
        max_frames=129,
        source_fps=None,
        target_fps=16.0,
        frame_step=4,
    )
    return ClipSettings(**{**values, **changes})


@pytest.mark.parametrize(
    ("extraction", "targets", "frames", "changes", "expected"),
    [
        ("head", (1, 9, 17), 21, {}, [(0, 1), (0, 9), (0, 17)]),
        ("head", (1, 9, 17), 12, {}, [(0, 1), (0, 9)]),  # too short for 17: that length is skipped
        ("chunk", (5, 9), 21, {}, [(0, 5), (5, 5), (10, 5), (15, 5), (0, 9), (9, 9)]),
        ("chunk", (9,), 17, {}, [(0, 9)]),  # 9 + 9 > 17
        ("slide", (9,), 21, {"stride": 4}, [(0, 9), (4, 9), (8, 9), (12, 9)]),
        ("slide", (9, 17), 18, {"stride": 8}, [(0, 9), (8, 9), (0, 17)]),
        ("uniform", (9,), 21, {"sample": 3}, [(0, 9), (6, 9), (12, 9)]),
        ("uniform", (9,), 20, {"sample": 4}, [(0, 9), (3, 9), (7, 9), (11, 9)]),  # linspace(0, 11, 4)
        ("uniform", (9,), 10, {"sample": 3}, [(0, 9), (1, 9)]),  # starts 0, 0, 1: one clip per start
        ("full", (1,), 21, {}, [(0, 21)]),
        ("full", (1,), 20, {}, [(0, 17)]),  # rounded down to 4k+1
        ("full", (1,), 21, {"max_frames": 10}, [(0, 9)]),
        ("full", (1,), 3, {}, [(0, 1)]),
    ],
)
def test_clip_spans_follow_musubi(
    extraction: str, targets: tuple[int, ...], frames: int, changes: dict, expected: list
) -> None:
    assert settings(extraction, targets, **changes).spans(frames) == expected


def test_decode_limits() -> None:
    assert settings("head", (1, 17)).decode_limit == 17
    assert settings("full", (1,), max_frames=33).decode_limit == 33
    assert settings("slide", (9,)).decode_limit is None


def test_frame_dropping_follows_musubi() -> None:
    def kept(source: float | None, count: int) -> list[int]:
        keep = kept_frames(source, 16.0)
        return [i for i in range(count) if next(keep)]

    assert kept(None, 5) == [0, 1, 2, 3, 4]
    assert kept(32, 10) == [0, 2, 4, 6, 8]  # half the rate: every other frame
    # 30 -> 16 fps: target index int(i * 16/30) = 0 0 1 1 2 2 3 3 4 4 5 5 6 6 7; first of each kept.
    assert kept(30, 15) == [0, 2, 4, 6, 8, 10, 12, 14]
    assert kept(8, 6) == [0, 1, 2, 3, 4, 5]  # a slower source keeps every frame, none repeated


def test_decode_video_keeps_exact_frames_and_drops_to_the_target_rate(tmp_path: Path) -> None:
    path = tmp_path / "clip.mkv"
    write_video(path, 21, fps=32)
    seen = []

    def bucket_for(size: tuple[int, int]) -> tuple[int, int]:
        seen.append(size)
        return size

    video = decode_video(path, bucket_for)
    assert seen == [(64, 48)] and video.original_size == (64, 48) and video.bucket == (64, 48)
    assert video.frames.shape == (21, 48, 64, 3) and video.frames.dtype == np.uint8
    np.testing.assert_array_equal(video.frames, np.stack([frame(i) for i in range(21)]))

    dropped = decode_video(path, bucket_for, source_fps=32, target_fps=16, limit=9)
    assert dropped.source_indices == [0, 2, 4, 6, 8, 10, 12, 14, 16]
    np.testing.assert_array_equal(dropped.frames[:, 0, 0, 0], 10 * np.array(dropped.source_indices))


def test_frames_are_cover_resized_by_the_image_rules(tmp_path: Path) -> None:
    path = tmp_path / "wide.mkv"
    write_video(path, 5, w=96, h=48)
    video = decode_video(path, lambda size: (48, 48))  # scale 1, centre crop
    expected = np.stack([reference.resize_image_to_bucket(frame(i, 96, 48), (48, 48)) for i in range(5)])
    np.testing.assert_array_equal(video.frames, expected)
    bigger = decode_video(path, lambda size: (128, 64))  # Lanczos enlarging
    expected = np.stack([reference.resize_image_to_bucket(frame(i, 96, 48), (128, 64)) for i in range(5)])
    np.testing.assert_array_equal(bigger.frames, expected)


def test_a_frame_directory_is_a_video(tmp_path: Path) -> None:
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(6):
        Image.fromarray(frame(i)).save(frames / f"{i:03d}.png")
    video = decode_video(frames, lambda size: size)
    np.testing.assert_array_equal(video.frames, np.stack([frame(i) for i in range(6)]))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "file is empty"),
        (b"\x00\x01garbage" * 500, "cannot decode video"),
    ],
)
def test_bad_videos_are_errors_naming_the_file(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.mp4"
    path.write_bytes(content)
    with pytest.raises(VideoDecodeError, match=rf"bad\.mp4: {message}"):
        decode_video(path, lambda size: size)


def test_a_truncated_mp4_is_an_error_and_a_missing_file_an_os_error(tmp_path: Path) -> None:
    path = tmp_path / "cut.mp4"
    write_video(path, 12, lossless=False)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(VideoDecodeError, match=r"cut\.mp4"):
        decode_video(path, lambda size: size)
    with pytest.raises(FileNotFoundError):
        decode_video(tmp_path / "none.mp4", lambda size: size)


def test_the_mask_follows_the_image_rules_and_pools_like_torch(tmp_path: Path) -> None:
    path = tmp_path / "clip.mkv"
    write_video(path, 2, w=96, h=48)
    video = decode_video(path, lambda size: (64, 48))
    y, x = np.mgrid[0:24, 0:48]
    mask = np.where((x - 20) ** 2 + (y - 12) ** 2 < 64, 255, np.where(x > 30, 128, 0)).astype(np.uint8)
    Image.fromarray(mask).save(tmp_path / "clip.png")  # half size: enlarged with nearest
    at_bucket, weights = _native.prepare_mask(
        tmp_path / "clip.png", video.original_size, video.bucket, 8, source=path, media="video"
    )
    np.testing.assert_array_equal(at_bucket, reference.resize_mask_to_bucket(mask, (64, 48)))
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(at_bucket).float()[None, None] / 255.0, size=(6, 8), mode="area"
    )[0, 0]
    torch.testing.assert_close(torch.from_numpy(weights), expected, rtol=0, atol=1e-6)
    # A video without a mask file gets full weight: test_video_cache checks it end to end.

    Image.fromarray(mask[:, :40]).save(tmp_path / "clip.png")  # another aspect ratio
    with pytest.raises(AspectMismatchError, match=r"clip\.png: aspect ratio mismatch: video .*96x48"):
        _native.prepare_mask(
            tmp_path / "clip.png", video.original_size, video.bucket, 8, source=path, media="video"
        )
