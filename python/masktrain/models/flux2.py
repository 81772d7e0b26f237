"""FLUX.2 (``--model_version dev``, ``klein-4b``, ``klein-9b``, ``klein-base-4b``,
``klein-base-9b``): ``AutoencoderKLFlux2`` (8x spatial, 32 channels; 1x in the tiny test config),
``Flux2Transformer2DModel`` and a text encoder whose features are three intermediate hidden states
stacked on the feature axis (klein: Qwen3, layers 9, 18, 27; dev: Mistral-Small-3.1, layers 10, 20,
30, ``mistral_text``).

The loss sees the grid the denoiser sees: the VAE's posterior mode, 2x2 patchified to 4x the
channels (128 for the released VAE) and normalised with the VAE's BatchNorm running statistics
(``Flux2Pipeline._encode_vae_image``), so a latent (B, 128, 1, H/16, W/16) is one token per cell
and the mask is pooled on that 16-pixel grid. ``predict`` packs the cells row-major into tokens
with the pipeline's 4-D position ids (t, h, w, l), passes sigma as the timestep (the model scales
it by 1000 itself) and returns its output unchanged: FLUX.2 predicts ``noise - latents``, which is
masktrain's velocity. Guidance is None for klein (no guidance embedding) and 1.0 for dev, as
musubi-tuner trains both.

Text is the pipeline's full padded sequence (512 tokens): ``Flux2KleinPipeline`` feeds the padding
positions' encoder outputs to the transformer without a mask, so the cache keeps them.

LoRA goes on the Linear layers of the double and single blocks, not on the shared modulation
layers outside them nor on norms (musubi-tuner's ``networks.lora_flux_2``). ComfyUI and musubi
name the layers by the original (BFL) checkpoint, whose double blocks hold q, k and v in one fused
``qkv`` Linear: :meth:`Flux2Family.comfy_parts` says which diffusers layers make each fused one
(``denoiser.lora_file`` fuses their LoRAs on export and splits them on reading).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from masktrain import catalog
from masktrain.config.memory import Fp8Mode
from masktrain.errors import DataError, SettingError
from masktrain.models import flux2_checkpoint, loading
from masktrain.models.base import (
    Conditioning,
    DenoiserInputs,
    LoraTargets,
    SampleRequest,
    StandardSampling,
    TextBatch,
    TextEncoder,
)
from masktrain.models.fp8 import Fp8Targets
from masktrain.models.loading import TINY, diffusers_config, seeded, to_uint8

#: Flux2KleinPipeline's prompt length; the whole padded sequence is the text the transformer reads.
MAX_LENGTH = 512
#: The Qwen3 hidden states klein stacks (``Flux2KleinPipeline`` ``text_encoder_out_layers``).
KLEIN_TEXT_LAYERS = (9, 18, 27)
#: The tiny Qwen3 has 2 layers: diffusers' klein pipeline test reads ``text_encoder_out_layers=(1,)``.
TINY_TEXT_LAYERS = (1,)
#: The tiny encoder's prompt length (diffusers' klein pipeline test: ``max_sequence_length=64``).
TINY_MAX_LENGTH = 64

# diffusers' klein pipeline test (tests/pipelines/flux2/test_pipeline_flux2_klein.py): 4 packed
# channels (the tiny VAE's 1 latent channel, 2x2 patchified); joint_attention_dim is the tiny
# Qwen3's width (16) times its one stacked layer.
TINY_TRANSFORMER: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 4,
    "num_layers": 1,
    "num_single_layers": 1,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 16,
    "timestep_guidance_channels": 256,
    "axes_dims_rope": (4, 4, 4, 4),
    "guidance_embeds": False,
}
# The same test's VAE: one block, so 1x spatial (2x after the 2x2 patchify), one latent channel.
TINY_VAE: dict[str, Any] = {
    "sample_size": 32,
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",),
    "up_block_types": ("UpDecoderBlock2D",),
    "block_out_channels": (4,),
    "layers_per_block": 1,
    "latent_channels": 1,
    "norm_num_groups": 1,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}

#: VAE cells per patch side: each transformer token is 2x2 VAE cells.
PATCH = 2
LORA_TARGETS = LoraTargets(include=(r"(single_)?transformer_blocks\.\d+\..+",), exclude=(r".*norm.*",))
# fp8 base weights: the blocks' Linear layers (musubi's lists); the modulation layers are outside.
FP8_TARGETS = Fp8Targets(include=(r"(single_)?transformer_blocks\.\d+\..+",), exclude=(r".*norm.*",))

# diffusers module name (inside a block) -> the BFL checkpoint's, for the layers kept one to one.
_DOUBLE_NAMES = {
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "ff.linear_in": "img_mlp.0",
    "ff.linear_out": "img_mlp.2",
    "ff_context.linear_in": "txt_mlp.0",
    "ff_context.linear_out": "txt_mlp.2",
}
_SINGLE_NAMES = {"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2"}
# The BFL fused q/k/v Linear of a double block and the diffusers layers it is made of, in order.
_FUSED_QKV = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
_BLOCK = re.compile(r"(single_transformer_blocks|transformer_blocks)\.(\d+)\.(.+)")
_FUSED = re.compile(r"double_blocks[._](\d+)[._](img|txt)_attn[._]qkv")
_BFL_BLOCKS = {"transformer_blocks": "double_blocks", "single_transformer_blocks": "single_blocks"}


def tiny_transformer() -> torch.nn.Module:
    """The built-in tiny denoiser (klein's architecture: no guidance embedding), seeded."""
    from diffusers import Flux2Transformer2DModel

    model: torch.nn.Module = seeded(lambda: Flux2Transformer2DModel(**TINY_TRANSFORMER))
    return model


def patchify(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 4C, H/2, W/2), channel ``c*4 + ph*2 + pw``
    (``Flux2Pipeline._patchify_latents``)."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, c * 4, h // 2, w // 2)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, 1, h, w) -> (B, h*w, C) tokens, row-major (``Flux2Pipeline._pack_latents``)."""
    b, c, frames, h, w = latents.shape
    if frames != 1:
        raise DataError(
            f"FLUX.2 trains on single images: got latents of shape {tuple(latents.shape)} ({frames} "
            "frames); use image datasets (or one frame per item) with --arch flux2"
        )
    return latents.reshape(b, c, h * w).permute(0, 2, 1)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of `pack_latents`: (B, h*w, C) -> (B, C, 1, h, w)."""
    b, _, c = tokens.shape
    return tokens.permute(0, 2, 1).reshape(b, c, 1, h, w)


def latent_ids(h: int, w: int, device: torch.device) -> torch.Tensor:
    """(h*w, 4) position ids (t=0, row, column, l=0) of the tokens (``_prepare_latent_ids``)."""
    zero = torch.arange(1, device=device)
    return torch.cartesian_prod(zero, torch.arange(h, device=device), torch.arange(w, device=device), zero)


def text_ids(length: int, device: torch.device) -> torch.Tensor:
    """(length, 4) position ids (0, 0, 0, l) of the text tokens (``_prepare_text_ids``)."""
    zero = torch.arange(1, device=device)
    return torch.cartesian_prod(zero, zero, zero, torch.arange(length, device=device))


def text_layers(model: torch.nn.Module) -> tuple[int, ...]:
    """The hidden states klein stacks: (9, 18, 27), or the tiny encoder's (1,) (it has 2 layers)."""
    depth = int(diffusers_config(model).num_hidden_layers)
    return KLEIN_TEXT_LAYERS if depth > max(KLEIN_TEXT_LAYERS) else TINY_TEXT_LAYERS


def bfl_name(module_name: str) -> str:
    """A diffusers block Linear's name in the BFL checkpoint (``single_transformer_blocks.0.attn.
    to_out`` -> ``single_blocks.0.linear2``); a double block's q, k or v is named by its fused
    ``qkv`` Linear; any other name is returned unchanged."""
    match = _BLOCK.fullmatch(module_name)
    if match is None:
        return module_name
    blocks, index, layer = match.groups()
    if blocks == "single_transformer_blocks":
        renamed = _SINGLE_NAMES.get(layer, layer)
    else:
        fused = next((qkv for qkv, parts in _FUSED_QKV.items() if layer in parts), None)
        renamed = fused or _DOUBLE_NAMES.get(layer, layer)
    return f"{_BFL_BLOCKS[blocks]}.{index}.{renamed}"


class Flux2Family(StandardSampling):
    spec = catalog.FLUX2
    name = spec.name
    fp8_targets = FP8_TARGETS
    text_flag = spec.text_flag
    default_cfg_scale = 4.0  # Flux2KleinPipeline's guidance_scale (real CFG for the base models)
    default_negative_prompt = ""  # Flux2KleinPipeline's

    def load_vae(self, spec: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
        from diffusers import AutoencoderKLFlux2

        return loading.vae(
            AutoencoderKLFlux2,
            spec,
            device,
            dtype,
            tiny={TINY: TINY_VAE},
            from_file=flux2_checkpoint.load_vae_file,
        )

    def load_text_encoder(
        self,
        spec: str,
        device: torch.device,
        dtype: torch.dtype,
        fp8: bool = False,
        tokenizer: str | None = None,
    ) -> TextEncoder:
        """klein's Qwen3 (``qwen3_text``), or dev's Mistral-Small-3.1 (``mistral_text``) for a
        folder holding one and for ``tiny-mistral``."""
        from masktrain.models import mistral_text, qwen3_text

        tiny = spec in (TINY, mistral_text.TINY_MISTRAL)
        max_length = TINY_MAX_LENGTH if tiny else MAX_LENGTH
        if spec == mistral_text.TINY_MISTRAL or (not tiny and mistral_text.is_mistral_folder(spec)):
            return mistral_text.load(self.spec, spec, device, dtype, max_length=max_length, fp8=fp8)
        return qwen3_text.load(
            self.spec, spec, device, dtype, max_length=max_length, fp8=fp8, tokenizer=tokenizer
        )

    def spatial_factor(self, vae: torch.nn.Module) -> int:
        # the VAE's 2^(blocks - 1), times the 2x2 patchify
        return int(2 ** (len(diffusers_config(vae).block_out_channels) - 1)) * PATCH

    def temporal_factor(self, vae: torch.nn.Module) -> int:
        return self.spec.temporal_factor  # an image model

    def sample_size_multiple(self, vae: torch.nn.Module) -> int:
        """The latent grid already includes the 2x2 patches (``Flux2Pipeline``: ``vae_scale_factor * 2``)."""
        return self.spatial_factor(vae)

    @torch.no_grad()
    def encode_pixels(self, vae: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        b, _, frames, h, w = pixels.shape
        images = pixels.permute(0, 2, 1, 3, 4).reshape(b * frames, 3, h, w)  # a 2-D VAE: frames in the batch
        flux2_vae: Any = vae  # an AutoencoderKLFlux2: its encode and BatchNorm statistics
        encoded = flux2_vae.encode(images.to(device=loading.device_of(vae), dtype=flux2_vae.dtype))
        latents = patchify(encoded.latent_dist.mode())
        # Flux2Pipeline._encode_vae_image: the running statistics of the patchified latents
        bn, eps = flux2_vae.bn, diffusers_config(vae).batch_norm_eps
        mean: torch.Tensor = bn.running_mean.view(1, -1, 1, 1).to(latents.dtype)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + eps).to(latents.dtype)
        latents = (latents - mean) / std
        c, lh, lw = latents.shape[1:]
        return latents.view(b, frames, c, lh, lw).permute(0, 2, 1, 3, 4)

    def encode_text(self, encoder: TextEncoder, captions: list[str]) -> list[torch.Tensor]:
        # Flux2KleinPipeline._get_qwen3_prompt_embeds: the chat template without thinking, padded to
        # max_length, the chosen hidden states side by side per token; every position is kept (the
        # transformer reads the padding too, without a mask). dev: Flux2Pipeline's (mistral_text).
        from masktrain.models import mistral_text, qwen3_text

        if mistral_text.is_mistral(encoder.model):
            return mistral_text.encode(encoder, captions)
        layers = text_layers(encoder.model)
        stacked, _ = qwen3_text.hidden_states(encoder, captions, layers, enable_thinking=False)
        b, n, length, dim = stacked.shape
        return list(stacked.permute(0, 2, 1, 3).reshape(b, length, n * dim).cpu())

    def load_transformer(
        self, spec: str, flag: str, device: torch.device, dtype: torch.dtype, fp8: Fp8Mode | None = None
    ) -> torch.nn.Module:
        from diffusers import Flux2Transformer2DModel

        return loading.transformer(
            Flux2Transformer2DModel,
            spec,
            flag,
            device,
            dtype,
            tiny=tiny_transformer,
            from_file=flux2_checkpoint.load_transformer_file,
            fp8=fp8,
            fp8_targets=FP8_TARGETS,
        )

    def empty_transformer(self, config: Mapping[str, Any]) -> torch.nn.Module:
        from diffusers import Flux2Transformer2DModel

        return loading.empty_transformer(Flux2Transformer2DModel, config)

    def transformer_config(self, spec: str, flag: str) -> Mapping[str, Any] | None:
        from diffusers import Flux2Transformer2DModel

        return loading.transformer_config(
            Flux2Transformer2DModel,
            spec,
            flag,
            tiny=TINY_TRANSFORMER,
            from_file=flux2_checkpoint.transformer_file_config,
        )

    def denoiser_inputs(self, config: Mapping[str, Any]) -> DenoiserInputs:
        # one token per cell of the patchified grid the cache holds (patch_size 1)
        return DenoiserInputs(int(config["in_channels"]), int(config["joint_attention_dim"]))

    def latent_channels(self, vae: torch.nn.Module) -> int:
        """The channels of `encode_pixels`' grid: the VAE's, times its 2x2 patches."""
        return int(diffusers_config(vae).latent_channels) * PATCH**2

    def blocks(self, transformer: torch.nn.Module) -> torch.nn.ModuleList:
        """The double-stream blocks, then the single-stream ones, as the forward runs them. Block
        swap counts each one as a block and swaps the last N of this list (single blocks first):
        ``--blocks_to_swap N`` is not musubi-tuner's N, which counts two single blocks as one and
        spreads N over both kinds (``flux_2/flux2_models.py`` ``enable_block_swap``)."""
        double, single = transformer.transformer_blocks, transformer.single_transformer_blocks
        assert isinstance(double, torch.nn.ModuleList) and isinstance(single, torch.nn.ModuleList)
        return torch.nn.ModuleList([*double, *single])

    def collate_text(self, embeds: list[torch.Tensor]) -> TextBatch:
        # every caption is the full padded sequence (encode_text): stacked as they are, no mask
        lengths = {e.shape[0] for e in embeds}
        if len(lengths) != 1:
            raise DataError(
                f"FLUX.2 text embeddings of different lengths {sorted(lengths)}: the cache holds the "
                "padded sequence of one text encoder; run masktrain cache again"
            )
        return TextBatch(hidden=torch.stack(embeds), mask=None)

    def predict(
        self,
        transformer: torch.nn.Module,
        noisy: torch.Tensor,
        sigmas: torch.Tensor,
        text: TextBatch,
        condition: Conditioning | None = None,
    ) -> torch.Tensor:
        if condition is not None and condition.tensors():
            raise ValueError("FLUX.2 trains text-to-image only: it takes no conditioning")
        h, w = noisy.shape[-2:]
        config = diffusers_config(transformer)
        # musubi-tuner trains dev with guidance 1.0; klein has no guidance embedding
        guidance = torch.ones_like(sigmas) if config.guidance_embeds else None
        prediction = transformer(
            hidden_states=pack_latents(noisy),
            encoder_hidden_states=text.hidden,
            timestep=sigmas,  # the pipeline passes t / 1000; the model multiplies by 1000
            img_ids=latent_ids(h, w, noisy.device),
            txt_ids=text_ids(text.hidden.shape[1], noisy.device),
            guidance=guidance,
            return_dict=False,
        )[0]
        return unpack_latents(prediction, h, w)

    def generate(
        self,
        transformer: torch.nn.Module,
        high_noise: torch.nn.Module | None,
        boundary: float,
        vae: torch.nn.Module,
        request: SampleRequest,
    ) -> torch.Tensor:
        from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Pipeline

        shift = request.flow_shift
        # the pipelines pass their own mu (compute_empirical_mu) unless --fs fixes the shift
        scheduler = FlowMatchEulerDiscreteScheduler(
            use_dynamic_shifting=shift is None, shift=1.0 if shift is None else shift
        )
        settings: dict[str, Any] = {
            "prompt_embeds": request.text.hidden,
            "height": request.height,
            "width": request.width,
            "num_inference_steps": request.steps,
            "guidance_scale": request.cfg_scale,
            "generator": request.generator,
            "output_type": "np",
        }
        pipeline: Flux2Pipeline | Flux2KleinPipeline
        if diffusers_config(transformer).guidance_embeds:  # dev: guidance is an input, no CFG pass
            pipeline = Flux2Pipeline(
                scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None, transformer=transformer
            )
        else:
            if request.negative is not None:
                settings["negative_prompt_embeds"] = request.negative.hidden
            elif request.cfg_scale > 1:
                raise SettingError(
                    "FLUX.2 klein sampling with a cfg_scale above 1 needs a negative prompt (--n)"
                )
            pipeline = Flux2KleinPipeline(
                scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None, transformer=transformer
            )
        pipeline.set_progress_bar_config(disable=True)
        return to_uint8(pipeline(**settings).images)

    def lora_targets(self) -> LoraTargets:
        return LORA_TARGETS

    def comfy_key(self, module_name: str) -> str:
        return bfl_name(module_name)

    def comfy_parts(self, original: str) -> tuple[str, ...]:
        """The diffusers layers the BFL checkpoint's layer `original` (a ComfyUI path or a musubi
        name) fuses, in its output order: a double block's ``img_attn.qkv`` is to_q, to_k, to_v and
        its ``txt_attn.qkv`` add_q/k/v_proj; () for every other layer (``linear1`` is diffusers'
        ``to_qkv_mlp_proj`` as it is)."""
        match = _FUSED.fullmatch(original)
        if match is None:
            return ()
        index, stream = match.groups()
        return tuple(f"transformer_blocks.{index}.{part}" for part in _FUSED_QKV[f"{stream}_attn.qkv"])
