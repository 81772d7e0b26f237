"""`masktrain cache` on video datasets with the tiny WAN models: clip files and shapes, stored
mask weights against PIL / OpenCV / torch, latents against the VAE on independently decoded and
resized frames, frame dropping, staleness and stale clips, bad videos, config errors."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

import reference
from helpers import cache_tiny, masktrain_command, write_video
from masktrain.config import CacheConfig, ConfigError
from masktrain.data import cache_format as fmt
from masktrain.data.buckets import musubi_buckets
from masktrain.models import get_family

RESOLUTION = (64, 48)


def mask_image(h: int, w: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    mask = np.where(x > w * 0.6, 128, 0)
    mask[(x - w * 0.4) ** 2 + (y - h * 0.5) ** 2 < (h * 0.3) ** 2] = 255
    return mask.astype(np.uint8)


def write_toml(root: Path, extra: str = "", resolution: tuple[int, int] = RESOLUTION) -> None:
    (root / "dataset.toml").write_text(
        f"""
[general]
resolution = [{resolution[0]}, {resolution[1]}]
enable_bucket = true

[[datasets]]
video_directory = "videos"
mask_directory = "masks"
cache_directory = "cache"
{extra}
""",
        encoding="utf-8",
    )


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """masked.mkv (lossless, 64x48, 21 frames) with a 2x mask; plain.mp4 (H.264, 48x96, 25 frames,
    another bucket) without one."""
    videos, masks = tmp_path / "videos", tmp_path / "masks"
    videos.mkdir()
    masks.mkdir()
    write_video(videos / "masked.mkv", 21)
    write_video(videos / "plain.mp4", 25, w=48, h=96, lossless=False)
    Image.fromarray(mask_image(96, 128)).save(masks / "masked.png")  # same aspect, twice the size
    (videos / "masked.txt").write_text("a clip with a mask", encoding="utf-8")
    (videos / "plain.txt").write_text("a clip without one", encoding="utf-8")
    write_toml(tmp_path, 'target_frames = [1, 17]\nframe_extraction = "head"')
    return tmp_path


cache = cache_tiny


def clip_files(root: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted((root / "cache").glob("*_wan.safetensors"))}


def decoded_frames(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def test_clips_hold_latents_and_the_static_mask_on_the_latent_grid(dataset: Path) -> None:
    (summary,) = cache(dataset)
    assert (summary.items, summary.written, summary.clips, len(summary.failed)) == (2, 2, 4, 0)
    assert dict(summary.sources) == {"file": 1, "none": 1}
    assert set(clip_files(dataset)) == {
        "masked_00000-001_0064x0048_wan.safetensors",
        "masked_00000-017_0064x0048_wan.safetensors",
        "plain_00000-001_0048x0096_wan.safetensors",
        "plain_00000-017_0048x0096_wan.safetensors",
    }

    family = get_family("wan")
    vae = family.load_vae("tiny", torch.device("cpu"), torch.float32)
    mask = mask_image(96, 128)
    buckets = musubi_buckets(RESOLUTION)
    for stem, suffix, bucket in [("masked", ".mkv", (64, 48)), ("plain", ".mp4", (32, 96))]:
        source = dataset / "videos" / f"{stem}{suffix}"
        first = decoded_frames(source)[0]
        assert reference.nearest_aspect_bucket((first.shape[1], first.shape[0]), buckets) == bucket
        frames = np.stack([reference.resize_image_to_bucket(f, bucket) for f in decoded_frames(source)])
        h, w = bucket[1] // 8, bucket[0] // 8
        for count, latent_frames in [(1, 1), (17, 5)]:
            (path,) = (dataset / "cache").glob(f"{stem}_00000-{count:03d}_*_wan.safetensors")
            tensors, meta = fmt.load_cache_file(path)
            assert (meta.arch, meta.source, meta.bucket, meta.format_version) == (
                "wan",
                str(source),
                bucket,
                fmt.FORMAT_VERSION,
            )
            assert meta.mask_source == ("file" if stem == "masked" else "none") and meta.fingerprint
            assert (meta.extra["frame_start"], meta.extra["frame_count"]) == ("0", str(count))
            latents = tensors[f"latents_{latent_frames}x{h}x{w}_float32"]
            assert latents.shape == (16, latent_frames, h, w)
            pixels = torch.from_numpy(frames[:count]).permute(3, 0, 1, 2).float() / 127.5 - 1
            expected = family.encode_pixels(vae, pixels[None])[0]
            torch.testing.assert_close(latents, expected, rtol=1e-5, atol=1e-5)
            weights = tensors[f"mask_weights_{latent_frames}x{h}x{w}_float32"]
            assert weights.shape == (1, latent_frames, h, w) and weights.dtype == torch.float32
            if stem == "masked":
                spatial = torch.from_numpy(
                    reference.latent_mask(reference.resize_mask_to_bucket(mask, bucket))
                )
                torch.testing.assert_close(weights, spatial.expand(1, latent_frames, h, w), rtol=0, atol=1e-6)
                assert 0 < float(weights.mean()) < 1
            else:
                assert (weights == 1).all()
    for stem in ("masked", "plain"):  # one text embedding per video
        text, meta = fmt.load_cache_file(dataset / "cache" / f"{stem}_wan_te.safetensors")
        assert meta.arch == "wan" and text["text_embeds_float32"].shape[1] == 32


def test_without_mask_directory_clips_carry_no_mask_weights(dataset: Path) -> None:
    text = (dataset / "dataset.toml").read_text().replace('mask_directory = "masks"\n', "")
    (dataset / "dataset.toml").write_text(text)
    (summary,) = cache(dataset)
    assert summary.clips == 4 and dict(summary.sources) == {"none": 2}
    for path in clip_files(dataset).values():
        tensors, meta = fmt.load_cache_file(path)
        assert meta.mask_source == "none" and not any(k.startswith("mask_weights") for k in tensors)


def test_frame_extraction_modes_and_source_fps(dataset: Path) -> None:
    write_toml(dataset, 'target_frames = [5, 9]\nframe_extraction = "chunk"')
    (summary,) = cache(dataset)
    starts = {name.split("_")[1] for name in clip_files(dataset) if name.startswith("masked")}
    assert starts == {"00000-005", "00005-005", "00010-005", "00015-005", "00000-009", "00009-009"}
    assert summary.clips == 6 + 7  # plain: 25 frames -> 5 chunks of 5 and 2 of 9

    # 21 frames at 32 fps -> 16 fps: frames 0, 2, ..., 20 (11 frames); full: 9 of them.
    write_toml(dataset, 'frame_extraction = "full"\nsource_fps = 32.0')
    (summary,) = cache(dataset)
    assert summary.rebuilt == 2
    tensors, _ = fmt.load_cache_file(dataset / "cache" / "masked_00000-009_0064x0048_wan.safetensors")
    family = get_family("wan")
    vae = family.load_vae("tiny", torch.device("cpu"), torch.float32)
    kept = np.stack(decoded_frames(dataset / "videos" / "masked.mkv")[0:18:2])
    pixels = torch.from_numpy(kept).permute(3, 0, 1, 2).float() / 127.5 - 1
    torch.testing.assert_close(
        tensors["latents_3x6x8_float32"], family.encode_pixels(vae, pixels[None])[0], rtol=1e-5, atol=1e-5
    )
    # The clips of the old extraction are gone: training would pick them up.
    assert set(clip_files(dataset)) == {
        "masked_00000-009_0064x0048_wan.safetensors",
        "plain_00000-013_0048x0096_wan.safetensors",
    }


def test_reruns_skip_and_touching_a_video_or_its_mask_rebuilds_its_clips(dataset: Path) -> None:
    cache(dataset)
    before = {name: p.stat().st_mtime_ns for name, p in clip_files(dataset).items()}
    (summary,) = cache(dataset)
    assert (summary.written, summary.skipped, summary.clips) == (0, 2, 0)
    assert {name: p.stat().st_mtime_ns for name, p in clip_files(dataset).items()} == before

    os.utime(dataset / "masks/masked.png", ns=(1, 1))
    (summary,) = cache(dataset)
    assert (summary.written, summary.rebuilt, summary.skipped, summary.clips) == (1, 1, 1, 2)

    os.utime(dataset / "videos/plain.mp4", ns=(1, 1))
    (summary,) = cache(dataset)
    assert (summary.written, summary.rebuilt, summary.skipped) == (1, 1, 1)

    # A run killed between two clips of a video: the video is rebuilt, not skipped.
    clip_files(dataset)["masked_00000-017_0064x0048_wan.safetensors"].unlink()
    (summary,) = cache(dataset)
    assert (summary.written, summary.rebuilt, summary.skipped) == (1, 1, 1)
    assert len(clip_files(dataset)) == 4


def test_bucket_no_upscale_keeps_a_small_video_at_its_own_size(dataset: Path) -> None:
    # 128x128 resolution: 64x48 and 48x96 are smaller, so they keep their size (multiples of 16).
    write_toml(dataset, "target_frames = [17]\nbucket_no_upscale = true", resolution=(128, 128))
    cache(dataset)
    buckets = {fmt.read_metadata(p).bucket for p in clip_files(dataset).values()}
    assert buckets == {(64, 48), (48, 96)}
    tensors, _ = fmt.load_cache_file(dataset / "cache" / "plain_00000-017_0048x0096_wan.safetensors")
    assert tensors["latents_5x12x6_float32"].shape == (16, 5, 12, 6)
    write_toml(dataset, "target_frames = [17]", resolution=(128, 128))  # both are enlarged now
    (summary,) = cache(dataset)
    assert summary.rebuilt == 2
    expected = {
        reference.nearest_aspect_bucket(size, musubi_buckets((128, 128))) for size in [(64, 48), (48, 96)]
    }
    assert {fmt.read_metadata(p).bucket for p in clip_files(dataset).values()} == expected
    assert all(w * h > 64 * 48 for w, h in expected)


@pytest.mark.slow
def test_bad_videos_fail_alone_and_the_cli_exits_1(dataset: Path) -> None:
    (dataset / "videos" / "empty.mp4").write_bytes(b"")
    (dataset / "videos" / "corrupt.mov").write_bytes(b"not a video at all" * 100)
    write_video(dataset / "videos" / "short.mkv", 9)
    write_toml(dataset, "target_frames = [17]")
    (summary,) = cache(dataset)
    failed = {path.name: reason for path, reason in summary.failed}
    assert set(failed) == {"empty.mp4", "corrupt.mov", "short.mkv"}
    assert "empty.mp4: file is empty (0 bytes)" in failed["empty.mp4"]
    assert "corrupt.mov: cannot decode video" in failed["corrupt.mov"]
    assert (
        "short.mkv: 9 frames is shorter than every clip length of target_frames [17]" in failed["short.mkv"]
    )
    assert summary.written == 2 and not (dataset / "cache" / "short_wan_te.safetensors").exists()

    Image.fromarray(mask_image(48, 48)).save(dataset / "masks" / "plain.png")  # 1:1 mask, 1:2 video
    command = masktrain_command(
        "cache --dataset_config {toml} --arch wan --vae tiny --t5 tiny --device cpu",
        toml=dataset / "dataset.toml",
    )
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr
    assert "plain.png: aspect ratio mismatch: video" in result.stderr
    assert "5 videos, mask sources alpha=0 file=0 none=0, 0 written" in result.stderr
    assert "1 skipped, 4 failed" in result.stderr  # masked.mkv is up to date


def test_qwen_image_refuses_a_video_dataset(dataset: Path) -> None:
    with pytest.raises(ConfigError, match=r"#1: --arch qwen_image is an image model .* need --arch wan"):
        cache(dataset, arch="qwen_image")


def test_alpha_mask_in_a_video_dataset_is_an_error_that_says_why(dataset: Path) -> None:
    write_toml(dataset, "alpha_mask = true")
    with pytest.raises(ConfigError, match=r"'alpha_mask' cannot be used in a video dataset: "):
        cache(dataset)


def test_overlapped_video_preparation_matches_preparation_in_turn(dataset: Path) -> None:
    """The accelerator path (next video decoded on a thread) against the in-turn path."""
    from masktrain.cache.setup import CacheSetup
    from masktrain.cache.stages import prepared_chunks
    from masktrain.cache.videos import VideoCacher
    from masktrain.config import load_dataset_config
    from masktrain.data.discovery import discover_videos

    (ds,) = load_dataset_config(dataset / "dataset.toml").datasets
    family = get_family("wan")
    config = CacheConfig(dataset_config=dataset / "dataset.toml", arch="wan", vae="tiny", text_encoder="tiny")
    cacher = VideoCacher(
        CacheSetup(
            config,
            family,
            family.load_vae("tiny", torch.device("cpu"), torch.float32),
            ds,
            discover_videos(ds),
        )
    )
    chunks = [[item] for item in discover_videos(ds).items]
    in_turn = list(prepared_chunks(cacher, chunks, overlap=False))
    overlapped = list(prepared_chunks(cacher, chunks, overlap=True))
    assert [c for c, _ in overlapped] == chunks
    for (_, (a,)), (_, (b,)) in zip(in_turn, overlapped, strict=True):
        assert a.spans == b.spans == [(0, 1), (0, 17)] and a.mask_source == b.mask_source
        np.testing.assert_array_equal(a.decoded.frames, b.decoded.frames)
