"""Qwen3 as a text encoder (models.qwen3_text): the tiny model and chat tokenizer, the hidden
states against ``ZImagePipeline._encode_prompt`` run on the same model, and one ComfyUI-layout
``.safetensors`` file read back to the same outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from masktrain import catalog
from masktrain.errors import ModelLoadError
from masktrain.models import qwen3_text
from masktrain.models.fp8 import Fp8Linear

CPU = torch.device("cpu")
CAPTIONS = ["a red cat on a mat", "x"]


def tiny(max_length: int = 48, **kwargs: object) -> qwen3_text.TextEncoder:
    return qwen3_text.load(catalog.Z_IMAGE, "tiny", CPU, torch.float32, max_length=max_length, **kwargs)  # type: ignore[arg-type]


def test_chat_template_renders_as_qwen3() -> None:
    tokenizer = tiny().tokenizer
    # Qwen3's template (Qwen/Qwen3-4B tokenizer_config.json) for one user turn
    assert qwen3_text.chat_prompts(tokenizer, ["a cat"], enable_thinking=True) == [
        "<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n"
    ]
    assert qwen3_text.chat_prompts(tokenizer, ["a cat"], enable_thinking=False) == [
        "<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    ]
    ids = tokenizer("<|im_start|><think>", add_special_tokens=False).input_ids
    assert len(ids) == 2  # the markers are single tokens


def test_hidden_states_match_z_image_pipeline() -> None:
    from diffusers import ZImagePipeline

    encoder = tiny()
    pipeline = ZImagePipeline(
        scheduler=None, vae=None, text_encoder=encoder.model, tokenizer=encoder.tokenizer, transformer=None
    )
    expected = pipeline._encode_prompt(list(CAPTIONS), device=CPU, max_sequence_length=encoder.max_length)
    hidden, mask = qwen3_text.hidden_states(encoder, CAPTIONS, [-2], enable_thinking=True)
    assert hidden.shape == (2, 1, 48, 16)
    for h, m, e in zip(hidden[:, 0], mask, expected, strict=True):
        torch.testing.assert_close(h[m], e, atol=0, rtol=0)
    assert mask.sum(dim=1).tolist() == [len(c) + 19 for c in CAPTIONS]  # 19 template tokens, 1 per byte


def test_single_file_reads_back_the_model(tmp_path: Path) -> None:
    # the file's config is the released models' beyond its shapes (RoPE theta 1e6)
    encoder = tiny(tiny_overrides={"rope_parameters": qwen3_text.RELEASED_QWEN3["rope_parameters"]})
    # ComfyUI's qwen_3_4b.safetensors: transformers' names under model.
    state = {f"model.{k}": v.contiguous() for k, v in encoder.model.state_dict().items()}
    path = tmp_path / "qwen_3_tiny.safetensors"
    save_file(state, str(path))
    model = qwen3_text.load_file(path, "--text_encoder", torch.float32)
    config = model.config
    assert (config.head_dim, config.num_attention_heads, config.num_key_value_heads) == (128, 2, 2)
    ids = encoder.tokenizer(CAPTIONS[0], return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(
            model(ids).last_hidden_state, encoder.model(ids).last_hidden_state, atol=1e-6, rtol=0
        )


def test_single_file_needs_a_chat_tokenizer(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="--text_encoder_tokenizer"):
        qwen3_text.load(catalog.Z_IMAGE, str(tmp_path / "q.safetensors"), CPU, torch.float32, max_length=8)


def test_fp8_quantises_the_decoder_linears() -> None:
    encoder = tiny(fp8=True)
    fp8 = {name for name, module in encoder.model.named_modules() if isinstance(module, Fp8Linear)}
    assert fp8 and all(name.startswith("layers.") for name in fp8)
    assert len(fp8) == 2 * 7  # q, k, v, o, gate, up, down per layer


def test_a_causal_lm_folder_loads_as_the_same_encoder(tmp_path: Path) -> None:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    # FLUX.2 klein's text_encoder/ is a Qwen3ForCausalLM: its model. weights are the encoder's
    encoder = tiny()
    causal = Qwen3ForCausalLM(Qwen3Config(**qwen3_text.TINY_QWEN3, vocab_size=len(encoder.tokenizer)))
    causal.model.load_state_dict(encoder.model.state_dict())
    causal.save_pretrained(tmp_path / "pipeline" / "text_encoder")
    encoder.tokenizer.save_pretrained(tmp_path / "pipeline" / "tokenizer")
    loaded = qwen3_text.load(catalog.Z_IMAGE, str(tmp_path / "pipeline"), CPU, torch.float32, max_length=48)
    expected, mask = qwen3_text.hidden_states(encoder, CAPTIONS, [-2, -1], enable_thinking=False)
    got, got_mask = qwen3_text.hidden_states(loaded, CAPTIONS, [-2, -1], enable_thinking=False)
    assert torch.equal(got_mask, mask)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
