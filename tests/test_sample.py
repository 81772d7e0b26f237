"""Samples during training and after it: musubi's prompt file, the pipeline the samples come from
(checked against diffusers' own pipeline with the exported LoRA loaded by diffusers' loader), the
files and the contact sheet, block swap's forward-only schedule, and ``masktrain sample``."""

import json
import re
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline
from PIL import Image

from helpers import cached, train_config
from masktrain.cli import main
from masktrain.cli.train import config_from_args
from masktrain.config import OptimSettings
from masktrain.config.memory import MemorySettings
from masktrain.config.sample import SampleSettings
from masktrain.config.sample_prompts import load_prompts
from masktrain.denoiser.experts import load_for_sampling
from masktrain.errors import SamplePromptError, TrainConfigError
from masktrain.models import get_family, wan
from masktrain.models.loading import seeded
from masktrain.sample.sampler import Sampler
from masktrain.train.loop import run as run_train

CPU, F32 = torch.device("cpu"), torch.float32

# musubi-tuner @ 30c658c, docs/sampling_during_training.md, "Prompt file" (sizes, frames and steps
# made small for the tiny models on the CPU).
PROMPTS = """\
# prompt 1: for generating a cat video
A cat walks on the grass, realistic style. --w 64 --h 48 --f 5 --d 1 --s 3

# prompt 2: for generating a dog image
A dog runs on the beach, realistic style. --w 48 --h 32 --f 1 --d 2 --s 3
"""


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {arch: cached(tmp_path_factory.mktemp(arch), arch) for arch in ("wan", "qwen_image")}


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _settings(prompts: Path, arch: str = "wan", **kwargs) -> SampleSettings:
    return SampleSettings(sample_prompts=prompts, vae="tiny", text_encoder="tiny", **kwargs)


# --- the prompt file -----------------------------------------------------------------------------


def test_musubis_prompt_lines_with_their_options(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "p.txt",
        PROMPTS + "a portrait --n blurry, low quality --l 6.5 --fs 3 --g 3.5 --W 32 --h 40\n",
    )
    cat, dog, portrait = load_prompts(path)
    assert (cat.prompt, cat.width, cat.height, cat.frames, cat.seed, cat.steps) == (
        "A cat walks on the grass, realistic style.",
        64,
        48,
        5,
        1,
        3,
    )
    assert cat.is_video and not dog.is_video and (dog.index, dog.where) == (1, f"{path}:5")
    assert portrait.negative_prompt == "blurry, low quality" and portrait.cfg_scale == 6.5
    assert (portrait.flow_shift, portrait.guidance_scale, portrait.width) == (3.0, 3.5, 32)  # --W: any case
    assert (portrait.steps, portrait.seed, portrait.frames) == (20, None, 1)  # musubi's defaults


def test_musubis_toml_and_json_forms(tmp_path: Path) -> None:
    toml = _write(
        tmp_path / "p.toml",
        """
[prompt]
width = 64
height = 48
sample_steps = 4

[[prompt.subset]]
prompt = "a cat"
seed = 3

[[prompt.subset]]
prompt = "a dog"
width = 32
negative_prompt = "blurry"
""",
    )
    cat, dog = load_prompts(toml)
    assert (cat.prompt, cat.width, cat.height, cat.steps, cat.seed) == ("a cat", 64, 48, 4, 3)
    assert (dog.width, dog.height, dog.negative_prompt) == (32, 48, "blurry")
    as_json = _write(
        tmp_path / "p.json", json.dumps(["a cat --w 32 --d 5", {"prompt": "a dog", "cfg_scale": 2}])
    )
    cat, dog = load_prompts(as_json)
    assert (cat.width, cat.seed, dog.cfg_scale, dog.index) == (32, 5, 2.0, 1)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "a cat --cn control.mp4\n",
            ":1: --cn gives a Fun-Control video, for a model variant masktrain does not train; remove it",
        ),
        ("a cat --i start.png\n", ":1: --i start.png: no such file"),
        (
            "# only\n\na cat --zz 3\n",
            ":3: unknown option --zz; the options are --w --h --f --d --s --g --fs --l --n",
        ),
        ("a cat --w wide\n", ":1: --w: expected an integer, got 'wide'"),
        ("a cat --s 0\n", ":1: sample_steps must be >= 1, got 0"),
        ("a cat --l -1\n", ":1: cfg_scale must be > 0, got -1.0"),
        ("--w 64\n", ":1: the prompt text is empty"),
        ("# nothing\n", ": no prompts in it (lines starting with # are comments)"),
    ],
)
def test_a_bad_prompt_line_is_one_line_naming_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    path = _write(tmp_path / "p.txt", text)
    with pytest.raises(SamplePromptError) as error:
        load_prompts(path)
    assert str(error.value).endswith(message) and "\n" not in str(error.value)
    assert str(path) in str(error.value)


def test_sampling_flags_are_checked_before_any_model_loads(tmp_path: Path) -> None:
    toml = _write(tmp_path / "d.toml", "")
    base = ["--dataset_config", str(toml), "--output_dir", str(tmp_path), "--dit", "tiny"]
    prompts = _write(tmp_path / "p.txt", "a cat --f 5\n")
    with pytest.raises(TrainConfigError, match=r"p\.txt:1: --f 5: Qwen-Image makes images"):
        config_from_args(
            [
                *base,
                "--arch",
                "qwen_image",
                "--sample_prompts",
                str(prompts),
                "--vae",
                "tiny",
                "--text_encoder",
                "tiny",
            ]
        )
    with pytest.raises(TrainConfigError, match="--sample_prompts needs --vae"):
        config_from_args([*base, "--arch", "wan", "--sample_prompts", str(prompts), "--t5", "tiny"])
    with pytest.raises(TrainConfigError, match=r"--sample_prompts needs --t5 \(the UMT5-XXL text encoder"):
        config_from_args([*base, "--arch", "wan", "--sample_prompts", str(prompts), "--vae", "tiny"])
    with pytest.raises(TrainConfigError, match="--sample_every_n_steps needs --sample_prompts"):
        config_from_args([*base, "--arch", "wan", "--sample_every_n_steps", "5"])
    with pytest.raises(TrainConfigError, match="--text_encoder is not used with --arch wan; pass --t5"):
        config_from_args([*base, "--arch", "wan", "--text_encoder", "x"])


def test_vae_and_text_encoder_without_prompts_are_accepted_and_ignored(tmp_path: Path, caplog) -> None:
    caplog.set_level("INFO")
    toml = _write(tmp_path / "d.toml", "")
    config = config_from_args(
        [
            "--dataset_config",
            str(toml),
            "--output_dir",
            str(tmp_path),
            "--dit",
            "tiny",
            "--arch",
            "wan",
            "--vae",
            "v.safetensors",
            "--t5",
            "t5.pth",
            "--fp8_t5",
        ]
    )
    assert not config.sample.enabled and config.sample.vae is None
    assert (
        "--vae, --t5, --fp8_t5 accepted and ignored: train reads cached latents and embeddings" in caplog.text
    )


# --- what the samples are --------------------------------------------------------------------------


def _png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _video(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


@pytest.fixture(scope="module")
def sensitive_vae(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local diffusers VAE folder whose pixels follow the latents: the tiny VAE with unit
    normalisation and 10x the decoder's output gain. The tiny VAE's own pixels hardly move with
    the latents (its latents_std is ~0.01 and its random decoder's output is near grey), so a
    LoRA's effect on its samples is below one grey level."""
    folder = tmp_path_factory.mktemp("vae")
    vae = seeded(
        lambda: AutoencoderKLWan(**{**wan.TINY_VAE, "latents_mean": [0.0] * 16, "latents_std": [1.0] * 16})
    )
    with torch.no_grad():
        vae.decoder.conv_out.weight.mul_(10)
    vae.save_pretrained(folder)
    return folder


def test_the_sample_is_what_diffusers_draws_with_the_exported_lora(
    datasets, sensitive_vae, tmp_path: Path
) -> None:
    """The last sample of a run equals diffusers' own WanPipeline (its own tiny text encoder and
    tokenizer, UniPC with the same flow shift) with the run's LoRA loaded by diffusers'
    ``load_lora_weights``; and the LoRA visibly changed the sample from the base model's."""
    prompts = _write(tmp_path / "p.txt", "a photo of subject 1 --w 48 --h 32 --d 7 --s 4 --l 4.0 --n ugly\n")
    out = tmp_path / "out"
    settings = SampleSettings(
        sample_prompts=prompts, vae=str(sensitive_vae), text_encoder="tiny", sample_at_first=True
    )
    config = train_config(
        datasets["wan"],
        out,
        max_train_steps=6,
        lora_format="diffusers",
        optim=OptimSettings(learning_rate=2e-2),
        sample=settings,
    )
    run_train(config)
    base, last = _png(out / "sample" / "lora_000000_00_7.png"), _png(out / "sample" / "lora_000006_00_7.png")
    assert base.shape == (32, 48, 3)
    assert np.abs(base.astype(int) - last).max() >= 5  # the LoRA changed the picture

    family = get_family("wan")
    encoder = family.load_text_encoder("tiny", CPU, F32)
    pipeline = WanPipeline(
        tokenizer=encoder.tokenizer,
        text_encoder=encoder.model,
        vae=family.load_vae(str(sensitive_vae), CPU, F32),
        transformer=family.load_transformer("tiny", "--dit", CPU, F32),
        scheduler=UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=wan.DEFAULT_FLOW_SHIFT
        ),
    )
    pipeline.load_lora_weights(str(out / "lora.safetensors"))
    expected = pipeline(
        prompt="a photo of subject 1",
        negative_prompt="ugly",
        height=32,
        width=48,
        num_frames=1,
        num_inference_steps=4,
        guidance_scale=4.0,
        generator=torch.Generator().manual_seed(7),
        output_type="np",
    ).frames[0][0]
    expected = np.round(expected * 255).clip(0, 255).astype(np.uint8)
    assert np.abs(expected.astype(int) - last).max() <= 1  # float rounding only


@pytest.mark.parametrize("arch", ["wan", "qwen_image"])
def test_block_swap_samples_forward_only_and_draws_the_same(datasets, tmp_path: Path, arch: str) -> None:
    """Under block swap sampling loads no block on demand (each swapped block arrives ahead of its
    use and leaves right after it), ends in the between-steps layout, and draws what the fully
    resident model draws."""
    prompts = _write(tmp_path / "p.txt", "a cat --w 32 --h 32 --s 3 --d 1\n")
    settings = _settings(prompts)
    family = get_family(arch)
    frames = []
    for blocks_to_swap in (0, 1):
        sampler = Sampler(settings, family, CPU, F32, None, 42, tmp_path / f"swap{blocks_to_swap}", "s")
        memory = MemorySettings(blocks_to_swap=blocks_to_swap)
        experts = load_for_sampling(family, "tiny", None, 0.875, None, memory, CPU, F32)
        (path,) = sampler.run(experts, step=0)
        frames.append(_png(path))
        for swap in experts.swaps.values():
            assert swap.copies == 3 * 2  # 3 steps of a cond and an uncond pass, one swapped block each
            assert swap.loads_on_demand == 0 and swap.layout() == "DH"
    assert np.array_equal(frames[0], frames[1])


@pytest.mark.slow
def test_masktrain_sample_redraws_the_runs_last_samples(datasets, tmp_path: Path) -> None:
    """``masktrain sample --lora`` on a run's LoRA writes the same files, pixel for pixel, as the
    run drew at its last step (named by the step stored in the LoRA)."""
    prompts = _write(tmp_path / "p.txt", PROMPTS)
    out = tmp_path / "out"
    config = train_config(datasets["wan"], out, max_train_steps=2, sample=_settings(prompts))
    run_train(config)
    trained = {p.name: p.read_bytes() for p in (out / "sample").glob("lora_000002_*")}
    assert sorted(trained) == ["lora_000002_00_1.mp4", "lora_000002_00_1_middle.png", "lora_000002_01_2.png"]
    again = tmp_path / "again"
    result = CliRunner().invoke(
        main,
        [
            "sample",
            "--arch",
            "wan",
            "--dit",
            "tiny",
            "--lora",
            str(out / "lora.safetensors"),
            "--vae",
            "tiny",
            "--t5",
            "tiny",
            "--sample_prompts",
            str(prompts),
            "--output_dir",
            str(again),
        ],
    )
    assert result.exit_code == 0, result.output
    redrawn = {p.name: p for p in (again / "sample").glob("lora_*") if not p.name.endswith(".html")}
    assert sorted(redrawn) == sorted(trained)
    assert np.array_equal(
        _png(redrawn["lora_000002_01_2.png"]), _png(out / "sample" / "lora_000002_01_2.png")
    )
    video, original = _video(redrawn["lora_000002_00_1.mp4"]), _video(out / "sample" / "lora_000002_00_1.mp4")
    assert len(video) == 5 and video[0].shape == (48, 64, 3)
    assert all(np.array_equal(a, b) for a, b in zip(video, original, strict=True))


def test_contact_sheet_rows_are_steps_and_cells_link_the_files(datasets, tmp_path: Path) -> None:
    prompts = _write(tmp_path / "p.txt", PROMPTS)
    out = tmp_path / "out"
    settings = _settings(prompts, sample_at_first=True, sample_every_n_steps=2)
    run_train(train_config(datasets["wan"], out, max_train_steps=3, sample=settings))
    names = sorted(p.name for p in (out / "sample").iterdir())
    assert names == [
        *(
            f"lora_{step:06d}_{name}"
            for step in (0, 2, 3)
            for name in ("00_1.mp4", "00_1_middle.png", "01_2.png")
        ),
        "lora_contact_sheet.html",
    ]  # at first, every 2 steps, and at the last step
    sheet = (out / "sample" / "lora_contact_sheet.html").read_text()
    rows = re.findall(r"<tr><th>([^<]+)</th>(.*?)</tr>", sheet)
    assert [label for label, _ in rows] == ["base model (step 0)", "step 2", "step 3"]
    for label, cells in rows:
        step = 0 if label.startswith("base") else int(label.split()[1])
        links = re.findall(r'<a href="([^"]+)"><img src="([^"]+)"', cells)
        assert links == [
            (f"lora_{step:06d}_00_1.mp4", f"lora_{step:06d}_00_1_middle.png"),
            (f"lora_{step:06d}_01_2.png", f"lora_{step:06d}_01_2.png"),
        ]
    assert "A cat walks on the grass, realistic style." in sheet
    middle = _png(out / "sample" / "lora_000003_00_1_middle.png")
    frames = _video(out / "sample" / "lora_000003_00_1.mp4")
    assert np.abs(middle.astype(int) - frames[2]).mean() < 3  # H.264 is lossy; the middle PNG is not


def test_wan22_samples_switch_experts_at_the_boundary(tmp_path: Path) -> None:
    """With two experts the pipeline runs the high-noise one on the timesteps at or above the
    boundary and the low-noise one below it, each in a cond and an uncond pass; the idle expert's
    weights are offloaded meanwhile (--offload_inactive_dit)."""
    prompts = _write(tmp_path / "p.txt", "a cat --w 32 --h 32 --s 6 --d 1\n")
    family = get_family("wan")
    sampler = Sampler(_settings(prompts), family, CPU, F32, None, 42, tmp_path, "s")
    memory = MemorySettings(offload_inactive_dit=True)
    experts = load_for_sampling(family, "tiny", "tiny", 0.875, None, memory, CPU, F32)
    assert experts.high is not None and experts.idle_slots is not None
    calls = {"high": 0, "low": 0}
    experts.high.register_forward_pre_hook(lambda module, args: calls.__setitem__("high", calls["high"] + 1))
    experts.low.register_forward_pre_hook(lambda module, args: calls.__setitem__("low", calls["low"] + 1))
    sampler.run(experts, step=0)
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=wan.DEFAULT_FLOW_SHIFT
    )
    scheduler.set_timesteps(6)
    high = sum(int(t >= 875) for t in scheduler.timesteps)
    assert 0 < high < 6 and calls == {"high": 2 * high, "low": 2 * (6 - high)}
