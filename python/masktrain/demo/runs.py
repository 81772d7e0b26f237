"""The demo's runs, shared by both scenarios: the three recipes (:data:`RUNS`), the ``masktrain
train`` command line of a run (:func:`train_args`), the cached splits a run trains and is scored
on (:func:`write_and_cache`, whose command line is :func:`cache_command`), and the training
itself (:func:`train_runs`: the real ``train`` path, one LoRA per recipe from the same base and
seed). The scenarios (``demo/__init__.py``, ``demo/bleed.py``) and the report import them from
here; this module imports no other module of the demo but its dataset.
"""

from __future__ import annotations

import logging
import shlex
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from masktrain import catalog
from masktrain.config.demo import DemoConfig
from masktrain.demo import dataset

if TYPE_CHECKING:
    from masktrain.config.train import TrainConfig

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


def cache_command(toml: Path, arch: str) -> str:
    """The ``masktrain cache`` command line :func:`write_and_cache` runs for one split."""
    text_flag = catalog.arch(arch).text_flag
    command = ["masktrain", "cache", "--dataset_config", str(toml), "--arch", arch, "--vae", "tiny"]
    return shlex.join([*command, text_flag, "tiny", "--device", "cpu"])


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
