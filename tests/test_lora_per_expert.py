"""WAN 2.2 A14B's two experts as users run them (issue 23, part 5): ``--lora_per_expert`` (two
LoRAs, each stepped only in the steps its expert took a sample in, its optimizer state and EMA
untouched otherwise; saved as NAME_high_noise / NAME_low_noise in every layout, loaded back by
diffusers' own WanPipeline into ``transformer`` / ``transformer_2`` and by ``masktrain sample``),
``--expert_balance alternate`` (each step inside one expert's range: half the steps each, the
sampler's distribution restricted to that range), the per-expert counts in metrics.jsonl and the
summary, a resume equal to an uninterrupted run, the flags' errors and the plan's second LoRA."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch
from click.testing import CliRunner
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline
from PIL import Image

from helpers import cached, denoiser_output, tiny_denoiser, train_config, words
from masktrain.cli import main
from masktrain.config import OptimSettings, TimestepSettings, TrainConfig
from masktrain.config.memory import MemorySettings
from masktrain.config.sample import SampleConfig, SampleSettings
from masktrain.denoiser.experts import load_for_sampling
from masktrain.denoiser.lora import add_lora, lora_state_dict
from masktrain.errors import LoraFileError, TrainConfigError
from masktrain.models import get_family, wan
from masktrain.plan.activations import StepShape
from masktrain.plan.estimate import Planner, PlanSettings
from masktrain.plan.run import settings_for
from masktrain.sample.run import expert_loras
from masktrain.sample.run import run as run_sample
from masktrain.train.build import build_experts
from masktrain.train.ema_teacher import EmaTeacher
from masktrain.train.loop import run as run_train
from masktrain.train.optim import lora_steps
from masktrain.train.timesteps import ExpertRange, expert_share, sample_sigmas

WAN = get_family("wan")
CPU, F32 = torch.device("cpu"), torch.float32
EXPERTS = ("high_noise", "low_noise")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return cached(tmp_path_factory.mktemp("wan"), "wan")


def per_expert(toml: Path, out: Path, **kwargs: Any) -> TrainConfig:
    """Two tiny experts with a LoRA each; boundary 0.5, so with the seed's draws some steps give
    samples to one expert only and some to both."""
    settings: dict[str, Any] = {"dit_high_noise": "tiny", "timestep_boundary": 0.5, "lora_per_expert": True}
    return train_config(toml, out, **(settings | kwargs))


def adapter(folder: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(folder / "adapter.safetensors")


def optimizer_state(folder: Path) -> dict[int, dict[str, torch.Tensor]]:
    return torch.load(folder / "optimizer.pt", weights_only=True)["state"]


def records(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def expert_model(state: dict[str, torch.Tensor], expert: str) -> torch.nn.Module:
    """A tiny transformer with one expert's LoRA from a checkpoint's adapter (float32, bit-exact):
    the reference the LoRA files are compared against."""
    model = tiny_denoiser("wan")
    add_lora(model, WAN, rank=4, alpha=4.0)
    params = dict(model.named_parameters())
    mine = {k.removeprefix(f"{expert}."): v for k, v in state.items() if k.startswith(f"{expert}.")}
    assert mine.keys() == {n for n, p in params.items() if p.requires_grad}
    with torch.no_grad():
        for name, tensor in mine.items():
            params[name].copy_(tensor)
    return model


# --- the flags ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"lora_per_expert": True},
            "--lora_per_expert needs two experts: pass --dit_high_noise beside --dit",
        ),
        (
            {"timesteps": TimestepSettings(expert_balance="alternate")},
            "--expert_balance alternate needs two experts (--dit_high_noise)",
        ),
        (
            {
                "dit_high_noise": "tiny",
                "timesteps": TimestepSettings(expert_balance="alternate", max_timestep=800),
            },
            "--expert_balance alternate: --min_timestep 0 and --max_timestep 800 leave the high-noise "
            "expert no timesteps (the switch is at timestep 875, --timestep_boundary 0.875)",
        ),
    ],
)
def test_settings_errors_name_the_flags(tmp_path: Path, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(TrainConfigError) as error:
        train_config(tmp_path / "d.toml", tmp_path / "out", **kwargs)
    assert str(error.value).startswith(message)


def test_the_cli_refuses_lora_per_expert_without_the_high_noise_expert(tmp_path: Path) -> None:
    toml = tmp_path / "d.toml"
    toml.write_text("")
    flags = "train --dataset_config {toml} --arch wan --dit tiny --output_dir {out} --lora_per_expert"
    result = CliRunner().invoke(main, words(flags, toml=toml, out=tmp_path / "out"))
    assert result.exit_code == 2
    assert "--lora_per_expert needs two experts: pass --dit_high_noise beside --dit" in result.output
    assert len([line for line in result.output.splitlines() if "Error" in line]) == 1


# --- drawing inside one expert's range --------------------------------------------------------


def _truncated_cdf(x: np.ndarray, boundary: float, high: bool) -> np.ndarray:
    """``--timestep_sampling sigmoid`` (t = sigmoid(z), z ~ N(0, 1)) restricted to one side of the
    boundary: the standard normal's CDF, truncated, through the logit."""
    from math import erf

    phi = np.vectorize(lambda v: 0.5 * (1 + erf(v / math.sqrt(2))))
    cut = phi(math.log(boundary / (1 - boundary)))
    at = phi(np.log(x / (1 - x)))
    return (at - cut) / (1 - cut) if high else at / cut


@pytest.mark.parametrize("high", [True, False], ids=["high-noise", "low-noise"])
def test_a_turn_draws_the_samplers_distribution_inside_its_experts_range(high: bool) -> None:
    settings = TimestepSettings(timestep_sampling="sigmoid")
    within = ExpertRange(0.875, high)
    draws = sample_sigmas(settings, 20_000, (4, 4), torch.Generator().manual_seed(1), "cpu", within)
    again = sample_sigmas(settings, 20_000, (4, 4), torch.Generator().manual_seed(1), "cpu", within)
    assert torch.equal(draws, again)  # from the caller's generator alone
    t = np.sort(draws.double().numpy())
    assert (t >= 0.875).all() if high else (t < 0.875).all()
    empirical = np.arange(1, t.size + 1) / t.size
    # Kolmogorov-Smirnov distance to the truncated law; 0.0138 is its 99.9% bound at n = 20000
    assert np.abs(empirical - _truncated_cdf(t, 0.875, high)).max() < 0.0138


def test_free_sampling_gives_the_high_noise_expert_one_sample_in_8_or_40() -> None:
    """The issue's facts: at the 0.875 boundary the default sampler (sigma, shift 1: 126 of the
    table's 1000 sigmas are >= 0.875) gives the high-noise expert 12.6%; sigmoid gives it
    P(N(0, 1) >= logit 0.875) = 2.58%."""
    sizes = [((4, 4), 1)]
    assert expert_share(TimestepSettings(), 0.875, sizes) == pytest.approx(0.126, abs=0.007)
    sigmoid = 1 - 0.5 * (1 + math.erf(math.log(7) / math.sqrt(2)))
    assert sigmoid == pytest.approx(0.02583, abs=1e-5)
    assert expert_share(TimestepSettings(timestep_sampling="sigmoid"), 0.875, sizes) == pytest.approx(
        sigmoid, abs=0.0035
    )


# --- which LoRA steps ----------------------------------------------------------------------------


def test_an_idle_lora_keeps_its_weights_and_adamw_state_bit_identical() -> None:
    """With gradients on both LoRAs and weight decay, only the LoRA whose expert took samples
    moves: the other's gradients are dropped before AdamW sees them."""
    torch.manual_seed(0)
    named = [(f"{e}.blocks.0.w", torch.nn.Parameter(torch.randn(3, 2))) for e in EXPERTS]
    optimizer = torch.optim.AdamW([p for _, p in named], lr=0.1, weight_decay=0.5)
    for samples in ({"high_noise": 1, "low_noise": 1}, {"high_noise": 0, "low_noise": 2}):
        before = [p.detach().clone() for _, p in named]
        state = {k: v.clone() for k, v in optimizer.state.get(named[0][1], {}).items()}
        for _, param in named:
            param.grad = torch.ones_like(param)
        steps = lora_steps(named, samples)
        optimizer.step()
        moved = [not torch.equal(b, p) for b, (_, p) in zip(before, named, strict=True)]
        assert moved == [samples["high_noise"] > 0, True]
    assert steps.idle == {"high_noise.blocks.0.w"} and len(steps.moving) == 1
    after = optimizer.state[named[0][1]]
    assert state.keys() == after.keys() and all(torch.equal(state[k], after[k]) for k in state)
    shared = [("blocks.0.w", torch.nn.Parameter(torch.zeros(1)))]
    assert lora_steps(shared, {"high_noise": 0, "low_noise": 2}).idle == frozenset()  # one LoRA: always


def test_the_ema_keeps_one_average_per_lora() -> None:
    named = [(f"{e}.w", torch.nn.Parameter(torch.tensor([1.0]))) for e in EXPERTS]
    ema = EmaTeacher(named, decay=0.5, start_step=0)
    ema.after_step(0)
    with torch.no_grad():
        for _, param in named:
            param.fill_(3.0)
    ema.after_step(1, idle={"high_noise.w"})
    assert ema.state() == {"high_noise.w": torch.tensor([1.0]), "low_noise.w": torch.tensor([2.0])}


def test_each_lora_moves_only_in_its_experts_steps(dataset: Path, tmp_path: Path, caplog) -> None:
    """Six steps, a checkpoint after each: an expert without samples in a step keeps its LoRA and
    its AdamW state bit for bit; the two LoRAs end apart; the files are named per expert."""
    out = tmp_path / "out"
    config = per_expert(dataset, out, max_train_steps=6, save_every_n_steps=1)
    names = [name for name, _ in build_experts(config, WAN, CPU, F32).trainable()]  # optimizer order
    start = {name: p.detach().clone() for name, p in build_experts(config, WAN, CPU, F32).trainable()}
    with caplog.at_level(logging.INFO):
        run_train(config)
    counts = [(r["high_noise_samples"], r["low_noise_samples"]) for r in records(out)]
    assert counts == [(0, 2), (2, 0), (1, 1), (2, 0), (2, 0), (1, 1)]  # this seed: every case

    previous, previous_state = start, {}
    for step, sampled in enumerate(counts, start=1):
        folder = out / f"step-{step:06d}"
        now, state = adapter(folder), optimizer_state(folder)
        for expert, count in zip(EXPERTS, sampled, strict=True):
            mine = [i for i, name in enumerate(names) if name.startswith(f"{expert}.")]
            same = all(torch.equal(now[names[i]], previous[names[i]]) for i in mine)
            kept = all(
                previous_state.get(i, {}).keys() == state.get(i, {}).keys()
                and all(torch.equal(previous_state[i][k], state[i][k]) for k in state.get(i, {}))
                for i in mine
            )
            assert (same and kept) == (count == 0), (step, expert)
        previous, previous_state = now, state

    final = adapter(out / "step-000006")
    assert all(not torch.equal(final[f"high_noise.{n}"], final[f"low_noise.{n}"]) for n in _lora_names(final))
    for folder in (out, out / "step-000006"):
        assert sorted(p.name for p in folder.glob("lora*.safetensors")) == [
            "lora_high_noise.safetensors",
            "lora_low_noise.safetensors",
        ]
    for expert in EXPERTS:
        with safetensors.safe_open(out / f"lora_{expert}.safetensors", "pt") as handle:
            metadata = handle.metadata()
        assert metadata["masktrain.expert"] == expert and metadata["masktrain.step"] == "6"
    assert (
        "steps with samples per expert: high-noise 5 of 6 steps (83.3%, 8 samples), low-noise 3 of 6 steps "
        "(50.0%, 4 samples)" in caplog.text
    )


def _lora_names(state: dict[str, torch.Tensor]) -> list[str]:
    return sorted({k.removeprefix("high_noise.") for k in state if k.startswith("high_noise.")})


@pytest.mark.parametrize("lora_per_expert", [True, False], ids=["per-expert", "shared"])
def test_alternate_gives_each_expert_half_the_steps(
    dataset: Path, tmp_path: Path, caplog, lora_per_expert: bool
) -> None:
    """At the 0.875 boundary free sampling would give the high-noise expert 1 sample in 8;
    alternate gives it every other step, the first one included; the counts and the summary are
    there with one shared LoRA too."""
    out = tmp_path / "out"
    config = train_config(
        dataset,
        out,
        max_train_steps=6,
        dit_high_noise="tiny",
        lora_per_expert=lora_per_expert,
        timesteps=TimestepSettings(expert_balance="alternate"),
    )
    with caplog.at_level(logging.INFO):
        run_train(config)
    counts = [(r["high_noise_samples"], r["low_noise_samples"]) for r in records(out)]
    assert counts == [(2, 0), (0, 2)] * 3
    assert (
        "steps 1, 3, 5, ... draw in the high-noise expert's range, steps 2, 4, 6, ... in the low-noise"
        in caplog.text
    )
    assert (
        "high-noise 3 of 6 steps (50.0%, 6 samples), low-noise 3 of 6 steps (50.0%, 6 samples)" in caplog.text
    )
    files = sorted(p.name for p in out.glob("lora*.safetensors"))
    assert files == (
        ["lora_high_noise.safetensors", "lora_low_noise.safetensors"]
        if lora_per_expert
        else ["lora.safetensors"]
    )


# --- the files ------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["comfyui", "diffusers"])
def test_the_files_load_into_diffusers_wan22_pipeline_each_on_its_expert(
    dataset: Path, tmp_path: Path, layout: str
) -> None:
    """diffusers' WanPipeline reads both layouts: NAME_low_noise into ``transformer``, NAME_high_noise
    into ``transformer_2`` (``load_into_transformer_2=True``), each then predicting what its expert's
    LoRA from the checkpoint's bit-exact adapter predicts."""
    out = tmp_path / "out"
    run_train(per_expert(dataset, out, max_train_steps=2, lora_format=layout))  # one step each
    state = adapter(out / "step-000002")
    encoder = WAN.load_text_encoder("tiny", CPU, F32)
    pipeline = WanPipeline(
        tokenizer=encoder.tokenizer,
        text_encoder=encoder.model,
        vae=WAN.load_vae("tiny", CPU, F32),
        transformer=tiny_denoiser("wan"),
        transformer_2=tiny_denoiser("wan"),
        scheduler=FlowMatchEulerDiscreteScheduler(),
        boundary_ratio=0.5,
    )
    pipeline.load_lora_weights(str(out / "lora_low_noise.safetensors"))
    pipeline.load_lora_weights(str(out / "lora_high_noise.safetensors"), load_into_transformer_2=True)
    low, high = denoiser_output("wan", pipeline.transformer), denoiser_output("wan", pipeline.transformer_2)
    assert (low - denoiser_output("wan", expert_model(state, "low_noise"))).abs().max() <= 1e-6
    assert (high - denoiser_output("wan", expert_model(state, "high_noise"))).abs().max() <= 1e-6
    assert (high - low).abs().max() > 1e-4


def _prompts(tmp_path: Path) -> Path:
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat --w 32 --h 32 --s 4 --d 3\n")
    return prompts


def _sample_config(out: Path, lora: Path, prompts: Path, **kwargs: Any) -> SampleConfig:
    settings = SampleSettings(sample_prompts=prompts, vae="tiny", text_encoder="tiny")
    return SampleConfig(
        "wan",
        "tiny",
        out,
        settings,
        lora,
        dit_high_noise="tiny",
        timestep_boundary=0.5,
        device="cpu",
        **kwargs,
    )


def test_masktrain_sample_loads_each_expert_its_file_and_redraws_the_runs_sample(
    dataset: Path, tmp_path: Path
) -> None:
    """In the musubi layout too: ``--lora NAME_low_noise`` brings its twin; each expert gets its own
    file (checked against the checkpoint's adapter), the samples take the run's name, and they are
    what the run drew with the LoRAs in memory, pixel for pixel. A file given to the other expert's
    flag is refused before any model loads."""
    out, prompts = tmp_path / "out", _prompts(tmp_path)
    sample = SampleSettings(sample_prompts=prompts, vae="tiny", text_encoder="tiny")
    run_train(per_expert(dataset, out, max_train_steps=2, lora_format="musubi", sample=sample))
    state = adapter(out / "step-000002")

    for given in ("low_noise", "high_noise"):
        config = _sample_config(tmp_path / "again", out / f"lora_{given}.safetensors", prompts)
        assert expert_loras(config) == (
            out / "lora_low_noise.safetensors",
            out / "lora_high_noise.safetensors",
        )
    low, high = expert_loras(config)
    experts = load_for_sampling(WAN, "tiny", "tiny", 0.5, low, MemorySettings(), CPU, F32, (), high)
    assert experts.high is not None and experts.lora_per_expert
    for expert, model in (("low_noise", experts.low), ("high_noise", experts.high)):
        reference = lora_state_dict(expert_model(state, expert))
        assert lora_state_dict(model).keys() == reference.keys()
        assert all(torch.equal(lora_state_dict(model)[k], reference[k]) for k in reference)

    written = run_sample(_sample_config(tmp_path / "again", out / "lora_high_noise.safetensors", prompts))
    assert [path.name for path in written] == ["lora_000002_00_3.png"]
    with Image.open(written[0]) as redrawn, Image.open(out / "sample" / "lora_000002_00_3.png") as drawn:
        assert np.array_equal(np.asarray(redrawn), np.asarray(drawn))

    swapped = _sample_config(
        tmp_path / "x",
        out / "lora_high_noise.safetensors",
        prompts,
        lora_high_noise=out / "lora_low_noise.safetensors",
    )
    with pytest.raises(LoraFileError, match="was trained for the high-noise expert only"):
        run_sample(swapped)


# --- resume ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("balance", ["sampled", "alternate"])
def test_resume_restores_both_loras_and_their_optimizer_state(
    dataset: Path, tmp_path: Path, balance: str
) -> None:
    """Five steps straight against three, a checkpoint, and two more (resumed at an odd step, so
    the alternation must follow the global step): both LoRAs, their AdamW state and the per-expert
    counts agree."""
    timesteps = TimestepSettings(expert_balance=balance)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_train(per_expert(dataset, straight, max_train_steps=5, save_every_n_steps=3, timesteps=timesteps))
    run_train(
        per_expert(dataset, resumed, max_train_steps=5, timesteps=timesteps, resume=straight / "step-000003")
    )
    expected, got = adapter(straight / "step-000005"), adapter(resumed / "step-000005")
    assert expected.keys() == got.keys() and {k.split(".")[0] for k in got} == set(EXPERTS)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=0)
    before, after = optimizer_state(straight / "step-000005"), optimizer_state(resumed / "step-000005")
    assert before.keys() == after.keys() and len(before) == len(expected)  # both LoRAs have stepped
    for index, moments in before.items():
        for key, value in moments.items():
            torch.testing.assert_close(after[index][key], value, atol=1e-6, rtol=0)
    counts = {r["step"]: (r["high_noise_samples"], r["low_noise_samples"]) for r in records(straight)}
    assert [
        counts[r["step"]] == (r["high_noise_samples"], r["low_noise_samples"]) for r in records(resumed)
    ] == [
        True,
        True,
    ]


def test_a_resume_must_keep_lora_per_expert(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_train(per_expert(dataset, out, max_train_steps=1))
    shared = dataclasses.replace(per_expert(dataset, tmp_path / "b"), lora_per_expert=False)
    with pytest.raises(TrainConfigError, match="lora_per_expert: True in the checkpoint, False now"):
        run_train(dataclasses.replace(shared, resume=out / "step-000001"))


# --- the plan -------------------------------------------------------------------------------------


def test_the_plan_counts_the_second_lora_and_its_optimizer_state(dataset: Path, tmp_path: Path) -> None:
    shared = PlanSettings(rank=4, experts=2, ema_teacher=True)
    planner = Planner(WAN, wan.TINY_TRANSFORMER, StepShape(16, 1, 4, 4, 8, 32), shared)
    one = {c.name: c.device for c in planner.plan().components}
    planner.settings = dataclasses.replace(shared, lora_per_expert=True)
    two = {c.name: c.device for c in planner.plan().components}
    lora = 4 * planner.holdings.lora_parameters
    for name, per_lora in (
        ("LoRA parameters + gradients", 2 * lora),
        ("optimizer state", 2 * lora),
        ("EMA teacher", lora),
    ):
        assert (one[name], two[name]) == (per_lora, 2 * per_lora), name
    assert two["frozen weights"] == one["frozen weights"] and two["second expert"] == one["second expert"]
    assert settings_for(per_expert(dataset, tmp_path), 2).lora_per_expert


# --- torchrun -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_processes_agree_on_which_loras_step(dataset: Path, tmp_path: Path) -> None:
    """Under torchrun each process sees its own batch: at the 0.7 boundary step 2 gives the
    high-noise expert no sample on either process and step 3 one sample on one process only, yet
    both processes step the same LoRAs, and two processes equal one with the same global batch."""
    one = tmp_path / "one"
    accumulating = OptimSettings(learning_rate=1e-3, gradient_accumulation_steps=2)
    run_train(per_expert(dataset, one, max_train_steps=3, timestep_boundary=0.7, optim=accumulating))
    counts = [(r["high_noise_samples"], r["low_noise_samples"]) for r in records(one)]
    assert counts == [(2, 2), (0, 4), (1, 3)]
    two = tmp_path / "two"
    command = [
        sys.executable,
        *words("-m torch.distributed.run --nproc_per_node 2 --master_port 29547 -m masktrain.cli train"),
        *words("--dataset_config {toml} --arch wan --dit tiny --output_dir {out}", toml=dataset, out=two),
        *words(
            "--dit_high_noise tiny --timestep_boundary 0.7 --lora_per_expert --device cpu --max_train_steps 3"
        ),
        *words("--network_dim 4 --network_alpha 4 --learning_rate 1e-3 --use_mask_loss --mask_gamma 0.7"),
        *words("--prior_preservation_weight 1.0 --prior_mask_threshold 0.1 --normalize_per_sample"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [(r["high_noise_samples"], r["low_noise_samples"]) for r in records(two)] == counts
    expected, got = adapter(one / "step-000003"), adapter(two / "step-000003")
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=1e-5)


def test_block_swap_and_the_idle_expert_offload_train_the_same_two_loras(
    dataset: Path, tmp_path: Path
) -> None:
    """Each expert's LoRA stays on the device while its expert's frozen weights come and go
    (``--blocks_to_swap``, ``--offload_inactive_dit``): the same LoRAs as with everything resident."""
    resident, moving = tmp_path / "resident", tmp_path / "moving"
    run_train(per_expert(dataset, resident, max_train_steps=3, gradient_checkpointing=True))
    memory = MemorySettings(blocks_to_swap=1, offload_inactive_dit=True)
    run_train(per_expert(dataset, moving, max_train_steps=3, gradient_checkpointing=True, memory=memory))
    expected, got = adapter(resident / "step-000003"), adapter(moving / "step-000003")
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=0)
