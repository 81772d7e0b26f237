"""musubi-tuner's command line, as users copy it: the flags masktrain accepts without acting on
them (and why), the flags it does not implement (each a one-line error naming what to use
instead), and musubi's habit of several values after one flag (``--network_args "a=1" "b=2"``).

This is the one table of musubi flags; docs/musubi.md lists it too. Flags masktrain implements are
ordinary options of ``cli/train.py`` (their spelling is musubi's).
"""

from __future__ import annotations

import logging
from typing import Any

import click

log = logging.getLogger(__name__)

#: Flags that take several values after one use, as musubi's ``nargs="*"``.
MULTI_VALUE = ("network_args", "optimizer_args")

#: Accepted and ignored: flag -> (takes a value, what masktrain does instead).
ACCEPTED: dict[str, tuple[bool, str]] = {
    "network_module": (True, "masktrain trains a peft LoRA on the family's default modules"),
    "max_data_loader_n_workers": (
        True,
        "the loader already reads the next batch on a thread while the step runs",
    ),
    "persistent_data_loader_workers": (False, "the loader's thread lives for the whole run"),
    "save_state": (False, "every checkpoint already holds the full training state"),
    "save_state_on_train_end": (False, "the last checkpoint already holds the full training state"),
    "log_config": (False, "config.json, next to every checkpoint, records every setting"),
    "block_swap_h2d_only": (False, "block swap always copies host-to-device only"),
}
_NOT_SUPPORTED = "not supported by masktrain; drop the flag"
_UPLOAD = "masktrain uploads nothing; copy OUTPUT_DIR yourself"
_COMPILE = "torch.compile is not supported yet; drop the flag"
_SCHEDULER = (
    "use --lr_scheduler (constant, constant_with_warmup, linear, cosine, cosine_with_min_lr, polynomial)"
)

#: Not implemented: flag -> what to do instead (the error's second half).
NOT_IMPLEMENTED: dict[str, str] = {
    "guidance_scale": "HunyuanVideo's embedded guidance; drop the flag (a sample's CFG scale is --l in "
    "the prompt file)",
    "flow_shift": "drop the flag: training's shift is --discrete_flow_shift, a sample's is --fs in the "
    "prompt file",
    "log_tracker_config": _NOT_SUPPORTED,
    "network_weights": "starting from an existing LoRA is not supported yet (--resume continues one)",
    "dim_from_weights": "starting from an existing LoRA is not supported yet",
    "base_weights": "merging LoRAs into the base is not supported; pass an already merged --dit",
    "base_weights_multiplier": "merging LoRAs into the base is not supported; pass an already merged --dit",
    "full_bf16": "LoRA weights always train in float32; use --mixed_precision bf16",
    "full_fp16": "LoRA weights always train in float32; use --mixed_precision bf16",
    "flash3": "use --flash_attn",
    "split_attn": _NOT_SUPPORTED,
    "block_swap_ring_size": "block swap's ring is always two blocks; drop the flag",
    "img_in_txt_in_offloading": "a HunyuanVideo option; drop the flag",
    "config_file": "write the flags on the command line",
    "compile": _COMPILE,
    "compile_backend": _COMPILE,
    "compile_mode": _COMPILE,
    "compile_dynamic": _COMPILE,
    "compile_fullgraph": _COMPILE,
    "compile_cache_size_limit": _COMPILE,
    "dynamo_backend": _COMPILE,
    "dynamo_mode": _COMPILE,
    "dynamo_dynamic": _COMPILE,
    "dynamo_fullgraph": _COMPILE,
    "ddp_gradient_as_bucket_view": "masktrain all-reduces the LoRA gradients itself; drop the flag",
    "ddp_static_graph": "masktrain all-reduces the LoRA gradients itself; drop the flag",
    "lr_scheduler_type": _SCHEDULER,
    "lr_scheduler_args": _SCHEDULER,
    "lr_scheduler_num_cycles": _SCHEDULER,
    "lr_scheduler_timescale": _SCHEDULER,
    "lr_decay_steps": _SCHEDULER,
    "save_last_n_steps_state": "every checkpoint holds the state; use --save_last_n_steps",
    "save_last_n_epochs_state": "every checkpoint holds the state; use --save_last_n_epochs",
    "huggingface_repo_id": _UPLOAD,
    "huggingface_repo_type": _UPLOAD,
    "huggingface_path_in_repo": _UPLOAD,
    "huggingface_token": _UPLOAD,
    "huggingface_repo_visibility": _UPLOAD,
    "save_state_to_huggingface": _UPLOAD,
    "resume_from_huggingface": _UPLOAD,
    "async_upload": _UPLOAD,
    "metadata_title": "masktrain writes its own LoRA metadata (arch, rank, alpha, version, mask flags)",
    "metadata_author": "masktrain writes its own LoRA metadata",
    "metadata_description": "masktrain writes its own LoRA metadata",
    "metadata_license": "masktrain writes its own LoRA metadata",
    "metadata_tags": "masktrain writes its own LoRA metadata",
    "metadata_reso": "masktrain writes its own LoRA metadata",
    "metadata_arch": "masktrain writes its own LoRA metadata",
    "training_comment": "masktrain writes its own LoRA metadata",
    "no_metadata": "masktrain always writes its LoRA metadata",
    "scale_weight_norms": _NOT_SUPPORTED,
    "num_timestep_buckets": _NOT_SUPPORTED,
    "preserve_distribution_shape": _NOT_SUPPORTED,
    "show_timesteps": _NOT_SUPPORTED,
    "cuda_allow_tf32": _NOT_SUPPORTED,
    "cuda_cudnn_benchmark": _NOT_SUPPORTED,
    "disable_numpy_memmap": "masktrain reads safetensors one tensor at a time already; drop the flag",
    "vae_dtype": "a sampling and caching option; drop the flag",
    "vae_cache_cpu": "a caching option of musubi; drop the flag",
    "force_v2_1_time_embedding": _NOT_SUPPORTED,
    "num_layers": _NOT_SUPPORTED,
}


def _flag_name(word: str) -> str | None:
    """``--network-args`` / ``--network_args=x`` -> ``network_args``; None for a non-flag."""
    if not word.startswith("--") or len(word) == 2:
        return None
    return word[2:].split("=", 1)[0].replace("-", "_")


def rewrite(args: list[str]) -> list[str]:
    """musubi's argument list as click parses it: a multi-value flag repeated once per value, and
    an unimplemented flag a one-line error."""
    out: list[str] = []
    index = 0
    while index < len(args):
        word = args[index]
        name = _flag_name(word)
        index += 1
        if name in NOT_IMPLEMENTED:
            raise click.UsageError(f"--{name} is not implemented by masktrain: {NOT_IMPLEMENTED[name]}")
        if name in MULTI_VALUE and "=" not in word:  # --network_args=a=1 is one value
            values = []
            while index < len(args) and not args[index].startswith("-"):
                values.append(args[index])
                index += 1
            out.extend(part for value in values for part in (word, value))
            if not values:
                out.append(word)  # click says the value is missing
            continue
        out.append(word)
    return out


class MusubiCommand(click.Command):
    """A click command that reads musubi-tuner's argument conventions (see :func:`rewrite`)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, rewrite(list(args)))


#: Used only for sampling: without --sample_prompts each is accepted and ignored (musubi's commands
#: always name the VAE and the text encoder), saying so.
SAMPLING_ONLY = "train reads cached latents and embeddings; the VAE and text encoder are for --sample_prompts"


def note_accepted(flags: dict[str, Any]) -> None:
    """Log, once each, the accepted musubi flags that were given (and remove them from `flags`)."""
    for name, (_, why) in ACCEPTED.items():
        value = flags.pop(name, None)
        if value not in (None, False, ()):
            log.info("--%s is accepted and ignored: %s", name, why)
