"""WAN one-frame mode (``models.wan_one_frame``) with the tiny models: the rotary embedding at given
frame positions against diffusers' own ``WanRotaryPosEmbed`` table, the training layout against a
hand-built copy of musubi-tuner's (``encode_and_save_batch_one_frame``), the checks of the
``fp_1f_*`` keys, and one-frame sampling against diffusers' ``WanImageToVideoPipeline`` loop fed
musubi's condition."""

from __future__ import annotations

from dataclasses import replace
from typing import Any
from unittest import mock

import pytest
import torch

from masktrain.errors import DataError
from masktrain.models import get_family
from masktrain.models.base import Conditioning, SampleRequest, TextBatch
from masktrain.models.wan_one_frame import (
    decode_frame,
    denoise_slots,
    encode_frames,
    frame_order,
    frame_positions,
    generate_one_frame,
    one_frame_layout,
    zero_frame_latent,
)

CPU = torch.device("cpu")
FAMILY = get_family("wan")


def _i2v(seed: int | None = None) -> torch.nn.Module:
    """The built-in tiny I2V denoiser (image key/value projections included); with `seed`, its
    weights moved by a little seeded noise (a second, different expert)."""
    model = FAMILY.load_transformer(
        "tiny-i2v-a14b" if seed is not None else "tiny-i2v", "--dit", CPU, torch.float32
    )
    if seed is not None:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return model


def _inputs(
    batch: int, frames: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, TextBatch, torch.Tensor]:
    """Noisy latents (B, 16, F, 4, 4), sigmas, 512-token text and the image condition (B, 20, F, 4, 4)."""
    generator = torch.Generator().manual_seed(seed)
    noisy = torch.randn(batch, 16, frames, 4, 4, generator=generator)
    sigmas = torch.rand(batch, generator=generator)
    text = FAMILY.collate_text([torch.randn(7, 32, generator=generator) for _ in range(batch)])
    condition = torch.randn(batch, 20, frames, 4, 4, generator=generator)
    return noisy, sigmas, text, condition


def _reference_rotary(
    head_dim: int, positions: list[int], height: int, width: int
) -> tuple[torch.Tensor, ...]:
    """diffusers' own table for frames 0..max(positions) (a fresh WanRotaryPosEmbed, no hook), the
    rows of `positions` kept: what musubi's ``freqs[0][f_indices]`` gives."""
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    rope = WanRotaryPosEmbed(head_dim, (1, 2, 2), 1024)
    frames = max(positions) + 1
    tables = rope(torch.zeros(1, 16, frames, height, width))
    return tuple(
        table.view(1, frames, -1, 1, table.shape[-1])[:, positions].reshape(1, -1, 1, table.shape[-1])
        for table in tables
    )


# --- frame positions --------------------------------------------------------------------------------


@pytest.mark.parametrize("head_dim", [12, 128], ids=["tiny", "released"])
def test_positions_take_the_rows_of_diffusers_own_table(head_dim: int) -> None:
    """At [0, 2] (and [1, 5, 6]) the rotary values are those of frames 0 and 2 of diffusers' table
    for more frames; the height and width parts are untouched. Equal to the bit."""
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    holder = torch.nn.Module()
    holder.rope = WanRotaryPosEmbed(head_dim, (1, 2, 2), 1024)
    for positions in ([0, 2], [1, 5, 6]):
        hidden = torch.zeros(1, 16, len(positions), 6, 8)
        with frame_positions(holder, torch.tensor(positions)):
            ours = holder.rope(hidden)
        for got, expected in zip(ours, _reference_rotary(head_dim, positions, 6, 8), strict=True):
            assert got.shape == expected.shape and torch.equal(got, expected)
    assert not holder.rope._forward_hooks


def test_positions_zero_to_f_leave_the_denoiser_unchanged() -> None:
    transformer = _i2v()
    noisy, sigmas, text, image = _inputs(2, 3)
    plain = FAMILY.predict(transformer, noisy, sigmas, text, Conditioning(image_latents=image))
    at_arange = FAMILY.predict(
        transformer,
        noisy,
        sigmas,
        text,
        Conditioning(image_latents=image, frame_indices=torch.arange(3).repeat(2, 1)),
    )
    assert torch.equal(plain, at_arange)
    assert not transformer.rope._forward_hooks


def test_predict_runs_the_denoiser_at_the_given_positions() -> None:
    """predict with positions [0, 2] equals the transformer with its rotary module replaced by the
    reference table (rows 0 and 2), and differs from positions [0, 1]."""
    transformer = _i2v()
    noisy, sigmas, text, image = _inputs(2, 2)
    condition = Conditioning(image_latents=image, frame_indices=torch.tensor([[0, 2], [0, 2]]))
    ours = FAMILY.predict(transformer, noisy, sigmas, text, condition)
    reference = _reference_rotary(12, [0, 2], 4, 4)
    with mock.patch.object(transformer.rope, "forward", lambda hidden: reference):
        expected = FAMILY.predict(transformer, noisy, sigmas, text, Conditioning(image_latents=image))
    assert torch.equal(ours, expected)
    at_zero_one = FAMILY.predict(transformer, noisy, sigmas, text, Conditioning(image_latents=image))
    assert (ours - at_zero_one).abs().max() > 1e-3


def test_rows_at_different_positions_run_apart() -> None:
    """A batch whose items have other positions: each row as if predicted alone."""
    transformer = _i2v()
    noisy, sigmas, text, image = _inputs(3, 2)
    positions = torch.tensor([[0, 2], [0, 1], [0, 2]])
    batched = FAMILY.predict(
        transformer, noisy, sigmas, text, Conditioning(image_latents=image, frame_indices=positions)
    )
    for row in range(3):
        alone = FAMILY.predict(
            transformer,
            noisy[row : row + 1],
            sigmas[row : row + 1],
            TextBatch(text.hidden[row : row + 1], None),
            Conditioning(image_latents=image[row : row + 1], frame_indices=positions[row : row + 1]),
        )
        # batched and single matrix products round differently
        torch.testing.assert_close(batched[row : row + 1], alone, rtol=0, atol=1e-5)


def test_gradients_flow_at_given_positions_with_checkpointing() -> None:
    """Training's path: rows split by positions, blocks checkpointed; the same output as without
    checkpointing and a gradient for every row."""
    transformer = _i2v()
    noisy, sigmas, text, image = _inputs(2, 2)
    condition = Conditioning(image_latents=image, frame_indices=torch.tensor([[0, 2], [0, 1]]))
    expected = FAMILY.predict(transformer, noisy, sigmas, text, condition)
    transformer.enable_gradient_checkpointing()
    noisy.requires_grad_(True)
    with torch.enable_grad():
        output = FAMILY.predict(transformer, noisy, sigmas, text, condition)
        output.square().sum().backward()
    assert torch.equal(output.detach(), expected)
    assert noisy.grad is not None and bool((noisy.grad.flatten(1).abs().sum(dim=1) > 0).all())


def test_the_hook_is_removed_after_an_error() -> None:
    transformer = _i2v()
    noisy, sigmas, text, image = _inputs(1, 2)
    wrong_count = Conditioning(image_latents=image, frame_indices=torch.tensor([[0, 1, 2]]))
    with pytest.raises(ValueError, match="3 frame positions for 2 latent frames"):
        FAMILY.predict(transformer, noisy, sigmas, text, wrong_count)
    assert not transformer.rope._forward_hooks
    with pytest.raises(DataError, match=r"fp_1f_clean_indices / fp_1f_target_index.*0\.\.1023"):
        with frame_positions(transformer, torch.tensor([0, 1024])):
            pass
    with pytest.raises(ValueError, match="one set of positions"):
        with frame_positions(transformer, torch.tensor([[0, 1], [0, 2]])):
            pass
    assert not transformer.rope._forward_hooks


# --- the training layout ----------------------------------------------------------------------------


def _musubi_layout(
    controls: torch.Tensor, target: torch.Tensor, black: torch.Tensor, clean: list[int], target_index: int
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """musubi-tuner's loop (wan_cache_latents.py l.189-207 @ 30c658c), transcribed: `l` and `y`."""
    channels, height, width = target.shape
    f_indices = sorted([*clean, target_index])
    y = torch.zeros(4 + channels, len(f_indices), height, width)
    latent = torch.zeros(channels, len(f_indices), height, width)
    ci = 0
    for j, index in enumerate(f_indices):
        if index == target_index:
            y[4:, j] = black
            latent[:, j] = target
        else:
            y[:4, j] = 1.0
            y[4:, j] = controls[ci]
            latent[:, j] = controls[ci]
            ci += 1
    return latent, y, f_indices


def test_the_layout_by_hand() -> None:
    """Controls at 0 and 2, the target at 1: slots [c0, target, c1]; weights [1, mask, 1]."""
    generator = torch.Generator().manual_seed(0)
    c0, c1, target, zero = (torch.randn(16, 3, 4, generator=generator) for _ in range(4))
    mask = torch.rand(3, 4, generator=generator)
    layout = one_frame_layout(torch.stack([c0, c1]), target, zero, [0, 2], 1, mask)
    assert torch.equal(layout.latents, torch.stack([c0, target, c1], dim=1))
    assert torch.equal(layout.image_latents[4:], torch.stack([c0, zero, c1], dim=1))
    assert layout.image_latents[:4, :, 0, 0].T.tolist() == [[1.0] * 4, [0.0] * 4, [1.0] * 4]
    assert layout.frame_indices.dtype == torch.long and layout.frame_indices.tolist() == [0, 1, 2]
    assert layout.mask_weights is not None and layout.mask_weights.shape == (1, 3, 3, 4)
    assert torch.equal(layout.mask_weights[0], torch.stack([torch.ones(3, 4), mask, torch.ones(3, 4)]))
    assert one_frame_layout(torch.stack([c0, c1]), target, zero, [0, 2], 1).mask_weights is None


@pytest.mark.parametrize(
    ("clean", "target_index"),
    [([0], 1), ([0, 2], 1), ([1, 3], 0), ([0, 5], 9), ([4], 0)],
)
def test_the_layout_is_musubis(clean: list[int], target_index: int) -> None:
    generator = torch.Generator().manual_seed(len(clean) + target_index)
    controls = torch.randn(len(clean), 16, 2, 3, generator=generator)
    target, zero = torch.randn(16, 2, 3, generator=generator), torch.randn(16, 2, 3, generator=generator)
    latent, y, f_indices = _musubi_layout(controls, target, zero, clean, target_index)
    layout = one_frame_layout(controls, target, zero, clean, target_index, torch.zeros(2, 3))
    assert torch.equal(layout.latents, latent) and torch.equal(layout.image_latents, y)
    assert layout.frame_indices.tolist() == f_indices
    assert layout.mask_weights is not None
    slot = f_indices.index(target_index)
    assert layout.mask_weights[0, :, 0, 0].tolist() == [
        0.0 if j == slot else 1.0 for j in range(len(f_indices))
    ]


@pytest.mark.parametrize(
    ("clean", "target_index", "controls", "message"),
    [
        ([0, 0], 1, 2, "fp_1f_clean_indices repeats a frame position"),
        ([0, 1], 1, 2, "fp_1f_target_index 1 is also a control's position"),
        ([-1], 1, 1, "fp_1f_clean_indices must be positions >= 0"),
        ([0], -1, 1, "fp_1f_target_index must be a position >= 0"),
        ([0, 2], 1, 1, r"fp_1f_clean_indices \[0, 2\] gives 2 position\(s\) for 1 control image\(s\)"),
        ([], 1, 0, "fp_1f_clean_indices .* at least one"),
        ([2, 0], 1, 2, "fp_1f_clean_indices must be increasing"),
        ([0], None, 1, "fp_1f_target_index is not set"),
    ],
)
def test_the_keys_are_checked(
    clean: list[int], target_index: int | None, controls: int, message: str
) -> None:
    with pytest.raises(DataError, match=f"^photo_7: {message}"):
        frame_order(clean, target_index, controls, "photo_7")


def test_each_frame_is_encoded_alone() -> None:
    """encode_frames = each image encoded as its own one-frame clip (musubi's loop); the zero frame
    is mid-grey's latent, not zeros."""
    vae = FAMILY.load_vae("tiny", CPU, torch.float32)
    pixels = torch.rand(2, 3, 16, 24, generator=torch.Generator().manual_seed(0)) * 2 - 1
    together = encode_frames(FAMILY, vae, pixels)
    assert together.shape == (2, 16, 2, 3)
    for row in range(2):
        alone = FAMILY.encode_pixels(vae, pixels[row : row + 1, :, None])[0, :, 0]
        # batched and single convolutions round differently; the tiny VAE's latents reach ~30
        torch.testing.assert_close(together[row], alone, rtol=0, atol=1e-4)
    zero = zero_frame_latent(FAMILY, vae, 16, 24)
    torch.testing.assert_close(zero, FAMILY.encode_pixels(vae, torch.zeros(1, 3, 1, 16, 24))[0, :, 0])
    assert zero.abs().max() > 0.1


# --- sampling ---------------------------------------------------------------------------------------


def _scheduler() -> Any:
    """WanFamily.generate's scheduler (UniPC on flow sigmas, flow shift 5)."""
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=5.0
    )


@pytest.mark.parametrize("experts", [1, 2], ids=["i2v_clip", "a14b_two_experts"])
def test_one_frame_sampling_is_the_pipeline_loop_on_musubis_condition(experts: int) -> None:
    """generate_one_frame = diffusers' WanImageToVideoPipeline (its scheduler loop, guidance and
    expert switch) given musubi's one-frame condition, the same noise over every slot and the
    rotary embedding at [0, 2]; then the target's slot (1) decoded alone."""
    from diffusers import WanImageToVideoPipeline
    from diffusers.video_processor import VideoProcessor

    vae = FAMILY.load_vae("tiny", CPU, torch.float32)
    low = _i2v() if experts == 1 else _i2v(seed=1)
    high = None if experts == 1 else _i2v(seed=2)
    generator = torch.Generator().manual_seed(3)
    controls = torch.rand(2, 3, 32, 32, generator=generator) * 2 - 1
    text = FAMILY.collate_text([torch.randn(5, 32, generator=generator)])
    negative = FAMILY.collate_text([torch.randn(3, 32, generator=generator)])
    embeds = torch.randn(1, 17, 4, generator=generator) if experts == 1 else None
    request = SampleRequest(
        width=32,
        height=32,
        frames=1,
        steps=4,
        cfg_scale=4.0,
        flow_shift=None,
        text=text,
        negative=negative,
        generator=torch.Generator().manual_seed(11),
        image_embeds=embeds,
    )
    ours = generate_one_frame(FAMILY, low, high, 0.9, vae, request, _scheduler(), controls, [0, 2], 1)
    assert ours.shape == (1, 32, 32, 3) and ours.dtype == torch.uint8
    slots, slot = denoise_slots(
        FAMILY,
        low,
        high,
        0.9,
        vae,
        replace(request, generator=torch.Generator().manual_seed(11)),
        _scheduler(),
        controls,
        [0, 2],
        1,
    )
    assert slot == 1

    per_frame = [FAMILY.encode_pixels(vae, image[None, :, None])[0, :, 0] for image in controls]
    black = FAMILY.encode_pixels(vae, torch.zeros(1, 3, 1, 32, 32))[0, :, 0]
    _, condition, f_indices = _musubi_layout(torch.stack(per_frame), black, black, [0, 2], 1)
    noise = torch.randn(1, 16, 3, 4, 4, generator=torch.Generator().manual_seed(11))
    pipeline = WanImageToVideoPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=vae,
        scheduler=_scheduler(),
        transformer=low if high is None else high,
        transformer_2=None if high is None else low,
        boundary_ratio=None if high is None else 0.9,
        image_encoder=None,
        image_processor=None,
    )
    pipeline.set_progress_bar_config(disable=True)
    pipeline.prepare_latents = lambda *args, **kwargs: (noise.clone(), condition[None])  # type: ignore[method-assign]
    pipeline.check_inputs = lambda *args, **kwargs: None  # type: ignore[method-assign]  # image and image_embeds both
    positions = torch.tensor(f_indices)
    with (
        frame_positions(low, positions),
        frame_positions(high, positions) if high is not None else _nothing(),
    ):
        latents = pipeline(
            image=controls[:1] / 2 + 0.5,  # only prepare_latents (replaced) reads it
            prompt_embeds=text.hidden,
            negative_prompt_embeds=negative.hidden,
            image_embeds=embeds,
            height=32,
            width=32,
            num_frames=5,
            num_inference_steps=4,
            guidance_scale=4.0,
            output_type="latent",
        ).frames
    # the timestep goes in as t, not (t / 1000) x 1000: float rounding only
    torch.testing.assert_close(slots, latents, rtol=0, atol=1e-4)
    assert (slots - noise).abs().max() > 1  # denoised, not the noise
    vae_config = vae.config
    mean = torch.tensor(vae_config.latents_mean).view(1, 16, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(vae_config.latents_std).view(1, 16, 1, 1, 1)
    with torch.no_grad():
        video = vae.decode(latents[:, :, 1:2] / inv_std + mean, return_dict=False)[0]
    expected = VideoProcessor(vae_scale_factor=8).postprocess_video(video, output_type="pt")[0]
    expected = (expected.permute(0, 2, 3, 1) * 255).round().clamp(0, 255).to(torch.uint8)
    assert expected.float().std() > 2  # an image, not a flat field
    assert (ours.int() - expected.int()).abs().max() <= 1  # float rounding at a uint8 boundary
    # decode_frame on the pipeline's latents is the pipeline's own decoding
    assert torch.equal(decode_frame(vae, latents[:, :, 1:2]), expected)


def _nothing() -> Any:
    from contextlib import nullcontext

    return nullcontext()
