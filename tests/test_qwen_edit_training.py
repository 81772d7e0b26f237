"""Qwen-Image-Edit training end to end with the tiny models (``--model_version edit-2509`` with two
control images, ``edit-2511`` with one): the cache holds each control image's latents at its own
size and a text embedding that read the caption with the images (equal to
``qwen_vl.encode_edit_text`` of the same images, itself checked against diffusers' pipelines in
test_qwen_edit.py); training and sampling with ``--ci``; an item without control images; a touched
control image makes its item stale and ``cache`` rebuilds it; the refusals (a cache of another mode,
a transformer of another version, two controls for Edit)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus
from PIL import Image

from helpers import cache_tiny, check_lora_round_trip, photo, tiered, train_config
from masktrain import catalog
from masktrain.cache.edit import control_size
from masktrain.config.dataset import ImageDatasetConfig, load_dataset_config
from masktrain.config.sample import SampleConfig, SampleSettings
from masktrain.data import cache_format as fmt
from masktrain.data import freshness
from masktrain.data.cached_items import epoch_batches, find_cached_items
from masktrain.errors import CachedDataError, CacheModeMismatch, TrainConfigError
from masktrain.models import get_family, qwen_image, qwen_vl
from masktrain.sample.run import run as sample
from masktrain.train.loop import run as train

CPU, F32 = torch.device("cpu"), torch.float32
FAMILY = get_family("qwen_image")
#: Control images, (width, height): both are their own size at the datasets' control_resolution
#: area (64², the pipelines' rounding), so their latents need no resampling. Small, as the tiny
#: VAE takes ~1 s per 96² image on a CPU.
WIDE, SQUARE = (96, 32), (64, 64)


def _dataset(root: Path, controls: dict[str, list[tuple[int, int]]], version_keys: str = "") -> Path:
    """32x32 targets with masks and captions, each with the control images of `controls` (by
    stem; an item with none has no file), ``control_resolution = [64, 64]``."""
    for folder in ("images", "controls", "masks"):
        (root / folder).mkdir()
    for index, (stem, sizes) in enumerate(controls.items()):
        Image.fromarray(photo(32, 32, index)).save(root / "images" / f"{stem}.png")
        Image.fromarray(tiered(32, 32, index)).save(root / "masks" / f"{stem}.png")
        (root / "images" / f"{stem}.txt").write_text(f"the {stem} in red", encoding="utf-8")
        names = [f"{stem}.png"] if len(sizes) == 1 else [f"{stem}_{i}.png" for i in range(len(sizes))]
        for number, ((width, height), name) in enumerate(zip(sizes, names, strict=True)):
            Image.fromarray(photo(height, width, 10 + 3 * index + number)).save(root / "controls" / name)
    toml = root / "dataset.toml"
    toml.write_text(
        f"""
[general]
resolution = [32, 32]
batch_size = 2

[[datasets]]
image_directory = "images"
control_directory = "controls"
mask_directory = "masks"
cache_directory = "cache"
control_resolution = [64, 64]
{version_keys}
""",
        encoding="utf-8",
    )
    return toml


def _latent_file(root: Path, stem: str) -> Path:
    return root / "cache" / fmt.item_cache_name(stem, (32, 32), "qwen_image")


def _text_file(root: Path, stem: str) -> Path:
    return root / "cache" / fmt.text_cache_name(stem, "qwen_image")


def _rgb(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


@pytest.fixture(scope="module")
def encoder() -> qwen_vl.VisionTextEncoder:
    loaded = FAMILY.load_text_encoder("tiny", CPU, F32, vision=True)
    assert isinstance(loaded, qwen_vl.VisionTextEncoder)
    return loaded


@pytest.fixture(scope="module")
def edit_2509(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two items with two control images each (96x32 and 64x64) and one without, cached for
    edit-2509."""
    root = tmp_path_factory.mktemp("edit_2509")
    _dataset(root, {"cat": [WIDE, SQUARE], "dog": [WIDE, SQUARE], "fox": []})
    (summary,) = cache_tiny(root, "qwen_image", task="edit-2509")
    assert not summary.failed
    return root


@pytest.fixture(autouse=True)
def small_pipeline_controls(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Edit-Plus pipeline VAE-encodes each control at a ~1024² area when sampling (16 s for the
    tiny VAE on a CPU); 64² keeps a sample a fraction of a second."""
    monkeypatch.setattr(pipeline_qwenimage_edit_plus, "VAE_IMAGE_SIZE", 64 * 64)


def test_the_cache_holds_each_control_at_its_own_size(edit_2509: Path) -> None:
    metadata, shapes = fmt.read_header(_latent_file(edit_2509, "cat"))
    keys = fmt.item_tensor_keys(shapes, _latent_file(edit_2509, "cat"))
    assert metadata.extra[fmt.KEY_CONDITION] == "edit-2509"
    assert keys.control_latents == ("latents_control_0_1x8x24_float32", "latents_control_1_1x16x16_float32")
    assert shapes[keys.latents] == (4, 1, 8, 8) and shapes[keys.mask_weights or ""] == (1, 1, 8, 8)
    # the wide control is 96x32 at the 64² area as the pipelines round it: its latents are the
    # VAE's of the file's own pixels
    (dataset,) = load_dataset_config(edit_2509 / "dataset.toml").datasets
    assert isinstance(dataset, ImageDatasetConfig) and control_size(dataset, *WIDE) == WIDE
    tensors, _ = fmt.load_cache_file(_latent_file(edit_2509, "cat"))
    pixels = torch.from_numpy(np.array(_rgb(edit_2509 / "controls" / "cat_0.png"))).permute(2, 0, 1)
    vae = FAMILY.load_vae("tiny", CPU, F32)
    expected = FAMILY.encode_pixels(vae, pixels.float().div(127.5).sub(1)[None, :, None])[0]
    torch.testing.assert_close(tensors[keys.control_latents[0]], expected, rtol=0, atol=1e-5)
    # the item without control images: its latents and mask only
    fox = fmt.item_tensor_keys(fmt.read_header(_latent_file(edit_2509, "fox"))[1], "fox")
    assert fox.control_latents == () and fox.mask_weights is not None


def test_the_text_embeddings_read_the_control_images(edit_2509: Path, encoder: Any) -> None:
    """Each item's embedding is ``encode_edit_text`` of its caption and its control images (batched
    in the cache, one by one here: padding changes nothing beyond float rounding)."""
    for stem, controls in (("cat", ["cat_0.png", "cat_1.png"]), ("fox", [])):
        tensors, metadata = fmt.load_cache_file(_text_file(edit_2509, stem))
        images = [_rgb(edit_2509 / "controls" / name) for name in controls]
        (expected,) = qwen_vl.encode_edit_text(encoder, [f"the {stem} in red"], [images], "edit-2509")
        torch.testing.assert_close(tensors["text_embeds_float32"], expected, rtol=0, atol=1e-5)
        recorded = json.loads(metadata.extra[freshness.CONTROLS_KEY])
        assert [Path(stat[0]).name for stat in recorded] == controls
    # with the images the prompt is longer: "Picture 1: ..." and the images' tokens
    cat = fmt.load_cache_file(_text_file(edit_2509, "cat"))[0]["text_embeds_float32"]
    fox = fmt.load_cache_file(_text_file(edit_2509, "fox"))[0]["text_embeds_float32"]
    assert cat.shape[0] > fox.shape[0]


def test_batches_share_their_control_count_and_sizes(edit_2509: Path) -> None:
    items = find_cached_items(edit_2509 / "dataset.toml", "qwen_image", condition="edit-2509")
    shapes = {item.latent_path.name.split("_")[0]: item.control_shapes for item in items}
    assert shapes == {"cat": ((4, 1, 8, 24), (4, 1, 16, 16)), "dog": shapes["cat"], "fox": ()}
    for epoch in range(4):  # batch_size 2: cat and dog together, fox alone
        batches = epoch_batches(items, seed=0, epoch=epoch)
        assert sorted(len({item.control_shapes for item in batch}) for batch in batches) == [1, 1]
        assert sorted(len(batch) for batch in batches) == [1, 2]


def test_edit_2509_trains_and_samples_with_its_control_images(
    edit_2509: Path, encoder: Any, tmp_path: Path
) -> None:
    config = train_config(
        edit_2509 / "dataset.toml",
        tmp_path / "out",
        "qwen_image",
        model_version="edit-2509",
        max_train_steps=2,
    )
    assert config.condition == "edit-2509" and config.denoisers == ("tiny", None)
    lora = train(config)
    losses = [
        json.loads(line)["loss"] for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    ]
    assert len(losses) == 2 and all(np.isfinite(losses))

    controls = [edit_2509 / "controls" / "cat_0.png", edit_2509 / "controls" / "cat_1.png"]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(
        f"the cat in red --w 32 --h 32 --s 2 --ci {controls[0]} --ci {controls[1]}\n"
        "the fox in red --w 32 --h 32 --s 2 --l 1\n",
        encoding="utf-8",
    )
    settings = SampleSettings(sample_prompts=prompts, vae="tiny", text_encoder="tiny")
    written = sample(
        SampleConfig(
            arch="qwen_image",
            dit="tiny",
            output_dir=tmp_path / "out",
            sample=settings,
            lora=lora,
            task="edit-2509",
        )
    )
    assert [path.suffix for path in written] == [".png", ".png"]

    # the sampler's prompt embeddings are the edit prompt's, read with the --ci images (and the
    # negative prompt with them too, as the pipeline reads it)
    from masktrain.sample.sampler import Sampler

    sampler = Sampler(settings, FAMILY, CPU, F32, None, 0, tmp_path / "again", "x", "edit-2509")
    request, _ = sampler.request(sampler.prompts[0])
    images = [_rgb(path) for path in controls]
    (text,) = qwen_vl.encode_edit_text(encoder, ["the cat in red"], [images], "edit-2509")
    (negative,) = qwen_vl.encode_edit_text(encoder, [" "], [images], "edit-2509")
    torch.testing.assert_close(request.text.hidden[0], text, rtol=0, atol=1e-6)
    assert request.negative is not None
    torch.testing.assert_close(request.negative.hidden[0], negative, rtol=0, atol=1e-6)
    assert len(request.control_images) == 2
    plain, _ = sampler.request(sampler.prompts[1])
    assert plain.control_images == () and plain.negative is None  # --l 1: no guidance


def test_edit_2511_trains_with_one_control_and_samples_during_training(tmp_path: Path) -> None:
    toml = _dataset(tmp_path, {"cat": [SQUARE]})
    cache_tiny(tmp_path, "qwen_image", task="edit-2511")
    keys = fmt.item_tensor_keys(fmt.read_header(_latent_file(tmp_path, "cat"))[1], "cat")
    assert keys.control_latents == ("latents_control_0_1x16x16_float32",)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"the cat in red --w 32 --h 32 --s 2 --ci {tmp_path / 'controls' / 'cat.png'}\n")
    settings = SampleSettings(sample_prompts=prompts, vae="tiny", text_encoder="tiny")
    config = train_config(
        toml, tmp_path / "out", "qwen_image", model_version="edit-2511", max_train_steps=2, sample=settings
    )
    assert (
        config.denoisers
        == (qwen_image.TINY_EDIT_2511, None)
        == (catalog.tiny_denoiser(catalog.QWEN_IMAGE, "tiny", "edit-2511"), None)
    )
    assert train(config).exists()
    assert len(list((tmp_path / "out" / "sample").glob("*.png"))) == 1


def test_a_touched_control_image_makes_its_item_stale_and_cache_rebuilds_it(tmp_path: Path) -> None:
    toml = _dataset(tmp_path, {"cat": [WIDE], "dog": [WIDE]})
    cache_tiny(tmp_path, "qwen_image", task="edit-2509")
    assert len(find_cached_items(toml, "qwen_image", condition="edit-2509")) == 2
    control = tmp_path / "controls" / "cat.png"
    later = control.stat().st_mtime_ns + 10**9
    os.utime(control, ns=(later, later))
    with pytest.raises(CachedDataError, match=r"cat\.png \(its control images changed since it was cached\)"):
        find_cached_items(toml, "qwen_image", condition="edit-2509")
    (summary,) = cache_tiny(tmp_path, "qwen_image", task="edit-2509")
    assert (summary.rebuilt, summary.skipped) == (1, 1)
    _, text = fmt.load_cache_file(_text_file(tmp_path, "cat"))
    assert str(later) in text.extra[freshness.CONTROLS_KEY]  # the embedding was made again too
    assert len(find_cached_items(toml, "qwen_image", condition="edit-2509")) == 2

    # a text file that read other control images than the item has now is stale on its own
    tensors, metadata = fmt.load_cache_file(_text_file(tmp_path, "dog"))
    extra = {**metadata.extra, freshness.CONTROLS_KEY: "[]"}
    fmt.write_cache_file(
        _text_file(tmp_path, "dog"), tensors, fmt.CacheMetadata(**{**metadata.__dict__, "extra": extra})
    )
    with pytest.raises(CachedDataError, match=r"dog\.png \(its control images changed since it was cached\)"):
        find_cached_items(toml, "qwen_image", condition="edit-2509")


def test_train_refuses_a_cache_or_a_transformer_of_another_version(edit_2509: Path, tmp_path: Path) -> None:
    with pytest.raises(
        CacheModeMismatch,
        match=r"cached for --model_version edit-2509, but this run trains --model_version edit-2511",
    ):
        train(
            train_config(edit_2509 / "dataset.toml", tmp_path / "a", "qwen_image", model_version="edit-2511")
        )
    with pytest.raises(TrainConfigError, match=r"--dit tiny-edit-2511 is a Qwen-Image-Edit-2511 transformer"):
        train(
            train_config(
                edit_2509 / "dataset.toml",
                tmp_path / "b",
                "qwen_image",
                model_version="edit-2509",
                dit="tiny-edit-2511",
            )
        )


def test_train_refuses_a_cache_made_for_the_original_model(tmp_path: Path) -> None:
    toml = _dataset(tmp_path, {"cat": [SQUARE]})
    cache_tiny(tmp_path, "qwen_image")  # no --model_version: text-to-image
    metadata = fmt.read_metadata(_latent_file(tmp_path, "cat"))
    assert metadata is not None and metadata.extra[fmt.KEY_CONDITION] == "none"
    with pytest.raises(
        CacheModeMismatch, match=r"cached for no conditioning, but this run trains --model_version edit-2509"
    ):
        train(
            train_config(toml, tmp_path / "out", "qwen_image", model_version="edit-2509", max_train_steps=1)
        )


def test_edit_reads_one_control_image(tmp_path: Path) -> None:
    _dataset(tmp_path, {"cat": [SQUARE, SQUARE], "dog": [SQUARE]})
    (summary,) = cache_tiny(tmp_path, "qwen_image", task="edit")
    assert [Path(path).name for path, _ in summary.failed] == ["cat.png"]
    assert "2 control images, but --model_version edit reads one" in summary.failed[0][1]
    assert not _text_file(tmp_path, "cat").exists() and _text_file(tmp_path, "dog").exists()


def test_sample_prompts_of_an_edit_mode_are_checked(tmp_path: Path) -> None:
    toml = _dataset(tmp_path, {"cat": [SQUARE]})
    image = tmp_path / "controls" / "cat.png"
    prompts = tmp_path / "prompts.txt"

    def check(line: str, version: str | None) -> None:
        prompts.write_text(line, encoding="utf-8")
        settings = SampleSettings(sample_prompts=prompts, vae="tiny", text_encoder="tiny")
        train_config(toml, tmp_path / "out", "qwen_image", model_version=version, sample=settings)

    check(f"a cat --ci {image} --ci {image}\n", "edit-2509")
    check("a cat\n", "edit")  # no --ci: text-to-image
    with pytest.raises(
        TrainConfigError, match=r"prompts.txt:1: 2 --ci images, but --model_version edit reads one"
    ):
        check(f"a cat --ci {image} --ci {image}\n", "edit")
    with pytest.raises(
        TrainConfigError, match=r"--i is for WAN image-to-video; Qwen-Image-Edit's images are --ci"
    ):
        check(f"a cat --i {image}\n", "edit-2511")
    with pytest.raises(TrainConfigError, match=r"--ci is for one-frame sampling .* or Qwen-Image-Edit"):
        check(f"a cat --ci {image}\n", None)


def test_the_control_size_rules(tmp_path: Path) -> None:
    """Default: the pipelines' ~1024² area (multiples of 32); control_resolution: another area;
    no_resize_control: the image's own size in multiples of 16, capped by control_resolution."""

    def dataset(**keys: Any) -> ImageDatasetConfig:
        lines = "\n".join(f"{key} = {json.dumps(value)}" for key, value in keys.items())
        toml = tmp_path / "dataset.toml"
        toml.write_text(f'[[datasets]]\nimage_directory = "images"\n{lines}\n', encoding="utf-8")
        (config,) = load_dataset_config(toml).datasets
        assert isinstance(config, ImageDatasetConfig)
        return config

    for width, height in ((1920, 1080), (512, 768), (100, 3000)):
        expected = pipeline_qwenimage_edit_plus.calculate_dimensions(1024 * 1024, width / height)
        assert control_size(dataset(), width, height) == expected
    assert control_size(dataset(control_resolution=512), 1920, 1080) == (672, 384)
    assert control_size(dataset(no_resize_control=True), 1921, 1083) == (1920, 1072)
    capped = dataset(no_resize_control=True, control_resolution=[512, 512])
    assert control_size(capped, 500, 300) == (496, 288)
    assert control_size(capped, 1920, 1080) == (672, 384)


def _edit_output(transformer: torch.nn.Module) -> torch.Tensor:
    """The denoiser's prediction for a target with two controls of other sizes."""
    from masktrain.models.base import Conditioning

    generator = torch.Generator().manual_seed(3)
    noisy = torch.randn(2, 4, 1, 4, 6, generator=generator)
    controls = (
        torch.randn(2, 4, 1, 6, 6, generator=generator),
        torch.randn(2, 4, 1, 4, 8, generator=generator),
    )
    text = FAMILY.collate_text(
        [torch.randn(5, 16, generator=generator), torch.randn(7, 16, generator=generator)]
    )
    with torch.no_grad():
        return FAMILY.predict(
            transformer, noisy, torch.tensor([0.3, 0.8]), text, Conditioning(control_latents=controls)
        )


@pytest.mark.parametrize("layout", ["comfyui", "diffusers", "musubi"])
def test_an_edit_2511_lora_loads_back_to_the_same_output(tmp_path: Path, layout: str) -> None:
    """Every layout of an Edit-2511 LoRA loads back to the same prediction with controls: through
    diffusers' own QwenImageEditPlusPipeline.load_lora_weights where diffusers reads the layout,
    and through masktrain's loader for all three."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageEditPlusPipeline

    def fresh() -> torch.nn.Module:
        return FAMILY.load_transformer(qwen_image.TINY_EDIT_2511, "--dit", CPU, F32)

    def pipeline(transformer: torch.nn.Module) -> Any:
        vae = FAMILY.load_vae("tiny", CPU, F32)
        return QwenImageEditPlusPipeline(
            FlowMatchEulerDiscreteScheduler(), vae, None, None, None, transformer
        )

    check_lora_round_trip(
        tmp_path, layout, FAMILY, fresh, _edit_output, None if layout == "musubi" else pipeline
    )


def test_edit_trains_with_fp8_base_weights_and_block_swap(edit_2509: Path, tmp_path: Path) -> None:
    """The memory path with control tokens: fp8 blocks, one block streamed from the host,
    checkpointing, activation offload; the losses stay finite."""
    from masktrain.config.memory import MemorySettings

    memory = MemorySettings(
        fp8_base=True, fp8_scaled=True, blocks_to_swap=1, gradient_checkpointing_cpu_offload=True
    )
    config = train_config(
        edit_2509 / "dataset.toml",
        tmp_path / "out",
        "qwen_image",
        model_version="edit-2509",
        max_train_steps=2,
        memory=memory,
        gradient_checkpointing=True,
    )
    train(config)
    lines = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and all(np.isfinite(json.loads(line)["loss"]) for line in lines)
