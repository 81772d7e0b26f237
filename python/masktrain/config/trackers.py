"""Where ``masktrain train`` logs besides ``OUTPUT_DIR/metrics.jsonl`` and the progress log: musubi
-tuner's ``--log_with tensorboard|wandb|all``, ``--logging_dir``, ``--log_prefix``,
``--log_tracker_name``, ``--wandb_run_name`` and ``--wandb_api_key``, read as musubi (accelerate)
reads them:

- ``--logging_dir DIR`` alone means TensorBoard; TensorBoard logs go to
  ``DIR/{log_prefix}{YYYYmmddHHMMSS}``, a folder per run, as musubi's do;
- without either flag TensorBoard logs go to ``OUTPUT_DIR/tensorboard`` when TensorBoard is
  installed (masktrain's default), and nowhere otherwise;
- wandb: project ``--log_tracker_name`` (default ``masktrain``), run name ``--wandb_run_name``
  (default ``--output_name``), files under ``--logging_dir`` or ``OUTPUT_DIR``; ``WANDB_MODE=offline``
  works as wandb documents.

A tracker asked for whose package is missing is a one-line error naming what to install.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from masktrain.errors import TrainConfigError

LOG_WITH = ("tensorboard", "wandb", "all")
#: tracker -> (the module it imports, the pip package).
_PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}


@dataclass(frozen=True)
class TrackerSettings:
    log_with: str | None = None
    """Trackers besides metrics.jsonl: tensorboard, wandb or all. Unset: TensorBoard when
    --logging_dir is given or TensorBoard is installed (then in OUTPUT_DIR/tensorboard)."""
    logging_dir: Path | None = None
    """The folder of the trackers' logs (a timestamped folder per run for TensorBoard)."""
    log_prefix: str | None = None
    """Prefix of that timestamped folder."""
    log_tracker_name: str | None = None
    """wandb's project (default: masktrain)."""
    wandb_run_name: str | None = None
    """wandb's run name (default: --output_name)."""
    wandb_api_key: str | None = None
    """Logs wandb in with this key (else wandb's own login or WANDB_API_KEY)."""

    def __post_init__(self) -> None:
        if self.log_with is not None and self.log_with not in LOG_WITH:
            raise TrainConfigError(f"--log_with must be one of {', '.join(LOG_WITH)}, not {self.log_with!r}")
        for tracker in self.trackers:
            module, package = _PACKAGES[tracker]
            if importlib.util.find_spec(module) is None:
                raise TrainConfigError(
                    f"--log_with {self.log_with or tracker}: {tracker} is not installed; "
                    f"pip install {package} (or masktrain[logging])"
                )
        if self.log_prefix is not None and ("/" in self.log_prefix or not self.log_prefix.strip()):
            raise TrainConfigError("--log_prefix must be a plain file-name prefix")

    @property
    def trackers(self) -> tuple[str, ...]:
        """The trackers asked for (an empty tuple: TensorBoard only if it happens to be installed)."""
        if self.log_with == "all":
            return ("tensorboard", "wandb")
        if self.log_with is not None:
            return (self.log_with,)
        return ("tensorboard",) if self.logging_dir is not None else ()

    @property
    def uses_wandb(self) -> bool:
        return "wandb" in self.trackers
