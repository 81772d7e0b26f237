"""Qwen-Image: ``AutoencoderKLQwenImage`` (8x spatial; 4x in the tiny test config) and the
Qwen2.5-VL text encoder, whose features are the last hidden state of a chat template with the
template's prefix dropped (``QwenImagePipeline``: 34 tokens for the real tokenizer; computed from
the tokenizer here, so the tiny tokenizer drops exactly its own prefix).
"""

from __future__ import annotations

import torch

from masktrain.models.base import (
    TINY,
    TextEncoder,
    encode_posterior_mean,
    pretrained_text_encoder,
    pretrained_vae,
    seeded,
    to_device,
)
from masktrain.models.tokenizer import tiny_tokenizer

PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
#: QwenImagePipeline's maximum prompt length (after the prefix is dropped).
MAX_LENGTH = 1024

# diffusers' pipeline test config (tests/pipelines/qwenimage/test_qwenimage.py).
TINY_VAE = {
    "base_dim": 4 * 6, "z_dim": 4, "dim_mult": [1, 2, 4], "num_res_blocks": 1,
    "temperal_downsample": [False, True], "latents_mean": [0.0] * 4, "latents_std": [1.0] * 4,
}  # fmt: skip
TINY_TEXT = {
    "hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
    "num_key_value_heads": 2, "rope_theta": 1e6,
    "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
    "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 1,
}  # fmt: skip


class QwenImageFamily:
    name = "qwen_image"
    text_flag = "--text_encoder"

    def load_vae(self, spec: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
        from diffusers import AutoencoderKLQwenImage

        if spec == TINY:
            vae = seeded(lambda: AutoencoderKLQwenImage(**TINY_VAE))
        else:
            vae = pretrained_vae(AutoencoderKLQwenImage, spec)
        return to_device(vae, device, dtype)

    def load_text_encoder(self, spec: str, device: torch.device, dtype: torch.dtype) -> TextEncoder:
        from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel

        if spec == TINY:
            tokenizer = tiny_tokenizer()
            config = Qwen2_5_VLTextConfig(vocab_size=len(tokenizer), **TINY_TEXT)
            model = seeded(lambda: Qwen2_5_VLTextModel(config))
        else:
            model, tokenizer = pretrained_text_encoder(
                Qwen2_5_VLForConditionalGeneration, spec, self.text_flag
            )
        model = to_device(model, device, dtype)
        return TextEncoder(tokenizer=tokenizer, model=model, max_length=MAX_LENGTH)

    def spatial_factor(self, vae: torch.nn.Module) -> int:
        return 2 ** len(vae.temperal_downsample)

    def temporal_factor(self, vae: torch.nn.Module) -> int:
        return 1

    def encode_pixels(self, vae: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        return encode_posterior_mean(vae, pixels)

    @torch.no_grad()
    def encode_text(self, encoder: TextEncoder, captions: list[str]) -> list[torch.Tensor]:
        prefix = PROMPT_TEMPLATE.split("{}")[0]
        drop = len(encoder.tokenizer(prefix, add_special_tokens=False).input_ids)
        batch = encoder.tokenizer(
            [PROMPT_TEMPLATE.format(c) for c in captions],
            padding="longest",
            truncation=True,
            max_length=encoder.max_length + drop,
            return_tensors="pt",
        ).to(encoder.model.device)
        out = encoder.model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True
        )
        hidden = out.hidden_states[-1]
        lengths = batch.attention_mask.sum(dim=1)
        return [h[drop : int(n)].cpu() for h, n in zip(hidden, lengths, strict=True)]
