"""What identifies the weights a cache was made with: part of every cache file's fingerprint."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from masktrain.models.loading import TINY


def weights_identity(spec: str, model: torch.nn.Module) -> str:
    """A short hash of the flag's value, the model's config (so a change to a built-in tiny model
    counts), and for weights on disk each file's size and modification time (so new weights at
    the same path count)."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        config = config.to_dict()
    # Private keys are bookkeeping (diffusers' _use_default_values is in set order, which changes
    # from process to process).
    config = {k: v for k, v in dict(config or {}).items() if not str(k).startswith("_")}
    parts: dict[str, Any] = {"spec": spec, "config": config}
    path = Path(spec).expanduser()
    if spec != TINY and path.exists():
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        parts["files"] = [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    canonical = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]
