"""`masktrain train` end to end on the tiny models: output tree, LoRA keys, metrics, the banner
and the fatal mask check, resume equal to an uninterrupted run, Ctrl-C, WAN 2.2's two experts,
and two processes under torchrun equal to one process with the same global batch."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from helpers import (
    MASKED_PRIOR_SETTINGS_KWARGS,
    cached,
    make_dataset,
    masktrain_command,
    train_config,
    wait_for_steps,
    words,
)
from masktrain.config import MaskLossSettings, MemorySettings, OptimSettings
from masktrain.models import get_family
from masktrain.train.build import build_experts
from masktrain.train.loop import run as run_train

MASKED_PRIOR = MaskLossSettings(**MASKED_PRIOR_SETTINGS_KWARGS)


@pytest.fixture(scope="module")
def wan_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return cached(tmp_path_factory.mktemp("wan"), "wan")


config = train_config


def adapter(folder: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(folder / "adapter.safetensors")


@pytest.mark.parametrize("arch", ["wan", "qwen_image"])
def test_train_writes_lora_checkpoints_and_metrics(arch: str, tmp_path: Path, wan_dataset: Path) -> None:
    toml = wan_dataset if arch == "wan" else cached(tmp_path / "data", arch)
    out = tmp_path / "out"
    lora_path = run_train(config(toml, out, arch, max_train_steps=4, save_every_n_steps=2))

    assert lora_path == out / "lora.safetensors"
    steps = sorted(p.name for p in out.iterdir() if p.name.startswith("step-"))
    assert steps == ["step-000002", "step-000004"]
    for name in ("adapter.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "state.json"):
        assert (out / "step-000004" / name).is_file()
    with safetensors.safe_open(lora_path, "pt") as handle:
        keys, metadata = list(handle.keys()), handle.metadata()
    assert all(key.startswith("diffusion_model.") for key in keys)
    assert any(key.endswith(".lora_A.weight") for key in keys) and any(key.endswith(".alpha") for key in keys)
    if arch == "wan":
        assert "diffusion_model.blocks.0.self_attn.q.lora_A.weight" in keys
    assert metadata["masktrain.arch"] == arch and metadata["masktrain.rank"] == "4"
    assert metadata["masktrain.use_mask_loss"] == "true"

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for record in records:
        assert np.isfinite(record["loss"]) and record["loss"] > 0
        assert {"loss_face", "loss_body", "loss_background", "prior_loss", "lr", "data_wait"} <= set(record)
    # The LoRA moved away from its zero-initialised B.
    assert any(t.abs().max() > 0 for k, t in adapter(out / "step-000004").items() if "lora_B" in k)


def test_resume_continues_to_the_same_result(tmp_path: Path, wan_dataset: Path) -> None:
    straight = tmp_path / "straight"
    run_train(config(wan_dataset, straight, max_train_steps=6, save_every_n_steps=3))
    resumed = tmp_path / "resumed"
    run_train(config(wan_dataset, resumed, max_train_steps=6, resume=straight / "step-000003"))

    expected, got = adapter(straight / "step-000006"), adapter(resumed / "step-000006")
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=0)
    records = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [4, 5, 6]


def test_prior_preservation_with_gradient_checkpointing(tmp_path: Path, wan_dataset: Path) -> None:
    plain = tmp_path / "plain"
    run_train(config(wan_dataset, plain, max_train_steps=2))
    checkpointed = tmp_path / "checkpointed"
    run_train(config(wan_dataset, checkpointed, max_train_steps=2, gradient_checkpointing=True))
    expected, got = adapter(plain / "step-000002"), adapter(checkpointed / "step-000002")
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-5, rtol=0)
    records = [json.loads(line) for line in (checkpointed / "metrics.jsonl").read_text().splitlines()]
    # Step 1: LoRA B starts at zero, so student == teacher; then the prior term is live.
    assert records[0]["prior_loss"] == 0 and records[1]["prior_loss"] > 0


def test_wan22_two_experts_share_one_lora(tmp_path: Path, wan_dataset: Path) -> None:
    single, dual = tmp_path / "single", tmp_path / "dual"
    run_train(config(wan_dataset, single, max_train_steps=2))
    run_train(config(wan_dataset, dual, max_train_steps=2, dit_high_noise="tiny", timestep_boundary=0.5))
    assert adapter(dual / "step-000002").keys() == adapter(single / "step-000002").keys()
    # Both experts hold the very same LoRA parameters (one LoRA, trained by either expert).
    cfg = config(wan_dataset, tmp_path / "unused", dit_high_noise="tiny")
    experts = build_experts(cfg, get_family("wan"), torch.device("cpu"), torch.float32)
    assert experts.high is not None
    low = {n: p for n, p in experts.low.named_parameters() if "lora_" in n}
    high = {n: p for n, p in experts.high.named_parameters() if "lora_" in n}
    assert low and low.keys() == high.keys() and all(low[n] is high[n] for n in low)


def test_use_mask_loss_without_cached_masks_is_fatal(tmp_path: Path) -> None:
    toml = cached(tmp_path / "data", "wan", masks=False)
    with pytest.raises(ValueError, match="FATAL: --use_mask_loss is enabled but batch has no mask_weights!"):
        run_train(config(toml, tmp_path / "out", max_train_steps=1))


def test_uncached_dataset_names_the_command_to_run(tmp_path: Path) -> None:
    toml = make_dataset(tmp_path / "data")
    with pytest.raises(ValueError, match="run masktrain cache"):
        run_train(config(toml, tmp_path / "out"))


def _cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "masktrain.cli", "train", *args], capture_output=True, text=True, **kwargs
    )


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--use_mask_loss", "--mask_gamma", "0"], "--mask_gamma must be > 0"),
        (["--use_mask_loss", "--mask_min_weight", "1"], "--mask_min_weight must be in range [0, 1)"),
        (["--use_mask_loss", "--prior_preservation_weight", "-1"], "prior_preservation_weight must be >= 0"),
        (
            ["--use_mask_loss", "--prior_mask_threshold", "1.5"],
            "prior_mask_threshold must be in range (0, 1)",
        ),
        (["--network_args", "bogus=1"], "--network_args 'bogus' is not supported"),
    ],
)
def test_cli_rejects_bad_flags_with_exit_code_2(flags: list[str], message: str, tmp_path: Path) -> None:
    toml = make_dataset(tmp_path / "data")
    result = _cli(
        *words(
            "--dataset_config {toml} --arch wan --dit tiny --output_dir {out}",
            toml=toml,
            out=tmp_path / "out",
        ),
        *flags,
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr


@pytest.mark.slow
def test_cli_prints_the_banner_and_ctrl_c_saves_a_checkpoint(tmp_path: Path, wan_dataset: Path) -> None:
    out = tmp_path / "out"
    prior = "--prior_preservation_weight 1.0 --prior_mask_threshold 0.1 --normalize_per_sample"
    command = masktrain_command(
        "train --dataset_config {toml} --arch wan --dit tiny --output_dir {out} --device cpu "
        f"--max_train_steps 100000 --use_mask_loss --mask_gamma 0.7 {prior}",
        toml=wan_dataset,
        out=out,
    )
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_steps(process, out / "metrics.jsonl", 2)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "MASKED PRIOR PRESERVATION TRAINING ENABLED" in stdout
    assert "resume with --resume" in stderr
    steps = sorted(p for p in out.iterdir() if p.name.startswith("step-"))
    assert len(steps) == 1
    state = json.loads((steps[0] / "state.json").read_text())
    assert state["step"] == int(steps[0].name.removeprefix("step-")) >= 2


# The 24 GB path (fp8 base, block swap, activation offload) under torchrun too.
MEMORY_FLAGS = (
    "--gradient_checkpointing --fp8_base --fp8_scaled --blocks_to_swap 1 --gradient_checkpointing_cpu_offload"
)
MEMORY_PATH = MemorySettings(
    fp8_base=True, fp8_scaled=True, blocks_to_swap=1, gradient_checkpointing_cpu_offload=True
)


@pytest.mark.slow
@pytest.mark.parametrize("memory_path", [False, True], ids=["bf16", "fp8-swap-offload"])
def test_two_processes_equal_one_process_with_the_same_global_batch(
    tmp_path: Path, wan_dataset: Path, memory_path: bool
):
    one = tmp_path / "one"
    base = config(wan_dataset, one, max_train_steps=2)
    if memory_path:
        base = dataclasses.replace(base, gradient_checkpointing=True, memory=MEMORY_PATH)
    accumulating = OptimSettings(learning_rate=1e-3, gradient_accumulation_steps=2)
    run_train(dataclasses.replace(base, optim=accumulating))
    two = tmp_path / "two"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat --w 32 --h 32 --f 5 --s 2 --d 3\na dog --w 32 --h 32 --s 2\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        *words(
            "-m torch.distributed.run --nproc_per_node 2 --master_port {port} -m masktrain.cli train",
            port=29531 + memory_path,
        ),
        *words("--dataset_config {toml} --arch wan --dit tiny --output_dir {out}", toml=wan_dataset, out=two),
        *words("--device cpu --max_train_steps 2 --network_dim 4 --network_alpha 4 --learning_rate 1e-3"),
        *words("--use_mask_loss --mask_gamma 0.7 --prior_preservation_weight 1.0 --prior_mask_threshold 0.1"),
        "--normalize_per_sample",
        *(words(MEMORY_FLAGS) if memory_path else []),
        # rank 0 samples (the fp8 + block swap model, forward-only) while rank 1 waits at a barrier
        *words(
            "--vae tiny --t5 tiny --sample_prompts {p} --sample_at_first --sample_every_n_steps 1", p=prompts
        ),
    ]
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("sampled 2 prompt(s) at step") == 3  # steps 0, 1, 2; rank 0 only
    samples = sorted(path.name for path in (two / "sample").iterdir())
    assert samples == sorted(
        [f"lora_{s:06d}_{n}" for s in range(3) for n in ("00_3.mp4", "00_3_middle.png", "01_43.png")]
        + ["lora_contact_sheet.html"]
    )
    # sampling leaves training as it was: the LoRA equals the one-process run's (which did not sample)
    expected, got = adapter(one / "step-000002"), adapter(two / "step-000002")
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=1e-5)
