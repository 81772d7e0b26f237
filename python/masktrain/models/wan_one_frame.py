"""WAN one-frame mode (musubi-tuner's ``--one_frame``): a few control images and one target image
as a short "video" of F = controls + 1 latent frames, each frame at a chosen temporal position.

The dataset gives each control image a position (``fp_1f_clean_indices``) and the target one
(``fp_1f_target_index``). The latent frames are the slots of those positions in increasing order;
each slot holds its image encoded alone (a latent-frame-0 encoding: the causal VAE packs 4 pixel
frames into every later latent frame). The image-to-video condition marks control slots given
(4 mask channels of 1 and the control latent) and the target slot not given (0 and the latent of
an all-zero pixel frame: mid-grey in [-1, 1], musubi's "black image latent"). The loss weights
control slots 1.0 and the target slot by its mask (DustyL's rule, the guide's).

WAN's rotary embedding then sees the slots at their positions, not at 0..F-1: :func:`frame_positions`
replaces the frame rows of the transformer's rotary table for one call (musubi's
``freqs[0][f_indices]``). masktrain trains at those positions as well as sampling at them;
musubi trains at 0..F-1 (the docs' WAN one-frame section says why we differ).

Sources: kohya-ss/musubi-tuner 30c658c, ``wan_cache_latents.py`` ``encode_and_save_batch_one_frame``
(layout), ``wan_generate_video.py`` ``prepare_one_frame_inference`` and ``wan_train_network.py``
``do_inference`` (sampling), ``wan/modules/model.py`` ``calculate_freqs_i`` (positions).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from masktrain.config.timesteps import NUM_TRAIN_TIMESTEPS
from masktrain.errors import DataError
from masktrain.models.base import Conditioning, ModelFamily, SampleRequest, TextBatch
from masktrain.models.loading import diffusers_config, to_uint8
from masktrain.models.wan_image_condition import MASK_CHANNELS

#: Where the positions come from, as musubi-tuner names them: the dataset's keys, and the sample
#: prompt's ``--of`` settings.
DATASET_KEYS = ("fp_1f_clean_indices", "fp_1f_target_index")
SAMPLE_KEYS = ("--of control_index", "--of target_index")


def frame_order(
    clean_indices: Sequence[int],
    target_index: int | None,
    controls: int,
    where: str = "",
    keys: tuple[str, str] = DATASET_KEYS,
) -> list[int]:
    """The slots' positions in order (controls' and target's, sorted), after checking them:
    positions >= 0, distinct, one per control image, at least one control, and the controls'
    increasing (control image k takes the k-th control position, as musubi places them). Errors
    name `where` (the item) and `keys` (the controls', the target's)."""
    prefix = f"{where}: " if where else ""
    clean_key, target_key = keys
    clean = list(clean_indices)
    if target_index is None:
        raise DataError(f"{prefix}{target_key} is not set; one-frame training needs the target's position")
    if any(index < 0 for index in clean):
        raise DataError(f"{prefix}{clean_key} must be positions >= 0, got {clean}")
    if target_index < 0:
        raise DataError(f"{prefix}{target_key} must be a position >= 0, got {target_index}")
    if len(set(clean)) != len(clean):
        raise DataError(f"{prefix}{clean_key} repeats a frame position: {clean}")
    if target_index in clean:
        raise DataError(
            f"{prefix}{target_key} {target_index} is also a control's position in {clean_key} {clean}"
        )
    if not clean or len(clean) != controls:
        raise DataError(
            f"{prefix}{clean_key} {clean} gives {len(clean)} position(s) for {controls} control image(s): "
            "one position per control image, at least one"
        )
    if clean != sorted(clean):
        raise DataError(
            f"{prefix}{clean_key} must be increasing (control image k takes the k-th position, "
            f"as musubi-tuner places them), got {clean}"
        )
    return sorted([*clean, target_index])


@dataclass(frozen=True)
class OneFrameLayout:
    """One item's training tensors, slots in position order (musubi's cache layout)."""

    latents: torch.Tensor
    """(C, F, h, w): every slot's clean latent, the controls' and the target's."""
    image_latents: torch.Tensor
    """(4 + C, F, h, w): the condition, control slots given (1.0, latent), the target not (0, the
    zero frame's latent)."""
    frame_indices: torch.Tensor
    """(F,) long: each slot's RoPE frame position."""
    mask_weights: torch.Tensor | None
    """(1, F, h, w): 1.0 at control slots, the target's mask at its slot; None without a mask."""


def condition_slots(
    controls: torch.Tensor, zero_frame: torch.Tensor, order: Sequence[int], target_index: int
) -> torch.Tensor:
    """(4 + C, F, h, w): the image condition of the slots `order`. `controls` (K, C, h, w) in
    position order, `zero_frame` (C, h, w) the latent of an all-zero pixel frame."""
    channels, height, width = zero_frame.shape
    condition = zero_frame.new_zeros(MASK_CHANNELS + channels, len(order), height, width)
    control = iter(controls)
    for slot, position in enumerate(order):
        if position == target_index:
            condition[MASK_CHANNELS:, slot] = zero_frame
        else:
            condition[:MASK_CHANNELS, slot] = 1.0
            condition[MASK_CHANNELS:, slot] = next(control)
    return condition


def one_frame_layout(
    controls: torch.Tensor,
    target: torch.Tensor,
    zero_frame: torch.Tensor,
    clean_indices: Sequence[int],
    target_index: int | None,
    target_mask: torch.Tensor | None = None,
    where: str = "",
) -> OneFrameLayout:
    """One item's layout from per-frame latents (each image encoded alone, :func:`encode_frames`):
    `controls` (K, C, h, w) in the order of `clean_indices`, `target` and `zero_frame` (C, h, w),
    `target_mask` the target's mask pooled to the latent grid (h, w). `where` names the item in
    errors."""
    order = frame_order(clean_indices, target_index, controls.shape[0], where)
    assert target_index is not None  # frame_order refuses None
    if controls.shape[1:] != target.shape or target.shape != zero_frame.shape:
        raise ValueError(
            f"control latents {tuple(controls.shape)}, target {tuple(target.shape)} and zero frame "
            f"{tuple(zero_frame.shape)} must share (C, h, w)"
        )
    slot = order.index(target_index)
    condition = condition_slots(controls, zero_frame, order, target_index)
    latents = condition[MASK_CHANNELS:].clone()
    latents[:, slot] = target
    weights = None
    if target_mask is not None:
        if target_mask.shape != target.shape[1:]:
            raise ValueError(
                f"the target's mask {tuple(target_mask.shape)} is not its latent grid "
                f"{tuple(target.shape[1:])}"
            )
        weights = torch.ones(1, len(order), *target.shape[1:], dtype=torch.float32)
        weights[0, slot] = target_mask
    return OneFrameLayout(latents, condition, torch.tensor(order, dtype=torch.long), weights)


@torch.no_grad()
def encode_frames(family: ModelFamily, vae: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) images in [-1, 1] -> (N, C, h, w): each image VAE-encoded alone, a one-frame
    clip (musubi encodes one frame at a time: the VAE's time stride is 4 after the first frame)."""
    return family.encode_pixels(vae, pixels.unsqueeze(2))[:, :, 0]


def zero_frame_latent(family: ModelFamily, vae: torch.nn.Module, height: int, width: int) -> torch.Tensor:
    """(C, h, w): the latent of an all-zero pixel frame (mid-grey in [-1, 1]; musubi's "black image
    latent"), what the target slot's condition holds."""
    return encode_frames(family, vae, torch.zeros(1, 3, height, width))[0]


# --- frame positions in the rotary embedding ------------------------------------------------------


def shared_positions(frame_indices: torch.Tensor) -> bool:
    """Whether every row of (B, F) frame positions is the same (one rotary table serves them)."""
    return bool((frame_indices == frame_indices[:1]).all())


@contextmanager
def frame_positions(transformer: torch.nn.Module, frame_indices: torch.Tensor | None) -> Iterator[None]:
    """Within the block, `transformer`'s rotary embedding (diffusers' ``WanRotaryPosEmbed``, its
    ``rope``) puts latent frame f at position ``frame_indices[f]`` instead of f: the frame part
    of its output is taken from the module's own table at those rows, the height and width parts
    are left as computed. `frame_indices`: (F,) or (B, F) with equal rows; None changes nothing."""
    if frame_indices is None:
        yield
        return
    if frame_indices.ndim == 2:
        if not shared_positions(frame_indices):
            raise ValueError(
                "frame_positions takes one set of positions; split rows at other positions first"
            )
        frame_indices = frame_indices[0]
    rope: Any = getattr(transformer, "rope", None)
    if rope is None or not hasattr(rope, "freqs_cos"):
        raise TypeError(
            f"{type(transformer).__name__} has no WAN rotary embedding (a `rope` with `freqs_cos`)"
        )
    positions = frame_indices.tolist()
    table_rows = rope.freqs_cos.shape[0]
    if min(positions) < 0 or max(positions) >= table_rows:
        raise DataError(
            f"frame positions {positions} ({' / '.join(DATASET_KEYS)}) must lie in the rotary "
            f"table, 0..{table_rows - 1}"
        )

    def at_positions(_: torch.nn.Module, args: tuple[Any, ...], output: Any) -> tuple[torch.Tensor, ...]:
        frames = args[0].shape[2] // rope.patch_size[0]
        if frames != len(positions):
            raise ValueError(f"{len(positions)} frame positions for {frames} latent frames")
        index = torch.tensor(positions, device=rope.freqs_cos.device)
        return tuple(
            _frame_rows(part, table[:, : rope.t_dim][index], frames)
            for part, table in zip(output, (rope.freqs_cos, rope.freqs_sin), strict=True)
        )

    handle = rope.register_forward_hook(at_positions)
    try:
        yield
    finally:
        handle.remove()


def _frame_rows(rotary: torch.Tensor, frame_table: torch.Tensor, frames: int) -> torch.Tensor:
    """`rotary` (1, F x hw, 1, D) with its first t_dim channels (the frame part) replaced by
    `frame_table` (F, t_dim), the same for every token of a frame."""
    _, tokens, heads, width = rotary.shape
    per_frame = rotary.view(1, frames, tokens // frames, heads, width)
    frame_part = (
        frame_table.to(rotary.dtype).view(1, frames, 1, 1, -1).expand(-1, -1, tokens // frames, heads, -1)
    )
    return torch.cat([frame_part, per_frame[..., frame_table.shape[1] :]], dim=-1).view(rotary.shape)


Predict = Callable[[torch.Tensor, torch.Tensor, TextBatch, Conditioning], torch.Tensor]


def by_positions(
    predict: Predict, noisy: torch.Tensor, sigmas: torch.Tensor, text: TextBatch, condition: Conditioning
) -> torch.Tensor:
    """`predict` run once per group of rows that share frame positions (a batch of items whose
    ``fp_1f_*`` keys differ), the outputs put back in the batch's order."""
    assert condition.frame_indices is not None
    _, group = torch.unique(condition.frame_indices, dim=0, return_inverse=True)
    outputs, rows_in_order = [], []
    for value in group.unique().tolist():
        rows = (group == value).nonzero().flatten()
        rows_text = TextBatch(text.hidden[rows], None if text.mask is None else text.mask[rows])
        outputs.append(predict(noisy[rows], sigmas[rows], rows_text, condition.rows(rows)))
        rows_in_order.append(rows)
    return torch.cat(outputs)[torch.argsort(torch.cat(rows_in_order))]


# --- sampling ---------------------------------------------------------------------------------------


def generate_one_frame(
    family: ModelFamily,
    transformer: torch.nn.Module,
    high_noise: torch.nn.Module | None,
    boundary: float,
    vae: torch.nn.Module,
    request: SampleRequest,
    scheduler: Any,
    controls: torch.Tensor,
    clean_indices: Sequence[int],
    target_index: int,
) -> torch.Tensor:
    """One-frame inference as musubi-tuner runs it (``wan_generate_video.py``
    ``prepare_one_frame_inference`` / ``generate``; ``wan_train_network.py`` ``do_inference``):
    the slots denoised together (:func:`denoise_slots`), then only the target's slot decoded,
    alone: (1, H, W, 3) uint8 on the CPU. Arguments as for :func:`denoise_slots`."""
    latents, slot = denoise_slots(
        family,
        transformer,
        high_noise,
        boundary,
        vae,
        request,
        scheduler,
        controls,
        clean_indices,
        target_index,
    )
    return decode_frame(vae, latents[:, :, slot : slot + 1])


@torch.no_grad()
def denoise_slots(
    family: ModelFamily,
    transformer: torch.nn.Module,
    high_noise: torch.nn.Module | None,
    boundary: float,
    vae: torch.nn.Module,
    request: SampleRequest,
    scheduler: Any,
    controls: torch.Tensor,
    clean_indices: Sequence[int],
    target_index: int,
) -> tuple[torch.Tensor, int]:
    """The denoised latents of every slot, (1, C, F, h, w) float32, and the target's slot:

    1. each control image (`controls`, (K, 3, H, W) in [-1, 1] at the request's size, in the
       order of `clean_indices`) and an all-zero frame are VAE-encoded alone; the condition is the
       training layout's (control slots given, the target slot the zero frame's latent, not given);
    2. the noise covers every slot, (1, C, F, h, w) from the request's generator, and the whole
       F-slot latent is denoised, control slots included (musubi keeps nothing clean by hand:
       the condition channels carry the controls), with the rotary embedding at the slots'
       positions and the request's CLIP embedding (``request.image_embeds``, (K, T, D), or None).

    The loop is diffusers' ``WanImageToVideoPipeline``'s: `scheduler` as ``WanFamily.generate``
    builds it; WAN 2.2 A14B: `high_noise` at timesteps >= `boundary` x 1000; classifier-free
    guidance when the request has a negative prompt and a scale above 1."""
    order = frame_order(clean_indices, target_index, controls.shape[0], keys=SAMPLE_KEYS)
    device, dtype = request.text.hidden.device, request.text.hidden.dtype
    image_latents = condition_slots(
        encode_frames(family, vae, controls).float().cpu(),
        zero_frame_latent(family, vae, request.height, request.width).float().cpu(),
        order,
        target_index,
    )
    embeds = request.image_embeds
    condition = Conditioning(
        image_latents=image_latents.unsqueeze(0),
        image_embeds=None if embeds is None else embeds.unsqueeze(0),
        frame_indices=torch.tensor([order]),
    ).to(device, dtype)
    latents = torch.randn(
        (1, image_latents.shape[0] - MASK_CHANNELS, *image_latents.shape[1:]),
        generator=request.generator,
        dtype=torch.float32,
    ).to(device)
    guided = request.negative is not None and request.cfg_scale > 1
    scheduler.set_timesteps(request.steps, device=device)
    for timestep in scheduler.timesteps:
        expert = (
            high_noise
            if high_noise is not None and timestep >= boundary * NUM_TRAIN_TIMESTEPS
            else transformer
        )
        sigmas = (timestep / NUM_TRAIN_TIMESTEPS).reshape(1)
        noisy = latents.to(dtype)
        velocity = family.predict(expert, noisy, sigmas, request.text, condition)
        if guided:
            assert request.negative is not None
            unguided = family.predict(expert, noisy, sigmas, request.negative, condition)
            velocity = unguided + request.cfg_scale * (velocity - unguided)
        latents = scheduler.step(velocity, timestep, latents, return_dict=False)[0]
    return latents.float(), order.index(target_index)


@torch.no_grad()
def decode_frame(vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """Normalised latents (1, C, 1, h, w) -> the image (1, H, W, 3) uint8 on the CPU, un-normalised
    and decoded as diffusers' WAN pipelines do."""
    config = diffusers_config(vae)
    shape = (1, len(config.latents_mean), 1, 1, 1)
    mean = torch.tensor(config.latents_mean).view(shape)
    std = torch.tensor(config.latents_std).view(shape)
    latents = latents.float().cpu() / (1.0 / std) + mean  # the pipelines' own arithmetic
    parameter = next(vae.parameters())
    decoder: Any = vae  # diffusers' AutoencoderKLWan
    pixels = decoder.decode(latents.to(parameter.device, parameter.dtype), return_dict=False)[0]
    images = (pixels.float() / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 3, 0).cpu()
    return to_uint8(images)
