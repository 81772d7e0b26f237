"""Bucket resolutions: the (width, height) pairs images are cover-resized and cropped to.

Two generators, chosen by the keys a user's TOML has:

- musubi-tuner's (the default): equal-area buckets on a 16-pixel grid, from half the square side
  up to the square side, each with its transpose.
- sd-scripts' (when ``min_bucket_reso`` / ``max_bucket_reso`` / ``bucket_reso_steps`` are set,
  as in the guide's examples): widths from ``min_bucket_reso`` to ``max_bucket_reso`` in
  ``bucket_reso_steps``, each with the largest height on the step grid that keeps the area within
  the resolution's, plus the square.

An image takes the bucket whose aspect ratio is nearest its own (ties keep the first, the list is
sorted; the native core's ``choose_bucket``). With ``bucket_no_upscale``, an image no larger than
the bucket area keeps its own size rounded down to the step instead.
"""

from __future__ import annotations

import math

from masktrain.config.dataset import BUCKET_STEP

Bucket = tuple[int, int]


def floor_to(value: int, step: int) -> int:
    return value // step * step


def musubi_buckets(resolution: Bucket, step: int = BUCKET_STEP) -> list[Bucket]:
    area = resolution[0] * resolution[1]
    side = int(math.sqrt(area))
    buckets = set()
    for width in range(floor_to(side // 2, step), side + step, step):
        height = floor_to(area // width, step)
        buckets.update({(width, height), (height, width)})
    return sorted(buckets)


def sd_scripts_buckets(resolution: Bucket, min_reso: int, max_reso: int, step: int) -> list[Bucket]:
    """sd-scripts' ``make_bucket_resolutions(max_reso, min_size, max_size, divisible)``."""
    max_area = resolution[0] * resolution[1]
    square = floor_to(int(math.sqrt(max_area)), step)
    buckets = {(square, square)}
    for width in range(min_reso, max_reso + 1, step):
        height = min(max_reso, floor_to(max_area // width, step))
        if height >= min_reso:
            buckets.update({(width, height), (height, width)})
    return sorted(buckets)


def no_upscale_bucket(size: Bucket, bucket: Bucket, step: int = BUCKET_STEP) -> Bucket:
    """musubi's ``bucket_no_upscale``: an image no larger than the bucket keeps its own size,
    rounded down to the step grid (never below one step)."""
    width, height = size
    if width * height > bucket[0] * bucket[1]:
        return bucket
    return max(step, floor_to(width, step)), max(step, floor_to(height, step))
