"""LoRA on a live transformer through peft: which Linear layers get it, the teacher pass with the
adapters off, the adapter's weights as a LoRA file (``lora_file``) and a LoRA file loaded back in.

Targets. A module gets LoRA when it is an ``nn.Linear``, its name fully matches one of the
family's ``include`` patterns (the transformer blocks), and it matches no exclude pattern (the
family's defaults plus the user's ``exclude_patterns``) unless it also matches one of the user's
``include_patterns``. That is musubi-tuner's rule (``networks/lora.py``: user excludes are added
to the architecture's default excludes, and an include pattern rescues an excluded module; it does
not restrict). To train only some layers, exclude everything and include those:
``exclude_patterns=[".*"] include_patterns=[".*attn1.*"]``. Two differences from musubi: patterns
must match the whole name (``re.fullmatch``, musubi uses ``re.match``; its usual ``.*x.*`` patterns
behave the same), and a pattern may be written against the diffusers name
(``blocks.0.attn1.to_q``) or the original / ComfyUI one (``blocks.0.self_attn.q``), so patterns
copied from musubi's WAN docs keep working.

Initialisation is peft's default (``init_lora_weights=True``): A Kaiming-uniform (a=sqrt(5)), B
zeros, so the adapted model starts equal to the base, as musubi-tuner's LoRA modules do. The
scale is ``alpha / rank`` (no rsLoRA, which ComfyUI would not reproduce).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch

from masktrain import atomic
from masktrain.config.train import LoraLayout
from masktrain.denoiser import lora_file
from masktrain.errors import LoraFileError, LoraTargetError
from masktrain.models.base import ModelFamily, adapter_host

if TYPE_CHECKING:
    from torch.nn.modules.module import _IncompatibleKeys

ADAPTER = "default"
"""peft's name of the one adapter masktrain adds."""


def select_targets(
    transformer: torch.nn.Module,
    family: ModelFamily,
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> list[str]:
    """The names of the Linear layers that get LoRA (see the module docstring for the rule)."""
    defaults = family.lora_targets()
    scope = _compile(defaults.include, "include")
    excluded = _compile((*defaults.exclude, *(exclude or ())), "exclude_patterns")
    rescued = _compile(include or (), "include_patterns")
    chosen = []
    for name, module in transformer.named_modules():
        if not isinstance(module, torch.nn.Linear) or not _any_match(scope, (name,)):
            continue
        names = _names(family, name)
        if _any_match(excluded, names) and not _any_match(rescued, names):
            continue
        chosen.append(name)
    if not chosen:
        linears = [n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)]
        linears = [n for n in linears if _any_match(scope, (n,))] or linears
        raise LoraTargetError(
            f"no Linear layer of the {family.name} transformer is selected for LoRA "
            f"(include_patterns={list(include or [])}, exclude_patterns={list(exclude or [])}, "
            f"defaults include={list(defaults.include)} exclude={list(defaults.exclude)}); "
            f"Linear layers are named like {', '.join(linears[:4]) or '(none)'}"
        )
    return chosen


def add_lora(
    transformer: torch.nn.Module,
    family: ModelFamily,
    *,
    rank: int,
    alpha: float,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    dropout: float = 0.0,
) -> list[str]:
    """Freeze the base and add one LoRA adapter (float32 weights) on the selected Linear layers;
    returns their names. Only the LoRA weights require grad afterwards. `dropout` is peft's
    ``lora_dropout`` (musubi's ``--network_dropout``: dropout on the LoRA branch's input)."""
    from peft import LoraConfig

    if rank < 1:
        raise LoraTargetError(f"--network_dim must be >= 1, got {rank}")
    if getattr(transformer, "_hf_peft_config_loaded", False):
        raise LoraTargetError("the transformer already has a LoRA adapter; add_lora adds exactly one")
    targets = select_targets(transformer, family, include=include, exclude=exclude)
    transformer.requires_grad_(False)
    # peft annotates lora_alpha as int; it scales by any number, and musubi's alpha is a float.
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,  # type: ignore[arg-type]
        target_modules=targets,
        init_lora_weights=True,
        lora_dropout=dropout,
    )
    adapter_host(transformer).add_adapter(config, adapter_name=ADAPTER)
    # Train the adapter in float32 whatever the base dtype (diffusers' cast_training_params).
    for param in lora_parameters(transformer):
        param.data = param.data.to(torch.float32)
    return targets


def lora_parameters(transformer: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The adapter's weights (lora_A / lora_B of every adapted layer)."""
    return [p for n, p in transformer.named_parameters() if ".lora_A." in n or ".lora_B." in n]


@contextlib.contextmanager
def adapters_disabled(transformer: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Run the base model (the prior-preservation teacher) with the same module.

    Uses diffusers' ``disable_adapters()`` / ``enable_adapters()`` rather than the per-call
    ``attention_kwargs={"scale": 0.0}`` route: the disabled layers skip the LoRA matmuls
    entirely (the teacher costs exactly one base forward), and it leaves any adapter weights set
    with ``set_adapters`` alone. The ``finally`` re-enables the adapters before anything else can
    run, so a gradient-checkpointed student forward and its ``backward()`` always see the same
    (enabled) model; recomputing a checkpointed block with the adapters still off is what raises
    ``CheckpointError``. Run the teacher first, under ``torch.no_grad()``: diffusers only
    checkpoints while grad is enabled, so the teacher saves nothing for backward. peft's disable
    clears ``requires_grad`` on the LoRA weights and its enable sets it back to True; the flags
    are restored as they were, so frozen adapters stay frozen. Pass the unwrapped module (not a
    DDP wrapper).
    """
    flags = [(p, p.requires_grad) for p in lora_parameters(transformer)]
    host = adapter_host(transformer)
    host.disable_adapters()
    try:
        yield transformer
    finally:
        host.enable_adapters()
        for param, flag in flags:
            param.requires_grad_(flag)


def lora_state_dict(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """peft's names without the adapter name: ``blocks.0.attn1.to_q.lora_A.weight`` -> tensor."""
    from peft.utils import get_peft_model_state_dict

    state: dict[str, torch.Tensor] = get_peft_model_state_dict(transformer, adapter_name=ADAPTER)
    return state


def save_lora(
    path: str | os.PathLike[str],
    transformer: torch.nn.Module,
    family: ModelFamily,
    *,
    layout: LoraLayout = "comfyui",
    metadata: Mapping[str, str] | None = None,
    dtype: torch.dtype = torch.float32,
) -> None:
    """Write the adapter to ``path`` atomically (:func:`lora_file_bytes` describes the file)."""
    data = lora_file_bytes(transformer, family, layout=layout, metadata=metadata, dtype=dtype)
    atomic.write_bytes(path, data)


def lora_file_bytes(
    transformer: torch.nn.Module,
    family: ModelFamily,
    *,
    layout: LoraLayout = "comfyui",
    metadata: Mapping[str, str] | None = None,
    dtype: torch.dtype = torch.float32,
) -> bytes:
    """The adapter as the bytes of a ``.safetensors`` LoRA file in `layout` (``lora_file``
    describes the three), with the caller's `metadata` (string values; training flags)."""
    if ADAPTER not in getattr(transformer, "peft_config", {}):
        raise ValueError("the transformer has no LoRA adapter to save (add_lora adds one)")
    config = adapter_host(transformer).peft_config[ADAPTER]
    state = {
        k: v.detach().to(device="cpu", dtype=dtype).contiguous()
        for k, v in lora_state_dict(transformer).items()
    }
    adapter = config.to_dict()  # type: ignore[no-untyped-call]  # peft leaves it unannotated
    return lora_file.state_file_bytes(
        state,
        family,
        rank=config.r,
        alpha=float(config.lora_alpha),
        layout=layout,
        metadata=metadata,
        adapter=adapter,
    )


def load_lora_into(
    transformer: torch.nn.Module, path: str | os.PathLike[str], family: ModelFamily
) -> dict[str, str]:
    """Add the adapter stored in a LoRA file (masktrain's, in any layout, or one musubi-tuner or
    another trainer wrote: ``lora_file.file_header``) to a `family` transformer without one;
    returns the file's metadata. A file trained for another family is refused naming it. The
    loaded weights are trainable like any adapter from `add_lora`."""
    from peft import LoraConfig
    from peft.utils import set_peft_model_state_dict

    path = Path(path)
    tensors, metadata = lora_file.read_lora_file(path)
    if getattr(transformer, "_hf_peft_config_loaded", False):
        raise LoraFileError(f"{path}: the transformer already has a LoRA adapter; load into a fresh one")
    arch, rank, alpha = lora_file.file_header(tensors, metadata, path, family.name)
    lora_file.check_family(arch, family, path)
    state = lora_file.peft_state(tensors, layer_resolver(transformer, family), family, path)

    check_shapes(transformer, state, family, path)
    modules = sorted({key.rpartition(".lora_")[0] for key in state})
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,  # type: ignore[arg-type]  # peft says int, takes any number
        target_modules=modules,
        init_lora_weights=True,
    )
    try:
        adapter_host(transformer).add_adapter(config, adapter_name=ADAPTER)
    except ValueError as error:  # peft: a target module that does not exist in this model
        raise LoraFileError(f"{path}: does not fit this {family.name} transformer ({error})") from error
    try:  # peft annotates the result as `namedtuple`; it is torch's load_state_dict result.
        result = cast(
            "_IncompatibleKeys", set_peft_model_state_dict(transformer, state, adapter_name=ADAPTER)
        )
    except RuntimeError as error:  # what check_shapes cannot foresee, in one line
        first = str(error).strip().splitlines()[-1].strip()
        raise LoraFileError(f"{path}: does not fit this {family.name} transformer ({first})") from error
    unloaded = [k for k in result.missing_keys if ".lora_" in k]
    if result.unexpected_keys or unloaded:
        raise LoraFileError(
            f"{path}: does not fit this transformer (unexpected {result.unexpected_keys[:3]}, "
            f"missing {unloaded[:3]})"
        )
    return metadata


def check_shapes(
    transformer: torch.nn.Module, state: Mapping[str, torch.Tensor], family: ModelFamily, path: Path
) -> None:
    """Refuse, before peft builds the adapter, LoRA matrices that do not fit the Linear layers they
    name (``state``: peft names): a LoRA of another model size, say a 14B LoRA on a 1.3B ``--dit``.
    A's columns must be the layer's inputs, B's rows its outputs."""
    for key in sorted(state):
        module, _, matrix = key.rpartition(".lora_")  # "blocks.0.attn1.to_q", "A.weight"
        try:
            layer = transformer.get_submodule(module)
        except AttributeError:
            continue  # named by add_adapter's own check
        if not isinstance(layer, torch.nn.Linear):
            continue
        shape = list(state[key].shape)
        side, size = (-1, layer.in_features) if matrix.startswith("A") else (0, layer.out_features)
        if len(shape) != 2 or shape[side] != size:
            expected = [shape[0], size] if side == -1 else [size, shape[-1]]
            raise LoraFileError(
                f"{path}: {key} has shape {shape}, but this {family.name} transformer's layer takes "
                f"{expected} ({layer.in_features} in, {layer.out_features} out): the LoRA was made for a "
                "model of another size; pass the --dit it was trained on"
            )


def layer_resolver(transformer: torch.nn.Module, family: ModelFamily) -> Callable[[str], str | None]:
    """A layer's ComfyUI path (``blocks.0.self_attn.q``) or musubi name (``blocks_0_self_attn_q``)
    -> its diffusers module name in `transformer` (None when it has no such Linear layer)."""
    names: dict[str, str] = {}
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear):
            with contextlib.suppress(ValueError):
                original = family.comfy_key(name)
                names[original] = names[original.replace(".", "_")] = name
    return names.get


def _compile(patterns: Sequence[str], what: str) -> list[re.Pattern[str]]:
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as error:
            raise LoraTargetError(
                f"{what}: {pattern!r} is not a valid regular expression ({error})"
            ) from None
    return compiled


def _any_match(patterns: Sequence[re.Pattern[str]], names: Sequence[str]) -> bool:
    return any(p.fullmatch(name) for p in patterns for name in names)


def _names(family: ModelFamily, module_name: str) -> tuple[str, ...]:
    """A module's diffusers name and, when it differs, its original (ComfyUI) name."""
    try:
        original = family.comfy_key(module_name)
    except ValueError:
        return (module_name,)
    return (module_name,) if original == module_name else (module_name, original)
