"""One ``.safetensors`` file in the ComfyUI / original layout (``--dit``, ``--vae``), read offline:
the generic half. Each family reads its own files with these pieces (``wan_checkpoint.py``,
``qwen_image_checkpoint.py``): it names the kinds of checkpoint it accepts, renames the keys to
diffusers names, infers the diffusers config from the tensor shapes and calls :func:`build`.

diffusers' ``from_single_file`` fetches a config from the Hub unless it is given a local folder, so
masktrain reads the file itself: :func:`open_checkpoint` reads the header (every key, shape and
dtype) without reading a tensor; :meth:`CheckpointFile.select` picks one component's keys (ComfyUI
prefixes them with ``model.diffusion_model.``; a file may bundle several components);
:meth:`CheckpointFile.expect` checks the file holds what the family reads, and otherwise names
what it does hold (``holds a Qwen-Image transformer, expected a WAN transformer; check --arch``);
:func:`build` makes the model on the meta device and assigns the file's tensors to it, strictly:
a missing, unexpected or misshapen tensor is an error naming the file, never a random weight.
Tensors keep the file's dtype unless one is given (unscaled fp8 becomes bfloat16); buffers that
are not in the file (RoPE tables) are computed in float32, as the model builds them.

What a file holds is told by :class:`CheckpointKind` records, which each family registers
(:func:`register_kinds`) for its own checkpoints, including variants masktrain does not train
(WAN VACE, say), so a user who passes one is told what it is.

Text encoders are never single files: ComfyUI's carry no tokenizer, and tokenizers cannot be
downloaded (:func:`text_encoder_file_error`).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from masktrain.config.memory import Fp8Mode
from masktrain.errors import ModelLoadError
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

if TYPE_CHECKING:
    from diffusers.models.modeling_utils import ModelMixin

logger = logging.getLogger(__name__)

Shapes = dict[str, tuple[int, ...]]
#: A family's rule from (diffusers-named) shapes and caller overrides to a diffusers config.
ConfigRule = Callable[[Shapes, Mapping[str, Any] | None], dict[str, Any]]
Role = Literal["dit", "vae", "text"]

# ComfyUI checkpoints prefix each component; a file may bundle several of them.
DIT_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
VAE_PREFIXES = ("first_stage_model.", "vae.")
_ANY_PREFIX = re.compile(r"^(model\.diffusion_model\.|diffusion_model\.|first_stage_model\.|vae\.)")
_FP8 = {"F8_E4M3", "F8_E5M2"}
_ROLE_HINT: dict[Role, str] = {
    "dit": "pass it to --dit",
    "vae": "pass it to --vae",
    "text": "text encoders need a local folder that includes their tokenizer",
}


class MissingTensor(KeyError):
    """A tensor a config rule needs is absent: the file is not a complete model."""


class ShapeRuleError(ValueError):
    """The shapes do not determine a config; the message says what to pass."""


def shape(shapes: Shapes, name: str) -> tuple[int, ...]:
    """The shape of tensor `name` (diffusers name), for config rules."""
    if name not in shapes:
        raise MissingTensor(name)
    return shapes[name]


def count(shapes: Shapes, pattern: str) -> int:
    """How many distinct indices the first group of `pattern` takes (0 when none)."""
    found = {int(m.group(1)) for name in shapes if (m := re.match(pattern, name))}
    if found and found != set(range(len(found))):
        raise ShapeRuleError(f"indices of {pattern!r} are not contiguous: {sorted(found)}")
    return len(found)


# --- what a file holds ----------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointKind:
    """One kind of checkpoint, recognised by its key names (without any ComfyUI prefix)."""

    words: str
    """What it is, for messages ("a WAN transformer")."""
    role: Role | None
    """Which flag it belongs to (None: a model masktrain does not load at all)."""
    matches: Callable[[set[str]], bool] = field(compare=False)
    """Whether a file's (unprefixed) key names are this kind's."""


_SPECIFIC: list[CheckpointKind] = []
_FALLBACK: list[CheckpointKind] = []


def register_kinds(*kinds: CheckpointKind, fallback: bool = False) -> None:
    """Make `kinds` known to :meth:`CheckpointFile.expect`, in order: a kind whose keys are a
    superset of another's (WAN VACE of WAN) must come first. ``fallback`` kinds (loose rules,
    such as text encoders) are tried after every other."""
    target = _FALLBACK if fallback else _SPECIFIC
    target.extend(kind for kind in kinds if kind not in target)


def identify(names: list[str]) -> CheckpointKind | None:
    """The kind of checkpoint whose keys `names` are (any ComfyUI prefix is ignored), or None."""
    stripped = {_ANY_PREFIX.sub("", name) for name in names}
    return next((kind for kind in (*_SPECIFIC, *_FALLBACK) if kind.matches(stripped)), None)


def text_encoder_file_error(
    flag: str, path: Path | str, tokenizer_flag: str | None = None, hub_id: str | None = None
) -> ModelLoadError:
    """The error for a single-file text encoder without a tokenizer: none can be downloaded. With
    `tokenizer_flag` (the family reads such files), it says which tokenizer to fetch and where
    to pass it."""
    fetch = ""
    if tokenizer_flag is not None and hub_id is not None:
        fetch = (
            f"pass {tokenizer_flag} DIR, a folder with the tokenizer of {hub_id} (fetch it once, e.g. "
            f"`huggingface-cli download {hub_id} --local-dir DIR --include 'tokenizer*' 'spiece.model' "
            "'special_tokens_map.json'`), or "
        )
    return ModelLoadError(
        f"{flag} {path}: a single-file text encoder carries no tokenizer and nothing is downloaded; "
        f"{fetch}pass a local diffusers pipeline folder (text_encoder/ and tokenizer/) or a transformers "
        "folder that includes the tokenizer"
    )


# --- the file -------------------------------------------------------------------------------------


@dataclass
class CheckpointFile:
    """A safetensors checkpoint's header: key -> shape and dtype, and the prefix `select` chose.
    A diffusers folder's shards read as one checkpoint (``files`` says which shard holds a key).
    ComfyUI's fp8 scales are not listed among the tensors: ``scales`` maps a weight's key to its
    scale's key."""

    path: Path
    flag: str
    shapes: Shapes
    dtypes: dict[str, str]
    prefix: str = ""
    scales: dict[str, str] = field(default_factory=dict)
    scale_shapes: Shapes = field(default_factory=dict)
    """The shape of each weight's scale (by the weight's key)."""
    files: dict[str, Path] = field(default_factory=dict)

    def file_of(self, key: str) -> Path:
        return self.files.get(key, self.path)

    def error(self, what: str) -> ModelLoadError:
        return ModelLoadError(f"{self.flag} {self.path}: {what}")

    def select(self, prefixes: tuple[str, ...]) -> list[str]:
        """The keys of one component: those under the first prefix present, else all of them."""
        for prefix in prefixes:
            chosen = [k for k in self.shapes if k.startswith(prefix)]
            if chosen:
                self.prefix = prefix
                return chosen
        self.prefix = ""
        return list(self.shapes)

    def expect(self, names: list[str], *wanted: CheckpointKind) -> CheckpointKind:
        """The kind of `names` when it is one of `wanted`; otherwise an error that says what the
        file holds and which flag takes it."""
        kind = identify(names)
        if kind is not None and kind in wanted:
            return kind
        expected = " or ".join(w.words for w in wanted)
        if kind is None:
            raise self.error(
                f"holds an unrecognised checkpoint, expected {expected} "
                f"(first keys: {_first(sorted(self.shapes))})"
            )
        if kind.role is not None and kind.role == wanted[0].role:
            hint = "check --arch"
        else:
            hint = _ROLE_HINT[kind.role] if kind.role is not None else ""
        raise self.error(f"holds {kind.words}, expected {expected}" + (f"; {hint}" if hint else ""))

    def renamed_shapes(self, to_file: Mapping[str, str]) -> Shapes:
        """Shapes under the diffusers names of `to_file` (diffusers name -> file key)."""
        return {new: self.shapes[old] for new, old in to_file.items()}

    def infer(self, rule: ConfigRule, shapes: Shapes, overrides: Mapping[str, Any] | None) -> dict[str, Any]:
        """`rule`'s config for `shapes`, its failures as errors naming the file."""
        try:
            return rule(shapes, overrides)
        except MissingTensor as e:
            raise self.error(f"is not a complete checkpoint: tensor {e.args[0]!r} is missing") from None
        except ShapeRuleError as e:
            raise self.error(f"cannot infer the model config: {e}") from None


def open_checkpoint(path: Path, flag: str) -> CheckpointFile:
    """Read the header of a ``.safetensors`` checkpoint (no tensor data); errors name `flag`."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{flag} {path}: no such file")
    if path.suffix != ".safetensors":
        raise ModelLoadError(
            f"{flag} {path}: expected a .safetensors file (ComfyUI / original layout) or a local "
            "diffusers folder; pickled checkpoints (.pth, .ckpt, .bin) are not loaded"
        )
    return _open(path, flag, [path], "the file holds no tensors")


def open_folder(folder: Path, flag: str) -> CheckpointFile:
    """The headers of every ``.safetensors`` shard of a diffusers model folder, as one checkpoint."""
    return _open(folder, flag, sorted(folder.glob("*.safetensors")), "no .safetensors weights")


def _open(path: Path, flag: str, shards: list[Path], empty: str) -> CheckpointFile:
    file = CheckpointFile(path=path, flag=flag, shapes={}, dtypes={})
    for shard in shards:
        _read_header(file, shard)
    if not file.shapes:
        raise ModelLoadError(f"{flag} {path}: {empty}")
    _split_fp8_scales(file)
    return file


def _read_header(file: CheckpointFile, path: Path) -> None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                if key in file.shapes:
                    raise ModelLoadError(f"{file.flag} {path}: tensor {key!r} is also in {file.file_of(key)}")
                tensor = f.get_slice(key)
                file.shapes[key] = tuple(tensor.get_shape())
                file.dtypes[key] = tensor.get_dtype()
                if path != file.path:
                    file.files[key] = path
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelLoadError(f"{file.flag} {path}: cannot read the safetensors header ({e})") from None


def _split_fp8_scales(file: CheckpointFile) -> None:
    """Take ComfyUI's fp8 bookkeeping out of the tensor list: the ``scaled_fp8`` marker, each
    weight's scale (``.scale_weight``, or ``.weight_scale`` with a ``.comfy_quant`` format
    record), and input scales (the weights are dequantised, inputs never quantised)."""
    for key in list(file.shapes):
        base, _, suffix = key.rpartition(".")
        if key.endswith("scaled_fp8") or suffix in ("scale_input", "input_scale"):  # marker: under the prefix
            _drop(file, key)
        elif suffix in ("scale_weight", "weight_scale"):
            file.scales[f"{base}.weight"] = key
        elif suffix == "comfy_quant":
            quant = _comfy_quant_format(file, key)
            if quant not in ("float8_e4m3fn", "float8_e5m2"):
                raise file.error(
                    f"layer {base} is quantised as {quant!r}; only fp8 (float8_e4m3fn) checkpoints are "
                    "read: use an fp8 or a bf16 file"
                )
            _drop(file, key)
    for weight, scale in file.scales.items():
        if weight not in file.shapes or file.dtypes.get(weight) not in _FP8:
            raise file.error(f"holds the fp8 scale {scale!r} but no fp8 weight {weight!r}")
        file.scale_shapes[weight] = file.shapes[scale]
        _drop(file, scale)


def _drop(file: CheckpointFile, key: str) -> None:
    file.shapes.pop(key)
    file.dtypes.pop(key)


def _comfy_quant_format(file: CheckpointFile, key: str) -> str:
    import json

    from safetensors import safe_open

    with safe_open(file.file_of(key), framework="pt") as f:
        raw = bytes(f.get_tensor(key).to(torch.uint8).tolist())
    try:
        return str(json.loads(raw.decode("utf-8")).get("format"))
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        raise file.error(f"cannot read the quantisation record {key!r}") from None


def open_component(
    path: Path, flag: str, prefixes: tuple[str, ...], *wanted: CheckpointKind
) -> tuple[CheckpointFile, list[str]]:
    """The header of `path` and the keys of its component under `prefixes`, which must be one of
    the `wanted` kinds (:meth:`CheckpointFile.expect` says what it is otherwise)."""
    file = open_checkpoint(path, flag)
    names = file.select(prefixes)
    file.expect(names, *wanted)
    return file, names


def _first(keys: list[str], n: int = 5) -> str:
    shown = ", ".join(keys[:n])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > n else shown


def build(
    model_class: type[ModelMixin],
    config: dict[str, Any],
    file: CheckpointFile,
    to_file: dict[str, str],
    dtype: torch.dtype | None,
    fp8: Fp8Load | None = None,
) -> torch.nn.Module:
    """`model_class(**config)` on the meta device, then the file's tensors assigned to it; every
    key and shape is checked against the model before any tensor is read.

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
            parts.append(f"missing tensors {_first(missing)}")
        if unexpected:
            parts.append(f"unexpected tensors {_first([to_file[k] for k in unexpected])}")
        raise file.error(f"does not match {model_class.__name__}: {'; '.join(parts)}")
    for name, expected_shape in expected.items():
        if file.shapes[to_file[name]] != expected_shape:
            raise file.error(
                f"tensor {to_file[name]!r} has shape {list(file.shapes[to_file[name]])}, "
                f"{model_class.__name__} expects {list(expected_shape)}"
            )
    quantized = _swap_in_fp8_linears(model, file, to_file, fp8, dtype) if fp8 is not None else set()
    kept = sum(1 for name in quantized if file.dtypes[to_file[f"{name}.weight"]] in _FP8)
    if quantized:
        how = "as stored" if kept == len(quantized) else f"{fp8.mode if fp8 else ''} quantised while reading"
        logger.info("%d Linear layers in fp8 (%s)", len(quantized), how)
    elif any(d in _FP8 for d in file.dtypes.values()):
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
                if key in read:  # tied weights (T5's shared / embed_tokens): one tensor
                    state[name] = read[key]
                elif module_name in quantized and name.endswith(".weight"):
                    state[name], scale = _fp8_weight(f, file, key, fp8)
                    if scale is not None:
                        state[f"{module_name}.scale"] = scale
                    read_since_trim += math.prod(file.shapes[key]) * 4
                else:
                    state[name] = _plain_tensor(f, file, key, dtype)
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
) -> set[str]:
    """Replace the targeted (meta) Linear layers with :class:`Fp8Linear` shells whose scale
    shape is the file's (pre-quantised) or the mode's; returns their names."""
    names = set(target_linears(model, fp8.targets))
    for name in names:
        linear = model.get_submodule(name)
        assert isinstance(linear, torch.nn.Linear)
        key = to_file[f"{name}.weight"]
        if file.dtypes[key] in _FP8:
            scale_shape = None if key not in file.scales else _file_scale_shape(file, key, linear)
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
    """ComfyUI stores one scale per tensor (``[]`` or ``[1]``) or per output row (``[out]``)."""
    shape = file.scale_shapes[weight_key]
    if len(shape) <= 1 and math.prod(shape) == 1:
        return ()
    if shape in ((linear.out_features,), (linear.out_features, 1)):
        return (linear.out_features, 1)
    raise file.error(
        f"the fp8 scale {file.scales[weight_key]!r} has shape {list(shape)}; "
        "expected one per tensor or per row"
    )


def _fp8_weight(
    f: Any, file: CheckpointFile, key: str, fp8: Fp8Load | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    assert fp8 is not None
    tensor = f.get_tensor(key)
    if file.dtypes[key] not in _FP8:
        return quantize(tensor, fp8.mode)
    scale_key = file.scales.get(key)
    if tensor.dtype != FP8:  # e5m2: its 2 mantissa bits fit e4m3's 3; out-of-range values clamp or flush
        tensor = tensor.float().clamp(-FP8_MAX, FP8_MAX).to(FP8)
    if scale_key is None:
        return _aligned(tensor), None
    scale = f.get_tensor(scale_key).float()
    scale = scale.reshape(()) if scale.numel() == 1 else scale.reshape(-1, 1)
    return _aligned(tensor), scale


def _plain_tensor(f: Any, file: CheckpointFile, key: str, dtype: torch.dtype | None) -> torch.Tensor:
    tensor = f.get_tensor(key)
    if tensor.is_floating_point():
        if file.dtypes[key] in _FP8:
            scale_key = file.scales.get(key)
            scale = None if scale_key is None else f.get_tensor(scale_key).float()
            if scale is not None and scale.numel() > 1:
                scale = scale.reshape(-1, *([1] * (tensor.ndim - 1)))
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


def _aligned(tensor: torch.Tensor) -> torch.Tensor:
    # safetensors hands out tensors at the file's 8-byte alignment, and CPU kernels take other
    # paths on unaligned memory (the last bit of results differs): own copy.
    return tensor.clone() if tensor.data_ptr() % 64 else tensor
