"""``masktrain sample``: a saved LoRA's samples after training, exactly as training would have drawn
them at the step the file was saved (the same prompts, seeds, pipeline and file names), next to the
training run's samples when ``--output_dir`` is the run's folder: the contact sheet then shows them
in the same table.

WAN 2.2 A14B with ``--lora_per_expert``'s pair (:func:`expert_loras`): each expert gets its own
LoRA, ``--lora`` the low-noise one and ``--lora_high_noise`` the high-noise one, or ``--lora`` one
of ``NAME_low_noise`` / ``NAME_high_noise`` and its twin beside it; the samples are named by
``NAME``, as the run named its own. A file made for the other expert is refused (its
``masktrain.expert``).

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
from masktrain.denoiser.lora_file import EXPERT_LORAS, META_EXPERT, META_STEP
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
    low, high = expert_loras(config)
    two = config.dit_high_noise is not None
    for path, flag, expert in (
        (low, "--lora", "low_noise" if high is not None else None),
        (high, "--lora_high_noise", "high_noise"),
    ):
        if path is not None:  # before any model loads
            lora_file.check_file(path, family)
            if two:
                _check_expert(path, flag, expert)
    saved = low or high
    step = lora_step(saved) if saved is not None else 0
    name = config.name
    if config.output_name is None and low is not None and high is not None:
        name = low.stem.removesuffix("_low_noise")  # the run's OUTPUT_NAME
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
        name,
        config.task,
        config.one_frame,
    )
    dit, dit_high_noise = config.denoisers
    experts = load_for_sampling(
        family,
        dit,
        dit_high_noise,
        config.boundary,
        low,
        config.memory,
        device,
        dtype,
        [sampler.feed],
        high,
    )
    folder = sample_dir(config.output_dir)
    with atomic.run_lock(folder):
        atomic.remove_stale_temporaries(folder)
        written = sampler.run(experts, step)
    log.info("wrote %d sample(s) to %s", len(written), folder)
    return written


def expert_loras(config: SampleConfig) -> tuple[Path | None, Path | None]:
    """(the LoRA on ``--dit``, the high-noise expert's own or None): ``--lora`` and
    ``--lora_high_noise``; with ``--dit_high_noise`` and no ``--lora_high_noise``, a ``--lora`` named
    as one of ``--lora_per_expert``'s pair (``NAME_low_noise.safetensors``) brings its twin, each
    file to its expert."""
    lora, high = config.lora, config.lora_high_noise
    if lora is None or high is not None or config.dit_high_noise is None:
        return lora, high
    twin = lora_file.expert_twin(lora)
    if twin is None:
        return lora, None
    expert, other = twin
    if not other.is_file():
        raise LoraFileError(
            f"--lora {lora}: the {expert.replace('_', '-')} expert's LoRA of a --lora_per_expert pair, but "
            f"its twin {other} is not there; pass the other expert's file with --lora_high_noise / --lora"
        )
    low, high = (other, lora) if expert == "high_noise" else (lora, other)
    log.info("--lora_per_expert pair: %s on the low-noise expert, %s on the high-noise one", low, high)
    return low, high


def _check_expert(path: Path, flag: str, expert: str | None) -> None:
    """A ``--lora_per_expert`` file goes on its own expert only (`expert`; None: on both)."""
    try:
        with safetensors.safe_open(path, "pt") as handle:
            made_for = (handle.metadata() or {}).get(META_EXPERT)
    except (OSError, safetensors.SafetensorError) as error:
        raise LoraFileError(f"{flag} {path}: not a readable safetensors file ({error})") from None
    if made_for is None or made_for == expert:
        return
    if made_for not in EXPERT_LORAS:
        raise LoraFileError(f"{flag} {path}: its {META_EXPERT} = {made_for!r} names no WAN 2.2 expert")
    where = "both experts" if expert is None else f"the {expert.replace('_', '-')} expert"
    raise LoraFileError(
        f"{flag} {path}: this LoRA was trained for the {made_for.replace('_', '-')} expert only "
        f"(--lora_per_expert), not for {where}; pass each expert's file: --lora NAME_low_noise.safetensors "
        "--lora_high_noise NAME_high_noise.safetensors"
    )
