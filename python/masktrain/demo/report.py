"""The demo's outputs: ``report.json`` (the scores and the command line of every run),
``report.md`` (the tables and the commands) and, for the random-background scenario,
``report.png`` (the per-region training curves of the three runs from their ``metrics.jsonl`` and
a row of mask overlays at latent resolution, as the loss sees them). The bleed scenario's part
(its section, its JSON and ``bleed.png``) is written by ``demo/bleed_report.py``. Pictures are
drawn with Pillow alone (no plotting library).
"""

from __future__ import annotations

import io
import json
import shlex
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from masktrain import atomic, catalog
from masktrain.config.demo import DemoConfig

if TYPE_CHECKING:
    from PIL import ImageDraw, ImageFont

    from masktrain.demo import Run
    from masktrain.demo.bleed import BleedResult
    from masktrain.demo.evaluate import Score

CURVES = (  # metrics.jsonl key, legend, colour
    ("loss_face", "face", (214, 39, 40)),
    ("loss_body", "hair + body", (255, 127, 14)),
    ("loss_background", "background", (31, 119, 180)),
    ("prior_loss", "prior term", (44, 160, 44)),
)
OVERLAY_ITEMS = 4
PANEL_W, PANEL_H = 340, 230
MARGIN = 56


@dataclass(frozen=True)
class RandomResult:
    """The random-background scenario: its three runs, their scores and the split TOMLs."""

    runs: list[Run]
    scores: dict[str, Score]
    tomls: dict[str, Path]


@dataclass(frozen=True)
class DemoReport:
    output_dir: Path
    scores: dict[str, Score]
    """The random-background scenario's scores per run (empty when it did not run)."""
    commands: dict[str, str]
    """``masktrain train ...`` per run of the random-background scenario."""
    cache_commands: list[str]
    loras: dict[str, Path]
    bleed: BleedResult | None = None
    """The bleed scenario (None when it did not run)."""

    @property
    def json_path(self) -> Path:
        return self.output_dir / "report.json"

    def table(self) -> str:
        """The scores as plain-text tables: the random-background scenario's, then the bleed
        scenario's."""
        tables = []
        if self.scores:
            lines = [f"{'run':<14}{'subject_improvement':>21}{'background_drift':>18}"]
            for name, score in self.scores.items():
                lines.append(f"{name:<14}{score.subject_improvement:>+21.3f}{score.background_drift:>18.4f}")
            tables.append("\n".join(lines))
        if self.bleed is not None:
            from masktrain.demo import bleed_report

            tables.append(bleed_report.table(self.bleed))
        return "\n\n".join(tables)


def write(config: DemoConfig, random: RandomResult | None, bleed: BleedResult | None) -> DemoReport:
    """Write report.json, report.md and the pictures (report.png, bleed.png) of the scenarios
    that ran under the demo's output folder."""
    from masktrain.demo import bleed_report

    out = config.output_dir
    runs = [] if random is None else random.runs
    report = DemoReport(
        output_dir=out,
        scores={} if random is None else random.scores,
        commands={run.spec.name: run.command for run in runs},
        cache_commands=[]
        if random is None
        else [cache_command(t, config.arch) for t in random.tomls.values()],
        loras={run.spec.name: run.lora for run in runs},
        bleed=bleed,
    )
    document: dict[str, Any] = {"arch": config.arch, "steps": config.steps, "seed": config.seed}
    sections = [] if random is not None else ["# masktrain demo\n"]
    if random is not None:
        document = _json(config, runs, report)
        sections.append(_markdown(config, runs, report))
        write_png(_picture(runs, random.tomls["train"], config.arch), out / "report.png")
    else:
        (out / "report.png").unlink(missing_ok=True)  # an earlier demo's, of runs not redone
    if bleed is not None:
        document["bleed"] = bleed_report.json_section(config, bleed)
        sections.append(bleed_report.markdown(config, bleed))
        write_png(bleed_report.picture(config, bleed), out / "bleed.png")
    else:
        (out / "bleed.png").unlink(missing_ok=True)
    atomic.write_text(report.json_path, json.dumps(document, indent=2) + "\n")
    atomic.write_text(out / "report.md", "\n".join(sections))
    return report


def write_png(picture: Any, path: Path) -> None:
    png = io.BytesIO()
    picture.save(png, format="PNG")
    atomic.write_bytes(path, png.getvalue())


def cache_command(toml: Path, arch: str) -> str:
    text_flag = catalog.arch(arch).text_flag
    command = ["masktrain", "cache", "--dataset_config", str(toml), "--arch", arch, "--vae", "tiny"]
    return shlex.join([*command, text_flag, "tiny", "--device", "cpu"])


def _json(config: DemoConfig, runs: list[Run], report: DemoReport) -> dict[str, Any]:
    return {
        "arch": config.arch,
        "steps": config.steps,
        "seed": config.seed,
        "evaluation": {
            "heldout_items": config.heldout_items,
            "noise_draws_per_item": config.eval_draws,
            "subject": "raw mask weight >= 0.75 (face)",
            "background": "raw mask weight < 0.05",
            "subject_improvement": "(L_base - L_lora) / L_base of the flow-matching loss on subject cells",
            "background_drift": "mean squared (LoRA - base) prediction on background cells",
        },
        "cache_commands": report.cache_commands,
        "runs": {
            run.spec.name: {
                **{k: v for k, v in asdict(report.scores[run.spec.name]).items() if v is not None},
                "description": run.spec.description,
                "command": run.command,
                "lora": str(run.lora),
                "metrics": str(run.output_dir / "metrics.jsonl"),
            }
            for run in runs
        },
    }


def _markdown(config: DemoConfig, runs: list[Run], report: DemoReport) -> str:
    rows = "\n".join(
        f"| `{run.spec.name}` | {run.spec.description} | "
        f"{report.scores[run.spec.name].subject_improvement:+.3f} | "
        f"{report.scores[run.spec.name].background_drift:.4f} |"
        for run in runs
    )
    commands = "\n\n".join(f"`{run.spec.name}`:\n\n```sh\n{run.command}\n```" for run in runs)
    cache = "\n".join(report.cache_commands)
    return f"""# masktrain demo

Three LoRAs trained from the same tiny {config.arch} transformer and seed ({config.steps} steps each)
on {config.train_items} images of one subject with tiered masks (face 255, body 128, hair 80,
background 0) over a different background in each image, scored on {config.heldout_items} held-out
images ({config.eval_draws} noise draws each, the same noise for every model) against the base model.

| run | settings | subject improvement | background drift |
|---|---|---:|---:|
{rows}

- **subject improvement**: how much lower the flow-matching loss is on the subject (raw mask
  weight >= 0.75) than the base model's, as a fraction of the base model's loss. Higher is better.
- **background drift**: mean squared difference between the LoRA's and the base model's
  predictions outside the mask (raw weight < 0.05). Lower means the LoRA leaves backgrounds alone.

A mask weight is a loss weight, not a crop: with the mask loss alone nothing holds the background,
so the LoRA still changes it. Masked prior preservation pulls the prediction there back to the base
model's.

![training curves and masks](report.png)

## Commands

Cache:

```sh
{cache}
```

{commands}
"""


def load_font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _smooth(values: np.ndarray) -> np.ndarray:
    """A centred moving average over a tenth of the run (the per-step tier losses are noisy: each
    step draws new noise levels)."""
    window = max(1, len(values) // 10)
    if window == 1:
        return values
    kernel = np.ones(window) / window
    padded = np.pad(values, (window // 2, window - 1 - window // 2), mode="edge")
    return np.convolve(padded, kernel, mode="valid")


def _curves(runs: list[Run]) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    curves: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    for run in runs:
        records = _records(run.output_dir / "metrics.jsonl")
        steps = np.array([r["step"] for r in records], dtype=np.float64)
        curves[run.spec.name] = {}
        for key, _, _ in CURVES:
            values = [r.get(key) for r in records]
            if key == "prior_loss" and not any(values):
                continue  # runs without prior preservation
            if all(v is not None for v in values):
                curves[run.spec.name][key] = (steps, _smooth(np.array(values, dtype=np.float64)))
    return curves


def ticks(low: float, high: float, count: int = 4) -> list[float]:
    step = (high - low) / count
    magnitude = 10 ** np.floor(np.log10(step)) if step > 0 else 1.0
    step = min((m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= step), default=step)
    start = np.ceil(low / step) * step
    return [float(v) for v in np.arange(start, high + step * 1e-6, step)]


def _panel(
    draw: ImageDraw.ImageDraw,
    origin: tuple[int, int],
    title: str,
    curves: dict[str, tuple[np.ndarray, np.ndarray]],
    y_range: tuple[float, float],
    x_max: float,
) -> None:
    left, top = origin
    right, bottom = left + PANEL_W, top + PANEL_H
    font = load_font(13)
    draw.text((left + PANEL_W // 2, top - 22), title, fill="black", font=load_font(15), anchor="mm")
    draw.rectangle((left, top, right, bottom), outline=(90, 90, 90))
    low, high = y_range

    def to_xy(x: float, y: float) -> tuple[float, float]:
        return (left + (x / max(x_max, 1)) * PANEL_W, bottom - (y - low) / (high - low) * PANEL_H)

    for tick in ticks(low, high):
        _, y = to_xy(0, tick)
        draw.line((left, y, right, y), fill=(230, 230, 230))
        draw.text((left - 6, y), f"{tick:g}", fill="black", font=font, anchor="rm")
    for tick in ticks(0, x_max):
        x, _ = to_xy(tick, low)
        draw.line((x, bottom, x, bottom + 4), fill=(90, 90, 90))
        draw.text((x, bottom + 6), f"{tick:g}", fill="black", font=font, anchor="mt")
    draw.text((left + PANEL_W // 2, bottom + 22), "step", fill="black", font=font, anchor="mt")
    for key, _, colour in CURVES:
        if key in curves:
            steps, values = curves[key]
            points = [to_xy(x, min(max(y, low), high)) for x, y in zip(steps, values, strict=True)]
            if len(points) > 1:
                draw.line(points, fill=colour, width=2)


def _overlays(train_toml: Path, arch: str, display: int) -> list[tuple[np.ndarray, str]]:
    """(RGB overlay, label) of the first training items: the image (faded to grey) tinted red by
    the cached mask weight, upsampled from the latent grid with nearest so each latent cell shows
    as a block."""
    from PIL import Image

    from masktrain.data import cache_format as fmt
    from masktrain.data.cached_items import find_cached_items

    tiles = []
    for item in find_cached_items(train_toml, arch)[:OVERLAY_ITEMS]:
        tensors, metadata = fmt.load_cache_file(item.latent_path)
        key = fmt.item_tensor_keys(tensors, item.latent_path).mask_weights
        if key is None:
            continue
        mask = tensors[key]
        weight = mask[0, 0].float().clamp(0, 1).numpy()  # (h, w) raw weight, first frame
        image = Image.open(metadata.source).convert("RGB")
        if metadata.bucket is not None and image.size != tuple(metadata.bucket):
            bucket_width, bucket_height = metadata.bucket
            image = image.resize((bucket_width, bucket_height), Image.Resampling.BILINEAR)
        image = image.resize((display, display * image.height // image.width), Image.Resampling.NEAREST)
        cells = Image.fromarray((weight * 255).astype(np.uint8)).resize(image.size, Image.Resampling.NEAREST)
        alpha = np.asarray(cells, dtype=np.float32)[..., None] / 255 * 0.8
        grey = np.asarray(image.convert("L"), dtype=np.float32)[..., None] * 0.6 + 100  # faded
        tinted = grey * (1 - alpha) + np.array([230.0, 20.0, 60.0]) * alpha
        label = f"{Path(metadata.source).stem}: {weight.shape[1]}x{weight.shape[0]} latent mask"
        tiles.append((tinted.clip(0, 255).astype(np.uint8), label))
    return tiles


def _picture(runs: list[Run], train_toml: Path, arch: str) -> Any:
    from PIL import Image, ImageDraw

    curves = _curves(runs)
    values = np.concatenate([v for run in curves.values() for _, v in run.values()] or [np.zeros(1)])
    low, high = float(values.min()), float(values.max())
    pad = max(high - low, 1e-6) * 0.05
    y_range = (max(0.0, low - pad), high + pad)
    x_max = max((float(s.max()) for run in curves.values() for s, _ in run.values()), default=1.0)

    display = 240
    tiles = _overlays(train_toml, arch, display)
    width = MARGIN + len(runs) * (PANEL_W + MARGIN)
    tile_height = max((t.shape[0] for t, _ in tiles), default=0)
    height = 40 + 30 + PANEL_H + 60 + 40 + tile_height + 40
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    font = load_font(13)

    # Legend across the top.
    x = MARGIN
    for _, label, colour in CURVES:
        draw.line((x, 22, x + 24, 22), fill=colour, width=3)
        draw.text((x + 30, 22), label, fill="black", font=font, anchor="lm")
        x += 40 + int(draw.textlength(label, font=font)) + 20
    draw.text(
        (width - MARGIN, 22), "per-region loss (moving average)", fill=(90, 90, 90), font=font, anchor="rm"
    )

    top = 40 + 30
    for index, run in enumerate(runs):
        origin = (MARGIN + index * (PANEL_W + MARGIN), top)
        _panel(draw, origin, run.spec.name, curves.get(run.spec.name, {}), y_range, x_max)

    row = top + PANEL_H + 60
    caption = "mask weight on the latent grid, as the loss sees it (red = weight 1)"
    draw.text((MARGIN, row + 10), caption, fill="black", font=load_font(15), anchor="lm")
    x = MARGIN
    for tile, label in tiles:
        canvas.paste(Image.fromarray(tile), (x, row + 30))
        draw.text(
            (x + tile.shape[1] // 2, row + 34 + tile.shape[0]), label, fill="black", font=font, anchor="mt"
        )
        x += tile.shape[1] + 20
    return canvas
