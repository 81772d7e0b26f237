"""``masktrain train``'s flags: the guide's spellings (musubi-tuner's) and dashed aliases, parsed
into a ``TrainConfig``. A flag that fills a config field (:func:`_field`) takes its default and
its ``--help`` from that field, the help being the field's docstring (``options.FieldOption``),
so flag and field cannot drift; ``help=`` is written only for flags without a field of their
own. Choices come from the config modules. torch is imported only once the config is built (and
so checked).

``--network_args`` and ``--optimizer_args`` take several ``key=value`` after one use, as
musubi-tuner does (``cli/musubi.py``); the musubi flags masktrain accepts without acting on them,
and those it does not implement (each a one-line error), are tabled there.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from masktrain import catalog
from masktrain.cli import musubi
from masktrain.cli.options import F, existing_file, flag, option, text_encoder_options
from masktrain.cli.outcome import run_job
from masktrain.config.mask_loss import PRIOR_DECAY_SCHEDULES, MaskLossSettings
from masktrain.config.memory import MemorySettings, attention_flag
from masktrain.config.sample import SampleSettings
from masktrain.config.text_encoder import TextEncoderChoice, choose, split_flags
from masktrain.config.text_encoder import option_names as text_encoder_names
from masktrain.config.timesteps import (
    EXPERT_BALANCES,
    TIMESTEP_SAMPLINGS,
    WEIGHTING_SCHEMES,
    TimestepSettings,
)
from masktrain.config.trackers import LOG_WITH, TrackerSettings
from masktrain.config.train import (
    LORA_FORMATS,
    LOSS_TYPES,
    LR_SCHEDULERS,
    MIXED_PRECISION,
    OPTIMIZER_ALIASES,
    OPTIMIZER_TYPES,
    SAVE_PRECISION,
    NetworkSettings,
    OptimSettings,
    TrainConfig,
    parse_network_args,
    parse_optimizer_args,
)
from masktrain.errors import TrainConfigError

log = logging.getLogger(__name__)

FIELD_OWNERS: tuple[type, ...] = (
    TrackerSettings,
    MemorySettings,
    NetworkSettings,
    OptimSettings,
    MaskLossSettings,
    TimestepSettings,
    SampleSettings,
    TrainConfig,
)
"""The settings dataclasses whose fields ``build_config`` fills from flags of the same name."""


if TYPE_CHECKING:  # generic in click >= 8.2 only: subscripted for mypy, not at run time
    _CountOrAuto = click.ParamType[int | str, Any]
else:
    _CountOrAuto = click.ParamType


class SwapCount(_CountOrAuto):
    """``--blocks_to_swap``: a count >= 0, or ``auto``."""

    name = "N|auto"
    AUTO = "auto"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int | str:
        if isinstance(value, int):
            return value
        if value == self.AUTO:
            return self.AUTO
        try:
            count = int(value)
        except ValueError:
            count = -1
        if count < 0:
            self.fail(f"{value!r} is not a count >= 0 or auto", param, ctx)
        return count


def _field(name: str, **kwargs: Any) -> Callable[[F], F]:
    """The flag of the config field `name`: its help is the field's docstring and its default the
    field's (shown in ``--help`` unless None or a switch); a field without a default is required."""
    owner = next(c for c in FIELD_OWNERS if name in {f.name for f in dataclasses.fields(c)})
    (field,) = [f for f in dataclasses.fields(owner) if f.name == name]
    if field.default is dataclasses.MISSING:
        kwargs["required"] = True
    else:
        kwargs["default"] = field.default
        kwargs["show_default"] = field.default is not None and not isinstance(field.default, bool)
    return option(name, documented_by=owner, **kwargs)


def _switch(name: str) -> Callable[[F], F]:
    """The on flag of the boolean config field `name`."""
    return _field(name, is_flag=True)


_OPTIONS: list[Callable[[F], F]] = [
    _field("dataset_config", type=existing_file()),
    _field("arch", type=click.Choice(catalog.ARCH_NAMES)),
    _field("dit"),
    _field("dit_high_noise"),
    _switch("lora_per_expert"),
    _field("timestep_boundary", type=float),
    _field("output_dir", type=click.Path(file_okay=False, path_type=Path)),
    _field("output_name"),
    _field("device"),
    _field("mixed_precision", type=click.Choice(MIXED_PRECISION)),
    _switch("gradient_checkpointing"),
    _switch("gradient_checkpointing_cpu_offload"),
    _switch("fp8_base"),
    _switch("fp8_scaled"),
    _field("blocks_to_swap", type=SwapCount()),
    _field("vram", type=click.FloatRange(min=0, min_open=True)),
    _switch("use_pinned_memory_for_block_swap"),
    _switch("offload_inactive_dit"),
    # One field (MemorySettings.attention), four musubi switches.
    flag("sdpa", "Attention: PyTorch scaled_dot_product_attention (the default)."),
    flag("flash_attn", "Attention: FlashAttention (needs flash-attn)."),
    flag("sage_attn", "Attention: SageAttention (needs sageattention)."),
    flag("xformers", "Attention: xformers (needs xformers)."),
    _field("seed", type=int),
    _field("max_train_steps", type=click.IntRange(min=1)),
    _field("max_train_epochs", type=click.IntRange(min=1)),
    _field("save_every_n_steps", type=click.IntRange(min=1)),
    _field("save_every_n_epochs", type=click.IntRange(min=1)),
    _field("save_last_n_steps", type=click.IntRange(min=1)),
    _field("save_last_n_epochs", type=click.IntRange(min=1)),
    _field("validation_dataset_config", type=existing_file()),
    _field("validate_every_n_steps", type=click.IntRange(min=1)),
    _field("sample_prompts", type=existing_file()),
    _field("sample_every_n_steps", type=click.IntRange(min=1)),
    _field("sample_every_n_epochs", type=click.IntRange(min=1)),
    _switch("sample_at_first"),
    _field("vae"),
    _field("clip"),
    _field("log_with", type=click.Choice(LOG_WITH)),
    _field("logging_dir", type=click.Path(file_okay=False, path_type=Path)),
    _field("log_prefix"),
    _field("log_tracker_name"),
    _field("wandb_run_name"),
    _field("wandb_api_key"),
    _field("ddp_timeout", type=click.IntRange(min=1)),
    _field("task"),
    _field("model_version"),
    _switch("one_frame"),
    _switch("remove_first_image_from_target"),
    _field("lora_format", type=click.Choice(LORA_FORMATS)),
    _field("save_precision", type=click.Choice(SAVE_PRECISION)),
    _switch("overwrite"),
    _switch("skip_stale"),
    _field("resume", type=click.Path(exists=True, file_okay=False, path_type=Path)),
    _field("network_dim", type=click.IntRange(min=1)),
    _field("network_alpha", type=float),
    # Parsed into several NetworkSettings fields (parse_network_args).
    option(
        "network_args",
        multiple=True,
        help="key=value ... (include_patterns=[...], exclude_patterns=[...], loraplus_lr_ratio=, verbose=True).",
    ),
    _field("network_dropout", type=float),
    _field("learning_rate", type=float),
    _field(
        "optimizer_type",
        type=click.Choice([*OPTIMIZER_TYPES, *OPTIMIZER_ALIASES], case_sensitive=False),
    ),
    _field("lr_scheduler", type=click.Choice(LR_SCHEDULERS)),
    _field("lr_warmup_steps", type=click.IntRange(min=0)),
    _field("lr_scheduler_min_lr_ratio", type=float),
    _field("lr_scheduler_power", type=float),
    # Parsed into several OptimSettings fields (parse_optimizer_args).
    option(
        "optimizer_args",
        multiple=True,
        help="key=value ... (weight_decay=, betas=(b1,b2), eps=; Adafactor: scale_parameter=, ...).",
    ),
    _field("gradient_accumulation_steps", type=click.IntRange(min=1)),
    _field("max_grad_norm", type=float),
    _switch("use_mask_loss"),
    _field("mask_gamma", type=float),
    _field("mask_min_weight", type=float),
    _field("prior_preservation_weight", type=float),
    _field("prior_mask_threshold", type=float),
    _switch("normalize_per_sample"),
    _field("prior_preservation_timestep_threshold", type=click.FloatRange(0, 1000)),
    _field("prior_teacher_mode", type=click.Choice(("base", "ema"))),
    _field("prior_teacher_ema_decay", type=float),
    _field("prior_decay_schedule", type=click.Choice(PRIOR_DECAY_SCHEDULES)),
    _field("prior_decay_timestep_start", type=float),
    _field("prior_decay_warmup_ratio", type=float),
    _field("mask_blur_kernel_size", aliases=("mask_blur_radius",), type=click.IntRange(min=0)),
    _field("mask_area_scale_beta", type=float),
    _field("loss_type", type=click.Choice(LOSS_TYPES)),
    _field("loss_delta", type=float),
    _field("timestep_sampling", type=click.Choice(TIMESTEP_SAMPLINGS)),
    _field("discrete_flow_shift", type=float),
    _field("sigmoid_scale", type=float),
    _field("weighting_scheme", type=click.Choice(WEIGHTING_SCHEMES)),
    _field("logit_mean", type=float),
    _field("logit_std", type=float),
    _field("mode_scale", type=float),
    _field("min_timestep", type=click.IntRange(0, 1000)),
    _field("max_timestep", type=click.IntRange(0, 1000)),
    _field("expert_balance", type=click.Choice(EXPERT_BALANCES)),
]


_OPTIONS += [
    option(name, default=None, help=f"musubi-tuner's; accepted and ignored: {why}.")
    if takes_value
    else flag(name, f"musubi-tuner's; accepted and ignored: {why}.")
    for name, (takes_value, why) in musubi.ACCEPTED.items()
]


def _with_options(command: F) -> F:
    for add in reversed(_OPTIONS):
        command = add(command)
    return text_encoder_options(command)  # the samples' text encoder, as for cache


@click.command("train", cls=musubi.MusubiCommand)
@_with_options
def train(**flags: Any) -> None:
    """Train a LoRA on a cached dataset, with the weighted mask loss and masked prior preservation."""

    def job() -> Path:
        config = build_config(flags)
        from masktrain.train.loop import run  # torch: only once the flags are known to be good

        return run(config)

    run_job(job)


def config_from_args(args: Sequence[str]) -> TrainConfig:
    """Parse a ``masktrain train`` argument list exactly as the command line does. ``masktrain
    demo`` parses its runs' command lines with this, so the commands it prints are exactly what
    it trained."""
    context = train.make_context("train", list(args))
    return build_config(dict(context.params))


def build_config(flags: dict[str, Any]) -> TrainConfig:
    """The ``TrainConfig`` of the parsed flags (click's parameter names and values)."""
    flags = dict(flags)
    flags["swap_auto"] = flags["blocks_to_swap"] == SwapCount.AUTO
    if flags["swap_auto"]:
        flags["blocks_to_swap"] = 0  # chosen by the plan before the model loads
    musubi.note_accepted(flags)
    network_args = parse_network_args(flags.pop("network_args"))
    optimizer_args = parse_optimizer_args(flags.pop("optimizer_args"), flags["optimizer_type"])
    attention = attention_flag(*(flags.pop(name) for name in ("sdpa", "flash_attn", "sage_attn", "xformers")))
    sample = _sample_settings(flags)
    return TrainConfig(
        sample=sample,
        trackers=TrackerSettings(**_take(flags, TrackerSettings)),
        memory=MemorySettings(attention=attention, **_take(flags, MemorySettings)),
        network=NetworkSettings(**_take(flags, NetworkSettings), **network_args),
        optim=OptimSettings(**(_take(flags, OptimSettings) | optimizer_args)),
        mask=MaskLossSettings(**_take(flags, MaskLossSettings)),
        timesteps=TimestepSettings(**_take(flags, TimestepSettings)),
        **flags,
    )


def _sample_settings(flags: dict[str, Any]) -> SampleSettings:
    """The sampling flags (removed from `flags`); the VAE and text-encoder flags of a run that does
    not sample are accepted and ignored, as musubi's commands always carry them."""
    text, tokenizers, fp8 = split_flags({name: flags.pop(name) for name in text_encoder_names()})
    chosen = choose(flags["arch"], text, tokenizers, fp8, TrainConfigError)
    vae, clip = flags.pop("vae"), flags.pop("clip")
    prompts = flags.pop("sample_prompts")
    if prompts is None:
        given = [f"--{name}" for name, value in (("vae", vae), ("clip", clip)) if value] + [
            flag for flag, value in {**text, **tokenizers, **fp8}.items() if value
        ]
        if given:
            log.info("%s accepted and ignored: %s", ", ".join(given), musubi.SAMPLING_ONLY)
        vae, clip, chosen = None, None, TextEncoderChoice(None)
    return SampleSettings(
        sample_prompts=prompts,
        sample_every_n_steps=flags.pop("sample_every_n_steps"),
        sample_every_n_epochs=flags.pop("sample_every_n_epochs"),
        sample_at_first=flags.pop("sample_at_first"),
        vae=vae,
        text_encoder=chosen.weights,
        text_tokenizer=chosen.tokenizer,
        fp8_text_encoder=chosen.fp8,
        clip=clip,
    )


def _take(flags: dict[str, Any], settings: type) -> dict[str, Any]:
    """Remove and return the flags that are fields of the `settings` dataclass."""
    names = {f.name for f in dataclasses.fields(settings)}
    return {name: flags.pop(name) for name in list(flags) if name in names}
