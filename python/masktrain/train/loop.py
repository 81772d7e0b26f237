"""``masktrain train``: the training loop, top to bottom.

One optimizer step = ``gradient_accumulation_steps`` batches. Per batch:

1. noise and sigmas come from a generator seeded by (seed, epoch, batch index), so a resumed or a
   multi-process run draws exactly what an uninterrupted single-process run draws;
2. ``noisy = (1 - t)·x + t·noise``, target ``noise - x`` (flow matching, ``flow_matching.noised``);
3. with prior preservation and a prior region in the batch, the teacher prediction comes first:
   the same model with its adapters off (with ``--fp8_base``: the same fp8 base), under no_grad,
   on the same inputs; block swap's layout is restored right after it;
4. the student prediction; per-element MSE against the target (and against the teacher), times
   the timestep weighting; ``loss.masked_loss`` reduces both;
5. backward; after the last batch of the window the gradients are averaged over processes,
   clipped, and the optimizer and scheduler step;
6. after the step: validation, the checkpoint, then samples (``masktrain.sample``), each when due.

Before any model loads, ``preflight`` lists the cached items and plans the run (the flags were
checked when the config was built).

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
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from masktrain import atomic, distributed
from masktrain.config import mask_loss
from masktrain.config.train import TrainConfig
from masktrain.data.cached_items import CachedItem, epoch_batches
from masktrain.data.loader import Batch, Prefetcher
from masktrain.distributed import Shard
from masktrain.errors import TrainingDivergedError, TrainingInterrupted
from masktrain.loss import (
    has_prior_region,
    linear_fraction,
    mask_regions,
    masked_loss_terms,
    region_losses,
    unreduced_loss,
)
from masktrain.models import get_family
from masktrain.models.base import ModelFamily
from masktrain.sample.sampler import Sampler
from masktrain.train import checkpoint as ckpt
from masktrain.train import lora, timesteps
from masktrain.train.device import precision, resolve_device
from masktrain.train.ema_teacher import EmaTeacher
from masktrain.train.experts import Experts, build_experts
from masktrain.train.flow_matching import noised
from masktrain.train.metrics import MetricsLog, StepMetrics, progress_postfix
from masktrain.train.optim import build_optimizer, build_scheduler, param_groups
from masktrain.train.preflight import TrainPlan, preflight
from masktrain.train.prior_teacher import ema_teacher, expected_skip_rate, gate_samples
from masktrain.train.trackers import Trackers
from masktrain.train.validation import Validator, describe

log = logging.getLogger(__name__)

CACHE_HINT = mask_loss.DEFAULT_CACHE_HINT


def _batch_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    # Modulo 2**64, the seeds torch takes; the identity for every seed below ~1.8e7.
    return torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 1_000_003 + index) % 2**64)


@dataclass
class StepResult:
    loss: torch.Tensor
    prior: float
    tiers: dict[str, float | None]
    extras: dict[str, float]
    """``teacher_ran`` (with prior preservation), ``prior_mass`` (the mean prior region), Huber's
    ``huber_target_linear`` / ``huber_prior_linear`` shares: a silent no-op shows in the first lines."""
    gate: tuple[int, int] | None = None
    """Teacher gating: (samples with a prior region whose teacher pass was skipped, samples with a
    prior region)."""


def compute_loss(
    config: TrainConfig,
    family: ModelFamily,
    experts: Experts,
    batch: Batch,
    epoch: int,
    device: torch.device,
    weight_dtype: torch.dtype,
    autocast: torch.dtype | None,
    progress: tuple[int, int] = (0, 1),
    ema: EmaTeacher | None = None,
) -> StepResult:
    """The loss of one batch (not yet backpropagated); `progress` is (optimizer steps done, the
    run's total), for the prior schedule's warm-up."""
    settings = config.mask
    if settings.use_mask_loss:
        mask_loss.require_mask_weights(batch.mask_weights is not None, CACHE_HINT)
        if (
            settings.mask_min_weight == 0
            and batch.mask_weights is not None
            and not bool(batch.mask_weights.any())
        ):
            names = ", ".join(item.latent_path.name for item in batch.items)
            log.warning("All-zero mask weights detected: the target loss is zero for the batch of %s", names)
    generator = _batch_generator(config.seed, epoch, batch.index)
    latents = batch.latents.to(device)
    batch_size, _, _, height, width = latents.shape
    noise = torch.randn(latents.shape, generator=generator).to(device)
    sigmas = timesteps.sample_sigmas(config.timesteps, batch_size, (height, width), generator, "cpu").to(
        device
    )
    noisy, target = noised(latents, noise, sigmas)
    text = family.collate_text(batch.text).to(device, weight_dtype)
    mask = batch.mask_weights.to(device) if batch.mask_weights is not None else None
    weighting = timesteps.loss_weighting(config.timesteps, sigmas)
    weighting = None if weighting is None else weighting.to(device).view(-1, 1, 1, 1, 1)

    autocast_context = (
        torch.autocast(device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext()
    )
    teacher = None
    need_prior = (
        settings.use_mask_loss
        and settings.prior_preservation_weight > 0
        and mask is not None
        and has_prior_region(mask, settings)
    )
    gating = gate_samples(settings, mask, sigmas, progress) if need_prior and mask is not None else None
    gate = None if gating is None else gating.gate
    weights_b = None if gating is None else gating.weights
    gate_counts = None if gating is None else gating.counts
    if gating is not None:
        need_prior = bool(gating.gate.any())
    ema_used = ema is not None and ema.started
    if need_prior:
        experts.mark("before the teacher")
        # the teacher: the base model (adapters off), or the EMA of the LoRA swapped in (adapters on)
        model = ema.swapped() if ema is not None and ema.started else experts.adapters_disabled()
        try:
            with torch.no_grad(), model, autocast_context:
                teacher = experts.predict(family, noisy, sigmas, text).float()
        finally:  # the teacher's blocks were never backpropagated: put swapped ones back
            experts.mark("after the teacher")
            experts.restore_layout("after the teacher")
    with autocast_context:
        prediction = experts.predict(family, noisy, sigmas, text)
    experts.mark("after the student forward")
    difference = prediction.float() - target
    per_element = unreduced_loss(difference, config.loss_type, config.loss_delta)
    teacher_difference = None if teacher is None else prediction.float() - teacher
    prior_element = (
        None
        if teacher_difference is None
        else unreduced_loss(teacher_difference, config.loss_type, config.loss_delta)
    )
    if weighting is not None:
        per_element = per_element * weighting
        prior_element = None if prior_element is None else prior_element * weighting
    terms = masked_loss_terms(
        per_element, mask, settings, prior_loss=prior_element, prior_gate=gate, prior_weights=weights_b
    )
    tiers = region_losses(per_element.detach(), mask) if mask is not None else {}
    extras: dict[str, float] = {}
    if settings.use_mask_loss and mask is not None:
        with torch.no_grad():
            weights, prior_region = mask_regions(mask, settings, gate)
            if settings.prior_preservation_weight > 0:
                extras["teacher_ran"] = float(teacher is not None)
                if settings.prior_teacher_mode == "ema":
                    extras["teacher_ema"] = float(teacher is not None and ema_used)
                extras["prior_mass"] = float(prior_region.mean())
            if config.loss_type == "huber":
                delta = config.loss_delta
                extras["huber_target_linear"] = linear_fraction(difference.abs() > delta, weights)
                if teacher_difference is not None:
                    extras["huber_prior_linear"] = linear_fraction(
                        teacher_difference.abs() > delta, prior_region
                    )
    return StepResult(terms.target + terms.prior, float(terms.prior.detach()), tiers, extras, gate_counts)


def _all_reduce_grads(params: list[torch.nn.Parameter], shard: Shard) -> None:
    if shard.world == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= shard.world
    offset = 0
    for param, grad in zip(params, grads, strict=True):
        count = grad.numel()
        param.grad = flat[offset : offset + count].view_as(param).clone()
        offset += count


class _Interrupt:
    """Ctrl-C (SIGINT) or SIGTERM (a scheduler's stop, ``kill``) sets a flag the loop checks after
    each optimizer step, which then saves and stops; a second signal aborts."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Callable[[int, FrameType | None], Any] | int | None] = {}

    def __enter__(self) -> _Interrupt:
        try:
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        except ValueError:  # not the main thread (e.g. called from a test thread)
            self._previous = {}
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        name = signal.Signals(signum).name
        log.warning("%s: saving a checkpoint after this step (send it again to abort)", name)

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            if previous is not None:
                signal.signal(sig, previous)


def run(config: TrainConfig) -> Path:
    """Train; returns the path of the LoRA file."""
    for warning in mask_loss.validate(config.mask):
        log.warning("%s", warning)
    with distributed.process_group(config.ddp_timeout) as shard:
        plan = preflight(config, shard.world)
        lora_path = config.output_dir / f"{config.output_name}.safetensors"
        if plan.complete:
            log.info(
                "%s is already complete at step %d (--max_train_steps %d): nothing to train; raise "
                "--max_train_steps to continue it",
                config.resume,
                plan.resume_step,
                plan.total_steps,
            )
            return lora_path
        return _train(config, get_family(config.arch), shard, plan)


def _train(config: TrainConfig, family: ModelFamily, shard: Shard, plan: TrainPlan) -> Path:
    with contextlib.ExitStack() as run_lock:  # held by rank 0 while this run writes OUTPUT_DIR
        return _train_locked(config, family, shard, plan, run_lock)


def _train_locked(
    config: TrainConfig, family: ModelFamily, shard: Shard, plan: TrainPlan, run_lock: contextlib.ExitStack
) -> Path:
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
        )
    experts = build_experts(config, family, device, weight_dtype)
    named = experts.trainable()
    params = [param for _, param in named]
    if shard.world > 1:  # identical start on every process
        for param in params:
            dist.broadcast(param.data, src=0)
    optim = config.optim
    optimizer = build_optimizer(
        param_groups(named, optim.learning_rate, config.network.loraplus_lr_ratio),
        optimizer_type=optim.optimizer_type,
        learning_rate=optim.learning_rate,
        weight_decay=optim.weight_decay,
        betas=optim.betas,
        eps=optim.eps,
        adafactor_args=optim.adafactor_args,
        prodigy_args=optim.prodigy_args,
    )
    batches_per_epoch, total_steps = plan.batches_per_epoch, plan.total_steps
    scheduler = build_scheduler(
        optimizer,
        name=optim.lr_scheduler,
        warmup_steps=optim.lr_warmup_steps,
        total_steps=total_steps,
        min_lr_ratio=optim.lr_scheduler_min_lr_ratio,
        power=optim.lr_scheduler_power,
    )

    position = ckpt.Position(step=0, epoch=0, batches_done=0)
    if config.resume is not None:
        position = ckpt.restore(config.resume, named, optimizer, scheduler)
        log.info("resumed from %s at step %d", config.resume, position.step)
    ema = ema_teacher(config, named, total_steps)

    atomic.set_run_id(shard.gather(atomic.RUN_ID)[0])  # every process's temporaries carry rank 0's id
    expected_skip = None
    if shard.is_main:
        run_lock.enter_context(atomic.run_lock(config.output_dir))
        atomic.remove_stale_temporaries(config.output_dir)
        if config.overwrite and config.resume is None:  # start over: no old step mixes with this run
            for old in config.output_dir.glob("step-*"):
                shutil.rmtree(old)
        atomic.write_text(config.output_dir / "config.json", config.to_json())
        if config.mask.use_mask_loss:
            print(mask_loss.banner(config.mask, CACHE_HINT), flush=True)
        expected_skip = expected_skip_rate(config, plan.items)
        log.info(
            "training %s on %s: %d items, %d batches per epoch and process, %d steps, %d process(es)",
            family.name,
            device,
            len(plan.items),
            batches_per_epoch,
            total_steps,
            shard.world,
        )
    metrics = None
    if shard.is_main:
        trackers = Trackers(config.trackers, config.output_dir, config.output_name, config.to_json())
        metrics = MetricsLog(config.output_dir, position.step if config.resume else None, trackers)

    validator = (
        Validator(plan.validation_items, family, config.seed, device) if plan.validation_items else None
    )
    lora_path = config.output_dir / f"{config.output_name}.safetensors"
    step, epoch, done = position.step, position.epoch, position.batches_done
    with (
        contextlib.closing(metrics) if metrics is not None else contextlib.nullcontext(),
        _Interrupt() as interrupt,
        tqdm(total=total_steps, initial=step, desc="train", unit="step", disable=not shard.is_main) as bar,
    ):
        if config.sample.sample_at_first:
            _sample(sampler, experts, step, shard, metrics)
        prefetch = Prefetcher(_schedule(plan.items, config.seed, shard, batches_per_epoch, epoch, done))
        gated = (0, 0)  # teacher gating: (skipped, samples with a prior region)
        try:
            window, in_window, started, waited = StepMetrics(), 0, time.perf_counter(), 0.0
            window_items: list[CachedItem] = []
            for (epoch, done), batch in prefetch:
                # Windows of gradient_accumulation_steps batches never cross an epoch's end.
                window_start = done - 1 - in_window
                window_size = min(optim.gradient_accumulation_steps, batches_per_epoch - window_start)
                try:
                    result = compute_loss(
                        config,
                        family,
                        experts,
                        batch,
                        epoch,
                        device,
                        weight_dtype,
                        autocast,
                        (step, total_steps),
                        ema,
                    )
                    (result.loss / window_size).backward()  # type: ignore[no-untyped-call]  # torch leaves it unannotated
                finally:
                    experts.mark("after backward")
                    experts.restore_layout("after backward")
                window.add(float(result.loss.detach()), result.prior, result.tiers, result.extras)
                if result.gate is not None:
                    gated = (gated[0] + result.gate[0], gated[1] + result.gate[1])
                window_items.extend(batch.items)
                in_window += 1
                if in_window < window_size:
                    continue
                _all_reduce_grads(params, shard)
                # Clipping off (0) still measures the norm: it multiplies by exactly 1.
                norm = float(torch.nn.utils.clip_grad_norm_(params, optim.max_grad_norm or math.inf))
                if _agree(not (math.isfinite(window.loss) and math.isfinite(norm)), shard):
                    raise _diverged(step + 1, window.loss, norm, window_items)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                if ema is not None:
                    ema.after_step(step)
                if metrics is not None:
                    record = window.record(
                        step,
                        epoch,
                        float(scheduler.get_last_lr()[0]),
                        step_time=time.perf_counter() - started,
                        data_wait=prefetch.waited - waited,
                    )
                    if gated[1]:  # measured so far in this run (this process's samples)
                        record.extras["prior_skip_rate"] = gated[0] / gated[1]
                    metrics.write(record)
                    bar.set_postfix(progress_postfix(record), refresh=False)
                bar.update(1)
                stop = _agree(interrupt.requested, shard)
                finished = step >= total_steps
                if validator is not None and (finished or step % (config.validate_every_n_steps or 1) == 0):
                    _validate(validator, experts, step, metrics, shard, weight_dtype, autocast)
                epoch_end = done == batches_per_epoch
                if finished or stop or _save_due(config, step, epoch, epoch_end):
                    after = (
                        ckpt.Position(step, epoch + 1, 0) if epoch_end else ckpt.Position(step, epoch, done)
                    )
                    _save(config, family, experts, named, optimizer, scheduler, after, shard, ema)
                if not stop and _sample_due(config, step, epoch, epoch_end, finished):
                    _sample(sampler, experts, step, shard, metrics)
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
                100 * (expected_skip or 0.0),
                f"; rank 0's samples of {shard.world} processes" if shard.world > 1 else "",
            )
        log.info("wrote %s", lora_path)
    return lora_path


def _validate(
    validator: Validator,
    experts: Experts,
    step: int,
    metrics: MetricsLog | None,
    shard: Shard,
    dtype: torch.dtype,
    autocast: torch.dtype | None,
) -> None:
    """Rank 0 validates (``train.validation``) while the others wait."""
    if shard.is_main:
        results = validator.run(experts, dtype, autocast)
        if metrics is not None:
            metrics.write_validation(step, results)
        log.info("%s", describe(step, results))
    shard.barrier()


def _sample(
    sampler: Sampler | None, experts: Experts, step: int, shard: Shard, metrics: MetricsLog | None
) -> None:
    """Rank 0 samples (``masktrain.sample``) while the others wait."""
    if sampler is not None:
        written = sampler.run(experts, step)
        if metrics is not None and metrics.trackers is not None:
            metrics.trackers.samples(step, written)
    shard.barrier()


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


def _save_due(config: TrainConfig, step: int, epoch: int, epoch_end: bool) -> bool:
    """Whether --save_every_n_steps or --save_every_n_epochs asks for a checkpoint now."""
    if config.save_every_n_steps and step % config.save_every_n_steps == 0:
        return True
    return bool(epoch_end and config.save_every_n_epochs and (epoch + 1) % config.save_every_n_epochs == 0)


def _schedule(
    items: list[CachedItem], seed: int, shard: Shard, batches_per_epoch: int, epoch: int, done: int
) -> Iterator[tuple[tuple[int, int], int, list[CachedItem]]]:
    """This process's batches from (epoch, done) on, endlessly: ``((epoch, batches done after
    this one), index in the epoch's global order, items)``. Every process takes the same number
    of batches per epoch, so all reach each optimizer step together."""
    while True:
        order = epoch_batches(items, seed, epoch)
        mine = list(enumerate(order))[shard.rank :: shard.world][:batches_per_epoch]
        for position in range(done, len(mine)):
            index, batch_items = mine[position]
            yield (epoch, position + 1), index, batch_items
        epoch, done = epoch + 1, 0


def _diverged(step: int, loss: float, norm: float, items: list[CachedItem]) -> TrainingDivergedError:
    names = ", ".join(sorted({item.latent_path.name for item in items}))
    return TrainingDivergedError(
        f"training diverged at step {step}: non-finite loss or gradients (loss {loss:g}, gradient norm "
        f"{norm:g}) on the batch of {names}; nothing of this step was saved and the last checkpoint is "
        "intact; lower --learning_rate or set --max_grad_norm"
    )


def _agree(flag: bool, shard: Shard) -> bool:
    """Whether any process wants to stop (all must stop at the same step)."""
    if shard.world == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def lora_metadata(config: TrainConfig) -> dict[str, str]:
    """The training flags; ``lora.save_lora`` adds arch, rank, alpha and version."""
    mask = config.mask
    return {
        "masktrain.use_mask_loss": str(mask.use_mask_loss).lower(),
        "masktrain.mask_gamma": str(mask.mask_gamma),
        "masktrain.mask_min_weight": str(mask.mask_min_weight),
        "masktrain.prior_preservation_weight": str(mask.prior_preservation_weight),
        "masktrain.prior_mask_threshold": str(mask.prior_mask_threshold),
        "masktrain.normalize_per_sample": str(mask.normalize_per_sample).lower(),
    }


def _save(
    config: TrainConfig,
    family: ModelFamily,
    experts: Experts,
    named: list[tuple[str, torch.nn.Parameter]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    position: ckpt.Position,
    shard: Shard,
    ema: EmaTeacher | None = None,
) -> None:
    """Rank 0 writes the checkpoint folder and the LoRA file (the latest copy at the top level)."""
    if shard.is_main:
        dtype = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[config.save_precision]
        lora_bytes = lora.lora_file_bytes(
            experts.low,
            family,
            layout=config.lora_format,
            metadata=lora_metadata(config) | {lora.META_STEP: str(position.step)},
            dtype=dtype,
        )
        ckpt.save_checkpoint(
            config.output_dir,
            adapter={n: p.detach() for n, p in named},
            optimizer=optimizer,
            scheduler=scheduler,
            position=position,
            config_json=config.to_json(),
            lora_name=f"{config.output_name}.safetensors",
            lora_bytes=lora_bytes,
            ema=None if ema is None else ema.state(),
        )
        ckpt.prune(
            config.output_dir,
            position,
            last_n_steps=config.save_last_n_steps,
            last_n_epochs=config.save_last_n_epochs,
        )
    shard.barrier()
