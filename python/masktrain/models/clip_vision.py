"""The CLIP image encoder of WAN 2.1 I2V / FLF2V (``--clip``): the given frames' image embedding,
which the denoiser's image projection reads beside the text (``Conditioning.image_embeds``).

What it computes is diffusers' ``WanImageToVideoPipeline.encode_image``: ``CLIPImageProcessor``
(shortest edge to the model's image size, bicubic; centre crop; OpenAI CLIP mean and std), then
the penultimate layer's hidden states, ``hidden_states[-2]``: (N, 257, 1280) for ViT-H/14, CLS
token included. WAN's own code (and musubi-tuner) instead squeezes the frame to 224 x 224 without
cropping; we follow diffusers, since users sample with diffusers or ComfyUI (whose
``clip_preprocess`` also crops the centre square), so the LoRA learns from the embedding it will
be given. The frames arrive as the cache holds them, (N, 3, H, W) in [-1, 1] made from 8-bit
pixels; they go back to 8 bits exactly and through the processor as a picture would, so a frame
gets the embedding diffusers gives the same picture.

``--clip`` takes:

- ``tiny``: a seeded CLIP ViT of diffusers' tiny I2V test (width 4, 2 layers, 32-pixel images,
  its ``CLIPImageProcessor(crop_size=32, size=32)``), but with 8-pixel patches where the test has
  1-pixel ones: 17 tokens instead of 1025 (the count of diffusers' tiny FLF2V encoder), so the
  tiny denoiser's image cross-attention and the cache stay small while the ViT stays a real one.
- a local folder holding a ``CLIPVisionModelWithProjection`` (or ``CLIPVisionModel``, or a whole
  ``CLIPModel``): the folder itself or its ``image_encoder/`` (a diffusers WAN I2V pipeline),
  with the processor of its ``preprocessor_config.json`` / ``image_processor/`` when there is one.
- ComfyUI's ``clip_vision_h.safetensors`` (Comfy-Org/Wan_2.1_ComfyUI_repackaged,
  ``split_files/clip_vision/``): the open-clip ViT-H/14 vision tower in transformers' key names,
  unprefixed (``vision_model.embeddings.patch_embedding.weight`` [1280, 3, 14, 14], ...
  ``vision_model.encoder.layers.{0..31}.self_attn.q_proj.weight``, ``visual_projection.weight``
  [1024, 1280]: 520 float tensors, and the int64 ``vision_model.embeddings.position_ids`` [1, 257]
  that older transformers saved, which transformers now computes itself: skipped). ComfyUI reads
  it with the same module names (``comfy/clip_model.py`` ``CLIPVisionModelProjection``) and picks
  its ViT-H config by layer 30 existing (``comfy/clip_vision.py``). The shapes give the widths,
  depth, patch and image size; what they cannot tell is ViT-H's: 16 heads, GELU (not CLIP's
  default quick GELU), LayerNorm eps 1e-5 (``clip_vision_config_h.json``;
  laion/CLIP-ViT-H-14-laion2B-s32B-b79K's config).

WAN's original ``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth`` is a pickle in WAN's
own layout (text tower included) and is refused, naming the file to use instead; so is any other
pickle. No processor is ever downloaded: ``CLIPImageProcessorPil`` is built in code and needs no
torchvision.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import torch

from masktrain.errors import ModelLoadError, ShapeRuleError
from masktrain.models.loading import (
    TINY,
    check_finite,
    diffusers_folder,
    is_single_file,
    model_path,
    seeded,
    to_device,
)
from masktrain.models.single_file import build
from masktrain.models.weights_file import CheckpointKind, Shapes, count, open_component, register_kinds, shape

if TYPE_CHECKING:
    from transformers import CLIPImageProcessorPil

logger = logging.getLogger(__name__)

#: The tiny encoder's width: the tiny image-conditioned denoisers' ``image_dim``.
TINY_CLIP_HIDDEN = 4
_TINY_IMAGE_SIZE = 32
_TINY_PATCH_SIZE = 8
#: The tiny encoder's tokens per image: CLS + (32 / 8)² patches (FLF2V's ``pos_embed_seq_len`` is twice it).
TINY_CLIP_TOKENS = (_TINY_IMAGE_SIZE // _TINY_PATCH_SIZE) ** 2 + 1
#: The tiny encoder's config: diffusers' tiny I2V test's (tests/pipelines/wan/test_wan_image_to_video.py)
#: with 8-pixel patches (see the module docstring).
TINY_CLIP_CONFIG: Mapping[str, Any] = MappingProxyType(
    {
        "hidden_size": TINY_CLIP_HIDDEN,
        "projection_dim": 4,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": _TINY_IMAGE_SIZE,
        "intermediate_size": 16,
        "patch_size": _TINY_PATCH_SIZE,
    }
)

#: ViT-H/14's values the weights cannot tell (ComfyUI's clip_vision_config_h.json).
VIT_H_WIDTH = 1280
VIT_H_HEADS = 16
VIT_H_ACTIVATION = "gelu"
VIT_H_LAYER_NORM_EPS = 1e-5

# OpenAI CLIP's normalisation, which every CLIP here uses (transformers' OPENAI_CLIP_MEAN / _STD,
# ComfyUI's clip_preprocess, WAN's clip.py).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_BICUBIC = 3  # PIL.Image.Resampling.BICUBIC

#: What :func:`encode_images` computes, in the cache fingerprint: a change to it rebuilds caches.
ENCODING = "diffusers WanImageToVideoPipeline.encode_image: CLIPImageProcessor, hidden_states[-2]"

_USE_INSTEAD = (
    "pass ComfyUI's clip_vision_h.safetensors (Comfy-Org/Wan_2.1_ComfyUI_repackaged, "
    "split_files/clip_vision/) or a CLIPVisionModelWithProjection folder (a diffusers WAN I2V "
    "pipeline's image_encoder/)"
)
_PICKLES = (".pth", ".pt", ".ckpt", ".bin", ".pkl")
_VISION_PREFIXES = ("vision_model.", "visual_projection.")
_POSITION_IDS = "vision_model.embeddings.position_ids"
_PATCH = "vision_model.embeddings.patch_embedding.weight"

CLIP_VISION = CheckpointKind("a CLIP vision encoder", "clip", lambda names: _PATCH in names)
WAN_CLIP = CheckpointKind(
    "WAN's original open-clip XLM-RoBERTa CLIP in its own layout (not read: use ComfyUI's "
    "clip_vision_h.safetensors)",
    None,
    lambda names: any(re.search(r"(^|\.)transformer\.\d+\.attn\.to_qkv\.weight$", k) for k in names),
)
OPEN_CLIP = CheckpointKind(
    "an open_clip model in its own layout (not read: use ComfyUI's clip_vision_h.safetensors)",
    None,
    lambda names: any("transformer.resblocks." in k and k.endswith("attn.in_proj_weight") for k in names),
)
register_kinds(CLIP_VISION, WAN_CLIP, OPEN_CLIP)


@dataclass(frozen=True)
class ClipVision:
    """A loaded CLIP vision encoder and the image processor that prepares its input."""

    model: torch.nn.Module
    """transformers' ``CLIPVisionModelWithProjection`` (or ``CLIPVisionModel``): frozen, eval."""
    processor: CLIPImageProcessorPil

    @property
    def hidden_size(self) -> int:
        """The embedding width (the denoiser's ``image_dim``)."""
        return int(vision_config(self.model).hidden_size)

    @property
    def tokens(self) -> int:
        """Tokens per image: CLS + one per patch."""
        config = vision_config(self.model)
        return int((config.image_size // config.patch_size) ** 2 + 1)


def vision_config(model: torch.nn.Module) -> Any:
    """A transformers CLIP model's ``CLIPVisionConfig``."""
    config: Any = model.config
    return config


def load_clip(spec: str, flag: str, device: torch.device, dtype: torch.dtype) -> ClipVision:
    """The encoder `flag` names (``tiny``, a folder, ComfyUI's ``clip_vision_h.safetensors``),
    frozen, on `device` in `dtype`."""
    _refuse_pickle(spec, flag)
    model: torch.nn.Module
    if spec == TINY:
        model = seeded(_tiny_model)
        processor = clip_processor(_TINY_IMAGE_SIZE)
    elif is_single_file(spec):
        model = load_clip_file(_existing_file(spec, flag), flag, dtype)
        processor = clip_processor(int(vision_config(model).image_size))
    else:
        model, processor = _load_folder(spec, flag)
    clip = ClipVision(to_device(model, device, dtype), processor)
    logger.info("CLIP vision encoder %s: %d tokens x %d per image", spec, clip.tokens, clip.hidden_size)
    return clip


@torch.no_grad()
def encode_images(clip: ClipVision, images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) images in [-1, 1] -> (N, T, D) penultimate hidden states, on the encoder's
    device in its dtype: what diffusers' ``encode_image`` gives the same 8-bit pictures."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (N, 3, H, W), got {tuple(images.shape)}")
    pixels = images.detach().float().add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8)
    pictures = list(pixels.permute(0, 2, 3, 1).cpu().numpy())
    inputs = clip.processor(images=pictures, return_tensors="pt", input_data_format="channels_last")
    weight = next(clip.model.parameters())
    values = inputs["pixel_values"].to(device=weight.device, dtype=weight.dtype)
    hidden: torch.Tensor = clip.model(pixel_values=values, output_hidden_states=True).hidden_states[-2]
    return hidden


def clip_identity(spec: str, flag: str = "--clip") -> str:
    """A short hash of what makes the embeddings: `spec`, :data:`ENCODING`, and the tiny config
    or, for weights on disk, each file's path, size and modification time (as the cache
    identifies the VAE: new weights at the same path count; no file is read)."""
    parts: dict[str, Any] = {"spec": spec, "encoding": ENCODING}
    if spec == TINY:
        parts["config"] = dict(TINY_CLIP_CONFIG)
    else:
        parts["files"] = [
            [str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in _weights_files(spec, flag)
        ]
    canonical = json.dumps(parts, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def clip_processor(image_size: int) -> CLIPImageProcessorPil:
    """transformers' CLIP image processor for a model of `image_size` (224 for ViT-H/14: the
    values of laion/CLIP-ViT-H-14's ``preprocessor_config.json``); PIL-based, no torchvision."""
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        resample=_BICUBIC,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
        do_resize=True,
        do_center_crop=True,
        do_rescale=True,
        do_normalize=True,
        do_convert_rgb=True,
    )


# --- one file: ComfyUI's clip_vision_h.safetensors ---------------------------------------------------


def load_clip_file(path: Path, flag: str, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """A CLIP vision encoder from one ``.safetensors`` file in transformers' names, strictly (a
    missing or misshapen tensor is an error naming it); keys of other components (a whole
    ``CLIPModel``'s text tower) are not read."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection

    # build() makes models from keyword arguments; transformers leaves __init_subclass__ unannotated
    class ClipVisionFromShapes(CLIPVisionModelWithProjection):  # type: ignore[no-untyped-call]
        def __init__(self, **config: Any) -> None:
            super().__init__(CLIPVisionConfig(**config))

    class ClipVisionNoProjection(CLIPVisionModel):  # type: ignore[no-untyped-call]
        def __init__(self, **config: Any) -> None:
            super().__init__(CLIPVisionConfig(**config))

    file, names = open_component(path, flag, (), CLIP_VISION)
    to_file = {name: name for name in names if name.startswith(_VISION_PREFIXES) and name != _POSITION_IDS}
    config = file.infer(clip_config, file.renamed_shapes(to_file), None)
    projected = "visual_projection.weight" in to_file
    return build(ClipVisionFromShapes if projected else ClipVisionNoProjection, config, file, to_file, dtype)


def clip_config(shapes: Shapes, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``CLIPVisionConfig`` from transformers-named shapes. Widths, depth, patch and image size
    come from the tensors; heads, activation and eps are ViT-H/14's, the only CLIP WAN uses, so
    another width is refused (its head count is not in the weights)."""
    width, channels, patch, _ = shape(shapes, _PATCH)
    positions = shape(shapes, "vision_model.embeddings.position_embedding.weight")[0]
    side = math.isqrt(positions - 1)
    if side * side != positions - 1:
        raise ShapeRuleError(f"{positions} position embeddings are not a square grid of patches plus CLS")
    if width != VIT_H_WIDTH and "num_attention_heads" not in (overrides or {}):
        raise ShapeRuleError(
            f"a {width}-wide CLIP vision tower is not ViT-H/14 ({VIT_H_WIDTH} wide, as ComfyUI's "
            "clip_vision_h.safetensors), the one WAN 2.1 I2V / FLF2V take"
        )
    config: dict[str, Any] = {
        "hidden_size": width,
        "num_channels": channels,
        "patch_size": patch,
        "image_size": side * patch,
        "num_hidden_layers": count(shapes, r"vision_model\.encoder\.layers\.(\d+)\."),
        "intermediate_size": shape(shapes, "vision_model.encoder.layers.0.mlp.fc1.weight")[0],
        "num_attention_heads": VIT_H_HEADS,
        "hidden_act": VIT_H_ACTIVATION,
        "layer_norm_eps": VIT_H_LAYER_NORM_EPS,
    }
    if "visual_projection.weight" in shapes:
        config["projection_dim"] = shapes["visual_projection.weight"][0]
    return config | dict(overrides or {})


# --- a folder, the tiny model, and resolving the flag -------------------------------------------------


def _tiny_model() -> torch.nn.Module:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    model: torch.nn.Module = CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_CLIP_CONFIG))
    return model


def _load_folder(spec: str, flag: str) -> tuple[torch.nn.Module, CLIPImageProcessorPil]:
    """A transformers CLIP vision model from a folder (or a pipeline's ``image_encoder/``) and its
    processor (the folder's, else :func:`clip_processor` for its image size)."""
    from transformers import CLIPImageProcessorPil, CLIPVisionModel, CLIPVisionModelWithProjection

    folder, subfolder = diffusers_folder(spec, flag, "image_encoder")
    encoder = folder / (subfolder or "")
    try:
        stored = json.loads((encoder / "config.json").read_text())
    except json.JSONDecodeError as error:
        raise ModelLoadError(
            f"{flag} {spec}: {encoder / 'config.json'} is not valid JSON ({error})"
        ) from None
    if stored.get("model_type") not in ("clip_vision_model", "clip"):
        held = stored.get("_class_name") or stored.get("model_type") or "an unknown model"
        raise ModelLoadError(
            f"{flag} {spec}: {encoder} holds {held}, expected a CLIPVisionModelWithProjection"
        )
    plain = stored.get("architectures") == ["CLIPVisionModel"]  # saved without the projection
    model_class = CLIPVisionModel if plain else CLIPVisionModelWithProjection
    model: torch.nn.Module = model_class.from_pretrained(
        folder, subfolder=subfolder or "", local_files_only=True, use_safetensors=True
    )
    check_finite(model, f"{flag} {spec}")
    processor_folder = _processor_folder(folder, subfolder)
    if processor_folder is None:
        return model, clip_processor(int(vision_config(model).image_size))
    processor: CLIPImageProcessorPil = CLIPImageProcessorPil.from_pretrained(
        processor_folder, local_files_only=True
    )
    return model, processor


def _processor_folder(folder: Path, subfolder: str | None) -> Path | None:
    """Where the folder keeps its ``preprocessor_config.json`` (a pipeline: ``image_processor/``)."""
    candidate = folder / "image_processor" if subfolder else folder
    return candidate if (candidate / "preprocessor_config.json").is_file() else None


def _refuse_pickle(spec: str, flag: str) -> None:
    """A pickled checkpoint is an error naming the file to use instead."""
    name = Path(spec).name
    if name.lower().endswith(_PICKLES):
        if "open-clip-xlm-roberta" in name:
            raise ModelLoadError(
                f"{flag} {spec}: WAN's original CLIP, a pickle (loading one runs code) in WAN's own "
                f"layout with its text tower, which masktrain does not read; {_USE_INSTEAD}"
            )
        raise ModelLoadError(
            f"{flag} {spec}: pickled checkpoints are never loaded (loading one runs code); {_USE_INSTEAD}"
        )


def _existing_file(spec: str, flag: str) -> Path:
    path = model_path(spec, flag)
    if not path.is_file():
        raise ModelLoadError(f"{flag} {spec}: no such file; {_USE_INSTEAD}, or 'tiny'")
    return path


def _weights_files(spec: str, flag: str) -> list[Path]:
    """The files the encoder and its processor are read from."""
    _refuse_pickle(spec, flag)
    if is_single_file(spec):
        return [_existing_file(spec, flag)]
    folder, subfolder = diffusers_folder(spec, flag, "image_encoder")
    encoder = folder / (subfolder or "")
    files = sorted(p for p in encoder.iterdir() if p.is_file())
    processor = _processor_folder(folder, subfolder)
    if processor is not None and processor != encoder:
        files.append(processor / "preprocessor_config.json")
    return files
