"""Qwen-Image 2.1 (``--arch qwen_image_2_1``), text-to-image: a 7B single-stream, block-causal
transformer over unpatched 16x latents of an RGBA VAE, read with Qwen3-VL.

Facts (diffusers 0.42.1: ``pipelines/qwenimage21/pipeline_qwenimage21.py`` = P,
``models/transformers/transformer_qwenimage21.py`` = T, ``models/autoencoders/
autoencoder_kl_qwenimage21.py`` = V, ``loaders/single_file_utils.py`` = S; diffusers' tests
``tests/pipelines/qwenimage21/test_qwenimage21.py`` = PT, ``tests/models/transformers/
test_models_transformer_qwenimage21.py`` = TT):

=================  ==========================================================================
classes            ``QwenImage21Transformer2DModel``, ``AutoencoderKLQwenImage21``,
                   ``Qwen3VLForConditionalGeneration`` + ``Qwen3VLProcessor``,
                   ``FlowMatchEulerDiscreteScheduler``, ``QwenImage21Pipeline`` (P)
grid               VAE 16x spatial (4 downsamples; ``vae_scale_factor = 16``, P); the
                   transformer has ``patch_size = 1``: latents (B, 64, 1, H/16, W/16) are the
                   tokens, flattened row-major (``_pack_latents``, P). The loss grid IS the
                   latent grid (spatial factor 16, no packing to undo)
sizes              H, W multiples of 32 (P rounds down to ``vae_scale_factor * 2``): the text
                   sequence holds one "image slot" per 2x2 group of target latents (T ``img_mask``,
                   ``_IMG_TOKENS_PER_SLOT = 4``), so h*w must divide by 4
VAE                RGBA in, RGBA out (``in_channels = out_channels = 4``, V); images in [-1, 1],
                   alpha too (P: ``VaeImageProcessor.preprocess`` of an RGBA image); latents
                   normalised ``(z - latents_mean) / latents_std`` (P ``_encode_vae_image``, argmax)
text encoder       Qwen3-VL (``context_in_dim = 4096``: the 8B). Prompt: P's raw template
                   (system "Comprehend and analyze the provided prompt."), left padding; features
                   ``hidden_states[-1]`` with the final RMSNorm bypassed by a forward hook (the
                   pre-norm last-layer output); the system message's tokens dropped (P
                   ``_drop_idx``), padding removed; batch re-padded on the right with zeros, the
                   mask dropped when nothing is padded (P ``encode_prompt``). No truncation
denoiser call      ``transformer(hidden_states=(B, h*w, 64), encoder_hidden_states, timestep=t/1000
                   (= sigma), encoder_hidden_states_mask, img_shapes=[[(1, h, w)]] * B,
                   img_mask=[text slots False | h*w/4 True])`` -> the joint sequence; the target
                   is its last h*w tokens (P's loop)
prediction         ``FlowMatchEulerDiscreteScheduler.step``: ``x + (sigma_next - sigma) * v``, so v
                   is ``noise - latents``: masktrain's velocity, no sign change
sampling           ``true_cfg_scale`` 1 by default (P: "meant to be sampled without guidance");
                   sigmas ``linspace(1, 1/steps)`` shifted by ``calculate_shift`` (base 256 / max
                   4096 tokens, shift 0.5 / 1.15 are P's fallbacks when the scheduler config lacks
                   them; the released ``scheduler_config.json`` is not in this repository)
single file        ComfyUI / original: ``model.diffusion_model.`` + diffusers names, except each
                   block's SwiGLU ``img_mlp.gate_up`` (gate rows first) = diffusers' ``gate_layer``
                   and ``proj`` (S ``convert_qwen_image21_transformer_checkpoint_to_diffusers``),
                   read by ``qwen_image_2_1_checkpoint``; S has no VAE converter: VAE and text
                   encoder files are refused (folders only)
tiny configs       PT ``get_dummy_components`` (transformer, VAE, Qwen3-VL); tokenizer and
                   processor built in code here (PT fetches them from the Hub)
=================  ==========================================================================

LoRA goes on each block's attention and its SwiGLU output (``img_mlp.out``), not on the fused
(in ComfyUI) ``gate_layer`` / ``proj`` pair: a ComfyUI LoRA of one of them would need the other's
rows as zeros in a fused ``gate_up`` LoRA, which the LoRA writer does not make (yet). The text
encoder lives in ``qwen_image_2_1_text``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NoReturn

import torch

from masktrain import catalog
from masktrain.config.memory import Fp8Mode
from masktrain.errors import DataError, ModelLoadError
from masktrain.models import loading, qwen_image_2_1_checkpoint, qwen_image_2_1_text
from masktrain.models.base import (
    Conditioning,
    DenoiserInputs,
    LoraTargets,
    SampleRequest,
    StandardSampling,
    TextBatch,
    TextEncoder,
    padded_to_longest,
)
from masktrain.models.fp8 import Fp8Targets
from masktrain.models.loading import TINY, diffusers_config, encode_posterior_mean, seeded, to_uint8

#: Target latents per image slot of the text sequence (T ``_IMG_TOKENS_PER_SLOT``: 2x2).
TOKENS_PER_SLOT = 4

# PT get_dummy_components, with latents_mean / latents_std measured for the seeded tiny VAE (the
# per-channel mean and std of its posterior mean over 8 of tests/helpers.photo's 128x160 images,
# opaque) instead of PT's 0 and 1, under which the images' latents spread ~0.06 against the
# noise's 1 (wan.TINY_VAE says why that trains nothing).
TINY_VAE: dict[str, Any] = {
    "base_dim": 4,
    "decoder_base_dim": 4,
    "z_dim": 8,
    "dim_mult": [1, 1, 1, 1, 1],
    "num_res_blocks": 1,
    "attn_scales": [],
    "temperal_downsample": [False, True, True, True],
    "latents_mean": [0.0595, 0.0794, -0.1933, -0.0257, -0.009, -0.0056, -0.1284, 0.2708],
    "latents_std": [0.0561, 0.0758, 0.0283, 0.0722, 0.0493, 0.0722, 0.0625, 0.0671],
}
# PT get_dummy_components: in_channels is the tiny VAE's z_dim, context_in_dim the tiny Qwen3-VL's width.
TINY_TRANSFORMER: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 8,
    "out_channels": 8,
    "num_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "context_in_dim": 16,
    "mlp_ratio": 2,
    "axes_dims_rope": (4, 6, 6),
}

LORA_TARGETS = LoraTargets(
    include=(r"transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0)|img_mlp\.out)",), exclude=()
)
# fp8 base weights: every Linear of the blocks (attention and SwiGLU; the shared modulation is
# outside them).
FP8_TARGETS = Fp8Targets(include=(r"transformer_blocks\.\d+\..+",), exclude=(r".*norm.*",))


def tiny_transformer() -> torch.nn.Module:
    """The built-in tiny denoiser (seeded, float32, CPU)."""
    from diffusers import QwenImage21Transformer2DModel

    model: torch.nn.Module = seeded(lambda: QwenImage21Transformer2DModel(**TINY_TRANSFORMER))
    return model


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, 1, h, w) -> (B, h * w, C) tokens, as P ``_pack_latents`` (no patches)."""
    b, c, frames, h, w = latents.shape
    if frames != 1:
        raise DataError(
            f"Qwen-Image 2.1 trains on single images: got latents of shape {tuple(latents.shape)} "
            f"({frames} frames); use image datasets with --arch qwen_image_2_1"
        )
    if h % 2 or w % 2:
        raise DataError(
            f"Qwen-Image 2.1 latents need an even height and width (image sides multiples of 32), got {h}x{w}"
        )
    return latents.reshape(b, c, h * w).transpose(1, 2)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of `pack_latents`: (B, h * w, C) -> (B, C, 1, h, w)."""
    b, _, c = tokens.shape
    return tokens.transpose(1, 2).reshape(b, c, 1, h, w)


def image_slots(text: TextBatch, target_tokens: int) -> torch.Tensor:
    """T's ``img_mask`` for text-to-image: (B, L + h*w/4) bool, False on the text, True on the
    target's slots (P ``append_target_slots`` after ``encode_prompt``'s all-False text mask)."""
    b, length = text.hidden.shape[:2]
    device = text.hidden.device
    return torch.cat(
        [
            torch.zeros(b, length, dtype=torch.bool, device=device),
            torch.ones(b, target_tokens // TOKENS_PER_SLOT, dtype=torch.bool, device=device),
        ],
        dim=1,
    )


class QwenImage21Family(StandardSampling):
    spec = catalog.QWEN_IMAGE_2_1
    name = spec.name
    fp8_targets = FP8_TARGETS
    text_flag = spec.text_flag
    default_cfg_scale = 1.0  # P: sampled without guidance
    default_negative_prompt = " "

    def load_vae(self, spec: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
        from diffusers import AutoencoderKLQwenImage21

        return loading.vae(
            AutoencoderKLQwenImage21, spec, device, dtype, tiny={TINY: TINY_VAE}, from_file=_no_vae_file
        )

    def load_text_encoder(
        self,
        spec: str,
        device: torch.device,
        dtype: torch.dtype,
        fp8: bool = False,
        tokenizer: str | None = None,
    ) -> TextEncoder:
        return qwen_image_2_1_text.load(self.spec, spec, device, dtype, fp8, tokenizer)

    def spatial_factor(self, vae: torch.nn.Module) -> int:
        config = diffusers_config(vae)
        return int(2 ** len(config.temperal_downsample)) * int(config.patch_size or 1)

    def temporal_factor(self, vae: torch.nn.Module) -> int:
        return self.spec.temporal_factor

    @torch.no_grad()
    def encode_pixels(self, vae: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3 or 4, 1, H, W) in [-1, 1] -> normalised (B, 64, 1, H/16, W/16). The VAE reads RGBA:
        a fourth channel is the alpha on the same [-1, 1] scale (1 = opaque); RGB gets an opaque one."""
        if pixels.shape[1] == 3:
            pixels = torch.cat([pixels, torch.ones_like(pixels[:, :1])], dim=1)
        if pixels.shape[1] != 4:
            raise DataError(f"Qwen-Image 2.1 encodes RGB or RGBA pixels, got {pixels.shape[1]} channels")
        return encode_posterior_mean(vae, pixels)  # P _encode_vae_image: argmax, normalised

    def encode_text(self, encoder: TextEncoder, captions: list[str]) -> list[torch.Tensor]:
        return qwen_image_2_1_text.encode(encoder, captions)

    def load_transformer(
        self, spec: str, flag: str, device: torch.device, dtype: torch.dtype, fp8: Fp8Mode | None = None
    ) -> torch.nn.Module:
        from diffusers import QwenImage21Transformer2DModel

        return loading.transformer(
            QwenImage21Transformer2DModel,
            spec,
            flag,
            device,
            dtype,
            tiny=tiny_transformer,
            from_file=qwen_image_2_1_checkpoint.load_transformer_file,
            fp8=fp8,
            fp8_targets=FP8_TARGETS,
        )

    def empty_transformer(self, config: Mapping[str, Any]) -> torch.nn.Module:
        from diffusers import QwenImage21Transformer2DModel

        return loading.empty_transformer(QwenImage21Transformer2DModel, config)

    def transformer_config(self, spec: str, flag: str) -> Mapping[str, Any] | None:
        from diffusers import QwenImage21Transformer2DModel

        return loading.transformer_config(
            QwenImage21Transformer2DModel,
            spec,
            flag,
            tiny=TINY_TRANSFORMER,
            from_file=qwen_image_2_1_checkpoint.transformer_file_config,
        )

    def denoiser_inputs(self, config: Mapping[str, Any]) -> DenoiserInputs:
        patch = int(config.get("patch_size", 1))
        return DenoiserInputs(int(config["in_channels"]) // patch**2, int(config["context_in_dim"]))

    def latent_channels(self, vae: torch.nn.Module) -> int:
        return int(diffusers_config(vae).z_dim)

    def blocks(self, transformer: torch.nn.Module) -> torch.nn.ModuleList:
        blocks = transformer.transformer_blocks
        assert isinstance(blocks, torch.nn.ModuleList)
        return blocks

    def collate_text(self, embeds: list[torch.Tensor]) -> TextBatch:
        # QwenImage21Pipeline's encode_prompt, as Qwen-Image's
        return padded_to_longest(embeds)

    def predict(
        self,
        transformer: torch.nn.Module,
        noisy: torch.Tensor,
        sigmas: torch.Tensor,
        text: TextBatch,
        condition: Conditioning | None = None,
    ) -> torch.Tensor:
        if condition is not None and condition.tensors():
            raise ValueError("Qwen-Image 2.1 trains text-to-image here: it takes no conditioning")
        b, _, _, h, w = noisy.shape
        tokens = pack_latents(noisy)
        prediction = transformer(
            hidden_states=tokens,
            timestep=sigmas,  # P passes t / 1000
            encoder_hidden_states=text.hidden,
            encoder_hidden_states_mask=text.mask,
            img_shapes=[[(1, h, w)]] * b,
            img_mask=image_slots(text, tokens.shape[1]),
            return_dict=False,
        )[0]
        return unpack_latents(prediction[:, -tokens.shape[1] :], h, w)

    def generate(
        self,
        transformer: torch.nn.Module,
        high_noise: torch.nn.Module | None,
        boundary: float,
        vae: torch.nn.Module,
        request: SampleRequest,
    ) -> torch.Tensor:
        from diffusers import FlowMatchEulerDiscreteScheduler, QwenImage21Pipeline

        shift = request.flow_shift
        scheduler = FlowMatchEulerDiscreteScheduler(
            use_dynamic_shifting=shift is None, shift=1.0 if shift is None else shift
        )
        # The pipeline reads its system-token count off a processor when built, even though the
        # prompts come encoded (PT marks that xfail): the tiny processor serves, as nothing else
        # of it is used.
        pipeline = QwenImage21Pipeline(
            scheduler=scheduler,
            vae=vae,
            text_encoder=None,
            processor=qwen_image_2_1_text.tiny_processor(),
            transformer=transformer,
        )
        pipeline.set_progress_bar_config(disable=True)
        text, negative = request.text, request.negative
        images = pipeline(
            prompt_embeds=text.hidden,
            prompt_embeds_mask=text.mask,
            negative_prompt_embeds=None if negative is None else negative.hidden,
            negative_prompt_embeds_mask=None if negative is None else negative.mask,
            true_cfg_scale=request.cfg_scale,
            height=request.height,
            width=request.width,
            num_inference_steps=request.steps,
            generator=request.generator,
            output_type="np",
        ).images
        return to_uint8(images)[..., :3]  # the RGBA VAE's alpha is dropped: samples are RGB

    def sample_size_multiple(self, vae: torch.nn.Module) -> int:
        return self.spec.bucket_step

    def lora_targets(self) -> LoraTargets:
        return LORA_TARGETS

    def comfy_key(self, module_name: str) -> str:
        # S: ComfyUI's names are diffusers' (under model.diffusion_model.), but for the fused gate_up.
        if module_name.endswith(("img_mlp.gate_layer", "img_mlp.proj")):
            raise ValueError(
                f"{module_name}: ComfyUI fuses it with its pair into img_mlp.gate_up; a ComfyUI LoRA "
                "cannot hold it alone (train the default targets, or write the diffusers layout)"
            )
        return module_name

    def comfy_parts(self, original: str) -> tuple[str, ...]:
        return ()  # the default targets are one Linear each in ComfyUI's file too


def _no_vae_file(path: Any, flag: str, dtype: torch.dtype | None) -> NoReturn:
    raise ModelLoadError(
        f"{flag} {path}: single-file Qwen-Image 2.1 VAEs are not read (diffusers has no converter "
        "for them either); pass a diffusers folder (the pipeline's, or its vae/)"
    )
