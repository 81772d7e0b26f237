"""``masktrain inspect``'s outputs: one overlay per item (the bucketed image, dimmed where the loss
weight is 0 and tinted red by the weight, each latent cell a block: the mask on the latent grid,
as the loss sees it; with ``--prior_mask_threshold`` the prior region tinted blue; a video's a
strip of its first clip's latent frames, each with its own weights, so a moving mask is seen moving),
``index.html`` (a static contact sheet of the overlays with their numbers, no server, no
scripts), ``summary.json`` and the printed table. Every file is written atomically."""

from __future__ import annotations

import html
import io
import json
import urllib.parse
from pathlib import Path

import numpy as np

from masktrain import atomic
from masktrain.config.inspect import InspectConfig
from masktrain.inspect.report import DatasetReport, Pictures, inspect_datasets, loss_weights, summary_json

THUMBNAIL = 256
"""Longest side of an overlay, in pixels."""

STRIP_TILE = 128
"""Longest side of one latent frame in a video's strip, in pixels."""

STRIP_GAP = 4
"""Pixels between two latent frames of a strip."""

LABEL_HEIGHT = 14
"""The band under a strip's frames that names each one (``k: frame i``: latent frame k shows pixel
frame i)."""


def overlay(image: np.ndarray, raw: np.ndarray | None, config: InspectConfig) -> bytes:
    """The overlay PNG of one item."""
    return _png(_overlaid(image, raw, config, THUMBNAIL))


def latent_frame_pixels(latent_frames: int, temporal_factor: int) -> list[int]:
    """The pixel frame a strip shows for each latent frame of a clip: frame 0 for latent frame 0
    (the causal VAE encodes it alone), and for latent frame k the last frame of its group 4k-3 ...
    4k, frame 4k (with the VAE's `temporal_factor` 4), so each picture is a frame the latent holds."""
    return [k * temporal_factor for k in range(latent_frames)]


def strip(frames: np.ndarray, raw: np.ndarray, temporal_factor: int, config: InspectConfig) -> bytes:
    """The strip PNG of a video's clip: its (N, H, W, 3) uint8 `frames` and the (F, h, w) raw latent
    weights `raw`, side by side, one overlay per latent frame (:func:`latent_frame_pixels`'s pixel
    frame with that latent frame's weights), each named below it, so the mask is seen following
    the subject."""
    from PIL import Image, ImageDraw

    shown = latent_frame_pixels(len(raw), temporal_factor)
    if shown[-1] >= len(frames):
        raise ValueError(
            f"a clip of {len(frames)} frames has no frame {shown[-1]} for its latent frame {len(raw) - 1} "
            f"({len(raw)} latent frames at a temporal factor of {temporal_factor})"
        )
    tiles = [_overlaid(frames[index], raw[k], config, STRIP_TILE) for k, index in enumerate(shown)]
    height, width = tiles[0].shape[:2]
    canvas = np.full((height + LABEL_HEIGHT, len(tiles) * (width + STRIP_GAP) - STRIP_GAP, 3), 255, np.uint8)
    for k, (tile, index) in enumerate(zip(tiles, shown, strict=True)):
        left = k * (width + STRIP_GAP)
        canvas[:height, left : left + width] = tile
        band = Image.new("RGB", (width, LABEL_HEIGHT), (255, 255, 255))  # its own: a long label is cut
        ImageDraw.Draw(band).text((2, 1), f"{k}: frame {index}", fill=(0, 0, 0))
        canvas[height:, left : left + width] = np.asarray(band)
    return _png(canvas)


def _overlaid(image: np.ndarray, raw: np.ndarray | None, config: InspectConfig, size: int) -> np.ndarray:
    """`image` shrunk to `size` (longest side), dimmed where the loss weight of the raw (h, w)
    latent mask is 0 and tinted red by it, each latent cell a block; the prior region blue."""
    from PIL import Image

    picture = Image.fromarray(image)
    picture.thumbnail((size, size), Image.Resampling.LANCZOS)
    pixels = np.asarray(picture).astype(np.float32)
    if raw is not None:

        def on_picture(cells: np.ndarray) -> np.ndarray:
            """Latent cells -> one block each over the thumbnail, shaped (H, W, 1)."""
            resized = Image.fromarray(cells.astype(np.float32), mode="F").resize(
                picture.size, Image.Resampling.NEAREST
            )
            return np.asarray(resized)[..., None]

        weight = on_picture(
            loss_weights(raw, config.mask_gamma, config.mask_min_weight, config.mask_blur_kernel_size)
        )
        dimmed = pixels * (0.35 + 0.65 * np.minimum(weight * 4, 1))  # weight 0: a third as bright
        pixels = dimmed * (1 - 0.45 * weight) + np.array([255.0, 40.0, 40.0]) * 0.45 * weight
        if config.prior_mask_threshold is not None:  # the prior region, kept near the base model: blue
            prior = on_picture((raw < config.prior_mask_threshold).astype(np.float32)) > 0.5
            pixels = np.where(prior, pixels * 0.6 + np.array([40.0, 80.0, 255.0]) * 0.4, pixels)
    return pixels.clip(0, 255).astype(np.uint8)


def _png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def table(reports: list[DatasetReport]) -> str:
    """The printed summary: one line per dataset."""
    row = "{:<8} {:>5} {:>7} {:>9} {:>6} {:>6} {:>6}  {}"
    lines = [row.format("dataset", "items", "no mask", "tiny subj", "face", "body", "bg", "cache")]
    for report in reports:
        totals = report.totals()
        regions = [_percent(totals.get(region)) for region in ("face", "body", "background")]
        counts = [len(report.items), len(report.without_mask), len(report.small_subject)]
        cache = report.cache + (f"; {report.note}" if report.note else "")
        lines.append(row.format(f"#{report.index + 1}", *counts, *regions, cache))
    return "\n".join(lines)


_STRIP_CLASS = ' class="strip"'
"""A video's card: as wide as its strip."""


def _card(item: object) -> str:
    from masktrain.inspect.report import ItemReport

    assert isinstance(item, ItemReport)
    flags = []
    if item.source == "none":
        flags.append("no mask")
    if item.small_subject:
        flags.append("subject under 1% of the cells")
    if item.cache != "fresh":
        flags.append(item.cache)
    prior = "" if item.prior_region is None else f"<br>prior region {_percent(item.prior_region)}"
    if item.baked:
        prior += f"<br>baked in the cache: {html.escape(item.baked)}"
    # The path as a URL ('#', '?', '%' or a backslash in a name would cut or change it), then as HTML.
    url = html.escape(urllib.parse.quote(item.overlay))
    shape = f"{item.grid[0]}x{item.grid[1]} cells" + (
        f" x {item.latent_frames} latent frames" if item.latent_frames > 1 else ""
    )
    return (
        f'<figure{_STRIP_CLASS if item.latent_frames > 1 else ""}><a href="{url}"><img src="{url}" '
        f'alt="{html.escape(item.name)}"></a><figcaption><b>{html.escape(item.name)}</b><br>'
        f"mask: {item.source} (from {item.read_from}); {item.bucket[0]}x{item.bucket[1]}, "
        f"{shape}<br>face {_percent(item.face)}, body {_percent(item.body)}, "
        f"background {_percent(item.background)}<br>mean weight {item.mean_weight:.3f}{prior}"
        + (f'<br><span class="flag">{html.escape("; ".join(flags))}</span>' if flags else "")
        + "</figcaption></figure>"
    )


def page(reports: list[DatasetReport], config: InspectConfig) -> str:
    sections = []
    for report in reports:
        totals = report.totals()
        lists = [
            (f"{len(values)} {label}", values)
            for label, values in (
                ("without a mask", report.without_mask),
                ("with a subject under 1% of the cells", report.small_subject),
                ("stale in the cache", report.stale),
                ("damaged in the cache", report.damaged),
                ("not cached", report.not_cached),
                ("that cannot be read", report.failed),
            )
            if values
        ]
        cards = "".join(_card(item) for item in report.items)
        listed = "".join(
            f'<p class="flag">{html.escape(label)}: {html.escape(", ".join(values[:20]))}'
            f"{' ...' if len(values) > 20 else ''}</p>"
            for label, values in lists
        )
        sections.append(
            f"<section><h2>Dataset #{report.index + 1}: {html.escape(report.directory)}</h2>"
            f"<p>{len(report.items)} items; cache {report.cache}"
            + (
                f"; mean face {_percent(totals['face'])}, body {_percent(totals['body'])}, background "
                f"{_percent(totals['background'])}, mean weight {totals['mean_weight']:.3f}"
                if totals
                else ""
            )
            + (f"; {html.escape(report.note)}" if report.note else "")
            + f'</p>{listed}<div class="grid">{cards}</div></section>'
        )
    settings = f"--mask_gamma {config.mask_gamma} --mask_min_weight {config.mask_min_weight}"
    if config.mask_blur_kernel_size > 1:
        settings += f" --mask_blur_kernel_size {config.mask_blur_kernel_size}"
    if config.prior_mask_threshold is not None:
        settings += f" --prior_mask_threshold {config.prior_mask_threshold}"
    text = _PAGE.format(
        title=html.escape(f"masktrain inspect: {config.dataset_config}"),
        settings=html.escape(settings),
        sections="\n".join(sections),
    )
    # A name that is not UTF-8 (listed as failed) is shown as the log shows it: bad\udcff.jpg.
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def run(config: InspectConfig) -> list[DatasetReport]:
    reports, pictures = inspect_datasets(config)
    write(reports, pictures, config)
    return reports


def write(reports: list[DatasetReport], pictures: Pictures, config: InspectConfig) -> None:
    out = config.output_dir
    for report in reports:
        for item in report.items:
            name = f"{report.index}/{Path(item.name).stem}"
            item.overlay = f"overlays/{report.index}_{Path(item.name).stem}.png"
            picture = pictures[name]
            if picture.raw is not None and picture.raw.ndim == 3:  # a video clip: its latent frames
                png = strip(picture.image, picture.raw, picture.temporal_factor, config)
            else:  # an image, or a video without a mask: its first frame
                png = overlay(
                    picture.image if picture.image.ndim == 3 else picture.image[0], picture.raw, config
                )
            atomic.write_bytes(out / item.overlay, png)
    atomic.write_text(out / "summary.json", json.dumps(summary_json(reports), indent=2))
    atomic.write_text(out / "index.html", page(reports, config))


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 1em; }}
.grid {{ display: flex; flex-wrap: wrap; gap: 12px; }}
figure {{ margin: 0; width: 256px; font-size: 12px; }}
img {{ max-width: 256px; max-height: 256px; display: block; }}
figure.strip {{ width: auto; max-width: 100%; overflow-x: auto; }}
figure.strip img {{ max-width: none; }}
.flag {{ color: #b00; }}
</style></head>
<body><h1>{title}</h1>
<p>Each picture is the bucketed image with the loss weight of every latent cell ({settings}): red where
the weight is high, dimmed where it is 0; blue where the prior term keeps the base model
(with --prior_mask_threshold). A video shows its first clip as a strip of its latent frames, each
with the last pixel frame of its group (frame 0, then frame 4k for latent frame k) and its own
weights; its numbers count every latent frame.</p>
{sections}
</body></html>
"""
