"""Building a model from one ``.safetensors`` file in the ComfyUI / original layout (``--dit``,
``--vae``), offline: the generic half of every family's file reader. What the file holds (its
header, its kind, its fp8 scales) is ``weights_file.py``'s part; each family reads its own files
with both (``wan_checkpoint.py``, ``qwen_image_checkpoint.py``): it names the kinds of checkpoint
it accepts, renames the keys to diffusers names, infers the diffusers config from the tensor
shapes and calls :func:`build`; :func:`load_component` is that walk for a component whose keys
only need renaming.

diffusers' ``from_single_file`` fetches a config from the Hub unless it is given a local folder, so
masktrain reads the file itself. :func:`build` makes the model on the meta device and assigns the
file's tensors to it, strictly: a missing, unexpected or misshapen tensor is an error naming the
file, never a random weight. So is a weight stored in a dtype masktrain does not read (int8,
bool, ...) or an fp8 scale of the wrong shape, from the header, before any tensor is read; and,
as each tensor is read, a weight holding NaN or infinity or an fp8 scale of 0 (a damaged file,
named with the tensor: such a model cannot train, and with ``--fp8_base`` quantising would
otherwise clamp an infinity to 448 without a word). Tensors keep the file's dtype unless one is
given (unscaled fp8 becomes bfloat16); buffers that are not in the file (RoPE tables) are
computed in float32, as the model builds them. With :class:`Fp8Load` the targeted Linear weights
are quantised (or kept, when the file stores them in fp8) as they are read, so host memory never
holds the bf16 model.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from masktrain.config.memory import Fp8Mode
from masktrain.models.fp8 import (
    BLOCK,
    FP8,
    FP8_MAX,
    Fp8Linear,
    Fp8Targets,
    dequantize,
    quantize,
    replace_module,
    target_linears,
)
from masktrain.models.weights_file import (
    CheckpointFile,
    CheckpointKind,
    ConfigRule,
    abbreviated,
    open_component,
)

if TYPE_CHECKING:
    from diffusers.models.modeling_utils import ModelMixin

logger = logging.getLogger(__name__)

#: A family's key renaming: {unprefixed file key: file key} -> {diffusers name: file key}.
Rename = Callable[[dict[str, str]], dict[str, str]]


def load_component(
    model_class: type[ModelMixin],
    path: Path,
    flag: str,
    prefixes: tuple[str, ...],
    kind: CheckpointKind,
    rule: ConfigRule,
    *,
    rename: Rename | None = None,
    markers: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    dtype: torch.dtype | None = None,
    fp8: Fp8Load | None = None,
) -> torch.nn.Module:
    """`model_class` from the component of `path` under `prefixes`, which must be of `kind`: its
    keys without the prefix, renamed by `rename` (kept when None), its config inferred by `rule`
    (``overrides`` win), then :func:`build`.

    ``markers`` names keys that are not weights but say something of the config (marker key ->
    config key): the config key is True when the file has the marker, False otherwise, unless
    ``overrides`` set it."""
    file, config, to_file = read_component(
        path, flag, prefixes, kind, rule, rename=rename, markers=markers, overrides=overrides
    )
    return build(model_class, config, file, to_file, dtype, fp8)


def read_component(
    path: Path,
    flag: str,
    prefixes: tuple[str, ...],
    kind: CheckpointKind,
    rule: ConfigRule,
    *,
    rename: Rename | None = None,
    markers: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> tuple[CheckpointFile, dict[str, Any], dict[str, str]]:
    """(the open file, the config its shapes imply, diffusers name -> file key) of the component
    :func:`load_component` builds, from the header alone (what a model takes is known before it
    loads)."""
    file, names = open_component(path, flag, prefixes, kind)
    unprefixed = {name.removeprefix(file.prefix): name for name in names}
    marked = {key: unprefixed.pop(marker, None) is not None for marker, key in (markers or {}).items()}
    to_file = unprefixed if rename is None else rename(unprefixed)
    config = file.infer(rule, file.renamed_shapes(to_file), overrides)
    for key, value in marked.items():
        config.setdefault(key, value)
    return file, config, to_file


def build(
    model_class: type[ModelMixin],
    config: dict[str, Any],
    file: CheckpointFile,
    to_file: dict[str, str],
    dtype: torch.dtype | None,
    fp8: Fp8Load | None = None,
    rows: Mapping[str, slice] | None = None,
) -> torch.nn.Module:
    """`model_class(**config)` on the meta device, then the file's tensors assigned to it; every
    key and shape is checked against the model before any tensor is read. `rows` gives the
    tensors that are a block of rows of their file tensor (a fused q/k/v Linear the model keeps
    as three, as FLUX.2's BFL files do): diffusers name -> its rows.

    Tensors are read one at a time and converted as they come: to `dtype`; with `fp8`, the
    Linear weights it targets are quantised (or kept, when the file stores them in fp8 already),
    so host memory holds the fp8 model, never the bf16 one. Without `fp8`, fp8 weights in the
    file are dequantised (by their scales) to `dtype` (bfloat16 when None)."""
    from accelerate import init_empty_weights
    from safetensors import safe_open

    try:
        with init_empty_weights(include_buffers=False):
            model: torch.nn.Module = model_class(**config)
    except (TypeError, ValueError, AssertionError) as e:
        raise file.error(f"the inferred {model_class.__name__} config {config} is invalid ({e})") from None
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(to_file))
    unexpected = sorted(set(to_file) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors {abbreviated(missing)}")
        if unexpected:
            parts.append(f"unexpected tensors {abbreviated([to_file[k] for k in unexpected])}")
        raise file.error(f"does not match {model_class.__name__}: {'; '.join(parts)}")
    rows = rows or {}
    for name, expected_shape in expected.items():
        stored = _rows_shape(file.shapes[to_file[name]], rows.get(name))
        if stored != expected_shape:
            part = "" if name not in rows else f" (rows {rows[name].start}:{rows[name].stop})"
            raise file.error(
                f"tensor {to_file[name]!r}{part} has shape {list(stored)}, "
                f"{model_class.__name__} expects {list(expected_shape)}"
            )
    floats = {name for name, tensor in model.state_dict().items() if tensor.is_floating_point()}
    file.check_dtypes([to_file[name] for name in expected if name in floats])
    for key in to_file.values():
        if key in file.scales:
            file.scale_shape(key)
    quantized = _swap_in_fp8_linears(model, file, to_file, fp8, dtype, rows) if fp8 is not None else set()
    kept = sum(1 for name in quantized if file.is_fp8(to_file[f"{name}.weight"]))
    if quantized:
        how = "as stored" if kept == len(quantized) else f"{fp8.mode if fp8 else ''} quantised while reading"
        logger.info("%d Linear layers in fp8 (%s)", len(quantized), how)
    elif any(file.is_fp8(key) for key in file.dtypes):
        logger.info(
            "%s holds fp8 weights: dequantised to %s (pass --fp8_base to keep them in fp8)", file.path, dtype
        )
    state: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for name, key in to_file.items():
        by_file.setdefault(file.file_of(key), []).append((name, key))
    read_since_trim = 0
    read: dict[str, torch.Tensor] = {}  # file key -> the tensor made of it
    for path, pairs in by_file.items():
        with safe_open(path, framework="pt") as f:
            for name, key in pairs:
                module_name = name.removesuffix(".weight")
                if key in read and name not in rows:  # tied weights (T5's shared / embed_tokens)
                    state[name] = read[key]
                elif module_name in quantized and name.endswith(".weight"):
                    state[name], scale = _fp8_weight(f, file, key, fp8, rows.get(name))
                    if scale is not None:
                        state[f"{module_name}.scale"] = scale
                    read_since_trim += math.prod(file.shapes[key]) * 4
                else:
                    state[name] = _plain_tensor(f, file, key, dtype, rows.get(name))
                read[key] = state[name]
                if read_since_trim > _TRIM_EVERY:
                    release_freed_memory()
                    read_since_trim = 0
    model.load_state_dict(state, strict=True, assign=True)
    logger.info("loaded %s from %s (%d tensors)", model_class.__name__, file.path, len(state))
    return model.eval()


@dataclass(frozen=True)
class Fp8Load:
    """fp8 base weights while reading: the mode (``--fp8_scaled`` or a plain cast) and which
    Linear layers."""

    mode: Fp8Mode
    targets: Fp8Targets
    compute_dtype: torch.dtype


def _swap_in_fp8_linears(
    model: torch.nn.Module,
    file: CheckpointFile,
    to_file: dict[str, str],
    fp8: Fp8Load,
    dtype: torch.dtype | None,
    rows: Mapping[str, slice],
) -> set[str]:
    """Replace the targeted (meta) Linear layers with :class:`Fp8Linear` shells whose scale
    shape is the file's (pre-quantised; a block of rows keeps its rows' scales) or the mode's;
    returns their names."""
    names = set(target_linears(model, fp8.targets))
    for name in names:
        linear = model.get_submodule(name)
        assert isinstance(linear, torch.nn.Linear)
        key = to_file[f"{name}.weight"]
        if file.is_fp8(key):
            scale_shape = None if key not in file.scales else _file_scale_shape(file, key, linear)
            if scale_shape:  # one per row: the rows the layer takes
                scale_shape = (linear.out_features, *scale_shape[1:])
        else:
            scale_shape = _mode_scale_shape(linear, fp8.mode)
        replace_module(model, name, Fp8Linear.like(linear, scale_shape, dtype or fp8.compute_dtype))
    return names


def _mode_scale_shape(linear: torch.nn.Linear, mode: Fp8Mode) -> tuple[int, ...] | None:
    if mode == "e4m3":
        return None
    if linear.in_features % BLOCK == 0:
        return (linear.out_features, linear.in_features // BLOCK, 1)
    return (linear.out_features, 1)


def _file_scale_shape(file: CheckpointFile, weight_key: str, linear: torch.nn.Linear) -> tuple[int, ...]:
    """ComfyUI stores one scale per tensor (``[]`` or ``[1]``) or per output row (``[out]``);
    build() checked the weight's shape, so its rows are `linear`'s outputs."""
    return file.scale_shape(weight_key)


def _read(f: Any, file: CheckpointFile, key: str) -> torch.Tensor:
    """Tensor `key`, or an error naming it when it holds NaN or infinity (a damaged model file: no
    learning rate trains on it, and quantising would hide an infinity)."""
    tensor: torch.Tensor = f.get_tensor(key)
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise file.error(
            f"tensor {key!r} holds NaN or infinity: the model file is damaged; download or convert it again"
        )
    return tensor


def _read_scale(f: Any, file: CheckpointFile, weight_key: str) -> torch.Tensor:
    """The float32 fp8 scale of `weight_key`, shaped to multiply the weight's rows (``()`` or
    ``(rows, 1, ...)``); a scale of 0 (the weight would be all zeros) is an error naming it."""
    scale_key = file.scales[weight_key]
    scale = _read(f, file, scale_key).float()
    if not bool(scale.ne(0).any()):
        raise file.error(
            f"the fp8 scale {scale_key!r} is 0, which makes {weight_key!r} all zeros: the model file is "
            "damaged; download or convert it again"
        )
    if file.scale_shape(weight_key) == ():
        return scale.reshape(())
    return scale.reshape(-1, *([1] * (len(file.shapes[weight_key]) - 1)))


def _fp8_weight(
    f: Any, file: CheckpointFile, key: str, fp8: Fp8Load | None, rows: slice | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    assert fp8 is not None
    tensor = _take(_read(f, file, key), rows)
    if not file.is_fp8(key):
        return quantize(tensor, fp8.mode)
    if tensor.dtype != FP8:  # e5m2: its 2 mantissa bits fit e4m3's 3; out-of-range values clamp or flush
        tensor = tensor.float().clamp(-FP8_MAX, FP8_MAX).to(FP8)
    if key not in file.scales:
        return _aligned(tensor), None
    return _aligned(tensor), _rows_of_scale(_read_scale(f, file, key), rows)


def _plain_tensor(
    f: Any, file: CheckpointFile, key: str, dtype: torch.dtype | None, rows: slice | None = None
) -> torch.Tensor:
    tensor = _take(_read(f, file, key), rows)
    if tensor.is_floating_point():
        if file.is_fp8(key):
            scale = _read_scale(f, file, key) if key in file.scales else None
            scale = None if scale is None else _rows_of_scale(scale, rows)
            # fp8 cannot run as is; bf16 holds an unscaled fp8 value exactly
            tensor = dequantize(tensor, scale, dtype or torch.bfloat16)
        elif dtype is not None:
            tensor = tensor.to(dtype)
    return _aligned(tensor)


_TRIM_EVERY = 256 * 2**20
"""Bytes of quantisation temporaries between two :func:`release_freed_memory` calls."""


def release_freed_memory() -> None:
    """Give the heap's free pages back to the OS (glibc's ``malloc_trim``; elsewhere nothing).
    Quantising frees a float32 temporary per tensor, and glibc keeps such memory or not by chance
    of its heap's layout: without this, the same fp8 load peaked anywhere from 1.07x to 2x its
    weights in anonymous memory (``benches/bench_memory.py``)."""
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util
        import sys

        name = ctypes.util.find_library("c") if sys.platform.startswith("linux") else None
        _LIBC = ctypes.CDLL(name) if name else False
    if _LIBC and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


_LIBC: Any = None


def _take(tensor: torch.Tensor, rows: slice | None) -> torch.Tensor:
    """`tensor`'s rows `rows`, in memory of their own (the whole tensor is freed); all when None."""
    return tensor if rows is None else tensor[rows].clone()


def _rows_shape(shape: tuple[int, ...], rows: slice | None) -> tuple[int, ...]:
    """The shape of the block `rows` of a tensor of `shape` (all of it when None)."""
    if rows is None or not shape:
        return shape
    return (len(range(*rows.indices(shape[0]))), *shape[1:])


def _rows_of_scale(scale: torch.Tensor, rows: slice | None) -> torch.Tensor:
    """A per-row fp8 scale's rows `rows`; a per-tensor scale as it is."""
    return scale if rows is None or scale.dim() == 0 else scale[rows]


def _aligned(tensor: torch.Tensor) -> torch.Tensor:
    # safetensors hands out tensors at the file's 8-byte alignment, and CPU kernels take other
    # paths on unaligned memory (the last bit of results differs): own copy.
    return tensor.clone() if tensor.data_ptr() % 64 else tensor
