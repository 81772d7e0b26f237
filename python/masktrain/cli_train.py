"""``masktrain train``'s flags: the guide's spellings (musubi-tuner's) and dashed aliases, parsed
into a ``TrainConfig``. Kept apart from ``cli.py`` because there are many; torch is imported only
when the command runs.

``--network_args`` takes one ``key=value`` per use (repeat the flag for several keys).
``--network_module`` is accepted for commands copied from musubi-tuner and ignored: masktrain
always trains a peft LoRA on the family's default modules.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from masktrain.train.config import TrainConfig

log = logging.getLogger(__name__)


def _option(name: str, **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A flag in the guide's underscore spelling plus its dashed alias."""
    spellings = [f"--{name}"]
    if "_" in name:
        spellings.append(f"--{name.replace('_', '-')}")
    return click.option(*spellings, name, **kwargs)


def _flag(name: str, help: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return _option(name, is_flag=True, default=False, help=help)


_OPTIONS = [
    _option("dataset_config", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
            help="The dataset TOML (cached with masktrain cache)."),
    click.option("--arch", type=click.Choice(["wan", "qwen_image"]), required=True, help="Model family."),
    click.option("--dit", required=True, help="Transformer: 'tiny', a diffusers folder or a .safetensors file."),
    _option("dit_high_noise", default=None, help="WAN 2.2 A14B high-noise expert (one LoRA across both)."),
    _option("timestep_boundary", type=float, default=0.875, show_default=True,
            help="WAN 2.2 A14B: sigma at which the high-noise expert takes over."),
    _option("output_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
            help="Where the LoRA, checkpoints and metrics go."),
    _option("output_name", default="lora", show_default=True, help="LoRA file name without .safetensors."),
    click.option("--device", default=None, help="Training device [default: cuda when available, else cpu]."),
    _option("mixed_precision", type=click.Choice(["auto", "no", "bf16"]), default="auto",
            show_default=True, help="auto: bf16 on GPU, fp32 on CPU."),
    _flag("gradient_checkpointing", "Recompute activations in backward to save memory."),
    click.option("--seed", type=int, default=42, show_default=True, help="Seeds init, batch order, noise, timesteps."),
    _option("max_train_steps", type=click.IntRange(min=1), default=1600, show_default=True,
            help="Optimizer steps."),
    _option("max_train_epochs", type=click.IntRange(min=1), default=None, help="Epochs (overrides steps)."),
    _option("save_every_n_steps", type=click.IntRange(min=1), default=None, help="Checkpoint every N steps."),
    _option("lora_format", type=click.Choice(["comfyui", "diffusers"]), default="comfyui", show_default=True,
            help="Layout of the LoRA file."),
    _option("save_precision", type=click.Choice(["float", "fp16", "bf16"]), default="float", show_default=True),
    click.option("--resume", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
                 help="Checkpoint folder (OUTPUT_DIR/step-NNNNNN) to continue from."),
    _option("network_dim", type=click.IntRange(min=1), default=16, show_default=True, help="LoRA rank."),
    _option("network_alpha", type=float, default=1.0, show_default=True, help="LoRA alpha (scale alpha/rank)."),
    _option("network_args", multiple=True,
            help="include_patterns=[...] or exclude_patterns=[...] (regex fullmatch); repeat for several."),
    _option("network_module", default=None, hidden=True),
    _option("learning_rate", type=float, default=1e-4, show_default=True),
    _option("optimizer_type", type=click.Choice(["adamw", "adamw8bit"], case_sensitive=False), default="adamw",
            show_default=True, help="adamw8bit needs bitsandbytes."),
    _option("lr_scheduler", type=click.Choice(["constant", "constant_with_warmup", "linear", "cosine"]),
            default="constant", show_default=True),
    _option("lr_warmup_steps", type=click.IntRange(min=0), default=0, show_default=True),
    _option("gradient_accumulation_steps", type=click.IntRange(min=1), default=1, show_default=True),
    _option("max_grad_norm", type=float, default=1.0, show_default=True, help="0 disables clipping."),
    _flag("use_mask_loss", "Weight the loss by the cached mask weights."),
    _option("mask_gamma", type=float, default=1.0, show_default=True, help="< 1 softer, > 1 sharper masks."),
    _option("mask_min_weight", type=float, default=0.0, show_default=True, help="Weight floor (affine remap)."),
    _option("prior_preservation_weight", type=float, default=0.0, show_default=True,
            help="Keep the unmasked region close to the base model (0 disables)."),
    _option("prior_mask_threshold", type=float, default=None,
            help="Threshold mode: the prior region is raw weight < this (e.g. 0.1)."),
    _flag("normalize_per_sample", "Normalise the masked loss per sample."),
    _option("timestep_sampling", type=click.Choice(["sigma", "uniform", "sigmoid", "shift", "qwen_shift", "logsnr"]),
            default="sigma", show_default=True),
    _option("discrete_flow_shift", type=float, default=1.0, show_default=True),
    _option("sigmoid_scale", type=float, default=1.0, show_default=True),
    _option("weighting_scheme", type=click.Choice(["none", "logit_normal", "mode", "cosmap", "sigma_sqrt"]),
            default="none", show_default=True),
    _option("logit_mean", type=float, default=0.0, show_default=True),
    _option("logit_std", type=float, default=1.0, show_default=True),
    _option("mode_scale", type=float, default=1.29, show_default=True),
    _option("min_timestep", type=click.IntRange(0, 1000), default=0, show_default=True),
    _option("max_timestep", type=click.IntRange(0, 1000), default=1000, show_default=True),
]  # fmt: skip


def _with_options(command: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(_OPTIONS):
        command = option(command)
    return command


@click.command("train")
@_with_options
def train(**flags: Any) -> None:
    """Train a LoRA on a cached dataset, with the weighted mask loss and masked prior preservation."""
    from masktrain.train.config import TrainConfigError
    from masktrain.train.loop import TrainingInterrupted, run

    try:
        run(build_config(flags))
    except TrainConfigError as error:
        raise click.UsageError(str(error)) from error
    except TrainingInterrupted as interrupted:
        click.echo(str(interrupted), err=True)
        raise SystemExit(130) from None
    except ValueError as error:  # mask flags, timestep flags, dataset and model errors name their source
        raise click.UsageError(str(error)) from error


def build_config(flags: dict[str, Any]) -> TrainConfig:
    """The ``TrainConfig`` of the parsed flags (click's parameter names and values). ``masktrain
    demo`` parses its runs' command lines through the ``train`` command and this function, so the
    commands it prints are exactly what it trained."""
    from masktrain.loss import MaskLossSettings
    from masktrain.train.config import NetworkSettings, OptimSettings, TrainConfig, parse_network_args
    from masktrain.train.timesteps import TimestepSettings

    flags = dict(flags)
    if flags.pop("network_module") is not None:
        log.warning(
            "--network_module is ignored: masktrain trains a peft LoRA on the family's default modules"
        )
    include, exclude = parse_network_args(flags.pop("network_args"))
    return TrainConfig(
        network=NetworkSettings(
            network_dim=flags.pop("network_dim"), network_alpha=flags.pop("network_alpha"),
            include_patterns=include, exclude_patterns=exclude,
        ),
        optim=OptimSettings(**_take(flags, OptimSettings)),
        mask=MaskLossSettings(**_take(flags, MaskLossSettings)),
        timesteps=TimestepSettings(**_take(flags, TimestepSettings)),
        **flags,
    )  # fmt: skip


def _take(flags: dict[str, Any], settings: type) -> dict[str, Any]:
    """Remove and return the flags that are fields of the `settings` dataclass."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(settings)}
    return {name: flags.pop(name) for name in list(flags) if name in names}
