"""``masktrain demo``: the weighted mask loss and masked prior preservation, shown on a tiny model.

1. Writes a synthetic dataset (``demo/dataset.py``): one subject with tiered masks over a
   different random background per image, plus held-out items of the same kind.
2. Caches both splits with ``masktrain cache`` (``cache.run``) and the tiny VAE and text encoder.
3. Trains three LoRAs (``demo/runs.py``) from the same tiny base transformer and seed through
   the real ``train`` path: each run is a ``masktrain train`` command line, parsed by the
   ``train`` command into a ``TrainConfig`` (the caller hands in ``cli.train.config_from_args``)
   and passed to ``train.loop.run``, so the command in the report reproduces the run exactly.
4. Scores each LoRA on the held-out items against the base model (``demo/evaluate.py``) and
   writes ``report.json``, ``report.md`` (``demo/report.py``) and ``report.png``
   (``demo/drawing.py``).
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
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from masktrain.config.demo import DemoConfig
from masktrain.demo import dataset
from masktrain.demo.runs import RUNS, train_runs, write_and_cache

if TYPE_CHECKING:
    from masktrain.config.train import TrainConfig
    from masktrain.demo.report import DemoReport

log = logging.getLogger(__name__)


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
