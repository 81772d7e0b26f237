"""``masktrain inspect``'s outputs: one overlay per item (the bucketed image, dimmed where the loss
weight is 0 and tinted red by the weight, each latent cell a block: the mask on the latent grid,
as the loss sees it; with ``--prior_mask_threshold`` the prior region tinted blue),
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


def overlay(image: np.ndarray, raw: np.ndarray | None, config: InspectConfig) -> bytes:
    """The overlay PNG of one item."""
    from PIL import Image

    picture = Image.fromarray(image)
    picture.thumbnail((THUMBNAIL, THUMBNAIL), Image.Resampling.LANCZOS)
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
    buffer = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, format="PNG")
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
    return (
        f'<figure><a href="{url}"><img src="{url}" '
        f'alt="{html.escape(item.name)}"></a><figcaption><b>{html.escape(item.name)}</b><br>'
        f"mask: {item.source} (from {item.read_from}); {item.bucket[0]}x{item.bucket[1]}, "
        f"{item.grid[0]}x{item.grid[1]} cells<br>face {_percent(item.face)}, body {_percent(item.body)}, "
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
            image, raw = pictures[name]
            atomic.write_bytes(out / item.overlay, overlay(image, raw, config))
    atomic.write_text(out / "summary.json", json.dumps(summary_json(reports), indent=2))
    atomic.write_text(out / "index.html", page(reports, config))


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 1em; }}
.grid {{ display: flex; flex-wrap: wrap; gap: 12px; }}
figure {{ margin: 0; width: 256px; font-size: 12px; }}
img {{ max-width: 256px; max-height: 256px; display: block; }}
.flag {{ color: #b00; }}
</style></head>
<body><h1>{title}</h1>
<p>Each picture is the bucketed image with the loss weight of every latent cell ({settings}): red where
the weight is high, dimmed where it is 0; blue where the prior term keeps the base model
(with --prior_mask_threshold).</p>
{sections}
</body></html>
"""
