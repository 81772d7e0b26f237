"""The demo's outputs: ``report.json`` (the scores and the command line of every run) and
``report.md`` (the tables and the commands) of the scenarios that ran, and their pictures
(``report.png`` for the random-background scenario, ``bleed.png`` for the bleed scenario; drawn
by ``demo/drawing.py``). The bleed scenario's table, section and JSON are written by
``demo/bleed_report.py``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from masktrain import atomic
from masktrain.config.demo import DemoConfig
from masktrain.demo import bleed_report, drawing
from masktrain.demo.runs import cache_command

if TYPE_CHECKING:
    from masktrain.demo.bleed import BleedResult
    from masktrain.demo.evaluate import Score
    from masktrain.demo.runs import Run


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
            tables.append(bleed_report.table(self.bleed))
        return "\n\n".join(tables)


def write(config: DemoConfig, random: RandomResult | None, bleed: BleedResult | None) -> DemoReport:
    """Write report.json, report.md and the pictures (report.png, bleed.png) of the scenarios
    that ran under the demo's output folder."""
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
        picture = drawing.training_figure(runs, random.tomls["train"], config.arch)
        drawing.write_png(picture, out / "report.png")
    else:
        (out / "report.png").unlink(missing_ok=True)  # an earlier demo's, of runs not redone
    if bleed is not None:
        document["bleed"] = bleed_report.json_section(config, bleed)
        sections.append(bleed_report.markdown(config, bleed))
        drawing.write_png(drawing.bleed_figure(bleed), out / "bleed.png")
    else:
        (out / "bleed.png").unlink(missing_ok=True)
    atomic.write_text(report.json_path, json.dumps(document, indent=2) + "\n")
    atomic.write_text(out / "report.md", "\n".join(sections))
    return report


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
