"""Qwen-Image: ``AutoencoderKLQwenImage`` (8x spatial; 4x in the tiny test config), the
Qwen2.5-VL text encoder, whose features are the last hidden state of a chat template with the
template's prefix dropped (``QwenImagePipeline``: 34 tokens for the real tokenizer; computed from
the tokenizer here, so the tiny tokenizer drops exactly its own prefix), and
``QwenImageTransformer2DModel``.

The denoiser sees single images only: latents (B, C, 1, h, w) are packed into 2x2 patch tokens
(``QwenImagePipeline._pack_latents``), the timestep is sigma on the 0..1 scale (t / 1000) and text
is padded to the batch's longest embedding with a 0/1 mask. Qwen-Image-Edit (``--model_version
edit``, ``edit-2509``, ``edit-2511``) appends each control image's clean latents, packed at its own
size, after the target's tokens, and keeps the prediction of the target tokens only
(``QwenImageEditPlusPipeline``); its text encoder also reads the control images (``qwen_vl``).
Edit-2511's transformer has ``zero_cond_t``: it runs the control tokens at timestep 0 itself.
Qwen-Image-Layered (``--model_version layered``): ``predict`` and ``generate`` hand a layered
transformer (``use_layer3d_rope``) to ``qwen_layered``.

LoRA goes on the attention and the image / text MLPs of every block, not on the modulation layers
(``img_mod`` / ``txt_mod``), as musubi-tuner's ``lora_qwen_image`` does; ComfyUI uses the diffusers
module names.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from masktrain import catalog
from masktrain.config.memory import Fp8Mode
from masktrain.errors import DataError
from masktrain.models import loading, qwen_image_checkpoint, qwen_layered, qwen_vl
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
from masktrain.models.fp8 import Fp8Targets, quantize_model
from masktrain.models.loading import TINY, diffusers_config, encode_posterior_mean, seeded, to_uint8
from masktrain.models.qwen_vl import TINY_TEXT

if TYPE_CHECKING:
    from PIL import Image

PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
#: QwenImagePipeline's maximum prompt length (after the prefix is dropped).
MAX_LENGTH = 1024
#: The released Qwen-Image scheduler (scheduler/scheduler_config.json; musubi's get_scheduler):
#: the shift follows the image size unless the prompt file sets --fs.
SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "base_image_seq_len": 256,
    "max_image_seq_len": 8192,
    "base_shift": 0.5,
    "max_shift": 0.9,
    "shift_terminal": 0.02,
    "time_shift_type": "exponential",
}

# diffusers' pipeline test config (tests/pipelines/qwenimage/test_qwenimage.py), with the
# normalisation constants measured for the seeded tiny VAE (as wan.TINY_VAE explains) instead of
# the test config's 0 and 1, under which the image content is ~6% of the latents' scale.
TINY_VAE: dict[str, Any] = {
    "base_dim": 4 * 6,
    "z_dim": 4,
    "dim_mult": [1, 2, 4],
    "num_res_blocks": 1,
    "temperal_downsample": [False, True],
    "latents_mean": [0.115, -0.0957, 0.216, -0.193],
    "latents_std": [0.054, 0.0604, 0.0576, 0.0846],
}
# diffusers' model test config (tests/models/transformers/test_models_transformer_qwenimage.py): the
# tiny VAE's 4 latent channels pack to 16, and joint_attention_dim is the tiny encoder's width.
TINY_TRANSFORMER: dict[str, Any] = {
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 4,
    "num_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 4,
    "joint_attention_dim": 16,
    "guidance_embeds": False,
    "axes_dims_rope": (8, 4, 4),
}

LORA_TARGETS = LoraTargets(include=(r"transformer_blocks\.\d+\..+",), exclude=(r".*(img_mod|txt_mod).*",))
# fp8 base weights: every Linear of the blocks except norms (musubi-tuner's Qwen-Image lists). The
# modulation Linears (img_mod / txt_mod, 3072 -> 18432) are quantised too, as musubi does: they hold
# a third of the model's 20B weights, and block-wise scales keep their error at e4m3's own.
FP8_TARGETS = Fp8Targets(include=(r"transformer_blocks\.\d+\..+",), exclude=(r".*norm.*",))
# fp8 Qwen2.5-VL (--fp8_vl): the decoder layers' Linear layers; embeddings, norms, lm_head stay.
FP8_VL_TARGETS = Fp8Targets(include=(r"(model\.)?(language_model\.)?layers\.\d+\..+",))


#: ``--dit tiny`` under ``--model_version edit-2511`` (``catalog.Mode.tiny``): control tokens at
#: timestep 0. Edit and Edit-2509 are the plain tiny transformer, as their released ones are
#: Qwen-Image's architecture.
TINY_EDIT_2511 = "tiny-edit-2511"
TINY_VARIANTS: dict[str, dict[str, Any]] = {
    TINY_EDIT_2511: {**TINY_TRANSFORMER, "zero_cond_t": True},
    # --model_version layered: layer RoPE and the "is RGB" timestep embedding (qwen_layered)
    qwen_layered.TINY_LAYERED: {**TINY_TRANSFORMER, **qwen_layered.LAYERED_FLAGS},
}


def tiny_transformer(
    width_mult: int = 1, layers: int = 2, zero_cond_t: bool = False, layered: bool = False
) -> torch.nn.Module:
    """The built-in tiny denoiser (seeded, float32, CPU); ``width_mult`` multiplies the heads (head
    size stays 16, so RoPE is unchanged), ``layers`` sets the depth, ``zero_cond_t`` makes it an
    Edit-2511 one. The defaults give the ``--dit tiny`` model; larger values give benchmark-sized
    variants that still fit the tiny VAE and text encoder."""
    from diffusers import QwenImageTransformer2DModel

    if width_mult < 1 or layers < 1:
        raise ValueError(f"width_mult and layers must be >= 1, got {width_mult} and {layers}")
    config: dict[str, Any] = {
        **TINY_TRANSFORMER,
        "num_attention_heads": TINY_TRANSFORMER["num_attention_heads"] * width_mult,
        "num_layers": layers,
        "zero_cond_t": zero_cond_t,
        **(qwen_layered.LAYERED_FLAGS if layered else {}),
    }
    model: torch.nn.Module = seeded(lambda: QwenImageTransformer2DModel(**config))
    return model


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, 1, h, w) -> (B, h/2 * w/2, C * 4) tokens, as ``QwenImagePipeline._pack_latents``."""
    b, c, frames, h, w = latents.shape
    if frames != 1:
        raise DataError(
            f"Qwen-Image trains on single images: got latents of shape {tuple(latents.shape)} "
            f"({frames} frames); use image datasets (or one frame per item) with --arch qwen_image"
        )
    if h % 2 or w % 2:
        raise DataError(f"Qwen-Image latents need an even height and width (2x2 patches), got {h}x{w}")
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def edit_version_mismatch(config: Mapping[str, Any], version: str | None) -> str | None:
    """What is wrong with a transformer of `config` for ``--model_version version`` (None: nothing
    its config shows). Only Edit-2511 differs in its config (``zero_cond_t``); the original, Edit
    and Edit-2509 transformers have the same architecture and config; Layered's has its own
    (``qwen_layered.version_mismatch``)."""
    layered = qwen_layered.version_mismatch(config, version)
    if layered is not None:
        return layered
    zero_cond_t = bool(config.get("zero_cond_t", False))
    if version == "edit-2511" and not zero_cond_t:
        return (
            "is not a Qwen-Image-Edit-2511 transformer (no zero_cond_t: its control tokens would be noised)"
        )
    if version != "edit-2511" and zero_cond_t:
        return "is a Qwen-Image-Edit-2511 transformer (zero_cond_t): pass --model_version edit-2511"
    return None


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of `pack_latents`: (B, h/2 * w/2, C * 4) -> (B, C, 1, h, w)."""
    b, _, features = tokens.shape
    c = features // 4
    x = tokens.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, 1, h, w)


class QwenImageFamily(StandardSampling):
    spec = catalog.QWEN_IMAGE
    name = spec.name
    fp8_targets = FP8_TARGETS
    text_flag = spec.text_flag
    default_cfg_scale = 4.0  # musubi's and QwenImagePipeline's true_cfg_scale
    default_negative_prompt = " "  # musubi's; QwenImagePipeline's docs suggest it too

    def load_vae(self, spec: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
        from diffusers import AutoencoderKLQwenImage

        return loading.vae(
            AutoencoderKLQwenImage,
            spec,
            device,
            dtype,
            tiny={TINY: TINY_VAE, qwen_layered.TINY_LAYERED: {**TINY_VAE, **qwen_layered.TINY_VAE_CHANGES}},
            from_file=qwen_image_checkpoint.load_vae_file,
        )

    def load_text_encoder(
        self,
        spec: str,
        device: torch.device,
        dtype: torch.dtype,
        fp8: bool = False,
        tokenizer: str | None = None,
        vision: bool = False,
    ) -> TextEncoder:
        """With `vision`, Qwen2.5-VL with its vision tower and processor, for the edit modes'
        :meth:`encode_edit_text` (``qwen_vl.load``); otherwise the text model for ``encode_text``."""
        from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel

        if vision:
            return qwen_vl.load(spec, device, dtype, fp8, _vl_in_fp8, tokenizer, MAX_LENGTH)
        return loading.text_encoder(
            self.spec,
            spec,
            device,
            dtype,
            tiny=lambda vocab: Qwen2_5_VLTextModel(Qwen2_5_VLTextConfig(vocab_size=vocab, **TINY_TEXT)),
            from_file=qwen_image_checkpoint.load_text_encoder_file,  # ComfyUI's qwen_2.5_vl_7b*.safetensors
            folder_class=Qwen2_5_VLForConditionalGeneration,
            max_length=MAX_LENGTH,
            fp8=fp8,
            to_fp8=_vl_in_fp8,
            tokenizer=tokenizer,
        )

    def spatial_factor(self, vae: torch.nn.Module) -> int:
        return int(2 ** len(diffusers_config(vae).temperal_downsample))

    def temporal_factor(self, vae: torch.nn.Module) -> int:
        return self.spec.temporal_factor  # an image model: one frame per latent frame

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

    def encode_edit_text(
        self,
        encoder: TextEncoder,
        captions: list[str],
        control_images: Sequence[Sequence[Image.Image]],
        version: str,
    ) -> list[torch.Tensor]:
        """``encode_text`` for the edit modes: each caption read with its item's control images
        (``qwen_vl.encode_edit_text``); `encoder` from ``load_text_encoder(..., vision=True)``."""
        return qwen_vl.encode_edit_text(encoder, captions, control_images, version)

    def load_transformer(
        self, spec: str, flag: str, device: torch.device, dtype: torch.dtype, fp8: Fp8Mode | None = None
    ) -> torch.nn.Module:
        from diffusers import QwenImageTransformer2DModel

        return loading.transformer(
            QwenImageTransformer2DModel,
            spec,
            flag,
            device,
            dtype,
            tiny=tiny_transformer,
            from_file=qwen_image_checkpoint.load_transformer_file,
            fp8=fp8,
            fp8_targets=FP8_TARGETS,
            variants={
                TINY_EDIT_2511: functools.partial(tiny_transformer, zero_cond_t=True),
                qwen_layered.TINY_LAYERED: functools.partial(tiny_transformer, layered=True),
            },
        )

    def empty_transformer(self, config: Mapping[str, Any]) -> torch.nn.Module:
        from diffusers import QwenImageTransformer2DModel

        return loading.empty_transformer(QwenImageTransformer2DModel, config)

    def transformer_config(self, spec: str, flag: str) -> Mapping[str, Any] | None:
        from diffusers import QwenImageTransformer2DModel

        return loading.transformer_config(
            QwenImageTransformer2DModel,
            spec,
            flag,
            tiny=TINY_TRANSFORMER,
            from_file=qwen_image_checkpoint.transformer_file_config,
            variants=TINY_VARIANTS,
        )

    def denoiser_inputs(self, config: Mapping[str, Any]) -> DenoiserInputs:
        # 2x2 patches of the latents are packed into one token (pack_latents).
        patch = int(config["patch_size"])
        return DenoiserInputs(int(config["in_channels"]) // patch**2, int(config["joint_attention_dim"]))

    def latent_channels(self, vae: torch.nn.Module) -> int:
        return int(diffusers_config(vae).z_dim)

    def blocks(self, transformer: torch.nn.Module) -> torch.nn.ModuleList:
        blocks = transformer.transformer_blocks
        assert isinstance(blocks, torch.nn.ModuleList)
        return blocks

    def collate_text(self, embeds: list[torch.Tensor]) -> TextBatch:
        # QwenImagePipeline._get_qwen_prompt_embeds / encode_prompt
        return padded_to_longest(embeds)

    def predict(
        self,
        transformer: torch.nn.Module,
        noisy: torch.Tensor,
        sigmas: torch.Tensor,
        text: TextBatch,
        condition: Conditioning | None = None,
    ) -> torch.Tensor:
        b, _, _, h, w = noisy.shape
        controls = _control_latents(condition)
        if qwen_layered.is_layered(diffusers_config(transformer)):  # the layers, the image as control
            return qwen_layered.predict(transformer, noisy, sigmas, text, _layered_control(controls))
        target = pack_latents(noisy)
        # QwenImageEditPlusPipeline: [target | control 1 | control 2 ...], each packed at its own
        # size, one (frames, h/2, w/2) entry per image for RoPE; the prediction of the target only.
        tokens = torch.cat([target, *(pack_latents(c.to(noisy.dtype)) for c in controls)], dim=1)
        shapes = [(1, h // 2, w // 2), *((1, c.shape[-2] // 2, c.shape[-1] // 2) for c in controls)]
        prediction = transformer(
            hidden_states=tokens,
            encoder_hidden_states=text.hidden,
            encoder_hidden_states_mask=text.mask,
            timestep=sigmas,  # the pipeline passes t / 1000; zero_cond_t models add the controls' 0
            img_shapes=[shapes] * b,
            return_dict=False,
        )[0]
        return unpack_latents(prediction[:, : target.shape[1]], h, w)

    def generate(
        self,
        transformer: torch.nn.Module,
        high_noise: torch.nn.Module | None,
        boundary: float,
        vae: torch.nn.Module,
        request: SampleRequest,
    ) -> torch.Tensor:
        from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageEditPlusPipeline, QwenImagePipeline

        shift = request.flow_shift
        scheduler = FlowMatchEulerDiscreteScheduler(
            **SCHEDULER, use_dynamic_shifting=shift is None, shift=1.0 if shift is None else shift
        )
        if qwen_layered.is_layered(diffusers_config(transformer)):  # its own loop (qwen_layered says why)
            return qwen_layered.generate(transformer, vae, request, scheduler)
        text, negative = request.text, request.negative
        settings: dict[str, Any] = {
            "prompt_embeds": text.hidden,
            "prompt_embeds_mask": _mask(text),
            "negative_prompt_embeds": None if negative is None else negative.hidden,
            "negative_prompt_embeds_mask": None if negative is None else _mask(negative),
            "true_cfg_scale": request.cfg_scale,
            "height": request.height,
            "width": request.width,
            "num_inference_steps": request.steps,
            "generator": request.generator,
            "output_type": "np",
            "max_sequence_length": MAX_LENGTH,
        }
        pipeline: QwenImagePipeline | QwenImageEditPlusPipeline
        if request.control_images:
            # The prompt embeddings already read the control images (encode_edit_text); the
            # pipeline VAE-encodes each at a ~1024² area and packs it after the target (one image
            # goes the same way through QwenImageEditPipeline, so Edit samples here too).
            pipeline = QwenImageEditPlusPipeline(
                scheduler=scheduler,
                vae=vae,
                text_encoder=None,
                tokenizer=None,
                processor=None,
                transformer=transformer,
            )
            settings["image"] = list(request.control_images)
        else:
            pipeline = QwenImagePipeline(
                scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None, transformer=transformer
            )
        pipeline.set_progress_bar_config(disable=True)
        return to_uint8(pipeline(**settings).images)

    def load_prompt_encoder(
        self,
        spec: str,
        device: torch.device,
        dtype: torch.dtype,
        *,
        fp8: bool = False,
        tokenizer: str | None = None,
        task: str | None = None,
    ) -> TextEncoder:
        """Qwen-Image-Edit's prompts are read with their control images: Qwen2.5-VL with its vision
        tower (``qwen_vl.load``); otherwise the text model."""
        edit = _is_edit(task)
        return self.load_text_encoder(spec, device, dtype, fp8=fp8, tokenizer=tokenizer, vision=edit)

    def encode_prompt(
        self, encoder: TextEncoder, text: str, images: Sequence[Any], task: str | None
    ) -> torch.Tensor:
        """An edit prompt read with its control `images` as the edit pipelines read it."""
        if _is_edit(task):
            return qwen_vl.encode_edit_text(encoder, [text], [list(images)], str(task))[0]
        return self.encode_text(encoder, [text])[0]

    def check_sampling_vae(self, vae: torch.nn.Module, spec: str, task: str | None) -> None:
        """Qwen-Image-Layered samples with its RGBA VAE, and only it does."""
        mode = catalog.mode_of(self.spec, task)
        qwen_layered.check_vae(vae, spec, mode is not None and mode.kind == "layered")

    def lora_targets(self) -> LoraTargets:
        return LORA_TARGETS

    def comfy_key(self, module_name: str) -> str:
        # ComfyUI's comfy/ldm/qwen_image/model.py uses the diffusers module names.
        return module_name

    def comfy_parts(self, original: str) -> tuple[str, ...]:
        return ()  # every layer is one Linear of the original checkpoint


def _is_edit(task: str | None) -> bool:
    """Whether `task` (``--model_version``) is a Qwen-Image-Edit version."""
    mode = catalog.mode_of(catalog.QWEN_IMAGE, task)
    return mode is not None and mode.kind == "edit"


def _control_latents(condition: Conditioning | None) -> tuple[torch.Tensor, ...]:
    """The control latents of `condition` (none without one); WAN's fields are refused."""
    if condition is None:
        return ()
    if condition.image_latents is not None or condition.image_embeds is not None:
        raise ValueError("Qwen-Image takes control latents, not WAN's image latents or CLIP embeddings")
    if condition.frame_indices is not None:
        raise ValueError("Qwen-Image takes control latents, not WAN one-frame indices")
    return condition.control_latents or ()


def _layered_control(controls: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Qwen-Image-Layered's one control: the clean latents of the image it decomposes."""
    if len(controls) != 1:
        raise ValueError(
            f"Qwen-Image-Layered takes one control (the image to decompose), got {len(controls)}; "
            "cache the dataset with --model_version layered"
        )
    return controls[0]


def _mask(text: TextBatch) -> torch.Tensor:
    """The pipeline's 0/1 mask (``collate_text`` leaves it out when every token is real)."""
    if text.mask is not None:
        return text.mask
    return torch.ones(text.hidden.shape[:2], dtype=torch.long, device=text.hidden.device)


def _vl_in_fp8(model: torch.nn.Module) -> None:
    """Qwen2.5-VL's decoder Linear layers as plain e4m3 (musubi's ``--fp8_vl``)."""
    quantize_model(model, FP8_VL_TARGETS, "e4m3")
