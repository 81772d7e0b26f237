"""Qwen3 as a text encoder, shared by Z-Image (Qwen3-4B, ``hidden_states[-2]``) and FLUX.2 klein
(Qwen3-4B / 8B, layers (9, 18, 27) stacked): a caption goes through Qwen's chat template
(``apply_chat_template`` with ``add_generation_prompt`` and the pipeline's ``enable_thinking``),
is padded to ``max_length`` and the chosen hidden states are read (``ZImagePipeline._encode_prompt``,
``Flux2KleinPipeline._get_qwen3_prompt_embeds``, diffusers 0.42.1).

Both pipelines' encoders are read here as ``Qwen3Model``: the hidden states do not depend on
``lm_head``, and a ``Qwen3ForCausalLM`` folder (klein's) loads into it. ``tiny`` is diffusers'
pipeline-test Qwen3 (``tests/pipelines/z_image/test_z_image.py``: 2 layers of width 16, 128-dim
heads) over the tiny byte-level tokenizer with Qwen3's chat markers and template
(``models.tokenizer.tiny_qwen3_tokenizer``). One ``.safetensors`` file (ComfyUI's
``qwen_3_4b.safetensors``, bf16 or fp8) holds the model under ``model.`` (``lm_head`` when untied
is not read); its config follows from the shapes, the head dim from the per-head q norm, and the
rest is the released models' (Qwen3-4B / 8B config.json: RoPE theta 1e6, eps 1e-6)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from masktrain.errors import ModelLoadError, ShapeRuleError
from masktrain.models import loading
from masktrain.models.base import TextEncoder
from masktrain.models.fp8 import Fp8Targets, quantize_model
from masktrain.models.loading import TINY, seeded, to_device
from masktrain.models.single_file import build
from masktrain.models.tokenizer import tiny_qwen3_tokenizer
from masktrain.models.weights_file import CheckpointKind, Shapes, count, open_component, register_kinds, shape

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from masktrain.catalog import ArchSpec

# diffusers' Z-Image pipeline test (get_dummy_components): Qwen3Config defaults otherwise (head_dim 128).
TINY_QWEN3: dict[str, Any] = {
    "hidden_size": 16,
    "intermediate_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
}
# What the released Qwen3-4B / Qwen3-8B config.json say and the shapes do not.
RELEASED_QWEN3: dict[str, Any] = {
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
    "max_position_embeddings": 40960,
}
#: fp8 Qwen3 (``--fp8_text_encoder``): the decoder layers' Linear layers; embeddings and norms stay.
FP8_TEXT_TARGETS = Fp8Targets(include=(r"(model\.)?layers\.\d+\..+",))

#: The model's key prefixes in ComfyUI's / transformers' files.
QWEN3_PREFIXES = ("model.", "")
QWEN3_TEXT = CheckpointKind(
    "a Qwen3 text encoder",
    "text",
    lambda n: any(
        k.startswith(("model.layers.", "layers.")) and k.endswith("self_attn.q_norm.weight") for k in n
    ),
)
register_kinds(QWEN3_TEXT)


def tiny_model(vocab_size: int, overrides: Mapping[str, Any] | None = None) -> torch.nn.Module:
    """The tiny Qwen3 (seeded, float32): :data:`TINY_QWEN3` with `overrides` (FLUX.2 klein's test
    reads deeper layers)."""
    from transformers import Qwen3Config, Qwen3Model

    config = Qwen3Config(**{**TINY_QWEN3, "vocab_size": vocab_size, **(overrides or {})})
    model: torch.nn.Module = seeded(lambda: Qwen3Model(config))
    return model


def load(
    arch: ArchSpec,
    spec: str,
    device: torch.device,
    dtype: torch.dtype,
    *,
    max_length: int,
    fp8: bool = False,
    tokenizer: str | None = None,
    tiny_overrides: Mapping[str, Any] | None = None,
) -> TextEncoder:
    """Qwen3 and its chat tokenizer for ``arch.text_flag spec``: ``tiny``, a transformers or
    diffusers pipeline folder, or one ``.safetensors`` file with the tokenizer folder `tokenizer`
    (``arch.tokenizer_flag``). With `fp8`, the decoder Linears are e4m3 (:data:`FP8_TEXT_TARGETS`)."""
    from transformers import Qwen3Model

    if spec == TINY:
        tokens = tiny_qwen3_tokenizer()
        model = tiny_model(len(tokens), tiny_overrides)
        if fp8:
            model = to_device(model, torch.device("cpu"), dtype)
            in_fp8(model)
        encoder = TextEncoder(tokens, to_device(model, device, dtype), max_length)
    else:
        encoder = loading.text_encoder(
            arch,
            spec,
            device,
            dtype,
            tiny=lambda vocab: tiny_model(vocab),  # not reached: tiny is built above
            from_file=load_file,  # ComfyUI's qwen_3_4b.safetensors / qwen_3_8b.safetensors
            folder_class=Qwen3Model,
            max_length=max_length,
            fp8=fp8,
            to_fp8=in_fp8,
            tokenizer=tokenizer,
        )
    if not getattr(encoder.tokenizer, "chat_template", None):
        raise ModelLoadError(
            f"{arch.text_flag} {spec}: its tokenizer has no chat template; pass the tokenizer of "
            f"{arch.tokenizer_hub_id} ({arch.tokenizer_flag})"
        )
    return encoder


def in_fp8(model: torch.nn.Module) -> None:
    """Qwen3's decoder Linear layers as plain e4m3 (as Qwen-Image's ``--fp8_vl``)."""
    quantize_model(model, FP8_TEXT_TARGETS, "e4m3")


def chat_prompts(
    tokenizer: PreTrainedTokenizerBase, captions: Sequence[str], enable_thinking: bool
) -> list[str]:
    """Each caption as the pipelines render it: one user turn, the generation prompt, and with
    ``enable_thinking=False`` Qwen3's empty think block."""
    prompts: list[str] = []
    for caption in captions:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": caption}],
            tokenize=False,
            add_generation_prompt=True,
            enable_thinking=enable_thinking,
        )
        assert isinstance(text, str)
        prompts.append(text)
    return prompts


@torch.no_grad()
def hidden_states(
    encoder: TextEncoder, captions: Sequence[str], layers: Sequence[int], *, enable_thinking: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, len(layers), max_length, D) hidden states of `layers` (indices into transformers'
    ``hidden_states``, 0 = the embeddings) and the (B, max_length) bool mask of real tokens, for
    `captions` in the chat template padded to ``encoder.max_length`` (truncated beyond it)."""
    batch = encoder.tokenizer(
        chat_prompts(encoder.tokenizer, captions, enable_thinking),
        padding="max_length",
        max_length=encoder.max_length,
        truncation=True,
        return_tensors="pt",
    ).to(encoder.model.device)
    out = encoder.model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        output_hidden_states=True,
        use_cache=False,
    )
    stacked = torch.stack([out.hidden_states[k] for k in layers], dim=1)
    return stacked, batch.attention_mask.bool()


# --- one .safetensors file ------------------------------------------------------------------------


def load_file(path: Path, flag: str, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """A ``Qwen3Model`` from one file (ComfyUI's layout: ``model.`` + transformers' names)."""
    from transformers import Qwen3Config, Qwen3Model

    # build() makes models from keyword arguments; transformers leaves __init_subclass__ unannotated
    class Qwen3FromShapes(Qwen3Model):  # type: ignore[no-untyped-call]
        def __init__(self, **config: Any) -> None:
            super().__init__(Qwen3Config(**config))

    file, _ = open_component(path, flag, (), QWEN3_TEXT)
    prefix = next((p for p in QWEN3_PREFIXES if f"{p}embed_tokens.weight" in file.shapes), None)
    if prefix is None:
        raise file.error("is not a complete Qwen3 text encoder: no embed_tokens.weight")
    to_file = {
        key.removeprefix(prefix): key
        for key in file.shapes
        if key.startswith(prefix)
        and key.removeprefix(prefix).startswith(("embed_tokens.", "layers.", "norm."))
    }
    config = file.infer(qwen3_config, file.renamed_shapes(to_file), None)
    return build(Qwen3FromShapes, config, file, to_file, dtype)


def qwen3_config(shapes: Shapes, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``Qwen3Config`` from the model's shapes: the head dim is the q norm's size."""
    vocab, hidden = shape(shapes, "embed_tokens.weight")
    head_dim = shape(shapes, "layers.0.self_attn.q_norm.weight")[0]
    q_width = shape(shapes, "layers.0.self_attn.q_proj.weight")[0]
    kv_width = shape(shapes, "layers.0.self_attn.k_proj.weight")[0]
    if q_width % head_dim or kv_width % head_dim:
        raise ShapeRuleError(f"q / k widths {q_width} / {kv_width} are not multiples of {head_dim}-dim heads")
    config: dict[str, Any] = {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": shape(shapes, "layers.0.mlp.gate_proj.weight")[0],
        "num_hidden_layers": count(shapes, r"layers\.(\d+)\."),
        "num_attention_heads": q_width // head_dim,
        "num_key_value_heads": kv_width // head_dim,
        "head_dim": head_dim,
        **RELEASED_QWEN3,
    }
    return config | dict(overrides or {})
