"""--prior_teacher_mode ema: the EMA's arithmetic and swap against the reference's pinned values
(DustyL/blissful-tuner ``tests/test_lora_ema_teacher.py`` @289c641e: fp16 parameters, decay 0.5 and
0.9), its start after step 100 in a real run, and a resumed run that equals an uninterrupted one
(the LoRA and the EMA, bit for bit)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch

from helpers import cached, train_config
from masktrain.config import MaskLossSettings
from masktrain.train.ema_teacher import EmaTeacher
from masktrain.train.loop import run as run_train


def _params(*values: list[float]) -> list[tuple[str, torch.nn.Parameter]]:
    return [(f"p{i}", torch.nn.Parameter(torch.tensor(v, dtype=torch.float16))) for i, v in enumerate(values)]


def test_the_ema_and_its_swap_in_place() -> None:
    named = _params([1.0, 2.0], [3.0])
    ema = EmaTeacher(named, decay=0.5, start_step=0)
    ema.after_step(0)  # starts: a copy of the live weights
    ids = [id(param) for _, param in named]
    with torch.no_grad():
        named[0][1].copy_(torch.tensor([5.0, 6.0]))
        named[1][1].copy_(torch.tensor([7.0]))
    ema.after_step(1)
    with ema.swapped():
        assert named[0][1].tolist() == [3.0, 4.0] and named[1][1].tolist() == [5.0]
        assert [id(param) for _, param in named] == ids and named[0][1].dtype == torch.float16
    assert named[0][1].tolist() == [5.0, 6.0] and named[1][1].tolist() == [7.0]
    with pytest.raises(RuntimeError), ema.swapped():
        raise RuntimeError("in the teacher pass")
    assert named[0][1].tolist() == [5.0, 6.0]  # restored after an error too


def test_the_ema_arithmetic() -> None:
    named = _params([1.0, 2.0])
    ema = EmaTeacher(named, decay=0.9, start_step=0)
    ema.after_step(0)
    with torch.no_grad():
        named[0][1].copy_(torch.tensor([11.0, 21.0]))
    ema.after_step(1)
    assert ema.state()["p0"].tolist() == pytest.approx([2.0, 3.9], abs=1e-3)
    late = EmaTeacher(_params([1.0]), decay=0.9, start_step=100)
    late.after_step(99)
    assert not late.started and late.state() == {}


MASK = MaskLossSettings(
    use_mask_loss=True,
    prior_preservation_weight=1.0,
    prior_mask_threshold=0.1,
    prior_teacher_mode="ema",
    prior_teacher_ema_decay=0.9,
)


@pytest.mark.slow
def test_it_starts_at_step_100_and_a_resume_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    toml = cached(tmp_path / "data", "wan")
    whole, split = tmp_path / "whole", tmp_path / "split"
    run_train(train_config(toml, whole, max_train_steps=104, mask=MASK))
    records = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    # the teacher of step N runs before step N's update; the EMA exists once step 100 has ended
    assert [r["teacher_ema"] for r in records[98:102]] == [0.0, 0.0, 1.0, 1.0]
    run_train(train_config(toml, split, max_train_steps=102, mask=MASK))
    run_train(train_config(toml, split, max_train_steps=104, mask=MASK, resume=split / "step-000102"))
    for name in ("adapter.safetensors", "ema.safetensors"):
        expected = safetensors.torch.load_file(whole / "step-000104" / name)
        got = safetensors.torch.load_file(split / "step-000104" / name)
        assert expected.keys() == got.keys() and expected
        assert all(torch.equal(expected[key], got[key]) for key in expected), name


@pytest.mark.slow
def test_two_processes_hold_the_same_ema_as_one(tmp_path: Path) -> None:
    """Under torchrun every process updates the EMA from the same all-reduced weights: two
    processes end with the EMA one process has with the same global batch (gradient
    accumulation 2), to float rounding."""
    import dataclasses
    import os
    import subprocess
    import sys

    from helpers import words
    from masktrain.config import OptimSettings

    toml = cached(tmp_path / "data", "wan")
    one, two = tmp_path / "one", tmp_path / "two"
    base = train_config(toml, one, max_train_steps=102, mask=MASK)
    run_train(
        dataclasses.replace(base, optim=OptimSettings(learning_rate=1e-3, gradient_accumulation_steps=2))
    )
    command = [
        sys.executable,
        *words("-m torch.distributed.run --nproc_per_node 2 --master_port 29541 -m masktrain.cli train"),
        *words("--dataset_config {toml} --arch wan --dit tiny --output_dir {out}", toml=toml, out=two),
        *words("--device cpu --max_train_steps 102 --network_dim 4 --network_alpha 4 --learning_rate 1e-3"),
        *words("--use_mask_loss --prior_preservation_weight 1.0 --prior_mask_threshold 0.1"),
        *words("--prior_teacher_mode ema --prior_teacher_ema_decay 0.9"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = safetensors.torch.load_file(one / "step-000102" / "ema.safetensors")
    got = safetensors.torch.load_file(two / "step-000102" / "ema.safetensors")
    assert expected.keys() == got.keys() and expected
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=1e-5)
