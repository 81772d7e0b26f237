"""The CLIP image encoder of WAN 2.1 I2V / FLF2V (``--clip``): its embeddings against diffusers' own
``WanImageToVideoPipeline.encode_image`` (with a reference model and processor built here, not by
the loader), ComfyUI's ``clip_vision_h.safetensors`` layout written from a model of ViT-H's width
and loaded back strictly, the released ViT-H/14 config from its shapes, a folder, the cache
identity, and the refusals (WAN's ``.pth``, other layouts, other models)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import init_empty_weights
from PIL import Image
from safetensors.torch import save_file
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
)

from masktrain.errors import ModelLoadError, SettingError
from masktrain.models import clip_vision, wan, wan_checkpoint
from masktrain.models.clip_vision import clip_config, clip_identity, encode_images, load_clip

CPU = torch.device("cpu")
POSITION_IDS = "vision_model.embeddings.position_ids"
# diffusers' tiny I2V test config (tests/pipelines/wan/test_wan_image_to_video.py), patch 8 for 1.
DIFFUSERS_TINY = {
    "hidden_size": 4,
    "projection_dim": 4,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 32,
    "intermediate_size": 16,
    "patch_size": 8,
}
# ViT-H/14's width and heads, small elsewhere: ComfyUI's file layout at a size a test can write.
VIT_H_WIDE = {
    "hidden_size": 1280,
    "num_attention_heads": 16,
    "num_hidden_layers": 2,
    "intermediate_size": 16,
    "patch_size": 14,
    "image_size": 28,
    "projection_dim": 8,
    "hidden_act": "gelu",
}


def pictures(count: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """(N, 3, H, W) random 8-bit pictures."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, 3, height, width), generator=generator, dtype=torch.uint8)


def as_cache_pixels(images: torch.Tensor) -> torch.Tensor:
    """8-bit pictures as the cache holds a clip's frames: float in [-1, 1]."""
    return images.float() / 127.5 - 1.0


def diffusers_encode(
    model: torch.nn.Module, processor: CLIPImageProcessorPil, images: torch.Tensor
) -> torch.Tensor:
    """diffusers' own ``encode_image`` on PIL pictures, in a pipeline of just the image parts."""
    from diffusers import WanImageToVideoPipeline

    pipeline = WanImageToVideoPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=None,
        scheduler=None,
        image_processor=processor,
        image_encoder=model,
    )
    pils = [Image.fromarray(array) for array in images.permute(0, 2, 3, 1).numpy()]
    embeds: torch.Tensor = pipeline.encode_image(pils, CPU)
    return embeds


def vit_h_wide() -> CLIPVisionModelWithProjection:
    """A ViT-H-wide encoder whose weights are fp16 values (what the fp16 file can hold exactly)."""
    torch.manual_seed(1)
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(**VIT_H_WIDE))
    return model.half().float().eval()


def write_comfy_file(model: torch.nn.Module, path: Path, drop: tuple[str, ...] = ()) -> Path:
    """`model` in clip_vision_h.safetensors' layout: transformers' names, unprefixed, fp16, and
    the int64 position ids the released file carries."""
    tensors = {key: value.half() for key, value in model.state_dict().items() if key not in drop}
    positions = (model.config.image_size // model.config.patch_size) ** 2 + 1
    tensors[POSITION_IDS] = torch.arange(positions).unsqueeze(0)
    save_file(tensors, path)
    return path


@pytest.fixture(scope="module")
def vit_h_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[CLIPVisionModelWithProjection, Path]:
    model = vit_h_wide()
    return model, write_comfy_file(model, tmp_path_factory.mktemp("clip") / "clip_vision_h.safetensors")


# --- what it computes ------------------------------------------------------------------------------


@pytest.mark.parametrize("given", [1, 2], ids=["i2v", "flf2v"])
def test_the_tiny_encoder_gives_diffusers_encode_image(given: int) -> None:
    """The tiny encoder is diffusers' tiny-test CLIP (seed 0) with its processor, and its output
    for the given frames (FLF2V: first and last) is ``encode_image``'s (atol 1e-6; measured 0)."""
    torch.manual_seed(0)
    reference = CLIPVisionModelWithProjection(CLIPVisionConfig(**DIFFUSERS_TINY)).eval()
    processor = CLIPImageProcessorPil(crop_size=32, size=32)
    images = pictures(given, 40, 56)

    clip = load_clip("tiny", "--clip", CPU, torch.float32)
    ours = encode_images(clip, as_cache_pixels(images))

    assert ours.shape == (given, clip_vision.TINY_CLIP_TOKENS, clip_vision.TINY_CLIP_HIDDEN)
    torch.testing.assert_close(ours, diffusers_encode(reference, processor, images), atol=1e-6, rtol=0)
    assert (clip.tokens, clip.hidden_size) == (clip_vision.TINY_CLIP_TOKENS, clip_vision.TINY_CLIP_HIDDEN)
    # the tiny denoisers are built for this encoder
    assert (wan.TINY_CLIP_WIDTH, wan.TINY_CLIP_TOKENS) == (clip.hidden_size, clip.tokens)


def test_the_encoder_loads_in_the_given_dtype() -> None:
    clip = load_clip("tiny", "--clip", CPU, torch.bfloat16)
    assert {p.dtype for p in clip.model.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in clip.model.parameters())
    assert encode_images(clip, as_cache_pixels(pictures(1, 32, 32))).dtype == torch.bfloat16


def test_images_of_another_shape_are_refused() -> None:
    clip = load_clip("tiny", "--clip", CPU, torch.float32)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        encode_images(clip, torch.zeros(3, 32, 32))


# --- ComfyUI's clip_vision_h.safetensors -----------------------------------------------------------


def test_the_released_vit_h_config_comes_from_its_shapes() -> None:
    """ViT-H/14 as laion/CLIP-ViT-H-14 and ComfyUI's clip_vision_config_h.json have it: the file's
    521 tensors (520 weights and the position ids) give back its config."""
    vit_h = {
        "hidden_size": 1280,
        "intermediate_size": 5120,
        "num_hidden_layers": 32,
        "num_attention_heads": 16,
        "patch_size": 14,
        "image_size": 224,
        "projection_dim": 1024,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-5,
        "num_channels": 3,
    }
    with init_empty_weights():
        model = CLIPVisionModelWithProjection(CLIPVisionConfig(**vit_h))
    shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    shapes[POSITION_IDS] = (1, 257)
    assert len(shapes) == 521
    assert shapes["visual_projection.weight"] == (1024, 1280)
    assert clip_config(shapes) == vit_h


def test_the_comfyui_layout_loads_strictly_and_encodes_as_diffusers(
    vit_h_file: tuple[CLIPVisionModelWithProjection, Path],
) -> None:
    """The fp16 file, read into float32, holds every tensor of the model it was written from, and
    embeds pictures as diffusers does with that model (atol 1e-6; measured 0); its processor is
    sized to the model's image size (224 for ViT-H/14)."""
    model, path = vit_h_file
    clip = load_clip(str(path), "--clip", CPU, torch.float32)

    loaded = clip.model.state_dict()
    assert set(loaded) == set(model.state_dict())
    for key, tensor in model.state_dict().items():
        assert torch.equal(loaded[key], tensor), key
    assert (clip.processor.size.shortest_edge, clip.processor.crop_size.height) == (28, 28)
    images = pictures(2, 36, 50, seed=3)
    reference = diffusers_encode(model, CLIPImageProcessorPil(crop_size=28, size=28), images)
    ours = encode_images(clip, as_cache_pixels(images))
    assert ours.shape == (2, 5, 1280)
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=0)


def test_a_missing_tensor_is_named(tmp_path: Path) -> None:
    path = write_comfy_file(
        vit_h_wide(), tmp_path / "clip.safetensors", drop=("vision_model.encoder.layers.1.mlp.fc2.bias",)
    )
    with pytest.raises(
        ModelLoadError,
        match=r"clip\.safetensors: .*missing tensors vision_model\.encoder\.layers\.1\.mlp\.fc2\.bias$",
    ):
        load_clip(str(path), "--clip", CPU, torch.float32)


def test_a_clip_of_another_width_is_refused(tmp_path: Path) -> None:
    torch.manual_seed(0)
    path = write_comfy_file(
        CLIPVisionModelWithProjection(CLIPVisionConfig(**DIFFUSERS_TINY)), tmp_path / "l.safetensors"
    )
    with pytest.raises(
        ModelLoadError, match=r"--clip .*l\.safetensors: .*a 4-wide CLIP vision tower is not ViT-H/14"
    ):
        load_clip(str(path), "--clip", CPU, torch.float32)


def test_files_name_what_they_hold_and_where_it_goes(
    tmp_path: Path, vit_h_file: tuple[torch.nn.Module, Path]
) -> None:
    """A WAN transformer given to --clip, the CLIP file given to --dit, WAN's own CLIP layout and
    open_clip's, each in one line."""
    dit = tmp_path / "wan.safetensors"
    save_file(
        {"patch_embedding.weight": torch.zeros(4, 16, 1, 2, 2), "blocks.0.ffn.0.weight": torch.zeros(2, 2)},
        dit,
    )
    wan_clip = tmp_path / "open-clip-xlm-roberta-large-vit-huge-14_visual_fp16.safetensors"
    save_file(
        {
            "visual.patch_embedding.weight": torch.zeros(4, 3, 2, 2),
            "visual.transformer.0.attn.to_qkv.weight": torch.zeros(12, 4),
        },
        wan_clip,
    )
    open_clip = tmp_path / "open_clip_model.safetensors"
    save_file(
        {
            "visual.conv1.weight": torch.zeros(4, 3, 2, 2),
            "visual.transformer.resblocks.0.attn.in_proj_weight": torch.zeros(12, 4),
        },
        open_clip,
    )

    cases = [
        (
            lambda: load_clip(str(dit), "--clip", CPU, torch.float32),
            r"holds a WAN transformer, expected a CLIP vision encoder; pass it to --dit",
        ),
        (
            lambda: wan_checkpoint.load_transformer_file(vit_h_file[1], "--dit"),
            r"holds a CLIP vision encoder, expected a WAN transformer; pass it to --clip",
        ),
        (
            lambda: load_clip(str(wan_clip), "--clip", CPU, torch.float32),
            r"holds WAN's original open-clip XLM-RoBERTa CLIP .*clip_vision_h\.safetensors",
        ),
        (
            lambda: load_clip(str(open_clip), "--clip", CPU, torch.float32),
            r"holds an open_clip model .*clip_vision_h\.safetensors",
        ),
    ]
    for load, message in cases:
        with pytest.raises(ModelLoadError, match=message) as error:
            load()
        assert "\n" not in str(error.value)


# --- a folder ----------------------------------------------------------------------------------------


def test_a_pipeline_folder_reads_its_image_encoder_and_image_processor(tmp_path: Path) -> None:
    """A diffusers WAN I2V pipeline folder: ``image_encoder/`` and the processor of
    ``image_processor/`` (a shortest edge of 40 here, so it shows); a component folder without a
    processor gets one built for its image size. Either embeds as diffusers does with those parts."""
    torch.manual_seed(0)
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(**DIFFUSERS_TINY)).eval()
    model.save_pretrained(tmp_path / "pipe" / "image_encoder")
    processor = CLIPImageProcessorPil(crop_size=32, size=40)
    processor.save_pretrained(tmp_path / "pipe" / "image_processor")
    (tmp_path / "pipe" / "transformer").mkdir()
    images = pictures(2, 48, 40, seed=5)

    clip = load_clip(str(tmp_path / "pipe"), "--clip", CPU, torch.float32)
    assert clip.processor.size.shortest_edge == 40
    torch.testing.assert_close(
        encode_images(clip, as_cache_pixels(images)),
        diffusers_encode(model, processor, images),
        atol=1e-6,
        rtol=0,
    )

    component = load_clip(str(tmp_path / "pipe" / "image_encoder"), "--clip", CPU, torch.float32)
    assert (component.processor.size.shortest_edge, component.processor.crop_size.height) == (32, 32)


def test_a_folder_saved_without_the_projection_loads_as_clip_vision_model(tmp_path: Path) -> None:
    """diffusers' pipeline types its image encoder ``CLIPVisionModel``; the penultimate layer is
    the same either way."""
    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(**DIFFUSERS_TINY)).save_pretrained(tmp_path / "enc")
    clip = load_clip(str(tmp_path / "enc"), "--clip", CPU, torch.float32)
    assert type(clip.model) is CLIPVisionModel
    assert encode_images(clip, as_cache_pixels(pictures(1, 32, 32))).shape == (1, 17, 4)


# --- refusals and identity --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth",
            r"WAN's original CLIP, a pickle .*clip_vision_h\.safetensors",
        ),
        ("clip.pth", r"pickled checkpoints are never loaded .*clip_vision_h\.safetensors"),
        ("missing.safetensors", r"no such file; pass ComfyUI's clip_vision_h\.safetensors"),
        ("nowhere", r"no such file or directory"),
    ],
)
def test_bad_values_are_one_line_naming_the_flag(tmp_path: Path, spec: str, message: str) -> None:
    with pytest.raises(SettingError, match=f"^--clip .*{message}") as error:
        load_clip(str(tmp_path / spec), "--clip", CPU, torch.float32)
    assert "\n" not in str(error.value)
    with pytest.raises(SettingError, match=message):
        clip_identity(str(tmp_path / spec))


def test_a_folder_of_another_model_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "transformer"
    folder.mkdir()
    (folder / "config.json").write_text('{"_class_name": "WanTransformer3DModel"}')
    save_file({"x": torch.zeros(1)}, folder / "diffusion_pytorch_model.safetensors")
    with pytest.raises(
        ModelLoadError, match=r"holds WanTransformer3DModel, expected a CLIPVisionModelWithProjection"
    ):
        load_clip(str(folder), "--clip", CPU, torch.float32)


def test_the_identity_follows_the_weights_the_embeddings_come_from(tmp_path: Path) -> None:
    """Stable for the same weights; new weights at the same path count; a pipeline folder's other
    components do not."""
    assert clip_identity("tiny") == clip_identity("tiny")
    torch.manual_seed(0)
    CLIPVisionModelWithProjection(CLIPVisionConfig(**DIFFUSERS_TINY)).save_pretrained(
        tmp_path / "pipe" / "image_encoder"
    )
    (tmp_path / "pipe" / "transformer").mkdir()
    before = clip_identity(str(tmp_path / "pipe"))
    (tmp_path / "pipe" / "transformer" / "config.json").write_text("{}")
    assert clip_identity(str(tmp_path / "pipe")) == before
    weights = tmp_path / "pipe" / "image_encoder" / "model.safetensors"
    weights.write_bytes(weights.read_bytes() + b" ")
    assert clip_identity(str(tmp_path / "pipe")) not in (before, clip_identity("tiny"))


def test_the_processor_needs_no_torchvision() -> None:
    """What the PIL processor does to an 8-bit picture: bicubic shortest edge, centre crop, CLIP
    normalisation (checked on a constant picture, where resampling keeps the value)."""
    processor = clip_vision.clip_processor(224)
    grey = np.full((300, 400, 3), 128, dtype=np.uint8)
    values = processor(images=[grey], return_tensors="pt")["pixel_values"]
    assert values.shape == (1, 3, 224, 224)
    expected = (128 / 255 - torch.tensor(clip_vision.CLIP_MEAN)) / torch.tensor(clip_vision.CLIP_STD)
    torch.testing.assert_close(values[0, :, 100, 100], expected, atol=1e-6, rtol=0)
