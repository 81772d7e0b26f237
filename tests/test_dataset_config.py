"""The dataset TOML: the guide's examples load as written, bad keys are errors that say what to
do, and the values come out typed with musubi-tuner's defaults."""

import logging
from pathlib import Path

import pytest

import reference
from masktrain.config import ConfigError, ImageDatasetConfig, VideoDatasetConfig, load_dataset_config
from masktrain.config.dataset import BucketConfig
from masktrain.data.buckets import musubi_buckets, no_upscale_bucket, sd_scripts_buckets
from masktrain.data.discovery import bucket_list, choose_bucket

# The three complete examples of the weighted-mask guide, verbatim.
GUIDE_STEP_2 = """\
[[datasets]]
image_directory = "/path/to/images/subject"
mask_directory = "/path/to/images/weighted_masks"  # Weighted masks here!
cache_directory = "/path/to/cache"
caption_extension = ".txt"
resolution = [1024, 1024]
"""
GUIDE_METHOD_1 = """\
# Dataset configuration for weighted mask training
[general]
shuffle_caption = true
keep_tokens = 1

[[datasets]]
# Image source
image_directory = "/path/to/images"

# Weighted masks directory - MUST match image filenames!
mask_directory = "/path/to/weighted_masks"

# Cache directory - masks are baked into cache
cache_directory = "/path/to/cache"

# Standard settings
caption_extension = ".txt"
resolution = [1024, 1024]
enable_bucket = true
min_bucket_reso = 512
max_bucket_reso = 1536
bucket_reso_steps = 64
batch_size = 1
"""
GUIDE_METHOD_2 = """\
[[datasets]]
image_directory = "/path/to/rgba_images"  # RGBA PNGs with embedded masks
cache_directory = "/path/to/cache_alpha"  # Always use fresh cache!
alpha_mask = true
mask_directory = "/path/to/masks"         # Optional fallback for non-RGBA images
require_mask = false                      # Set true to error if any image lacks mask
resolution = [1024, 1024]
caption_extension = ".txt"
"""


def load(tmp_path: Path, text: str):
    path = tmp_path / "dataset.toml"
    path.write_text(text, encoding="utf-8")
    return load_dataset_config(path)


def test_guide_examples_load_as_written(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (step2,) = load(tmp_path, GUIDE_STEP_2).datasets
    assert isinstance(step2, ImageDatasetConfig)
    assert step2.mask_directory == Path("/path/to/images/weighted_masks")
    assert step2.buckets.resolution == (1024, 1024) and not step2.alpha_mask

    with caplog.at_level(logging.WARNING):
        (method1,) = load(tmp_path, GUIDE_METHOD_1).datasets
    assert "'shuffle_caption' is ignored" in caplog.text and "'keep_tokens' is ignored" in caplog.text
    assert method1.buckets.enable_bucket
    assert (method1.buckets.min_bucket_reso, method1.buckets.max_bucket_reso) == (512, 1536)
    assert method1.buckets.bucket_reso_steps == 64

    (method2,) = load(tmp_path, GUIDE_METHOD_2).datasets
    assert method2.alpha_mask and not method2.require_mask
    assert method2.cache_directory == Path("/path/to/cache_alpha")


def test_defaults_and_general_values_descend(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """
[general]
resolution = 512
batch_size = 4
caption_extension = "caption"

[[datasets]]
image_directory = "images"

[[datasets]]
image_directory = "more"
batch_size = 2
num_repeats = 3
""",
    )
    first, second = config.datasets
    assert first.image_directory == tmp_path / "images"  # relative to the TOML file
    assert first.cache_directory == tmp_path / "images"  # defaults to the image directory
    assert first.buckets.resolution == (512, 512)
    assert (first.batch_size, first.num_repeats) == (4, 1)
    assert (second.batch_size, second.num_repeats) == (2, 3)
    assert first.caption_extension == ".caption"
    assert not first.buckets.enable_bucket and not first.alpha_mask and first.mask_directory is None


def test_video_dataset(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        (video,) = load(
            tmp_path,
            """
[[datasets]]
video_directory = "/clips"
cache_directory = "/cache/clips"
mask_directory = "/clips_masks"
target_frames = [1, 17, 20]
frame_extraction = "slide"
frame_stride = 8
source_fps = 30
""",
        ).datasets
    assert isinstance(video, VideoDatasetConfig)
    assert video.target_frames == (1, 17)  # rounded, sorted and deduplicated, as musubi does
    assert "target_frames 20 rounded down to 17" in caplog.text
    assert (video.frame_extraction, video.frame_stride, video.source_fps) == ("slide", 8, 30.0)
    assert video.mask_directory == Path("/clips_masks")


def test_video_defaults_and_musubis_quiet_changes(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (video,) = load(
        tmp_path, '[[datasets]]\nvideo_directory = "v"\ntarget_frames = [33, 9, 10, 1]\n'
    ).datasets
    assert isinstance(video, VideoDatasetConfig) and video.cache_directory == tmp_path / "v"
    assert video.target_frames == (1, 9, 33)
    assert (video.frame_extraction, video.frame_stride, video.frame_sample) == ("head", 1, 1)
    assert (video.max_frames, video.source_fps) == (129, None)
    with caplog.at_level(logging.WARNING):
        (uniform,) = load(
            tmp_path, '[[datasets]]\nvideo_directory = "v"\nframe_extraction = "uniform"\n'
        ).datasets
    assert uniform.frame_extraction == "head" and 'with frame_sample = 1 is "head"' in caplog.text
    (uniform,) = load(
        tmp_path, '[[datasets]]\nvideo_directory = "v"\nframe_extraction = "uniform"\nframe_sample = 4\n'
    ).datasets
    assert (uniform.frame_extraction, uniform.frame_sample) == ("uniform", 4)


def test_bucket_no_upscale_needs_enable_bucket(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (on,) = load(
        tmp_path,
        '[general]\nenable_bucket = true\nbucket_no_upscale = true\n[[datasets]]\nimage_directory = "i"\n',
    ).datasets
    assert on.buckets.bucket_no_upscale
    with caplog.at_level(logging.WARNING):
        (off,) = load(tmp_path, '[[datasets]]\nvideo_directory = "v"\nbucket_no_upscale = true\n').datasets
    assert not off.buckets.bucket_no_upscale
    assert "'bucket_no_upscale' has no effect without enable_bucket = true" in caplog.text


@pytest.mark.parametrize(
    ("key", "why"),
    [("alpha_mask", "videos have no alpha channel")],
)
def test_image_only_keys_in_a_video_dataset_say_why(tmp_path: Path, key: str, why: str) -> None:
    with pytest.raises(
        ConfigError, match=rf"\[\[datasets\]\] #1: '{key}' cannot be used in a video dataset: {why}"
    ):
        load(tmp_path, f'[[datasets]]\nvideo_directory = "/v"\n{key} = true\n')


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[[datasets]]\nimage_directory = "/i"\nmask_dir = "/m"\n',
            r"\[\[datasets\]\] #1: 'mask_dir' is not a known key; did you mean 'mask_directory'\?",
        ),
        (
            '[general]\nresoluton = 512\n[[datasets]]\nimage_directory = "/i"\n',
            r"\[general\]: 'resoluton' is not a known key; did you mean 'resolution'\?",
        ),
        (
            '[general]\nalpha_mask = true\n[[datasets]]\nimage_directory = "/i"\n',
            r"'alpha_mask' belongs in a \[\[datasets\]\] table",
        ),
        (
            '[[dataset]]\nimage_directory = "/i"\n',
            r"unknown top-level table or key 'dataset'; did you mean 'datasets'\?",
        ),
        ('mask_directory = "/m"\n', r"'mask_directory' must be inside a \[\[datasets\]\]"),
        ("[general]\nbatch_size = 1\n", r"no \[\[datasets\]\] table"),
        (
            '[[datasets]]\ncache_directory = "/c"\n',
            r"set exactly one of 'image_directory' and 'image_jsonl_file'",
        ),
        (
            '[[datasets]]\nimage_jsonl_file = "/i.jsonl"\n',
            r"'cache_directory' is required with 'image_jsonl_file'",
        ),
        (
            '[[datasets]]\nimage_directory = "/i"\nresolution = [1000, 1000]\n',
            r"'resolution' 1000x1000 must be a multiple of 16",
        ),
        (
            '[[datasets]]\nimage_directory = "/i"\nresolution = "big"\n',
            r"'resolution' must be \[width, height\]",
        ),
        ('[[datasets]]\nimage_directory = "/i"\nbatch_size = 0\n', r"'batch_size' must be an integer >= 1"),
        ('[[datasets]]\nimage_directory = "/i"\nalpha_mask = "yes"\n', r"'alpha_mask' must be true or false"),
        (
            '[[datasets]]\nimage_directory = "/i"\nbucket_reso_steps = 24\n',
            r"'bucket_reso_steps' must be a multiple of 16",
        ),
        (
            '[[datasets]]\nimage_directory = "/i"\nrequire_mask = true\n',
            r"require_mask=true but no mask source configured",
        ),
        (
            '[[datasets]]\nvideo_directory = "/v"\nframe_extraction = "random"\n',
            r"'frame_extraction' must be one of head, chunk",
        ),
        (
            '[[datasets]]\nvideo_directory = "/v"\ntarget_frames = 17\n',
            r"'target_frames' must be a list of positive integers",
        ),
        (
            '[[datasets]]\nvideo_directory = "/v"\nframe_stride = 0\n',
            r"'frame_stride' must be an integer >= 1",
        ),
        (
            '[[datasets]]\nvideo_directory = "/v"\nsource_fps = -30\n',
            r"'source_fps' must be a positive number",
        ),
        (
            '[[datasets]]\nvideo_jsonl_file = "/v.jsonl"\n',
            r"'cache_directory' is required with 'video_jsonl_file'",
        ),
        (
            '[[datasets]]\nimage_directory = "/a"\n[[datasets]]\nimage_directory = "/b"\ncache_directory = "/a"\n',
            r"#1 and #2 share cache_directory",
        ),
        ("[[datasets]\n", r"not valid TOML"),
    ],
)
def test_bad_configs_name_the_table_and_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        load(tmp_path, text)
    assert str(tmp_path / "dataset.toml") in str(info.value)


def test_musubi_buckets_match_hand_computed_values() -> None:
    # 512x512: side 512, widths 256..512 step 16, h = floor16(262144 // w).
    buckets = musubi_buckets((512, 512))
    assert (512, 512) in buckets and (256, 1024) in buckets and (1024, 256) in buckets
    assert (400, 640) in buckets and (640, 400) in buckets  # 262144 // 400 = 655 -> 640
    assert all(w % 16 == 0 and h % 16 == 0 and w * h <= 512 * 512 for w, h in buckets)
    assert buckets == sorted(set(buckets))


def test_sd_scripts_buckets_match_hand_computed_values() -> None:
    # The guide's keys: 1024x1024 area, sides 512..1536 in steps of 64.
    buckets = sd_scripts_buckets((1024, 1024), 512, 1536, 64)
    assert (1024, 1024) in buckets
    assert (512, 1536) in buckets and (1536, 512) in buckets  # 1048576 // 512 = 2048 -> capped at 1536
    assert (768, 1344) in buckets  # 1048576 // 768 = 1365 -> 1344
    assert all(512 <= min(b) and max(b) <= 1536 and b[0] * b[1] <= 1024 * 1024 for b in buckets)


def test_bucket_choice_and_no_upscale() -> None:
    buckets = musubi_buckets((512, 512))
    assert reference.nearest_aspect_bucket((1280, 800), buckets) == (640, 400)
    assert reference.nearest_aspect_bucket((1000, 1000), buckets) == (512, 512)
    assert no_upscale_bucket((300, 200), (512, 512)) == (288, 192)
    assert no_upscale_bucket((3000, 2000), (624, 416)) == (624, 416)


def test_bucket_no_upscale_follows_musubis_bucket_selector() -> None:
    config = BucketConfig(resolution=(512, 512), enable_bucket=True, bucket_no_upscale=True)
    buckets = bucket_list(config)
    assert choose_bucket((300, 200), config, buckets) == (288, 192)  # (w - w % 16, h - h % 16)
    assert choose_bucket((512, 512), config, buckets) == (512, 512)  # area equal: still its own size
    assert choose_bucket((1000, 262), config, buckets) == (992, 256)  # area 262000 <= 262144
    assert choose_bucket((1280, 800), config, buckets) == (640, 400)  # larger: the normal choice
    assert choose_bucket((10, 9), config, buckets) == (16, 16)  # never below one step
    config = BucketConfig(
        resolution=(512, 512), enable_bucket=True, bucket_no_upscale=True, bucket_reso_steps=64
    )
    assert choose_bucket((300, 200), config, bucket_list(config)) == (256, 192)  # the dataset's step
    plain = BucketConfig(resolution=(512, 512), enable_bucket=True)
    assert choose_bucket((300, 200), plain, buckets) == reference.nearest_aspect_bucket((300, 200), buckets)
