"""Qwen-Image-Layered (``--model_version layered``) with the tiny models on the CPU:

- the reducer's layered layout with the prior term, against hand-computed values, with and without
  the base frame (``drop_base_frame``);
- ``predict`` against ``QwenImageLayeredPipeline``'s own packing and transformer call, and the
  sampling loop against the pipeline itself (made to run at 32x32 with the tiny models);
- the cache of musubi's layered layout (``multiple_target``): RGBA images encoded one by one, alpha
  kept as content, the base as the control, one mask for every image or a folder of one per image;
  the layout's naming rules and ``alpha_mask`` refused;
- training with and without ``--remove_first_image_from_target`` (the student and the teacher see
  the layers only, the base as control), and ``masktrain sample`` writing RGBA layers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageLayeredPipeline
from diffusers.pipelines.qwenimage import pipeline_qwenimage_layered
from PIL import Image

from helpers import cache_tiny, check_lora_round_trip, photo, randn, tiered, train_config
from masktrain import _native
from masktrain.config.dataset import load_dataset_config
from masktrain.config.mask_loss import MaskLossSettings
from masktrain.config.memory import MemorySettings
from masktrain.config.sample import SampleConfig, SampleSettings
from masktrain.data import cache_format as fmt
from masktrain.data.cached_items import find_cached_items
from masktrain.data.discovery import discover
from masktrain.errors import ConfigError, ModelLoadError, TrainConfigError
from masktrain.loss import masked_loss_terms
from masktrain.models import get_family, qwen_image, qwen_layered
from masktrain.models.base import Conditioning, SampleRequest
from masktrain.sample.run import run as sample
from masktrain.train.loop import run as train

CPU, F32 = torch.device("cpu"), torch.float32
FAMILY = get_family("qwen_image")
LAYERED = qwen_layered.TINY_LAYERED


# --- the reducer ---------------------------------------------------------------------------------


def test_the_layered_prior_against_hand_computed_values() -> None:
    # One sample, 1 channel, 1x2 cells; mask frames: base [1, 0.5], layer 1 [1, 0], layer 2 [0.5, 0.5].
    # Continuous mode, w_prior 0.5: target weights p = mask, prior region 1 - p.
    mask = torch.tensor([[1.0, 0.5], [1.0, 0.0], [0.5, 0.5]]).view(1, 1, 3, 1, 2)
    loss = torch.tensor([[10.0, 20.0], [2.0, 100.0], [4.0, 6.0]]).view(1, 3, 1, 1, 2)  # (B, L, C, H, W)
    prior = torch.tensor([[7.0, 9.0], [1.0, 8.0], [3.0, 5.0]]).view(1, 3, 1, 1, 2)
    settings = MaskLossSettings(use_mask_loss=True, prior_preservation_weight=0.5)
    # Without the base (--remove_first_image_from_target): the layers only.
    #   L_t = (2*1 + 100*0 + 4*0.5 + 6*0.5) / (1 + 0 + 0.5 + 0.5) = 7 / 2 = 3.5
    #   L_p = 0.5 * (1*0 + 8*1 + 3*0.5 + 5*0.5) / (0 + 1 + 0.5 + 0.5) = 0.5 * 12 / 2 = 3
    dropped = masked_loss_terms(
        loss[:, 1:], mask, settings, prior_loss=prior[:, 1:], layout="layered", drop_base_frame=True
    )
    assert (float(dropped.target), float(dropped.prior)) == pytest.approx((3.5, 3.0), abs=1e-6)
    # With the base: its cells add 10*1 + 20*0.5 = 20 over 1.5 to the target, 9*0.5 = 4.5 over 0.5
    # to the prior region. L_t = 27 / 3.5; L_p = 0.5 * 16.5 / 2.5 = 3.3.
    kept = masked_loss_terms(loss, mask, settings, prior_loss=prior, layout="layered")
    assert (float(kept.target), float(kept.prior)) == pytest.approx((27 / 3.5, 3.3), abs=1e-6)
    # The weights and prior region as prepared, in the layered layout (B, L, 1, H, W).
    assert kept.weights is not None and kept.prior_region is not None
    assert kept.weights.shape == (1, 3, 1, 1, 2)
    torch.testing.assert_close(kept.prior_region.flatten(), torch.tensor([0, 0.5, 0, 1, 0.5, 0.5]))
    # Per sample, two samples: the second has no prior region in its layers (all ones) and counts 0.
    two = masked_loss_terms(
        torch.cat([loss[:, 1:], loss[:, 1:]]),
        torch.cat([mask, torch.ones_like(mask)]),
        MaskLossSettings(use_mask_loss=True, prior_preservation_weight=0.5, normalize_per_sample=True),
        prior_loss=torch.cat([prior[:, 1:], prior[:, 1:]]),
        layout="layered",
        drop_base_frame=True,
    )
    # L_t = (3.5 + (2 + 100 + 4 + 6) / 4) / 2 = (3.5 + 28) / 2; L_p = 0.5 * (6 + 0) / 2 = 1.5
    assert (float(two.target), float(two.prior)) == pytest.approx((15.75, 1.5), abs=1e-6)


# --- the model ------------------------------------------------------------------------------------


def _pipeline_step(transformer, noisy, condition, sigmas, text) -> torch.Tensor:
    """One denoising call as ``QwenImageLayeredPipeline.__call__`` makes it: prepare_latents'
    packing of (B, L, C, h, w) and of the condition as one layer, img_shapes from pixel sizes, t /
    1000, "is_rgb" = 0, the target slice, _unpack_latents."""
    pipe = QwenImageLayeredPipeline
    scale = 4  # the tiny VAE's spatial factor: the pipeline works from pixel sizes
    b, c, layers, h, w = noisy.shape
    latents = pipe._pack_latents(noisy.permute(0, 2, 1, 3, 4), b, c, h, w, layers)
    ch, cw = condition.shape[-2:]
    image_latents = pipe._pack_latents(condition.permute(0, 2, 1, 3, 4), b, c, ch, cw, 1)
    height, width = h * scale, w * scale
    img_shapes = [
        [
            *[(1, height // scale // 2, width // scale // 2)] * layers,
            (1, ch * scale // scale // 2, cw * scale // scale // 2),
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
        additional_t_cond=torch.tensor([0] * b).to(dtype=torch.long),
        return_dict=False,
    )[0]
    noise_pred = noise_pred[:, : latents.size(1)]
    return pipe._unpack_latents(noise_pred, height, width, layers - 1, scale)


@pytest.mark.parametrize("layers", [3, 2, 1], ids=["base+2", "2 layers", "1 layer"])
def test_predict_equals_the_layered_pipeline_step(layers: int) -> None:
    """The base and two layers, or the layers alone (``--remove_first_image_from_target``): the
    layer count is free, the condition image always last."""
    transformer = FAMILY.load_transformer(LAYERED, "--dit", CPU, F32)
    noisy = randn(2, 4, layers, 6, 8)
    condition = randn(2, 4, 1, 6, 8, seed=3)
    text = FAMILY.collate_text([randn(3, 16, seed=1), randn(5, 16, seed=2)])
    sigmas = torch.tensor([0.25, 0.8])
    with torch.no_grad():
        ours = FAMILY.predict(transformer, noisy, sigmas, text, Conditioning(control_latents=(condition,)))
        expected = _pipeline_step(transformer, noisy, condition, sigmas, text)
        other = FAMILY.predict(transformer, noisy, sigmas, text, Conditioning(control_latents=(-condition,)))
    assert ours.shape == noisy.shape
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)  # the same calls, in the same order
    assert (ours - other).abs().max() > 1e-2  # the condition image changes the prediction


def test_the_layered_tiny_models_and_their_checks() -> None:
    config = FAMILY.transformer_config(LAYERED, "--dit")
    assert config is not None and config["use_layer3d_rope"] and config["use_additional_t_cond"]
    plain = FAMILY.transformer_config("tiny", "--dit")
    assert plain is not None
    assert qwen_image.edit_version_mismatch(config, "layered") is None
    assert "pass --model_version layered" in str(qwen_image.edit_version_mismatch(config, "original"))
    assert "not a Qwen-Image-Layered transformer" in str(qwen_image.edit_version_mismatch(plain, "layered"))
    rgba = FAMILY.load_vae(LAYERED, CPU, F32)
    assert rgba.config.input_channels == 4 and FAMILY.spatial_factor(rgba) == 4
    qwen_layered.check_vae(rgba, LAYERED, layered=True)
    with pytest.raises(ModelLoadError, match="--vae tiny: Qwen-Image-Layered encodes RGBA"):
        qwen_layered.check_vae(FAMILY.load_vae("tiny", CPU, F32), "tiny", layered=True)
    with pytest.raises(ModelLoadError, match="pass --model_version layered"):
        qwen_layered.check_vae(rgba, LAYERED, layered=False)
    # a single file's config, read off its tensor shapes: the "is RGB" embedding marks Layered
    from masktrain.models.qwen_image_checkpoint import qwen_transformer_config

    for name, layered in ((LAYERED, True), ("tiny", False)):
        model = FAMILY.load_transformer(name, "--dit", CPU, F32)
        shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
        read = qwen_transformer_config(shapes, {"axes_dims_rope": (8, 4, 4)})
        assert read["use_layer3d_rope"] is read["use_additional_t_cond"] is layered
    # without the base image as the one control, predict says what is missing
    transformer = FAMILY.load_transformer(LAYERED, "--dit", CPU, F32)
    text = FAMILY.collate_text([randn(3, 16, seed=1)])
    with pytest.raises(ValueError, match="takes one control"):
        FAMILY.predict(transformer, randn(1, 4, 2, 4, 4), torch.tensor([0.5]), text)


def _rgba(seed: int, size: int = 32) -> np.ndarray:
    return np.concatenate([photo(size, size, seed), tiered(size, size, seed + 1)[..., None]], axis=-1)


def test_sampling_is_the_layered_pipelines_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """``QwenImageLayeredPipeline`` itself, made to run with the tiny models at 32x32: it sizes
    images at 640 or 1024 pixels (``calculate_dimensions``: 32 here), reads the text encoder's
    dtype (a stub), and with the tiny VAE's 4 latent channels would take the RGBA image for
    latents (``latent_channels = -1`` makes it encode, as with the released 16 channels)."""

    class Encoder(torch.nn.Module):
        dtype, device = F32, CPU

        def __init__(self) -> None:
            super().__init__()
            self.unused = torch.nn.Parameter(torch.zeros(1))

    monkeypatch.setattr(pipeline_qwenimage_layered, "calculate_dimensions", lambda area, ratio: (32, 32))
    transformer = FAMILY.load_transformer(LAYERED, "--dit", CPU, F32)
    vae = FAMILY.load_vae(LAYERED, CPU, F32)
    image = Image.fromarray(_rgba(1), "RGBA")
    text, negative = FAMILY.collate_text([randn(5, 16, seed=1)]), FAMILY.collate_text([randn(3, 16, seed=2)])

    def scheduler() -> FlowMatchEulerDiscreteScheduler:
        return FlowMatchEulerDiscreteScheduler(**qwen_image.SCHEDULER, use_dynamic_shifting=True)

    pipe = QwenImageLayeredPipeline(
        scheduler=scheduler(),
        vae=vae,
        text_encoder=Encoder(),
        tokenizer=None,
        processor=None,
        transformer=transformer,
    )
    pipe.latent_channels = -1
    pipe.set_progress_bar_config(disable=True)
    settings: dict[str, Any] = dict(
        image=image,
        prompt="a prompt, so the pipeline does not caption the image",
        prompt_embeds=text.hidden,
        prompt_embeds_mask=torch.ones(1, 5, dtype=torch.long),
        negative_prompt_embeds=negative.hidden,
        negative_prompt_embeds_mask=torch.ones(1, 3, dtype=torch.long),
        true_cfg_scale=4.0,
        layers=2,
        num_inference_steps=3,
    )
    steps: list[
        torch.Tensor
    ] = []  # its packed latents after each step (output_type="latent" fails in 0.42.1)

    def keep(pipe: Any, step: int, t: Any, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        steps.append(tensors["latents"].clone())
        return tensors

    generator = torch.Generator().manual_seed(7)
    pixels = pipe(**settings, generator=generator, output_type="np", callback_on_step_end=keep).images[0]

    def request() -> SampleRequest:
        return SampleRequest(
            width=32,
            height=32,
            frames=2,
            steps=3,
            cfg_scale=4.0,
            flow_shift=None,
            text=text,
            negative=negative,
            generator=torch.Generator().manual_seed(7),
            control_images=(image,),
        )

    latents = qwen_layered.denoise(transformer, vae, request(), scheduler())
    # ~2e-6 apart: the pipeline normalises the image's latents as (z - mean) / std, masktrain (as the
    # cache) as (z - mean) * (1 / std)
    torch.testing.assert_close(latents, qwen_layered.unpack_layers(steps[-1], 3, 8, 8), rtol=0, atol=1e-5)
    images = qwen_layered.generate(transformer, vae, request(), scheduler())
    assert images.shape == (3, 32, 32, 4) and images.dtype == torch.uint8
    # the pipeline leaves the model's first image (the base) out; the layers are the same pixels
    assert torch.equal(images[1:], torch.from_numpy((pixels * 255).round().astype(np.uint8)))


# --- the cache ----------------------------------------------------------------------------------


def _dataset(root: Path, extra: str = "") -> Path:
    """Two items of two RGBA layers each at 32x32: ``cat`` (an RGB base, one mask file for every
    image) and ``dog`` (an RGBA base, a mask folder of one frame per image)."""
    for folder in ("images", "masks", "masks/dog"):
        (root / folder).mkdir()
    Image.fromarray(photo(32, 32, 0)).save(root / "images" / "cat.png")
    Image.fromarray(_rgba(10), "RGBA").save(root / "images" / "dog.png")
    for index, stem in enumerate(("cat", "dog")):
        (root / "images" / f"{stem}.txt").write_text(f"the {stem}", encoding="utf-8")
        for layer in range(2):
            Image.fromarray(_rgba(20 + 4 * index + 2 * layer), "RGBA").save(
                root / "images" / f"{stem}_{layer}.png"
            )
    Image.fromarray(tiered(32, 32, 5)).save(root / "masks" / "cat.png")
    for frame in range(3):
        Image.fromarray(tiered(32, 32, 40 + frame)).save(root / "masks" / "dog" / f"{frame:05d}.png")
    toml = root / "dataset.toml"
    toml.write_text(
        f"""
[general]
resolution = [32, 32]
batch_size = 2

[[datasets]]
image_directory = "images"
mask_directory = "masks"
cache_directory = "cache"
multiple_target = true
{extra}
""",
        encoding="utf-8",
    )
    return toml


def _cache(root: Path) -> Any:
    return cache_tiny(root, "qwen_image", task="layered", vae=LAYERED)


@pytest.fixture(scope="module")
def layered(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("layered")
    _dataset(root)
    (summary,) = _cache(root)
    assert not summary.failed and summary.sources["file"] == 2
    return root


def _file(root: Path, stem: str) -> Path:
    return root / "cache" / fmt.item_cache_name(stem, (32, 32), "qwen_image")


def _pixels(*arrays: np.ndarray) -> torch.Tensor:
    """(N, 4, 1, H, W) in [-1, 1] of RGBA images, each encoded alone."""
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div(127.5).sub(1)[:, :, None]


def test_the_cache_holds_every_image_rgba_and_the_base_as_control(layered: Path) -> None:
    metadata, shapes = fmt.read_header(_file(layered, "cat"))
    keys = fmt.item_tensor_keys(shapes, _file(layered, "cat"))
    assert metadata.extra[fmt.KEY_CONDITION] == "layered"
    assert shapes[keys.latents] == (4, 3, 8, 8) and keys.control_latents == (
        "latents_control_0_1x8x8_float32",
    )
    tensors, _ = fmt.load_cache_file(_file(layered, "cat"))
    images = layered / "images"
    rgba = [
        np.asarray(Image.open(images / name).convert("RGBA"))
        for name in ("cat.png", "cat_0.png", "cat_1.png")
    ]
    assert (rgba[0][..., 3] == 255).all()  # the RGB base: opaque
    vae = FAMILY.load_vae(LAYERED, CPU, F32)
    expected = FAMILY.encode_pixels(vae, _pixels(*rgba))[:, :, 0].permute(1, 0, 2, 3)  # (C, L, h, w)
    torch.testing.assert_close(tensors[keys.latents], expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(tensors[keys.control_latents[0]], tensors[keys.latents][:, :1], rtol=0, atol=0)
    # alpha is content: the layer encoded opaque has other latents
    opaque = rgba[1].copy()
    opaque[..., 3] = 255
    assert (FAMILY.encode_pixels(vae, _pixels(opaque))[:, :, 0] - expected[:, 1]).abs().max() > 0.1
    # one mask file weights every image alike
    weights = tensors[keys.mask_weights or ""]
    pooled = _native.prepare_mask(layered / "masks" / "cat.png", (32, 32), (32, 32), 4)[1]
    assert weights.shape == (1, 3, 8, 8)
    for frame in range(3):
        torch.testing.assert_close(weights[0, frame], torch.from_numpy(pooled), rtol=0, atol=0)


def test_a_mask_folder_gives_each_image_its_own_mask(layered: Path) -> None:
    tensors, metadata = fmt.load_cache_file(_file(layered, "dog"))
    assert metadata.mask_source == "file" and metadata.extra["mask_path"] == str(layered / "masks" / "dog")
    weights = tensors["mask_weights_3x8x8_float32"]
    for frame in range(3):
        path = layered / "masks" / "dog" / f"{frame:05d}.png"
        pooled = torch.from_numpy(_native.prepare_mask(path, (32, 32), (32, 32), 4)[1])
        torch.testing.assert_close(weights[0, frame], pooled, rtol=0, atol=0)
    assert not torch.equal(weights[0, 0], weights[0, 1])
    # the RGBA base keeps its alpha: its latents are those of the RGBA image
    vae = FAMILY.load_vae(LAYERED, CPU, F32)
    base = np.asarray(Image.open(layered / "images" / "dog.png"))
    expected = FAMILY.encode_pixels(vae, _pixels(base))[0, :, 0]
    torch.testing.assert_close(tensors["latents_3x8x8_float32"][:, 0], expected, rtol=0, atol=1e-5)


def test_touching_a_layer_makes_its_item_stale(layered: Path, tmp_path: Path) -> None:
    items = find_cached_items(layered / "dataset.toml", "qwen_image", condition="layered")
    assert sorted(item.latent_path.name for item in items) == [_file(layered, s).name for s in ("cat", "dog")]
    assert all(item.control_shapes == ((4, 1, 8, 8),) for item in items)
    layer = layered / "images" / "cat_1.png"
    stat = layer.stat()
    try:
        os.utime(layer, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
        fresh = find_cached_items(
            layered / "dataset.toml", "qwen_image", condition="layered", skip_stale=True
        )
        assert [item.latent_path.name for item in fresh] == [_file(layered, "dog").name]
    finally:
        os.utime(layer, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_the_layered_layout_and_its_refusals(tmp_path: Path) -> None:
    toml = _dataset(tmp_path)
    images = tmp_path / "images"
    # longer names claim first; an uncaptioned image that is no layer fails, named
    Image.fromarray(photo(32, 32, 1)).save(images / "stray.png")
    found = discover(load_dataset_config(toml).datasets[0])
    assert [(item.path.name, [p.name for p in item.layers]) for item in found.items] == [
        ("cat.png", ["cat_0.png", "cat_1.png"]),
        ("dog.png", ["dog_0.png", "dog_1.png"]),
    ]
    assert [(path.name, "no caption file" in why) for path, why in found.failed] == [("stray.png", True)]
    (images / "stray.png").unlink()
    # a layer numbered out of order sorts by its number, not its name
    (images / "cat_1.png").rename(images / "cat_10.png")
    assert [p.name for p in discover(load_dataset_config(toml).datasets[0]).items[0].layers] == [
        "cat_0.png",
        "cat_10.png",
    ]
    (images / "cat_10.png").rename(images / "cat_1.png")
    # a non-numeric suffix names the file; so does an item with another layer count
    Image.fromarray(_rgba(3), "RGBA").save(images / "cat_top.png")
    with pytest.raises(ConfigError, match=r"cat_top.png: a layer of cat.png is named cat_<n>"):
        discover(load_dataset_config(toml).datasets[0])
    (images / "cat_top.png").rename(images / "cat_2.png")
    with pytest.raises(ConfigError, match=r"dog.png: 2 layer image\(s\), but cat.png has 3"):
        discover(load_dataset_config(toml).datasets[0])
    (images / "cat_2.png").unlink()
    # alpha is content: alpha_mask is refused, naming mask_directory, before any model loads
    (tmp_path / "alpha").mkdir()
    _dataset(tmp_path / "alpha", "alpha_mask = true")
    with pytest.raises(
        ConfigError, match=r"alpha_mask = true' cannot be used .* give masks with mask_directory"
    ):
        _cache(tmp_path / "alpha")
    # the mode and the key go together; a mask folder must hold one frame per image
    with pytest.raises(ConfigError, match="'multiple_target = true' is for --model_version layered"):
        cache_tiny(tmp_path, "qwen_image")
    # and a layer has its base's aspect ratio; each failing item is named, the others cached
    (tmp_path / "masks" / "dog" / "00002.png").unlink()
    Image.fromarray(np.concatenate([photo(32, 64, 1), tiered(32, 64, 2)[..., None]], -1)).save(
        images / "cat_1.png"
    )
    (summary,) = _cache(tmp_path)
    failed = {path.name: why for path, why in summary.failed}
    assert failed["cat.png"].endswith(
        "cat_1.png: 64x32, but its base cat.png is 32x32: a layer has its base's aspect ratio"
    )
    assert failed["dog.png"].endswith(
        "dog: 2 mask frame(s) for 3 images (the base and 2 layers): frame i is image i's mask"
    )


# --- training and sampling ---------------------------------------------------------------------


@pytest.mark.parametrize("remove_first", [False, True], ids=["base+layers", "layers only"])
def test_layered_trains_two_steps(
    layered: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, remove_first: bool
) -> None:
    """The student and the teacher (masked prior preservation) get the same inputs: every image,
    or the layers only, with the base's clean latents as the control. The layers-only run also
    takes the memory path (fp8 blocks, one block streamed from the host, checkpointing, activation
    offload) and the Huber loss, whose metrics read the reducer's layered weights."""
    seen: list[tuple[int, torch.Tensor]] = []
    predict = qwen_layered.predict

    def spy(transformer, noisy, sigmas, text, condition):  # type: ignore[no-untyped-def]
        if noisy.device.type != "meta":  # not the memory plan's pass
            seen.append((noisy.shape[2], condition.detach().clone()))
        return predict(transformer, noisy, sigmas, text, condition)

    monkeypatch.setattr(qwen_layered, "predict", spy)
    memory = MemorySettings(
        fp8_base=remove_first,
        fp8_scaled=remove_first,
        blocks_to_swap=int(remove_first),
        gradient_checkpointing_cpu_offload=remove_first,
    )
    config = train_config(
        layered / "dataset.toml",
        tmp_path / "out",
        "qwen_image",
        model_version="layered",
        max_train_steps=2,
        remove_first_image_from_target=remove_first,
        memory=memory,
        gradient_checkpointing=remove_first,
        loss_type="huber" if remove_first else "mse",
    )
    assert config.denoisers == (LAYERED, None) and config.condition == "layered"
    lora = train(config)
    lines = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(np.isfinite(line["loss"]) for line in lines)
    assert all(line.get("teacher_ran") == 1.0 for line in lines)  # the tiered masks have a prior region
    assert all(("huber_target_linear" in line) == remove_first for line in lines)
    assert len(seen) == 4 and {frames for frames, _ in seen} == {2 if remove_first else 3}
    bases = [
        fmt.load_cache_file(_file(layered, stem))[0]["latents_3x8x8_float32"][:, :1]
        for stem in ("cat", "dog")
    ]
    for _, condition in seen:
        assert condition.shape == (2, 4, 1, 8, 8)
        for row in condition:
            assert any(torch.equal(row, base) for base in bases)
    assert lora.is_file()


def _layered_output(transformer: torch.nn.Module) -> torch.Tensor:
    """The denoiser's prediction for two layers given a base image."""
    generator = torch.Generator().manual_seed(3)
    noisy = torch.randn(2, 4, 2, 4, 6, generator=generator)
    condition = torch.randn(2, 4, 1, 4, 6, generator=generator)
    text = FAMILY.collate_text(
        [torch.randn(5, 16, generator=generator), torch.randn(7, 16, generator=generator)]
    )
    with torch.no_grad():
        return FAMILY.predict(
            transformer, noisy, torch.tensor([0.3, 0.8]), text, Conditioning(control_latents=(condition,))
        )


@pytest.mark.parametrize("layout", ["comfyui", "diffusers", "musubi"])
def test_a_layered_lora_loads_back_to_the_same_output(tmp_path: Path, layout: str) -> None:
    """Every layout of a layered LoRA loads back to the same prediction: through diffusers' own
    QwenImageLayeredPipeline.load_lora_weights where diffusers reads the layout, and through
    masktrain's loader for all three."""

    def fresh() -> torch.nn.Module:
        return FAMILY.load_transformer(LAYERED, "--dit", CPU, F32)

    def pipeline(transformer: torch.nn.Module) -> Any:
        vae = FAMILY.load_vae(LAYERED, CPU, F32)
        scheduler = FlowMatchEulerDiscreteScheduler()
        return QwenImageLayeredPipeline(scheduler, vae, None, None, None, transformer)

    check_lora_round_trip(
        tmp_path, layout, FAMILY, fresh, _layered_output, None if layout == "musubi" else pipeline
    )


def test_remove_first_image_from_target_is_for_layered_only(layered: Path, tmp_path: Path) -> None:
    from masktrain.cli.train import config_from_args

    flags = ["--dataset_config", str(layered / "dataset.toml"), "--arch", "qwen_image", "--dit", "tiny"]
    flags += ["--output_dir", str(tmp_path), "--remove_first_image_from_target"]
    assert config_from_args([*flags, "--model_version", "layered"]).remove_first_image_from_target
    with pytest.raises(TrainConfigError, match="--remove_first_image_from_target is for Qwen-Image-Layered"):
        config_from_args([*flags, "--model_version", "original"])


def test_layered_samples_are_rgba_layers(layered: Path, tmp_path: Path) -> None:
    image = layered / "images" / "dog.png"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"the dog --w 32 --h 32 --s 2 --f 2 --ci {image}\n", encoding="utf-8")
    settings = SampleSettings(sample_prompts=prompts, vae=LAYERED, text_encoder="tiny")
    (written,) = sample(
        SampleConfig(
            arch="qwen_image", dit="tiny", output_dir=tmp_path / "out", sample=settings, task="layered"
        )
    )
    with Image.open(written) as strip:
        assert (strip.mode, strip.size) == ("RGBA", (3 * 32, 32))
    layers = sorted(written.parent.glob(f"{written.stem}_layer*.png"))
    assert [path.name for path in layers] == [f"{written.stem}_layer{i}.png" for i in range(3)]
    for path in layers:
        with Image.open(path) as layer:
            assert (layer.mode, layer.size) == ("RGBA", (32, 32))
    # the image to decompose is one --ci
    prompts.write_text("the dog --w 32 --h 32 --s 2\n", encoding="utf-8")
    with pytest.raises(TrainConfigError, match="decomposes one image: give it as --ci IMAGE"):
        SampleConfig(arch="qwen_image", dit="tiny", output_dir=tmp_path, sample=settings, task="layered")
