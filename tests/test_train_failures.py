"""How ``masktrain train`` fails (issue 10): a diverging run stops before it saves anything
non-finite, a resume that cannot work says why in one line, a finished run is not trained past
its end, and what is knowable at start-up is checked at start-up."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

from helpers import cache_tiny, cached, make_dataset, masktrain_command, train_config, wait_for_steps, words
from masktrain.config import MaskLossSettings, NetworkSettings, OptimSettings
from masktrain.errors import (
    MissingMaskWeightsError,
    TrainConfigError,
    TrainingDivergedError,
)
from masktrain.train.loop import run as run_train

DIVERGING = OptimSettings(learning_rate=1e4, max_grad_norm=0.0)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return cached(tmp_path_factory.mktemp("data"))


def all_finite(folder: Path) -> bool:
    files = sorted(folder.rglob("*.safetensors"))
    assert files
    return all(torch.isfinite(t).all() for f in files for t in safetensors.torch.load_file(f).values())


# --- item 1: non-finite loss or gradients stop the run -------------------------------------------


def test_a_diverging_run_stops_before_saving_anything_non_finite(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    config = train_config(dataset, out, max_train_steps=20, save_every_n_steps=1, optim=DIVERGING)
    with pytest.raises(TrainingDivergedError) as raised:
        run_train(config)
    message = str(raised.value)
    step = int(re.search(r"diverged at step (\d+):", message)[1])  # type: ignore[index]
    assert 1 <= step <= 20
    assert "_wan.safetensors" in message and "non-finite" in message  # names the batch's cache files
    saved = sorted(p.name for p in out.glob("step-*"))
    assert saved == [f"step-{s:06d}" for s in range(1, step)]  # every good step, nothing after
    assert all_finite(out)


def test_the_grad_norm_is_checked_without_clipping_too(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """max_grad_norm 0 turns clipping off, not the check: a finite loss whose gradient is
    infinite in one LoRA weight (injected with a gradient hook) still stops the run."""
    import masktrain.train.loop as loop

    real = loop.build_experts

    def poisoned(*args: Any, **kwargs: Any) -> Any:
        experts = real(*args, **kwargs)
        first = next(p for p in experts.low.parameters() if p.requires_grad)
        first.register_hook(lambda grad: torch.full_like(grad, math.inf))
        return experts

    monkeypatch.setattr(loop, "build_experts", poisoned)
    config = train_config(
        dataset, tmp_path / "out", max_train_steps=3, optim=OptimSettings(max_grad_norm=0.0)
    )
    with pytest.raises(TrainingDivergedError, match=r"step 1: .*gradient norm inf"):
        run_train(config)
    assert not list((tmp_path / "out").glob("step-*"))


@pytest.mark.slow
def test_a_diverging_torchrun_stops_every_process(dataset: Path, tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        *words("-m torch.distributed.run --nproc_per_node 2 --master_port 29541 -m masktrain.cli train"),
        *words(
            "--dataset_config {toml} --arch wan --dit tiny --output_dir {out}",
            toml=dataset,
            out=tmp_path / "o",
        ),
        *words(
            "--device cpu --max_train_steps 20 --learning_rate 1e4 --max_grad_norm 0 --save_every_n_steps 1"
        ),
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode != 0
    assert "non-finite" in result.stderr
    assert all_finite(tmp_path / "o")


def test_a_diverging_run_exits_1_with_one_line(dataset: Path, tmp_path: Path) -> None:
    command = masktrain_command(
        "train --dataset_config {toml} --arch wan --dit tiny --output_dir {out} --device cpu "
        "--max_train_steps 20 --learning_rate 1e4 --max_grad_norm 0",
        toml=dataset,
        out=tmp_path / "out",
    )
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr
    assert "Error: training diverged at step" in result.stderr and "Traceback" not in result.stderr


def test_a_corrupt_cache_file_is_named_not_trained_on(tmp_path: Path) -> None:
    """The red-team case: 400 bytes of 0xFF written into a cache file's tensor data."""
    toml = cached(tmp_path / "data")
    victim = sorted((tmp_path / "data" / "cache").glob("item0_*_wan.safetensors"))[0]
    data = bytearray(victim.read_bytes())
    data[-400:] = b"\xff" * 400
    victim.write_bytes(bytes(data))
    with pytest.raises(Exception) as raised:
        run_train(train_config(toml, tmp_path / "out", max_train_steps=4))
    assert victim.name in str(raised.value) and "non-finite" in str(raised.value)
    assert not list((tmp_path / "out").glob("step-*"))


# --- item 6: a finished run is not trained past its end ------------------------------------------


def test_resuming_a_finished_run_trains_nothing(
    dataset: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "out"
    run_train(train_config(dataset, out, max_train_steps=2))
    lora = (out / "lora.safetensors").read_bytes()
    metrics = (out / "metrics.jsonl").read_text()
    with caplog.at_level(logging.INFO):
        run_train(train_config(dataset, out, max_train_steps=2, resume=out / "step-000002"))
    assert "already complete" in caplog.text
    assert (out / "lora.safetensors").read_bytes() == lora
    assert (out / "metrics.jsonl").read_text() == metrics
    assert sorted(p.name for p in out.glob("step-*")) == ["step-000002"]
    # A larger --max_train_steps continues, as users expect.
    run_train(train_config(dataset, out, max_train_steps=3, resume=out / "step-000002"))
    assert sorted(p.name for p in out.glob("step-*")) == ["step-000002", "step-000003"]


# --- item 7: a torn metrics line does not block a resume -----------------------------------------


def test_a_torn_metrics_line_is_dropped_on_resume(
    dataset: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "out"
    run_train(train_config(dataset, out, max_train_steps=2))
    with (out / "metrics.jsonl").open("a") as file:
        file.write('{"step": 3, "lo')  # disk full during an append
    with caplog.at_level(logging.WARNING):
        run_train(train_config(dataset, out, max_train_steps=3, resume=out / "step-000002"))
    assert "torn" in caplog.text
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


# --- item 9: datasets without masks are refused at start-up --------------------------------------


def test_mask_loss_on_a_cache_without_masks_fails_before_any_model_loads(tmp_path: Path) -> None:
    masked = cached(tmp_path / "masked")
    plain_root = tmp_path / "plain"
    make_dataset(plain_root, masks=False)
    toml = tmp_path / "both.toml"
    masked_root = masked.parent
    toml.write_text(
        "[general]\nresolution = [64, 64]\nbatch_size = 2\n\n"
        f'[[datasets]]\nimage_directory = "{masked_root}/images"\nmask_directory = "{masked_root}/masks"\n'
        f'cache_directory = "{masked_root}/cache"\n\n'
        f'[[datasets]]\nimage_directory = "{plain_root}/images"\ncache_directory = "{plain_root}/cache"\n'
    )
    cache_tiny(tmp_path, dataset_config=toml)
    config = train_config(toml, tmp_path / "out", dit=str(tmp_path / "missing.safetensors"))
    with pytest.raises(MissingMaskWeightsError) as raised:
        run_train(config)  # the dit does not exist: a check after loading would say so instead
    assert "[[datasets]] #2" in str(raised.value) and "FATAL" in str(raised.value)


# --- item 13: a resume that cannot work says why -------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"network": NetworkSettings(network_dim=8, network_alpha=4.0)},
            "network_dim: 4 in the checkpoint, 8 now",
        ),
        (
            {"network": NetworkSettings(network_dim=4, network_alpha=2.0)},
            "network_alpha: 4.0 in the checkpoint, 2.0 now",
        ),
        (
            {"network": NetworkSettings(network_dim=4, network_alpha=4.0, exclude_patterns=(".*ffn.*",))},
            "exclude_patterns: None in the checkpoint, ['.*ffn.*'] now",
        ),
        ({"arch": "qwen_image"}, "arch: 'wan' in the checkpoint, 'qwen_image' now"),
    ],
)
def test_resume_with_other_lora_settings_names_them(
    dataset: Path, tmp_path: Path, changes: dict, message: str
) -> None:
    out = tmp_path / "out"
    run_train(train_config(dataset, out, max_train_steps=1))
    with pytest.raises(TrainConfigError) as raised:
        run_train(train_config(dataset, out, max_train_steps=2, resume=out / "step-000001", **changes))
    assert message in str(raised.value) and "\n" not in str(raised.value)
    assert str(raised.value).startswith(f"--resume {out / 'step-000001'}: ")


@pytest.mark.parametrize("damage", ["adapter.safetensors", "optimizer.pt", "config.json", "garbage"])
def test_resume_from_a_damaged_checkpoint_says_what_is_wrong(
    dataset: Path, tmp_path: Path, damage: str
) -> None:
    out = tmp_path / "out"
    run_train(train_config(dataset, out, max_train_steps=1))
    folder = out / "step-000001"
    if damage == "garbage":
        (folder / "adapter.safetensors").write_bytes(b"not a safetensors file")
    else:
        (folder / damage).unlink()
    with pytest.raises(TrainConfigError, match=rf"^--resume {folder}: "):
        run_train(train_config(dataset, out, max_train_steps=2, resume=folder))


def test_resume_may_change_steps_cadence_and_logging(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_train(train_config(dataset, out, max_train_steps=1))
    run_train(train_config(dataset, out, max_train_steps=2, save_every_n_steps=5, resume=out / "step-000001"))
    assert (out / "step-000002").is_dir()


# --- a new run does not mix with another run's checkpoints ---------------------------------------


def test_a_new_run_into_a_folder_with_checkpoints_is_refused_unless_overwrite(
    dataset: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    run_train(train_config(dataset, out, max_train_steps=2))
    with pytest.raises(
        TrainConfigError, match=r"holds the checkpoints of a run \(step-000002\).*--resume .*--overwrite"
    ):
        run_train(train_config(dataset, out, max_train_steps=1))
    run_train(train_config(dataset, out, max_train_steps=1, overwrite=True))
    assert sorted(p.name for p in out.glob("step-*")) == ["step-000001"]


# --- item 16: an all-zero mask batch is named ----------------------------------------------------


def test_an_all_zero_mask_batch_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "data"
    toml = make_dataset(root, count=2)
    for mask in (root / "masks").iterdir():
        Image.fromarray(np.zeros((64, 64), np.uint8)).save(mask)
    cache_tiny(root)
    settings = MaskLossSettings(use_mask_loss=True, mask_min_weight=0.0)
    with caplog.at_level(logging.WARNING):
        run_train(train_config(toml, tmp_path / "out", max_train_steps=1, mask=settings))
    assert "All-zero mask weights detected" in caplog.text and "item" in caplog.text


# --- SIGTERM saves like Ctrl-C --------------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_130(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    command = masktrain_command(
        "train --dataset_config {toml} --arch wan --dit tiny --output_dir {out} --device cpu "
        "--max_train_steps 100000",
        toml=dataset,
        out=out,
    )
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_steps(process, out / "metrics.jsonl", 2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "resume with --resume" in stderr
    assert len(list(out.glob("step-*"))) == 1


def test_config_json_records_the_run(dataset: Path, tmp_path: Path) -> None:
    """The resume comparison reads the checkpoint's config.json: it must hold the LoRA settings."""
    out = tmp_path / "out"
    config = train_config(dataset, out, max_train_steps=1)
    run_train(config)
    saved = json.loads((out / "step-000001" / "config.json").read_text())
    assert saved["network"] == json.loads(json.dumps(dataclasses.asdict(config.network), default=list))
    assert saved["arch"] == "wan"
