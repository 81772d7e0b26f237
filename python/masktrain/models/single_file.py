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
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from masktrain.errors import ModelLoadError

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


def text_encoder_file_error(flag: str, path: Path | str) -> ModelLoadError:
    """The error for a single-file text encoder: it has no tokenizer and none can be downloaded."""
    return ModelLoadError(
        f"{flag} {path}: a single-file text encoder carries no tokenizer and nothing is downloaded; "
        "pass a local diffusers pipeline folder (text_encoder/ and tokenizer/) or a transformers "
        "folder that includes the tokenizer"
    )


# --- the file -------------------------------------------------------------------------------------


@dataclass
class CheckpointFile:
    """A safetensors file's header: key -> shape and dtype, and the prefix `select` chose."""

    path: Path
    flag: str
    shapes: Shapes
    dtypes: dict[str, str]
    prefix: str = ""

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
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{flag} {path}: no such file")
    if path.suffix != ".safetensors":
        raise ModelLoadError(
            f"{flag} {path}: expected a .safetensors file (ComfyUI / original layout) or a local "
            "diffusers folder; pickled checkpoints (.pth, .ckpt, .bin) are not loaded"
        )
    shapes: Shapes = {}
    dtypes: dict[str, str] = {}
    try:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                tensor = f.get_slice(key)
                shapes[key] = tuple(tensor.get_shape())
                dtypes[key] = tensor.get_dtype()
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelLoadError(f"{flag} {path}: cannot read the safetensors header ({e})") from None
    if not shapes:
        raise ModelLoadError(f"{flag} {path}: the file holds no tensors")
    if any(k.endswith(("scaled_fp8", ".scale_weight", ".weight_scale")) for k in shapes):
        raise ModelLoadError(
            f"{flag} {path}: scaled fp8 checkpoints are not supported; use a bf16 or fp16 file"
        )
    return CheckpointFile(path=path, flag=flag, shapes=shapes, dtypes=dtypes)


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
) -> torch.nn.Module:
    """`model_class(**config)` on the meta device, then the file's tensors assigned to it; every
    key and shape is checked against the model before any tensor is read."""
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
    state: dict[str, torch.Tensor] = {}
    with safe_open(file.path, framework="pt") as f:
        for name, key in to_file.items():
            tensor = f.get_tensor(key)
            if tensor.is_floating_point():
                if dtype is not None:
                    tensor = tensor.to(dtype)
                elif file.dtypes[key] in _FP8:
                    tensor = tensor.to(torch.bfloat16)  # fp8 cannot run as is; bf16 holds it exactly
            if tensor.data_ptr() % 64:
                # safetensors hands out tensors at the file's 8-byte alignment, and CPU kernels take
                # other paths on unaligned memory (the last bit of results differs): own copy.
                tensor = tensor.clone()
            state[name] = tensor
    model.load_state_dict(state, strict=True, assign=True)
    logger.info("loaded %s from %s (%d tensors)", model_class.__name__, file.path, len(state))
    return model.eval()
