"""``masktrain train``: the run and its loop, top to bottom.

Before any model loads, ``preflight`` lists the cached items and plans the run (the flags were
checked when the config was built), and the run takes OUTPUT_DIR for itself
(``checkpoint.hold_output_dir``: a second run into it is refused). :func:`_setup` then builds
what the run trains with: the sampler (its text encoder comes and goes before the transformer),
the transformer(s) with the LoRA (``train.build``), the optimizer and schedule, a ``--resume``
checkpoint, the EMA teacher, the metrics log and the validator. :func:`_fit` is the loop.

One optimizer step = ``gradient_accumulation_steps`` batches. Per batch, ``train.step`` computes
the loss (noise, the teacher pass, the student pass, the masked reducer); backward; after the last
batch of the window the gradients are averaged over processes, clipped, and the optimizer and
scheduler step. After the step: validation, the checkpoint, then samples, each when due. Ctrl-C,
SIGTERM or SIGHUP saves a checkpoint after the current step and stops (``train.interrupt``).

Multi-GPU: one process per device under ``torchrun``; process ``rank`` takes every ``world``-th
batch of the epoch's order, and the LoRA gradients are all-reduced (averaged) before each
optimizer step — data-parallel training as DDP does it, without wrapping the diffusers module
(its forward goes through the family's ``predict``). Only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from masktrain import ANNOUNCEMENT, atomic, distributed
from masktrain.config import mask_loss
from masktrain.config.train import TrainConfig
from masktrain.data.cached_items import CachedItem, process_batches
from masktrain.data.loader import Prefetcher
from masktrain.denoiser.experts import Experts
from masktrain.device import precision, resolve_device
from masktrain.distributed import Shard
from masktrain.errors import TrainingDivergedError, TrainingInterrupted
from masktrain.models import get_family
from masktrain.models.base import ModelFamily
from masktrain.sample.sampler import Sampler
from masktrain.train import checkpoint as ckpt
from masktrain.train.build import build_experts, check_cache_fits
from masktrain.train.ema_teacher import EmaTeacher
from masktrain.train.interrupt import Interrupt
from masktrain.train.memory_fit import fit_to_card
from masktrain.train.metrics import MetricsLog, StepMetrics, progress_postfix
from masktrain.train.optim import clip_each, lora_steps, optimizer_and_schedule
from masktrain.train.preflight import TrainPlan, preflight
from masktrain.train.prior_teacher import ema_teacher, expected_skip_rate
from masktrain.train.spill import SpillWatch
from masktrain.train.step import CACHE_HINT, compute_loss
from masktrain.train.timesteps import describe_experts
from masktrain.train.trackers import Trackers
from masktrain.train.validation import Validator, describe

log = logging.getLogger(__name__)


def run(config: TrainConfig) -> Path:
    """Train; returns the path of the LoRA file (with ``--lora_per_expert`` the low-noise expert's,
    its high-noise twin beside it)."""
    for warning in mask_loss.validate(config.mask):
        log.warning("%s", warning)
    with distributed.process_group(config.ddp_timeout) as shard:
        plan = preflight(config, shard.world)
        with ckpt.hold_output_dir(config, shard):  # this run's alone (rank 0 holds its lock); before any load
            if plan.complete:
                ckpt.report_complete(config, plan.resume_step or 0, plan.total_steps)
            else:
                trained = _setup(config, get_family(config.arch), shard, plan)
                with contextlib.closing(trained.metrics) if trained.metrics else contextlib.nullcontext():
                    _fit(trained)
        return config.output_dir / list(ckpt.lora_files(config).values())[-1]


@dataclass
class Run:
    """What one run trains with (:func:`_setup`) and where it stands."""

    config: TrainConfig
    family: ModelFamily
    shard: Shard
    plan: TrainPlan
    device: torch.device
    weight_dtype: torch.dtype
    autocast: torch.dtype | None
    experts: Experts
    named: list[tuple[str, torch.nn.Parameter]]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    position: ckpt.Position
    ema: EmaTeacher | None
    sampler: Sampler | None
    metrics: MetricsLog | None
    validator: Validator | None
    expected_skip: float | None
    spill: SpillWatch | None


def _setup(config: TrainConfig, family: ModelFamily, shard: Shard, plan: TrainPlan) -> Run:
    feeds = check_cache_fits(config, family, plan.items + plan.validation_items)  # before any load
    fit = fit_to_card(config, plan.items)  # the plan; --blocks_to_swap auto becomes a count
    config = fit.config
    device = resolve_device(config.device, shard.local_rank)
    weight_dtype, autocast = precision(config.mixed_precision, device)
    sampler = None
    if config.sample.enabled and shard.is_main:  # its text encoder comes and goes before the transformer
        sampler = Sampler(
            config.sample,
            family,
            device,
            weight_dtype,
            autocast,
            config.seed,
            config.output_dir,
            config.output_name,
            config.task or config.model_version,
            config.one_frame,
        )
    experts = build_experts(config, family, device, weight_dtype, feeds + ([sampler.feed] if sampler else []))
    named = experts.trainable()
    if shard.world > 1:  # identical start on every process
        for _, param in named:
            dist.broadcast(param.data, src=0)
    optimizer, scheduler = optimizer_and_schedule(
        named, config.optim, config.network.loraplus_lr_ratio, plan.total_steps
    )
    position = ckpt.Position(step=0, epoch=0, batches_done=0)
    if config.resume is not None:
        position = ckpt.restore(config.resume, named, optimizer, scheduler)
        log.info("resumed from %s at step %d", config.resume, position.step)
    ema = ema_teacher(config, named, plan.total_steps)

    expected_skip, metrics = None, None
    if shard.is_main:
        if config.overwrite and config.resume is None:  # start over: no old step mixes with this run
            for old in config.output_dir.glob("step-*"):
                shutil.rmtree(old)
        atomic.write_text(config.output_dir / "config.json", config.to_json())
        if config.mask.use_mask_loss:
            log.info("%s", mask_loss.banner(config.mask, CACHE_HINT), extra=ANNOUNCEMENT)
        expected_skip = expected_skip_rate(config, plan.items)
        if experts.high is not None:
            log.info("%s", describe_experts(config, plan.items))
        log.info(
            "training %s on %s: %d items, %d batches per epoch and process, %d steps, %d process(es)",
            family.name,
            device,
            len(plan.items),
            plan.batches_per_epoch,
            plan.total_steps,
            shard.world,
        )
        trackers = Trackers(config.trackers, config.output_dir, config.output_name, config.to_json())
        metrics = MetricsLog(config.output_dir, position.step if config.resume else None, trackers)
    validator = (
        Validator(plan.validation_items, family, config.seed, device) if plan.validation_items else None
    )
    return Run(
        config=config,
        family=family,
        shard=shard,
        plan=plan,
        device=device,
        weight_dtype=weight_dtype,
        autocast=autocast,
        experts=experts,
        named=named,
        optimizer=optimizer,
        scheduler=scheduler,
        position=position,
        ema=ema,
        sampler=sampler,
        metrics=metrics,
        validator=validator,
        expected_skip=expected_skip,
        spill=SpillWatch.on(device, fit.fitting_swap, config.memory.blocks_to_swap)
        if shard.is_main
        else None,
    )


def _fit(run: Run) -> None:
    config, shard, plan, experts = run.config, run.shard, run.plan, run.experts
    accumulation = config.optim.gradient_accumulation_steps
    step, epoch, done = run.position.step, run.position.epoch, run.position.batches_done
    total_steps, batches_per_epoch = plan.total_steps, plan.batches_per_epoch
    gated = (0, 0)  # teacher gating: (skipped, samples with a prior region)
    with (
        Interrupt() as interrupt,
        tqdm(total=total_steps, initial=step, desc="train", unit="step", disable=not shard.is_main) as bar,
    ):
        if config.sample.sample_at_first:
            _sample(run, step)
        batches = process_batches(
            plan.items, config.seed, shard.rank, shard.world, batches_per_epoch, epoch, done
        )
        prefetch = Prefetcher(batches)
        try:
            window, in_window, started, waited = StepMetrics(), 0, time.perf_counter(), 0.0
            window_items: list[CachedItem] = []
            for (epoch, done), batch in prefetch:
                # Windows of gradient_accumulation_steps batches never cross an epoch's end.
                window_size = min(accumulation, batches_per_epoch - (done - 1 - in_window))
                try:
                    result = compute_loss(
                        config,
                        run.family,
                        experts,
                        batch,
                        epoch,
                        run.device,
                        run.weight_dtype,
                        run.autocast,
                        (step, total_steps),
                        run.ema,
                    )
                    (result.loss / window_size).backward()  # type: ignore[no-untyped-call]  # torch leaves it unannotated
                finally:
                    experts.mark("after backward")
                    experts.restore_layout("after backward")
                loss = float(result.loss.detach())
                window.add(loss, result.prior, result.tiers, result.extras, result.experts)
                if result.gate is not None:
                    gated = (gated[0] + result.gate[0], gated[1] + result.gate[1])
                window_items.extend(batch.items)
                in_window += 1
                if in_window < window_size:
                    continue
                samples = shard.total(window.experts)  # every process's, so all agree on which LoRAs step
                loras = lora_steps(run.named, samples)  # an expert's own LoRA without samples does not
                shard.average_gradients([param for lora in loras.moving for param in lora])
                # Clipping off (0) still measures the norm: it multiplies by exactly 1.
                norm = clip_each(loras.moving, config.optim.max_grad_norm)
                if shard.any(not (math.isfinite(window.loss) and math.isfinite(norm))):
                    raise _diverged(step + 1, window.loss, norm, window_items)
                run.optimizer.step()
                run.scheduler.step()
                run.optimizer.zero_grad(set_to_none=True)
                step += 1
                if run.spill is not None:
                    run.spill.observe(time.perf_counter() - started)
                if run.ema is not None:
                    run.ema.after_step(step, loras.idle)
                if run.metrics is not None:
                    record = window.record(
                        step,
                        epoch,
                        float(run.scheduler.get_last_lr()[0]),
                        step_time=time.perf_counter() - started,
                        data_wait=prefetch.waited - waited,
                        experts=samples,
                    )
                    if gated[1]:  # measured so far in this run (this process's samples)
                        record.extras["prior_skip_rate"] = gated[0] / gated[1]
                    run.metrics.write(record)
                    bar.set_postfix(progress_postfix(record), refresh=False)
                bar.update(1)
                stop = shard.any(interrupt.requested)
                finished = step >= total_steps
                if run.validator is not None and (
                    finished or step % (config.validate_every_n_steps or 1) == 0
                ):
                    _validate(run, step)
                epoch_end = done == batches_per_epoch
                if finished or stop or ckpt.save_due(config, step, epoch, epoch_end):
                    after = (
                        ckpt.Position(step, epoch + 1, 0) if epoch_end else ckpt.Position(step, epoch, done)
                    )
                    ema = None if run.ema is None else run.ema.state()
                    ckpt.save(
                        config,
                        run.family,
                        experts,
                        run.named,
                        run.optimizer,
                        run.scheduler,
                        after,
                        shard,
                        ema,
                    )
                if not stop and _sample_due(config, step, epoch, epoch_end, finished):
                    _sample(run, step)
                if stop and not finished:
                    raise TrainingInterrupted(ckpt.checkpoint_dir(config.output_dir, step))
                if finished:
                    break
                window, in_window, started, waited = StepMetrics(), 0, time.perf_counter(), prefetch.waited
                window_items = []
        finally:
            prefetch.close()
    if shard.is_main:
        if gated[1]:
            log.info(
                "teacher gating: skipped %.1f%% of %d samples with a prior region (expected %.1f%%)%s",
                100 * gated[0] / gated[1],
                gated[1],
                100 * (run.expected_skip or 0.0),
                f"; rank 0's samples of {shard.world} processes" if shard.world > 1 else "",
            )
        if run.metrics is not None and (shares := run.metrics.expert_summary()) is not None:
            log.info("%s", shares)
        written = [str(config.output_dir / name) for name in ckpt.lora_files(config).values()]
        log.info("wrote %s", ", ".join(written))


def _validate(run: Run, step: int) -> None:
    """Rank 0 validates (``train.validation``) while the others wait."""
    if run.shard.is_main and run.validator is not None:
        results = run.validator.run(run.experts, run.weight_dtype, run.autocast)
        if run.metrics is not None:
            run.metrics.write_validation(step, results)
        log.info("%s", describe(step, results))
    run.shard.barrier()


def _sample(run: Run, step: int) -> None:
    """Rank 0 samples (``masktrain.sample``) while the others wait."""
    if run.sampler is not None:
        written = run.sampler.run(run.experts, step)
        if run.metrics is not None and run.metrics.trackers is not None:
            run.metrics.trackers.samples(step, written)
    run.shard.barrier()


def _sample_due(config: TrainConfig, step: int, epoch: int, epoch_end: bool, finished: bool) -> bool:
    """Whether --sample_every_n_steps or --sample_every_n_epochs asks for samples now (and always
    at the last step of a run that samples)."""
    settings = config.sample
    if not settings.enabled:
        return False
    if finished or (settings.sample_every_n_steps and step % settings.sample_every_n_steps == 0):
        return True
    every = settings.sample_every_n_epochs
    return bool(epoch_end and every and (epoch + 1) % every == 0)


def _diverged(step: int, loss: float, norm: float, items: list[CachedItem]) -> TrainingDivergedError:
    names = ", ".join(sorted({item.latent_path.name for item in items}))
    return TrainingDivergedError(
        f"training diverged at step {step}: non-finite loss or gradients (loss {loss:g}, gradient norm "
        f"{norm:g}) on the batch of {names}; nothing of this step was saved and the last checkpoint is "
        "intact; lower --learning_rate or set --max_grad_norm"
    )
