"""FLUX.2 on the tiny built-in models, checked against diffusers' own pipeline functions: the
latents (``_encode_vae_image``: mode, 2x2 patchify, BatchNorm statistics), the denoiser call
(``Flux2KleinPipeline.__call__``'s transformer call, and ``Flux2Pipeline``'s guidance for dev), the
mask on the 16-pixel token grid, LoRA targets and the BFL layer names."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from masktrain import _native, catalog
from masktrain.models.flux2 import TINY_TRANSFORMER, Flux2Family, bfl_name, pack_latents
from masktrain.models.loading import seeded

CPU, F32 = torch.device("cpu"), torch.float32
# A 4-block AutoencoderKLFlux2 (the released VAE's 8x), narrow: the released spatial factor of 16.
VAE_8X = {
    "block_out_channels": (4, 4, 4, 4),
    "layers_per_block": 1,
    "latent_channels": 2,
    "norm_num_groups": 1,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def with_bn_statistics(vae: torch.nn.Module, seed: int) -> torch.nn.Module:
    """`vae` with nonzero BatchNorm running statistics, so the normalisation shows."""
    channels = vae.bn.running_mean.shape[0]
    vae.bn.running_mean.copy_(randn(channels, seed=seed) * 0.3)
    vae.bn.running_var.copy_(randn(channels, seed=seed + 1).abs() + 0.5)
    return vae


def klein_pipeline(transformer: torch.nn.Module, vae: torch.nn.Module) -> object:
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline

    return Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        transformer=transformer,
    )


@pytest.mark.parametrize(("vae_config", "factor"), [(None, 2), (VAE_8X, 16)])
def test_latents_are_the_pipelines_normalised_patches(vae_config: dict | None, factor: int) -> None:
    from diffusers import AutoencoderKLFlux2

    family = Flux2Family()
    vae = family.load_vae("tiny", CPU, F32) if vae_config is None else AutoencoderKLFlux2(**vae_config).eval()
    vae = with_bn_statistics(vae, seed=3)
    assert family.spatial_factor(vae) == factor
    assert family.sample_size_multiple(vae) == factor
    pixels = torch.rand(2, 3, 1, 32, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = family.encode_pixels(vae, pixels)
    channels = 4 * vae.config.latent_channels
    assert latents.shape == (2, channels, 1, 32 // factor, 48 // factor)
    with torch.no_grad():  # the pipeline's own encoding of a 4-D image batch
        expected = klein_pipeline(family.load_transformer("tiny", "--dit", CPU, F32), vae)._encode_vae_image(
            pixels[:, :, 0], generator=None
        )
    torch.testing.assert_close(latents[:, :, 0], expected, rtol=1e-5, atol=1e-6)


def pipeline_call(
    transformer: torch.nn.Module,
    latents: torch.Tensor,
    sigmas: torch.Tensor,
    embeds: torch.Tensor,
    guidance_scale: float = 1.0,
) -> torch.Tensor:
    """Flux2KleinPipeline.__call__'s transformer call on (B, C, h, w) latents, copied: pack, 4-D ids,
    timestep t / 1000, then the ids scatter the tokens back (``_unpack_latents_with_ids``)."""
    from diffusers import Flux2KleinPipeline as P

    packed, latent_ids = P._pack_latents(latents), P._prepare_latent_ids(latents)
    batch = latents.shape[0]
    guidance = torch.full([1], guidance_scale).expand(batch) if transformer.config.guidance_embeds else None
    with torch.no_grad():
        noise_pred = transformer(
            hidden_states=packed,
            timestep=sigmas,
            guidance=guidance,  # Flux2Pipeline (dev): full(guidance_scale); klein: None
            encoder_hidden_states=embeds,
            txt_ids=P._prepare_text_ids(embeds),
            img_ids=latent_ids,
            return_dict=False,
        )[0]
    return P._unpack_latents_with_ids(noise_pred, latent_ids, *latents.shape[-2:])


@pytest.mark.parametrize("guidance_embeds", [False, True])
def test_predict_is_the_pipelines_transformer_call(guidance_embeds: bool) -> None:
    from diffusers import Flux2Transformer2DModel

    family = Flux2Family()
    torch.manual_seed(0)
    transformer = Flux2Transformer2DModel(**{**TINY_TRANSFORMER, "guidance_embeds": guidance_embeds}).eval()
    latents, sigmas = randn(2, 4, 3, 5, seed=1), torch.tensor([0.3, 0.85])
    embeds = randn(2, 7, 16, seed=2)
    with torch.no_grad():
        predicted = family.predict(
            transformer, latents.unsqueeze(2), sigmas, family.collate_text(list(embeds))
        )
    assert predicted.shape == (2, 4, 1, 3, 5)
    torch.testing.assert_close(
        predicted[:, :, 0], pipeline_call(transformer, latents, sigmas, embeds), rtol=0, atol=1e-6
    )
    if guidance_embeds:  # dev's guidance input matters: 1.0 (musubi's) is what predict passes
        other = pipeline_call(transformer, latents, sigmas, embeds, guidance_scale=4.0)
        assert (predicted[:, :, 0] - other).abs().max() > 1e-4


def test_an_off_centre_mask_weights_its_own_tokens(tmp_path: Path) -> None:
    # a 96x64 (w x h) image, mask on rows 16..47 and columns 48..79: token rows 1-2, columns 3-4
    mask = np.zeros((64, 96), np.uint8)
    mask[16:48, 48:80] = 255
    path = tmp_path / "mask.png"
    cv2.imwrite(str(path), mask)
    _, latent = _native.prepare_mask(path, (96, 64), (96, 64), catalog.FLUX2.spatial_factor)
    expected = np.zeros((4, 6), np.float32)
    expected[1:3, 3:5] = 1
    np.testing.assert_array_equal(latent, expected)
    # the weighted cells are the tokens whose position ids are those rows and columns
    tokens = pack_latents(torch.from_numpy(latent).view(1, 1, 1, 4, 6))[0, :, 0]
    from diffusers import Flux2KleinPipeline

    ids = Flux2KleinPipeline._prepare_latent_ids(torch.zeros(1, 128, 4, 6))[0]
    weighted = {tuple(int(v) for v in ids[k]) for k in torch.nonzero(tokens).flatten()}
    assert weighted == {(0, r, c, 0) for r in (1, 2) for c in (3, 4)}


def test_text_is_the_full_padded_sequence_without_a_mask() -> None:
    family = Flux2Family()
    batch = family.collate_text([randn(64, 16, seed=1), randn(64, 16, seed=2)])
    assert batch.hidden.shape == (2, 64, 16) and batch.mask is None
    with pytest.raises(ValueError, match="different lengths"):
        family.collate_text([randn(64, 16), randn(12, 16)])


def test_lora_goes_on_the_blocks_linear_layers() -> None:
    from masktrain.denoiser.lora import select_targets

    family = Flux2Family()
    transformer = family.load_transformer("tiny", "--dit", CPU, F32)
    targets = sorted(select_targets(transformer, family))
    double = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
    assert targets == sorted(
        [f"transformer_blocks.0.attn.{n}" for n in double]
        + [f"transformer_blocks.0.{ff}.linear_{io}" for ff in ("ff", "ff_context") for io in ("in", "out")]
        + ["single_transformer_blocks.0.attn.to_qkv_mlp_proj", "single_transformer_blocks.0.attn.to_out"]
    )
    blocks = family.blocks(transformer)
    assert list(blocks) == [*transformer.transformer_blocks, *transformer.single_transformer_blocks]


def test_bfl_names() -> None:
    # diffusers' convert_flux2_transformer_checkpoint_to_diffusers (single_file_utils.py), read backwards
    assert bfl_name("transformer_blocks.3.attn.to_k") == "double_blocks.3.img_attn.qkv"
    assert bfl_name("transformer_blocks.3.attn.add_v_proj") == "double_blocks.3.txt_attn.qkv"
    assert bfl_name("transformer_blocks.3.attn.to_out.0") == "double_blocks.3.img_attn.proj"
    assert bfl_name("transformer_blocks.3.attn.to_add_out") == "double_blocks.3.txt_attn.proj"
    assert bfl_name("transformer_blocks.3.ff.linear_in") == "double_blocks.3.img_mlp.0"
    assert bfl_name("transformer_blocks.3.ff_context.linear_out") == "double_blocks.3.txt_mlp.2"
    assert bfl_name("single_transformer_blocks.12.attn.to_qkv_mlp_proj") == "single_blocks.12.linear1"
    assert bfl_name("single_transformer_blocks.12.attn.to_out") == "single_blocks.12.linear2"


def test_catalog_record() -> None:
    spec = catalog.FLUX2
    assert spec.default_task == "klein-base-4b"
    assert {v: t.distilled_base for v, t in spec.tasks.items()} == {
        "dev": None,
        "klein-4b": "klein-base-4b",
        "klein-9b": "klein-base-9b",
        "klein-base-4b": None,
        "klein-base-9b": None,
    }
    for name, released in spec.released.items():
        task = spec.tasks[str(released.task)]
        config = released.config
        assert task.width == config["num_attention_heads"] * config["attention_head_dim"], name
        assert task.blocks == config["num_layers"], name  # the double blocks, as train checks


def test_text_is_the_klein_pipelines_stacked_hidden_states() -> None:
    from diffusers import Flux2KleinPipeline

    family = Flux2Family()
    encoder = family.load_text_encoder("tiny", CPU, F32)
    captions = ["a red fox in the snow", "x"]
    embeds = family.encode_text(encoder, captions)
    # the pipeline's own encoding; the tiny encoder (2 layers) reads layer 1 as diffusers' klein test
    expected = Flux2KleinPipeline._get_qwen3_prompt_embeds(
        encoder.model, encoder.tokenizer, captions, max_sequence_length=64, hidden_states_layers=(1,)
    )
    assert [e.shape for e in embeds] == [(64, 16)] * 2
    torch.testing.assert_close(torch.stack(embeds), expected, rtol=0, atol=0)
    assert (expected[1, -1] != 0).any()  # the padding positions carry encoder outputs, kept


def test_cache_train_and_lora_on_the_tiny_models(tmp_path: Path) -> None:
    import json

    from helpers import cached, read_safetensors, train_config
    from masktrain.config import MemorySettings
    from masktrain.config.sample import SampleSettings
    from masktrain.train.loop import run as run_train

    toml = cached(tmp_path / "data", "flux2")
    assert len(list((tmp_path / "data" / "cache").glob("*_flux2.safetensors"))) >= 4
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat --w 32 --h 48 --s 2 --l 4.0\n")
    config = train_config(
        toml,
        tmp_path / "out",
        "flux2",
        max_train_steps=2,
        gradient_checkpointing=True,
        memory=MemorySettings(blocks_to_swap=1),  # the single block, after the double one
        sample=SampleSettings(
            vae="tiny", text_encoder="tiny", sample_prompts=prompts, sample_every_n_steps=2
        ),
    )
    lora_path = run_train(config)
    tensors, metadata = read_safetensors(lora_path)
    assert metadata["masktrain.arch"] == "flux2" and metadata["masktrain.use_mask_loss"] == "true"
    assert "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight" in tensors
    assert "diffusion_model.single_blocks.0.linear1.lora_B.weight" in tensors
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in records)
    assert records[0]["prior_loss"] == 0 and records[1]["prior_loss"] > 0  # the prior is live
    (sample,) = (tmp_path / "out" / "sample").glob("*.png")
    assert cv2.imread(str(sample)).shape == (48, 32, 3)


def test_generate_runs_the_klein_pipeline_with_real_cfg() -> None:
    from helpers import tiny_sampler

    sample = tiny_sampler(Flux2Family(), 32, 48)
    plain, guided = sample(1.0), sample(4.0)
    assert plain.shape == (1, 48, 32, 3) and plain.dtype == torch.uint8
    assert torch.equal(plain, sample(1.0))
    assert not torch.equal(plain, guided)  # the negative prompt's pass is used
    # dev (a guidance embedding): Flux2Pipeline, the scale is the model's guidance input
    from diffusers import Flux2Transformer2DModel

    dev = seeded(lambda: Flux2Transformer2DModel(**{**TINY_TRANSFORMER, "guidance_embeds": True}))
    assert not torch.equal(sample(1.0, dev), sample(4.0, dev))


def bfl_state(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`transformer`'s weights in the BFL layout, written here from the layout's description
    (families.md 3.6): fused q/k/v, (shift, scale) in the final modulation, norms' ``scale``."""
    state = {k: v.clone() for k, v in transformer.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    top = {
        "x_embedder": "img_in",
        "context_embedder": "txt_in",
        "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
        "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
        "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
        "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
        "single_stream_modulation.linear": "single_stream_modulation.lin",
        "proj_out": "final_layer.linear",
    }
    for name, bfl in top.items():
        out[f"{bfl}.weight"] = state.pop(f"{name}.weight")
    scale, shift = state.pop("norm_out.linear.weight").chunk(2)
    out["final_layer.adaLN_modulation.1.weight"] = torch.cat([shift, scale])
    for b in range(len(transformer.transformer_blocks)):
        d = f"transformer_blocks.{b}."
        for stream, parts in (
            ("img", ("to_q", "to_k", "to_v")),
            ("txt", ("add_q_proj", "add_k_proj", "add_v_proj")),
        ):
            out[f"double_blocks.{b}.{stream}_attn.qkv.weight"] = torch.cat(
                [state.pop(f"{d}attn.{p}.weight") for p in parts]
            )
        for diffusers, bfl in {
            "attn.norm_q.weight": "img_attn.norm.query_norm.scale",
            "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
            "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
            "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale",
            "attn.to_out.0.weight": "img_attn.proj.weight",
            "attn.to_add_out.weight": "txt_attn.proj.weight",
            "ff.linear_in.weight": "img_mlp.0.weight",
            "ff.linear_out.weight": "img_mlp.2.weight",
            "ff_context.linear_in.weight": "txt_mlp.0.weight",
            "ff_context.linear_out.weight": "txt_mlp.2.weight",
        }.items():
            out[f"double_blocks.{b}.{bfl}"] = state.pop(d + diffusers)
    for b in range(len(transformer.single_transformer_blocks)):
        s = f"single_transformer_blocks.{b}.attn."
        for diffusers, bfl in {
            "to_qkv_mlp_proj.weight": "linear1.weight",
            "to_out.weight": "linear2.weight",
            "norm_q.weight": "norm.query_norm.scale",
            "norm_k.weight": "norm.key_norm.scale",
        }.items():
            out[f"single_blocks.{b}.{bfl}"] = state.pop(s + diffusers)
    assert not state, sorted(state)
    return out


def test_a_bfl_single_file_reads_key_by_key_as_diffusers_converts_it(tmp_path: Path) -> None:
    import safetensors.torch
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    from masktrain.models.flux2_checkpoint import load_transformer_file, transformer_file_config

    tiny = Flux2Family().load_transformer("tiny", "--dit", CPU, F32)
    bfl = bfl_state(tiny)
    # the file is what diffusers' own converter turns back into the tiny model
    converted = convert_flux2_transformer_checkpoint_to_diffusers(dict(bfl))
    assert converted.keys() == tiny.state_dict().keys()
    assert all(torch.equal(converted[k], v) for k, v in tiny.state_dict().items())
    path = tmp_path / "flux2-tiny.safetensors"
    safetensors.torch.save_file({f"model.diffusion_model.{k}": v for k, v in bfl.items()}, path)
    axes = {"axes_dims_rope": (4, 4, 4, 4)}  # not the released 128-dim heads: the axes are given
    loaded = load_transformer_file(path, "--dit", overrides=axes)
    assert loaded.state_dict().keys() == tiny.state_dict().keys()
    for key, value in tiny.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert {k: loaded.config[k] for k in TINY_TRANSFORMER} == TINY_TRANSFORMER
    with pytest.raises(ValueError, match=r"--dit .*flux2-tiny.safetensors: cannot infer .*head dim 16"):
        transformer_file_config(path, "--dit")


def test_an_fp8_bfl_file_keeps_each_parts_row_scales(tmp_path: Path) -> None:
    import safetensors.torch

    from masktrain.models.flux2_checkpoint import load_transformer_file
    from masktrain.models.fp8 import Fp8Linear, dequantize
    from masktrain.models.single_file import Fp8Load

    tiny = Flux2Family().load_transformer("tiny", "--dit", CPU, F32)
    bfl = bfl_state(tiny)
    qkv = bfl.pop("double_blocks.0.img_attn.qkv.weight")
    row_scale = qkv.abs().amax(dim=1) / 448  # ComfyUI's scaled fp8: one scale per output row
    bfl["double_blocks.0.img_attn.qkv.weight"] = (qkv / row_scale[:, None]).to(torch.float8_e4m3fn)
    bfl["double_blocks.0.img_attn.qkv.weight_scale"] = row_scale
    path = tmp_path / "flux2-fp8.safetensors"
    safetensors.torch.save_file(bfl, path)
    fp8 = Fp8Load("e4m3", Flux2Family().fp8_targets, F32)
    loaded = load_transformer_file(path, "--dit", F32, fp8, overrides={"axes_dims_rope": (4, 4, 4, 4)})
    attn = loaded.transformer_blocks[0].attn
    stored = bfl["double_blocks.0.img_attn.qkv.weight"].float() * row_scale[:, None]
    for third, layer in enumerate((attn.to_q, attn.to_k, attn.to_v)):
        assert isinstance(layer, Fp8Linear)
        rows = slice(third * 32, (third + 1) * 32)
        assert layer.scale is not None and layer.scale.shape == (32, 1)  # its own rows' scales
        torch.testing.assert_close(dequantize(layer.weight, layer.scale, F32), stored[rows], rtol=0, atol=0)


def test_local_diffusers_folders_load(tmp_path: Path) -> None:
    family = Flux2Family()
    tiny, vae = family.load_transformer("tiny", "--dit", CPU, F32), family.load_vae("tiny", CPU, F32)
    tiny.save_pretrained(tmp_path / "pipeline" / "transformer")
    vae.save_pretrained(tmp_path / "pipeline" / "vae")
    loaded = family.load_transformer(str(tmp_path / "pipeline"), "--dit", CPU, F32)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in tiny.state_dict().items())
    assert family.transformer_config(str(tmp_path / "pipeline"), "--dit")["num_single_layers"] == 1
    loaded_vae = family.load_vae(str(tmp_path / "pipeline" / "vae"), CPU, F32)
    assert torch.equal(loaded_vae.bn.running_var, vae.bn.running_var)


def test_dev_text_is_the_flux2_pipelines_mistral_hidden_states(tmp_path: Path) -> None:
    from diffusers import Flux2Pipeline

    family = Flux2Family()
    encoder = family.load_text_encoder("tiny-mistral", CPU, F32)
    captions = ["a dog is dancing", "[IMG]a cat"]
    embeds = family.encode_text(encoder, captions)
    # the pipeline's own encoding (its system message); the tiny encoder's one layer as diffusers' test
    expected = Flux2Pipeline._get_mistral_3_small_prompt_embeds(
        encoder.model, encoder.tokenizer, captions, max_sequence_length=64, hidden_states_layers=(1,)
    )
    assert [e.shape for e in embeds] == [(64, 16)] * 2
    torch.testing.assert_close(torch.stack(embeds), expected, rtol=0, atol=0)
    # a pipeline folder of it loads as the same encoder (found by its config's model_type)
    encoder.model.save_pretrained(tmp_path / "dev" / "text_encoder")
    encoder.tokenizer.save_pretrained(tmp_path / "dev" / "tokenizer")
    folder = family.load_text_encoder(str(tmp_path / "dev"), CPU, F32)
    from_folder = torch.stack(family.encode_text(folder, captions))
    assert from_folder.shape == (2, 512, 16)  # a real encoder's length; causal: its first 64 agree
    torch.testing.assert_close(from_folder[:, :64], expected, rtol=0, atol=1e-6)
    with pytest.raises(
        ValueError, match=r"--fp8_text_encoder: FLUX\.2 dev's Mistral text encoder is not loaded in fp8"
    ):
        family.load_text_encoder("tiny-mistral", CPU, F32, fp8=True)
