"""Loading a model from the value of a weights flag: ``tiny`` (the built-in tiny model, random
weights from a fixed seed), a local diffusers folder (the component, or a pipeline folder holding
it), or one ``.safetensors`` file (the families read those through ``weights_file`` and
``single_file``). Nothing is ever downloaded. Also the latent normalisation every family's VAE uses.

Every family loads in one order, written once here: :func:`vae`, :func:`text_encoder` and
:func:`transformer` try the tiny model, then one file (a text encoder's tokenizer folder first, so
a missing one costs no read of the file), then a folder, and quantise to fp8 last. A family passes
its pieces (classes, tiny configs, file readers, fp8 targets) and keeps nothing of the order.
:func:`transformer_config` reads a denoiser's config in the same order without loading it (the
tiny config, a file's header, a folder's ``config.json``), so what it takes is known first.

A denoiser whose weights hold NaN or infinity is refused naming the tensor: a file's as each
tensor is read (``single_file.build``), a folder's right after it loads."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from masktrain.config.memory import Fp8Mode
from masktrain.errors import ModelLoadError
from masktrain.models.base import TextEncoder
from masktrain.models.fp8 import FP8_DTYPES, Fp8Targets, quantize_model
from masktrain.models.single_file import Fp8Load, build
from masktrain.models.tokenizer import tiny_tokenizer
from masktrain.models.weights_file import open_folder, text_encoder_file_error

if TYPE_CHECKING:
    from diffusers import AutoencoderKLQwenImage, AutoencoderKLWan
    from diffusers.models.modeling_utils import ModelMixin
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from masktrain.catalog import ArchSpec

TINY = "tiny"
"""The flag value that selects a family's built-in tiny model."""
_NONE: Mapping[str, Any] = MappingProxyType({})

T = TypeVar("T")

#: A family's reader of one ``.safetensors`` file: (path, flag, dtype or None, fp8 or None) -> model.
FileLoader = Callable[[Path, str, "torch.dtype | None", "Fp8Load | None"], torch.nn.Module]
#: A family's reader of one VAE ``.safetensors`` file: (path, flag, dtype or None) -> model.
VaeFileLoader = Callable[[Path, str, "torch.dtype | None"], torch.nn.Module]


def model_path(spec: str, flag: str) -> Path:
    """The path `spec` names (``~`` expanded); a ``~user`` this machine lacks is one line."""
    try:
        return Path(spec).expanduser()
    except RuntimeError:  # ~user of a user this machine does not have, or no home folder
        raise ModelLoadError(
            f"{flag} {spec}: {spec.split('/')[0]} names no home folder on this machine; write the full path"
        ) from None


def diffusers_folder(spec: str, flag: str, subfolder: str) -> tuple[Path, str | None]:
    """A diffusers model folder, either the component itself (``config.json`` inside) or a
    pipeline folder holding it as ``subfolder``, with its weights in safetensors: pickled
    weights (``.bin``, ``.pt``) are never loaded, since loading one runs code."""
    path = model_path(spec, flag)
    if not path.exists():
        raise ModelLoadError(f"{flag} {spec}: no such file or directory")
    if not path.is_dir():
        raise ModelLoadError(f"{flag} {spec}: expected 'tiny', a diffusers folder or a .safetensors file")
    if (path / "config.json").is_file():
        found: tuple[Path, str | None] = (path, None)
    elif (path / subfolder / "config.json").is_file():
        found = (path, subfolder)
    else:
        raise ModelLoadError(
            f"{flag} {spec}: not a diffusers folder (no config.json, nor {subfolder}/config.json)"
        )
    weights = path / (found[1] or "")
    if not any(weights.glob("*.safetensors")):
        raise ModelLoadError(
            f"{flag} {spec}: no .safetensors weights in {weights}; pickled weights (.bin, .pt) are never "
            "loaded, since loading one runs code: convert them to safetensors"
        )
    return found


def float_list(text: str) -> list[float]:
    """Whitespace-separated numbers as floats: long constant tables stay compact and readable."""
    return [float(value) for value in text.split()]


def seeded(build: Callable[[], T]) -> T:
    """Build a tiny model with a fixed seed (0) without touching the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build()


def is_single_file(spec: str) -> bool:
    if not spec.lower().endswith(".safetensors"):
        return False
    try:
        return not Path(spec).expanduser().is_dir()
    except RuntimeError:  # an unknown ~user: the file's reader says so (model_path)
        return True


def _single_file(spec: str, flag: str) -> Path | None:
    """The path when `spec` names one ``.safetensors`` file (None when it is something else)."""
    if not is_single_file(spec):
        return None
    path = model_path(spec, flag)
    if not path.is_file():
        raise ModelLoadError(f"{flag} {spec}: no such file")
    return path


# --- the order every family loads in ---------------------------------------------------------------


def vae(
    model_class: type[ModelMixin],
    spec: str,
    device: torch.device,
    dtype: torch.dtype,
    *,
    tiny: Mapping[str, Mapping[str, Any]],
    from_file: VaeFileLoader,
) -> torch.nn.Module:
    """A family's VAE for the value of ``--vae``: one of its `tiny` configs by name (seeded),
    else one ``.safetensors`` file (read by `from_file`) or a diffusers folder; frozen, on
    `device` in `dtype`."""
    model: torch.nn.Module
    if spec in tiny:
        config = tiny[spec]
        model = seeded(lambda: model_class(**config))
    else:
        model = _pretrained_vae(model_class, spec, from_file)
    return to_device(model, device, dtype)


def text_encoder(
    arch: ArchSpec,
    spec: str,
    device: torch.device,
    dtype: torch.dtype,
    *,
    tiny: Callable[[int], torch.nn.Module],
    from_file: Callable[[Path, str], torch.nn.Module],
    folder_class: type[PreTrainedModel],
    max_length: int,
    fp8: bool,
    to_fp8: Callable[[torch.nn.Module], None],
    tokenizer: str | None,
) -> TextEncoder:
    """A family's text encoder and its tokenizer for the value of ``arch.text_flag``: ``tiny``
    (`tiny` of the tiny tokenizer's vocabulary size, seeded), one ``.safetensors`` file (read by
    `from_file`) with the tokenizer folder `tokenizer` (``arch.tokenizer_flag``), or a folder
    holding both (`folder_class`). With `fp8`, `to_fp8` quantises it on the CPU. Frozen, on
    `device` in `dtype`."""
    model: torch.nn.Module
    tokens: PreTrainedTokenizerBase
    if spec == TINY:
        tokens = tiny_tokenizer()
        model = seeded(lambda: tiny(len(tokens)))
    elif is_single_file(spec):  # ComfyUI's text encoder files, with a tokenizer folder
        # the tokenizer first: a missing one costs no read of the file
        tokens = _local_tokenizer(tokenizer, arch.tokenizer_flag, arch.tokenizer_hub_id, arch.text_flag, spec)
        model = from_file(model_path(spec, arch.text_flag), arch.text_flag)
    else:
        model, tokens = _pretrained_text_encoder(folder_class, spec, arch.text_flag)
    if fp8:
        model = to_device(model, torch.device("cpu"), dtype)
        to_fp8(model)
    model = to_device(model, device, dtype)
    return TextEncoder(tokenizer=tokens, model=model, max_length=max_length)


def transformer(
    model_class: type[ModelMixin],
    spec: str,
    flag: str,
    device: torch.device,
    dtype: torch.dtype,
    *,
    tiny: Callable[[], torch.nn.Module],
    from_file: FileLoader,
    fp8: Fp8Mode | None,
    fp8_targets: Fp8Targets,
    variants: Mapping[str, Callable[[], torch.nn.Module]] = _NONE,
) -> torch.nn.Module:
    """A family's denoiser for the value of `flag`: ``tiny`` (`tiny()`) or one of the tiny
    `variants` by name (a conditioned mode's: ``catalog.tiny_denoiser``), else one
    ``.safetensors`` file (read by `from_file`) or a diffusers folder, read in `dtype`; with
    `fp8`, its `fp8_targets` in fp8 (quantised while reading). Frozen, on `device`."""
    if spec == TINY:
        model = tiny()
    elif spec in variants:
        model = variants[spec]()
    else:
        load = None if fp8 is None else Fp8Load(fp8, fp8_targets, dtype)
        model = _pretrained_transformer(model_class, spec, flag, dtype, from_file, load)
    return _finish_transformer(model, device, dtype, fp8, fp8_targets)


def empty_transformer(model_class: type[ModelMixin], config: Mapping[str, Any]) -> torch.nn.Module:
    """`model_class` of `config` on the meta device, buffers included: shapes and dtypes only."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=True):
        model: torch.nn.Module = model_class(**config)
    return model


def transformer_config(
    model_class: type[ModelMixin],
    spec: str,
    flag: str,
    *,
    tiny: Mapping[str, Any],
    from_file: Callable[[Path, str], Mapping[str, Any]],
    variants: Mapping[str, Mapping[str, Any]] = _NONE,
) -> dict[str, Any] | None:
    """The config of the denoiser `flag` names, without loading it: `tiny` for ``tiny``, else
    what one ``.safetensors`` file's header implies (`from_file`) or a diffusers folder's
    ``config.json`` (the class's defaults where it is silent; None when it names another class:
    loading says what is wrong). A path that cannot load is the error loading would give."""
    if spec == TINY:
        return dict(tiny)
    if spec in variants:
        return dict(variants[spec])
    path = _single_file(spec, flag)
    if path is not None:
        return dict(from_file(path, flag))
    folder, subfolder = diffusers_folder(spec, flag, "transformer")
    stored = model_class.load_config(folder / (subfolder or ""))
    if stored.get("_class_name", model_class.__name__) != model_class.__name__:
        return None
    parameters = inspect.signature(model_class.__init__).parameters
    defaults = {k: p.default for k, p in parameters.items() if p.default is not inspect.Parameter.empty}
    return defaults | {k: v for k, v in stored.items() if k in parameters}


def _pretrained_transformer(
    model_class: type[ModelMixin],
    spec: str,
    flag: str,
    dtype: torch.dtype,
    from_file: FileLoader,
    fp8: Fp8Load | None = None,
) -> torch.nn.Module:
    """A non-tiny denoiser: a single ``.safetensors`` file (ComfyUI / original layout, read by the
    family's `from_file`) or a local diffusers folder, read straight into `dtype` (no float32
    detour for a 14B model). With `fp8` the targeted Linear weights are quantised tensor by tensor
    while reading, from a file or a sharded folder alike."""
    path = _single_file(spec, flag)
    if path is not None:
        return from_file(path, flag, dtype, fp8)
    folder, subfolder = diffusers_folder(spec, flag, "transformer")
    if fp8 is not None:
        return _folder_in_fp8(model_class, folder, subfolder, flag, dtype, fp8)
    model: torch.nn.Module = model_class.from_pretrained(
        folder, subfolder=subfolder, local_files_only=True, torch_dtype=dtype, use_safetensors=True
    )
    check_finite(model, f"{flag} {spec}")
    return model


def check_finite(model: torch.nn.Module, where: str) -> None:
    """Every floating tensor of `model` finite; otherwise an error naming `where` (the flag and
    path) and the first tensor that is not (a damaged model: it cannot train)."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ModelLoadError(
                f"{where}: tensor {name!r} holds NaN or infinity: the model is damaged; download or "
                "convert it again"
            )


def _folder_in_fp8(
    model_class: type[ModelMixin],
    folder: Path,
    subfolder: str | None,
    flag: str,
    dtype: torch.dtype,
    fp8: Fp8Load,
) -> torch.nn.Module:
    """A diffusers folder's model read shard by shard, tensor by tensor, through the same reader
    as single files (``from_pretrained`` would hold the whole bf16 model first)."""
    weights = folder / (subfolder or "")
    config_dict = model_class.load_config(weights)
    init = model_class.extract_init_dict(config_dict)[0]
    file = open_folder(weights, flag)
    return build(model_class, dict(init), file, {key: key for key in file.shapes}, dtype, fp8)


def _finish_transformer(
    model: torch.nn.Module,
    device: torch.device,
    dtype: torch.dtype,
    fp8: Fp8Mode | None,
    targets: Fp8Targets,
) -> torch.nn.Module:
    """A loaded denoiser in `dtype`, its targeted Linear layers in fp8 when asked (a model built in
    memory, such as ``tiny``, is quantised here; checkpoints arrive quantised), frozen, on `device`."""
    quantized = any(p.dtype in FP8_DTYPES for p in model.parameters())
    if fp8 is not None and not quantized:
        model = to_device(model, torch.device("cpu"), dtype)
        quantize_model(model, targets, fp8)
    return to_device(model, device, dtype)


def _pretrained_vae(model_class: type[ModelMixin], spec: str, from_file: VaeFileLoader) -> torch.nn.Module:
    """A non-tiny VAE: a single ``.safetensors`` file (read by the family's `from_file`) or a
    local diffusers folder."""
    path = _single_file(spec, "--vae")
    if path is not None:
        return from_file(path, "--vae", None)
    folder, subfolder = diffusers_folder(spec, "--vae", "vae")
    model: torch.nn.Module = model_class.from_pretrained(
        folder, subfolder=subfolder, local_files_only=True, use_safetensors=True
    )
    return model


def _pretrained_text_encoder(
    model_class: type[PreTrainedModel], spec: str, flag: str
) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """A transformers encoder and its tokenizer from a component folder (both inside) or a
    pipeline folder (``text_encoder/`` and ``tokenizer/``)."""
    from transformers import AutoTokenizer

    if is_single_file(spec):
        raise text_encoder_file_error(flag, spec)
    path, subfolder = diffusers_folder(spec, flag, "text_encoder")
    model = model_class.from_pretrained(
        path, subfolder=subfolder or "", local_files_only=True, use_safetensors=True
    )
    tokenizer = AutoTokenizer.from_pretrained(
        path / "tokenizer" if subfolder else path, local_files_only=True
    )
    return model, tokenizer


def _local_tokenizer(
    folder: str | None, flag: str, hub_id: str, encoder_flag: str, encoder: str
) -> PreTrainedTokenizerBase:
    """The tokenizer in `folder` (for the single-file text encoder `encoder` of `encoder_flag`,
    named by `flag`); without one, an error saying which tokenizer to fetch and where to pass it
    (nothing is downloaded here)."""
    from transformers import AutoTokenizer

    if folder is None:
        raise text_encoder_file_error(encoder_flag, encoder, flag, hub_id)
    path = model_path(folder, flag)
    if not path.is_dir():
        raise ModelLoadError(f"{flag} {folder}: no such folder")
    try:
        tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"{flag} {folder}: no tokenizer of {hub_id} there ({error})") from None
    return tokenizer


@torch.no_grad()
def encode_posterior_mean(
    vae: AutoencoderKLWan | AutoencoderKLQwenImage, pixels: torch.Tensor
) -> torch.Tensor:
    """The VAE's posterior mean (as musubi-tuner caches it, so caches are reproducible),
    normalised with the VAE's ``latents_mean`` / ``latents_std``."""
    latents = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist.mode()
    config = diffusers_config(vae)
    return normalise_latents(latents, config.latents_mean, config.latents_std)


def normalise_latents(latents: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """``(z - mean) / std`` per channel, as diffusers' pipelines and training scripts do."""
    shape = (1, len(mean), 1, 1, 1)
    mean_t = torch.tensor(mean, dtype=latents.dtype, device=latents.device).view(shape)
    inv_std = 1.0 / torch.tensor(std, dtype=latents.dtype, device=latents.device).view(shape)
    return (latents - mean_t) * inv_std


def diffusers_config(model: torch.nn.Module) -> Any:
    """A diffusers model's ``config``: its constructor arguments, read as attributes."""
    return model.config


def device_of(model: torch.nn.Module) -> torch.device:
    """The device a model's weights are on."""
    return next(model.parameters()).device


def to_device(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Frozen, in eval mode, on `device`; cast only when the dtype changes (diffusers warns about
    casting models that keep some modules in float32). A model with fp8 weights is never cast:
    it was read in its final dtypes."""
    params = list(model.parameters())
    if params[0].dtype != dtype and not any(p.dtype in FP8_DTYPES for p in params):
        model = model.to(dtype=dtype)
    return model.to(device=device).eval().requires_grad_(False)


def to_uint8(pixels: Any) -> torch.Tensor:
    """A pipeline's ``output_type="np"`` frames (floats in [0, 1], any leading dimensions, channels
    last) as (N, H, W, 3) uint8 on the CPU."""
    frames = torch.as_tensor(pixels).float().reshape(-1, *pixels.shape[-3:])
    return (frames * 255).round().clamp(0, 255).to(torch.uint8)
