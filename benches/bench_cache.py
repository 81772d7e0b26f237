"""Cache benchmark: does ``masktrain cache`` overlap preparation with encoding, and does its
memory stay flat as the dataset grows?

1. On the generated ~1 MP ``png_mask`` dataset (see ``dataset.py``) with the tiny WAN models on
   the CPU, one run each of:
   - (a) ``cache`` wall time into a fresh directory (models loaded inside);
   - (b) preparation only: the native ``prepare_batch`` over the same items and chunks;
   - (c) encoding only: loading the models, then VAE and text encoding of the already prepared
     items, with the same batch size.
   Budget (DESIGN.md): a <= 1.1 x max(b, c).
2. Peak RSS of a ``cache`` process at 100 and 1,000 small (256 px) items. Budget: flat.

    python benches/bench_cache.py            # 48 items, resolution 512
    python benches/bench_cache.py --quick    # 8 items, and RSS at 20 / 200 items

Benchmarks report; they never fail.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from masktrain import _native
from masktrain.cache import run
from masktrain.cache.stages import chunk_size
from masktrain.config import CacheConfig
from masktrain.data.buckets import musubi_buckets
from masktrain.models import get_family

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dataset  # sibling module: benches/ is not a package

BATCH = 4
TOML = """
[general]
resolution = [{res}, {res}]
enable_bucket = true
[[datasets]]
image_directory = "{images}"
mask_directory = "{masks}"
cache_directory = "{cache}"
"""


def write_toml(root: Path, images: Path, masks: Path, resolution: int) -> Path:
    path = root / "dataset.toml"
    path.write_text(
        TOML.format(res=resolution, images=images.resolve(), masks=masks.resolve(), cache=root / "cache")
    )
    return path


def time_cache(images: Path, masks: Path, resolution: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        toml = write_toml(Path(tmp), images, masks, resolution)
        start = time.perf_counter()
        run(
            CacheConfig(
                dataset_config=toml,
                arch="wan",
                vae="tiny",
                text_encoder="tiny",
                device="cpu",
                batch_size=BATCH,
            )
        )
        return time.perf_counter() - start


def time_prepare(paths: list[Path], masks: Path, buckets: list) -> tuple[float, list]:
    index = _native.MaskIndex(masks)
    chunk = chunk_size(BATCH)  # as cache/images.py chunks
    start = time.perf_counter()
    items = []
    for i in range(0, len(paths), chunk):
        items += _native.prepare_batch(paths[i : i + chunk], buckets, mask_index=index)
    return time.perf_counter() - start, items


def time_encode(items: list) -> float:
    start = time.perf_counter()
    family = get_family("wan")
    vae = family.load_vae("tiny", torch.device("cpu"), torch.float32)
    encoder = family.load_text_encoder("tiny", torch.device("cpu"), torch.float32)
    # The same batches as cache/images.py: per chunk, per bucket, `BATCH` at a time. (Each new tensor
    # shape costs a warm-up on the CPU, so other batches would time something else.)
    chunk = chunk_size(BATCH)
    for first in range(0, len(items), chunk):
        by_bucket: dict = {}
        for item in items[first : first + chunk]:
            by_bucket.setdefault(item.bucket, []).append(item)
        for group in by_bucket.values():
            for i in range(0, len(group), BATCH):
                pixels = np.stack([item.image for item in group[i : i + BATCH]])
                tensor = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(127.5).sub(1.0).unsqueeze(2)
                family.encode_pixels(vae, tensor)
    for i in range(0, len(items), BATCH):
        family.encode_text(encoder, [""] * len(items[i : i + BATCH]))
    return time.perf_counter() - start


def peak_rss_mb(count: int, root: Path) -> float:
    """Peak RSS of a `masktrain cache` process over `count` generated 256 px items."""
    images, masks = root / f"images_{count}", root / f"masks_{count}"
    images.mkdir()
    masks.mkdir()
    rng = np.random.default_rng(count)
    for i in range(count):
        pixels = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"{i:05d}.png", compress_level=1)
        Image.fromarray(np.full((256, 256), i % 256, np.uint8)).save(masks / f"{i:05d}.png")
    sub = root / f"run_{count}"
    sub.mkdir()
    toml = write_toml(sub, images, masks, 256)
    code = (
        "import resource, sys; from masktrain.cli import main; sys.argv = ['masktrain', 'cache', "
        f"'--dataset_config', {str(toml)!r}, '--arch', 'wan', '--vae', 'tiny', '--t5', 'tiny', "
        "'--device', 'cpu']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parent / "_data")
    parser.add_argument("--count", type=int, default=48)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    counts = (20, 200) if args.quick else (100, 1000)
    if args.quick:
        args.count = 8

    kind = dataset.ensure(args.data, args.count)["png_mask"]
    paths = _native.list_images(kind.images)
    buckets = musubi_buckets((args.resolution, args.resolution))
    time_cache(kind.images, kind.masks, args.resolution)  # warm-up: imports, page cache
    prepare_s, items = time_prepare(paths, kind.masks, buckets)
    encode_s = time_encode(items)
    cache_s = time_cache(kind.images, kind.masks, args.resolution)
    ratio = cache_s / max(prepare_s, encode_s)
    print(f"cache on {len(paths)} ~1 MP items (tiny WAN, CPU, resolution {args.resolution}, batch {BATCH})")
    print(
        f"  (a) cache {cache_s:.2f} s   (b) prepare only {prepare_s:.2f} s   (c) encode only {encode_s:.2f} s"
    )
    print(f"  a / max(b, c) = {ratio:.2f}x (budget <= 1.1x, {'PASS' if ratio <= 1.1 else 'MISS'})")

    with tempfile.TemporaryDirectory() as tmp:
        rss = [peak_rss_mb(count, Path(tmp)) for count in counts]
    growth = rss[1] / rss[0]
    print(
        f"peak RSS of a cache process: {counts[0]} items {rss[0]:.0f} MB, "
        f"{counts[1]} items {rss[1]:.0f} MB ({growth:.2f}x; budget: flat)"
    )


if __name__ == "__main__":
    main()
