"""The LoRA file: what ``train`` writes, ``sample`` and ``convert-lora`` read, and ComfyUI,
diffusers and musubi-tuner load. It is to LoRAs what ``data/cache_format.py`` is to caches.

A ``.safetensors`` file in one of three layouts, from peft-named tensors
(``blocks.0.attn1.to_q.lora_A.weight``):

- ``comfyui``: ``diffusion_model.<original module path>.lora_A.weight`` / ``.lora_B.weight`` and
  ``.alpha`` (a float32 scalar; ComfyUI scales by alpha / rank and assumes 1.0 without it); where
  the original checkpoint fuses layers diffusers keeps apart (FLUX.2's ``img_attn.qkv``: the
  family's ``comfy_parts``), their LoRAs are one, A stacked and B block-diagonal, read back apart;
- ``diffusers``: what ``WanPipeline.save_lora_weights`` / ``QwenImagePipeline.save_lora_weights``
  write (``transformer.<name>.lora_A.weight`` plus the peft config under
  ``lora_adapter_metadata``), so ``pipe.load_lora_weights(path)`` rebuilds the same adapter;
- ``musubi``: ``lora_unet_<original module path, dots as _>.lora_down.weight`` /
  ``.lora_up.weight`` / ``.alpha``, what musubi-tuner's and blissful-tuner's scripts load.

Every file masktrain writes carries ``masktrain.arch`` / ``.rank`` / ``.alpha`` / ``.version`` /
``.layout`` and the caller's string metadata (the training flags, the step; with
``--lora_per_expert`` the WAN 2.2 expert, ``masktrain.expert``, whose LoRA it is: one file per
expert, ``NAME_high_noise`` and ``NAME_low_noise``, :func:`lora_file_name`). A file another
trainer wrote is read off its keys (:func:`file_header`): the family from musubi's
``ss_network_module`` or the layer names the catalog lists for each family
(``ArchSpec.lora_layer_hints``), the rank from the down matrices, alpha from the ``.alpha``
tensors. Every file is checked before it is used or converted: finite values (a LoRA that diverged
gives black samples), one rank that agrees with the metadata, metadata that parses, one alpha;
each refusal is one line naming the file and the key.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from masktrain import catalog
from masktrain.config.train import LORA_FORMATS, LoraLayout
from masktrain.errors import LoraFileError, LoraTargetError
from masktrain.models.base import ModelFamily

LAYOUTS = LORA_FORMATS
COMFY_PREFIX = "diffusion_model."
MUSUBI_PREFIX = "lora_unet_"
#: musubi-tuner's names of the two LoRA matrices (peft's lora_A / lora_B).
MUSUBI_MATRICES = {"A": "lora_down", "B": "lora_up"}
DIFFUSERS_PREFIX = "transformer."
#: diffusers' ``LORA_ADAPTER_METADATA_KEY``: the peft config that ``load_lora_weights`` rebuilds.
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
META_ARCH = "masktrain.arch"
META_RANK = "masktrain.rank"
META_ALPHA = "masktrain.alpha"
META_VERSION = "masktrain.version"
META_LAYOUT = "masktrain.layout"
META_STEP = "masktrain.step"
"""The optimizer step a training run saved the file at (``masktrain sample`` names samples by it)."""
META_EXPERT = "masktrain.expert"
"""``--lora_per_expert``: the WAN 2.2 expert the LoRA was trained for, one of :data:`EXPERT_LORAS`."""
EXPERT_LORAS = ("high_noise", "low_noise")
"""The two experts' LoRAs, named as ComfyUI workflows and other trainers name them: the suffix of
each file (``NAME_high_noise.safetensors``) and its :data:`META_EXPERT`."""
RESERVED = frozenset({META_ARCH, META_RANK, META_ALPHA, META_VERSION, META_LAYOUT, "format"})
"""Metadata keys masktrain writes itself; a caller's metadata may not set them."""


def lora_file_name(output_name: str, expert: str = "") -> str:
    """``NAME.safetensors``, or one expert's LoRA (`expert` one of :data:`EXPERT_LORAS`):
    ``NAME_high_noise.safetensors``."""
    return f"{output_name}_{expert}.safetensors" if expert else f"{output_name}.safetensors"


def expert_twin(path: Path) -> tuple[str, Path] | None:
    """For one of a pair of per-expert LoRA files (``NAME_low_noise.safetensors``): its expert and
    the other file's path (``NAME_high_noise.safetensors``); None for any other name."""
    for expert, other in zip(EXPERT_LORAS, reversed(EXPERT_LORAS), strict=True):
        suffix = f"_{expert}{path.suffix}"
        if path.name.endswith(suffix):
            return expert, path.with_name(path.name.removesuffix(suffix) + f"_{other}{path.suffix}")
    return None


def read_lora_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a LoRA file, or a :class:`LoraFileError` naming it. A layer the
    original checkpoint fuses (FLUX.2's ``img_attn.qkv``) comes back as its diffusers layers
    (:func:`unfused`), so everything after reading sees one rank and one alpha."""
    try:
        tensors = safetensors.torch.load_file(path)
        with safetensors.safe_open(path, "pt") as handle:
            metadata = handle.metadata() or {}
    except (safetensors.SafetensorError, OSError) as error:
        raise LoraFileError(f"{path}: not a readable safetensors file ({error})") from error
    arch = file_arch(tensors, metadata)
    if arch is not None and arch in catalog.ARCHES:
        from masktrain.models import get_family

        tensors = unfused(tensors, get_family(arch))
    return tensors, dict(metadata)


def state_file_bytes(
    state: Mapping[str, torch.Tensor],
    family: ModelFamily,
    *,
    rank: int,
    alpha: float,
    layout: LoraLayout,
    metadata: Mapping[str, str] | None = None,
    adapter: dict[str, object] | None = None,
) -> bytes:
    """A LoRA file's bytes from peft-named tensors (``blocks.0.attn1.to_q.lora_A.weight``) in
    `layout` (see the module docstring); `adapter` is the peft config for the diffusers layout
    (built from rank and alpha when None)."""
    from masktrain import __version__

    if layout not in LAYOUTS:
        raise ValueError(f"LoRA layout {layout!r} is not one of {', '.join(LAYOUTS)}")
    header = {
        "format": "pt",
        META_ARCH: family.name,
        META_RANK: str(rank),
        META_ALPHA: repr(float(alpha)),
        META_VERSION: __version__,
        META_LAYOUT: layout,
    }
    extra = dict(metadata or {})
    clash = sorted(set(extra) & set(header))
    if clash:
        raise ValueError(f"LoRA metadata keys {clash} are reserved for masktrain")
    bad = sorted(k for k, v in extra.items() if not isinstance(k, str) or not isinstance(v, str))
    if bad:
        raise TypeError(f"LoRA metadata must map str to str; not so for {bad}")
    header.update(extra)
    if layout in ("comfyui", "musubi"):
        tensors = _per_layer(state, family, alpha, layout)
    else:
        tensors = {DIFFUSERS_PREFIX + key: value for key, value in state.items()}
        if adapter is None:
            from peft import LoraConfig

            adapter = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=True).to_dict()  # type: ignore[arg-type,no-untyped-call]
        adapter = dict(adapter)
        # The exact module names, not the suffix set peft compresses them to: a suffix such as
        # "2" would also put (empty) LoRA on other layers when loaded into a larger variant.
        adapter["target_modules"] = sorted({key.rpartition(".lora_")[0] for key in state})
        header[DIFFUSERS_METADATA_KEY] = _diffusers_adapter_metadata(adapter)
    return safetensors.torch.save(dict(tensors), metadata=header)


def file_arch(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> str | None:
    """The family a LoRA file says it is for: masktrain's metadata, musubi's ``ss_network_module``,
    or the layer names of exactly one family (``ArchSpec.lora_layer_hints``); None when it does
    not tell."""
    if META_ARCH in metadata:
        return metadata[META_ARCH]
    module = metadata.get("ss_network_module")
    for spec in catalog.ARCHES.values():
        if module is not None and module == spec.musubi_network_module:
            return spec.name
    # musubi's names spell the module path with "_" where ComfyUI's and diffusers' have ".": compare
    # the hints with both as one
    keys = {key.replace("_", ".") for key in tensors}
    named = [
        spec.name
        for spec in catalog.ARCHES.values()
        if any(hint.replace("_", ".") in key for key in keys for hint in spec.lora_layer_hints)
    ]
    return named[0] if len(named) == 1 else None


def file_header(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], path: Path, arch: str | None = None
) -> tuple[str, int, float]:
    """(arch, rank, alpha) of a LoRA file, checked: masktrain's metadata, else read off the file as
    musubi-tuner and ComfyUI read it: the arch from :func:`file_arch`, else `arch` (the caller's
    ``--arch``); the rank from the down matrices; alpha from the per-layer ``.alpha`` tensors, or
    the rank when there are none (a scale of 1, as ComfyUI assumes). Refused with a
    :class:`LoraFileError` naming the file and the layer or key: a tensor with a NaN or an
    infinity (a LoRA that diverged: its samples come out black), metadata that is not a number or
    whose rank disagrees with the matrices, and per-layer ranks or alphas that differ (masktrain's
    adapters have one of each)."""
    check_values(tensors, path)
    rank = _matrix_rank(tensors, path)
    if all(key in metadata for key in (META_ARCH, META_RANK, META_ALPHA)):
        stated = _metadata_rank(metadata, path)
        if stated != rank:
            key = next(k for k in sorted(tensors) if k.endswith(_DOWN))
            raise LoraFileError(
                f"{path}: its metadata says {META_RANK} = {stated}, but {key} has rank {rank} (shape "
                f"{list(tensors[key].shape)}); the metadata disagrees with the matrices: a damaged or "
                "edited file"
            )
        return metadata[META_ARCH], rank, _metadata_alpha(metadata, path)
    found = file_arch(tensors, metadata) or arch
    if found is None:
        raise LoraFileError(f"{path}: no masktrain metadata and no known layer names; pass --arch")
    alphas = {round(float(v), 6) for k, v in tensors.items() if k.endswith(".alpha")}
    if len(alphas) > 1:
        raise LoraFileError(
            f"{path}: layers with different alphas {sorted(alphas)}; masktrain reads one alpha"
        )
    return found, rank, alphas.pop() if alphas else float(rank)


_DOWN = (".lora_A.weight", ".lora_down.weight")
_UP = (".lora_B.weight", ".lora_up.weight")


def check_values(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    """Refuse a file with a NaN or an infinity in a matrix or an ``.alpha``, naming the key."""
    for key in sorted(tensors):
        value = tensors[key]
        if value.is_floating_point() and not bool(torch.isfinite(value.to(torch.float32)).all()):
            raise LoraFileError(
                f"{path}: {key} holds non-finite values (NaN or infinity); the LoRA is damaged or its "
                "training diverged: use an earlier checkpoint"
            )


def _matrix_rank(tensors: Mapping[str, torch.Tensor], path: Path) -> int:
    """The one rank of the file's matrices: the rows of every down (A) matrix, the columns of every
    up (B) matrix."""
    down = {int(v.shape[0]) for k, v in tensors.items() if k.endswith(_DOWN) and v.dim() == 2}
    if len(down) != 1:
        raise LoraFileError(
            f"{path}: {'no LoRA matrices' if not down else f'layers of different ranks {sorted(down)}'}; "
            "masktrain reads LoRAs of one rank"
        )
    rank = next(iter(down))
    for key in sorted(tensors):
        value = tensors[key]
        side = 0 if key.endswith(_DOWN) else 1
        if key.endswith(_DOWN + _UP) and (value.dim() != 2 or value.shape[side] != rank):
            raise LoraFileError(
                f"{path}: {key} has shape {list(value.shape)}, not a rank-{rank} LoRA matrix like the "
                "file's others; masktrain reads LoRAs of one rank"
            )
    return rank


def _metadata_rank(metadata: Mapping[str, str], path: Path) -> int:
    raw = metadata[META_RANK]
    if not (raw.isascii() and raw.strip().isdigit() and int(raw) >= 1):
        raise LoraFileError(
            f"{path}: its metadata {META_RANK} = {raw!r} is not a whole number >= 1; a damaged file"
        )
    return int(raw)


def _metadata_alpha(metadata: Mapping[str, str], path: Path) -> float:
    raw = metadata[META_ALPHA]
    try:
        alpha = float(raw)
    except ValueError:
        alpha = math.nan
    if not math.isfinite(alpha):
        raise LoraFileError(
            f"{path}: its metadata {META_ALPHA} = {raw!r} is not a finite number; a damaged file"
        )
    return alpha


def check_family(arch: str, family: ModelFamily, path: Path) -> None:
    """A file trained for another family is named as such (not as layers that do not fit)."""
    if arch != family.name:
        raise LoraFileError(f"{path}: this LoRA was trained for {arch}; --arch is {family.name}")


def check_file(path: Path, family: ModelFamily) -> None:
    """What a LoRA file's own bytes tell, checked before any model loads (``masktrain sample``):
    readable, finite, one rank and alpha that agree with its metadata (:func:`file_header`), and
    trained for `family` (:func:`check_family`). Whether its matrices fit the transformer is known
    once that loads (``denoiser.lora.load_lora_into``)."""
    tensors, metadata = read_lora_file(path)
    arch, _, _ = file_header(tensors, metadata, path, family.name)
    check_family(arch, family, path)


def layout_of(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> str:
    """The layout of a file: masktrain's metadata, else by its keys."""
    if META_LAYOUT in metadata:
        return metadata[META_LAYOUT]
    if all(key.startswith(MUSUBI_PREFIX) for key in tensors):
        return "musubi"
    if all(key.startswith(DIFFUSERS_PREFIX) for key in tensors):
        return "diffusers"
    return "comfyui"


def peft_state(
    tensors: Mapping[str, torch.Tensor],
    resolve: Callable[[str], str | None],
    family: ModelFamily,
    path: Path,
) -> dict[str, torch.Tensor]:
    """A LoRA file's tensors in any of the three layouts under peft's names
    (``blocks.0.attn1.to_q.lora_A.weight``); `resolve` maps a ComfyUI path or a musubi name to
    the diffusers module name. Per-layer ``.alpha`` tensors are skipped: masktrain's files hold
    one alpha, in their metadata."""
    if all(key.startswith(DIFFUSERS_PREFIX) for key in tensors):
        return {key.removeprefix(DIFFUSERS_PREFIX): value for key, value in tensors.items()}
    matrices = {musubi: peft for peft, musubi in MUSUBI_MATRICES.items()}
    state = {}
    for key, value in tensors.items():
        if key.endswith(".alpha"):
            continue
        if key.startswith(DIFFUSERS_PREFIX):  # a fused layer's part (unfused)
            state[key.removeprefix(DIFFUSERS_PREFIX)] = value
            continue
        if key.startswith(COMFY_PREFIX):
            base, _, suffix = key.removeprefix(COMFY_PREFIX).rpartition(".lora_")  # "A.weight"
        elif key.startswith(MUSUBI_PREFIX):
            base, matrix, rest = key.removeprefix(MUSUBI_PREFIX).split(".", 2)
            suffix = f"{matrices.get(matrix, matrix)}.{rest}"
        else:
            raise LoraFileError(
                f"{path}: {key} is not in the {COMFY_PREFIX}..., {DIFFUSERS_PREFIX}... or "
                f"{MUSUBI_PREFIX}... layout"
            )
        name = resolve(base)
        if name is None or suffix.split(".")[0] not in MUSUBI_MATRICES:
            raise LoraFileError(f"{path}: {key} names no Linear layer of a {family.name} transformer")
        state[f"{name}.lora_{suffix}"] = value
    return state


def _per_layer(
    state: Mapping[str, torch.Tensor], family: ModelFamily, alpha: float, layout: LoraLayout
) -> dict[str, torch.Tensor]:
    """peft-named tensors in a per-layer layout, each layer with its ``.alpha``: ComfyUI's
    (``diffusion_model.<original path>.lora_A.weight``) or musubi's
    (``lora_unet_<original path, dots as _>.lora_down.weight``)."""
    tensors: dict[str, torch.Tensor] = {}
    for original, (matrices, parts) in _by_original(state, family).items():
        musubi = layout == "musubi"
        base = MUSUBI_PREFIX + original.replace(".", "_") if musubi else COMFY_PREFIX + original
        for matrix, value in matrices.items():  # "A", "B"
            tensors[f"{base}.{MUSUBI_MATRICES[matrix] if musubi else 'lora_' + matrix}.weight"] = value
        # a fused layer's rank is the parts' ranks together: alpha grows with it (alpha / rank kept)
        tensors[f"{base}.alpha"] = torch.tensor(alpha * parts, dtype=torch.float32)
    return tensors


def _by_original(
    state: Mapping[str, torch.Tensor], family: ModelFamily
) -> dict[str, tuple[dict[str, torch.Tensor], int]]:
    """peft-named tensors by the original (ComfyUI) layer name: its A and B matrices and the
    count of diffusers layers they stand for. The layers an original layer fuses (q, k, v) become
    one LoRA: the A matrices stacked (rank = the sum of theirs), B block-diagonal, so each part's
    output rows see only its own A rows: the same update, exactly."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        module, _, suffix = key.rpartition(".lora_")  # "blocks.0.attn1.to_q", "A.weight"
        modules.setdefault(module, {})[suffix.partition(".")[0]] = value
    grouped: dict[str, tuple[dict[str, torch.Tensor], int]] = {}
    for module, matrices in modules.items():
        original = family.comfy_key(module)
        parts = _fused_parts(family, original)
        if not parts:
            grouped[original] = (matrices, 1)
            continue
        if original in grouped:
            continue
        missing = [part for part in parts if part not in modules]
        if missing:
            raise LoraTargetError(
                f"{original} fuses {', '.join(parts)} in the original checkpoint, but the LoRA has no "
                f"{', '.join(missing)}: train all of them, or save with --lora_format diffusers"
            )
        a = torch.cat([modules[part]["A"] for part in parts])
        b = torch.block_diag(*(modules[part]["B"] for part in parts))  # type: ignore[no-untyped-call]  # torch leaves it unannotated
        grouped[original] = ({"A": a, "B": b}, len(parts))
    return grouped


def _fused_parts(family: ModelFamily, original: str) -> tuple[str, ...]:
    """The diffusers layers the original checkpoint's layer `original` (a ComfyUI path or a musubi
    name) fuses, in its output order; () for a layer kept one to one."""
    return tuple(family.comfy_parts(original))


def unfused(tensors: Mapping[str, torch.Tensor], family: ModelFamily) -> dict[str, torch.Tensor]:
    """`tensors` with each fused layer's LoRA (``diffusion_model.double_blocks.0.img_attn.qkv``,
    ``lora_unet_double_blocks_0_img_attn_qkv``) split into its diffusers layers
    (``transformer.transformer_blocks.0.attn.to_q``...): each part keeps its rows of B with all of
    A, the same update exactly; where B is block-diagonal (what masktrain and musubi's converters
    write) each part keeps only its own A rows and B columns, and alpha shrinks with the rank."""
    pairs = {  # the fused layers with both matrices: their A keys by layer
        base: key
        for key in tensors
        for base, matrix in [_layer_and_matrix(key)]
        if base is not None and matrix == "A" and _up_key(key) in tensors and _fused_parts(family, base)
    }
    split: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        base, _ = _layer_and_matrix(key)
        if base not in pairs:  # kept one to one (an unpaired fused matrix is named by later checks)
            split[key] = value
        elif key == pairs[base]:
            split.update(_split_pair(tensors, key, _fused_parts(family, base)))
    return split


def _split_pair(
    tensors: Mapping[str, torch.Tensor], down: str, parts: tuple[str, ...]
) -> dict[str, torch.Tensor]:
    """The fused LoRA whose A is `down` as one LoRA per part, diffusers-named (:func:`unfused`)."""
    a, b = tensors[down], tensors[_up_key(down)]
    alpha = tensors.get(f"{down.split('.lora_')[0]}.alpha")
    outs, rank = b.shape[0] // len(parts), a.shape[0] // len(parts)
    split: dict[str, torch.Tensor] = {}
    for index, part in enumerate(parts):
        rows = b[index * outs : (index + 1) * outs]
        own = slice(index * rank, (index + 1) * rank)
        mine = rank * len(parts) == a.shape[0] and not rows[:, _others(own, a.shape[0])].any()
        part_a, part_b = (a[own], rows[:, own]) if mine else (a, rows)
        split[f"{DIFFUSERS_PREFIX}{part}.lora_A.weight"] = part_a.contiguous()
        split[f"{DIFFUSERS_PREFIX}{part}.lora_B.weight"] = part_b.contiguous()
        if alpha is not None:
            split[f"{DIFFUSERS_PREFIX}{part}.alpha"] = alpha / len(parts) if mine else alpha
    return split


def _layer_and_matrix(key: str) -> tuple[str | None, str | None]:
    """(original layer name, "A" / "B") of a ComfyUI or musubi LoRA key; (None, None) otherwise."""
    if key.startswith(COMFY_PREFIX) and ".lora_" in key:
        base, _, suffix = key.removeprefix(COMFY_PREFIX).rpartition(".lora_")
        return base, suffix.partition(".")[0]
    if key.startswith(MUSUBI_PREFIX) and not key.endswith(".alpha"):
        base, _, rest = key.removeprefix(MUSUBI_PREFIX).partition(".")
        return base, {"lora_down": "A", "lora_up": "B"}.get(rest.partition(".")[0])
    if key.endswith(".alpha"):
        return key.removeprefix(COMFY_PREFIX).removeprefix(MUSUBI_PREFIX).removesuffix(".alpha"), "alpha"
    return None, None


def _up_key(key: str) -> str:
    """The B key of an A key (either layout)."""
    if key.startswith(MUSUBI_PREFIX):
        return key.replace(".lora_down.", ".lora_up.")
    return key.replace(".lora_A.", ".lora_B.")


def _others(own: slice, total: int) -> torch.Tensor:
    """The column indices outside `own`."""
    keep = torch.ones(total, dtype=torch.bool)
    keep[own] = False
    return keep


def _diffusers_adapter_metadata(config: dict[str, object]) -> str:
    """The peft config as diffusers' ``_save_lora_weights`` stores it: keys prefixed with
    ``transformer.``, sets as lists, JSON with indent 2 and sorted keys."""
    packed = {
        DIFFUSERS_PREFIX + key: sorted(value) if isinstance(value, set) else value
        for key, value in config.items()
    }
    return json.dumps(packed, indent=2, sort_keys=True)
