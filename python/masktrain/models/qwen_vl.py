"""Qwen-Image-Edit's text encoder: Qwen2.5-VL with its vision tower, which reads the caption and
the control images together (``QwenImageEditPipeline`` / ``QwenImageEditPlusPipeline``
``_get_qwen_prompt_embeds``), so an edit item's text embedding depends on its control images.

The prompt: the edit system text, then ``<|vision_start|><|image_pad|><|vision_end|>`` and the
caption (Edit: one image, seen at the ~1024² area its latents are made at), or
``Picture i: <|vision_start|><|image_pad|><|vision_end|>`` per image then the caption (Edit-2509 /
2511: each image at a 384² area); both round sizes to multiples of 32. The processor expands each
``<|image_pad|>`` into the image's tokens; the features are the last hidden state with the system
prefix dropped (64 tokens with Qwen's tokenizer: counted from the tokenizer, as
``qwen_image.encode_text`` does, so the tiny tokenizer drops exactly its own prefix). An item
without control images gets the Edit-Plus template with no picture (what that pipeline does with
no image).

One deliberate difference from diffusers 0.42.1 under transformers 5: the pipelines do not pass
the processor's ``mm_token_type_ids`` to the encoder, which then falls back to sequential text
positions for the image tokens (diffusers issue #14194, open). masktrain passes them, so image
tokens get their 3-D RoPE positions, as Qwen2.5-VL computed them with transformers 4 (when the
Edit models and musubi-tuner's caches were made). Text-only prompts are identical either way.

The processor is built in code from the tokenizer and transformers' PIL image processor (no
torchvision), with Qwen2.5-VL's pixel bounds, or small ones for the tiny model. A single
``.safetensors`` file (ComfyUI's ``qwen_2.5_vl_7b*.safetensors``) is read with its ``visual.``
weights here (``qwen_image_checkpoint`` reads its language model only, which is all
text-to-image needs).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from masktrain import catalog
from masktrain.errors import DataError, ModelLoadError
from masktrain.models import loading
from masktrain.models.base import TextEncoder
from masktrain.models.loading import TINY, seeded, to_device
from masktrain.models.qwen_image_checkpoint import QWEN_TEXT, QWEN_TEXT_PREFIXES, qwen_text_config
from masktrain.models.single_file import build
from masktrain.models.tokenizer import tiny_vl_tokenizer
from masktrain.models.weights_file import Shapes, count, open_component, shape

if TYPE_CHECKING:
    from PIL import Image
    from transformers import PreTrainedTokenizerBase, ProcessorMixin

EDIT = "edit"
EDIT_PLUS = ("edit-2509", "edit-2511")
#: The system prompt of both edit pipelines, up to where the user's turn starts: what is dropped.
EDIT_PREFIX = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, "
    "objects, background), then explain how the user's text instruction should alter or modify the "
    "image. Generate a new image that meets the user's requirements while maintaining consistency "
    "with the original input where appropriate.<|im_end|>\n<|im_start|>user\n"
)
IMAGE_TOKENS = "<|vision_start|><|image_pad|><|vision_end|>"
EDIT_TEMPLATE = EDIT_PREFIX + IMAGE_TOKENS + "{}<|im_end|>\n<|im_start|>assistant\n"
EDIT_PLUS_TEMPLATE = EDIT_PREFIX + "{}<|im_end|>\n<|im_start|>assistant\n"
PICTURE = "Picture {}: " + IMAGE_TOKENS
#: The area each image is resized to for the VL (multiples of 32): Edit-Plus's CONDITION_IMAGE_SIZE,
#: and Edit's output-sized image; also the area Edit-Plus VAE-encodes each control at (VAE_IMAGE_SIZE).
CONDITION_IMAGE_SIZE = 384 * 384
VAE_IMAGE_SIZE = 1024 * 1024

# Qwen2.5-VL-7B-Instruct's preprocessor_config.json (min_pixels, max_pixels), which Qwen-Image-Edit's
# processor/ repeats; the tiny encoder sees 1 to 16 merged tokens per image.
RELEASED_PIXELS = (56 * 56, 14 * 14 * 4 * 16384)
TINY_PIXELS = (28 * 28, 112 * 112)
# Qwen2.5-VL's ids of its vision markers (its config.json), for a model built from one file.
RELEASED_TOKEN_IDS = {
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "image_token_id": 151655,
    "video_token_id": 151656,
}
# The released vision tower's settings its shapes do not show (config.json's vision_config).
RELEASED_VISION = {
    "num_heads": 16,
    "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31],
    "tokens_per_second": 2,
}

TINY_TEXT: dict[str, Any] = {
    "hidden_size": 16,
    "intermediate_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "rope_theta": 1e6,
    "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 1,
}
# diffusers' Edit-Plus pipeline test (tests/pipelines/qwenimage/test_qwenimage_edit_plus.py).
TINY_VISION: dict[str, Any] = {
    "depth": 2,
    "hidden_size": 16,
    "intermediate_size": 16,
    "num_heads": 2,
    "out_hidden_size": 16,
}


@dataclass
class VisionTextEncoder(TextEncoder):
    """A Qwen2.5-VL encoder with its vision tower and the processor that lays out its inputs."""

    processor: ProcessorMixin


def edit_processor(tokenizer: PreTrainedTokenizerBase, pixels: tuple[int, int]) -> ProcessorMixin:
    """``Qwen2VLProcessor`` of `tokenizer` and the PIL ``Qwen2VLImageProcessor`` with `pixels`
    (min, max) per image, without a video processor: transformers checks that one's class even
    when none is given, and the class needs torchvision."""
    from transformers import Qwen2VLImageProcessorPil, Qwen2VLProcessor

    class ImageTextProcessor(Qwen2VLProcessor):
        def __init__(self, image_processor: Any, tokenizer: Any) -> None:
            super().__init__(image_processor, tokenizer)  # type: ignore[no-untyped-call]

    images = Qwen2VLImageProcessorPil(min_pixels=pixels[0], max_pixels=pixels[1])
    processor: ProcessorMixin = ImageTextProcessor(images, tokenizer)
    return processor


#: The vision markers' config keys and tokens.
MARKERS = {
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
    "image_token_id": "<|image_pad|>",
    "video_token_id": "<|video_pad|>",
}


def marker_ids(tokenizer: PreTrainedTokenizerBase, where: str) -> dict[str, int]:
    """The config's vision marker ids as `tokenizer` spells them; a tokenizer without them (a text
    model's) is an error naming `where`."""
    ids: dict[str, int] = {}
    missing: list[str] = []
    for key, token in MARKERS.items():
        found = tokenizer.convert_tokens_to_ids(token)
        if isinstance(found, int) and found != tokenizer.unk_token_id:
            ids[key] = found
        else:
            missing.append(token)
    if missing:
        raise ModelLoadError(
            f"{where}: its tokenizer has no {', '.join(missing)} token; the edit modes need Qwen2.5-VL's "
            "tokenizer (Qwen-Image's tokenizer/ folder)"
        )
    return ids


def tiny_vl_model(tokenizer: PreTrainedTokenizerBase) -> torch.nn.Module:
    """The tiny Qwen2.5-VL (seeded, float32): TINY_TEXT and TINY_VISION, its vocabulary and vision
    marker ids `tokenizer`'s (:func:`tokenizer.tiny_vl_tokenizer`)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLModel

    config = Qwen2_5_VLConfig(
        text_config={**TINY_TEXT, "vocab_size": len(tokenizer)}, vision_config=TINY_VISION
    )
    for key, value in marker_ids(tokenizer, f"{catalog.QWEN_IMAGE.text_flag} {TINY}").items():
        setattr(config, key, value)
    model: torch.nn.Module = seeded(lambda: Qwen2_5_VLModel(config))
    return model


def load(
    spec: str,
    device: torch.device,
    dtype: torch.dtype,
    fp8: bool,
    to_fp8: Callable[[torch.nn.Module], None],
    tokenizer: str | None,
    max_length: int,
) -> VisionTextEncoder:
    """The edit text encoder for ``--text_encoder spec``: ``tiny``, a diffusers folder (its
    ``Qwen2_5_VLForConditionalGeneration`` holds the vision tower) or one ``.safetensors`` file
    with its tokenizer folder `tokenizer`; with `fp8`, `to_fp8` quantises the language model."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    if spec == TINY:
        tokens = tiny_vl_tokenizer()
        model = tiny_vl_model(tokens)
        if fp8:
            model = to_device(model, torch.device("cpu"), dtype)
            to_fp8(model)
        encoder = TextEncoder(tokens, to_device(model, device, dtype), max_length)
        pixels = TINY_PIXELS
    else:
        encoder = loading.text_encoder(
            catalog.QWEN_IMAGE,
            spec,
            device,
            dtype,
            tiny=lambda vocab: tiny_vl_model(tiny_vl_tokenizer()),  # not reached: tiny is built above
            from_file=load_vl_file,
            folder_class=Qwen2_5_VLForConditionalGeneration,
            max_length=max_length,
            fp8=fp8,
            to_fp8=to_fp8,
            tokenizer=tokenizer,
        )
        # a model built from one file has Qwen2.5-VL's ids; the tokenizer is what makes them
        for key, value in marker_ids(encoder.tokenizer, f"{catalog.QWEN_IMAGE.text_flag} {spec}").items():
            setattr(encoder.model.config, key, value)
        pixels = RELEASED_PIXELS
    processor = edit_processor(encoder.tokenizer, pixels)
    return VisionTextEncoder(encoder.tokenizer, encoder.model, encoder.max_length, processor)


# --- the prompt ---------------------------------------------------------------------------------


def area_size(width: int, height: int, area: int) -> tuple[int, int]:
    """(width, height) of `area` pixels at the aspect ratio of `width` x `height`, in multiples of
    32 (the pipelines' ``calculate_dimensions``)."""
    ratio = width / height
    new_width = math.sqrt(area * ratio)
    return round(new_width / 32) * 32, round(new_width / ratio / 32) * 32


def edit_prompt(caption: str, images: Sequence[Image.Image], version: str) -> tuple[str, list[Image.Image]]:
    """The prompt text of `caption` with control `images` under `version` and the images resized
    as the VL sees them (RGB, Lanczos, as diffusers' ``VaeImageProcessor.resize``)."""
    from PIL import Image

    if version not in (EDIT, *EDIT_PLUS):
        raise ValueError(f"not a Qwen-Image-Edit --model_version: {version!r}")
    if version == EDIT and len(images) > 1:
        raise DataError(
            f"--model_version edit takes one control image per item, got {len(images)}; several control "
            "images need --model_version edit-2509 or edit-2511"
        )
    area = VAE_IMAGE_SIZE if version == EDIT else CONDITION_IMAGE_SIZE
    resized = [
        image.convert("RGB").resize(area_size(*image.size, area), Image.Resampling.LANCZOS)
        for image in images
    ]
    if version == EDIT and resized:
        return EDIT_TEMPLATE.format(caption), resized
    pictures = "".join(PICTURE.format(i + 1) for i in range(len(resized)))
    return EDIT_PLUS_TEMPLATE.format(pictures + caption), resized


@torch.no_grad()
def encode_edit_text(
    encoder: TextEncoder,
    captions: Sequence[str],
    control_images: Sequence[Sequence[Image.Image]],
    version: str,
) -> list[torch.Tensor]:
    """One (tokens, dim) embedding per caption, trimmed to its real length, from the caption and
    its item's control images (none is fine) under the edit `version`."""
    if not isinstance(encoder, VisionTextEncoder):
        raise ModelLoadError(
            "the edit modes need Qwen2.5-VL with its vision tower: load the text encoder for "
            "--model_version edit, edit-2509 or edit-2511"
        )
    texts: list[str] = []
    images: list[Image.Image] = []
    for caption, controls in zip(captions, control_images, strict=True):
        text, seen = edit_prompt(caption, controls, version)
        texts.append(text)
        images.extend(seen)
    drop = len(encoder.tokenizer(EDIT_PREFIX, add_special_tokens=False).input_ids)
    inputs = encoder.processor(text=texts, images=images or None, padding=True, return_tensors="pt")
    inputs = inputs.to(encoder.model.device)
    hidden = encoder.model(
        input_ids=inputs["input_ids"],
        attention_mask=inputs["attention_mask"],
        pixel_values=inputs.get("pixel_values"),
        image_grid_thw=inputs.get("image_grid_thw"),
        mm_token_type_ids=inputs.get("mm_token_type_ids"),
        output_hidden_states=True,
    ).hidden_states[-1]
    real = inputs["attention_mask"].bool()
    return [h[mask][drop:].cpu() for h, mask in zip(hidden, real, strict=True)]


# --- one .safetensors file ------------------------------------------------------------------------

#: Where a file keeps the vision tower, newest transformers naming first.
VISION_PREFIXES = ("model.visual.", "visual.")


def load_vl_file(path: Path, flag: str, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """A ``Qwen2_5_VLModel`` (language model and vision tower, no ``lm_head``) from one file."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLModel

    # build() makes models from keyword arguments; transformers leaves __init_subclass__ unannotated
    class VisionLanguageFromShapes(Qwen2_5_VLModel):  # type: ignore[no-untyped-call]
        def __init__(self, **config: Any) -> None:
            super().__init__(Qwen2_5_VLConfig(**config))

    file, _ = open_component(path, flag, (), QWEN_TEXT)
    text = next((p for p in QWEN_TEXT_PREFIXES if f"{p}embed_tokens.weight" in file.shapes), None)
    vision = next((p for p in VISION_PREFIXES if f"{p}patch_embed.proj.weight" in file.shapes), None)
    if text is None:
        raise file.error("is not a complete Qwen2.5-VL text encoder: no embed_tokens.weight")
    if vision is None:
        raise file.error(
            "holds no vision tower (visual.* weights), which the edit modes read the control images "
            "with: use ComfyUI's full qwen_2.5_vl_7b file or a diffusers folder"
        )
    text_keys = {
        key.removeprefix(text): key
        for key in file.shapes
        if key.startswith(text) and key.removeprefix(text).startswith(("embed_tokens.", "layers.", "norm."))
    }
    vision_keys = {key.removeprefix(vision): key for key in file.shapes if key.startswith(vision)}
    text_config = file.infer(qwen_text_config, file.renamed_shapes(text_keys), None)
    vision_config = file.infer(qwen_vision_config, file.renamed_shapes(vision_keys), None)
    config = {"text_config": text_config, "vision_config": vision_config, **RELEASED_TOKEN_IDS}
    to_file = {f"language_model.{k}": v for k, v in text_keys.items()}
    to_file |= {f"visual.{k}": v for k, v in vision_keys.items()}
    return build(VisionLanguageFromShapes, config, file, to_file, dtype)


def qwen_vision_config(shapes: Shapes, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``Qwen2_5_VLVisionConfig`` from the vision tower's shapes (the rest: :data:`RELEASED_VISION`)."""
    hidden, channels, temporal, patch, _ = shape(shapes, "patch_embed.proj.weight")
    merged = shape(shapes, "merger.mlp.0.weight")[1]
    config: dict[str, Any] = {
        "depth": count(shapes, r"blocks\.(\d+)\."),
        "hidden_size": hidden,
        "in_channels": channels,
        "intermediate_size": shape(shapes, "blocks.0.mlp.gate_proj.weight")[0],
        "out_hidden_size": shape(shapes, "merger.mlp.2.weight")[0],
        "patch_size": patch,
        "temporal_patch_size": temporal,
        "spatial_merge_size": math.isqrt(merged // hidden),
        **RELEASED_VISION,
    }
    return config | dict(overrides or {})
