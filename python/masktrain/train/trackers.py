"""The trackers a run logs to besides ``metrics.jsonl`` (``config.trackers``): TensorBoard and
wandb, rank 0 only. Scalars go under the names TensorBoard shows (``loss``, ``loss/face``,
``val/loss_face``, ``lr``, ...), the samples as images (a video's middle frame in TensorBoard, the
MP4 itself in wandb) under ``sample/{index:02d}``."""

from __future__ import annotations

import importlib.util
import json
import logging
import time
from pathlib import Path
from typing import Any

from masktrain.config.trackers import TrackerSettings

log = logging.getLogger(__name__)


def tensorboard_dir(settings: TrackerSettings, output_dir: Path, started: float) -> Path:
    """``--logging_dir/{--log_prefix}{YYYYmmddHHMMSS}`` as musubi writes it, else
    ``OUTPUT_DIR/tensorboard`` (with ``--log_prefix``: a timestamped folder inside it)."""
    base = settings.logging_dir if settings.logging_dir is not None else output_dir / "tensorboard"
    if settings.logging_dir is None and settings.log_prefix is None:
        return base
    return base / f"{settings.log_prefix or ''}{time.strftime('%Y%m%d%H%M%S', time.localtime(started))}"


class Trackers:
    """The open trackers of one run."""

    def __init__(
        self, settings: TrackerSettings, output_dir: Path, output_name: str, config_json: str
    ) -> None:
        self._tensorboard: Any = None
        self._wandb: Any = None
        wanted = settings.trackers
        default_tensorboard = not wanted and importlib.util.find_spec("tensorboard") is not None
        if "tensorboard" in wanted or default_tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            folder = tensorboard_dir(settings, output_dir, time.time())
            self._tensorboard = SummaryWriter(str(folder))
            log.info("TensorBoard logs: %s", folder)
        if settings.uses_wandb:
            import wandb

            if settings.wandb_api_key is not None:
                wandb.login(key=settings.wandb_api_key)
            folder = settings.logging_dir or output_dir
            folder.mkdir(parents=True, exist_ok=True)
            self._wandb = wandb.init(
                project=settings.log_tracker_name or "masktrain",
                name=settings.wandb_run_name or output_name,
                dir=str(folder),
                config=json.loads(config_json),
            )
            log.info("wandb run %s (project %s) in %s", self._wandb.name, self._wandb.project, folder)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self._tensorboard is not None:
            for key, value in values.items():
                self._tensorboard.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(values, step=step)

    def samples(self, step: int, paths: list[Path]) -> None:
        """Sample files of :mod:`masktrain.sample.outputs`, named ``..._{index:02d}_{seed}``."""
        import numpy as np
        from PIL import Image

        from masktrain.sample.outputs import middle_frame_path

        for path in paths:
            key = f"sample/{path.stem.rsplit('_', 2)[-2]}"
            still = middle_frame_path(path) if path.suffix == ".mp4" else path
            if self._tensorboard is not None:
                with Image.open(still) as image:
                    pixels = np.asarray(image.convert("RGB"))
                self._tensorboard.add_image(key, pixels, step, dataformats="HWC")
            if self._wandb is not None:
                import wandb

                media = wandb.Video(str(path)) if path.suffix == ".mp4" else wandb.Image(str(path))
                self._wandb.log({key: media}, step=step)

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()
