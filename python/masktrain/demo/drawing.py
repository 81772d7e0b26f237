"""The demo's pictures, drawn with matplotlib (its Agg canvas on a ``Figure`` of its own: no
pyplot, no global backend or style is touched) and written atomically as PNG.

- ``report.png`` (:func:`training_figure`): the per-region training curves of each run (face,
  hair + body, background and the prior term, from the run's ``metrics.jsonl``, as a centred
  moving average), one panel per run on a shared scale, and below them a row of training items
  with their cached mask weight over them, cell by cell on the latent grid, as the loss sees it.
- ``bleed.png`` (:func:`bleed_figure`): the bleed scenario's photos of its first seed (a training
  photo, a held-out photo, its twin in the training room, the same in an unseen room), then bleed
  and subject improvement per run (a bar at the mean over the seeds, a dot per seed; for bleed a
  ring at the mean against the unseen room) and bleed by noise level (the mean over the seeds).
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LinearSegmentedColormap
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from masktrain import atomic
from masktrain.demo.evaluate import NOISE_BINS

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from masktrain.demo.bleed import BleedResult
    from masktrain.demo.runs import Run

DPI = 100
CURVES = (  # metrics.jsonl key, legend, colour
    ("loss_face", "face", "tab:red"),
    ("loss_body", "hair + body", "tab:orange"),
    ("loss_background", "background", "tab:blue"),
    ("prior_loss", "prior term", "tab:green"),
)
OVERLAY_ITEMS = 4
MASK_RED = LinearSegmentedColormap.from_list(
    "mask_weight", [(0.9, 0.08, 0.24, 0.0), (0.9, 0.08, 0.24, 0.8)]
)  # weight 0: clear; weight 1: red at 80%
RUN_COLOURS = {"unmasked": "tab:gray", "masked": "tab:orange", "masked_prior": "tab:green"}
OTHER_COLOUR = "tab:purple"  # the bleed scenario's fourth run


def write_png(figure: Figure, path: Path) -> None:
    png = io.BytesIO()
    FigureCanvasAgg(figure)  # the figure's own Agg canvas: no backend is chosen for anyone else
    figure.savefig(png, format="png")
    atomic.write_bytes(path, png.getvalue())


def _grid(axes: Axes) -> None:
    """Light horizontal lines at the y ticks, behind the data."""
    axes.grid(axis="y", color="0.9")
    axes.set_axisbelow(True)


# --- report.png ---------------------------------------------------------------------------------


def _smooth(values: np.ndarray) -> np.ndarray:
    """A centred moving average over a tenth of the run (the per-step tier losses are noisy: each
    step draws new noise levels)."""
    window = max(1, len(values) // 10)
    if window == 1:
        return values
    kernel = np.ones(window) / window
    padded = np.pad(values, (window // 2, window - 1 - window // 2), mode="edge")
    return np.convolve(padded, kernel, mode="valid")


def _curves(runs: Sequence[Run]) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Run name -> metrics key -> (steps, smoothed values); a key some step lacks is left out,
    and so is the prior term of a run without prior preservation."""
    curves: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    for run in runs:
        text = (run.output_dir / "metrics.jsonl").read_text()
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
        steps = np.array([r["step"] for r in records], dtype=np.float64)
        curves[run.spec.name] = {}
        for key, _, _ in CURVES:
            values = [r.get(key) for r in records]
            if key == "prior_loss" and not any(values):
                continue
            if all(v is not None for v in values):
                curves[run.spec.name][key] = (steps, _smooth(np.array(values, dtype=np.float64)))
    return curves


def _overlays(train_toml: Path, arch: str) -> list[tuple[np.ndarray, np.ndarray, str]]:
    """(faded grey image, raw mask weight on the latent grid, label) of the first training items
    that cached a mask, the image at its bucket size."""
    from PIL import Image

    from masktrain.data import cache_format as fmt
    from masktrain.data.cached_items import find_cached_items

    tiles = []
    for item in find_cached_items(train_toml, arch)[:OVERLAY_ITEMS]:
        tensors, metadata = fmt.load_cache_file(item.latent_path)
        key = fmt.item_tensor_keys(tensors, item.latent_path).mask_weights
        if key is None:
            continue
        weight = tensors[key][0, 0].float().clamp(0, 1).numpy()  # (h, w) raw weight, first frame
        with Image.open(metadata.source) as photo:
            image = photo.convert("L")
        if metadata.bucket is not None and image.size != tuple(metadata.bucket):
            bucket_width, bucket_height = metadata.bucket
            image = image.resize((bucket_width, bucket_height), Image.Resampling.BILINEAR)
        grey = np.asarray(image, dtype=np.float32) * 0.6 + 100  # faded, so the red reads
        label = f"{Path(metadata.source).stem}: {weight.shape[1]}x{weight.shape[0]} latent mask"
        tiles.append((grey, weight, label))
    return tiles


def _curve_panel(
    axes: Axes,
    title: str,
    curves: dict[str, tuple[np.ndarray, np.ndarray]],
    y_range: tuple[float, float],
    x_max: float,
) -> None:
    for key, label, colour in CURVES:
        if key in curves:
            steps, values = curves[key]
            axes.plot(steps, values, color=colour, linewidth=1.5, label=label)
    axes.set_title(title)
    axes.set_xlabel("step")
    axes.set_xlim(0, max(x_max, 1))
    axes.set_ylim(*y_range)
    _grid(axes)


def training_figure(runs: Sequence[Run], train_toml: Path, arch: str) -> Figure:
    """``report.png``: the runs' per-region training curves over a row of mask overlays."""
    curves = _curves(runs)
    values = np.concatenate([v for run in curves.values() for _, v in run.values()] or [np.zeros(1)])
    low, high = float(values.min()), float(values.max())
    pad = max(high - low, 1e-6) * 0.05
    y_range = (max(0.0, low - pad), high + pad)
    x_max = max((float(s.max()) for run in curves.values() for s, _ in run.values()), default=1.0)
    tiles = _overlays(train_toml, arch)

    figure = Figure(figsize=(12.4, 7.0 if tiles else 3.6), dpi=DPI, layout="constrained")
    if tiles:
        top, bottom = figure.subfigures(2, 1, squeeze=False, height_ratios=[1, 1.05])[:, 0]
    else:
        top, bottom = figure, None
    panels = top.subplots(1, max(len(runs), 1), sharey=True, squeeze=False)[0]
    for axes, run in zip(panels, runs, strict=False):
        _curve_panel(axes, run.spec.name, curves.get(run.spec.name, {}), y_range, x_max)
    panels[0].set_ylabel("per-region loss (moving average)")
    legend = [Line2D([], [], color=colour, linewidth=2.5, label=label) for _, label, colour in CURVES]
    top.legend(handles=legend, loc="outside upper center", ncols=len(CURVES), frameon=False)

    if bottom is not None:
        caption = "mask weight on the latent grid, as the loss sees it (red = weight 1)"
        bottom.suptitle(caption, x=0.01, ha="left", fontsize="large")
        cells = bottom.subplots(1, OVERLAY_ITEMS, squeeze=False)[0]
        for axes, (grey, weight, label) in zip(cells, tiles, strict=False):
            extent = (0, grey.shape[1], grey.shape[0], 0)  # the mask's cells span the image
            axes.imshow(grey, cmap="gray", vmin=0, vmax=255, extent=extent, interpolation="nearest")
            axes.imshow(weight, cmap=MASK_RED, vmin=0, vmax=1, extent=extent, interpolation="nearest")
            axes.set_xticks([])
            axes.set_yticks([])
            axes.set_xlabel(label)
        for axes in cells[len(tiles) :]:
            axes.set_visible(False)
    return figure


# --- bleed.png ----------------------------------------------------------------------------------


def _colour(name: str) -> str:
    return RUN_COLOURS.get(name, OTHER_COLOUR)


def _photos(result: BleedResult) -> list[tuple[Path, str]]:
    data = result.seeds[0].tomls["train"].parent
    return [
        (data / "train" / "images" / "train_000.png", "a training photo (the room)"),
        (data / "heldout" / "images" / "heldout_000.png", "a held-out photo"),
        (data / "twin" / "images" / "twin_000.png", "its twin: the training room"),
        (data / "control" / "images" / "control_000.png", "in an unseen room"),
    ]


def _bars(
    axes: Axes, title: str, values: dict[str, list[float]], hollow: dict[str, float] | None = None
) -> None:
    """A bar per run at its mean, a dot per seed, and (`hollow`) a ring per run."""
    names = list(values)
    where = np.arange(len(names), dtype=np.float64)
    means = [float(np.mean(seeds)) for seeds in values.values()]
    axes.bar(where, means, width=0.6, color=[_colour(name) for name in names])
    for x, seeds in zip(where, values.values(), strict=True):
        axes.scatter(np.full(len(seeds), x), seeds, s=18, color="black", zorder=3)
    if hollow is not None:
        rings = [hollow[name] for name in names]
        axes.scatter(
            where + 0.15, rings, s=60, facecolors="none", edgecolors="black", linewidths=1.5, zorder=3
        )
    axes.axhline(0, color="0.25", linewidth=0.8)
    axes.set_xticks(where, [name.replace("masked_prior", "m+prior") for name in names], fontsize="small")
    axes.set_title(title)
    _grid(axes)


def _noise_curves(axes: Axes, result: BleedResult) -> None:
    for name in result.names:
        by_seed = np.array([seed.scores[name].bleed_by_noise for seed in result.seeds], dtype=np.float64)
        drawn = np.isfinite(by_seed)  # NaN: no draw of that seed fell in the bin
        counts = drawn.sum(axis=0)
        sums = np.where(drawn, by_seed, 0.0).sum(axis=0)
        curve = np.divide(sums, counts, out=np.full(counts.shape, np.nan), where=counts > 0)
        bins = np.flatnonzero(np.isfinite(curve))  # a bin no draw fell in is left out
        axes.plot(bins, curve[bins], color=_colour(name), linewidth=2.5, label=name)
    labels = [f"{index / NOISE_BINS:.1f}-{(index + 1) / NOISE_BINS:.1f}" for index in range(NOISE_BINS)]
    axes.set_xticks(range(NOISE_BINS), labels, fontsize="small")
    axes.set_xlabel("noise level (sigma)")
    axes.set_title("bleed by noise level")
    axes.legend(loc="upper left", fontsize="small", frameon=False)  # bleed grows with the noise level
    _grid(axes)


def bleed_figure(result: BleedResult) -> Figure:
    """``bleed.png``: the scenario's photos over bleed, subject improvement and bleed by noise."""
    from PIL import Image

    figure = Figure(figsize=(11.6, 6.4), dpi=DPI, layout="constrained")
    top, bottom = figure.subfigures(2, 1, squeeze=False, height_ratios=[0.8, 1])[:, 0]
    top.suptitle(f"bleed scenario, seed {result.seeds[0].seed}:", x=0.01, ha="left", fontsize="large")
    for axes, (path, label) in zip(top.subplots(1, 4), _photos(result), strict=True):
        with Image.open(path) as photo:
            axes.imshow(np.asarray(photo.convert("RGB")))
        axes.set_xticks([])
        axes.set_yticks([])
        axes.set_xlabel(label)
    bleeds = {name: result.values(name, "bleed") for name in result.names}
    unseen = {name: result.mean(name, "bleed_unseen_room") for name in result.names}
    subject = {name: result.values(name, "subject_improvement") for name in result.names}
    panels = bottom.subplots(1, 3)
    _bars(panels[0], "bleed (dots: seeds; ring: unseen room)", bleeds, unseen)
    _bars(panels[1], "subject improvement", subject)
    _noise_curves(panels[2], result)
    return figure
