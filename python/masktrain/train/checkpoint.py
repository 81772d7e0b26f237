"""Checkpoints: ``OUTPUT_DIR/step-000100/`` holds everything a run needs to continue exactly.

- ``adapter.safetensors``: the trainable LoRA parameters under their module names (float32,
  bit-exact; the user-facing LoRA file beside it is in the run's ``--lora_format``);
- ``optimizer.pt``, ``scheduler.pt``, ``rng.pt``: torch state dicts, loaded with
  ``weights_only=True`` (plain tensors and numbers, no pickled objects);
- ``state.json``: optimizer step, epoch and how many of this epoch's batches are done;
- ``config.json``: the resolved configuration of the run that wrote it.

A checkpoint is written into a temporary folder and renamed into place, so a run killed while
saving leaves the previous checkpoints intact and no half-written one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import safetensors.torch
import torch

from masktrain._native import TEMP_SUFFIX


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


def rng_state() -> dict[str, object]:
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, object] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": random.getstate(),
    }  # fmt: skip
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, object]) -> None:
    torch.set_rng_state(state["torch"])  # type: ignore[arg-type]
    numpy_state: dict = state["numpy"]  # type: ignore[assignment]
    keys = numpy_state["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, numpy_state["pos"], numpy_state["has_gauss"], numpy_state["gauss"]))
    python_state: tuple = state["python"]  # type: ignore[assignment]
    random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])  # type: ignore[arg-type]


def save_checkpoint(
    target: Path,
    *,
    adapter: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    position: Position,
    config_json: str,
    extra_files: dict[str, Path] | None = None,
) -> None:
    """Write the checkpoint folder `target` atomically; `extra_files` are moved into it."""
    temp = target.with_name(f".{target.name}{TEMP_SUFFIX}")
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir(parents=True)
    safetensors.torch.save_file(
        {name: tensor.detach().float().cpu().contiguous() for name, tensor in adapter.items()},
        temp / "adapter.safetensors",
    )
    torch.save(optimizer.state_dict(), temp / "optimizer.pt")
    torch.save(scheduler.state_dict(), temp / "scheduler.pt")
    torch.save(rng_state(), temp / "rng.pt")
    (temp / "state.json").write_text(json.dumps(position.__dict__, indent=2))
    (temp / "config.json").write_text(config_json)
    for name, source in (extra_files or {}).items():
        os.replace(source, temp / name)
    if target.exists():  # a rerun of the same step after a resume: replace it
        shutil.rmtree(target)
    os.replace(temp, target)


@dataclass
class LoadedCheckpoint:
    adapter: dict[str, torch.Tensor]
    optimizer: dict
    scheduler: dict
    rng: dict[str, object]
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


def remove_stale_temporaries(output_dir: Path) -> None:
    """Checkpoint folders and LoRA copies a killed run was still writing."""
    if output_dir.is_dir():
        for stale in output_dir.glob(f".step-*{TEMP_SUFFIX}"):
            shutil.rmtree(stale, ignore_errors=True)
        for pattern in (".*.safetensors.staged*", ".*.safetensors.top"):
            for partial in output_dir.glob(pattern):
                partial.unlink(missing_ok=True)
