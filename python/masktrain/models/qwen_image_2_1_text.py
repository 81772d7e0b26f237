"""Qwen-Image 2.1's text encoder: Qwen3-VL reading a caption in ``QwenImage21Pipeline``'s
text-to-image template (``_get_qwen_prompt_embeds``, diffusers 0.42.1).

The pipeline tokenizes the raw template (not ``apply_chat_template``) with left padding, reads
``hidden_states[-1]`` with the language model's final RMSNorm bypassed by a forward hook (the
transformer was trained on the last decoder layer's output before that norm; transformers 5 ties
``hidden_states[-1]`` to the normed state), keeps each caption's real tokens and drops its system
message (the pipeline's ``_drop_idx``: the chat template's tokens of that message, which are
exactly the template's ``<|im_start|>system ... <|im_end|>\\n``, so they are counted from the
tokenizer here and the tiny tokenizer drops its own). It never truncates.

A diffusers folder holds the encoder in ``text_encoder/`` and the tokenizer in ``processor/``
(the pipeline has no ``tokenizer/``). The tiny encoder is diffusers' pipeline test's Qwen3-VL
(``tests/pipelines/qwenimage21/test_qwenimage21.py``) over the tiny Qwen-VL tokenizer
(``models.tokenizer``); :func:`tiny_processor` wraps that tokenizer in a ``Qwen3VLProcessor`` with a
chat template, which the pipeline needs to be built at all.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from masktrain.errors import ModelLoadError
from masktrain.models import loading
from masktrain.models.base import TextEncoder
from masktrain.models.fp8 import Fp8Targets, quantize_model
from masktrain.models.loading import TINY, seeded, to_device
from masktrain.models.tokenizer import tiny_vl_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, ProcessorMixin

    from masktrain.catalog import ArchSpec

SYSTEM_PROMPT = "Comprehend and analyze the provided prompt."
SYSTEM_MESSAGE = f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n"
PROMPT_TEMPLATE = SYSTEM_MESSAGE + "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
#: The pipeline never truncates, so the limit is the encoder's context (``Qwen3VLTextConfig``'s
#: default ``max_position_embeddings``): the cache's "truncated captions" count stays 0.
MAX_LENGTH = 128000

#: Qwen's chat template, for the messages the pipeline renders (text parts only): the tiny
#: processor's, so ``apply_chat_template`` of the system message gives its tokens.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# diffusers' pipeline test (PT get_dummy_components): the text model and vision tower.
TINY_TEXT: dict[str, Any] = {
    "hidden_size": 16,
    "intermediate_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [1, 1, 2]},
}
TINY_VISION: dict[str, Any] = {
    "depth": 2,
    "hidden_size": 16,
    "intermediate_size": 16,
    "num_heads": 2,
    "out_hidden_size": 16,
    "patch_size": 16,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "num_position_embeddings": 64,
    "deepstack_visual_indexes": [0],
}
#: The vision markers' config keys and tokens (the tiny tokenizer's ids replace Qwen's).
MARKERS = {
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
    "image_token_id": "<|image_pad|>",
    "video_token_id": "<|video_pad|>",
}
# --fp8_text_encoder: the decoder layers' Linear layers; embeddings, norms, lm_head, vision stay.
FP8_TARGETS = Fp8Targets(include=(r"model\.language_model\.layers\.\d+\..+",))


def tiny_model(tokenizer: PreTrainedTokenizerBase) -> torch.nn.Module:
    """The tiny Qwen3-VL (seeded, float32) over `tokenizer`'s vocabulary and vision markers."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    config = Qwen3VLConfig(text_config={**TINY_TEXT, "vocab_size": len(tokenizer)}, vision_config=TINY_VISION)
    for key, token in MARKERS.items():
        setattr(config, key, tokenizer.convert_tokens_to_ids(token))
    model: torch.nn.Module = seeded(lambda: Qwen3VLForConditionalGeneration(config))
    return model


def tiny_processor() -> ProcessorMixin:
    """``Qwen3VLProcessor`` of the tiny tokenizer and chat template, with PT's image processor
    settings (PIL, so no torchvision) and no video processor (its class needs torchvision)."""
    from transformers import Qwen2VLImageProcessorPil, Qwen3VLProcessor

    class TextImageProcessor(Qwen3VLProcessor):
        def __init__(self, image_processor: Any, tokenizer: Any, chat_template: str) -> None:
            super().__init__(image_processor, tokenizer, chat_template=chat_template)  # type: ignore[no-untyped-call]

    images = Qwen2VLImageProcessorPil(
        patch_size=16, merge_size=2, temporal_patch_size=2, min_pixels=32 * 32, max_pixels=64 * 64
    )
    processor: ProcessorMixin = TextImageProcessor(images, tiny_vl_tokenizer(), TINY_CHAT_TEMPLATE)
    return processor


def load(
    arch: ArchSpec, spec: str, device: torch.device, dtype: torch.dtype, fp8: bool, tokenizer: str | None
) -> TextEncoder:
    """The encoder for ``--text_encoder spec``: ``tiny`` or a diffusers folder (the component
    with its tokenizer, or a pipeline's ``text_encoder/`` and ``processor/``); with `fp8` its
    decoder layers' Linear weights in e4m3 (``--fp8_text_encoder``)."""
    model: torch.nn.Module
    tokens: PreTrainedTokenizerBase
    if spec == TINY:
        tokens = tiny_vl_tokenizer()
        model = tiny_model(tokens)
    elif loading.is_single_file(spec):
        raise ModelLoadError(
            f"{arch.text_flag} {spec}: single-file Qwen3-VL text encoders are not read yet; pass the "
            "pipeline folder (its text_encoder/ and processor/)"
        )
    else:
        model, tokens = _folder(spec, arch.text_flag, tokenizer)
    if fp8:
        model = to_device(model, torch.device("cpu"), dtype)
        quantize_model(model, FP8_TARGETS, "e4m3")
    return TextEncoder(tokenizer=tokens, model=to_device(model, device, dtype), max_length=MAX_LENGTH)


@torch.no_grad()
def encode(encoder: TextEncoder, captions: list[str]) -> list[torch.Tensor]:
    """One (tokens, dim) embedding per caption, as the pipeline's ``_get_qwen_prompt_embeds``
    makes it: the system message dropped, no padding."""
    drop = len(encoder.tokenizer(SYSTEM_MESSAGE, add_special_tokens=False).input_ids)
    prompts = [PROMPT_TEMPLATE.format(caption or " ") for caption in captions]  # P: " " for ""
    batch = encoder.tokenizer(prompts, padding=True, padding_side="left", return_tensors="pt")
    batch = batch.to(loading.device_of(encoder.model))
    text_model = _language_model(encoder.model)
    # the pre-norm last layer: the hook's return replaces the norm's output
    handle = text_model.norm.register_forward_hook(lambda module, args, output: args[0])
    try:
        out = encoder.model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True
        )
    finally:
        handle.remove()
    hidden = out.hidden_states[-1]
    real = batch.attention_mask.bool()
    return [h[keep][drop:].cpu() for h, keep in zip(hidden, real, strict=True)]


def _language_model(model: torch.nn.Module) -> Any:
    """The decoder stack of a ``Qwen3VLForConditionalGeneration`` (P: ``text_encoder.model``'s
    ``language_model``)."""
    inner = model.model
    return getattr(inner, "language_model", inner)


def _folder(spec: str, flag: str, tokenizer: str | None) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """Qwen3-VL and its tokenizer from a component folder (both inside, or the tokenizer in
    `tokenizer`) or a pipeline folder (``text_encoder/`` and ``processor/``)."""
    from transformers import AutoTokenizer, Qwen3VLForConditionalGeneration

    path, subfolder = loading.diffusers_folder(spec, flag, "text_encoder")
    model = Qwen3VLForConditionalGeneration.from_pretrained(
        path, subfolder=subfolder or "", local_files_only=True, use_safetensors=True
    )
    tokens_at = (
        loading.model_path(tokenizer, flag) if tokenizer else path / "processor" if subfolder else path
    )
    try:
        tokens = AutoTokenizer.from_pretrained(tokens_at, local_files_only=True)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"{flag} {spec}: no Qwen3-VL tokenizer in {tokens_at} ({error})") from None
    return model, tokens
