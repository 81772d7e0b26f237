"""WAN 2.1 / 2.2: ``AutoencoderKLWan`` (8x spatial, 4x temporal; 16x and 48 channels for the
WAN 2.2 TI2V-5B VAE), the UMT5 text encoder and ``WanTransformer3DModel``.

Latents are the normalised posterior mean (``loading.encode_posterior_mean``). The denoiser takes
latents as they are (B, C, F, h, w), the timestep on the 0..1000 scale and text embeddings
zero-padded to 512 tokens without a mask (``WanPipeline``). LoRA goes on every Linear layer of the
blocks (self- and cross-attention q/k/v/o, the I2V image k/v, both FFN layers), as musubi-tuner's
``lora_wan`` does; its ComfyUI names are the original WAN ones (``self_attn.q``, ``ffn.0``, ...).
"""

from __future__ import annotations

import functools
import re
import types
from collections.abc import Mapping
from typing import Any

import torch

from masktrain import catalog
from masktrain.config.memory import Fp8Mode
from masktrain.config.timesteps import NUM_TRAIN_TIMESTEPS
from masktrain.errors import DataError
from masktrain.models import clip_vision, loading, wan_checkpoint, wan_one_frame
from masktrain.models.base import (
    Conditioning,
    DenoiserInputs,
    LoraTargets,
    SampleRequest,
    StandardSampling,
    TextBatch,
    TextEncoder,
    model_timesteps,
)
from masktrain.models.fp8 import Fp8Targets, quantize_model
from masktrain.models.loading import (
    TINY,
    diffusers_config,
    encode_posterior_mean,
    float_list,
    seeded,
    to_uint8,
)

# The tiny CLIP vision model's width and token count, which the tiny image-conditioned denoisers take.
TINY_CLIP_WIDTH = clip_vision.TINY_CLIP_HIDDEN
TINY_CLIP_TOKENS = clip_vision.TINY_CLIP_TOKENS

#: The TI2V-5B VAE's tiny variant (16x spatial, 48 channels): ``--vae tiny-ti2v``.
TINY_TI2V = "tiny-ti2v"

# diffusers' own test configs (tests/models/autoencoders/test_models_autoencoder_wan.py,
# tests/pipelines/wan/test_wan_22.py), with normalisation constants measured for the seeded tiny
# VAE: the per-channel mean and std of its posterior mean over 64 smooth random colour fields, so
# its normalised latents are about N(0, 1) per channel as the released VAEs' constants make theirs.
# With the released WAN 2.1 constants (diffusers' defaults) a per-channel offset dominates and the
# image content is ~1% of the latents' scale: a LoRA trained on them learns nearly nothing about
# the images (what `masktrain demo` showed).
TINY_VAE: dict[str, Any] = {
    "base_dim": 3,
    "z_dim": 16,
    "dim_mult": [1, 1, 1, 1],
    "num_res_blocks": 1,
    "temperal_downsample": [False, True, True],
    "latents_mean": float_list(
        """
        0.00818 0.0736 -0.0192 -0.126 -0.197 0.203 -0.0437 0.00571
        -0.177 0.0376 -0.27 0.0584 0.124 0.0289 -0.0754 -0.125
        """
    ),
    "latents_std": float_list(
        """
        0.0119 0.0204 0.015 0.0119 0.0134 0.0138 0.0117 0.0193
        0.0185 0.0137 0.0119 0.0174 0.0125 0.0136 0.0103 0.00999
        """
    ),
}
TINY_TI2V_VAE: dict[str, Any] = {
    "base_dim": 3,
    "z_dim": 48,
    "in_channels": 12,
    "out_channels": 12,
    "is_residual": True,
    "patch_size": 2,
    "latents_mean": [0.0] * 48,
    "latents_std": [1.0] * 48,
    "dim_mult": [1, 1, 1, 1],
    "num_res_blocks": 1,
    "scale_factor_spatial": 16,
    "scale_factor_temporal": 4,
    "temperal_downsample": [False, True, True],
}
TINY_T5: dict[str, Any] = {
    "d_model": 32,
    "d_kv": 8,
    "d_ff": 64,
    "num_layers": 2,
    "num_heads": 4,
    "relative_attention_num_buckets": 8,
    "feed_forward_proj": "gated-gelu",
    "dropout_rate": 0.0,
    "pad_token_id": 0,
    "eos_token_id": 1,
}
# diffusers' pipeline / LoRA test config (tests/pipelines/wan/test_wan.py), sized to the tiny VAE
# (16 latent channels) and the tiny UMT5 (d_model 32). rope_max_seq_len is the released models'
# 1024 instead of the test's 32: it only sizes the RoPE table (same values for every position),
# and 32 would limit the tiny model to 32 patches per side (a 512-pixel bucket side).
TINY_TRANSFORMER: dict[str, Any] = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 2,
    "attention_head_dim": 12,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 32,
    "freq_dim": 256,
    "ffn_dim": 32,
    "num_layers": 2,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "rope_max_seq_len": 1024,
}
# The image-conditioned tiny denoisers (``--dit tiny`` with ``--task i2v-14B`` / ``flf2v-14B`` /
# ``i2v-A14B``: ``catalog.Mode.tiny``): diffusers' tiny I2V test config (tests/pipelines/wan/
# test_wan_image_to_video.py: in_channels 36, image_dim the tiny CLIP's width) plus what that test
# leaves out and the released 2.1 models have: the image key/value projections
# (``added_kv_proj_dim`` = heads x head dim), so image tokens take the real path (their own
# attention beside the text's) and get LoRA. FLF2V adds the learned position table of its two
# images' tokens; WAN 2.2 I2V A14B has no CLIP.
TINY_I2V_TRANSFORMERS: dict[str, dict[str, Any]] = {
    "tiny-i2v": {
        **TINY_TRANSFORMER,
        "in_channels": 36,
        "image_dim": TINY_CLIP_WIDTH,
        "added_kv_proj_dim": 24,
    },
    "tiny-flf2v": {
        **TINY_TRANSFORMER,
        "in_channels": 36,
        "image_dim": TINY_CLIP_WIDTH,
        "added_kv_proj_dim": 24,
        "pos_embed_seq_len": 2 * TINY_CLIP_TOKENS,
    },
    "tiny-i2v-a14b": {**TINY_TRANSFORMER, "in_channels": 36},
}
#: WanPipeline's default prompt length.
MAX_LENGTH = 512
#: Sampling's flow shift when the prompt file sets no --fs: WAN's own text-to-video default
#: (musubi's 14.5 is a HunyuanVideo value it keeps "for all models").
DEFAULT_FLOW_SHIFT = 5.0
#: musubi's sampling negative prompt for WAN (wan/configs/shared_config.py sample_neg_prompt), as
#: written there: its commas are full-width.
NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"  # noqa: RUF001
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"  # noqa: RUF001
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"  # noqa: RUF001
)

# Every Linear inside the blocks; the excludes mirror musubi-tuner's lora_wan defaults (they match
# no Linear of the diffusers blocks today, and keep norms / modulation out if a variant adds one).
LORA_TARGETS = LoraTargets(
    include=(r"blocks\.\d+\..+",),
    exclude=(r".*(patch_embedding|text_embedding|time_embedding|time_projection|norm|modulation|head).*",),
)

# fp8 base weights: every Linear of the blocks (musubi-tuner's FP8_OPTIMIZATION_TARGET_KEYS
# "blocks"); the excludes are its list. Outside the blocks (patch, text and time embeddings, time
# projection, head) nothing is targeted; the per-block modulation is a table, not a Linear.
FP8_TARGETS = Fp8Targets(include=(r"blocks\.\d+\..+",), exclude=(r".*(norm|modulation).*",))
# fp8 T5 (--fp8_t5): the Linear layers of the encoder blocks; embeddings and norms stay.
FP8_T5_TARGETS = Fp8Targets(include=(r"encoder\.block\.\d+\..+",))

# diffusers -> original (ComfyUI) names of the Linear layers inside a block; the inverse of
# diffusers' convert_wan_transformer_to_diffusers / _convert_non_diffusers_wan_lora_to_diffusers.
_BLOCK_LINEAR = re.compile(
    r"(?P<block>blocks\.\d+)\."
    r"(?:(?P<attn>attn1|attn2)\.(?P<proj>to_q|to_k|to_v|to_out\.0|add_k_proj|add_v_proj)"
    r"|ffn\.net\.(?P<ffn>0\.proj|2))"
)
_ATTN = {"attn1": "self_attn", "attn2": "cross_attn"}
_PROJ = {"to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "o", "add_k_proj": "k_img", "add_v_proj": "v_img"}
_FFN = {"0.proj": "ffn.0", "2": "ffn.2"}
_OUTSIDE_BLOCKS = {
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "condition_embedder.image_embedder.ff.net.0.proj": "img_emb.proj.1",
    "condition_embedder.image_embedder.ff.net.2": "img_emb.proj.3",
    "proj_out": "head.head",
}


def tiny_transformer(width_mult: int = 1, layers: int = 2) -> torch.nn.Module:
    """The built-in tiny denoiser (seeded, float32, CPU); ``width_mult`` multiplies the heads and
    the FFN width (head size stays 12, so RoPE is unchanged), ``layers`` sets the depth. The
    defaults give the ``--dit tiny`` model; larger values give benchmark-sized variants that
    still fit the tiny VAE and text encoder."""
    from diffusers import WanTransformer3DModel

    if width_mult < 1 or layers < 1:
        raise ValueError(f"width_mult and layers must be >= 1, got {width_mult} and {layers}")
    config: dict[str, Any] = {
        **TINY_TRANSFORMER,
        "num_attention_heads": TINY_TRANSFORMER["num_attention_heads"] * width_mult,
        "ffn_dim": TINY_TRANSFORMER["ffn_dim"] * width_mult,
        "num_layers": layers,
    }
    model: torch.nn.Module = seeded(lambda: WanTransformer3DModel(**config))
    return model


def _tiny_variant(name: str) -> torch.nn.Module:
    """The built-in tiny denoiser of an image-conditioned mode (seeded, float32, CPU)."""
    from diffusers import WanTransformer3DModel

    model: torch.nn.Module = seeded(lambda: WanTransformer3DModel(**TINY_I2V_TRANSFORMERS[name]))
    return model


class WanFamily(StandardSampling):
    spec = catalog.WAN
    name = spec.name
    fp8_targets = FP8_TARGETS
    text_flag = spec.text_flag
    default_cfg_scale = 5.0  # musubi's and WanPipeline's
    default_negative_prompt = NEGATIVE_PROMPT

    def load_vae(self, spec: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
        from diffusers import AutoencoderKLWan

        tiny = {TINY: TINY_VAE, TINY_TI2V: TINY_TI2V_VAE}
        return loading.vae(
            AutoencoderKLWan, spec, device, dtype, tiny=tiny, from_file=wan_checkpoint.load_vae_file
        )

    def load_text_encoder(
        self,
        spec: str,
        device: torch.device,
        dtype: torch.dtype,
        fp8: bool = False,
        tokenizer: str | None = None,
    ) -> TextEncoder:
        from transformers import UMT5Config, UMT5EncoderModel

        return loading.text_encoder(
            self.spec,
            spec,
            device,
            dtype,
            tiny=lambda vocab: UMT5EncoderModel(UMT5Config(vocab_size=vocab, **TINY_T5)),
            from_file=wan_checkpoint.load_t5_file,  # ComfyUI's umt5_xxl_*.safetensors
            folder_class=UMT5EncoderModel,
            max_length=MAX_LENGTH,
            fp8=fp8,
            to_fp8=_t5_in_fp8,
            tokenizer=tokenizer,
        )

    def spatial_factor(self, vae: torch.nn.Module) -> int:
        return int(diffusers_config(vae).scale_factor_spatial)

    def temporal_factor(self, vae: torch.nn.Module) -> int:
        return int(diffusers_config(vae).scale_factor_temporal)

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

    def load_transformer(
        self, spec: str, flag: str, device: torch.device, dtype: torch.dtype, fp8: Fp8Mode | None = None
    ) -> torch.nn.Module:
        from diffusers import WanTransformer3DModel

        return loading.transformer(
            WanTransformer3DModel,
            spec,
            flag,
            device,
            dtype,
            tiny=tiny_transformer,
            from_file=wan_checkpoint.load_transformer_file,
            fp8=fp8,
            fp8_targets=FP8_TARGETS,
            variants={name: functools.partial(_tiny_variant, name) for name in TINY_I2V_TRANSFORMERS},
        )

    def empty_transformer(self, config: Mapping[str, Any]) -> torch.nn.Module:
        from diffusers import WanTransformer3DModel

        return loading.empty_transformer(WanTransformer3DModel, config)

    def transformer_config(self, spec: str, flag: str) -> Mapping[str, Any] | None:
        from diffusers import WanTransformer3DModel

        return loading.transformer_config(
            WanTransformer3DModel,
            spec,
            flag,
            tiny=TINY_TRANSFORMER,
            from_file=wan_checkpoint.transformer_file_config,
            variants=TINY_I2V_TRANSFORMERS,
        )

    def denoiser_inputs(self, config: Mapping[str, Any]) -> DenoiserInputs:
        # The noisy latents go straight into the patch embedding; image-to-video models take
        # image conditioning beside them (in_channels 36 for 16 latent channels).
        latents = int(config.get("out_channels") or config["in_channels"])
        image_dim = config.get("image_dim")
        return DenoiserInputs(
            latents,
            int(config["text_dim"]),
            int(config["in_channels"]) - latents,
            None if image_dim is None else int(image_dim),
        )

    def latent_channels(self, vae: torch.nn.Module) -> int:
        return int(diffusers_config(vae).z_dim)

    def blocks(self, transformer: torch.nn.Module) -> torch.nn.ModuleList:
        blocks = transformer.blocks
        assert isinstance(blocks, torch.nn.ModuleList)
        return blocks

    def collate_text(self, embeds: list[torch.Tensor]) -> TextBatch:
        # WanPipeline._get_t5_prompt_embeds: the real tokens, then zeros up to 512; no mask.
        rows = []
        for embed in embeds:
            if embed.shape[0] > MAX_LENGTH:
                raise DataError(f"a WAN text embedding has {embed.shape[0]} tokens; at most {MAX_LENGTH} fit")
            rows.append(torch.cat([embed, embed.new_zeros(MAX_LENGTH - embed.shape[0], embed.shape[1])]))
        return TextBatch(hidden=torch.stack(rows), mask=None)

    def predict(
        self,
        transformer: torch.nn.Module,
        noisy: torch.Tensor,
        sigmas: torch.Tensor,
        text: TextBatch,
        condition: Conditioning | None = None,
    ) -> torch.Tensor:
        # The pipeline passes t = sigma * 1000 (FlowMatch / UniPC timesteps), one per sample.
        # Image-to-video: the 20 conditioning channels follow the noisy latents on the channel
        # axis, the CLIP hidden states go in beside the text (WanImageToVideoPipeline).
        # One-frame: the latent frames sit at their own temporal positions (frame_indices); rows at
        # different positions run apart, each with its own rotary table.
        positions = None if condition is None else condition.frame_indices
        if condition is not None and positions is not None and not wan_one_frame.shared_positions(positions):
            return wan_one_frame.by_positions(
                functools.partial(self.predict, transformer), noisy, sigmas, text, condition
            )
        hidden = noisy
        image_embeds = None
        if condition is not None:
            if condition.image_latents is not None:
                hidden = torch.cat([noisy, condition.image_latents.to(noisy.dtype)], dim=1)
            if condition.image_embeds is not None:  # (B, K, T, D): FLF2V's pairs as the pipeline stacks them
                image_embeds = condition.image_embeds.flatten(0, 1).to(text.hidden.dtype)
        with wan_one_frame.frame_positions(transformer, positions):
            prediction: torch.Tensor = transformer(
                hidden_states=hidden,
                timestep=model_timesteps(sigmas),
                encoder_hidden_states=text.hidden,
                encoder_hidden_states_image=image_embeds,
                return_dict=False,
            )[0]
        return prediction

    def generate(
        self,
        transformer: torch.nn.Module,
        high_noise: torch.nn.Module | None,
        boundary: float,
        vae: torch.nn.Module,
        request: SampleRequest,
    ) -> torch.Tensor:
        # diffusers' WAN recipe: UniPC on flow sigmas; the pipeline's `transformer` is the expert
        # above the boundary, `transformer_2` the one below (the boundary on the 0..1 scale).
        # Image-to-video (a start image): WanImageToVideoPipeline, with the CLIP embedding the
        # sampler computed (WAN 2.1) instead of its own image encoder.
        from diffusers import UniPCMultistepScheduler, WanPipeline

        scheduler = UniPCMultistepScheduler(
            prediction_type="flow_prediction",
            use_flow_sigmas=True,
            num_train_timesteps=NUM_TRAIN_TIMESTEPS,
            flow_shift=request.flow_shift or DEFAULT_FLOW_SHIFT,
        )
        components: dict[str, Any] = {
            "tokenizer": None,
            "text_encoder": None,
            "vae": vae,
            "scheduler": scheduler,
            "transformer": transformer if high_noise is None else high_noise,
            "transformer_2": None if high_noise is None else transformer,
            "boundary_ratio": None if high_noise is None else boundary,
        }
        if request.one_frame is not None:  # musubi's one-frame inference: the target slot alone
            controls, clean, target = request.one_frame
            return wan_one_frame.generate_one_frame(
                self, transformer, high_noise, boundary, vae, request, scheduler, controls, clean, target
            )
        images: dict[str, Any] = {}
        if request.start_image is not None:
            image_to_video = _image_to_video_pipeline()
            pipeline: Any = image_to_video(image_encoder=None, image_processor=None, **components)
            images = {"image": request.start_image, "last_image": request.end_image}
            if request.image_embeds is not None:
                images["image_embeds"] = request.image_embeds
        else:
            pipeline = WanPipeline(**components)
        pipeline.set_progress_bar_config(disable=True)
        negative = request.negative
        frames = pipeline(
            prompt_embeds=request.text.hidden,
            negative_prompt_embeds=None if negative is None else negative.hidden,
            height=request.height,
            width=request.width,
            num_frames=request.frames,
            num_inference_steps=request.steps,
            guidance_scale=request.cfg_scale,
            generator=request.generator,
            output_type="np",
            **images,
        ).frames[0]
        return to_uint8(frames)

    def lora_targets(self) -> LoraTargets:
        return LORA_TARGETS

    def comfy_key(self, module_name: str) -> str:
        match = _BLOCK_LINEAR.fullmatch(module_name)
        if match is not None:
            if match["ffn"] is not None:
                return f"{match['block']}.{_FFN[match['ffn']]}"
            return f"{match['block']}.{_ATTN[match['attn']]}.{_PROJ[match['proj']]}"
        if module_name in _OUTSIDE_BLOCKS:
            return _OUTSIDE_BLOCKS[module_name]
        raise ValueError(f"no ComfyUI (original WAN) name is known for the module {module_name!r}")

    def comfy_parts(self, original: str) -> tuple[str, ...]:
        return ()  # every layer is one Linear of the original checkpoint


def _image_to_video_pipeline() -> type:
    """diffusers' ``WanImageToVideoPipeline`` taking a precomputed CLIP embedding with its image:
    the pipeline needs the image (its latents) and uses ``image_embeds`` when given, but its
    ``check_inputs`` refuses the two together (diffusers 0.42). The sampler computes the embedding
    once per prompt and frees the CLIP model, so it cannot hand the pipeline its encoder."""
    from diffusers import WanImageToVideoPipeline

    class ImageToVideo(WanImageToVideoPipeline):  # type: ignore[misc]  # diffusers is untyped
        def check_inputs(
            self,
            prompt: Any,
            negative_prompt: Any,
            image: Any,
            height: int,
            width: int,
            prompt_embeds: Any = None,
            negative_prompt_embeds: Any = None,
            image_embeds: Any = None,
            *rest: Any,
            **kwargs: Any,
        ) -> None:
            # the image is checked alone; image_embeds is ours, shaped as the pipeline makes it
            super().check_inputs(
                prompt,
                negative_prompt,
                image,
                height,
                width,
                prompt_embeds,
                negative_prompt_embeds,
                None,
                *rest,
                **kwargs,
            )

    return ImageToVideo


def _t5_in_fp8(model: torch.nn.Module) -> None:
    """UMT5's block Linear layers as plain e4m3 (musubi's ``--fp8_t5``). transformers casts the
    FFN's hidden state to ``wo``'s weight dtype, which would be fp8 here: the gated FFN runs
    without that cast (the Linear dequantises its weight to the input's dtype)."""
    from transformers.models.umt5.modeling_umt5 import UMT5DenseGatedActDense

    quantize_model(model, FP8_T5_TARGETS, "e4m3")
    for module in model.modules():
        if isinstance(module, UMT5DenseGatedActDense):
            module.forward = types.MethodType(_gated_ffn, module)  # type: ignore[method-assign]  # per instance, as musubi does


def _gated_ffn(self: Any, hidden: torch.Tensor) -> torch.Tensor:
    out: torch.Tensor = self.wo(self.dropout(self.act(self.wi_0(hidden)) * self.wi_1(hidden)))
    return out
