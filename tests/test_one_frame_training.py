"""WAN one-frame training end to end with the tiny models (``--one_frame``): the dataset's control
images and positions cached as ``models.wan_one_frame`` lays them out (each image encoded alone,
the target's mask at its slot and 1.0 at the controls'), trained at those positions, sampled with
``--ci`` / ``--of``; and the refusals of a dataset that cannot train one-frame."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import cache_tiny, photo, tiered, train_config
from masktrain.config.sample import SampleConfig, SampleSettings
from masktrain.data import cache_format as fmt
from masktrain.errors import CacheModeMismatch, ConfigError, TrainConfigError
from masktrain.models import get_family
from masktrain.models.wan_one_frame import encode_frames
from masktrain.sample.run import run as sample
from masktrain.train.loop import run as train


def _dataset(root: Path, controls: int, clean: str = "[0, 2]", target: int = 1) -> Path:
    """Two 64x48 targets with masks and captions, each with `controls` control images."""
    for folder in ("targets", "controls", "masks"):
        (root / folder).mkdir()
    for index, stem in enumerate(("anna", "ben")):
        Image.fromarray(photo(48, 64, index)).save(root / "targets" / f"{stem}.png")
        Image.fromarray(tiered(48, 64, index)).save(root / "masks" / f"{stem}.png")
        (root / "targets" / f"{stem}.txt").write_text(f"{stem} turning around", encoding="utf-8")
        for control in range(controls):
            Image.fromarray(photo(48, 64, 10 + 3 * index + control)).save(
                root / "controls" / f"{stem}_{control}.png"
            )
    toml = root / "dataset.toml"
    toml.write_text(
        f"""
[general]
resolution = [64, 48]

[[datasets]]
image_directory = "targets"
control_directory = "controls"
mask_directory = "masks"
cache_directory = "cache"
fp_1f_clean_indices = {clean}
fp_1f_target_index = {target}
""",
        encoding="utf-8",
    )
    return toml


def _files(root: Path) -> dict[str, Path]:
    return {
        path.name.split("_")[0]: path
        for path in (root / "cache").glob("*.safetensors")
        if not path.name.endswith("_te.safetensors")
    }


def test_the_cache_lays_out_the_slots_as_musubi_with_the_guides_weights(tmp_path: Path) -> None:
    _dataset(tmp_path, controls=2)
    cache_tiny(tmp_path, task="flf2v-14B", clip="tiny", one_frame=True)
    path = _files(tmp_path)["anna"]
    tensors, metadata = fmt.load_cache_file(path)
    keys = fmt.item_tensor_keys(tensors, path)
    assert metadata.extra[fmt.KEY_CONDITION] == "one-frame flf2v-14B"
    latents, condition = tensors[keys.latents].float(), tensors[keys.image_latents].float()
    assert latents.shape == (16, 3, 6, 8) and condition.shape == (20, 3, 6, 8)
    assert tensors[keys.frame_indices].tolist() == [0, 1, 2]
    # slots 0 and 2 are the controls, each encoded alone; slot 1 the target
    family = get_family("wan")
    vae = family.load_vae("tiny", torch.device("cpu"), torch.float32)
    controls = []
    for k in range(2):
        with Image.open(tmp_path / "controls" / f"anna_{k}.png") as image:
            controls.append(np.array(image))
    pixels = torch.from_numpy(np.stack(controls)).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    alone = encode_frames(family, vae, pixels)
    torch.testing.assert_close(latents[:, [0, 2]], alone.permute(1, 0, 2, 3), rtol=0, atol=1e-4)
    assert condition[:4, [0, 2]].eq(1).all() and condition[:4, 1].eq(0).all()
    # the guide's weights: 1.0 on the controls, the target's mask (not all ones) on its slot
    weights = tensors[keys.mask_weights]
    assert weights[:, [0, 2]].eq(1).all() and weights[0, 1].min() < 0.5
    assert tensors[keys.image_embeds].shape[0] == 2  # the two controls' CLIP embeddings


@pytest.mark.slow
def test_one_frame_trains_at_its_positions_and_samples_the_target(tmp_path: Path) -> None:
    toml = _dataset(tmp_path, controls=1, clean="[0]", target=5)
    cache_tiny(tmp_path, task="i2v-14B", clip="tiny", one_frame=True)
    assert fmt.load_cache_file(_files(tmp_path)["anna"])[0]["f_indices_int32"].tolist() == [0, 5]
    lora = train(train_config(toml, tmp_path / "out", task="i2v-14B", one_frame=True, max_train_steps=2))
    losses = [
        json.loads(line)["loss"] for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    ]
    assert len(losses) == 2 and all(np.isfinite(losses))
    prompts = tmp_path / "prompts.txt"
    control = tmp_path / "controls" / "anna_0.png"
    prompts.write_text(
        f"anna turning around --w 64 --h 48 --s 2 --ci {control} --of target_index=5,control_index=0\n",
        encoding="utf-8",
    )
    settings = SampleSettings(sample_prompts=prompts, vae="tiny", text_encoder="tiny", clip="tiny")
    config = SampleConfig(
        arch="wan",
        dit="tiny",
        output_dir=tmp_path / "out",
        sample=settings,
        lora=lora,
        task="i2v-14B",
        one_frame=True,
    )
    (written,) = sample(config)
    assert written.suffix == ".png"
    with Image.open(written) as image:
        assert image.size == (64, 48)


def test_a_one_frame_cache_is_not_a_video_cache(tmp_path: Path) -> None:
    toml = _dataset(tmp_path, controls=1, clean="[0]", target=1)
    cache_tiny(tmp_path, task="i2v-A14B", one_frame=True)
    with pytest.raises(
        CacheModeMismatch, match="cached for --task i2v-A14B --one_frame, but this run trains --task i2v-A14B"
    ):
        train(train_config(toml, tmp_path / "out", task="i2v-A14B", max_train_steps=1))


def test_one_frame_datasets_are_checked(tmp_path: Path) -> None:
    toml = _dataset(tmp_path, controls=2, clean="[0, 2]", target=1)
    with pytest.raises(TrainConfigError, match="--one_frame needs an image-to-video --task"):
        train_config(toml, tmp_path / "out", one_frame=True)
    toml.write_text(toml.read_text().replace("fp_1f_target_index = 1\n", ""), encoding="utf-8")
    with pytest.raises(ConfigError, match="--one_frame needs 'fp_1f_target_index'"):
        cache_tiny(tmp_path, task="i2v-A14B", one_frame=True)
    toml.write_text(toml.read_text().replace("[0, 2]", "[2, 0]"), encoding="utf-8")
    with pytest.raises(ConfigError, match="'fp_1f_clean_indices' must be increasing"):
        cache_tiny(tmp_path, task="i2v-A14B", one_frame=True)
    # i2v-14B takes one control image: an item with two is named
    toml.write_text(
        toml.read_text().replace("[2, 0]", "[0, 2]") + "fp_1f_target_index = 1\n", encoding="utf-8"
    )
    (summary,) = cache_tiny(tmp_path, task="i2v-14B", clip="tiny", one_frame=True)
    assert (
        len(summary.failed) == 2 and "2 control image(s), but --task i2v-14B takes 1" in summary.failed[0][1]
    )


def test_one_frame_trains_with_fp8_base_weights_and_block_swap(tmp_path: Path) -> None:
    """The memory path at the dataset's positions: the rotary hook sits outside the blocks, so fp8
    blocks, a streamed block, checkpointing and activation offload train as for video."""
    from masktrain.config.memory import MemorySettings

    toml = _dataset(tmp_path, controls=2)
    cache_tiny(tmp_path, task="flf2v-14B", clip="tiny", one_frame=True)
    memory = MemorySettings(
        fp8_base=True, fp8_scaled=True, blocks_to_swap=1, gradient_checkpointing_cpu_offload=True
    )
    config = train_config(
        toml, tmp_path / "out", task="flf2v-14B", one_frame=True, memory=memory, gradient_checkpointing=True
    )
    train(config)
    losses = [
        json.loads(line)["loss"] for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    ]
    assert len(losses) == 4 and all(np.isfinite(losses))
