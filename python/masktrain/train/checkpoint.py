"""Checkpoints: ``OUTPUT_DIR/step-000100/`` holds everything a run needs to continue exactly.

- ``adapter.safetensors``: the trainable LoRA parameters under their module names (float32,
  bit-exact; the user-facing LoRA file beside it is in the run's ``--lora_format``);
- ``optimizer.pt``, ``scheduler.pt``, ``rng.pt``: torch state dicts, loaded with
  ``weights_only=True`` (plain tensors and numbers, no pickled objects);
- ``state.json``: optimizer step, epoch and how many of this epoch's batches are done;
- ``config.json``: the resolved configuration of the run that wrote it;
- the run's LoRA file, as it was at that step (with ``--lora_per_expert`` two files,
  ``OUTPUT_NAME_high_noise`` and ``OUTPUT_NAME_low_noise``: :func:`lora_files`; ``adapter.safetensors``
  then holds both LoRAs, their names prefixed ``high_noise.`` and ``low_noise.``, and the optimizer
  state both).

The latest LoRA file is also at the top of ``OUTPUT_DIR``. :func:`save` writes both when
``--save_every_n_steps`` / ``--save_every_n_epochs`` say so (:func:`save_due`), at the last step
and when the run is stopped, then prunes what ``--save_last_n_*`` no longer keeps.

A checkpoint is filled under a temporary name and renamed into place, and the top-level LoRA is
replaced atomically (``masktrain.atomic``), so a run killed while saving leaves the previous
checkpoints and LoRA intact and nothing half-written; the next run removes the temporaries.

The folder comes first and the top-level copy second, so the newest LoRA is always in a checkpoint:
a run killed between the two leaves the top-level file one save behind, and a ``--resume`` of that
checkpoint (also one that finds nothing left to train) puts the checkpoint's copy in its place
(:func:`repair_top_level`) before anything else.

While a run writes OUTPUT_DIR it holds it (:func:`hold_output_dir`): a second ``train`` into the
same folder is refused in one line naming the first (its pid and host), before any model loads.
"""

from __future__ import annotations

import contextlib
import filecmp
import io
import json
import logging
import pickle
import random
import re
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NotRequired, TypedDict

import numpy as np
import safetensors
import safetensors.torch
import torch

from masktrain import atomic, catalog
from masktrain.config.sample_prompts import load_prompts
from masktrain.config.train import TrainConfig
from masktrain.denoiser.experts import Experts
from masktrain.denoiser.lora import lora_file_bytes
from masktrain.denoiser.lora_file import EXPERT_LORAS, META_EXPERT, META_STEP, lora_file_name
from masktrain.distributed import Shard
from masktrain.errors import TrainConfigError
from masktrain.models.base import ModelFamily
from masktrain.sample.outputs import sample_dir, sample_drawn
from masktrain.train.preflight import output_dir_busy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Position:
    step: int
    """Optimizer steps done."""
    epoch: int
    """The epoch the next batch belongs to."""
    batches_done: int
    """Batches of that epoch (this process's share) already trained on."""


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return output_dir / f"step-{step:06d}"


class NumpyRngState(TypedDict):
    """numpy's legacy global generator (MT19937), in tensors and numbers ``weights_only`` loads."""

    keys: torch.Tensor
    pos: int
    has_gauss: int
    gauss: float


class RngState(TypedDict):
    """Every global generator a run draws from, as ``rng.pt`` stores it."""

    torch: torch.Tensor
    numpy: NumpyRngState
    python: tuple[Any, ...]
    cuda: NotRequired[list[torch.Tensor]]


def rng_state() -> RngState:
    legacy = np.random.get_state(legacy=True)
    assert isinstance(legacy, tuple)  # legacy=True: ("MT19937", keys, pos, has_gauss, gauss)
    _, keys, pos, has_gauss, gauss = legacy
    state = RngState(
        torch=torch.get_rng_state(),
        numpy=NumpyRngState(
            keys=torch.from_numpy(keys.astype(np.int64)),
            pos=int(pos),
            has_gauss=int(has_gauss),
            gauss=float(gauss),
        ),
        python=random.getstate(),
    )
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: RngState) -> None:
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    keys = numpy_state["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, numpy_state["pos"], numpy_state["has_gauss"], numpy_state["gauss"]))
    python_state = state["python"]  # weights_only loads the inner tuple as a list
    random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _torch_bytes(state: object) -> bytes:
    """``torch.save`` into memory: written to a file, a full disk reads "basic_ios::clear:
    iostream error"; through Python's file API it is ENOSPC, named."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def save_checkpoint(
    output_dir: Path,
    *,
    adapter: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    position: Position,
    config_json: str,
    loras: Mapping[str, bytes],
    ema: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the checkpoint folder of ``position.step`` atomically, then the top-level LoRA files
    (`loras`: file name -> bytes; copies of those in the folder); returns the folder. `ema`: the
    EMA teacher's weights (``ema.safetensors``), once it has started."""
    target = checkpoint_dir(output_dir, position.step)
    float32 = {name: tensor.detach().float().cpu().contiguous() for name, tensor in adapter.items()}
    files = {
        "adapter.safetensors": safetensors.torch.save(float32),
        "optimizer.pt": _torch_bytes(optimizer.state_dict()),
        "scheduler.pt": _torch_bytes(scheduler.state_dict()),
        "rng.pt": _torch_bytes(rng_state()),
        "state.json": json.dumps(position.__dict__, indent=2).encode(),
        "config.json": config_json.encode(),
        **loras,
    }
    if ema:
        files[EMA_FILE] = safetensors.torch.save(ema)
    with atomic.directory(target) as temp:
        for name, data in files.items():
            path = temp / name
            try:
                path.write_bytes(data)
            except OSError as error:
                raise atomic.write_error(error, target / name) from error
    for lora_name, lora_bytes in loras.items():
        atomic.write_bytes(output_dir / lora_name, lora_bytes)
    return target


EMA_FILE = "ema.safetensors"


def load_ema(folder: Path) -> dict[str, torch.Tensor]:
    """The EMA teacher's weights of a checkpoint ({} when it had not started)."""
    path = folder / EMA_FILE
    return safetensors.torch.load_file(path) if path.is_file() else {}


def prune(output_dir: Path, latest: Position, *, last_n_steps: int | None, last_n_epochs: int | None) -> None:
    """Delete the checkpoints that ``--save_last_n_steps`` / ``--save_last_n_epochs`` no longer
    keep, after `latest` was written (never `latest` itself): those more than N steps older, or
    from before the last N epochs (an epoch's checkpoint records the epoch after it)."""
    if last_n_steps is None and last_n_epochs is None:
        return
    for folder in sorted(output_dir.glob("step-[0-9]*")):
        try:
            position = Position(**json.loads((folder / "state.json").read_text()))
        except (OSError, ValueError, TypeError):
            continue  # not a complete checkpoint of this layout: not ours to delete
        if position.step >= latest.step:
            continue
        too_old = last_n_steps is not None and position.step <= latest.step - last_n_steps
        if last_n_epochs is not None and position.epoch <= latest.epoch - last_n_epochs:
            too_old = True
        if too_old:
            shutil.rmtree(folder)


@dataclass
class LoadedCheckpoint:
    adapter: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: RngState
    position: Position


def load_checkpoint(folder: Path) -> LoadedCheckpoint:
    state = json.loads((folder / "state.json").read_text())
    return LoadedCheckpoint(
        adapter=safetensors.torch.load_file(folder / "adapter.safetensors"),
        optimizer=torch.load(folder / "optimizer.pt", weights_only=True, map_location="cpu"),
        scheduler=torch.load(folder / "scheduler.pt", weights_only=True, map_location="cpu"),
        rng=torch.load(folder / "rng.pt", weights_only=True, map_location="cpu"),
        position=Position(**state),
    )


_DAMAGED = (OSError, EOFError, RuntimeError, ValueError, KeyError, TypeError, pickle.UnpicklingError)
"""What reading a damaged checkpoint raises (TypeError: a ``state.json`` without a field)."""


def restore(
    folder: Path,
    named: list[tuple[str, torch.nn.Parameter]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> Position:
    """Load `folder` into the run: the LoRA weights `named`, the optimizer, the schedule and every
    generator; returns where the run stands. A checkpoint that cannot be read, or whose adapter
    is not the LoRA these weights are, is a :class:`TrainConfigError` naming it."""
    try:
        state = load_checkpoint(folder)
        params = dict(named)
        shapes = {name: tuple(param.shape) for name, param in named}
        if {name: tuple(t.shape) for name, t in state.adapter.items()} != shapes:
            raise ValueError("its adapter holds other LoRA weights than these flags build")
        for name, tensor in state.adapter.items():
            params[name].data.copy_(tensor.to(params[name].device))
        optimizer.load_state_dict(state.optimizer)
        scheduler.load_state_dict(state.scheduler)
        restore_rng(state.rng)
    except _DAMAGED as error:
        raise TrainConfigError(
            f"--resume {folder}: damaged checkpoint ({type(error).__name__}: {error})"
        ) from None
    return state.position


def lora_files(config: TrainConfig) -> dict[str, str]:
    """The LoRA file(s) a run writes, by LoRA (``Experts.loras``' names): ``{"": NAME.safetensors}``,
    or with ``--lora_per_expert`` one per expert (``high_noise``: ``NAME_high_noise.safetensors``)."""
    experts = EXPERT_LORAS if config.lora_per_expert else ("",)
    return {expert: lora_file_name(config.output_name, expert) for expert in experts}


def save_due(config: TrainConfig, step: int, epoch: int, epoch_end: bool) -> bool:
    """Whether --save_every_n_steps or --save_every_n_epochs asks for a checkpoint now."""
    if config.save_every_n_steps and step % config.save_every_n_steps == 0:
        return True
    return bool(epoch_end and config.save_every_n_epochs and (epoch + 1) % config.save_every_n_epochs == 0)


def lora_metadata(config: TrainConfig) -> dict[str, str]:
    """The training flags a LoRA file carries (``lora_file`` adds arch, rank, alpha and version)."""
    mask = config.mask
    return {
        "masktrain.use_mask_loss": str(mask.use_mask_loss).lower(),
        "masktrain.mask_gamma": str(mask.mask_gamma),
        "masktrain.mask_min_weight": str(mask.mask_min_weight),
        "masktrain.prior_preservation_weight": str(mask.prior_preservation_weight),
        "masktrain.prior_mask_threshold": str(mask.prior_mask_threshold),
        "masktrain.normalize_per_sample": str(mask.normalize_per_sample).lower(),
    }


def save(
    config: TrainConfig,
    family: ModelFamily,
    experts: Experts,
    named: list[tuple[str, torch.nn.Parameter]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    position: Position,
    shard: Shard,
    ema: dict[str, torch.Tensor] | None = None,
) -> None:
    """Rank 0 writes the checkpoint folder and the LoRA file (the latest copy at the top level) and
    prunes old checkpoints; every process waits for it."""
    if shard.is_main:
        dtype = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[config.save_precision]
        names = lora_files(config)
        loras = {
            names[expert]: lora_file_bytes(
                model,
                family,
                layout=config.lora_format,
                metadata=lora_metadata(config)
                | {META_STEP: str(position.step)}
                | ({META_EXPERT: expert} if expert else {}),
                dtype=dtype,
            )
            for expert, model in experts.loras()
        }
        save_checkpoint(
            config.output_dir,
            adapter={n: p.detach() for n, p in named},
            optimizer=optimizer,
            scheduler=scheduler,
            position=position,
            config_json=config.to_json(),
            loras=loras,
            ema=ema,
        )
        prune(
            config.output_dir,
            position,
            last_n_steps=config.save_last_n_steps,
            last_n_epochs=config.save_last_n_epochs,
        )
    shard.barrier()


@contextlib.contextmanager
def hold_output_dir(config: TrainConfig, shard: Shard) -> Iterator[None]:
    """OUTPUT_DIR is this run's while the block runs. Every process's temporaries carry rank 0's
    run id; rank 0 takes the folder's owner lock (a live run holding it: a
    :class:`TrainConfigError` naming that run, on every process) and the run lock of
    ``OUTPUT_DIR/sample`` when this run samples, removes the temporaries killed runs left in both,
    and repairs the top-level LoRA of a resumed run (:func:`repair_top_level`)."""
    atomic.set_run_id(shard.gather(atomic.RUN_ID)[0])
    with contextlib.ExitStack() as held:
        refusal = None
        if shard.is_main:
            try:
                held.enter_context(atomic.run_lock(config.output_dir, owner="train"))
            except BlockingIOError as busy:
                refusal = output_dir_busy(config.output_dir, busy.strerror or "another masktrain run")
            except OSError as error:
                refusal = f"--output_dir {config.output_dir}: cannot take its run lock ({error})"
        refusal = shard.gather(refusal)[0]
        if refusal is not None:
            raise TrainConfigError(refusal)
        if shard.is_main:
            samples = sample_dir(config.output_dir)
            if config.sample.enabled:
                held.enter_context(atomic.run_lock(samples))
            atomic.remove_stale_temporaries(config.output_dir)
            atomic.remove_stale_temporaries(samples)
            if config.resume is not None:
                for name in lora_files(config).values():
                    repair_top_level(config.output_dir, config.resume, name)
        yield


_STEP_FOLDER = re.compile(r"step-(\d+)")


def repair_top_level(output_dir: Path, folder: Path, lora_name: str) -> bool:
    """Make the top-level LoRA file `lora_name` the copy in `folder`, the checkpoint a run resumes
    from, when that is the newest checkpoint of `output_dir` and the two differ (a run stopped
    between writing the checkpoint and the top-level copy); returns whether it did."""
    source, target = folder / lora_name, output_dir / lora_name
    if not source.is_file() or folder.resolve().parent != output_dir.resolve():
        return False
    steps = {
        int(match[1]): path
        for path in output_dir.glob("step-[0-9]*")
        if (match := _STEP_FOLDER.fullmatch(path.name)) and path.is_dir()
    }
    if not steps or steps[max(steps)].resolve() != folder.resolve():
        return False  # an older checkpoint: the run rewrites the top-level file at its next save
    if target.is_file() and filecmp.cmp(source, target, shallow=False):
        return False
    before = _saved_step(target)
    atomic.write_bytes(target, source.read_bytes())
    log.warning(
        "%s was %s, not the LoRA of the newest checkpoint %s (a run stopped between writing the two): "
        "replaced it with %s",
        target,
        "missing" if before is None else f"the LoRA of step {before}",
        folder.name,
        source,
    )
    return True


def _saved_step(path: Path) -> str | None:
    """The step a LoRA file records (``masktrain.step``), "?" without one, None without the file."""
    if not path.is_file():
        return None
    try:
        with safetensors.safe_open(path, "pt") as handle:
            return str((handle.metadata() or {}).get(META_STEP, "?"))
    except (OSError, safetensors.SafetensorError):
        return "?"


def report_complete(config: TrainConfig, step: int, total_steps: int) -> None:
    """A ``--resume`` of a checkpoint that reached the run's last step: nothing to train; and the
    command that draws the last samples when a run stopped while drawing them left some missing."""
    log.info(
        "%s is already complete at step %d (--max_train_steps %d): nothing to train; raise "
        "--max_train_steps to continue it",
        config.resume,
        step,
        total_steps,
    )
    prompts_file = config.sample.sample_prompts
    if prompts_file is None or config.resume is None:
        return
    prompts = load_prompts(prompts_file)
    missing = [
        prompt.index
        for prompt in prompts
        if not sample_drawn(
            config.output_dir,
            config.output_name,
            step,
            prompt.index,
            config.seed + prompt.index if prompt.seed is None else prompt.seed,
        )
    ]
    if not missing:
        return
    spec = catalog.arch(config.arch)
    high = ""
    if config.dit_high_noise:
        high = f" --dit_high_noise {config.dit_high_noise} --timestep_boundary {config.boundary:g}"
    names = lora_files(config)
    lora = " ".join(
        f"--lora{'_high_noise' if expert == 'high_noise' else ''} {config.resume / name}"
        for expert, name in sorted(names.items(), reverse=True)  # --lora (low noise) first
    )
    log.warning(
        "the samples of step %d are missing for %d of %d prompt(s) (a run stopped while drawing them); "
        "draw them with: masktrain sample --arch %s --dit %s%s --vae %s %s %s --sample_prompts %s %s "
        "--output_dir %s --output_name %s --seed %d",
        step,
        len(missing),
        len(prompts),
        config.arch,
        config.dit,
        high,
        config.sample.vae,
        spec.text_flag,
        config.sample.text_encoder,
        prompts_file,
        lora,
        config.output_dir,
        config.output_name,
        config.seed,
    )
