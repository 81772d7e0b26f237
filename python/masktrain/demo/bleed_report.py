"""The bleed scenario's part of the demo report: its plain-text table, its section of
``report.md``, its entry in ``report.json`` and ``bleed.png`` (the scenario's photos, then bleed
and subject improvement per run with every seed shown, and bleed by noise level)."""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from masktrain.config.demo import DemoConfig
from masktrain.demo import bleed
from masktrain.demo.evaluate import NOISE_BINS
from masktrain.demo.report import cache_command, load_font, ticks

if TYPE_CHECKING:
    from PIL import Image, ImageDraw

FIELDS = ("subject_improvement", "background_drift", "bleed", "bleed_unseen_room")
COLOURS = {  # run name -> bar colour
    "unmasked": (127, 127, 127),
    "masked": (255, 127, 14),
    "masked_prior": (44, 160, 44),
}
OTHER_COLOUR = (148, 103, 189)
PANEL_W, PANEL_H, MARGIN = 300, 220, 64
TILE = 128


def _colour(name: str) -> tuple[int, int, int]:
    return COLOURS.get(name, OTHER_COLOUR)


def ratios(result: bleed.BleedResult) -> dict[str, float]:
    """The comparisons the scenario is about, on the means over seeds."""
    mean = result.mean
    out = {
        "masked_prior_bleed_over_unmasked": mean("masked_prior", "bleed") / mean("unmasked", "bleed"),
        "masked_subject_over_unmasked": mean("masked", "subject_improvement")
        / mean("unmasked", "subject_improvement"),
        "masked_prior_subject_over_masked": mean("masked_prior", "subject_improvement")
        / mean("masked", "subject_improvement"),
    }
    if bleed.BEST.name in result.names:
        best = bleed.BEST.name
        out[f"{best}_bleed_over_unmasked"] = mean(best, "bleed") / mean("unmasked", "bleed")
        out[f"{best}_subject_over_masked"] = mean(best, "subject_improvement") / mean(
            "masked", "subject_improvement"
        )
    return out


def table(result: bleed.BleedResult) -> str:
    seeds = ", ".join(str(seed.seed) for seed in result.seeds)
    lines = [
        f"bleed scenario (every training photo in one room), seeds {seeds}: mean ± spread",
        f"{'run':<18}" + "".join(f"{field:>22}" for field in FIELDS),
    ]
    for name in result.names:
        cells = "".join(
            f"{result.mean(name, field):>+14.3f} ± {result.spread(name, field):.3f}" for field in FIELDS
        )
        lines.append(f"{name:<18}{cells}")
    return "\n".join(lines)


def json_section(config: DemoConfig, result: bleed.BleedResult) -> dict[str, Any]:
    return {
        "scenario": "every training photo in one room; held-out photos in other rooms",
        "seeds": [seed.seed for seed in result.seeds],
        "selection_seeds": list(bleed.SELECTION_SEEDS),
        "fourth_run": {
            "name": bleed.BEST.name,
            "chosen_by": "scripts/choose_bleed_run.py (masktrain.demo.bleed.choose) on the selection seeds",
            "rule": f"of the new options keeping {bleed.KEEP_SUBJECT:.0%} of the masked run's subject "
            "improvement, the lowest bleed",
        },
        "evaluation": {
            "heldout_items": config.heldout_items,
            "noise_draws_per_item": config.eval_draws,
            "bleed": "1 - |x_lora - z_twin|^2 / |x_base - z_twin|^2 on held-out background cells, "
            "x = noisy - sigma * v (each model's clean-latent estimate), z_twin = the latents of the "
            "same held-out item rendered in the training room",
            "bleed_unseen_room": "the same against the held-out item rendered in a room no split has seen",
            "bleed_by_noise": f"bleed within {NOISE_BINS} equal noise-level bins, 0 to 1",
            "spread": "sample standard deviation over the seeds",
        },
        "ratios": ratios(result),
        "runs": {name: _run_json(result, name) for name in result.names},
    }


def _json_floats(values: tuple[float, ...] | None) -> list[float | None] | None:
    """`values` with NaN (a noise bin no draw fell in) as null: NaN is not JSON."""
    return None if values is None else [None if math.isnan(v) else v for v in values]


def _run_json(result: bleed.BleedResult, name: str) -> dict[str, Any]:
    """One run: its settings, mean and spread over the seeds, and each seed's scores and files."""
    per_seed = {seed.seed: next(run for run in seed.runs if run.spec.name == name) for seed in result.seeds}
    spec = per_seed[result.seeds[0].seed].spec
    return {
        "description": spec.description,
        "flags": list(spec.flags),
        "mean": {field: result.mean(name, field) for field in FIELDS},
        "spread": {field: result.spread(name, field) for field in FIELDS},
        "seeds": {
            str(seed.seed): {
                **asdict(seed.scores[name]),
                "bleed_by_noise": _json_floats(seed.scores[name].bleed_by_noise),
                "command": per_seed[seed.seed].command,
                "lora": str(per_seed[seed.seed].lora),
                "metrics": str(per_seed[seed.seed].output_dir / "metrics.jsonl"),
            }
            for seed in result.seeds
        },
    }


def markdown(config: DemoConfig, result: bleed.BleedResult) -> str:
    seeds = [seed.seed for seed in result.seeds]
    rows = "\n".join(
        f"| `{run.spec.name}` | {run.spec.description} | "
        + " | ".join(
            f"{result.mean(run.spec.name, f):+.3f} ± {result.spread(run.spec.name, f):.3f}" for f in FIELDS
        )
        + " |"
        for run in result.seeds[0].runs
    )
    r = ratios(result)
    first = result.seeds[0]
    commands = "\n\n".join(f"`{run.spec.name}`:\n\n```sh\n{run.command}\n```" for run in first.runs)
    cache = "\n".join(cache_command(toml, config.arch) for toml in first.tomls.values())
    return f"""## Bleed: every training photo in one room

The same three runs, and a fourth, trained on {config.train_items} photos of the subject all shot
in one room (one background, new camera noise per photo; the captions do not mention it), scored on
{config.heldout_items} held-out photos in other rooms. Each seed ({", ".join(map(str, seeds))}) draws its
own room, photos, LoRA initialisation and evaluation noise; the table gives the mean ± the sample
standard deviation over the seeds.

| run | settings | subject improvement | background drift | bleed | bleed, unseen room |
|---|---|---:|---:|---:|---:|
{rows}

- **bleed**: on held-out background cells, `1 - |x_lora - z_twin|² / |x_base - z_twin|²`, where
  `x = noisy - sigma * v` is each model's estimate of the clean latents and `z_twin` the latents of the
  same held-out photo shot in the training room. 0: no nearer the training room than the base
  model; positive: the LoRA paints the room; negative: it moved away from it.
- **bleed, unseen room**: the same against the held-out photo shot in a room no split has seen.
  What bleed has beyond it is the training room itself; the rest is the LoRA changing backgrounds
  in general (with the tiny random base model, most of it: it is no denoiser to begin with).
- masked + prior bleeds {r["masked_prior_bleed_over_unmasked"]:.2f}x as much as unmasked and keeps
  {r["masked_prior_subject_over_masked"]:.0%} of the masked run's subject improvement; masked learns
  the subject {r["masked_subject_over_unmasked"]:.2f}x as well as unmasked.
- `{bleed.BEST.name}` is the option of the recipe chosen on seeds
  {", ".join(map(str, bleed.SELECTION_SEEDS))} (never reported) by `scripts/choose_bleed_run.py`: of the
  options keeping {bleed.KEEP_SUBJECT:.0%} of the masked run's subject improvement, the lowest bleed.

![bleed scenario](bleed.png)

### Commands (seed {first.seed}; the other seeds change `--seed` and the folders)

Cache:

```sh
{cache}
```

{commands}
"""


def _photos(result: bleed.BleedResult) -> list[tuple[Path, str]]:
    data = result.seeds[0].tomls["train"].parent
    return [
        (data / "train" / "images" / "train_000.png", "a training photo (the room)"),
        (data / "heldout" / "images" / "heldout_000.png", "a held-out photo"),
        (data / "twin" / "images" / "twin_000.png", "its twin: the training room"),
        (data / "control" / "images" / "control_000.png", "in an unseen room"),
    ]


def _bars(
    draw: ImageDraw.ImageDraw,
    origin: tuple[int, int],
    title: str,
    values: dict[str, list[float]],
    hollow: dict[str, float] | None = None,
) -> None:
    """A bar per run at its mean, a dot per seed, and (`hollow`) an open marker per run."""
    left, top = origin
    right, bottom = left + PANEL_W, top + PANEL_H
    small = load_font(12)
    everything = [v for vs in values.values() for v in vs] + list((hollow or {}).values()) + [0.0]
    low, high = min(everything), max(everything)
    pad = max(high - low, 1e-6) * 0.08
    low, high = low - (pad if low < 0 else 0), high + pad
    draw.text((left + PANEL_W // 2, top - 22), title, fill="black", font=load_font(15), anchor="mm")
    draw.rectangle((left, top, right, bottom), outline=(90, 90, 90))

    def y_of(value: float) -> float:
        return bottom - (value - low) / (high - low) * PANEL_H

    for tick in ticks(low, high):
        y = y_of(tick)
        draw.line((left, y, right, y), fill=(230, 230, 230))
        draw.text((left - 6, y), f"{tick:g}", fill="black", font=small, anchor="rm")
    draw.line((left, y_of(0), right, y_of(0)), fill=(60, 60, 60))
    slot = PANEL_W / len(values)
    for index, (name, seeds) in enumerate(values.items()):
        centre = left + slot * (index + 0.5)
        mean = float(np.mean(seeds))
        box = (centre - slot * 0.3, min(y_of(mean), y_of(0)), centre + slot * 0.3, max(y_of(mean), y_of(0)))
        draw.rectangle(box, fill=_colour(name))
        for value in seeds:
            y = y_of(value)
            draw.ellipse((centre - 3, y - 3, centre + 3, y + 3), fill="black")
        if hollow is not None:
            y = y_of(hollow[name])
            draw.ellipse(
                (centre + slot * 0.15 - 5, y - 5, centre + slot * 0.15 + 5, y + 5), outline="black", width=2
            )
        label = name.replace("masked_prior", "m+prior")
        draw.text((centre, bottom + 6), label, fill="black", font=small, anchor="mt")


def _noise_curves(draw: ImageDraw.ImageDraw, origin: tuple[int, int], result: bleed.BleedResult) -> None:
    left, top = origin
    right, bottom = left + PANEL_W, top + PANEL_H
    small = load_font(12)
    curves = {
        name: np.nanmean(np.array([seed.scores[name].bleed_by_noise for seed in result.seeds], float), axis=0)
        for name in result.names
    }
    values = np.concatenate([*curves.values(), np.zeros(1)])
    low, high = float(np.nanmin(values)), float(np.nanmax(values))
    pad = max(high - low, 1e-6) * 0.08
    low, high = low - (pad if low < 0 else 0), high + pad
    draw.text(
        (left + PANEL_W // 2, top - 22), "bleed by noise level", fill="black", font=load_font(15), anchor="mm"
    )
    draw.rectangle((left, top, right, bottom), outline=(90, 90, 90))

    def xy(bin_index: float, value: float) -> tuple[float, float]:
        return left + (bin_index + 0.5) / NOISE_BINS * PANEL_W, bottom - (value - low) / (
            high - low
        ) * PANEL_H

    for tick in ticks(low, high):
        _, y = xy(0, tick)
        draw.line((left, y, right, y), fill=(230, 230, 230))
        draw.text((left - 6, y), f"{tick:g}", fill="black", font=small, anchor="rm")
    for index in range(NOISE_BINS):
        x, _ = xy(index, low)
        draw.text(
            (x, bottom + 6),
            f"{index / NOISE_BINS:.1f}-{(index + 1) / NOISE_BINS:.1f}",
            fill="black",
            font=small,
            anchor="mt",
        )
    draw.text(
        (left + PANEL_W // 2, bottom + 24), "noise level (sigma)", fill="black", font=small, anchor="mt"
    )
    for index, (name, curve) in enumerate(curves.items()):
        points = [xy(i, float(v)) for i, v in enumerate(curve) if np.isfinite(v)]
        if len(points) > 1:
            draw.line(points, fill=_colour(name), width=3)
        legend_y = top + 12 + 16 * index  # top left: bleed grows with the noise level
        draw.line((left + 10, legend_y, left + 30, legend_y), fill=_colour(name), width=3)
        draw.text((left + 36, legend_y), name, fill="black", font=small, anchor="lm")


def picture(config: DemoConfig, result: bleed.BleedResult) -> Image.Image:
    from PIL import Image, ImageDraw

    width = MARGIN + 3 * (PANEL_W + MARGIN)
    photos_top, panels_top = 40, 40 + TILE + 70
    canvas = Image.new("RGB", (width, panels_top + PANEL_H + 70), "white")
    draw = ImageDraw.Draw(canvas)
    small = load_font(13)
    draw.text(
        (MARGIN, 20),
        f"bleed scenario, seed {result.seeds[0].seed}:",
        fill="black",
        font=load_font(15),
        anchor="lm",
    )
    x = MARGIN
    for path, label in _photos(result):
        with Image.open(path) as photo:
            canvas.paste(photo.convert("RGB").resize((TILE, TILE)), (x, photos_top))
        draw.text((x + TILE // 2, photos_top + TILE + 6), label, fill="black", font=small, anchor="mt")
        x += TILE + 90
    bleeds = {name: result.values(name, "bleed") for name in result.names}
    unseen = {name: result.mean(name, "bleed_unseen_room") for name in result.names}
    subject = {name: result.values(name, "subject_improvement") for name in result.names}
    _bars(draw, (MARGIN, panels_top), "bleed (dots: seeds; ring: unseen room)", bleeds, unseen)
    _bars(draw, (MARGIN + PANEL_W + MARGIN, panels_top), "subject improvement", subject)
    _noise_curves(draw, (MARGIN + 2 * (PANEL_W + MARGIN), panels_top), result)
    return canvas
