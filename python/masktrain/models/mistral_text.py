"""Mistral-Small-3.1 as FLUX.2 dev's text encoder (``Flux2Pipeline._get_mistral_3_small_prompt_embeds``,
diffusers 0.42.1): a caption goes in as a user turn after the pipeline's system message, through
the chat template without a generation prompt, padded to 512 tokens; hidden states 10, 20 and 30
(indices into transformers' ``hidden_states``, 0 = the embeddings) side by side per token are the
text the transformer reads, padding positions included (15360 = 3 x 5120 wide).

The model is ``Mistral3ForConditionalGeneration`` (its vision tower loads with it and is never
run: text-only input reads the language model alone). ``tiny-mistral`` is diffusers' dev
pipeline test's (``tests/pipelines/flux2/test_pipeline_flux2.py``: one layer of width 16, so it
reads layer 1 as that test does) over a tiny byte-level tokenizer with Mistral's markers
(``models.tokenizer.tiny_mistral_tokenizer``). A folder is a transformers folder or the pipeline
folder (``text_encoder/`` and ``tokenizer/``). No single file and no fp8: musubi-tuner has neither
for dev's encoder either."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from masktrain.errors import ModelLoadError
from masktrain.models import loading
from masktrain.models.base import TextEncoder
from masktrain.models.loading import seeded, to_device
from masktrain.models.tokenizer import tiny_mistral_tokenizer

if TYPE_CHECKING:
    from masktrain.catalog import ArchSpec

#: The ``--text_encoder`` value of the built-in tiny Mistral (FLUX.2 dev's encoder).
TINY_MISTRAL = "tiny-mistral"
#: Flux2Pipeline's hidden states (``text_encoder_out_layers``).
TEXT_LAYERS = (10, 20, 30)
#: diffusers' ``pipelines/flux2/system_messages.py`` SYSTEM_MESSAGE, which Flux2Pipeline prepends.
SYSTEM_MESSAGE = (
    "You are an AI that reasons about image descriptions. You give structured responses focusing on "
    "object relationships, object\nattribution and actions without speculation."
)
# diffusers' dev pipeline test (get_dummy_components), the vocabulary the tiny tokenizer's.
_TINY_TEXT: dict[str, Any] = {
    "model_type": "mistral",
    "hidden_size": 16,
    "intermediate_size": 37,
    "max_position_embeddings": 512,
    "num_attention_heads": 4,
    "num_hidden_layers": 1,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-05,
    "rope_theta": 1000000000.0,
    "sliding_window": None,
}
_TINY_VISION: dict[str, Any] = {
    "model_type": "pixtral",
    "hidden_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "intermediate_size": 37,
    "image_size": 30,
    "patch_size": 6,
    "num_channels": 3,
}


def tiny_model(vocab_size: int) -> torch.nn.Module:
    """The tiny Mistral3 (seeded, float32)."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    config = Mistral3Config(
        text_config={**_TINY_TEXT, "vocab_size": vocab_size},
        vision_config=_TINY_VISION,
        vision_feature_layer=-1,
    )
    model: torch.nn.Module = seeded(lambda: Mistral3ForConditionalGeneration(config))
    return model


def is_mistral_folder(spec: str) -> bool:
    """Whether the folder `spec` (a transformers folder or a pipeline folder) holds a Mistral3
    text encoder; False for anything else (the Qwen3 loader then says what is wrong)."""
    path = Path(spec).expanduser()
    for config in (path / "config.json", path / "text_encoder" / "config.json"):
        if config.is_file():
            try:
                return bool(json.loads(config.read_text()).get("model_type") == "mistral3")
            except (OSError, ValueError):
                return False
    return False


def is_mistral(model: torch.nn.Module) -> bool:
    """Whether `model` is a Mistral3 encoder (from :func:`load`)."""
    return getattr(getattr(model, "config", None), "model_type", None) == "mistral3"


def load(
    arch: ArchSpec, spec: str, device: torch.device, dtype: torch.dtype, *, max_length: int, fp8: bool
) -> TextEncoder:
    """Mistral3 and its tokenizer for ``arch.text_flag spec``: :data:`TINY_MISTRAL` or a folder."""
    from transformers import Mistral3ForConditionalGeneration

    if fp8:
        raise ModelLoadError(
            f"{arch.fp8_text_flag}: FLUX.2 dev's Mistral text encoder is not loaded in fp8 "
            "(nor by musubi-tuner): leave the flag out"
        )
    if spec == TINY_MISTRAL:
        tokens = tiny_mistral_tokenizer()
        return TextEncoder(tokens, to_device(tiny_model(len(tokens)), device, dtype), max_length)

    def no_file(path: Path, flag: str) -> torch.nn.Module:
        raise ModelLoadError(f"{flag} {path}: FLUX.2 dev's Mistral text encoder is read from a folder only")

    return loading.text_encoder(
        arch,
        spec,
        device,
        dtype,
        tiny=tiny_model,  # not reached: tiny-mistral is built above
        from_file=no_file,
        folder_class=Mistral3ForConditionalGeneration,
        max_length=max_length,
        fp8=False,
        to_fp8=lambda model: None,
        tokenizer=None,
    )


def text_layers(model: torch.nn.Module) -> tuple[int, ...]:
    """(10, 20, 30), or the tiny encoder's (1,) (it has one layer)."""
    depth = int(loading.diffusers_config(model).text_config.num_hidden_layers)  # a Mistral3Config
    return TEXT_LAYERS if depth > max(TEXT_LAYERS) else (1,)


@torch.no_grad()
def encode(encoder: TextEncoder, captions: Sequence[str]) -> list[torch.Tensor]:
    """One (max_length, 3 x hidden) embedding per caption, as Flux2Pipeline makes it."""
    conversations: Any = [  # transformers types content as str; Flux2Pipeline passes text parts
        [
            {"role": "system", "content": [{"type": "text", "text": SYSTEM_MESSAGE}]},
            {"role": "user", "content": [{"type": "text", "text": caption.replace("[IMG]", "")}]},
        ]
        for caption in captions
    ]
    batch: Any = encoder.tokenizer.apply_chat_template(
        conversations,
        add_generation_prompt=False,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        padding="max_length",
        truncation=True,
        max_length=encoder.max_length,
    )
    device = loading.device_of(encoder.model)
    out = encoder.model(
        input_ids=batch["input_ids"].to(device),
        attention_mask=batch["attention_mask"].to(device),
        output_hidden_states=True,
        use_cache=False,
    )
    stacked = torch.cat([out.hidden_states[k] for k in text_layers(encoder.model)], dim=-1)
    return [row.cpu() for row in stacked]
