"""Memory of LoRA training at real model shapes: peak device memory (host memory on a CPU) and step
time of the masked training step, with random weights (nothing is downloaded).

Method. Each row builds its transformer on the meta device (``accelerate.init_empty_weights``),
swaps the family's fp8 target Linear layers for ``Fp8Linear`` shells when the row is fp8, and then
materialises every parameter tensor by tensor, directly in its final dtype on the device (random
normal x 0.02; fp8 weights quantised ("scaled") from a random bf16 temporary of that one tensor), so
the bf16 model never exists whole. Then, as ``train.experts.build_experts`` does: LoRA (rank 16) with
``lora.add_lora``, block swap (``BlockSwap``, pinned host copies) with everything else on the
device, gradient checkpointing (``checkpointing.enable``, optionally offloading the checkpointed
activations to the host). A step is ``train.loop.compute_loss`` simplified: noisy latents, the
teacher (adapters off, no grad; only with prior preservation) and the swap layout restored after
it, the student, ``masked_loss_terms`` with a tiered mask (subject 1.0, body 0.5, background 0),
backward, the layout restored, an AdamW step on the LoRA weights. "masked" is mask-weighted loss,
"prior" adds prior preservation (weight 1, threshold 0.1). Every row runs in a fresh process, so
one row's allocations (or an OOM) never pollute the next.

Measures. GPU: ``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` over the training
steps (reset after the model is placed), and the median step time after one warm-up step; rows
run in priority order under ``--time-limit`` and print "not run" when out of time or memory.
CPU (WAN 1.3B at 256x256): the peak anonymous memory (``RssAnon``, sampled every ~2 ms on a
thread) above the process's baseline after importing torch and diffusers, during the load and
during one step, and the same for glibc's bytes in use (``malloc_live``: RssAnon can keep freed
temporaries, by chance of the heap's layout, so it varies run to run); plus the
single-file load test: a WAN 1.3B-shaped bf16 ``.safetensors`` file (diffusers names, written
once under ``--data``) read with ``wan_checkpoint.load_transformer_file`` and ``--fp8_scaled`` in a
fresh process, whose peaks (RssAnon and live) are reported against the bytes of the loaded model.
Derived: swap overhead (step time vs the same row without swap) and prior/masked step-time ratio.

Targets (musubi-tuner's docs; information only, nothing is asserted): Qwen-Image 20B LoRA at
1024x1024: 42 GB in bf16, 30 GB in fp8, 24 GB with 16 swapped blocks, 12 GB with 45; WAN 14B at a
1280x720 image: <= 24 GB; block swap with pinned memory <= 10% slower than without; a prior step
<= 1.3x a masked one; CPU: the fp8 single-file load peaks at <= 1.3x the fp8 model's bytes.

    python benches/bench_memory.py [--quick] [--tiny] [--steps N] [--time-limit S] [--rank R]
        [--only ID_PATTERN ...] [--json PATH] [--data DIR]
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from host_memory import GIB, HostPeak
from masktrain import catalog
from memory_plan import MODELS, SHAPES, ModelSpec, Row, Shape, cpu_plan, gpu_plan, tiny_models

HERE = Path(__file__).resolve()
RESULT = "RESULT "  # a child's last stdout line: RESULT {json}
LOAD_ID = "load"  # the CPU's fp8 single-file load test, for --only


# --- one row (child process) --------------------------------------------------------------------


def materialise(model: Any, device: Any, dtype: Any) -> None:
    """Real tensors for every meta parameter, one at a time, in their final dtype on `device`."""
    import torch

    from masktrain.models.fp8 import Fp8Linear, quantize

    generator = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            is_norm = "norm" in type(module).__name__.lower()
            for name, param in list(module.named_parameters(recurse=False)):
                if not param.is_meta:
                    continue
                if isinstance(module, Fp8Linear) and name == "weight":
                    temp = torch.randn(param.shape, generator=generator, device=device, dtype=dtype) * 0.02
                    weight, module.scale = quantize(temp, "scaled")
                    del temp
                    module.weight = torch.nn.Parameter(weight, requires_grad=False)
                    continue
                if is_norm:  # an identity norm keeps activations in a sane range
                    value = torch.full(param.shape, float(name == "weight"), device=device, dtype=dtype)
                else:
                    value = torch.randn(param.shape, generator=generator, device=device, dtype=dtype) * 0.02
                module._parameters[name] = torch.nn.Parameter(value, requires_grad=False)


def build(spec: ModelSpec, row: Row, device: Any, dtype: Any, rank: int) -> tuple[Any, Any, Any]:
    """(model, family, block swap or None), placed and ready to train (see the module docstring)."""
    import torch
    from accelerate import init_empty_weights

    from masktrain.denoiser import lora
    from masktrain.models import checkpointing, get_family
    from masktrain.models.block_swap import BlockSwap
    from masktrain.models.fp8 import Fp8Linear, replace_module, target_linears
    from masktrain.models.placement import move_module

    family = get_family(spec.arch)
    model_class = type(family.empty_transformer(spec.config))  # the family's diffusers class
    # Real buffers (RoPE tables, a few MB) are built as the constructor builds them.
    with init_empty_weights(include_buffers=False):
        model = model_class(**spec.config)
    if row.fp8:
        for name in target_linears(model, family.fp8_targets):
            replace_module(model, name, Fp8Linear.like(model.get_submodule(name), None, dtype))
    # On a GPU even swapped blocks are made there (fast); BlockSwap then moves them to the host.
    materialise(model, device, dtype)
    torch.manual_seed(0)
    lora.add_lora(model, family, rank=rank, alpha=float(rank))
    blocks = family.blocks(model)
    swap = BlockSwap(blocks, row.swap, device, row.pin, "bench") if row.swap else None
    move_module(model, device, skip=swap.swappable_slots() if swap else [])
    checkpointing.enable(model, blocks, device, offload_activations=row.offload, swap=swap)
    model.train()
    return model, family, swap


def tiered_mask(frames: int, h: int, w: int) -> Any:
    """(1, 1, F, h, w): a subject ellipse at 1.0 over a body rectangle at 0.5, background 0."""
    import torch

    y = torch.arange(h).view(-1, 1) / h
    x = torch.arange(w).view(1, -1) / w
    mask = torch.zeros(h, w)
    mask[((x - 0.5).abs() < 0.22) & (y > 0.45)] = 0.5
    mask[((x - 0.5) / 0.12) ** 2 + ((y - 0.35) / 0.14) ** 2 < 1] = 1.0
    return mask.expand(1, 1, frames, h, w).contiguous()


def train_step(
    family: Any, model: Any, swap: Any, batch: dict[str, Any], settings: Any, optimizer: Any
) -> float:
    """One optimizer step of ``train.loop`` (simplified: one batch, no timestep weighting)."""
    import torch

    from masktrain.denoiser import lora
    from masktrain.loss import masked_loss_terms

    device = batch["noisy"].device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    args = (batch["noisy"], batch["sigmas"], batch["text"])
    teacher = None
    if settings.prior_preservation_weight > 0:
        try:
            with torch.no_grad(), lora.adapters_disabled(model), autocast:
                teacher = family.predict(model, *args).float()
        finally:  # the teacher's blocks were never backpropagated
            if swap is not None:
                swap.restore("after the teacher")
    try:
        with autocast:
            prediction = family.predict(model, *args).float()
        per_element = (prediction - batch["target"]) ** 2
        prior = None if teacher is None else (prediction - teacher) ** 2
        terms = masked_loss_terms(per_element, batch["mask"], settings, prior_loss=prior)
        loss = terms.target + terms.prior
        loss.backward()  # type: ignore[no-untyped-call]  # torch leaves it unannotated
    finally:
        if swap is not None:
            swap.restore("after backward")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def text_tokens(spec: ModelSpec, shape: Shape) -> int:
    """The batch's text tokens: the family's padded length (WAN's T5: 512) or the shape's."""
    arch = catalog.arch(spec.arch)
    return arch.text_tokens if arch.text_padded else shape.text_tokens


def make_batch(spec: ModelSpec, shape: Shape, device: Any, dtype: Any) -> dict[str, Any]:
    import torch

    from masktrain.models.base import TextBatch
    from masktrain.train.flow_matching import noised

    generator = torch.Generator().manual_seed(1)
    latent = shape.latent(spec.arch)
    latents = torch.randn(1, spec.latent_channels, *latent, generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    sigmas = torch.rand(1, generator=generator) * 0.8 + 0.1
    noisy, target = noised(latents, noise, sigmas)
    tokens = text_tokens(spec, shape)
    hidden = torch.randn(1, tokens, spec.text_dim, generator=generator)
    return {
        "noisy": noisy.to(device, dtype),
        "target": target.to(device),
        "sigmas": sigmas.to(device),
        "text": TextBatch(hidden, None).to(device, dtype),
        "mask": tiered_mask(*latent).to(device),
    }


def run_row(row: Row, spec: ModelSpec, steps: int, warmup: int, rank: int) -> dict[str, Any]:
    import diffusers  # noqa: F401  (imported before the baseline, as torch is)
    import peft  # noqa: F401
    import torch

    from masktrain.denoiser import lora
    from masktrain.loss import MaskLossSettings
    from masktrain.models.single_file import release_freed_memory

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16
    host = HostPeak()
    started = time.perf_counter()
    try:
        model, family, swap = build(spec, row, device, dtype, rank)
        load_s = time.perf_counter() - started
        load_peak = host.reset()
        release_freed_memory()  # what glibc kept of the build's temporaries must not count in the step's peak
        settings = MaskLossSettings(
            use_mask_loss=True,
            prior_preservation_weight=1.0 if row.prior else 0.0,
            prior_mask_threshold=0.1 if row.prior else None,
        )
        batch = make_batch(spec, SHAPES[row.shape], device, dtype)
        optimizer = torch.optim.AdamW(lora.lora_parameters(model), lr=1e-4)
        if cuda:  # the build's freed temporaries must not count as reserved
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        host.reset()
        times, losses = [], []
        for _ in range(warmup + steps):
            begun = time.perf_counter()
            losses.append(train_step(family, model, swap, batch, settings, optimizer))
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - begun)
    except torch.OutOfMemoryError:
        return {"status": "OOM"}
    step_peak = host.stop()
    result: dict[str, Any] = {
        "status": "ok",
        "load_s": load_s,
        "step_s": statistics.median(times[warmup:]),
        "step_times": times,
        "loss": losses[-1],
        "loads_on_demand": swap.loads_on_demand if swap is not None else 0,
    }
    if cuda:
        result |= {
            "peak_gib": torch.cuda.max_memory_allocated() / GIB,
            "reserved_gib": torch.cuda.max_memory_reserved() / GIB,
            "host_load_gib": load_peak[0],
        }
    else:
        result |= {
            "load_gib": load_peak[0],
            "peak_gib": step_peak[0],
            "live_load_gib": load_peak[1],
            "live_peak_gib": step_peak[1],
        }
    return result


# --- the fp8 single-file load test (CPU) ----------------------------------------------------------


def write_wan_file(path: Path, config: dict[str, Any]) -> None:
    """A diffusers-named WAN transformer of `config`'s shapes in bf16, random values, one file."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import WanTransformer3DModel
    from safetensors.torch import save_file

    with init_empty_weights():
        shapes = {k: v.shape for k, v in WanTransformer3DModel(**config).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    state = {k: torch.randn(s, generator=generator, dtype=torch.bfloat16) * 0.02 for k, s in shapes.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    save_file(state, partial)
    partial.replace(path)  # an interrupted write is never reused


def run_load(path: Path, head_dim: int) -> dict[str, Any]:
    import torch
    from diffusers import WanTransformer3DModel  # noqa: F401  (imported before the baseline)

    from masktrain.models.fp8 import fp8_bytes
    from masktrain.models.single_file import Fp8Load
    from masktrain.models.wan import FP8_TARGETS
    from masktrain.models.wan_checkpoint import load_transformer_file

    host = HostPeak()
    started = time.perf_counter()
    fp8 = Fp8Load("scaled", FP8_TARGETS, torch.bfloat16)
    overrides = {"attention_head_dim": head_dim} if head_dim != 128 else None
    model = load_transformer_file(path, "--dit", torch.bfloat16, fp8, overrides=overrides)
    seconds = time.perf_counter() - started
    peak, live = host.stop()
    tensors = [*model.parameters(), *(b for b in model.buffers() if b is not None)]
    weights = sum(t.numel() * t.element_size() for t in tensors)
    return {
        "status": "ok",
        "load_s": seconds,
        "peak_gib": peak,
        "live_gib": live,
        "fp8_gib": fp8_bytes(model) / GIB,
        "weights_gib": weights / GIB,
        "ratio": peak * GIB / weights,
        "live_ratio": live * GIB / weights,
    }


# --- the parent: plan, children, table ----------------------------------------------------------


def run_child(job: dict[str, Any], timeout: float | None) -> dict[str, Any]:
    """Run `job` in a fresh interpreter; its result, or a status saying why there is none."""
    try:
        done = subprocess.run(
            [sys.executable, str(HERE), "--_child", json.dumps(job)],
            stdout=subprocess.PIPE,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"status": "time limit"}
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT)]
    if done.returncode != 0 or not lines:
        return {"status": f"error (exit {done.returncode})"}
    result: dict[str, Any] = json.loads(lines[-1].removeprefix(RESULT))
    return result


def child_main(job: dict[str, Any]) -> None:
    if job["kind"] == "load":
        result = run_load(Path(job["path"]), job["head_dim"])
    else:
        # JSON turned the config's tuples (patch size, RoPE axes) into lists
        config = {k: tuple(v) if isinstance(v, list) else v for k, v in job["spec"]["config"].items()}
        spec = ModelSpec(job["spec"]["label"], job["spec"]["arch"], config)
        row = Row(**job["row"])
        result = run_row(row, spec, job["steps"], job["warmup"], job["rank"])
    print(RESULT + json.dumps(result), flush=True)


def derive(rows: list[Row], results: dict[str, dict[str, Any]]) -> None:
    """Swap overhead (vs the same row without swap) and prior/masked ratio, where both ran."""

    def step(row: Row) -> float | None:
        result = results.get(row.id, {})
        return result.get("step_s") if result.get("status") == "ok" else None

    for row in rows:
        result, own = results[row.id], step(row)
        base = step(replace(row, swap=0, pin=True)) if row.swap else None
        masked = step(replace(row, prior=False)) if row.prior else None
        if own and base:
            result["swap_overhead"] = own / base - 1
        if own and masked:
            result["prior_over_masked"] = own / masked


def cell(value: float | None, fmt: str, width: int, unit: str = "") -> str:
    text = "-" if value is None or not math.isfinite(value) else format(value, fmt) + unit
    return text.rjust(width)


def planned_gib(row: Row, spec: ModelSpec, rank: int) -> float:
    """What ``masktrain plan`` predicts for the row: its tensors on the device (no CUDA context,
    no allocator margin), the number to put beside ``max_memory_allocated``."""
    from masktrain.models import get_family
    from masktrain.plan.activations import StepShape
    from masktrain.plan.estimate import Planner, PlanSettings

    family = get_family(spec.arch)
    if family.spec.unplanned is not None:  # the planner cannot trace this family
        return math.nan
    shape = SHAPES[row.shape]
    frames, height, width = shape.latent(spec.arch)
    tokens = text_tokens(spec, shape)
    settings = PlanSettings(
        fp8="scaled" if row.fp8 else None,
        blocks_to_swap=row.swap,
        pinned=row.pin,
        offload_activations=row.offload,
        prior=row.prior,
        rank=rank,
    )
    step = StepShape(spec.latent_channels, frames, height, width, tokens, spec.text_dim)
    return Planner(family, spec.config, step, settings).plan().tensors / GIB


def print_table(
    rows: list[Row], results: dict[str, dict[str, Any]], models: dict[str, ModelSpec], cuda: bool
) -> None:
    if cuda:
        print("GiB: torch.cuda.max_memory_allocated / max_memory_reserved over the steps")
        columns = {"alloc GiB": "peak_gib", "reserved": "reserved_gib"}
    else:
        print(
            "GiB above the post-import baseline, peaks during the load / during the step: RssAnon, "
            "and live (glibc's bytes in use, without what it keeps of freed memory)"
        )
        columns = {"load GiB": "load_gib", "step GiB": "peak_gib", "live load": "live_load_gib"}
        columns["live step"] = "live_peak_gib"
    columns["plan GiB"] = "plan_gib"
    titles = " ".join(f"{title:>9}" for title in columns)
    print(
        f"{'model':<22} {'shape':<16} {'mode':<38} {titles} {'step s':>8} {'swap ovh':>8} {'prior/mask':>10}"
    )
    for row in rows:
        r = results[row.id]
        line = f"{models[row.model].label:<22} {SHAPES[row.shape].label:<16} {row.mode:<38}"
        if r.get("status") != "ok":
            print(f"{line} not run ({r.get('status')})")
            continue
        values = [cell(r.get(key), ".3f", 9) for key in columns.values()] + [cell(r["step_s"], ".2f", 8)]
        values += [cell(r.get("swap_overhead"), "+.1%", 8), cell(r.get("prior_over_masked"), ".2f", 10, "x")]
        if row.target_gib is not None and cuda:
            values.append(f" <= {row.target_gib:g} {'PASS' if r['peak_gib'] <= row.target_gib else 'MISS'}")
        print(f"{line} {' '.join(values)}")


def load_test(args: argparse.Namespace, models: dict[str, ModelSpec]) -> dict[str, Any]:
    """Write (once) the WAN 1.3B-shaped bf16 file, then load it with fp8 in a fresh process."""
    config = models["wan1.3b"].config
    name = "wan-tiny" if args.tiny else "wan2.1-1.3b"
    path = args.data / "bench_memory" / f"{name}-random-bf16.safetensors"
    if not path.is_file():
        print(f"writing {path} ...", file=sys.stderr, flush=True)
        write_wan_file(path, config)
    job = {"kind": "load", "path": str(path), "head_dim": config["attention_head_dim"]}
    runs = [run_child(job, None) for _ in range(1 if args.quick else 3)]  # RssAnon varies run to run
    return {"file_gib": path.stat().st_size / GIB, "runs": runs}


def print_load(loaded: dict[str, Any], label: str) -> None:
    print(
        f"\nfp8 single-file load ({label}, {loaded['file_gib']:.3f} GiB bf16 file), each in a fresh process:"
    )
    for run in loaded["runs"]:
        if run.get("status") != "ok":
            print(f"  not run ({run.get('status')})")
            continue
        fp8_ratio = run["peak_gib"] / run["fp8_gib"]
        print(
            f"  peak RssAnon {run['peak_gib']:.3f} GiB = {fp8_ratio:.2f}x the fp8 weights and scales "
            f"({run['fp8_gib']:.3f} GiB; {'PASS' if fp8_ratio <= 1.3 else 'MISS'} <= 1.3x), "
            f"{run['ratio']:.2f}x the whole loaded model ({run['weights_gib']:.3f} GiB); "
            f"live peak {run['live_gib']:.3f} GiB = {run['live_ratio']:.2f}x; {run['load_s']:.1f} s"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CPU: 2 modes; GPU: 1 timed step")
    parser.add_argument("--tiny", action="store_true", help="2-layer test configs (a smoke run)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (GPU 3, CPU 1)")
    parser.add_argument("--time-limit", type=float, default=None, help="seconds (GPU default 480)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank")
    parser.add_argument(
        "--only", nargs="+", default=None, help="row ids (fnmatch patterns; 'load': the load test)"
    )
    parser.add_argument("--json", type=Path, default=None, help="write the rows here as JSON")
    parser.add_argument(
        "--data", type=Path, default=HERE.parent / "_data", help="where the load test's file goes"
    )
    parser.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child is not None:
        child_main(json.loads(args._child))
        return

    import torch

    cuda = torch.cuda.is_available()
    models = tiny_models() if args.tiny else MODELS
    rows = gpu_plan(models) if cuda else cpu_plan(models, args.quick)
    if args.only:
        rows = [r for r in rows if any(fnmatch.fnmatch(r.id, p) for p in args.only)]
    # --tiny clamps swap counts, which can make two rows one
    rows = [row for i, row in enumerate(rows) if row.id not in {r.id for r in rows[:i]}]
    steps = args.steps if args.steps is not None else (1 if args.quick or not cuda else 3)
    warmup = 1 if cuda else 0
    limit = args.time_limit if args.time_limit is not None else (480.0 if cuda else None)
    deadline = None if limit is None else time.monotonic() + limit

    results: dict[str, dict[str, Any]] = {}
    for number_, row in enumerate(rows, 1):
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            results[row.id] = {"status": "time limit"}
            continue
        job = {"kind": "row", "row": asdict(row), "spec": asdict(models[row.model])}
        results[row.id] = run_child(job | {"steps": steps, "warmup": warmup, "rank": args.rank}, left)
        summary = {k: v for k, v in results[row.id].items() if k != "step_times"}
        print(f"[{number_}/{len(rows)}] {row.id}: {summary}", file=sys.stderr, flush=True)
    derive(rows, results)
    for row in rows:  # the planner's prediction beside each measured row (meta device: seconds)
        if results[row.id].get("status") == "ok":
            results[row.id]["plan_gib"] = planned_gib(row, models[row.model], args.rank)

    wanted = not args.only or any(fnmatch.fnmatch(LOAD_ID, p) for p in args.only)
    loaded = load_test(args, models) if wanted and not cuda else None
    print()
    print_table(rows, results, models, cuda)
    if loaded is not None:
        print_load(loaded, models["wan1.3b"].label)
    if args.json is not None:
        payload = {
            "device": "cuda" if cuda else "cpu",
            "rows": [{"id": r.id, **asdict(r), **results[r.id]} for r in rows],
            "load_test": loaded,
        }
        args.json.write_text(json.dumps(payload, indent=2))
    failed = [r.id for r in rows if results[r.id]["status"].startswith("error")]
    if failed or (loaded is not None and any(run.get("status") != "ok" for run in loaded["runs"])):
        sys.exit(f"failed: {', '.join(failed) or 'the load test'}")


if __name__ == "__main__":
    main()
