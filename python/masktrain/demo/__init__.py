"""``masktrain demo``: the weighted mask loss and masked prior preservation, shown on a tiny model.

1. Writes a synthetic dataset (``demo/dataset.py``): one subject with tiered masks over a
   different random background per image, plus held-out items of the same kind.
2. Caches both splits with ``masktrain cache`` (``cache.run``) and the tiny VAE and text encoder.
3. Trains three LoRAs from the same tiny base transformer and seed through the real ``train``
   path: each run is a ``masktrain train`` command line, parsed by the ``train`` command into a
   ``TrainConfig`` (the caller hands in ``cli.train.config_from_args``) and passed to
   ``train.loop.run``, so the command in the report reproduces the run exactly.
4. Scores each LoRA on the held-out items against the base model (``demo/evaluate.py``) and
   writes ``report.json``, ``report.md`` and ``report.png`` (``demo/report.py``).
5. The bleed scenario (``demo/bleed.py``) does 1-4 again for three seeds with every training
   photo in one room, adds a fourth run, and scores how far each LoRA paints that room into
   other photos (its part of the report: ``demo/bleed_report.py``, ``bleed.png``).
   ``--scenario`` runs one of the two.

The expected outcome: every run learns the subject; the LoRA trained with the mask loss alone
changes the background about as much as (or more than) the unmasked one, because nothing holds
it there; masked prior preservation keeps the background close to the base model and paints
less of the training room elsewhere.
"""

from __future__ import annotations

import dataclasses
import logging
import shlex
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from masktrain.config.demo import DemoConfig
from masktrain.demo import dataset

if TYPE_CHECKING:
    from masktrain.config.train import TrainConfig
    from masktrain.demo.report import DemoReport

log = logging.getLogger(__name__)

NETWORK_DIM = 8
NETWORK_ALPHA = 8
LEARNING_RATE = 2e-3


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
        tuple("--use_mask_loss --mask_gamma 0.7 --mask_min_weight 0.05".split()),
    ),
    RunSpec(
        "masked_prior",
        "mask loss, floor 0, masked prior preservation",
        tuple(
            "--use_mask_loss --mask_gamma 0.7 --mask_min_weight 0 --prior_preservation_weight 1.0 "
            "--prior_mask_threshold 0.1 --normalize_per_sample".split()
        ),
    ),
)


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


def train_args(
    config: DemoConfig, spec: RunSpec, train_toml: Path, runs_dir: Path, seed: int
) -> tuple[str, ...]:
    """The full ``masktrain train`` argument list of one run (output under ``runs_dir/NAME``)."""
    options = {
        "--dataset_config": str(train_toml),
        "--arch": config.arch,
        "--dit": "tiny",
        "--output_dir": str(runs_dir / spec.name),
        "--output_name": spec.name,
        "--device": "cpu",
        "--seed": str(seed),
        "--max_train_steps": str(config.steps),
        "--network_dim": str(NETWORK_DIM),
        "--network_alpha": str(NETWORK_ALPHA),
        "--learning_rate": str(LEARNING_RATE),
    }
    return (*(part for option in options.items() for part in option), *spec.flags)


def write_and_cache(config: DemoConfig, data: Path, splits: dict[str, list[dataset.Item]]) -> dict[str, Path]:
    """Write each split's items and dataset TOML under `data` and cache them with the tiny VAE and
    text encoder; returns the TOMLs by split."""
    from masktrain.cache import run as run_cache
    from masktrain.config.cache import CacheConfig

    tomls = {}
    for split, items in splits.items():
        toml = dataset.write_split(data, split, items, config.size, config.batch_size)
        run_cache(
            CacheConfig(dataset_config=toml, arch=config.arch, vae="tiny", text_encoder="tiny", device="cpu")
        )
        tomls[split] = toml
    return tomls


def train_runs(
    config: DemoConfig,
    specs: Sequence[RunSpec],
    train_toml: Path,
    runs_dir: Path,
    seed: int,
    parse_train_args: Callable[[Sequence[str]], TrainConfig],
) -> list[Run]:
    """Train one LoRA per spec from the same base and `seed` through the real ``train`` path."""
    from masktrain.train.loop import run as run_train

    runs = []
    for spec in specs:
        args = train_args(config, spec, train_toml, runs_dir, seed)
        train = parse_train_args(args)
        if train.output_dir.exists():  # a previous demo's run: its checkpoints would linger
            shutil.rmtree(train.output_dir)
        log.info("demo: training %s (%s), seed %d", spec.name, spec.description, seed)
        runs.append(Run(spec, args, train.output_dir, run_train(train)))
    return runs


def run(config: DemoConfig, parse_train_args: Callable[[Sequence[str]], TrainConfig]) -> DemoReport:
    """Run the whole demo; returns the report (also written to OUTPUT_DIR). `parse_train_args`
    turns a ``masktrain train`` argument list into its config exactly as the command line does
    (the CLI passes ``cli.train.config_from_args``), so each printed command is what ran."""
    from masktrain.demo import bleed, report
    from masktrain.demo.evaluate import evaluate

    out = config.output_dir.resolve()
    config = dataclasses.replace(config, output_dir=out)
    random = None
    if config.scenario in ("all", "random"):
        data = out / "data"
        log.info(
            "demo: writing %d training and %d held-out images under %s",
            config.train_items,
            config.heldout_items,
            data,
        )
        splits = {
            split: dataset.random_items(split, count, config.size, config.seed)
            for split, count in (("train", config.train_items), ("heldout", config.heldout_items))
        }
        tomls = write_and_cache(config, data, splits)
        runs = train_runs(config, RUNS, tomls["train"], out / "runs", config.seed, parse_train_args)
        scores = evaluate(
            config.arch,
            tomls["heldout"],
            {r.spec.name: r.lora for r in runs},
            draws=config.eval_draws,
            seed=config.seed + 1,
        )
        random = report.RandomResult(runs, scores, tomls)
    bleed_result = None
    if config.scenario in ("all", "bleed"):
        bleed_result = bleed.run(
            config, bleed.REPORTED_RUNS, bleed.reported_seeds(config), out / "bleed", parse_train_args
        )
    return report.write(config, random, bleed_result)
