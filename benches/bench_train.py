"""Step time of `masktrain train`: unmasked, masked, and masked with prior preservation, with and
without gradient checkpointing, plus the share of step time spent waiting for data.

Targets (DESIGN.md): a step with prior preservation <= 1.3x a masked step; waiting on data < 2%
of step time. Two model sizes, both through the real training path (cache files on disk, the
loader, peft LoRA, the family's predict):

- `tiny`: the built-in `--dit tiny` on 16x16 latents, where per-call overhead dominates;
- `wide`: the tiny architecture widened and deepened (`wan.tiny_transformer(width_mult, layers)`,
  saved as a diffusers folder and passed as `--dit`) on 64x64 latents, where compute dominates,
  as on real models.

Each configuration trains `--steps` optimizer steps; the first `--warmup` are dropped and the
median of the rest is reported. The configurations take turns within each round (`--rounds`),
and each ratio is the median of the per-round ratios.

    python benches/bench_train.py [--steps 6] [--warmup 2] [--rounds 2] [--width 16] [--layers 6]
        [--only tiny|wide]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from masktrain.cache import run as run_cache
from masktrain.config import CacheConfig, MaskLossSettings, NetworkSettings, OptimSettings, TrainConfig
from masktrain.models.wan import tiny_transformer
from masktrain.train.loop import run as run_train

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from make_sample import tiered_mask

MODES = {
    "unmasked": MaskLossSettings(),
    "masked": MaskLossSettings(use_mask_loss=True, mask_gamma=0.7, mask_min_weight=0.05),
    "prior": MaskLossSettings(
        use_mask_loss=True,
        mask_gamma=0.7,
        prior_preservation_weight=1.0,
        prior_mask_threshold=0.1,
        normalize_per_sample=True,
    ),
}


def make_cached_dataset(root: Path, size: int, count: int = 4) -> Path:
    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True)
    masks.mkdir()
    rng = np.random.default_rng(0)
    for index in range(count):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"item{index}.png")
        Image.fromarray(tiered_mask(size, size, rng)).save(masks / f"item{index}.png")
        (images / f"item{index}.txt").write_text(f"a photo of subject {index}")
    toml = root / "dataset.toml"
    toml.write_text(
        f"[general]\nresolution = [{size}, {size}]\nbatch_size = 2\n\n[[datasets]]\n"
        'image_directory = "images"\nmask_directory = "masks"\ncache_directory = "cache"\n'
    )
    run_cache(CacheConfig(dataset_config=toml, arch="wan", vae="tiny", text_encoder="tiny", device="cpu"))
    return toml


def step_times(toml: Path, dit: str, out: Path, mode: str, checkpointing: bool, steps: int, warmup: int):
    config = TrainConfig(
        dataset_config=toml,
        arch="wan",
        dit=dit,
        output_dir=out,
        device="cpu",
        max_train_steps=steps,
        gradient_checkpointing=checkpointing,
        network=NetworkSettings(network_dim=8, network_alpha=8.0),
        optim=OptimSettings(learning_rate=1e-4),
        mask=MODES[mode],
    )
    with contextlib.redirect_stdout(io.StringIO()):  # the banner, once per run
        run_train(config)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][warmup:]
    step = statistics.median(r["step_time"] for r in records)
    wait = statistics.median(r["data_wait"] / r["step_time"] for r in records)
    return step, wait


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--width", type=int, default=16, help="wide model: heads and FFN multiplier")
    parser.add_argument("--layers", type=int, default=6, help="wide model: blocks")
    parser.add_argument("--only", choices=["tiny", "wide"], default=None, help="run one model size")
    args = parser.parse_args()

    import logging

    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as temp:
        root = Path(temp)
        wide_dir = root / "wide-dit"
        wide = tiny_transformer(width_mult=args.width, layers=args.layers)
        wide.save_pretrained(wide_dir)
        params = sum(p.numel() for p in wide.parameters()) / 1e6
        models = {
            "tiny (16x16 latents)": ("tiny", make_cached_dataset(root / "small", 128)),
            f"wide x{args.width}, {args.layers} layers, {params:.1f}M params (64x64 latents)": (
                str(wide_dir),
                make_cached_dataset(root / "large", 512),
            ),
        }
        for label, (dit, toml) in models.items():
            if args.only and not label.startswith(args.only):
                continue
            print(f"\n## {label}")
            print(
                "| checkpointing | unmasked s | masked s | prior s | prior/masked | masked/unmasked "
                "| data wait |"
            )
            print("|---|---|---|---|---|---|---|")
            for checkpointing in (False, True):
                rounds: list[dict[str, tuple[float, float]]] = []
                for number in range(args.rounds):
                    results = {}
                    for mode in MODES:
                        out = root / f"out-{dit.replace('/', '_')}-{checkpointing}-{mode}-{number}"
                        results[mode] = step_times(
                            toml, dit, out, mode, checkpointing, args.steps, args.warmup
                        )
                    rounds.append(results)

                def median(mode: str, rounds: list = rounds) -> float:
                    return statistics.median(r[mode][0] for r in rounds)

                prior_ratio = statistics.median(r["prior"][0] / r["masked"][0] for r in rounds)
                mask_ratio = statistics.median(r["masked"][0] / r["unmasked"][0] for r in rounds)
                wait = max(statistics.median(r[mode][1] for r in rounds) for mode in MODES)
                verdict = "PASS" if prior_ratio <= 1.3 else "MISS"
                print(
                    f"| {'on' if checkpointing else 'off'} | {median('unmasked'):.3f} "
                    f"| {median('masked'):.3f} | "
                    f"{median('prior'):.3f} | {prior_ratio:.2f}x ({verdict} <= 1.3) | {mask_ratio:.2f}x | "
                    f"{wait:.2%} ({'PASS' if wait < 0.02 else 'MISS'} < 2%) |"
                )


if __name__ == "__main__":
    main()
