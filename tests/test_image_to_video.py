"""WAN image-to-video training (``--task i2v-14B | flf2v-14B | i2v-A14B``) with the tiny models:
the conditioning against diffusers' own ``WanImageToVideoPipeline.prepare_latents``, the given-frame
mask by hand, the cache's keys and mode, training and sampling end to end, and the refusals (a cache
made for another mode, a text-to-video model on an I2V cache, missing --clip)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import cache_tiny, check_lora_round_trip, train_config, write_video
from masktrain import catalog
from masktrain.data import cache_format as fmt
from masktrain.errors import CacheConfigError, CacheModeMismatch, ModelLoadError, TrainConfigError
from masktrain.models import get_family, wan
from masktrain.models.wan_image_condition import given_frame_mask, image_condition
from masktrain.train.loop import run as train


def test_the_given_frame_mask_folds_pixel_frames_four_per_latent_frame() -> None:
    """9 pixel frames -> 3 latent frames; channel k of latent i is pixel frame 4i + k - 3."""
    i2v = given_frame_mask(1, 9, 1, 1, given_frames=1)[0, :, :, 0, 0]
    flf2v = given_frame_mask(1, 9, 1, 1, given_frames=2)[0, :, :, 0, 0]
    assert i2v.T.tolist() == [[1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert flf2v.T.tolist() == [[1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 1]]


@pytest.mark.parametrize("given", [1, 2], ids=["i2v", "flf2v"])
def test_the_conditioning_is_diffusers_prepare_latents(given: int) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline

    family = get_family("wan")
    vae = family.load_vae("tiny", torch.device("cpu"), torch.float32)
    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand(2, 3, 9, 32, 48, generator=generator) * 2 - 1
    ours = image_condition(family, vae, pixels, given)
    pipeline = WanImageToVideoPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        transformer=None,
        image_encoder=None,
        image_processor=None,
    )
    for row in range(2):  # the pipeline conditions one image per call
        last = {} if given == 1 else {"last_image": pixels[row : row + 1, :, -1]}
        _, theirs = pipeline.prepare_latents(
            pixels[row : row + 1, :, 0],
            1,
            16,
            32,
            48,
            9,
            torch.float32,
            torch.device("cpu"),
            generator,
            **last,
        )
        assert theirs.shape == (1, 20, 3, 4, 6)
        # the same numbers up to float32 rounding of the normalisation (latents are ~30 at most)
        torch.testing.assert_close(ours[row : row + 1], theirs, rtol=0, atol=1e-4)


def _video_dataset(root: Path, frames: int = 9) -> Path:
    """One 64x48 clip of `frames` frames with a mask and a caption."""
    (root / "videos").mkdir()
    (root / "masks").mkdir()
    write_video(root / "videos" / "walk.mkv", frames)
    mask = np.zeros((48, 64), np.uint8)
    mask[12:36, 16:48] = 255
    Image.fromarray(mask).save(root / "masks" / "walk.png")
    (root / "videos" / "walk.txt").write_text("a person walking", encoding="utf-8")
    toml = root / "dataset.toml"
    toml.write_text(
        f"""
[general]
resolution = [64, 48]

[[datasets]]
video_directory = "videos"
mask_directory = "masks"
cache_directory = "cache"
target_frames = [{frames}]
""",
        encoding="utf-8",
    )
    return toml


def _clip_file(root: Path) -> Path:
    (path,) = [p for p in (root / "cache").glob("*.safetensors") if not p.name.endswith("_te.safetensors")]
    return path


@pytest.mark.parametrize(
    ("task", "clip", "images"),
    [("i2v-14B", "tiny", 1), ("flf2v-14B", "tiny", 2), ("i2v-A14B", None, 0)],
)
def test_the_cache_holds_the_conditioning_and_records_the_mode(
    tmp_path: Path, task: str, clip: str | None, images: int
) -> None:
    _video_dataset(tmp_path)
    cache_tiny(tmp_path, task=task, clip=clip)
    path = _clip_file(tmp_path)
    metadata, shapes = fmt.read_header(path)
    keys = fmt.item_tensor_keys(shapes, path)
    assert metadata.extra[fmt.KEY_CONDITION] == task
    assert shapes[keys.latents] == (16, 3, 6, 8)
    assert keys.image_latents is not None and shapes[keys.image_latents] == (20, 3, 6, 8)
    if images:
        assert keys.image_embeds is not None and shapes[keys.image_embeds][0] == images
    else:
        assert keys.image_embeds is None
    # the stored conditioning is the clip's own: its first frame's latents in channels 4.., the
    # mask of "pixel frame given" in channels 0..3
    tensors, _ = fmt.load_cache_file(path)
    condition = tensors[keys.image_latents].float()
    assert condition[:4, 0].eq(1).all() and condition[:4, 1].eq(0).all()
    assert bool(condition[:4, 2, :].eq(0 if images < 2 else 1)[3].all())


def test_cache_flags_of_a_mode_are_checked_before_anything_loads(tmp_path: Path) -> None:
    toml = _video_dataset(tmp_path)
    with pytest.raises(CacheConfigError, match="--task i2v-14B needs --clip"):
        cache_tiny(tmp_path, task="i2v-14B")
    with pytest.raises(CacheConfigError, match="--clip is for --task i2v-14B / --task flf2v-14B"):
        cache_tiny(tmp_path, task="i2v-A14B", clip="tiny")
    with pytest.raises(CacheConfigError, match="--one_frame needs an image-to-video --task"):
        cache_tiny(tmp_path, one_frame=True)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
    assert toml.exists()


def _i2v_config(root: Path, out: str, task: str, **kwargs: Any) -> Any:
    return train_config(root / "dataset.toml", root / out, task=task, **{"max_train_steps": 2, **kwargs})


@pytest.mark.slow
@pytest.mark.parametrize("task", ["i2v-14B", "flf2v-14B"])
def test_i2v_trains_and_samples_end_to_end(tmp_path: Path, task: str) -> None:
    from masktrain.config.sample import SampleConfig, SampleSettings
    from masktrain.sample.run import run as sample

    _video_dataset(tmp_path)
    cache_tiny(tmp_path, task=task, clip="tiny")
    lora = train(_i2v_config(tmp_path, "out", task))
    assert lora == tmp_path / "out" / "lora.safetensors" and lora.exists()
    from safetensors.torch import load_file

    names = load_file(lora)
    # the image key/value projections (added_kv_proj_dim) carry LoRA, under ComfyUI's k_img/v_img
    assert any(".cross_attn.k_img.lora_A" in name for name in names), sorted(names)[:6]

    image = tmp_path / "start.png"
    Image.fromarray((np.arange(64 * 48 * 3) % 251).astype(np.uint8).reshape(48, 64, 3)).save(image)
    end = "" if task == "i2v-14B" else f" --ei {image}"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"a person walking --w 64 --h 48 --f 5 --s 2 --i {image}{end}\n", encoding="utf-8")
    written = sample(
        SampleConfig(
            arch="wan",
            dit="tiny",
            output_dir=tmp_path / "out",
            sample=SampleSettings(sample_prompts=prompts, vae="tiny", text_encoder="tiny", clip="tiny"),
            lora=lora,
            task=task,
            device="cpu",
        )
    )
    assert [path.suffix for path in written] == [".mp4"]


def test_i2v_a14b_trains_two_experts_at_its_own_boundary(tmp_path: Path) -> None:
    _video_dataset(tmp_path)
    cache_tiny(tmp_path, task="i2v-A14B")
    config = _i2v_config(tmp_path, "out", "i2v-A14B", dit_high_noise="tiny", max_train_steps=1)
    assert config.boundary == 0.9 and config.denoisers == ("tiny-i2v-a14b", "tiny-i2v-a14b")
    assert catalog.timestep_boundary("wan", "t2v-A14B", None) == 0.875
    train(config)
    assert (tmp_path / "out" / "lora.safetensors").exists()


def test_train_refuses_a_cache_made_for_another_mode(tmp_path: Path) -> None:
    _video_dataset(tmp_path)
    cache_tiny(tmp_path, task="i2v-14B", clip="tiny")
    with pytest.raises(
        CacheModeMismatch, match=r"cached for --task i2v-14B, but this run trains --task flf2v-14B"
    ):
        train(_i2v_config(tmp_path, "flf2v", "flf2v-14B"))
    with pytest.raises(
        CacheModeMismatch, match=r"cached for --task i2v-14B, but this run trains no conditioning"
    ):
        train(train_config(tmp_path / "dataset.toml", tmp_path / "t2v", max_train_steps=1))


def test_an_image_to_video_model_needs_its_conditioning(tmp_path: Path) -> None:
    """A text-to-video cache for an I2V model: one line before the model loads."""
    _video_dataset(tmp_path)
    cache_tiny(tmp_path)
    config = train_config(tmp_path / "dataset.toml", tmp_path / "out", dit="tiny-i2v", max_train_steps=1)
    with pytest.raises(ModelLoadError, match=r"20 of them image conditioning .* but the cache .* holds none"):
        train(config)


def test_sampling_prompts_of_a_mode_need_their_images(tmp_path: Path) -> None:
    toml = _video_dataset(tmp_path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a person walking --f 5\n", encoding="utf-8")
    from masktrain.config.sample import SampleSettings

    settings = SampleSettings(sample_prompts=prompts, vae="tiny", text_encoder="tiny")
    with pytest.raises(TrainConfigError, match=r"prompts.txt:1: --task i2v-A14B samples from a start image"):
        train_config(toml, tmp_path / "out", task="i2v-A14B", sample=settings)
    with pytest.raises(TrainConfigError, match=r"--task i2v-14B needs --clip"):
        train_config(toml, tmp_path / "out", task="i2v-14B", sample=settings)


def test_a_control_image_stands_for_the_given_frame(tmp_path: Path) -> None:
    """With control_directory the start frame is the item's control image: latent frame 0 of the
    conditioning is the VAE's encoding of that image alone (the causal VAE's first latent frame
    reads pixel frame 0 only)."""
    toml = _video_dataset(tmp_path)
    toml.write_text(toml.read_text() + 'control_directory = "controls"\n', encoding="utf-8")
    (tmp_path / "controls").mkdir()
    control = (np.indices((48, 64)).sum(0) * 2 % 256).astype(np.uint8)
    Image.fromarray(np.stack([control, 255 - control, control // 2], -1)).save(
        tmp_path / "controls" / "walk.png"
    )
    cache_tiny(tmp_path, task="i2v-A14B")
    path = _clip_file(tmp_path)
    tensors, _ = fmt.load_cache_file(path)
    keys = fmt.item_tensor_keys(tensors, path)
    family = get_family("wan")
    vae = family.load_vae("tiny", torch.device("cpu"), torch.float32)
    with Image.open(tmp_path / "controls" / "walk.png") as image:
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)
    alone = family.encode_pixels(vae, pixels.float().div(127.5).sub(1)[None, :, None])
    torch.testing.assert_close(tensors[keys.image_latents][4:, 0].float(), alone[0, :, 0], rtol=0, atol=1e-4)
    # and the clip's own first frame is not what was given
    assert not torch.allclose(tensors[keys.latents][:, 0].float(), alone[0, :, 0], atol=1e-2)
    # a missing control image is named
    (tmp_path / "controls" / "walk.png").unlink()
    Image.fromarray(control).save(tmp_path / "controls" / "other.png")
    summaries = cache_tiny(tmp_path, task="i2v-A14B")
    assert "has 0 control image(s); --task i2v-A14B is given 1 (the first frame)" in summaries[0].failed[0][1]


def _i2v_output(transformer: torch.nn.Module) -> torch.Tensor:
    from masktrain.models.base import Conditioning

    family = get_family("wan")
    generator = torch.Generator().manual_seed(3)
    noisy = torch.randn(2, 16, 3, 4, 4, generator=generator)
    condition = Conditioning(
        image_latents=torch.randn(2, 20, 3, 4, 4, generator=generator),
        image_embeds=torch.randn(2, 1, wan.TINY_CLIP_TOKENS, wan.TINY_CLIP_WIDTH, generator=generator),
    )
    text = family.collate_text(
        [torch.randn(5, 32, generator=generator), torch.randn(7, 32, generator=generator)]
    )
    with torch.no_grad():
        return family.predict(transformer, noisy, torch.tensor([0.3, 0.8]), text, condition)


@pytest.mark.parametrize("layout", ["comfyui", "diffusers", "musubi"])
def test_an_i2v_lora_loads_back_to_the_same_output(tmp_path: Path, layout: str) -> None:
    """Every layout of an I2V LoRA (the image key/value projections included) loads back: through
    diffusers' own WanImageToVideoPipeline.load_lora_weights where diffusers reads the layout, and
    through masktrain's loader for all three."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline

    family, cpu = get_family("wan"), torch.device("cpu")

    def fresh() -> torch.nn.Module:
        return family.load_transformer("tiny-i2v", "--dit", cpu, torch.float32)

    def pipeline(transformer: torch.nn.Module) -> Any:
        vae = family.load_vae("tiny", cpu, torch.float32)
        scheduler = FlowMatchEulerDiscreteScheduler()
        return WanImageToVideoPipeline(None, None, vae, scheduler, None, None, transformer)

    readable = None if layout == "musubi" else pipeline
    names = check_lora_round_trip(tmp_path, layout, family, fresh, _i2v_output, readable)
    assert {"blocks.0.attn2.add_k_proj", "blocks.0.attn2.add_v_proj"} <= set(names)


def test_i2v_trains_with_fp8_base_weights_and_block_swap(tmp_path: Path) -> None:
    """The memory path under image conditioning: fp8 blocks (the image projections among them),
    one block streamed from the host, checkpointing, activation offload; the loss stays finite
    and the LoRA moves."""
    import json

    from masktrain.config.memory import MemorySettings

    _video_dataset(tmp_path)
    cache_tiny(tmp_path, task="i2v-14B", clip="tiny")
    memory = MemorySettings(
        fp8_base=True, fp8_scaled=True, blocks_to_swap=1, gradient_checkpointing_cpu_offload=True
    )
    train(_i2v_config(tmp_path, "out", "i2v-14B", memory=memory, gradient_checkpointing=True))
    losses = [
        json.loads(line)["loss"] for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    ]
    assert len(losses) == 2 and all(np.isfinite(losses))


@pytest.mark.parametrize(("flags", "condition"), [("--i2v", "i2v-A14B"), ("--clip tiny", "i2v-14B")])
def test_musubis_cache_flags_name_the_mode(tmp_path: Path, flags: str, condition: str) -> None:
    """musubi-tuner's WAN cache takes --i2v (and --clip implies it), not --task."""
    from click.testing import CliRunner

    from masktrain.cli import main

    toml = _video_dataset(tmp_path)
    args = f"cache --dataset_config {toml} --arch wan --vae tiny --t5 tiny --device cpu {flags}"
    result = CliRunner().invoke(main, args.split())
    assert result.exit_code == 0, result.output
    assert fmt.read_metadata(_clip_file(tmp_path)).extra[fmt.KEY_CONDITION] == condition  # type: ignore[union-attr]
