"""What `cache` and `train` need from a model family, and nothing more.

A family turns pixels into normalised latents and captions into text embeddings, and says how
its VAE compresses space and time (for `cache`); it loads the denoiser, runs it on a noisy latent
(`predict`), batches cached text embeddings the way its pipeline does, and names its LoRA targets
and their ComfyUI key names (for `train`). Weights come from the value of a flag: ``tiny`` (the
built-in tiny model, random weights from a fixed seed), a local diffusers folder, or a single
``.safetensors`` file. Nothing is ever downloaded.

The loaders that turn a flag's value into a model live in ``loading.py`` (and, for one-file
checkpoints, ``weights_file.py`` for what a file holds and ``single_file.py`` for building from
it); the families call them. :func:`model_timesteps` is diffusers' 0..1000 timestep scale
(``t * 1000``): what WAN is conditioned on, and the scale of training's timestep thresholds.

Gradient checkpointing is diffusers' own: ``transformer.enable_gradient_checkpointing(func)``
works for both families (it checkpoints each transformer block, and only while grad is enabled,
so a ``no_grad`` teacher pass never checkpoints); ``models.checkpointing`` supplies `func`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, cast

import torch

from masktrain.catalog import ArchSpec
from masktrain.config.memory import Fp8Mode
from masktrain.config.timesteps import NUM_TRAIN_TIMESTEPS

if TYPE_CHECKING:
    from peft import LoraConfig
    from transformers import PreTrainedTokenizerBase

    from masktrain.models.fp8 import Fp8Targets


@dataclass
class TextEncoder:
    """A tokenizer and encoder pair with the family's sequence length."""

    tokenizer: PreTrainedTokenizerBase
    model: torch.nn.Module
    max_length: int


@dataclass(frozen=True)
class TextBatch:
    """Text conditioning for one batch, laid out as the family's pipeline passes it."""

    hidden: torch.Tensor
    """(B, L, D) embeddings; padding rows are zeros."""
    mask: torch.Tensor | None
    """(B, L) long, 1 for real tokens and 0 for padding; None when there is no padding (or the
    family's denoiser takes no mask, as WAN's)."""

    def to(self, device: torch.device | str, dtype: torch.dtype) -> TextBatch:
        """Embeddings to `device` and `dtype`; the mask keeps its integer dtype."""
        mask = None if self.mask is None else self.mask.to(device)
        return TextBatch(hidden=self.hidden.to(device=device, dtype=dtype), mask=mask)


@dataclass(frozen=True)
class Conditioning:
    """What a conditioned mode feeds the denoiser beside the noisy latents and the text, batched
    (B first) the way the family's pipeline passes it; a field a mode does not use is None. The
    cache stores each item's rows (``data.cache_format`` keys), the loader stacks them."""

    image_latents: torch.Tensor | None = None
    """WAN image-to-video (I2V, FLF2V, one-frame): (B, 4 + C, F, h, w), the 4 mask channels
    ("pixel frame given") and the VAE latents of the given frames, concatenated to the noisy
    latents on the channel axis (``WanImageToVideoPipeline.prepare_latents``)."""
    image_embeds: torch.Tensor | None = None
    """WAN 2.1 I2V / FLF2V: (B, K, T, D) CLIP vision hidden states (penultimate layer) of the K
    given frames (1, or FLF2V's first and last), T tokens each (257 x 1280 for ViT-H/14)."""
    frame_indices: torch.Tensor | None = None
    """WAN one-frame: (B, F) long, the RoPE frame position of each latent frame (the control
    images' ``fp_1f_clean_indices`` and the target's ``fp_1f_target_index``, sorted)."""
    control_latents: tuple[torch.Tensor, ...] | None = None
    """Qwen-Image-Edit: the clean latents of each control image, (B, C, 1, h_i, w_i) each (control
    images may differ in size; every sample of a batch has the same ones), packed after the target
    tokens in this order; the loss never sees them. Qwen-Image-Layered: one, the base image's."""

    def rows(self, rows: torch.Tensor) -> Conditioning:
        """The conditioning of the samples `rows` (a boolean or index tensor over B)."""
        return self._map(lambda value: value[rows])

    def to(self, device: torch.device | str, dtype: torch.dtype) -> Conditioning:
        """Floating tensors to `device` and `dtype`; integer ones (frame indices) keep theirs."""
        return self._map(
            lambda value: value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype)
        )

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor it holds (each control image's too)."""
        held: list[torch.Tensor] = []
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            held += list(value) if isinstance(value, tuple) else [] if value is None else [value]
        return held

    def _map(self, change: Callable[[torch.Tensor], torch.Tensor]) -> Conditioning:
        """`change` applied to every tensor, those of a tuple field (control latents) one by one."""
        changed: dict[str, torch.Tensor | tuple[torch.Tensor, ...] | None] = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if isinstance(value, tuple):
                changed[name] = tuple(change(tensor) for tensor in value)
            else:
                changed[name] = None if value is None else change(value)
        return Conditioning(**changed)  # type: ignore[arg-type]  # each field keeps its own type


@dataclass(frozen=True)
class SampleRequest:
    """One sample to generate (``masktrain.sample``): the size, the denoising settings, the encoded
    prompt (and negative prompt, when guidance is on) laid out by ``collate_text`` and already on
    the device, and the CPU generator of its initial noise."""

    width: int
    height: int
    frames: int
    """Qwen-Image-Layered: the layers to make beside the base (musubi's ``--f``)."""
    steps: int
    cfg_scale: float
    """Classifier-free guidance; the negative prompt is used when > 1."""
    flow_shift: float | None
    """None: the family's default schedule."""
    text: TextBatch
    negative: TextBatch | None
    generator: torch.Generator
    start_image: Any = None
    """WAN I2V / FLF2V: the start image (a PIL image; the pipeline resizes it), else None."""
    end_image: Any = None
    """WAN FLF2V: the end image."""
    image_embeds: torch.Tensor | None = None
    """WAN 2.1 I2V / FLF2V: the CLIP hidden states of the given image(s), (K, T, D) on the device."""
    one_frame: tuple[torch.Tensor, tuple[int, ...], int] | None = None
    """WAN one-frame: the control images (K, 3, H, W) in [-1, 1] at the request's size, their
    frame positions and the target's (``--ci``, ``--of``)."""
    control_images: tuple[Any, ...] = ()
    """Qwen-Image-Edit: the control images (PIL images, in order; the pipeline resizes each), whose
    reading is in `text` and `negative` already (``encode_edit_text``). Qwen-Image-Layered: the one
    image to decompose (RGBA)."""


@dataclass(frozen=True)
class DenoiserInputs:
    """What a denoiser takes, from its config: the channels of the noisy latents it denoises (the
    VAE's latent channels) and the width of its text embeddings (the text encoder's)."""

    latent_channels: int
    text_dim: int
    conditioning_channels: int = 0
    """Input channels beside the latents (WAN image-to-video: 20 of image conditioning)."""
    image_dim: int | None = None
    """The width of the CLIP image embedding it takes (WAN 2.1 I2V / FLF2V); None: none."""


@dataclass(frozen=True)
class LoraTargets:
    """Which modules of the denoiser get LoRA by default: every ``nn.Linear`` whose name (as in
    ``named_modules()``) fully matches one of ``include`` and none of ``exclude``."""

    include: tuple[str, ...]
    """Regexes for where LoRA may go (the transformer blocks)."""
    exclude: tuple[str, ...]
    """Regexes for Linear layers inside those blocks that stay untouched."""


def padded_to_longest(embeds: list[torch.Tensor]) -> TextBatch:
    """Trimmed (tokens, dim) embeddings zero-padded on the right to the longest, with a 0/1 long
    mask, and no mask at all when every token is real: how the Qwen-Image, Qwen-Image 2.1 and
    Z-Image pipelines batch prompts of different lengths (the text-cache convention's trimmed case)."""
    longest = max(e.shape[0] for e in embeds)
    hidden = torch.stack([torch.cat([e, e.new_zeros(longest - e.shape[0], e.shape[1])]) for e in embeds])
    lengths = torch.tensor([e.shape[0] for e in embeds], device=hidden.device)
    mask = (torch.arange(longest, device=hidden.device)[None, :] < lengths[:, None]).long()
    return TextBatch(hidden=hidden, mask=None if bool(mask.all()) else mask)


def model_timesteps(sigmas: torch.Tensor) -> torch.Tensor:
    """The timestep the transformer is conditioned on: ``t * 1000``, the convention of diffusers'
    ``FlowMatchEulerDiscreteScheduler`` and of the pipelines that will load the LoRA. musubi
    passes ``t * 1000 + 1`` (1..1000) to WAN; masktrain trains with what inference uses."""
    return sigmas.float() * NUM_TRAIN_TIMESTEPS


class ModelFamily(Protocol):
    spec: ArchSpec
    """The family's catalog record (its torch-free facts)."""
    name: str
    """The ``--arch`` value and the suffix of cache file names (``spec.name``)."""
    text_flag: str
    """The flag that names the text encoder (``spec.text_flag``)."""
    fp8_targets: Fp8Targets
    """The Linear layers ``--fp8_base`` stores in fp8."""

    def load_vae(self, spec: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module: ...

    def load_text_encoder(
        self,
        spec: str,
        device: torch.device,
        dtype: torch.dtype,
        fp8: bool = False,
        tokenizer: str | None = None,
    ) -> TextEncoder:
        """The tokenizer and encoder; with `fp8` its block Linear weights are a plain e4m3 cast
        (``--fp8_t5`` / ``--fp8_vl``), dequantised in each forward. A single-file encoder takes
        its tokenizer from the folder `tokenizer` (``--t5_tokenizer``)."""
        ...

    def spatial_factor(self, vae: torch.nn.Module) -> int:
        """Pixels per latent cell along each side (8, or 16 for WAN 2.2 TI2V-5B)."""
        ...

    def temporal_factor(self, vae: torch.nn.Module) -> int:
        """Frames per latent frame after the first (4 for the video VAEs; clip lengths are 4k+1)."""
        ...

    def encode_pixels(self, vae: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, F, H, W) in [-1, 1] -> normalised latents (B, C, F', H/s, W/s)."""
        ...

    def encode_text(self, encoder: TextEncoder, captions: list[str]) -> list[torch.Tensor]:
        """One (tokens, dim) embedding per caption, trimmed to its real length."""
        ...

    def load_transformer(
        self, spec: str, flag: str, device: torch.device, dtype: torch.dtype, fp8: Fp8Mode | None = None
    ) -> torch.nn.Module:
        """The denoiser, frozen and in eval mode: ``tiny``, a local diffusers folder (the component
        or a pipeline with ``transformer/``) or a single ``.safetensors`` file; `flag` names the
        value in errors. With `fp8` the blocks' Linear weights are float8 (``models.fp8``),
        quantised while the weights are read."""
        ...

    def empty_transformer(self, config: Mapping[str, Any]) -> torch.nn.Module:
        """The denoiser of diffusers config `config` on the meta device: shapes and dtypes, no
        memory (``masktrain plan``)."""
        ...

    def transformer_config(self, spec: str, flag: str) -> Mapping[str, Any] | None:
        """The denoiser's diffusers config without loading it (``loading.transformer_config``:
        the tiny model's, a file's from its header, a folder's ``config.json``; None when the
        folder holds another class)."""
        ...

    def denoiser_inputs(self, config: Mapping[str, Any]) -> DenoiserInputs:
        """What a denoiser of `config` (a loaded one's ``config`` too) takes."""
        ...

    def latent_channels(self, vae: torch.nn.Module) -> int:
        """The channels of the VAE's latents."""
        ...

    def blocks(self, transformer: torch.nn.Module) -> torch.nn.ModuleList:
        """The transformer blocks, in the order the forward runs them (block swap, checkpointing)."""
        ...

    def collate_text(self, embeds: list[torch.Tensor]) -> TextBatch:
        """Trimmed (tokens, dim) embeddings -> one padded batch, as the family's pipeline pads."""
        ...

    def predict(
        self,
        transformer: torch.nn.Module,
        noisy: torch.Tensor,
        sigmas: torch.Tensor,
        text: TextBatch,
        condition: Conditioning | None = None,
    ) -> torch.Tensor:
        """The flow-matching prediction (velocity) for noisy latents (B, C, F, h, w) at noise levels
        `sigmas` (B,) in [0, 1]; same shape as `noisy` (a conditioned mode's extra inputs,
        `condition`, never appear in the output). Inputs must already be on the model's device;
        dtypes are the caller's (autocast or a matching cast)."""
        ...

    def lora_targets(self) -> LoraTargets:
        """The default LoRA target patterns (attention and feed-forward Linear layers)."""
        ...

    def comfy_key(self, module_name: str) -> str:
        """A diffusers module name -> the module path ComfyUI (the original checkpoint) uses."""
        ...

    def comfy_parts(self, original: str) -> tuple[str, ...]:
        """The diffusers layers the original checkpoint's layer `original` (a ComfyUI path or a
        musubi name) fuses, in output order (FLUX.2's ``img_attn.qkv``: to_q, to_k, to_v); () for a
        layer kept one to one. The comfyui and musubi LoRA layouts write such layers fused."""
        ...

    default_cfg_scale: float
    """Sampling's classifier-free guidance scale when the prompt file sets none (musubi's)."""
    default_negative_prompt: str
    """Sampling's negative prompt when the prompt file sets none (musubi's)."""

    def sample_size_multiple(self, vae: torch.nn.Module) -> int:
        """Pixels a sample's width and height are multiples of (:class:`StandardSampling`)."""
        ...

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
        """The text encoder sampling reads prompts with (:class:`StandardSampling`)."""
        ...

    def encode_prompt(
        self, encoder: TextEncoder, text: str, images: Sequence[Any], task: str | None
    ) -> torch.Tensor:
        """One prompt's embedding as sampling reads it (:class:`StandardSampling`)."""
        ...

    def check_sampling_vae(self, vae: torch.nn.Module, spec: str, task: str | None) -> None:
        """Refuse a VAE the mode cannot sample with (:class:`StandardSampling`)."""
        ...

    def generate(
        self,
        transformer: torch.nn.Module,
        high_noise: torch.nn.Module | None,
        boundary: float,
        vae: torch.nn.Module,
        request: SampleRequest,
    ) -> torch.Tensor:
        """One sample through the family's diffusers pipeline with `transformer` as it is (its
        adapters included; WAN 2.2 A14B: `high_noise` above the sigma `boundary`): (F, H, W, 3)
        uint8 frames on the CPU (Qwen-Image-Layered: (L, H, W, 4) RGBA images, the base and its
        layers). The VAE must be on the transformer's device."""
        ...


class StandardSampling:
    """What sampling asks of a family beyond :class:`ModelFamily`'s loading and encoding, in the
    form most families need: a family inherits it and overrides what differs (Qwen-Image: the
    edit modes read their prompts with the vision tower; FLUX.2: its latent grid is already 16 px)."""

    def sample_size_multiple(self: ModelFamily, vae: torch.nn.Module) -> int:
        """Pixels a sample's width and height are multiples of: the VAE's factor times the
        transformer's 2x2 patches."""
        return self.spatial_factor(vae) * 2

    def load_prompt_encoder(
        self: ModelFamily,
        spec: str,
        device: torch.device,
        dtype: torch.dtype,
        *,
        fp8: bool = False,
        tokenizer: str | None = None,
        task: str | None = None,
    ) -> TextEncoder:
        """The text encoder sampling reads its prompts with (a conditioned mode `task` may need
        more of it than the cache's captions do)."""
        return self.load_text_encoder(spec, device, dtype, fp8=fp8, tokenizer=tokenizer)

    def encode_prompt(
        self: ModelFamily, encoder: TextEncoder, text: str, images: Sequence[Any], task: str | None
    ) -> torch.Tensor:
        """One prompt's (tokens, dim) embedding as sampling reads it; `images` are the prompt's
        control images (a mode whose prompt reads them: Qwen-Image-Edit)."""
        return self.encode_text(encoder, [text])[0]

    def check_sampling_vae(self, vae: torch.nn.Module, spec: str, task: str | None) -> None:
        """Refuse a VAE the mode `task` cannot sample with (Qwen-Image-Layered: the RGBA one);
        one line naming `spec`."""


class AdapterHost(Protocol):
    """What masktrain uses of a diffusers transformer beyond ``torch.nn.Module``: peft adapters
    (diffusers' ``PeftAdapterMixin``) and gradient checkpointing (``ModelMixin``)."""

    peft_config: dict[str, LoraConfig]

    def add_adapter(self, adapter_config: LoraConfig, adapter_name: str = ...) -> None: ...

    def disable_adapters(self) -> None: ...

    def enable_adapters(self) -> None: ...

    def enable_gradient_checkpointing(
        self, gradient_checkpointing_func: Callable[..., Any] | None = None
    ) -> None: ...


def adapter_host(transformer: torch.nn.Module) -> AdapterHost:
    """`transformer` as an :class:`AdapterHost` (every family's denoiser is a diffusers model)."""
    if not callable(getattr(transformer, "add_adapter", None)):
        raise TypeError(f"{type(transformer).__name__} is not a diffusers model with peft adapter support")
    return cast(AdapterHost, transformer)
