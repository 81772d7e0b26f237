"""The bleed scenario's part of the demo report: its plain-text table, its section of
``report.md`` and its entry in ``report.json`` (its picture, ``bleed.png``, is drawn by
``demo/drawing.py``)."""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any

from masktrain.config.demo import DemoConfig
from masktrain.demo import bleed
from masktrain.demo.evaluate import NOISE_BINS
from masktrain.demo.runs import cache_command

FIELDS = ("subject_improvement", "background_drift", "bleed", "bleed_unseen_room")


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
