"""``masktrain train``'s flags: the guide's spellings (musubi-tuner's) and dashed aliases, parsed
into a ``TrainConfig``; defaults and choices come from the config dataclasses, so the two cannot
drift. torch is imported only once the config is built (and so checked).

``--network_args`` and ``--optimizer_args`` take several ``key=value`` after one use, as
musubi-tuner does (``cli/musubi.py``); the musubi flags masktrain accepts without acting on them,
and those it does not implement (each a one-line error), are tabled there.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

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
from masktrain.config.timesteps import TIMESTEP_SAMPLINGS, WEIGHTING_SCHEMES, TimestepSettings
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

_TRAIN = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
_NETWORK, _OPTIM, _MASK, _STEPS = NetworkSettings(), OptimSettings(), MaskLossSettings(), TimestepSettings()
_MEMORY = MemorySettings()


def _shown(name: str, default: object, **kwargs: Any) -> Callable[[F], F]:
    """An option with its default shown in ``--help``."""
    return option(name, default=default, show_default=True, **kwargs)


_OPTIONS: list[Callable[[F], F]] = [
    option(
        "dataset_config",
        type=existing_file(),
        required=True,
        help="The dataset TOML (cached with masktrain cache).",
    ),
    option(
        "arch",
        type=click.Choice(catalog.ARCH_NAMES),
        required=True,
        help=f"Model family: {catalog.described()}.",
    ),
    option("dit", required=True, help="Transformer: 'tiny', a diffusers folder or a .safetensors file."),
    option("dit_high_noise", default=None, help="WAN 2.2 A14B high-noise expert (one LoRA across both)."),
    _shown(
        "timestep_boundary",
        _TRAIN["timestep_boundary"],
        type=float,
        help="WAN 2.2 A14B: expert switch sigma.",
    ),
    option(
        "output_dir", type=click.Path(file_okay=False, path_type=Path), required=True, help="Output folder."
    ),
    _shown("output_name", _TRAIN["output_name"], help="LoRA file name without .safetensors."),
    option("device", default=None, help="Training device [default: cuda when available, else cpu]."),
    _shown(
        "mixed_precision",
        _TRAIN["mixed_precision"],
        type=click.Choice(MIXED_PRECISION),
        help="auto: bf16 on GPU.",
    ),
    flag("gradient_checkpointing", "Recompute activations in backward to save memory."),
    flag(
        "gradient_checkpointing_cpu_offload",
        "Keep checkpointed block inputs in host memory (needs --gradient_checkpointing).",
    ),
    flag("fp8_base", "Transformer block Linear weights in fp8 e4m3 (fp8 checkpoints load as stored)."),
    flag("fp8_scaled", "With --fp8_base: block-wise scales (per row and 64 inputs)."),
    _shown(
        "blocks_to_swap",
        _MEMORY.blocks_to_swap,
        type=click.IntRange(min=0),
        help="Transformer blocks kept in host memory and streamed in (needs --gradient_checkpointing).",
    ),
    flag("use_pinned_memory_for_block_swap", "Page-locked host memory for block swap (faster copies)."),
    flag("offload_inactive_dit", "WAN 2.2 A14B: keep the idle expert in host memory."),
    flag("sdpa", "Attention: PyTorch scaled_dot_product_attention (the default)."),
    flag("flash_attn", "Attention: FlashAttention (needs flash-attn)."),
    flag("sage_attn", "Attention: SageAttention (needs sageattention)."),
    flag("xformers", "Attention: xformers (needs xformers)."),
    _shown("seed", _TRAIN["seed"], type=int, help="Seeds init, batch order, noise, timesteps."),
    _shown("max_train_steps", _TRAIN["max_train_steps"], type=click.IntRange(min=1), help="Optimizer steps."),
    option("max_train_epochs", type=click.IntRange(min=1), default=None, help="Epochs (overrides steps)."),
    option("save_every_n_steps", type=click.IntRange(min=1), default=None, help="Checkpoint every N steps."),
    option(
        "save_every_n_epochs", type=click.IntRange(min=1), default=None, help="Checkpoint every N epochs."
    ),
    option(
        "save_last_n_steps",
        type=click.IntRange(min=1),
        default=None,
        help="Keep only the checkpoints of the last N steps.",
    ),
    option(
        "save_last_n_epochs",
        type=click.IntRange(min=1),
        default=None,
        help="Keep only the checkpoints of the last N epochs.",
    ),
    option(
        "validation_dataset_config",
        type=existing_file(),
        default=None,
        help="A cached dataset TOML (with masks) to report the loss by region on.",
    ),
    option(
        "validate_every_n_steps", type=click.IntRange(min=1), default=None, help="Validate every N steps."
    ),
    option(
        "sample_prompts",
        type=existing_file(),
        default=None,
        help="musubi's prompt file (.txt with --w --h --f --d --s --l --fs --n, .toml or .json): samples under OUTPUT_DIR/sample.",
    ),
    option("sample_every_n_steps", type=click.IntRange(min=1), default=None, help="Sample every N steps."),
    option("sample_every_n_epochs", type=click.IntRange(min=1), default=None, help="Sample every N epochs."),
    flag("sample_at_first", "Sample before training (the base model)."),
    option(
        "vae", default=None, help="VAE that decodes the samples ('tiny', a folder or a .safetensors file)."
    ),
    option(
        "log_with",
        type=click.Choice(LOG_WITH),
        default=None,
        help="Trackers besides metrics.jsonl [default: TensorBoard in OUTPUT_DIR/tensorboard when installed].",
    ),
    option(
        "logging_dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help="Trackers' folder (TensorBoard: DIR/PREFIX+timestamp, as musubi).",
    ),
    option("log_prefix", default=None, help="Prefix of the run's TensorBoard folder."),
    option("log_tracker_name", default=None, help="wandb project [default: masktrain]."),
    option("wandb_run_name", default=None, help="wandb run name [default: --output_name]."),
    option("wandb_api_key", default=None, help="wandb API key (else wandb's own login)."),
    _shown(
        "ddp_timeout",
        _TRAIN["ddp_timeout"],
        type=click.IntRange(min=1),
        help="torchrun: minutes a process waits for the others (rank 0 samples and validates alone).",
    ),
    option("task", default=None, help="musubi-tuner's WAN --task, checked against --dit (e.g. t2v-14B)."),
    option("model_version", default=None, help="musubi-tuner's Qwen-Image --model_version (original)."),
    _shown(
        "lora_format", _TRAIN["lora_format"], type=click.Choice(LORA_FORMATS), help="Layout of the LoRA file."
    ),
    _shown("save_precision", _TRAIN["save_precision"], type=click.Choice(SAVE_PRECISION)),
    flag("overwrite", "Start over in an --output_dir that holds checkpoints (deletes them)."),
    flag("skip_stale", "Leave out, with a warning, items whose cache is missing or out of date."),
    option(
        "resume",
        type=click.Path(exists=True, file_okay=False, path_type=Path),
        default=None,
        help="Checkpoint folder (OUTPUT_DIR/step-NNNNNN) to continue from.",
    ),
    _shown("network_dim", _NETWORK.network_dim, type=click.IntRange(min=1), help="LoRA rank."),
    _shown("network_alpha", _NETWORK.network_alpha, type=float, help="LoRA alpha (scale alpha/rank)."),
    option(
        "network_args",
        multiple=True,
        help="key=value ... (include_patterns=[...], exclude_patterns=[...], verbose=True).",
    ),
    _shown("network_dropout", _NETWORK.network_dropout, type=float, help="Dropout on the LoRA input."),
    _shown("learning_rate", _OPTIM.learning_rate, type=float),
    _shown(
        "optimizer_type",
        _OPTIM.optimizer_type,
        type=click.Choice([*OPTIMIZER_TYPES, *OPTIMIZER_ALIASES], case_sensitive=False),
        help="adamw8bit needs bitsandbytes; adafactor is transformers'; prodigy needs prodigyopt.",
    ),
    _shown("lr_scheduler", _OPTIM.lr_scheduler, type=click.Choice(LR_SCHEDULERS)),
    _shown("lr_warmup_steps", _OPTIM.lr_warmup_steps, type=click.IntRange(min=0)),
    _shown(
        "lr_scheduler_min_lr_ratio",
        _OPTIM.lr_scheduler_min_lr_ratio,
        type=float,
        help="Floor of linear / cosine decay (fraction of the learning rate).",
    ),
    _shown("lr_scheduler_power", _OPTIM.lr_scheduler_power, type=float, help="Power of polynomial decay."),
    option(
        "optimizer_args",
        multiple=True,
        help="key=value ... (weight_decay=, betas=(b1,b2), eps=; Adafactor: scale_parameter=, ...).",
    ),
    _shown("gradient_accumulation_steps", _OPTIM.gradient_accumulation_steps, type=click.IntRange(min=1)),
    _shown("max_grad_norm", _OPTIM.max_grad_norm, type=float, help="0 disables clipping."),
    flag("use_mask_loss", "Weight the loss by the cached mask weights."),
    _shown("mask_gamma", _MASK.mask_gamma, type=float, help="< 1 softer, > 1 sharper masks."),
    _shown("mask_min_weight", _MASK.mask_min_weight, type=float, help="Weight floor (affine remap)."),
    _shown(
        "prior_preservation_weight",
        _MASK.prior_preservation_weight,
        type=float,
        help="Keep the unmasked region close to the base model (0 disables).",
    ),
    option(
        "prior_mask_threshold",
        type=float,
        default=_MASK.prior_mask_threshold,
        help="Threshold mode: the prior region is raw weight < this (e.g. 0.1).",
    ),
    flag("normalize_per_sample", "Normalise the masked loss per sample."),
    option(
        "prior_preservation_timestep_threshold",
        type=click.FloatRange(0, 1000),
        default=None,
        help="Run the teacher only for samples above this timestep (0-1000; e.g. 300).",
    ),
    _shown(
        "prior_teacher_mode",
        _MASK.prior_teacher_mode,
        type=click.Choice(("base", "ema")),
        help="The prior term's teacher: the base model, or an EMA of the LoRA (from step 100).",
    ),
    _shown("prior_teacher_ema_decay", _MASK.prior_teacher_ema_decay, type=float),
    _shown(
        "prior_decay_schedule",
        _MASK.prior_decay_schedule,
        type=click.Choice(PRIOR_DECAY_SCHEDULES),
        help="Prior weight below --prior_decay_timestep_start (needs --normalize_per_sample).",
    ),
    _shown("prior_decay_timestep_start", _MASK.prior_decay_timestep_start, type=float),
    _shown("prior_decay_warmup_ratio", _MASK.prior_decay_warmup_ratio, type=float),
    click.option(
        "--mask_blur_kernel_size",
        "--mask-blur-kernel-size",
        "--mask_blur_radius",
        "--mask-blur-radius",
        "mask_blur_kernel_size",
        type=click.IntRange(min=0),
        default=_MASK.mask_blur_kernel_size,
        show_default=True,
        help="Gaussian blur of the latent mask (odd kernel, in cells; 3 or 5); 0 disables.",
    ),
    _shown(
        "mask_area_scale_beta",
        _MASK.mask_area_scale_beta,
        type=float,
        help="Scale the target term by mean(raw mask)^beta (try 0.5); 0 disables.",
    ),
    _shown(
        "loss_type",
        _TRAIN["loss_type"],
        type=click.Choice(LOSS_TYPES),
        help="mse, or huber (quadratic up to --loss_delta, linear beyond; half the MSE below it).",
    ),
    _shown("loss_delta", _TRAIN["loss_delta"], type=float, help="Huber's delta."),
    _shown("timestep_sampling", _STEPS.timestep_sampling, type=click.Choice(TIMESTEP_SAMPLINGS)),
    _shown("discrete_flow_shift", _STEPS.discrete_flow_shift, type=float),
    _shown("sigmoid_scale", _STEPS.sigmoid_scale, type=float),
    _shown("weighting_scheme", _STEPS.weighting_scheme, type=click.Choice(WEIGHTING_SCHEMES)),
    _shown("logit_mean", _STEPS.logit_mean, type=float),
    _shown("logit_std", _STEPS.logit_std, type=float),
    _shown("mode_scale", _STEPS.mode_scale, type=float),
    _shown("min_timestep", _STEPS.min_timestep, type=click.IntRange(0, 1000)),
    _shown("max_timestep", _STEPS.max_timestep, type=click.IntRange(0, 1000)),
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
    vae = flags.pop("vae")
    prompts = flags.pop("sample_prompts")
    if prompts is None:
        given = [f"--{name}" for name, value in (("vae", vae),) if value] + [
            flag for flag, value in {**text, **tokenizers, **fp8}.items() if value
        ]
        if given:
            log.info("%s accepted and ignored: %s", ", ".join(given), musubi.SAMPLING_ONLY)
        vae, chosen = None, TextEncoderChoice(None)
    return SampleSettings(
        sample_prompts=prompts,
        sample_every_n_steps=flags.pop("sample_every_n_steps"),
        sample_every_n_epochs=flags.pop("sample_every_n_epochs"),
        sample_at_first=flags.pop("sample_at_first"),
        vae=vae,
        text_encoder=chosen.weights,
        text_tokenizer=chosen.tokenizer,
        fp8_text_encoder=chosen.fp8,
    )


def _take(flags: dict[str, Any], settings: type) -> dict[str, Any]:
    """Remove and return the flags that are fields of the `settings` dataclass."""
    names = {f.name for f in dataclasses.fields(settings)}
    return {name: flags.pop(name) for name in list(flags) if name in names}
