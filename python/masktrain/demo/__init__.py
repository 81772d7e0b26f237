"""``masktrain demo``: the weighted mask loss and masked prior preservation, shown on a tiny model.

1. Writes a synthetic dataset (``demo/dataset.py``): one subject with tiered masks over a
   different random background per image, plus held-out items of the same kind.
2. Caches both splits with ``masktrain cache`` (``cache.run``) and the tiny VAE and text encoder.
3. Trains three LoRAs from the same tiny base transformer and seed through the real ``train``
   path: each run is a ``masktrain train`` command line, parsed by the ``train`` command into a
   ``TrainConfig`` (``cli_train.build_config``) and passed to ``train.loop.run``, so the command
   in the report reproduces the run exactly.
4. Scores each LoRA on the held-out items against the base model (``demo/evaluate.py``) and
   writes ``report.json``, ``report.md`` and ``report.png`` (``demo/report.py``).

The expected outcome: every run learns the subject; the LoRA trained with the mask loss alone
changes the background about as much as (or more than) the unmasked one, because nothing holds
it there; masked prior preservation keeps the background close to the base model.
"""

from __future__ import annotations

import dataclasses
import logging
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from masktrain.demo.report import DemoReport
    from masktrain.train.config import TrainConfig

log = logging.getLogger(__name__)

DEFAULT_STEPS = 200
"""Optimizer steps per run of the default demo."""
NETWORK_DIM = 8
NETWORK_ALPHA = 8
LEARNING_RATE = 2e-3
TINY_LATENT_FACTOR = {"wan": 8, "qwen_image": 4}
"""Pixels per latent cell of each family's tiny VAE."""


@dataclass(frozen=True)
class RunSpec:
    name: str
    """Run (and LoRA file) name."""
    description: str
    """One line for the report."""
    flags: tuple[str, ...]
    """The mask flags of this run."""


RUNS = (
    RunSpec("unmasked", "no mask loss", ()),
    RunSpec(
        "masked",
        "mask loss, floor 0.05",
        ("--use_mask_loss", "--mask_gamma", "0.7", "--mask_min_weight", "0.05"),
    ),
    RunSpec(
        "masked_prior",
        "mask loss, floor 0, masked prior preservation",
        (
            "--use_mask_loss", "--mask_gamma", "0.7", "--mask_min_weight", "0",
            "--prior_preservation_weight", "1.0", "--prior_mask_threshold", "0.1", "--normalize_per_sample",
        ),
    ),
)  # fmt: skip


@dataclass(frozen=True)
class DemoConfig:
    output_dir: Path
    """Where the dataset, caches, the three runs and the report go."""
    arch: str = "wan"
    """Model family: wan or qwen_image (always its built-in tiny models)."""
    steps: int = DEFAULT_STEPS
    """Optimizer steps per run."""
    seed: int = 42
    """Seeds the dataset, the three runs (the same seed for all) and the evaluation noise."""
    train_items: int = 16
    """Training images."""
    heldout_items: int = 8
    """Held-out images for the evaluation."""
    image_size: int | None = None
    """Side of the square images; default 16 latent cells with the family's tiny VAE (128 pixels
    for wan, whose tiny VAE is 8x; 64 for qwen_image, whose tiny VAE is 4x)."""
    batch_size: int = 2
    """Training batch size (the dataset TOML's batch_size)."""
    eval_draws: int = 8
    """Noise draws (noise and noise level) per held-out item."""

    def validate(self) -> None:
        if self.arch not in ("wan", "qwen_image"):
            raise ValueError(f"--arch must be wan or qwen_image, not {self.arch!r}")
        if self.steps < 1:
            raise ValueError("--steps must be >= 1")
        if self.size % 16 or self.size < 32:
            raise ValueError("image_size must be a multiple of 16 and at least 32")
        if min(self.train_items, self.heldout_items, self.batch_size, self.eval_draws) < 1:
            raise ValueError("train_items, heldout_items, batch_size and eval_draws must be >= 1")

    @property
    def size(self) -> int:
        return self.image_size or TINY_LATENT_FACTOR.get(self.arch, 8) * 16


@dataclass(frozen=True)
class Run:
    spec: RunSpec
    args: tuple[str, ...]
    """The ``masktrain train`` arguments of the run."""
    output_dir: Path
    lora: Path

    @property
    def command(self) -> str:
        return shlex.join(["masktrain", "train", *self.args])


def train_args(config: DemoConfig, spec: RunSpec, train_toml: Path) -> tuple[str, ...]:
    """The full ``masktrain train`` argument list of one run."""
    return (
        "--dataset_config", str(train_toml), "--arch", config.arch, "--dit", "tiny",
        "--output_dir", str(config.output_dir / "runs" / spec.name), "--output_name", spec.name,
        "--device", "cpu", "--seed", str(config.seed), "--max_train_steps", str(config.steps),
        "--network_dim", str(NETWORK_DIM), "--network_alpha", str(NETWORK_ALPHA),
        "--learning_rate", str(LEARNING_RATE), *spec.flags,
    )  # fmt: skip


def train_config(args: tuple[str, ...]) -> TrainConfig:
    """Parse a ``masktrain train`` argument list exactly as the command line does."""
    from masktrain.cli_train import build_config, train

    context = train.make_context("train", list(args))
    return build_config(dict(context.params))


def run(config: DemoConfig) -> DemoReport:
    """Run the whole demo; returns the report (also written to OUTPUT_DIR)."""
    from masktrain.cache import CacheConfig
    from masktrain.cache import run as run_cache
    from masktrain.demo import dataset, report
    from masktrain.demo.evaluate import evaluate
    from masktrain.train.loop import run as run_train

    config.validate()
    out = config.output_dir.resolve()
    config = dataclasses.replace(config, output_dir=out)
    data = out / "data"
    log.info("demo: writing %d training and %d held-out images under %s",
             config.train_items, config.heldout_items, data)  # fmt: skip
    tomls = {
        split: dataset.write_split(data, split, count, config.size, config.batch_size, config.seed)
        for split, count in (("train", config.train_items), ("heldout", config.heldout_items))
    }
    for toml in tomls.values():
        run_cache(CacheConfig(dataset_config=toml, arch=config.arch, vae="tiny", text_encoder="tiny",
                              device="cpu"))  # fmt: skip

    runs = []
    for spec in RUNS:
        args = train_args(config, spec, tomls["train"])
        train = train_config(args)
        if train.output_dir.exists():  # a previous demo's run: its checkpoints would linger
            shutil.rmtree(train.output_dir)
        log.info("demo: training %s (%s)", spec.name, spec.description)
        lora = run_train(train)
        runs.append(Run(spec, args, train.output_dir, lora))

    scores = evaluate(
        config.arch, tomls["heldout"], {r.spec.name: r.lora for r in runs},
        draws=config.eval_draws, seed=config.seed + 1,
    )  # fmt: skip
    return report.write(config, runs, scores, tomls)
