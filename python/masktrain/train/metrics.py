"""Per-step metrics: the loss per mask tier and the prior term, on the progress bar, in
``OUTPUT_DIR/metrics.jsonl`` (one JSON object per optimizer step) and in the run's trackers
(``train.trackers``: TensorBoard, wandb).

Tiers are bins of the RAW cached weight (before gamma and floor): background < 0.05 <= hair and
body < 0.75 <= face. The tier losses are plain means of the per-element flow-matching loss
inside each tier, so they show what the model learns where, whatever the weighting does.

With WAN 2.2's two experts each step also records the samples each expert took, over every
process (``high_noise_samples``, ``low_noise_samples``): with ``--lora_per_expert`` an expert's
LoRA stepped exactly when its count is above 0. :meth:`MetricsLog.expert_summary` is the run's
share of steps per expert (the records kept across a resume included), logged at the end.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from masktrain import atomic
from masktrain.train.trackers import Trackers

log = logging.getLogger(__name__)

SAMPLES = "_samples"
"""The suffix of an expert's sample count in ``metrics.jsonl`` (``high_noise_samples``)."""


@dataclass(frozen=True)
class StepRecord:
    """One optimizer step's metrics: one line of ``metrics.jsonl``."""

    step: int
    epoch: int
    loss: float
    """Mean over the step's batches of the reduced loss (target + prior term)."""
    prior_loss: float
    """Mean of the prior term."""
    lr: float
    tiers: dict[str, float]
    """Mean per-element flow-matching loss per tier (``face``, ``body``, ``background``) that
    held cells in the step's batches."""
    step_time: float
    """Seconds from the end of the previous step."""
    data_wait: float
    """Seconds of that spent waiting for the loader."""
    extras: dict[str, float] = field(default_factory=dict)
    """Means over the step's batches of ``teacher_ran``, ``prior_mass`` and Huber's linear shares
    (``compute_loss``), when they apply."""
    experts: dict[str, int] = field(default_factory=dict)
    """WAN 2.2: the samples each expert took in the step, over every process (``high_noise``,
    ``low_noise``)."""

    def to_json(self) -> dict[str, float | int]:
        """The flat JSON object of ``metrics.jsonl`` (``loss_face``, ... for the tiers)."""
        return {
            "step": self.step,
            "epoch": self.epoch,
            "loss": self.loss,
            "prior_loss": self.prior_loss,
            "lr": self.lr,
            **{f"loss_{name}": value for name, value in sorted(self.tiers.items())},
            **dict(sorted(self.extras.items())),
            **{f"{expert}{SAMPLES}": count for expert, count in self.experts.items()},
            "step_time": self.step_time,
            "data_wait": self.data_wait,
        }


@dataclass
class StepMetrics:
    """Sums over the micro-batches of one optimizer step."""

    loss: float = 0.0
    prior: float = 0.0
    batches: int = 0
    tiers: dict[str, list[float]] = field(default_factory=dict)
    extras: dict[str, list[float]] = field(default_factory=dict)
    experts: dict[str, int] = field(default_factory=dict)
    """This process's samples per expert (``StepResult.experts``)."""

    def add(
        self,
        loss: float,
        prior: float,
        tiers: dict[str, float | None],
        extras: dict[str, float] | None = None,
        experts: dict[str, int] | None = None,
    ) -> None:
        self.loss += loss
        self.prior += prior
        self.batches += 1
        for expert, count in (experts or {}).items():
            self.experts[expert] = self.experts.get(expert, 0) + count
        for name, value in tiers.items():
            if value is not None:
                self.tiers.setdefault(name, []).append(value)
        for name, value in (extras or {}).items():
            self.extras.setdefault(name, []).append(value)

    def record(
        self,
        step: int,
        epoch: int,
        lr: float,
        *,
        step_time: float,
        data_wait: float,
        experts: dict[str, int] | None = None,
    ) -> StepRecord:
        """The step's record; `experts`: the samples per expert over every process (default: this
        process's)."""
        n = max(self.batches, 1)
        return StepRecord(
            step=step,
            epoch=epoch,
            loss=self.loss / n,
            prior_loss=self.prior / n,
            lr=lr,
            tiers={name: sum(values) / len(values) for name, values in self.tiers.items()},
            step_time=step_time,
            data_wait=data_wait,
            extras={name: sum(values) / len(values) for name, values in self.extras.items()},
            experts=dict(self.experts if experts is None else experts),
        )


def progress_postfix(record: StepRecord) -> dict[str, str]:
    shown = {"loss": record.loss}
    for name in ("face", "body", "background"):
        if name in record.tiers:
            shown[name[:4] if name != "background" else "bg"] = record.tiers[name]
    if record.prior_loss:
        shown["prior"] = record.prior_loss
    return {key: f"{value:.4g}" for key, value in shown.items()}


class MetricsLog:
    """Appends records to metrics.jsonl (kept across a resume) and passes them to the trackers."""

    def __init__(self, output_dir: Path, resume_step: int | None, trackers: Trackers | None = None):
        self.path = output_dir / "metrics.jsonl"
        self.steps = 0
        """Step records of the run, those kept from before a resume included."""
        self.expert_steps: Counter[str] = Counter()
        """Of those, the steps in which each expert took a sample."""
        self.expert_samples: Counter[str] = Counter()
        if resume_step is None:
            self.path.unlink(missing_ok=True)
        else:  # drop the records a killed run wrote after its last checkpoint
            self._truncate_after(resume_step)
        self.trackers = trackers

    def _truncate_after(self, step: int) -> None:
        """Keep the records up to the checkpoint's step. A line that does not parse (a write cut
        short, e.g. by a full disk) is dropped with a warning rather than blocking the resume."""
        if not self.path.exists():
            return
        kept = []
        lines = self.path.read_text(encoding="utf-8", errors="replace").splitlines()
        for number, line in enumerate(lines, start=1):
            try:
                record = json.loads(line) if line.strip() else None
            except json.JSONDecodeError:
                log.warning("%s: line %d is torn (a write cut short); dropped", self.path, number)
                continue
            if isinstance(record, dict) and record.get("step", step + 1) <= step:
                kept.append(line)
                if "loss" in record:  # a step's record, not validation's
                    self._tally(record)
        atomic.write_text(self.path, "".join(line + "\n" for line in kept))

    def _tally(self, values: Mapping[str, object]) -> None:
        self.steps += 1
        for key, count in values.items():
            if key.endswith(SAMPLES) and isinstance(count, int):
                expert = key.removesuffix(SAMPLES)
                self.expert_steps[expert] += int(count > 0)
                self.expert_samples[expert] += count

    def expert_summary(self) -> str | None:
        """The run's share of steps per WAN 2.2 expert, in words; None with one transformer."""
        if not self.expert_samples:
            return None
        steps, samples = self.expert_steps, self.expert_samples
        shares = [
            f"{expert.replace('_', '-')} {steps[expert]} of {self.steps} steps "
            f"({100 * steps[expert] / max(self.steps, 1):.1f}%, {samples[expert]} samples)"
            for expert in sorted(samples)
        ]
        return "steps with samples per expert: " + ", ".join(shares)

    def write(self, record: StepRecord) -> None:
        values = record.to_json()
        self._tally(values)
        try:
            with self.path.open("a") as file:
                file.write(json.dumps(values) + "\n")
        except OSError as error:
            raise atomic.write_error(error, self.path) from error
        if self.trackers is not None:
            self.trackers.scalars(
                record.step,
                {
                    key.replace("loss_", "loss/"): value
                    for key, value in values.items()
                    if key not in ("step", "epoch")
                    and isinstance(value, int | float)
                    and math.isfinite(value)
                },
            )

    def write_validation(self, step: int, metrics: dict[str, float]) -> None:
        """One line ``{"step": N, "val_loss_face": ..., ...}`` (see ``train.validation``)."""
        try:
            with self.path.open("a") as file:
                file.write(json.dumps({"step": step, **metrics}) + "\n")
        except OSError as error:
            raise atomic.write_error(error, self.path) from error
        if self.trackers is not None:
            self.trackers.scalars(
                step,
                {
                    key.replace("val_", "val/"): value
                    for key, value in metrics.items()
                    if math.isfinite(value)
                },
            )

    def close(self) -> None:
        if self.trackers is not None:
            self.trackers.close()
