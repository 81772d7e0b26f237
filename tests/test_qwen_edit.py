"""Qwen-Image-Edit (``--model_version edit``, ``edit-2509``, ``edit-2511``), the model side, on
tiny models built in code and checked against diffusers' own pipeline code:

- the tiny Qwen2.5-VL's tokenizer spells the vision markers as single tokens with the ids its
  config names, and the tiny text-only tokenizer is unchanged;
- edit text embeddings equal ``QwenImageEditPipeline`` / ``QwenImageEditPlusPipeline``
  ``encode_prompt`` for the same encoder, processor and images (the pipelines' own resizing), with
  the processor's ``mm_token_type_ids`` passed (diffusers issue #14194: the pipelines drop them,
  which changes image-conditioned embeddings, not text-only ones);
- ``predict`` with control latents equals the Edit-Plus pipeline's packing and transformer call for
  one and two controls of different sizes, with and without ``zero_cond_t`` (Edit-2511);
- the loss sees target tokens only, while its gradient reaches the control latents;
- ``--dit tiny`` under edit-2511 is a ``zero_cond_t`` model, read off its config;
- a tiny edit sample is deterministic and depends on its control images;
- ComfyUI's one-file Qwen2.5-VL loads with its vision tower and encodes as the same weights.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageEditPipeline, QwenImageEditPlusPipeline
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit, pipeline_qwenimage_edit_plus
from PIL import Image
from safetensors.torch import save_file

from masktrain.errors import DataError, ModelLoadError
from masktrain.models import get_family, qwen_image, qwen_vl
from masktrain.models.base import Conditioning, SampleRequest
from masktrain.models.tokenizer import QWEN_VL_SPECIAL_TOKENS, tiny_tokenizer, tiny_vl_tokenizer

CPU, F32 = torch.device("cpu"), torch.float32
FAMILY = get_family("qwen_image")


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def picture(width: int, height: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def encoder() -> qwen_vl.VisionTextEncoder:
    loaded = FAMILY.load_text_encoder("tiny", CPU, F32, vision=True)
    assert isinstance(loaded, qwen_vl.VisionTextEncoder)
    return loaded


def test_the_vl_tokenizer_spells_the_markers_as_the_config_does(encoder) -> None:
    tokenizer = tiny_vl_tokenizer()
    ids = tokenizer.convert_tokens_to_ids(list(QWEN_VL_SPECIAL_TOKENS))
    assert ids == list(range(259, 265)) and len(tokenizer) == 265
    assert tokenizer("a<|image_pad|>b").input_ids == [67, 263, 68]  # one token, nothing appended
    config = encoder.model.config
    assert (config.vision_start_token_id, config.vision_end_token_id) == (261, 262)
    assert (config.image_token_id, config.video_token_id) == (263, 264)
    # The text-only tiny tokenizer (cached demo numbers depend on it): bytes for the markers, </s>.
    plain = tiny_tokenizer()
    assert len(plain) == 259 and len(plain("<|image_pad|>").input_ids) == len("<|image_pad|>") + 1


def _fixed_forward(model: torch.nn.Module):
    """The text encoder's forward with the processor's ``mm_token_type_ids`` (image tokens 1),
    which the pipelines do not pass (diffusers #14194, PR #14189's fix)."""
    forward = model.forward

    def fixed(*args, **kwargs):
        if kwargs.get("pixel_values") is not None and kwargs.get("mm_token_type_ids") is None:
            kwargs["mm_token_type_ids"] = (kwargs["input_ids"] == model.config.image_token_id).int()
        return forward(*args, **kwargs)

    return fixed


def _pipeline_embeddings(pipe, caption, images, model, monkeypatch, fixed: bool) -> torch.Tensor:
    with monkeypatch.context() as patch:
        if fixed:
            patch.setattr(model, "forward", _fixed_forward(model))
        hidden, mask = pipe.encode_prompt(caption, image=images or None, device=CPU)
    assert mask is None  # one caption: every token real
    return hidden[0]


def test_edit_plus_embeddings_equal_the_pipelines(encoder, monkeypatch) -> None:
    pipe = QwenImageEditPlusPipeline(
        FlowMatchEulerDiscreteScheduler(), None, encoder.model, encoder.tokenizer, encoder.processor, None
    )
    # The pipeline drops 64 tokens (Qwen's tokenizer's prefix); the tiny tokenizer's prefix is longer.
    drop = len(encoder.tokenizer(qwen_vl.EDIT_PREFIX, add_special_tokens=False).input_ids)
    pipe.prompt_template_encode_start_idx = drop

    def seen(image: Image.Image) -> Image.Image:  # the pipeline's own condition-image resize
        w, h = pipeline_qwenimage_edit_plus.calculate_dimensions(
            pipeline_qwenimage_edit_plus.CONDITION_IMAGE_SIZE, image.size[0] / image.size[1]
        )
        return pipe.image_processor.resize(image, h, w)

    wide, tall = picture(56, 40, 0), picture(48, 96, 1)
    captions = ["a cat on a sofa", "two dogs", "no control image"]
    controls = [[wide], [wide, tall], []]
    ours = FAMILY.encode_edit_text(encoder, captions, controls, "edit-2509")  # one batch
    # 2509 and 2511 read their controls alike (same pipeline)
    for a, b in zip(ours, FAMILY.encode_edit_text(encoder, captions, controls, "edit-2511"), strict=True):
        assert torch.equal(a, b)
    for caption, images, embedding in zip(captions, controls, ours, strict=True):
        vl_images = [seen(image) for image in images]
        expected = _pipeline_embeddings(pipe, caption, vl_images, encoder.model, monkeypatch, fixed=True)
        torch.testing.assert_close(embedding, expected, rtol=0, atol=1e-6)  # batched vs one by one
        as_released = _pipeline_embeddings(pipe, caption, vl_images, encoder.model, monkeypatch, fixed=False)
        if images:  # sequential positions for the image tokens: other embeddings
            assert (embedding - as_released).abs().max() > 1e-4
        else:
            torch.testing.assert_close(embedding, as_released, rtol=0, atol=1e-6)
    # "Picture 2:" and the second image's tokens: the two-image embedding is the longest
    assert ours[1].shape[0] > ours[0].shape[0] > ours[2].shape[0]


def test_edit_embeddings_equal_the_pipelines(encoder, monkeypatch) -> None:
    pipe = QwenImageEditPipeline(
        FlowMatchEulerDiscreteScheduler(), None, encoder.model, encoder.tokenizer, encoder.processor, None
    )
    pipe.prompt_template_encode_start_idx = len(
        encoder.tokenizer(qwen_vl.EDIT_PREFIX, add_special_tokens=False).input_ids
    )
    image = picture(40, 72, 2)
    w, h, _ = pipeline_qwenimage_edit.calculate_dimensions(1024 * 1024, image.size[0] / image.size[1])
    expected = _pipeline_embeddings(
        pipe, "make it red", [pipe.image_processor.resize(image, h, w)], encoder.model, monkeypatch, True
    )
    (ours,) = FAMILY.encode_edit_text(encoder, ["make it red"], [[image]], "edit")
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)
    with pytest.raises(DataError, match="edit takes one control image per item, got 2"):
        FAMILY.encode_edit_text(encoder, ["x"], [[image, image]], "edit")


def test_the_vl_image_sizes_are_the_pipelines() -> None:
    for width in range(24, 2000, 37):
        for height in (17, 40, 333, 1024, 1999):
            ratio = width / height
            plus = pipeline_qwenimage_edit_plus.calculate_dimensions(384 * 384, ratio)
            assert qwen_vl.area_size(width, height, qwen_vl.CONDITION_IMAGE_SIZE) == plus
            edit = pipeline_qwenimage_edit.calculate_dimensions(1024 * 1024, ratio)[:2]
            assert qwen_vl.area_size(width, height, qwen_vl.VAE_IMAGE_SIZE) == edit


def test_the_text_only_encoder_cannot_read_control_images() -> None:
    text_only = FAMILY.load_text_encoder("tiny", CPU, F32)
    with pytest.raises(ModelLoadError, match="vision tower"):
        FAMILY.encode_edit_text(text_only, ["x"], [[]], "edit-2509")


# --- predict: the sequence [target | controls], the target's prediction --------------------------


def _edit_transformer(zero_cond_t: bool) -> torch.nn.Module:
    name = qwen_image.TINY_EDIT_2511 if zero_cond_t else "tiny"
    return FAMILY.load_transformer(name, "--dit", CPU, F32)


def _pipeline_step(transformer, noisy, controls, sigmas, text) -> torch.Tensor:
    """One denoising call as ``QwenImageEditPlusPipeline.__call__`` makes it (prepare_latents'
    packing, img_shapes from pixel sizes, t / 1000, the target slice, _unpack_latents)."""
    pipe = QwenImageEditPlusPipeline
    scale = 4  # the tiny VAE's spatial factor: the pipeline works from pixel sizes
    b, c, _, h, w = noisy.shape
    latents = pipe._pack_latents(noisy, b, c, h, w)
    image_latents = torch.cat([pipe._pack_latents(x, b, c, *x.shape[3:]) for x in controls], dim=1)
    height, width = h * scale, w * scale
    img_shapes = [
        [
            (1, height // scale // 2, width // scale // 2),
            *[(1, x.shape[3] * scale // scale // 2, x.shape[4] * scale // scale // 2) for x in controls],
        ]
    ] * b
    t = sigmas * 1000  # the scheduler's timesteps
    noise_pred = transformer(
        hidden_states=torch.cat([latents, image_latents], dim=1),
        timestep=t / 1000,
        guidance=None,
        encoder_hidden_states_mask=text.mask,
        encoder_hidden_states=text.hidden,
        img_shapes=img_shapes,
        attention_kwargs={},
        return_dict=False,
    )[0]
    noise_pred = noise_pred[:, : latents.size(1)]
    return pipe._unpack_latents(noise_pred, height, width, scale)


@pytest.mark.parametrize("zero_cond_t", [False, True], ids=["edit-2509", "edit-2511"])
@pytest.mark.parametrize("count", [1, 2])
def test_predict_equals_the_edit_plus_pipeline_step(zero_cond_t: bool, count: int) -> None:
    transformer = _edit_transformer(zero_cond_t)
    assert transformer.config.zero_cond_t is zero_cond_t
    noisy = randn(2, 4, 1, 6, 8)
    controls = (randn(2, 4, 1, 8, 8, seed=3), randn(2, 4, 1, 4, 10, seed=4))[:count]
    text = FAMILY.collate_text([randn(3, 16, seed=1), randn(5, 16, seed=2)])
    sigmas = torch.tensor([0.25, 0.8])
    with torch.no_grad():
        ours = FAMILY.predict(transformer, noisy, sigmas, text, Conditioning(control_latents=controls))
        expected = _pipeline_step(transformer, noisy, controls, sigmas, text)
        plain = FAMILY.predict(transformer, noisy, sigmas, text)
    assert ours.shape == noisy.shape
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)  # the same calls, in the same order
    assert (ours - plain).abs().max() > 1e-2  # the controls change the prediction (by ~0.04 of ~1.6)


def test_zero_cond_t_runs_the_controls_at_timestep_zero() -> None:
    """Edit-2511's transformer modulates control tokens with t = 0 itself: the caller passes the
    target's timestep only, and a control-free model sees the controls at the noise level."""
    noisy, control = randn(1, 4, 1, 4, 4), randn(1, 4, 1, 4, 4, seed=5)
    text = FAMILY.collate_text([randn(4, 16, seed=1)])
    condition = Conditioning(control_latents=(control,))
    zero, plain = _edit_transformer(True), _edit_transformer(False)
    with torch.no_grad():
        at = {s: FAMILY.predict(zero, noisy, torch.tensor([s]), text, condition) for s in (0.0, 0.5)}
        same_weights = FAMILY.predict(plain, noisy, torch.tensor([0.0]), text, condition)
    torch.testing.assert_close(at[0.0], same_weights, rtol=0, atol=1e-6)  # at t = 0 the two agree
    assert not torch.allclose(at[0.5], FAMILY.predict(plain, noisy, torch.tensor([0.5]), text, condition))


def test_the_loss_covers_target_tokens_and_its_gradient_reaches_the_controls() -> None:
    transformer = _edit_transformer(True)
    noisy = randn(2, 4, 1, 4, 6)
    controls = (randn(2, 4, 1, 6, 6, seed=3).requires_grad_(), randn(2, 4, 1, 4, 4, seed=4).requires_grad_())
    text = FAMILY.collate_text([randn(3, 16, seed=1), randn(5, 16, seed=2)])
    condition = Conditioning(control_latents=controls)
    seen: list[torch.Tensor] = []
    hook = transformer.register_forward_hook(lambda module, args, out: seen.append(out[0]))
    try:
        prediction = FAMILY.predict(transformer, noisy, torch.tensor([0.3, 0.9]), text, condition)
    finally:
        hook.remove()
    # The transformer predicts 6 + 9 + 4 tokens per sample; predict hands back the 6 target ones,
    # unpacked: a mask of the target's shape is all a loss can weight.
    assert seen[0].shape == (2, 6 + 9 + 4, 16)
    assert prediction.shape == noisy.shape
    torch.testing.assert_close(prediction, qwen_image.unpack_latents(seen[0][:, :6], 4, 6), rtol=0, atol=0)
    weights = torch.rand(noisy.shape, generator=torch.Generator().manual_seed(7))
    loss = (weights * (prediction - randn(*noisy.shape, seed=8)) ** 2).mean()
    loss.backward()
    for control in controls:  # through attention, the controls condition the target
        assert control.grad is not None and torch.isfinite(control.grad).all()
        assert control.grad.abs().sum() > 0


def test_conditioning_rows_and_to_handle_per_control_tensors() -> None:
    controls = (randn(3, 4, 1, 2, 2), randn(3, 4, 1, 4, 2, seed=1))
    condition = Conditioning(control_latents=controls)
    picked = condition.rows(torch.tensor([True, False, True]))
    assert picked.control_latents is not None
    assert [tuple(c.shape) for c in picked.control_latents] == [(2, 4, 1, 2, 2), (2, 4, 1, 4, 2)]
    assert torch.equal(picked.control_latents[1], controls[1][[0, 2]])
    moved = condition.to(CPU, torch.bfloat16)
    assert moved.control_latents is not None and all(c.dtype == torch.bfloat16 for c in moved.control_latents)
    assert moved.image_latents is None


def test_the_edit_2511_tiny_model_and_its_config() -> None:
    config = FAMILY.transformer_config(qwen_image.TINY_EDIT_2511, "--dit")
    assert config is not None and config["zero_cond_t"] is True
    assert dict(_edit_transformer(True).config)["zero_cond_t"] is True
    assert qwen_image.tiny_transformer(zero_cond_t=True).config.zero_cond_t is True
    assert not FAMILY.load_transformer("tiny", "--dit", CPU, F32).config.zero_cond_t
    assert qwen_image.edit_version_mismatch(config, "edit-2511") is None
    assert "pass --model_version edit-2511" in str(qwen_image.edit_version_mismatch(config, "edit-2509"))
    plain = FAMILY.transformer_config("tiny", "--dit")
    assert plain is not None and qwen_image.edit_version_mismatch(plain, "edit") is None
    assert "not a Qwen-Image-Edit-2511" in str(qwen_image.edit_version_mismatch(plain, "edit-2511"))


# --- sampling ------------------------------------------------------------------------------------


def test_an_edit_sample_is_deterministic_and_reads_its_controls(encoder, monkeypatch) -> None:
    # The pipeline VAE-encodes each control at a ~1024² area (16 s for the tiny VAE on a CPU); the
    # test makes that area 64² so the sample takes a fraction of a second.
    monkeypatch.setattr(pipeline_qwenimage_edit_plus, "VAE_IMAGE_SIZE", 64 * 64)
    transformer, vae = _edit_transformer(True), FAMILY.load_vae("tiny", CPU, F32)

    controls = (picture(40, 56, 0), picture(64, 32, 1))
    text = FAMILY.collate_text(FAMILY.encode_edit_text(encoder, ["a fox"], [list(controls)], "edit-2511"))
    negative = FAMILY.collate_text(FAMILY.encode_edit_text(encoder, [" "], [list(controls)], "edit-2511"))

    def sample(images: tuple[Image.Image, ...]) -> torch.Tensor:
        request = SampleRequest(
            width=32,
            height=48,
            frames=1,
            steps=2,
            cfg_scale=4.0,
            flow_shift=None,
            text=text,
            negative=negative,
            generator=torch.Generator().manual_seed(0),
            control_images=images,
        )
        return FAMILY.generate(transformer, None, 0.0, vae, request)

    first = sample(controls)
    assert first.shape == (1, 48, 32, 3) and first.dtype == torch.uint8
    assert torch.equal(first, sample(controls))
    # the same prompt embeddings with another first control: the pipeline packs the controls' latents
    assert not torch.equal(first, sample((picture(40, 56, 2), controls[1])))


def test_an_item_without_controls_samples_through_the_text_to_image_pipeline(encoder) -> None:
    text = FAMILY.collate_text(FAMILY.encode_edit_text(encoder, ["a fox"], [[]], "edit-2509"))
    request = SampleRequest(32, 32, 1, 2, 1.0, None, text, None, torch.Generator().manual_seed(0))
    image = FAMILY.generate(_edit_transformer(False), None, 0.0, FAMILY.load_vae("tiny", CPU, F32), request)
    assert image.shape == (1, 32, 32, 3)


# --- ComfyUI's qwen_2.5_vl_7b*.safetensors with its vision tower --------------------------------


@pytest.fixture(scope="module")
def vl_file(tmp_path_factory):
    """A small Qwen2.5-VL with the released head sizes (text: 128-dim heads; vision: 16 heads),
    stored as ComfyUI stores it (``model.`` + the language model, ``visual.``, ``lm_head``), its
    tokenizer saved to a folder; and the same model in memory."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLModel

    from masktrain.models import loading

    root = tmp_path_factory.mktemp("qwen_vl")
    tokenizer = tiny_vl_tokenizer()
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 256,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "rms_norm_eps": 1e-6,
            "rope_theta": 1e6,
            "max_position_embeddings": 128000,
            "rope_scaling": {"type": "mrope", "rope_type": "default", "mrope_section": [16, 24, 24]},
        },
        vision_config={
            "depth": 2,
            "hidden_size": 64,
            "intermediate_size": 32,
            "num_heads": 16,
            "out_hidden_size": 256,
            "tokens_per_second": 2,
        },
        vocab_size=len(tokenizer),
        **qwen_vl.marker_ids(tokenizer, "test"),
    )
    model = loading.seeded(lambda: Qwen2_5_VLModel(config)).eval()
    # ComfyUI's (transformers 4) names: the language model under model., the vision tower as visual.
    state = {key.replace("language_model.", "model.", 1): value for key, value in model.state_dict().items()}
    state["lm_head.weight"] = torch.ones(len(tokenizer), 256)
    tokenizer.save_pretrained(root / "tokenizer")
    path = root / "qwen_2.5_vl_7b.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    text_only = root / "text_only.safetensors"
    save_file({k: v.contiguous() for k, v in state.items() if not k.startswith("visual.")}, str(text_only))
    return path, text_only, root / "tokenizer", model


def test_a_single_file_vl_with_its_vision_tower_encodes_as_the_same_weights(vl_file) -> None:
    path, _, tokenizer_folder, model = vl_file
    loaded = FAMILY.load_text_encoder(str(path), CPU, F32, tokenizer=str(tokenizer_folder), vision=True)
    assert isinstance(loaded, qwen_vl.VisionTextEncoder)
    tokenizer = tiny_vl_tokenizer()
    processor = qwen_vl.edit_processor(tokenizer, qwen_vl.RELEASED_PIXELS)
    reference = qwen_vl.VisionTextEncoder(tokenizer, model, qwen_image.MAX_LENGTH, processor)
    captions = ["a cat", "two dogs"]
    controls = [[picture(56, 40, 0)], [picture(56, 40, 0), picture(32, 64, 1)]]
    got = FAMILY.encode_edit_text(loaded, captions, controls, "edit-2509")
    expected = FAMILY.encode_edit_text(reference, captions, controls, "edit-2509")
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)
    # the text model alone (text-to-image) still reads only the language model of the same file
    text_only = FAMILY.load_text_encoder(str(path), CPU, F32, tokenizer=str(tokenizer_folder))
    assert not any(name.startswith("visual") for name, _ in text_only.model.named_parameters())


def test_a_single_file_without_a_vision_tower_is_named(vl_file) -> None:
    _, text_only, tokenizer_folder, _ = vl_file
    with pytest.raises(ModelLoadError, match=r"holds no vision tower \(visual\.\* weights\)"):
        FAMILY.load_text_encoder(str(text_only), CPU, F32, tokenizer=str(tokenizer_folder), vision=True)


def test_a_tokenizer_without_the_vision_markers_is_named(vl_file, tmp_path: Path) -> None:
    path = vl_file[0]
    tiny_tokenizer().save_pretrained(tmp_path / "plain")
    with pytest.raises(ModelLoadError, match=r"has no <\|vision_start\|>"):
        FAMILY.load_text_encoder(str(path), CPU, F32, tokenizer=str(tmp_path / "plain"), vision=True)
