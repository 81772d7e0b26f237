"""The largest bucket a plan counts (issue 22): from the cache, from the dataset TOML before
caching, or from --resolution. Before caching, every answer is checked against what ``cache``
then makes of the same dataset with the tiny models: the bucket, the clip length, the frames
dropped by source_fps; an image turned by its EXIF orientation; items that cannot be read are left
out, and a dataset with none is one line naming its TOML."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from helpers import cache_tiny, make_dataset, photo, write_video
from masktrain.config.dataset import load_dataset_config
from masktrain.data import cache_format
from masktrain.errors import ConfigError, DataError
from masktrain.plan.largest_bucket import Bucket, from_dataset, from_resolution, from_sources


def sizes_dataset(root: Path, sizes: list[tuple[int, int]]) -> Path:
    """One photo per (width, height), kept at its own size up to 96x96's area (bucket_no_upscale)."""
    images = root / "images"
    images.mkdir(parents=True)
    for index, (width, height) in enumerate(sizes):
        Image.fromarray(photo(height, width, index)).save(images / f"item{index}.png")
        (images / f"item{index}.txt").write_text("a photo" + " of a subject" * index)
    toml = root / "dataset.toml"
    toml.write_text(
        "[general]\nresolution = [96, 96]\nenable_bucket = true\nbucket_no_upscale = true\n\n"
        '[[datasets]]\nimage_directory = "images"\ncache_directory = "cache"\n'
    )
    return toml


TWO_VIDEOS = (("masked.mkv", 21, 64, 48), ("plain.mp4", 25, 48, 96))
"""(name, frames, width, height): Matroska states no frame count (its duration does), MP4 does.
Each keeps its own size as its bucket (bucket_no_upscale under 96x96's area)."""


def video_dataset(
    root: Path, settings: str, videos: tuple[tuple[str, int, int, int], ...] = TWO_VIDEOS
) -> Path:
    folder = root / "videos"
    folder.mkdir(parents=True)
    for name, count, width, height in videos:
        write_video(folder / name, count, w=width, h=height, lossless=name.endswith(".mkv"))
    toml = root / "dataset.toml"
    toml.write_text(
        "[general]\nresolution = [96, 96]\nenable_bucket = true\nbucket_no_upscale = true\n\n"
        f'[[datasets]]\nvideo_directory = "videos"\ncache_directory = "cache"\n{settings}\n'
    )
    return toml


def before_and_after_caching(root: Path, toml: Path) -> tuple[Bucket, Bucket]:
    before = from_dataset(toml, "wan")
    cache_tiny(root)
    return before, from_dataset(toml, "wan")


def test_resolution_is_the_bucket() -> None:
    assert from_resolution(832, 480, 81) == Bucket(832, 480, 81, "--resolution")


def test_the_largest_image_before_caching_is_the_one_the_cache_holds(tmp_path: Path) -> None:
    toml = sizes_dataset(tmp_path, [(64, 64), (96, 64), (48, 80)])
    before, after = before_and_after_caching(tmp_path, toml)
    assert before == Bucket(96, 64, 1, "dataset.toml before caching (3 items)")
    assert (after.width, after.height, after.frames, after.source) == (96, 64, 1, "the cache (3 items)")
    # The longest caption's tokens, read from the text embeddings' headers.
    tokens = [
        cache_format.read_header(path)[1]["text_embeds_float32"][0]
        for path in (tmp_path / "cache").glob("*_te.*")
    ]
    assert after.text_tokens == max(tokens) and min(tokens) < max(tokens)


def test_a_cache_missing_an_item_is_planned_from_the_sources(tmp_path: Path) -> None:
    toml = sizes_dataset(tmp_path, [(64, 64)])
    cache_tiny(tmp_path)
    Image.fromarray(photo(48, 96, 7)).save(tmp_path / "images" / "wide.png")
    assert from_dataset(toml, "wan") == Bucket(96, 48, 1, "dataset.toml before caching (2 items)")


def test_an_image_turned_by_its_exif_orientation_takes_the_turned_bucket(tmp_path: Path) -> None:
    toml = sizes_dataset(tmp_path, [])
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 96 wide, shown (and decoded) 96 high
    Image.fromarray(photo(48, 96, 0)).save(tmp_path / "images" / "turned.jpg", exif=exif)
    before, after = before_and_after_caching(tmp_path, toml)
    assert (before.width, before.height) == (after.width, after.height) == (48, 96)


def test_items_that_cannot_be_read_are_left_out(tmp_path: Path) -> None:
    toml = make_dataset(tmp_path, masks=False, count=2)
    (tmp_path / "images" / "broken.png").write_bytes(b"not a png")
    Image.fromarray(photo(128, 128, 0)).save(tmp_path / "images" / "item0.jpg")  # item0: two sources
    datasets = load_dataset_config(toml)
    assert from_sources(datasets, "wan") == Bucket(64, 64, 1, "dataset.toml before caching (1 item)")


def test_a_dataset_with_no_readable_item_is_one_line_naming_its_toml(tmp_path: Path) -> None:
    toml = make_dataset(tmp_path, masks=False, count=0)
    (tmp_path / "images" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError) as error:
        from_dataset(toml, "wan")
    assert str(error.value) == (
        f"{toml}: no image or video whose header can be read, so no bucket to plan for; check its "
        "image_directory / video_directory, or pass --resolution W H [--frames N]"
    )


def test_a_missing_image_folder_is_one_line_naming_the_key(tmp_path: Path) -> None:
    toml = sizes_dataset(tmp_path, [])
    (tmp_path / "images").rmdir()
    with pytest.raises(ConfigError) as error:
        from_dataset(toml, "wan")
    assert (
        str(error.value)
        == f"{toml}: [[datasets]] #1: 'image_directory' {tmp_path / 'images'}: no such folder"
    )


@pytest.mark.parametrize(
    ("settings", "videos", "largest"),
    [
        # plain.mp4's 48x96 bucket has more cells than masked.mkv's 64x48 at the same length.
        ('target_frames = [1, 17, 33]\nframe_extraction = "head"', TWO_VIDEOS, (48, 96, 17)),
        # full: each video whole (rounded down to 4k+1): 21 frames of masked.mkv, 25 of plain.mp4.
        ('frame_extraction = "full"', TWO_VIDEOS, (48, 96, 25)),
        # 30 fps dropped to 16: plain.mp4 keeps 13 of its 25 frames; masked.mkv 11 of 21, so 9.
        ('frame_extraction = "full"\nsource_fps = 30.0', TWO_VIDEOS, (48, 96, 13)),
        # masked.mkv's 21 frames are its own chunk of 21; plain.mp4 has 25, one frame short of 29.
        ('target_frames = [5, 21, 29]\nframe_extraction = "chunk"', TWO_VIDEOS, (48, 96, 21)),
        # A longer clip beats a larger bucket: 7 x 6 x 8 latent cells against 4 x 12 x 6.
        ("target_frames = [13, 25]", (("long.mkv", 25, 64, 48), ("short.mp4", 13, 48, 96)), (64, 48, 25)),
    ],
)
def test_the_longest_clip_before_caching_is_the_one_the_cache_holds(
    tmp_path: Path,
    settings: str,
    videos: tuple[tuple[str, int, int, int], ...],
    largest: tuple[int, int, int],
) -> None:
    toml = video_dataset(tmp_path, settings, videos)
    before, after = before_and_after_caching(tmp_path, toml)
    assert (
        (before.width, before.height, before.frames) == (after.width, after.height, after.frames) == largest
    )
    assert before.source == "dataset.toml before caching (2 items)"


def test_a_folder_of_frames_counts_its_images(tmp_path: Path) -> None:
    frames = tmp_path / "frames" / "clip"
    frames.mkdir(parents=True)
    for index in range(9):
        Image.fromarray(photo(48, 64, index)).save(frames / f"{index:03d}.png")
    (tmp_path / "videos.jsonl").write_text('{"video_path": "frames/clip", "caption": "a clip"}\n')
    toml = tmp_path / "dataset.toml"
    toml.write_text(
        '[general]\nresolution = [64, 48]\n\n[[datasets]]\nvideo_jsonl_file = "videos.jsonl"\n'
        'cache_directory = "cache"\ntarget_frames = [5, 9, 13]\n'
    )
    before, after = before_and_after_caching(tmp_path, toml)
    assert before == Bucket(64, 48, 9, "dataset.toml before caching (1 item)")
    assert (after.width, after.height, after.frames) == (64, 48, 9)


def test_an_image_model_refuses_a_video_dataset(tmp_path: Path) -> None:
    toml = video_dataset(tmp_path, "")
    with pytest.raises(ConfigError, match=r"#1: --arch qwen_image is an image model .* need --arch wan$"):
        from_dataset(toml, "qwen_image")


def test_video_lengths_need_no_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Headers only: a plan of a large video dataset reads no frame."""
    import av.container

    toml = video_dataset(tmp_path, 'frame_extraction = "full"')

    def decode(*args: object, **kwargs: object) -> None:
        raise AssertionError("a frame was decoded")

    monkeypatch.setattr(av.container.InputContainer, "decode", decode)
    assert from_dataset(toml, "wan").frames == 25
