"""What ``--resume`` needs before any model loads (torch-free): a complete checkpoint folder whose
LoRA is the one these flags would build. The arch, the rank, alpha, the LoRA targets and one LoRA
or two (``--lora_per_expert``: both LoRAs and their optimizer state come back) must match the
checkpoint's ``config.json``; the steps, the save cadence, memory and logging flags may
change. Every refusal is one line naming the folder and what differs."""

from __future__ import annotations

import json
from typing import Any

import safetensors

from masktrain.config.train import TrainConfig
from masktrain.errors import TrainConfigError

#: The files of a checkpoint folder (the LoRA file in the run's layout sits beside them).
CHECKPOINT_FILES = (
    "adapter.safetensors",
    "optimizer.pt",
    "scheduler.pt",
    "rng.pt",
    "state.json",
    "config.json",
)

#: What ``state.json`` holds: a ``checkpoint.Position``, each a whole number >= 0.
STATE_FIELDS = ("step", "epoch", "batches_done")

# (where in config.json, the name users know) of the settings that shape the LoRA's tensors.
_MUST_MATCH = (
    (("arch",), "arch"),
    (("network", "network_dim"), "network_dim"),
    (("network", "network_alpha"), "network_alpha"),
    (("network", "include_patterns"), "include_patterns"),
    (("network", "exclude_patterns"), "exclude_patterns"),
    # the optimizer's parameter groups (and their learning rates, kept in the scheduler's state)
    (("network", "loraplus_lr_ratio"), "loraplus_lr_ratio"),
    (("lora_per_expert",), "lora_per_expert"),
)
_BEFORE_THE_FLAG = {"lora_per_expert": False}
"""What a checkpoint written before a setting existed had."""


def checkpoint_step(config: TrainConfig) -> int | None:
    """The optimizer step of ``config.resume`` after checking it can be resumed (None without
    ``--resume``); a :class:`TrainConfigError` naming the folder otherwise."""
    folder = config.resume
    if folder is None:
        return None

    def refuse(why: str) -> TrainConfigError:
        return TrainConfigError(f"--resume {folder}: {why}")

    missing = [name for name in CHECKPOINT_FILES if not (folder / name).is_file()]
    if missing:
        raise refuse(f"not a complete masktrain checkpoint (missing {', '.join(missing)})")
    try:
        state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        saved = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        step = _check_state(state)
        with safetensors.safe_open(folder / "adapter.safetensors", "numpy") as adapter:
            if not list(adapter.keys()):
                raise ValueError("adapter.safetensors holds no tensors")
    except (OSError, ValueError, KeyError, TypeError, safetensors.SafetensorError) as error:
        raise refuse(f"damaged checkpoint ({type(error).__name__}: {error})") from None
    now = json.loads(config.to_json())
    for path, name in _MUST_MATCH:
        before, after = _get(saved, path), _get(now, path)
        if before is None:
            before = _BEFORE_THE_FLAG.get(name)
        if before != after:
            raise refuse(
                f"{name}: {before!r} in the checkpoint, {after!r} now; a resumed run must build the same "
                "LoRA (arch, network_dim, network_alpha, include/exclude patterns, loraplus_lr_ratio, "
                "lora_per_expert); start a new run instead"
            )
    return step


def _check_state(state: Any) -> int:
    """The step of a ``state.json``; a ValueError saying what is wrong with it otherwise."""
    if not isinstance(state, dict):
        raise ValueError(f"state.json holds {type(state).__name__}, not an object")
    missing = [name for name in STATE_FIELDS if name not in state]
    if missing:
        raise ValueError(f"state.json has no {', '.join(map(repr, missing))}")
    unknown = sorted(set(state) - set(STATE_FIELDS))
    if unknown:
        raise ValueError(f"state.json has unknown keys {', '.join(map(repr, unknown))}")
    for name in STATE_FIELDS:
        value = state[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"state.json: {name!r} is {value!r}, not a whole number >= 0")
    return int(state["step"])


def _get(document: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        document = document.get(key) if isinstance(document, dict) else None
    return document
