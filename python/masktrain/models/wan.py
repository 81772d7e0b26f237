"""WAN 2.1 / 2.2: ``AutoencoderKLWan`` (8x spatial, 4x temporal; 16x and 48 channels for the
WAN 2.2 TI2V-5B VAE) and the UMT5 text encoder.

Latents are the normalised posterior mean (``base.encode_posterior_mean``).
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

#: The TI2V-5B VAE's tiny variant (16x spatial, 48 channels): ``--vae tiny-ti2v``.
TINY_TI2V = "tiny-ti2v"

# diffusers' own test configs (tests/models/autoencoders/test_models_autoencoder_wan.py,
# tests/pipelines/wan/test_wan_22.py).
TINY_VAE = {
    "base_dim": 3, "z_dim": 16, "dim_mult": [1, 1, 1, 1], "num_res_blocks": 1,
    "temperal_downsample": [False, True, True],
}  # fmt: skip
TINY_TI2V_VAE = {
    "base_dim": 3, "z_dim": 48, "in_channels": 12, "out_channels": 12, "is_residual": True, "patch_size": 2,
    "latents_mean": [0.0] * 48, "latents_std": [1.0] * 48, "dim_mult": [1, 1, 1, 1], "num_res_blocks": 1,
    "scale_factor_spatial": 16, "scale_factor_temporal": 4, "temperal_downsample": [False, True, True],
}  # fmt: skip
TINY_T5 = {
    "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4,
    "relative_attention_num_buckets": 8, "feed_forward_proj": "gated-gelu", "dropout_rate": 0.0,
    "pad_token_id": 0, "eos_token_id": 1,
}  # fmt: skip
#: WanPipeline's default prompt length.
MAX_LENGTH = 512


class WanFamily:
    name = "wan"
    text_flag = "--t5"

    def load_vae(self, spec: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
        from diffusers import AutoencoderKLWan

        if spec in (TINY, TINY_TI2V):
            config = TINY_VAE if spec == TINY else TINY_TI2V_VAE
            vae = seeded(lambda: AutoencoderKLWan(**config))
        else:
            vae = pretrained_vae(AutoencoderKLWan, spec)
        return to_device(vae, device, dtype)

    def load_text_encoder(self, spec: str, device: torch.device, dtype: torch.dtype) -> TextEncoder:
        from transformers import UMT5Config, UMT5EncoderModel

        if spec == TINY:
            tokenizer = tiny_tokenizer()
            model = seeded(lambda: UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), **TINY_T5)))
        else:
            model, tokenizer = pretrained_text_encoder(UMT5EncoderModel, spec, self.text_flag)
        model = to_device(model, device, dtype)
        return TextEncoder(tokenizer=tokenizer, model=model, max_length=MAX_LENGTH)

    def spatial_factor(self, vae: torch.nn.Module) -> int:
        return int(vae.config.scale_factor_spatial)

    def temporal_factor(self, vae: torch.nn.Module) -> int:
        return int(vae.config.scale_factor_temporal)

    def encode_pixels(self, vae: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        return encode_posterior_mean(vae, pixels)

    @torch.no_grad()
    def encode_text(self, encoder: TextEncoder, captions: list[str]) -> list[torch.Tensor]:
        batch = encoder.tokenizer(
            captions, padding="longest", truncation=True, max_length=encoder.max_length, return_tensors="pt"
        ).to(encoder.model.device)
        hidden = encoder.model(batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        # The pipeline keeps the real tokens and zero-pads later; the cache stores them trimmed.
        return [h[: int(n)].cpu() for h, n in zip(hidden, batch.attention_mask.sum(dim=1), strict=True)]
