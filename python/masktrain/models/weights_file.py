"""What one ``.safetensors`` weights file holds, read from its header alone (no tensor data): every
key, shape and dtype, which component and which kind of model the keys are, and ComfyUI's fp8
scale bookkeeping. Building a model from such a file is ``single_file.py``'s part.

:func:`open_checkpoint` reads one file's header, :func:`open_folder` a diffusers folder's shards
as one; :meth:`CheckpointFile.select` picks one component's keys (ComfyUI prefixes them with
``model.diffusion_model.``; a file may bundle several components); :meth:`CheckpointFile.expect`
checks the file holds what the family reads, and otherwise names what it does hold (``holds a
Qwen-Image transformer, expected a WAN transformer; check --arch``); :func:`open_component` does
the three in turn. :meth:`CheckpointFile.infer` runs a family's config rule on the shapes, whose
helpers :func:`shape` and :func:`count` raise ``MissingTensor`` / ``ShapeRuleError``; ``infer``
turns them into errors naming the file.

What a file holds is told by :class:`CheckpointKind` records, which each family registers
(:func:`register_kinds`) for its own checkpoints, including variants masktrain does not train
(WAN VACE, say), so a user who passes one is told what it is.

ComfyUI's fp8 files carry a scale per weight (``.scale_weight``, or ``.weight_scale`` with a
``.comfy_quant`` record) and markers; they are taken out of the tensor list when the header is
read (``CheckpointFile.scales`` maps a weight's key to its scale's key). Other quantisations are
refused by name: a ``comfy_quant`` format other than fp8 here, and weights stored as integers or
booleans (int8, ...) by :meth:`CheckpointFile.check_dtypes`, before any tensor is read; so is an fp8
scale of a shape that is neither per tensor nor per row (:meth:`CheckpointFile.scale_shape`).

Text encoders are never single files on their own: ComfyUI's carry no tokenizer, and tokenizers
cannot be downloaded (:func:`text_encoder_file_error`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from masktrain.errors import MissingTensor, ModelLoadError, ShapeRuleError

Shapes = dict[str, tuple[int, ...]]
#: A family's rule from (diffusers-named) shapes and caller overrides to a diffusers config.
ConfigRule = Callable[[Shapes, Mapping[str, Any] | None], dict[str, Any]]
Role = Literal["dit", "vae", "text", "clip"]

# ComfyUI checkpoints prefix each component; a file may bundle several of them.
DIT_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
VAE_PREFIXES = ("first_stage_model.", "vae.")
_ANY_PREFIX = re.compile(r"^(model\.diffusion_model\.|diffusion_model\.|first_stage_model\.|vae\.)")
_FP8 = {"F8_E4M3", "F8_E5M2"}  # safetensors' names of the fp8 dtypes
_FLOAT = {"F16", "BF16", "F32", "F64"}
#: safetensors' dtype names, as messages spell them.
_DTYPE_WORDS = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "U16": "uint16",
    "I16": "int16",
    "U32": "uint32",
    "I32": "int32",
    "U64": "uint64",
    "I64": "int64",
}
_ROLE_HINT: dict[Role, str] = {
    "dit": "pass it to --dit",
    "vae": "pass it to --vae",
    "text": "text encoders need a local folder that includes their tokenizer",
    "clip": "pass it to --clip",
}


# --- config rules' helpers ------------------------------------------------------------------------


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


# --- kinds of checkpoint --------------------------------------------------------------------------


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


# --- the header -----------------------------------------------------------------------------------


@dataclass
class CheckpointFile:
    """A safetensors checkpoint's header: key -> shape and dtype, and the prefix `select` chose.
    A diffusers folder's shards read as one checkpoint (``files`` says which shard holds a key).
    ComfyUI's fp8 scales are not listed among the tensors (``dtypes`` keeps theirs): ``scales``
    maps a weight's key to its scale's key."""

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

    def is_fp8(self, key: str) -> bool:
        """Whether tensor `key` is stored in an fp8 dtype."""
        return self.dtypes.get(key) in _FP8

    def is_float(self, key: str) -> bool:
        """Whether tensor `key` is stored as floats masktrain reads (16/32/64-bit or fp8)."""
        return self.dtypes.get(key) in _FLOAT | _FP8

    def error(self, what: str) -> ModelLoadError:
        return ModelLoadError(f"{self.flag} {self.path}: {what}")

    def check_dtypes(self, keys: list[str]) -> None:
        """Tensors `keys` (those a model reads as floats) must be stored as floats or fp8; integer
        or boolean weights (int8 quantisations, ...) are refused by name, from the header alone."""
        refused = [key for key in keys if not self.is_float(key)]
        if refused:
            kinds = sorted({_DTYPE_WORDS.get(self.dtypes[key], self.dtypes[key]) for key in refused})
            raise self.error(
                f"holds {' and '.join(kinds)} weights ({abbreviated(refused, 3)}); masktrain reads float and "
                "fp8 checkpoints (float32, bf16, fp16, float8_e4m3fn, float8_e5m2): use such a file"
            )

    def scale_shape(self, weight_key: str) -> tuple[int, ...]:
        """The shape the fp8 scale of `weight_key` is used in: ``()`` for one per tensor (``[]`` or
        ``[1]`` in ComfyUI's files), ``(rows, 1)`` for one per output row (``[rows]`` or ``[rows,
        1]``); any other shape, or a scale not stored as floats, is an error naming it."""
        scale_key = self.scales[weight_key]
        shape = self.scale_shapes[weight_key]
        if self.dtypes.get(scale_key) not in _FLOAT:
            kind = _DTYPE_WORDS.get(self.dtypes.get(scale_key, ""), self.dtypes.get(scale_key))
            raise self.error(
                f"the fp8 scale {scale_key!r} is stored as {kind}; expected float32, bf16 or fp16"
            )
        if len(shape) <= 1 and math.prod(shape) == 1:
            return ()
        rows = self.shapes[weight_key][0] if self.shapes[weight_key] else 0
        if shape in ((rows,), (rows, 1)):
            return (rows, 1)
        raise self.error(
            f"the fp8 scale {scale_key!r} has shape {list(shape)}; expected one per tensor or per row"
        )

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
                f"(first keys: {abbreviated(sorted(self.shapes))})"
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
        if weight not in file.shapes or not file.is_fp8(weight):
            raise file.error(f"holds the fp8 scale {scale!r} but no fp8 weight {weight!r}")
        file.scale_shapes[weight] = file.shapes[scale]
        file.shapes.pop(scale)  # its dtype stays, for scale_shape's check


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


def abbreviated(keys: list[str], n: int = 5) -> str:
    """The first `n` of `keys` and how many there are, for messages."""
    shown = ", ".join(keys[:n])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > n else shown
