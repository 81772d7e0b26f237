"""Choose the bleed scenario's fourth run: train unmasked, masked, masked + prior and masked +
prior with each of ``masktrain.demo.bleed.NEW_OPTIONS`` on ``SELECTION_SEEDS`` (seeds the demo
never reports), print every run's mean and spread over them, and name the pick of
``bleed.choose``. The demo's ``bleed.BEST`` is set to that pick by hand.

    python scripts/choose_bleed_run.py [--output_dir DIR] [--steps N]

Takes about 3 minutes on two CPU cores with the default 200 steps.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from masktrain.cli.train import config_from_args
from masktrain.config.demo import DEFAULT_STEPS, DemoConfig
from masktrain.demo import bleed
from masktrain.demo.runs import RUNS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", type=Path, default=Path("bleed-selection"))
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    out = args.output_dir.resolve()
    config = DemoConfig(output_dir=out, steps=args.steps, scenario="bleed")
    result = bleed.run(config, (*RUNS, *bleed.NEW_OPTIONS), bleed.SELECTION_SEEDS, out, config_from_args)
    fields = ("subject_improvement", "background_drift", "bleed", "bleed_unseen_room")
    print(f"seeds {', '.join(map(str, bleed.SELECTION_SEEDS))}, {args.steps} steps: mean ± spread")
    print(f"{'run':<24}" + "".join(f"{field:>24}" for field in fields))
    table = {}
    for name in result.names:
        cells = {field: (result.mean(name, field), result.spread(name, field)) for field in fields}
        table[name] = cells
        print(f"{name:<24}" + "".join(f"{mean:>+16.3f} ± {spread:.3f}" for mean, spread in cells.values()))
    chosen = bleed.choose(result)
    print(f"\nchosen: {chosen}")
    (out / "selection.json").write_text(
        json.dumps(
            {"seeds": bleed.SELECTION_SEEDS, "steps": args.steps, "runs": table, "chosen": chosen}, indent=2
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
