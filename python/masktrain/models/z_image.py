"""Z-Image (Turbo and base: one architecture, ``--model_version``): the FLUX.1-style
``AutoencoderKL`` (8x spatial, 16 channels; 2x in the tiny test config), Qwen3 as text encoder
(``qwen3_text``: the chat template with thinking on, ``hidden_states[-2]``, each caption trimmed to
its real tokens) and ``ZImageTransformer2DModel`` (diffusers 0.42.1, ``ZImagePipeline``).

Latents are the posterior mode normalised ``(z - shift_factor) * scaling_factor`` on the
(16, 1, H/8, W/8) grid: the transformer patchifies 2x2 cells itself and returns the same grid, so
the loss and its mask work on it directly. It takes lists (one (C, 1, h, w) latent and one
(tokens, dim) caption per sample, no padding: it pads each to a multiple of 32 itself), the
timestep ``1 - sigma`` (the pipeline's ``(1000 - t) / 1000``), and predicts ``latents - noise``:
:meth:`ZImageFamily.predict` negates it into masktrain's ``noise - latents``, as the pipeline
negates it before the scheduler step.

LoRA goes on the attention and feed-forward of the main ``layers`` only, never on the refiners
(``noise_refiner``, ``context_refiner``) nor the modulation (musubi-tuner's
``networks.lora_zimage``). ComfyUI reads ``diffusion_model.`` + diffusers names for Z-Image
(``comfy.utils.z_image_to_diffusers`` maps them onto its fused ``attention.qkv``), so
``comfy_key`` keeps the diffusers names, and musubi's names are those with ``_`` for ``.``.
Block swap and gradient checkpointing work on ``layers``; the two refiner stacks (a few percent of
the weights) stay on the device with the embedders.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from masktrain import catalog
from masktrain.config.memory import Fp8Mode
from masktrain.config.timesteps import NUM_TRAIN_TIMESTEPS
from masktrain.errors import DataError
from masktrain.models import loading, qwen3_text, z_image_checkpoint
from masktrain.models.base import (
    Conditioning,
    DenoiserInputs,
    LoraTargets,
    SampleRequest,
    StandardSampling,
    TextBatch,
    TextEncoder,
    model_timesteps,
    padded_to_longest,
)
from masktrain.models.fp8 import Fp8Targets
from masktrain.models.loading import TINY, diffusers_config, seeded, to_uint8

#: ZImagePipeline's max_sequence_length: captions longer than that (in tokens) are truncated.
MAX_LENGTH = 512
#: The hidden state the pipeline reads (``hidden_states[-2]``), with the chat template's thinking on.
TEXT_LAYER = -2
#: The released scheduler (Tongyi-MAI/Z-Image-Turbo scheduler_config.json; musubi's
#: DEFAULT_SCHEDULER_SHIFT, ComfyUI's ZImage sampling shift): a fixed shift of 3.
DEFAULT_SHIFT = 3.0

# diffusers' pipeline test (tests/pipelines/z_image/test_z_image.py get_dummy_components).
TINY_TRANSFORMER: dict[str, Any] = {
    "all_patch_size": (2,),
    "all_f_patch_size": (1,),
    "in_channels": 16,
    "dim": 32,
    "n_layers": 2,
    "n_refiner_layers": 1,
    "n_heads": 2,
    "n_kv_heads": 2,
    "norm_eps": 1e-5,
    "qk_norm": True,
    "cap_feat_dim": 16,
    "rope_theta": 256.0,
    "t_scale": 1000.0,
    "axes_dims": [8, 4, 4],
    "axes_lens": [256, 32, 32],
}
TINY_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "latent_channels": 16,
    "norm_num_groups": 32,
    "sample_size": 32,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
}

#: Layers of the original checkpoint a LoRA file may name that diffusers splits or renames: the
#: fused q/k/v and the output projection (ComfyUI's z_image_to_diffusers; what musubi-tuner's
#: convert_z_image_lora_to_comfy.py writes), as a ComfyUI path or a musubi name.
ORIGINAL_ATTENTION = re.compile(r"(layers|noise_refiner|context_refiner)[._](\d+)[._]attention[._](qkv|out)")

LORA_TARGETS = LoraTargets(include=(r"layers\.\d+\..+",), exclude=(r".*(_modulation|_refiner).*",))
# fp8 base weights: every Linear of the three block stacks except norms, the modulation included
# (as Qwen-Image's: block-wise scales keep its error at e4m3's own).
FP8_TARGETS = Fp8Targets(
    include=(r"(layers|noise_refiner|context_refiner)\.\d+\..+",), exclude=(r".*norm.*",)
)


def tiny_transformer() -> torch.nn.Module:
    """The built-in tiny denoiser (seeded, float32, CPU). Its pad tokens are ones, as diffusers'
    pipeline test sets them (older diffusers left them uninitialised; the released model's are
    learned weights)."""
    from diffusers import ZImageTransformer2DModel

    def build() -> torch.nn.Module:
        model = ZImageTransformer2DModel(**TINY_TRANSFORMER)
        with torch.no_grad():
            model.x_pad_token.fill_(1.0)
            model.cap_pad_token.fill_(1.0)
        built: torch.nn.Module = model
        return built

    return seeded(build)


class ZImageFamily(StandardSampling):
    spec = catalog.Z_IMAGE
    name = spec.name
    fp8_targets = FP8_TARGETS
    text_flag = spec.text_flag
    # ZImagePipeline's guidance_scale 5.0 is g in pos + g * (pos - neg), masktrain's cfg_scale is
    # s in neg + s * (pos - neg): s = g + 1 (generate passes g = s - 1).
    default_cfg_scale = 6.0
    default_negative_prompt = ""  # the pipeline's when no negative prompt is given

    def load_vae(self, spec: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
        from diffusers import AutoencoderKL

        return loading.vae(
            AutoencoderKL,
            spec,
            device,
            dtype,
            tiny={TINY: TINY_VAE},
            from_file=z_image_checkpoint.load_vae_file,
        )

    def load_text_encoder(
        self,
        spec: str,
        device: torch.device,
        dtype: torch.dtype,
        fp8: bool = False,
        tokenizer: str | None = None,
    ) -> TextEncoder:
        return qwen3_text.load(
            self.spec, spec, device, dtype, max_length=MAX_LENGTH, fp8=fp8, tokenizer=tokenizer
        )

    def spatial_factor(self, vae: torch.nn.Module) -> int:
        return int(2 ** (len(diffusers_config(vae).block_out_channels) - 1))

    def temporal_factor(self, vae: torch.nn.Module) -> int:
        return self.spec.temporal_factor

    @torch.no_grad()
    def encode_pixels(self, vae: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        b, _, frames, h, w = pixels.shape
        images = pixels.permute(0, 2, 1, 3, 4).reshape(b * frames, 3, h, w)  # a 2-D VAE: frames in the batch
        kl: Any = vae  # an AutoencoderKL
        config = diffusers_config(vae)
        mode: torch.Tensor = kl.encode(
            images.to(device=loading.device_of(vae), dtype=kl.dtype)
        ).latent_dist.mode()
        # diffusers' train_dreambooth_lora_z_image.py: (mode - shift_factor) * scaling_factor
        latents: torch.Tensor = (mode - config.shift_factor) * config.scaling_factor
        c, lh, lw = latents.shape[1:]
        return latents.view(b, frames, c, lh, lw).permute(0, 2, 1, 3, 4)

    def encode_text(self, encoder: TextEncoder, captions: list[str]) -> list[torch.Tensor]:
        # ZImagePipeline._encode_prompt: thinking on, hidden_states[-2], each caption's real tokens
        hidden, mask = qwen3_text.hidden_states(encoder, captions, [TEXT_LAYER], enable_thinking=True)
        return [h[m].cpu() for h, m in zip(hidden[:, 0], mask, strict=True)]

    def load_transformer(
        self, spec: str, flag: str, device: torch.device, dtype: torch.dtype, fp8: Fp8Mode | None = None
    ) -> torch.nn.Module:
        from diffusers import ZImageTransformer2DModel

        return loading.transformer(
            ZImageTransformer2DModel,
            spec,
            flag,
            device,
            dtype,
            tiny=tiny_transformer,
            from_file=z_image_checkpoint.load_transformer_file,
            fp8=fp8,
            fp8_targets=FP8_TARGETS,
        )

    def empty_transformer(self, config: Mapping[str, Any]) -> torch.nn.Module:
        from diffusers import ZImageTransformer2DModel

        return loading.empty_transformer(ZImageTransformer2DModel, config)

    def transformer_config(self, spec: str, flag: str) -> Mapping[str, Any] | None:
        from diffusers import ZImageTransformer2DModel

        return loading.transformer_config(
            ZImageTransformer2DModel,
            spec,
            flag,
            tiny=TINY_TRANSFORMER,
            from_file=z_image_checkpoint.transformer_file_config,
        )

    def denoiser_inputs(self, config: Mapping[str, Any]) -> DenoiserInputs:
        return DenoiserInputs(int(config["in_channels"]), int(config["cap_feat_dim"]))

    def latent_channels(self, vae: torch.nn.Module) -> int:
        return int(diffusers_config(vae).latent_channels)

    def blocks(self, transformer: torch.nn.Module) -> torch.nn.ModuleList:
        blocks = transformer.layers
        assert isinstance(blocks, torch.nn.ModuleList)
        return blocks

    def collate_text(self, embeds: list[torch.Tensor]) -> TextBatch:
        # the pipeline passes a list of unpadded embeddings; predict hands the transformer each
        # caption's real rows again
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
            raise ValueError("Z-Image trains text-to-image only: it takes no conditioning")
        frames = noisy.shape[2]
        if frames != 1:
            raise DataError(
                f"Z-Image trains on single images: got latents of shape {tuple(noisy.shape)} ({frames} "
                "frames); use image datasets (or one frame per item) with --arch z_image"
            )
        # ZImagePipeline.__call__: one (C, 1, h, w) latent per sample, timestep (1000 - t) / 1000 of
        # the scheduler's t (= 1 - sigma, rounded as inference rounds it)
        timestep = (NUM_TRAIN_TIMESTEPS - model_timesteps(sigmas)) / NUM_TRAIN_TIMESTEPS
        prediction = transformer(list(noisy.unbind(dim=0)), timestep, captions(text), return_dict=False)[0]
        return -torch.stack(prediction)  # the pipeline's noise_pred = -model_out

    def generate(
        self,
        transformer: torch.nn.Module,
        high_noise: torch.nn.Module | None,
        boundary: float,
        vae: torch.nn.Module,
        request: SampleRequest,
    ) -> torch.Tensor:
        from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

        shift = DEFAULT_SHIFT if request.flow_shift is None else request.flow_shift
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
        pipeline = ZImagePipeline(
            scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None, transformer=transformer
        )
        pipeline.set_progress_bar_config(disable=True)
        negative = request.negative if request.cfg_scale > 1 else None
        images = pipeline(
            prompt_embeds=captions(request.text),
            negative_prompt_embeds=None if negative is None else captions(negative),
            guidance_scale=0.0 if negative is None else request.cfg_scale - 1,  # off at 0
            height=request.height,
            width=request.width,
            num_inference_steps=request.steps,
            generator=request.generator,
            output_type="np",
            max_sequence_length=MAX_LENGTH,
        ).images
        return to_uint8(images)

    def lora_targets(self) -> LoraTargets:
        return LORA_TARGETS

    def comfy_key(self, module_name: str) -> str:
        # ComfyUI's Z-Image LoRA loader reads diffusion_model. + diffusers names (z_image_to_diffusers).
        return module_name

    def comfy_parts(self, original: str) -> tuple[str, ...]:
        """The diffusers layers an original-checkpoint layer a LoRA file names stands for, so files
        in those names read (masktrain writes diffusers names): ``attention.qkv`` is to_q, to_k,
        to_v; ``attention.out`` is to_out.0 alone; () for every other layer (named as diffusers)."""
        match = ORIGINAL_ATTENTION.fullmatch(original)
        if match is None:
            return ()
        block = f"{match[1]}.{match[2]}.attention"
        return (
            (f"{block}.to_q", f"{block}.to_k", f"{block}.to_v")
            if match[3] == "qkv"
            else (f"{block}.to_out.0",)
        )


def captions(text: TextBatch) -> list[torch.Tensor]:
    """Each sample's real caption rows, the list the transformer takes (``masktrain plan``'s meta
    batch, whose mask holds no values: every row, the length it budgets for)."""
    if text.mask is None or text.hidden.is_meta:
        return list(text.hidden.unbind(dim=0))
    return [h[m.bool()] for h, m in zip(text.hidden, text.mask, strict=True)]
