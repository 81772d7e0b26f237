"""Preparation benchmark: masktrain's native path against the Python reference path.

Times, per dataset kind (see ``dataset.py``), with the median of several runs after a warm-up:

  (a) native     ``_native.prepare_batch`` over all items in one call;
  (b) reference  PIL + OpenCV + torch per item, as the reference trainer does it, in a thread pool
                 of ``os.cpu_count()`` threads;
  (c) decode     native decoding only (``decode_image`` / ``load_mask``) of the same files in the
                 same kind of thread pool: the floor no pipeline can beat;

and ``convert-alpha`` (in-process) against a PIL implementation of the same job. Ratios are
printed next to the DESIGN.md budgets (a/b >= 1.6, a/c >= 0.85) as information: benchmarks
report, they never fail.

    python benches/bench_prepare.py            # 48 items per kind, 5 repeats
    python benches/bench_prepare.py --quick    # 8 items per kind, 2 repeats (smoke run)
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

import masktrain
from masktrain import _native
from masktrain.config import ConvertAlphaConfig
from masktrain.data.buckets import musubi_buckets
from masktrain.tools.convert_alpha import run as convert_alpha_run

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dataset  # sibling module: benches/ is not a package

TARGET_VS_REFERENCE = 1.6
TARGET_VS_DECODE = 0.85
RESOLUTION = (512, 512)
LATENT_FACTOR = 8
WORKERS = os.cpu_count() or 1

Bucket = tuple[int, int]


def reference_bucket(width: int, height: int, buckets: Sequence[Bucket]) -> Bucket:
    """Nearest aspect ratio; the first bucket wins ties."""
    aspect = width / height
    return min(buckets, key=lambda b: abs(b[0] / b[1] - aspect))


def reference_resize(image: Image.Image, mask: Image.Image, bucket: Bucket) -> tuple[np.ndarray, np.ndarray]:
    """Cover-scale then centre-crop, with the reference's choice of resampler per direction."""
    bw, bh = bucket
    w, h = image.size
    scale = max(bw / w, bh / h)
    new = (int(w * scale + 0.5), int(h * scale + 0.5))
    if scale > 1:
        pixels = np.array(image.resize(new, Image.Resampling.LANCZOS))
        weights = np.array(mask.resize(new, Image.Resampling.NEAREST))
    else:
        pixels = cv2.resize(np.array(image), new, interpolation=cv2.INTER_AREA)
        weights = cv2.resize(np.array(mask), new, interpolation=cv2.INTER_AREA)
    left, top = (new[0] - bw) // 2, (new[1] - bh) // 2
    pixels = pixels[top : top + bh, left : left + bw, :3]
    weights = weights[top : top + bh, left : left + bw]
    return pixels, weights


def reference_item(
    path: Path, mask_path: Path | None, buckets: Sequence[Bucket]
) -> tuple[Bucket, np.ndarray, torch.Tensor]:
    image = Image.open(path)
    if image.mode not in ("RGB", "RGBA"):
        image = image.convert("RGB")
    mask = image.getchannel("A") if mask_path is None else Image.open(mask_path).convert("L")
    bucket = reference_bucket(*image.size, buckets)
    pixels, weights = reference_resize(image, mask, bucket)
    bw, bh = bucket
    latent = torch.nn.functional.interpolate(
        torch.from_numpy(weights)[None, None].float() / 255.0,
        size=(bh // LATENT_FACTOR, bw // LATENT_FACTOR),
        mode="area",
    )
    return bucket, pixels, latent


def mask_paths(kind: dataset.Kind, paths: Sequence[Path]) -> list[Path | None]:
    if kind.masks is None:
        return [None] * len(paths)
    return [kind.masks / f"{p.stem}.png" for p in paths]


# --- the three pipelines ------------------------------------------------------------------------


def run_native(kind: dataset.Kind, paths: Sequence[Path], buckets: Sequence[Bucket]) -> list[Bucket]:
    # The mask index is built inside the timed call: it is part of what the native path does.
    index = _native.MaskIndex(kind.masks) if kind.masks is not None else None
    items = _native.prepare_batch(
        paths, buckets, mask_index=index, alpha_mask=kind.alpha, latent_factor=LATENT_FACTOR
    )
    failures = [item for item in items if isinstance(item, BaseException)]
    assert not failures, f"prepare_batch failed: {failures[:3]}"
    return [item.bucket for item in items]  # type: ignore[union-attr]


def run_reference(kind: dataset.Kind, paths: Sequence[Path], buckets: Sequence[Bucket]) -> list[Bucket]:
    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        results = pool.map(
            lambda job: reference_item(*job, buckets), zip(paths, mask_paths(kind, paths), strict=True)
        )
        return [bucket for bucket, _, _ in results]


def run_decode(kind: dataset.Kind, paths: Sequence[Path], _buckets: Sequence[Bucket]) -> int:
    jobs: list[Callable[[], object]] = [lambda p=p: _native.decode_image(p) for p in paths]
    jobs += [lambda m=m: _native.load_mask(m) for m in mask_paths(kind, paths) if m is not None]
    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        return len(list(pool.map(lambda job: job(), jobs)))


# --- convert-alpha ------------------------------------------------------------------------------


def run_convert_native(kind: dataset.Kind, out: Path) -> None:
    assert kind.masks is not None
    # convert-alpha draws a tqdm bar on stderr; keep the benchmark's output to the table.
    with contextlib.redirect_stderr(io.StringIO()):
        summary = convert_alpha_run(ConvertAlphaConfig(kind.images, kind.masks, out))
    assert not summary.failed and not summary.missing_mask, summary.line()


def pil_convert_item(image_path: Path, mask_path: Path, out: Path) -> None:
    image = Image.open(image_path)
    rgb = np.array(image)[..., :3] if image.mode == "RGBA" else np.array(image.convert("RGB"))
    alpha = np.array(Image.open(mask_path).convert("L"))
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(out / f"{image_path.stem}.png")


def run_convert_pil(kind: dataset.Kind, out: Path) -> None:
    paths = _native.list_images(kind.images)
    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        list(pool.map(lambda p: pil_convert_item(p, kind.masks / f"{p.stem}.png", out), paths))


# --- timing and report --------------------------------------------------------------------------


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of `fn` over `repeats` runs after one untimed warm-up run."""
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        if i > 0:
            times.append(elapsed)
    return statistics.median(times)


def interleaved_seconds(fns: Sequence[Callable[[], object]], repeats: int) -> list[list[float]]:
    """Wall times of each of `fns` over `repeats` rounds, the functions taking turns within a
    round, after one untimed warm-up round."""
    times: list[list[float]] = [[] for _ in fns]
    for i in range(repeats + 1):
        for fn, out in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            if i > 0:
                out.append(elapsed)
    return times


def time_convert(
    fn: Callable[[dataset.Kind, Path], None], kind: dataset.Kind, repeats: int
) -> tuple[float, int]:
    """Like `median_seconds`, each run writing into a fresh directory (created and removed untimed).
    Also returns the bytes written, since the encoders' speed/size trade-offs differ."""
    times, written = [], 0
    for i in range(repeats + 1):
        with tempfile.TemporaryDirectory(prefix="bench-convert-") as tmp:
            start = time.perf_counter()
            fn(kind, Path(tmp))
            elapsed = time.perf_counter() - start
            written = sum(f.stat().st_size for f in Path(tmp).iterdir())
        if i > 0:
            times.append(elapsed)
    return statistics.median(times), written


def verdict(ratio: float, target: float) -> str:
    return "PASS" if ratio >= target else "MISS"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parent / "_data")
    parser.add_argument("--count", type=int, default=48, help="images per kind")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs (median reported)")
    parser.add_argument("--quick", action="store_true", help="smoke run: --count 8 --repeats 2")
    parser.add_argument(
        "--resolution",
        type=int,
        nargs=2,
        default=RESOLUTION,
        metavar=("W", "H"),
        help="bucket resolution; 512 512 gives 2x factors on the dataset, 960 544 fractional ones",
    )
    parser.add_argument("--no-convert", action="store_true", help="skip the convert-alpha timing")
    args = parser.parse_args(argv)
    if args.quick:
        args.count, args.repeats = 8, 2

    print(
        f"masktrain {masktrain.__version__} | "
        f"python {platform.python_version()} | cpus {WORKERS} | native threads {_native.thread_count()} | "
        f"torch {torch.__version__} | opencv {cv2.__version__} | pillow {Image.__version__}"
    )
    start = time.perf_counter()
    kinds = dataset.ensure(args.data, args.count)
    print(f"dataset: {args.data} ({args.count} per kind, ready in {time.perf_counter() - start:.1f}s)")
    resolution = tuple(args.resolution)
    buckets = musubi_buckets(resolution)
    print(f"buckets: {len(buckets)} for {resolution}, latent factor {LATENT_FACTOR}, repeats {args.repeats}")

    # The reference runs torch single-threaded: its parallelism is the thread pool, one item per
    # thread, and intra-op threads on top of it would only oversubscribe the cores. OpenCV keeps
    # its defaults, as in the reference trainer.
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)

    rows = []
    for name, kind in kinds.items():
        paths = _native.list_images(kind.images)
        # Same work on both sides: the two paths must pick the same bucket for every item.
        assert run_native(kind, paths, buckets) == run_reference(kind, paths, buckets), name
        runs = [functools.partial(fn, kind, paths, buckets) for fn in (run_native, run_reference, run_decode)]
        native, reference, decode = interleaved_seconds(runs, args.repeats)
        rate = [len(paths) / statistics.median(s) for s in (native, reference, decode)]
        # Ratios are taken within each round, then the median: a burst of load from elsewhere on
        # a shared machine then slows both sides of a ratio instead of one.
        vs_ref = statistics.median(r / n for n, r in zip(native, reference, strict=True))
        vs_decode = statistics.median(d / n for n, d in zip(native, decode, strict=True))
        rows.append((name, *rate, vs_ref, vs_decode))
        print(f"  {name}: done")
    torch.set_num_threads(torch_threads)

    print()
    print(
        f"prepare (items/s, median of {args.repeats}; ratios: median of per-round ratios; "
        f"budgets a/b >= {TARGET_VS_REFERENCE}, a/c >= {TARGET_VS_DECODE}, information only)"
    )
    print(f"{'kind':<10} {'a native':>9} {'b ref':>8} {'c decode':>9} {'a/b':>13} {'a/c':>13}")
    for name, native, reference, decode, vs_ref, vs_decode in rows:
        print(
            f"{name:<10} {native:>9.1f} {reference:>8.1f} {decode:>9.1f} "
            f"{vs_ref:>6.2f}x {verdict(vs_ref, TARGET_VS_REFERENCE)} "
            f"{vs_decode:>6.2f}x {verdict(vs_decode, TARGET_VS_DECODE)}"
        )
    if args.no_convert:
        return
    convert_kind = kinds["png_mask"]
    count = len(_native.list_images(convert_kind.images))
    convert = [time_convert(fn, convert_kind, args.repeats) for fn in (run_convert_native, run_convert_pil)]
    (native_s, native_bytes), (pil_s, pil_bytes) = convert
    print()
    # PIL saves with its defaults (zlib level 6); the output sizes show what each encoder bought.
    print(f"convert-alpha on png_mask (items/s, median of {args.repeats}; MB/item written)")
    print(f"{'native':>9} {'PIL':>8} {'ratio':>8} {'MB native':>10} {'MB PIL':>7}")
    print(
        f"{count / native_s:>9.1f} {count / pil_s:>8.1f} {pil_s / native_s:>7.2f}x "
        f"{native_bytes / count / 1e6:>10.2f} {pil_bytes / count / 1e6:>7.2f}"
    )


if __name__ == "__main__":
    main()
