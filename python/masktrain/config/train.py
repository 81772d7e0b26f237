"""The resolved configuration of one ``masktrain train`` run: one frozen tree, checked when built
with messages that name the flag, and saved next to every checkpoint (``config.json``).

The mask flags (:class:`~masktrain.config.mask_loss.MaskLossSettings`) and the timestep flags
(:class:`~masktrain.config.timesteps.TimestepSettings`) are their own dataclasses, checked when
they are built; this file holds the rest and the rules that span flags. What needs the file
system or the process group (the cached items, ``--resume``, the number of batches per process)
is checked next, by ``train.preflight``, still before any model loads.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from masktrain import catalog
from masktrain.config.device import check_device
from masktrain.config.mask_loss import MaskLossSettings
from masktrain.config.memory import MemorySettings
from masktrain.config.timesteps import TimestepSettings
from masktrain.errors import FlagError, OptimConfigError, TrainConfigError

LoraLayout = Literal["comfyui", "diffusers"]
LORA_FORMATS: tuple[LoraLayout, ...] = ("comfyui", "diffusers")
# fp16 would need loss scaling (a GradScaler and its state in checkpoints); not offered yet.
MIXED_PRECISION = ("auto", "no", "bf16")
SAVE_PRECISION = ("float", "fp16", "bf16")
OPTIMIZER_TYPES = ("adamw", "adamw8bit")
MAX_SEED = 2**63
"""Seeds seed torch's generators, which take 64-bit integers."""
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")


@dataclass(frozen=True)
class NetworkSettings:
    network_dim: int = 16
    """LoRA rank."""
    network_alpha: float = 1.0
    """LoRA alpha; the update is scaled by alpha / rank (musubi-tuner's default alpha is 1)."""
    include_patterns: tuple[str, ...] | None = None
    """Module-name regexes (fullmatch) to train instead of the family's defaults (--network_args)."""
    exclude_patterns: tuple[str, ...] | None = None
    """Module-name regexes (fullmatch) excluded on top of the family's defaults (--network_args)."""

    def __post_init__(self) -> None:
        if self.network_dim < 1:
            raise TrainConfigError("--network_dim must be >= 1")
        if not 0 < self.network_alpha < math.inf:
            raise TrainConfigError("--network_alpha must be a finite number > 0")


@dataclass(frozen=True)
class OptimSettings:
    learning_rate: float = 1e-4
    """Peak learning rate."""
    optimizer_type: str = "adamw"
    """adamw, or adamw8bit (needs bitsandbytes)."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    lr_scheduler: str = "constant"
    """constant, constant_with_warmup, linear or cosine."""
    lr_warmup_steps: int = 0
    """Optimizer steps of linear warm-up."""
    gradient_accumulation_steps: int = 1
    """Batches per optimizer step."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm; 0 disables clipping."""

    def __post_init__(self) -> None:
        check_optimizer(self.optimizer_type, self.learning_rate, self.weight_decay)
        check_schedule(self.lr_scheduler, self.lr_warmup_steps)
        if self.gradient_accumulation_steps < 1:
            raise OptimConfigError("--gradient_accumulation_steps must be >= 1")
        if not 0 <= self.max_grad_norm < math.inf:
            raise OptimConfigError("--max_grad_norm must be >= 0 (0 disables clipping)")


def check_optimizer(
    optimizer_type: str,
    learning_rate: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> None:
    """Raise :class:`OptimConfigError` naming the flag of a value the optimizer cannot take
    (``optimizer_type`` is case-insensitive)."""
    if optimizer_type.lower() not in OPTIMIZER_TYPES:
        raise OptimConfigError(
            f"--optimizer_type must be one of {', '.join(OPTIMIZER_TYPES)}; got {optimizer_type!r}"
        )
    if not (math.isfinite(learning_rate) and learning_rate > 0):
        raise OptimConfigError(f"--learning_rate must be > 0, got {learning_rate}")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise OptimConfigError(f"--weight_decay must be >= 0, got {weight_decay}")
    if not all(0.0 <= beta < 1.0 for beta in betas):
        raise OptimConfigError(f"optimizer betas must be in range [0, 1), got {betas}")
    if not eps > 0:
        raise OptimConfigError(f"optimizer eps must be > 0, got {eps}")


def check_schedule(
    name: str, warmup_steps: int, total_steps: int | None = None, min_lr_ratio: float = 0.0
) -> None:
    """Raise :class:`OptimConfigError` naming the flag of a schedule that cannot work.
    ``total_steps`` is known only once the dataset is listed (``--max_train_epochs``); None skips
    the checks that need it. ``constant`` with warm-up is an error, as in musubi-tuner /
    sd-scripts ("does not require num_warmup_steps"): use ``constant_with_warmup``."""
    if name not in LR_SCHEDULERS:
        raise OptimConfigError(f"--lr_scheduler must be one of {', '.join(LR_SCHEDULERS)}; got {name!r}")
    if total_steps is not None and total_steps < 1:
        raise OptimConfigError(f"the total number of training steps must be >= 1, got {total_steps}")
    if warmup_steps < 0:
        raise OptimConfigError(f"--lr_warmup_steps must be >= 0, got {warmup_steps}")
    if total_steps is not None and warmup_steps > total_steps:
        raise OptimConfigError(
            f"--lr_warmup_steps ({warmup_steps}) must not exceed the total training steps ({total_steps})"
        )
    if name == "constant" and warmup_steps > 0:
        raise OptimConfigError(
            "--lr_scheduler constant does not use --lr_warmup_steps; set it to 0 or use constant_with_warmup"
        )
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise OptimConfigError(f"--lr_scheduler_min_lr_ratio must be in range [0, 1], got {min_lr_ratio}")


@dataclass(frozen=True)
class TrainConfig:
    dataset_config: Path
    """The dataset TOML that `masktrain cache` was run with."""
    arch: str
    """Model family: wan or qwen_image."""
    dit: str
    """Transformer: 'tiny', a diffusers folder or a .safetensors file (WAN 2.2: the low-noise expert)."""
    output_dir: Path
    """Where the LoRA, checkpoints, metrics.jsonl and config.json go."""
    output_name: str = "lora"
    """File name (without .safetensors) of the LoRA."""
    dit_high_noise: str | None = None
    """WAN 2.2 A14B: the high-noise expert; one LoRA is trained across both experts."""
    timestep_boundary: float = 0.875
    """WAN 2.2 A14B: sigmas at or above this go to the high-noise expert (0.875 T2V, 0.9 I2V)."""
    device: str | None = None
    """Training device; default cuda (this process's LOCAL_RANK) when available, else cpu."""
    mixed_precision: str = "auto"
    """auto (bf16 on GPU, fp32 on CPU), no (fp32) or bf16."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    seed: int = 42
    """Seeds the LoRA initialisation, the batch order, the noise and the timesteps."""
    max_train_steps: int = 1600
    """Optimizer steps to train for (max_train_epochs, when set, takes precedence)."""
    max_train_epochs: int | None = None
    """Epochs to train for; overrides max_train_steps."""
    save_every_n_steps: int | None = None
    """Write a checkpoint every N optimizer steps (one is always written at the end)."""
    lora_format: LoraLayout = "comfyui"
    """Layout of OUTPUT_NAME.safetensors: comfyui or diffusers."""
    save_precision: str = "float"
    """dtype of the saved LoRA tensors: float, fp16 or bf16."""
    resume: Path | None = None
    """A checkpoint folder (OUTPUT_DIR/step-000100) to continue from."""
    overwrite: bool = False
    """Start over in an OUTPUT_DIR that holds another run's checkpoints (they are deleted)."""
    skip_stale: bool = False
    """Train on the items whose cache is up to date and leave out, with a warning, those not
    cached or cached from older inputs (default: such items are an error)."""
    network: NetworkSettings = field(default_factory=NetworkSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    mask: MaskLossSettings = field(default_factory=MaskLossSettings)
    timesteps: TimestepSettings = field(default_factory=TimestepSettings)
    memory: MemorySettings = field(default_factory=MemorySettings)

    def __post_init__(self) -> None:
        two_experts = [spec.name for spec in catalog.ARCHES.values() if spec.two_experts]
        _check(
            [
                _choice(self.arch, catalog.ARCH_NAMES, "--arch"),
                (0 <= self.seed < MAX_SEED, f"--seed must be an integer in [0, 2**63), got {self.seed}"),
                (self.max_train_steps >= 1, "--max_train_steps must be >= 1"),
                ((self.max_train_epochs or 1) >= 1, "--max_train_epochs must be >= 1"),
                ((self.save_every_n_steps or 1) >= 1, "--save_every_n_steps must be >= 1"),
                _choice(self.lora_format, LORA_FORMATS, "--lora_format"),
                _choice(self.save_precision, SAVE_PRECISION, "--save_precision"),
                _choice(self.mixed_precision, MIXED_PRECISION, "--mixed_precision"),
                (0 < self.timestep_boundary < 1, "--timestep_boundary must be in range (0, 1)"),
                (
                    self.dit_high_noise is None or self.arch in two_experts,
                    f"--dit_high_noise is only for --arch {' or '.join(two_experts)}",
                ),
                (
                    bool(self.output_name) and "/" not in self.output_name,
                    "--output_name must be a plain file name",
                ),
                (
                    self.memory.blocks_to_swap == 0 or self.gradient_checkpointing,
                    "--blocks_to_swap needs --gradient_checkpointing (the backward pass recomputes each "
                    "block after its weights come back from the host)",
                ),
                (
                    not self.memory.gradient_checkpointing_cpu_offload or self.gradient_checkpointing,
                    "--gradient_checkpointing_cpu_offload needs --gradient_checkpointing",
                ),
                (
                    not self.memory.offload_inactive_dit or self.dit_high_noise is not None,
                    "--offload_inactive_dit needs two experts (--dit_high_noise)",
                ),
            ]
        )
        try:
            check_device(self.device)
        except FlagError as error:
            raise TrainConfigError(str(error)) from None

    def to_json(self) -> str:
        return json.dumps(_jsonable(dataclasses.asdict(self)), indent=2, sort_keys=True)


def _choice(value: str, choices: tuple[str, ...], flag: str) -> tuple[bool, str]:
    return value in choices, f"{flag} must be one of {', '.join(choices)}, not {value!r}"


def _check(checks: list[tuple[bool, str]]) -> None:
    """Raise :class:`TrainConfigError` with the message of the first failed check."""
    for ok, message in checks:
        if not ok:
            raise TrainConfigError(message)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    return value


def parse_network_args(values: tuple[str, ...]) -> tuple[tuple[str, ...] | None, tuple[str, ...] | None]:
    """musubi-tuner's ``--network_args key=value``: ``include_patterns`` / ``exclude_patterns``,
    each a Python-style list of regexes (``exclude_patterns=[".*norm.*"]``) or one regex."""
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] | None = None
    for value in values:
        key, sep, raw = value.partition("=")
        key = key.strip()
        if not sep:
            raise TrainConfigError(f"--network_args {value!r}: expected key=value")
        if key not in ("include_patterns", "exclude_patterns"):
            raise TrainConfigError(
                f"--network_args {key!r} is not supported; use include_patterns or exclude_patterns"
            )
        patterns = _pattern_list(raw.strip(), key)
        if key == "include_patterns":
            include = patterns
        else:
            exclude = patterns
    return include, exclude


def _pattern_list(raw: str, key: str) -> tuple[str, ...]:
    if raw.startswith("["):
        try:
            parsed = ast.literal_eval(raw)
        except (ValueError, SyntaxError) as error:
            raise TrainConfigError(f"--network_args {key}: cannot parse {raw!r} as a list: {error}") from None
        if not isinstance(parsed, list) or not all(isinstance(item, str) for item in parsed):
            raise TrainConfigError(f"--network_args {key}: expected a list of strings, got {raw!r}")
        patterns = tuple(parsed)
    else:
        patterns = (raw.strip("'\""),)
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as error:
            raise TrainConfigError(f"--network_args {key}: invalid regex {pattern!r}: {error}") from None
    return patterns
