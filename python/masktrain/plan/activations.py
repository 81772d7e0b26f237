"""The memory of one training step beyond the weights, found by running the step on the meta
device under :class:`~masktrain.plan.trace.LiveBytes`: the teacher's no-grad pass, the student's
forward with its saved activations, the loss, and the backward. Shapes are real, nothing is
computed, and a 20B model at 1328x1328 takes seconds.

The step is the one ``train.step`` runs, in the order it runs it: noisy latents; the teacher with
the adapters off (prior preservation only); the student under autocast; both predictions in
float32; the mask-weighted loss (``loss.masked_loss_terms``, the run's own reducer); backward.
Gradient checkpointing keeps each block's input and recomputes the block in the backward, as
``models.checkpointing`` does; with activation offload those inputs are on the host (left out of
the count) and each block's input is copied back for its forward and its recomputation.

Attention runs as the flash kernels run it (PyTorch's CPU flash kernel on the meta device): it
saves the output and the log-sum-exp, never the token x token matrix. The LoRA's gradients are
left out of the trace: the plan counts them with the parameters they belong to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from masktrain.config.mask_loss import MaskLossSettings
from masktrain.denoiser import lora
from masktrain.loss import masked_loss_terms
from masktrain.models.base import AdapterHost, Conditioning, ModelFamily, TextBatch, adapter_host
from masktrain.plan.trace import LiveBytes, MetaAutocast

META = torch.device("meta")


@dataclass(frozen=True)
class StepShape:
    """What one batch holds: latent channels, latent frames, latent height and width, text tokens
    and width, and the batch size."""

    channels: int
    frames: int
    height: int
    width: int
    text_tokens: int
    text_dim: int
    batch: int = 1
    conditioning_channels: int = 0
    """Image conditioning beside the latents (WAN image-to-video: 20 channels)."""
    images: int = 0
    """CLIP-embedded images per sample (WAN 2.1 I2V: 1, FLF2V: 2; 0 without CLIP)."""
    image_tokens: int = 0
    """Tokens of each image's CLIP embedding (ViT-H/14: 257)."""
    image_dim: int = 0
    """The CLIP embedding's width (ViT-H/14: 1280)."""
    controls: int = 0
    """Qwen-Image-Edit: control images per sample (their tokens follow the target's)."""
    control_grid: tuple[int, int] | None = None
    """Each control image's latent (height, width); None: the target's."""

    def condition(self, dtype: torch.dtype) -> Conditioning | None:
        """Meta tensors of the batch's conditioning (None without)."""
        if not self.conditioning_channels and not self.images and not self.controls:
            return None
        b, f, h, w = self.batch, self.frames, self.height, self.width
        if self.controls:
            control = (b, self.channels, 1, *(self.control_grid or (h, w)))
            return Conditioning(
                control_latents=tuple(
                    torch.empty(control, device=META, dtype=dtype) for _ in range(self.controls)
                )
            )
        latents = None
        if self.conditioning_channels:
            latents = torch.empty(b, self.conditioning_channels, f, h, w, device=META, dtype=dtype)
        embeds = None
        if self.images:
            embeds = torch.empty(b, self.images, self.image_tokens, self.image_dim, device=META, dtype=dtype)
        return Conditioning(image_latents=latents, image_embeds=embeds)


@dataclass(frozen=True)
class StepMemory:
    """Peak bytes of the tensors a step makes (the LoRA's gradients left out)."""

    peak: int
    """Over the whole step."""
    teacher: int
    """During the teacher's pass (0 without prior preservation)."""
    saved: int
    """What the student's forward keeps for the backward, at its end."""
    offloaded: int = 0
    """What activation offload keeps in host memory instead (the blocks' inputs)."""


def trace_step(
    family: ModelFamily,
    model: torch.nn.Module,
    shape: StepShape,
    *,
    dtype: torch.dtype,
    prior: bool,
    checkpointing: bool,
    offload: bool,
) -> StepMemory:
    """Run one step of `model` (a meta transformer with its LoRA, from ``plan.holdings``) on a
    batch of `shape` and count it (see the module docstring)."""
    counter = LiveBytes()
    model.train()
    host = adapter_host(model)
    offloaded: dict[int, int] = {}
    if checkpointing:  # a model from plan.holdings has none until here
        _checkpoint_blocks(host, family.blocks(model), counter, dtype, offloaded if offload else None)
    for parameter in lora.lora_parameters(model):
        parameter.grad = None
        parameter.register_post_accumulate_grad_hook(counter.forget_grad)  # type: ignore[no-untyped-call]
    latents = torch.empty(shape.batch, shape.channels, shape.frames, shape.height, shape.width, device=META)
    mask = torch.empty(shape.batch, 1, shape.frames, shape.height, shape.width, device=META)
    sigmas = torch.empty(shape.batch, device=META)
    hidden = torch.empty(shape.batch, shape.text_tokens, shape.text_dim, device=META, dtype=dtype)
    text = TextBatch(hidden, torch.empty(shape.batch, shape.text_tokens, device=META, dtype=torch.bool))
    condition = shape.condition(dtype)
    settings = MaskLossSettings(
        use_mask_loss=True,
        prior_preservation_weight=1.0 if prior else 0.0,
        prior_mask_threshold=0.1 if prior else None,
    )
    with counter:
        noise = torch.empty_like(latents)
        noisy = (latents + noise).to(dtype)
        target = noise - latents
        teacher = None
        if prior:
            with torch.no_grad(), lora.adapters_disabled(model), MetaAutocast(dtype):
                teacher = family.predict(model, noisy, sigmas, text, condition).float()
            teacher_peak = counter.peak
        with MetaAutocast(dtype):
            prediction = family.predict(model, noisy, sigmas, text, condition).float()
        saved = counter.now
        per_element = (prediction - target) ** 2
        prior_element = None if teacher is None else (prediction - teacher) ** 2
        terms = masked_loss_terms(per_element, mask, settings, prior_loss=prior_element)
        loss = terms.target + terms.prior
        del per_element, prior_element, terms, prediction, teacher
        loss.backward()  # type: ignore[no-untyped-call]  # torch leaves it unannotated
    return StepMemory(
        peak=counter.peak,
        teacher=teacher_peak if prior else 0,
        saved=saved,
        offloaded=sum(offloaded.values()),
    )


def _checkpoint_blocks(
    host: AdapterHost,
    blocks: torch.nn.ModuleList,
    counter: LiveBytes,
    dtype: torch.dtype,
    offloaded: dict[int, int] | None,
) -> None:
    """``models.checkpointing.enable`` for the meta device: the recomputation runs under
    :class:`MetaAutocast` (torch restores a real device's autocast for it, not a meta one); with
    `offloaded` the blocks' outputs go to the host (left out of the count, their bytes per block
    in `offloaded`)."""
    last = blocks[len(blocks) - 1]
    offload = offloaded is not None

    def checkpointed(block: torch.nn.Module, *inputs: Any) -> Any:
        def run(*args: Any) -> Any:
            if offload:  # each input from the host is copied to the device for the block
                args = tuple(arg.clone() if _on_host(counter, arg) else arg for arg in args)
            with MetaAutocast(dtype):
                out = block(*args)
            if offloaded is not None and block is not last:
                tensors = [
                    t for t in (out if isinstance(out, tuple) else (out,)) if isinstance(t, torch.Tensor)
                ]
                offloaded[id(block)] = sum(t.untyped_storage().nbytes() for t in tensors)
                for tensor in tensors:
                    counter.forget(tensor)
            return out

        return checkpoint(run, *inputs, use_reentrant=False)

    host.enable_gradient_checkpointing(checkpointed)


def _on_host(counter: LiveBytes, value: Any) -> bool:
    return isinstance(value, torch.Tensor) and counter.left_out(value)
