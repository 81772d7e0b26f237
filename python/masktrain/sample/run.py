"""``masktrain sample``: a saved LoRA's samples after training, exactly as training would have drawn
them at the step the file was saved (the same prompts, seeds, pipeline and file names), next to the
training run's samples when ``--output_dir`` is the run's folder: the contact sheet then shows them
in the same table.

While it writes, the run holds a run lock on ``OUTPUT_DIR/sample`` and first removes the temporaries
that killed runs left there (a live training run's, or another ``sample``'s, stay)."""

from __future__ import annotations

import logging
from pathlib import Path

import safetensors

from masktrain import atomic
from masktrain.config.sample import SampleConfig
from masktrain.denoiser import lora_file
from masktrain.denoiser.experts import load_for_sampling
from masktrain.denoiser.lora_file import META_STEP
from masktrain.device import precision, resolve_device
from masktrain.errors import LoraFileError
from masktrain.models import get_family
from masktrain.sample.outputs import sample_dir
from masktrain.sample.sampler import Sampler

log = logging.getLogger(__name__)


def lora_step(path: Path) -> int:
    """The step a training run saved `path` at (0 for a file without it: the samples' names need
    a number)."""
    try:
        with safetensors.safe_open(path, "pt") as handle:
            metadata = handle.metadata() or {}
    except (OSError, safetensors.SafetensorError) as error:
        raise LoraFileError(f"--lora {path}: not a readable safetensors file ({error})") from None
    value = metadata.get(META_STEP, "0")
    return int(value) if value.isdigit() else 0


def run(config: SampleConfig) -> list[Path]:
    """Generate every prompt; returns the sample files."""
    family = get_family(config.arch)
    if config.lora is not None:  # before any model loads
        lora_file.check_file(config.lora, family)
    step = lora_step(config.lora) if config.lora is not None else 0
    device = resolve_device(config.device)
    dtype, autocast = precision(config.mixed_precision, device)
    sampler = Sampler(
        config.sample,
        family,
        device,
        dtype,
        autocast,
        config.seed,
        config.output_dir,
        config.name,
        config.task,
    )
    dit, dit_high_noise = config.denoisers
    experts = load_for_sampling(
        family,
        dit,
        dit_high_noise,
        config.boundary,
        config.lora,
        config.memory,
        device,
        dtype,
        [sampler.feed],
    )
    folder = sample_dir(config.output_dir)
    with atomic.run_lock(folder):
        atomic.remove_stale_temporaries(folder)
        written = sampler.run(experts, step)
    log.info("wrote %d sample(s) to %s", len(written), folder)
    return written
