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
import importlib.util
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
from masktrain.config.sample import SampleSettings
from masktrain.config.timesteps import TimestepSettings, check_expert_balance
from masktrain.config.trackers import TrackerSettings
from masktrain.errors import OptimConfigError, SettingError, TrainConfigError

LoraLayout = Literal["comfyui", "diffusers", "musubi"]
LORA_FORMATS: tuple[LoraLayout, ...] = ("comfyui", "diffusers", "musubi")
# fp16 would need loss scaling (a GradScaler and its state in checkpoints); not offered yet.
MIXED_PRECISION = ("auto", "no", "bf16")
LOSS_TYPES = ("mse", "huber")
SAVE_PRECISION = ("float", "fp16", "bf16")
OPTIMIZER_TYPES = ("adamw", "adamw8bit", "adafactor", "prodigy")
#: musubi-tuner's class-path spellings of the same optimizers (``--optimizer_type prodigyopt.Prodigy``).
OPTIMIZER_ALIASES = {
    "torch.optim.adamw": "adamw",
    "bitsandbytes.optim.adamw8bit": "adamw8bit",
    "transformers.optimization.adafactor": "adafactor",
    "prodigyopt.prodigy": "prodigy",
}
MAX_SEED = 2**63
"""Seeds seed torch's generators, which take 64-bit integers."""
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_min_lr", "polynomial")
#: --optimizer_args keys of transformers' Adafactor (besides weight_decay).
ADAFACTOR_ARGS = ("scale_parameter", "relative_step", "warmup_init", "clip_threshold", "decay_rate", "beta1")
#: --optimizer_args keys of prodigyopt's Prodigy (besides weight_decay, betas and eps); the switches
#: among them take True or False.
PRODIGY_ARGS = ("d_coef", "decouple", "use_bias_correction", "safeguard_warmup", "beta3", "d0", "growth_rate")
_SWITCHES = (
    "scale_parameter",
    "relative_step",
    "warmup_init",
    "decouple",
    "use_bias_correction",
    "safeguard_warmup",
)


def optimizer_name(optimizer_type: str) -> str:
    """``--optimizer_type`` as masktrain names it (lower case; musubi's class paths mapped)."""
    lowered = optimizer_type.lower()
    return OPTIMIZER_ALIASES.get(lowered, lowered)


@dataclass(frozen=True)
class NetworkSettings:
    network_dim: int = 16
    """LoRA rank."""
    network_alpha: float = 1.0
    """LoRA alpha; the update is scaled by alpha / rank (musubi-tuner's default alpha is 1)."""
    loraplus_lr_ratio: float | None = None
    """LoRA+ (--network_args loraplus_lr_ratio=16): the up (B) matrices learn this many times faster."""
    include_patterns: tuple[str, ...] | None = None
    """Module-name regexes (fullmatch) to train instead of the family's defaults (--network_args)."""
    exclude_patterns: tuple[str, ...] | None = None
    """Module-name regexes (fullmatch) excluded on top of the family's defaults (--network_args)."""
    network_dropout: float = 0.0
    """Dropout on the LoRA branch's input (peft's lora_dropout)."""
    verbose: bool = False
    """Log every module that gets LoRA (--network_args verbose=True)."""

    def __post_init__(self) -> None:
        if self.network_dim < 1:
            raise TrainConfigError("--network_dim must be >= 1")
        if not 0 <= self.network_dropout < 1:
            raise TrainConfigError(f"--network_dropout must be in range [0, 1), got {self.network_dropout}")
        if not 0 < self.network_alpha < math.inf:
            raise TrainConfigError("--network_alpha must be a finite number > 0")
        if self.loraplus_lr_ratio is not None and not 0 < self.loraplus_lr_ratio < math.inf:
            raise TrainConfigError(
                f"--network_args loraplus_lr_ratio must be > 0, got {self.loraplus_lr_ratio}"
            )


@dataclass(frozen=True)
class OptimSettings:
    learning_rate: float = 1e-4
    """Peak learning rate."""
    optimizer_type: str = "adamw"
    """adamw, adamw8bit (needs bitsandbytes), adafactor (transformers') or prodigy (needs
    prodigyopt; adapts its own step, so a learning rate of 1 is usual); musubi's class paths,
    such as ``prodigyopt.Prodigy``, name the same optimizers."""
    weight_decay: float = 0.01
    """Weight decay (--optimizer_args weight_decay=0.05)."""
    lr_scheduler: str = "constant"
    """constant, constant_with_warmup, linear, cosine, cosine_with_min_lr or polynomial
    (transformers' formulas)."""
    lr_warmup_steps: int = 0
    """Optimizer steps of linear warm-up (not with constant: use constant_with_warmup)."""
    gradient_accumulation_steps: int = 1
    """Batches per optimizer step."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm; 0 disables clipping."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas (--optimizer_args betas=(0.9,0.99))."""
    eps: float = 1e-8
    """AdamW eps (--optimizer_args eps=1e-6)."""
    lr_scheduler_min_lr_ratio: float = 0.0
    """The floor of linear, cosine and polynomial decay, as a fraction of the learning rate."""
    lr_scheduler_power: float = 1.0
    """The power of polynomial decay."""
    adafactor_args: dict[str, Any] = field(default_factory=dict)
    """Adafactor's own --optimizer_args (scale_parameter, warmup_init, clip_threshold, ...)."""
    prodigy_args: dict[str, Any] = field(default_factory=dict)
    """Prodigy's own --optimizer_args (d_coef, decouple, use_bias_correction, safeguard_warmup, ...)."""

    def __post_init__(self) -> None:
        check_optimizer(self.optimizer_type, self.learning_rate, self.weight_decay, self.betas, self.eps)
        check_schedule(self.lr_scheduler, self.lr_warmup_steps, min_lr_ratio=self.lr_scheduler_min_lr_ratio)
        if not 0 < self.lr_scheduler_power < math.inf:
            raise OptimConfigError(f"--lr_scheduler_power must be > 0, got {self.lr_scheduler_power}")
        name = optimizer_name(self.optimizer_type)
        if self.adafactor_args and name != "adafactor":
            raise OptimConfigError(
                f"--optimizer_args {', '.join(self.adafactor_args)} are Adafactor's; "
                "use --optimizer_type adafactor"
            )
        if self.prodigy_args and name != "prodigy":
            raise OptimConfigError(
                f"--optimizer_args {', '.join(self.prodigy_args)} are Prodigy's; use --optimizer_type prodigy"
            )
        if name == "prodigy" and importlib.util.find_spec("prodigyopt") is None:
            raise OptimConfigError(
                "--optimizer_type prodigy needs prodigyopt, which is not installed: pip install prodigyopt "
                "(or masktrain[prodigy])"
            )
        if self.adafactor_args.get("relative_step"):
            raise OptimConfigError(
                "--optimizer_args relative_step=True: masktrain's --learning_rate and --lr_scheduler set the "
                "step size; use relative_step=False"
            )
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
    if optimizer_name(optimizer_type) not in OPTIMIZER_TYPES:
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
    """The dataset TOML, cached with ``masktrain cache``."""
    arch: str
    """The model family (docs/models.md lists what each trains)."""
    dit: str
    """Transformer: 'tiny', a diffusers folder or a .safetensors file (WAN 2.2: the low-noise expert)."""
    output_dir: Path
    """Where the LoRA, checkpoints, metrics.jsonl and config.json go."""
    output_name: str = "lora"
    """File name (without .safetensors) of the LoRA."""
    dit_high_noise: str | None = None
    """WAN 2.2 A14B: the high-noise expert; one LoRA is trained across both (--lora_per_expert: two)."""
    lora_per_expert: bool = False
    """WAN 2.2 A14B: one LoRA per expert, each trained only on its expert's samples, saved as
    OUTPUT_NAME_high_noise and OUTPUT_NAME_low_noise (default: one LoRA shared by both)."""
    timestep_boundary: float | None = None
    """WAN 2.2 A14B: sigmas at or above this go to the high-noise expert; default 0.875, and 0.9
    with --task i2v-A14B (WAN 2.2's own values)."""
    device: str | None = None
    """Training device; default cuda (this process's LOCAL_RANK) when available, else cpu."""
    mixed_precision: str = "auto"
    """auto (bf16 on GPU, fp32 on CPU), no (fp32) or bf16."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    seed: int = 42
    """Seeds the LoRA initialisation, the batch order, the noise and the timesteps."""
    max_train_steps: int = 1600
    """Optimizer steps to train for (--max_train_epochs, when set, takes precedence)."""
    max_train_epochs: int | None = None
    """Epochs to train for; overrides --max_train_steps."""
    save_every_n_steps: int | None = None
    """Write a checkpoint every N optimizer steps (one is always written at the end)."""
    save_every_n_epochs: int | None = None
    """Write a checkpoint at the end of every N-th epoch."""
    save_last_n_steps: int | None = None
    """Keep only the checkpoints of the last N steps (older ones are deleted after each save)."""
    save_last_n_epochs: int | None = None
    """Keep only the checkpoints of the last N epochs."""
    validation_dataset_config: Path | None = None
    """A dataset TOML (cached like the training data, with masks) to validate on by region."""
    validate_every_n_steps: int | None = None
    """Validate every N optimizer steps (and at the end)."""
    task: str | None = None
    """musubi-tuner's --task (WAN, such as t2v-14B): checked against the transformer --dit loads."""
    model_version: str | None = None
    """musubi-tuner's --model_version (Qwen-Image): original, or edit, edit-2509 or edit-2511
    (Qwen-Image-Edit), or layered (Qwen-Image-Layered): cache with the same version; checked
    against the transformer --dit loads."""
    one_frame: bool = False
    """WAN one-frame training (musubi-tuner's --one_frame): the cache's control images at their
    frame positions and one target frame per item (cache with --one_frame too)."""
    remove_first_image_from_target: bool = False
    """Qwen-Image-Layered (musubi-tuner's flag): train on the layers only; the base image stays the
    control but is neither predicted nor in the loss (nor its mask frame)."""
    lora_format: LoraLayout = "comfyui"
    """Layout of OUTPUT_NAME.safetensors: comfyui (``diffusion_model.`` names), diffusers (what
    ``load_lora_weights`` reads) or musubi (musubi-tuner's ``lora_unet_`` names)."""
    save_precision: str = "float"
    """The dtype of the saved LoRA tensors: float, fp16 or bf16."""
    resume: Path | None = None
    """A checkpoint folder (OUTPUT_DIR/step-000100) to continue from."""
    overwrite: bool = False
    """Start over in an OUTPUT_DIR that holds another run's checkpoints (they are deleted)."""
    loss_type: str = "mse"
    """The per-element loss: mse, or huber (½d² up to --loss_delta, linear beyond)."""
    loss_delta: float = 1.0
    """Huber's delta."""
    ddp_timeout: int = 120
    """Minutes a process waits for the others under torchrun: long, since they wait while rank 0
    samples or validates (torch's NCCL default, 10 minutes, would abort a long sampling)."""
    skip_stale: bool = False
    """Train on the items whose cache is up to date and leave out, with a warning, those not
    cached or cached from older inputs (default: such items are an error)."""
    network: NetworkSettings = field(default_factory=NetworkSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    mask: MaskLossSettings = field(default_factory=MaskLossSettings)
    timesteps: TimestepSettings = field(default_factory=TimestepSettings)
    memory: MemorySettings = field(default_factory=MemorySettings)
    sample: SampleSettings = field(default_factory=SampleSettings)
    trackers: TrackerSettings = field(default_factory=TrackerSettings)

    def __post_init__(self) -> None:
        two_experts = [spec.name for spec in catalog.ARCHES.values() if spec.two_experts]
        _check(
            [
                _choice(self.arch, catalog.ARCH_NAMES, "--arch"),
                (0 <= self.seed < MAX_SEED, f"--seed must be an integer in [0, 2**63), got {self.seed}"),
                (self.max_train_steps >= 1, "--max_train_steps must be >= 1"),
                ((self.max_train_epochs or 1) >= 1, "--max_train_epochs must be >= 1"),
                ((self.save_every_n_steps or 1) >= 1, "--save_every_n_steps must be >= 1"),
                ((self.save_every_n_epochs or 1) >= 1, "--save_every_n_epochs must be >= 1"),
                ((self.save_last_n_steps or 1) >= 1, "--save_last_n_steps must be >= 1"),
                ((self.save_last_n_epochs or 1) >= 1, "--save_last_n_epochs must be >= 1"),
                ((self.validate_every_n_steps or 1) >= 1, "--validate_every_n_steps must be >= 1"),
                (self.ddp_timeout >= 1, "--ddp_timeout must be >= 1 (minutes)"),
                _choice(self.loss_type, LOSS_TYPES, "--loss_type"),
                (
                    self.loss_type != "huber" or 0 < self.loss_delta < math.inf,
                    "--loss_delta must be > 0 when --loss_type huber is used.",
                ),
                (
                    (self.validation_dataset_config is None) == (self.validate_every_n_steps is None),
                    "--validation_dataset_config and --validate_every_n_steps go together: pass both",
                ),
                _choice(self.lora_format, LORA_FORMATS, "--lora_format"),
                _choice(self.save_precision, SAVE_PRECISION, "--save_precision"),
                _choice(self.mixed_precision, MIXED_PRECISION, "--mixed_precision"),
                (0 < self.boundary < 1, "--timestep_boundary must be in range (0, 1)"),
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
                (
                    not self.lora_per_expert or self.dit_high_noise is not None,
                    "--lora_per_expert needs two experts: pass --dit_high_noise beside --dit",
                ),
                check_expert_balance(self.timesteps, self.dit_high_noise is not None, self.boundary),
            ]
        )
        self.sample.check(self.arch, TrainConfigError, self.task or self.model_version, self.one_frame)
        try:
            check_device(self.device)
            spec = catalog.arch(self.arch)
            catalog.check_task(spec, "--task", self.task)
            catalog.check_task(spec, "--model_version", self.model_version)
        except SettingError as error:
            raise TrainConfigError(str(error)) from None
        mode = catalog.mode_of(spec, self.task or self.model_version)
        if self.one_frame and (mode is None or mode.kind != "image_to_video"):
            raise TrainConfigError(
                "--one_frame needs an image-to-video --task (i2v-14B: one control image, flf2v-14B: two)"
            )
        if self.remove_first_image_from_target and (mode is None or mode.kind != "layered"):
            raise TrainConfigError(
                "--remove_first_image_from_target is for Qwen-Image-Layered: pass --model_version layered"
            )

    @property
    def condition(self) -> str:
        """The mode the cache must have been made for (``catalog.condition_name``)."""
        spec = catalog.arch(self.arch)
        return catalog.condition_name(spec, self.task or self.model_version, self.one_frame)

    @property
    def denoisers(self) -> tuple[str, str | None]:
        """``--dit`` and ``--dit_high_noise`` as they load: ``tiny`` under a conditioned ``--task``
        is that mode's tiny model (``catalog.tiny_denoisers``)."""
        return catalog.tiny_denoisers(
            self.arch, self.task or self.model_version, self.dit, self.dit_high_noise
        )

    @property
    def boundary(self) -> float:
        """The two experts' switch: ``--timestep_boundary``, else the task's default."""
        return catalog.timestep_boundary(self.arch, self.task or self.model_version, self.timestep_boundary)

    def to_json(self) -> str:
        """The settings as ``config.json`` records them (an API key is never written)."""
        settings = dataclasses.asdict(self)
        if settings["trackers"]["wandb_api_key"] is not None:
            settings["trackers"]["wandb_api_key"] = "(given)"
        return json.dumps(_jsonable(settings), indent=2, sort_keys=True)


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


def parse_network_args(values: tuple[str, ...]) -> dict[str, Any]:
    """musubi-tuner's ``--network_args key=value ...`` as :class:`NetworkSettings` fields:
    ``include_patterns`` / ``exclude_patterns`` (a Python-style list of regexes,
    ``exclude_patterns=[".*norm.*"]``, or one regex) and ``verbose`` (true/false)."""
    settings: dict[str, Any] = {}
    for value in values:
        key, sep, raw = value.partition("=")
        key, raw = key.strip(), raw.strip()
        if not sep:
            raise TrainConfigError(f"--network_args {value!r}: expected key=value")
        if key in ("include_patterns", "exclude_patterns"):
            settings[key] = _pattern_list(raw, key)
        elif key == "verbose":
            settings[key] = _boolean(raw, f"--network_args {key}")
        elif key == "loraplus_lr_ratio":
            try:
                settings[key] = float(raw)
            except ValueError:
                raise TrainConfigError(
                    f"--network_args loraplus_lr_ratio: expected a number, got {raw!r}"
                ) from None
        else:
            raise TrainConfigError(
                f"--network_args {key!r} is not supported; use include_patterns, exclude_patterns, "
                "loraplus_lr_ratio or verbose"
            )
    return settings


def parse_optimizer_args(values: tuple[str, ...], optimizer_type: str = "adamw") -> dict[str, Any]:
    """musubi-tuner's ``--optimizer_args key=value ...`` as :class:`OptimSettings` fields:
    ``weight_decay``, ``betas`` (``(0.9,0.99)``) and ``eps``, and the optimizer's own keys
    (Adafactor's ``ADAFACTOR_ARGS`` into ``adafactor_args``, Prodigy's ``PRODIGY_ARGS`` into
    ``prodigy_args``)."""
    own = {"adafactor": ADAFACTOR_ARGS, "prodigy": PRODIGY_ARGS}.get(optimizer_name(optimizer_type), ())
    settings: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for value in values:
        key, sep, raw = value.partition("=")
        key, raw = key.strip(), raw.strip()
        if not sep or key not in ("weight_decay", "betas", "eps", *ADAFACTOR_ARGS, *PRODIGY_ARGS):
            raise TrainConfigError(
                f"--optimizer_args {value!r}: expected weight_decay=..., betas=(b1,b2), eps=... or one of "
                f"Adafactor's {', '.join(ADAFACTOR_ARGS)} or Prodigy's {', '.join(PRODIGY_ARGS)}"
            )
        try:
            parsed = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            raise TrainConfigError(f"--optimizer_args {key}: cannot read {raw!r}") from None
        if key == "betas":
            if not (isinstance(parsed, tuple | list) and len(parsed) == 2):
                raise TrainConfigError(f"--optimizer_args betas: expected two numbers, got {raw!r}")
            settings[key] = (float(parsed[0]), float(parsed[1]))
            continue
        if key in _SWITCHES:
            if not isinstance(parsed, bool):
                raise TrainConfigError(f"--optimizer_args {key}: expected True or False, got {raw!r}")
            value_read: Any = parsed
        elif key == "beta1" and parsed is None:
            value_read = None
        elif isinstance(parsed, int | float) and not isinstance(parsed, bool):
            value_read = float(parsed)
        else:
            raise TrainConfigError(f"--optimizer_args {key}: expected a number, got {raw!r}")
        if key in ("weight_decay", "eps"):
            settings[key] = value_read
        elif key in own:
            extra[key] = value_read
        else:
            owner = "Adafactor's" if key in ADAFACTOR_ARGS else "Prodigy's"
            wanted = "adafactor" if key in ADAFACTOR_ARGS else "prodigy"
            raise TrainConfigError(
                f"--optimizer_args {key} is {owner}, not {optimizer_type}'s; use --optimizer_type {wanted}"
            )
    if extra:
        settings["adafactor_args" if own is ADAFACTOR_ARGS else "prodigy_args"] = extra
    return settings


def _boolean(raw: str, where: str) -> bool:
    if raw.lower() in ("true", "1", "yes"):
        return True
    if raw.lower() in ("false", "0", "no"):
        return False
    raise TrainConfigError(f"{where}: expected True or False, got {raw!r}")


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
