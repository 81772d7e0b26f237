"""Runs that stop half-way (issue 21; one run per folder is ``test_run_lock.py``): a top-level LoRA
that always ends up the newest checkpoint's;
a damaged ``state.json`` refused before any model loads; the temporaries of ``sample``; SIGHUP;
the warnings of a teacher gate that lets nothing through and of a resume that changes the
teacher."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors
from click.testing import CliRunner

from helpers import cached, masktrain_command, train_config, wait_for_steps, words
from masktrain import atomic
from masktrain.cli import main
from masktrain.config import MaskLossSettings
from masktrain.config.mask_loss import validate
from masktrain.config.sample import SampleSettings
from masktrain.errors import TrainConfigError
from masktrain.train.loop import run as run_train


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return cached(tmp_path_factory.mktemp("data"))


def lora_step(path: Path) -> str:
    with safetensors.safe_open(path, "pt") as handle:
        return str((handle.metadata() or {})["masktrain.step"])


SAMPLE_HOLDER = """
import sys, time
from pathlib import Path
from masktrain import atomic
with atomic.run_lock(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(600)
"""
"""A live run's lock on the folder in argv[1] (as ``masktrain sample`` holds OUTPUT_DIR/sample)."""


def dead_temporary(folder: Path, name: str) -> Path:
    """A temporary as a killed run leaves it (its run holds no lock)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f".{name}.999999_0badc0de-999999.1{atomic.TEMP_SUFFIX}"
    path.write_bytes(b"half a file")
    return path


# --- N3: the top-level LoRA is the newest checkpoint's -------------------------------------------


def test_a_resume_of_a_complete_run_repairs_a_stale_top_level_lora(
    dataset: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The red-team case: a kill after ``step-000002/`` was renamed into place and before the
    top-level copy was written leaves ``lora.safetensors`` of step 1; resuming the complete run
    puts step 2's in its place, says so, and trains nothing."""
    out = tmp_path / "out"
    run_train(train_config(dataset, out, max_train_steps=2, save_every_n_steps=1))
    shutil.copyfile(out / "step-000001" / "lora.safetensors", out / "lora.safetensors")
    metrics = (out / "metrics.jsonl").read_text()
    with caplog.at_level(logging.INFO):
        run_train(train_config(dataset, out, max_train_steps=2, resume=out / "step-000002"))
    assert (out / "lora.safetensors").read_bytes() == (out / "step-000002" / "lora.safetensors").read_bytes()
    assert lora_step(out / "lora.safetensors") == "2"
    (repaired,) = [r for r in caplog.records if "replaced it with" in r.getMessage()]
    assert repaired.levelno == logging.WARNING
    assert repaired.getMessage() == (
        f"{out / 'lora.safetensors'} was the LoRA of step 1, not the LoRA of the newest checkpoint "
        f"step-000002 (a run stopped between writing the two): replaced it with "
        f"{out / 'step-000002' / 'lora.safetensors'}"
    )
    assert "already complete at step 2" in caplog.text
    assert (out / "metrics.jsonl").read_text() == metrics
    assert sorted(p.name for p in out.glob("step-*")) == ["step-000001", "step-000002"]


def test_a_resume_of_an_older_checkpoint_leaves_the_top_level_lora(dataset: Path, tmp_path: Path) -> None:
    """Only the newest checkpoint's copy is the truth: resuming an older one (to train it again)
    does not put its LoRA at the top level."""
    out = tmp_path / "out"
    run_train(train_config(dataset, out, max_train_steps=2, save_every_n_steps=1))
    newest = (out / "lora.safetensors").read_bytes()
    run_train(train_config(dataset, out, max_train_steps=1, resume=out / "step-000001"))  # complete
    assert (out / "lora.safetensors").read_bytes() == newest


# --- B14: a state.json without its fields --------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "what"),
    [
        ({"step": 1}, "state.json has no 'epoch', 'batches_done'"),
        (
            {"step": 1, "epoch": 0, "batches_done": "2"},
            "state.json: 'batches_done' is '2', not a whole number",
        ),
        ([1, 0, 0], "state.json holds list, not an object"),
    ],
)
def test_a_state_json_without_its_fields_is_refused_before_the_model_loads(
    dataset: Path, tmp_path: Path, state: object, what: str
) -> None:
    out = tmp_path / "out"
    run_train(train_config(dataset, out, max_train_steps=1))
    folder = out / "step-000001"
    (folder / "state.json").write_text(json.dumps(state))
    missing_dit = str(tmp_path / "missing.safetensors")  # a check after loading would name it instead
    with pytest.raises(TrainConfigError) as raised:
        run_train(train_config(dataset, out, dit=missing_dit, max_train_steps=2, resume=folder))
    assert str(raised.value).startswith(f"--resume {folder}: damaged checkpoint (ValueError: {what}")
    assert "\n" not in str(raised.value)


# --- N14: the temporaries of sample, and samples a stopped run left missing ----------------------


def test_train_removes_the_temporaries_killed_runs_left_in_its_sample_folder(
    dataset: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    stale = dead_temporary(out / "sample", "lora_000008_00_42.png")
    top = dead_temporary(out, "lora.safetensors")
    run_train(train_config(dataset, out, max_train_steps=1))
    assert not stale.exists() and not top.exists()


def _sample_command(prompts: Path, out: Path, lora: Path | None = None) -> list[str]:
    line = (
        "sample --arch wan --dit tiny --vae tiny --t5 tiny --device cpu --sample_prompts {p} --output_dir {o}"
    )
    return words(line, p=prompts, o=out) + (["--lora", str(lora)] if lora else [])


def test_masktrain_sample_removes_dead_temporaries_and_keeps_live_ones(tmp_path: Path) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat --w 32 --h 32 --s 2 --d 1\n")
    out = tmp_path / "out"
    stale = dead_temporary(out / "sample", "lora_000008_00_42.png")
    holder = subprocess.Popen(
        [sys.executable, "-c", SAMPLE_HOLDER, str(out / "sample")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        (run,) = [
            p.name[len(".masktrain-run.") : -len(".lock")] for p in (out / "sample").glob(".masktrain-run.*")
        ]
        live = out / "sample" / f".base_000003_00_1.png.{run}-{holder.pid}.7{atomic.TEMP_SUFFIX}"
        live.write_bytes(b"being written")
        result = CliRunner().invoke(main, _sample_command(prompts, out))
        assert result.exit_code == 0, result.output
        assert not stale.exists() and live.exists()
        assert (out / "sample" / "base_000000_00_1.png").is_file()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()


@pytest.mark.slow
def test_masktrain_sample_holds_a_run_lock_on_its_folder(tmp_path: Path) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat --w 32 --h 32 --s 400 --d 1\n")
    out = tmp_path / "out"
    process = subprocess.Popen(
        masktrain_command(" ".join(_sample_command(prompts, out))), stderr=subprocess.PIPE, text=True
    )
    held = False
    try:
        deadline = time.monotonic() + 180
        while process.poll() is None and time.monotonic() < deadline and not held:
            for path in (out / "sample").glob(".masktrain-run.*.lock"):
                descriptor = os.open(path, os.O_RDONLY)
                try:
                    fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
                except BlockingIOError:
                    held = True
                finally:
                    os.close(descriptor)
            time.sleep(0.05)
    finally:
        _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-2000:]
    assert held
    assert not list((out / "sample").glob(".masktrain-run.*"))  # let go of at the end


def test_a_complete_resume_names_the_command_that_draws_missing_last_samples(
    dataset: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A kill while the last samples were drawn leaves them missing; the resume of the complete
    run says so, with a ``masktrain sample`` command that draws exactly those files."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat --w 32 --h 32 --s 2 --d 1\na dog --w 32 --h 32 --s 2\n")
    out = tmp_path / "out"
    sampling = SampleSettings(sample_prompts=prompts, vae="tiny", text_encoder="tiny")
    run_train(train_config(dataset, out, max_train_steps=2, sample=sampling))
    drawn = {p.name: p.read_bytes() for p in (out / "sample").glob("lora_000002_*")}
    assert sorted(drawn) == ["lora_000002_00_1.png", "lora_000002_01_43.png"]
    (out / "sample" / "lora_000002_01_43.png").unlink()
    with caplog.at_level(logging.INFO):
        run_train(train_config(dataset, out, max_train_steps=2, sample=sampling, resume=out / "step-000002"))
    (warning,) = [r for r in caplog.records if "samples of step 2 are missing" in r.getMessage()]
    assert warning.levelno == logging.WARNING
    text = warning.getMessage()
    assert text.startswith("the samples of step 2 are missing for 1 of 2 prompt(s) (a run stopped while ")
    command = shlex.split(text.split("draw them with: masktrain ", 1)[1])
    result = CliRunner().invoke(main, [*command, "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert (out / "sample" / "lora_000002_01_43.png").read_bytes() == drawn["lora_000002_01_43.png"]


# --- W8: SIGHUP saves like SIGTERM ---------------------------------------------------------------


def _long_run(dataset: Path, out: Path, **popen: object) -> subprocess.Popen[str]:
    command = masktrain_command(
        "train --dataset_config {toml} --arch wan --dit tiny --output_dir {out} --device cpu "
        "--max_train_steps 100000",
        toml=dataset,
        out=out,
    )
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


@pytest.mark.slow
def test_sighup_saves_a_checkpoint_and_exits_130(dataset: Path, tmp_path: Path) -> None:
    """A closed SSH session (SIGHUP) stops the run as SIGTERM does: a checkpoint, exit 130."""
    out = tmp_path / "out"
    process = _long_run(dataset, out)
    wait_for_steps(process, out / "metrics.jsonl", 2)
    process.send_signal(signal.SIGHUP)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    assert "SIGHUP: saving a checkpoint after this step" in stderr
    assert "resume with --resume" in stderr and len(list(out.glob("step-*"))) == 1


@pytest.mark.slow
def test_under_nohup_sighup_stays_ignored(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    process = _long_run(dataset, out, preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    wait_for_steps(process, out / "metrics.jsonl", 2)
    process.send_signal(signal.SIGHUP)
    wait_for_steps(process, out / "metrics.jsonl", 4)  # trains on
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130 and "SIGHUP" not in stderr


# --- W3: a teacher gate that lets nothing through warns ------------------------------------------

GATED = dict(
    use_mask_loss=True, prior_preservation_weight=1.0, prior_mask_threshold=0.1, normalize_per_sample=True
)


def test_a_gate_at_timestep_1000_warns_that_the_prior_does_nothing(
    dataset: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    expected = (
        "--prior_preservation_timestep_threshold 1000: no timestep is above it (timesteps run 0..1000), so "
        "the teacher never runs and prior preservation does nothing; lower it (300, say) or leave it unset"
    )
    assert expected in validate(MaskLossSettings(**GATED, prior_preservation_timestep_threshold=1000))
    assert not any(
        "no timestep is above" in w
        for w in validate(MaskLossSettings(**GATED, prior_preservation_timestep_threshold=999))
    )
    mask = MaskLossSettings(**GATED, prior_preservation_timestep_threshold=1000)
    with caplog.at_level(logging.INFO):
        run_train(train_config(dataset, tmp_path / "out", max_train_steps=1, mask=mask))
    assert [r.levelno for r in caplog.records if r.getMessage() == expected] == [logging.WARNING]


def test_a_gate_that_skips_nearly_every_teacher_pass_warns(
    dataset: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    mask = MaskLossSettings(**GATED, prior_preservation_timestep_threshold=999.5)
    with caplog.at_level(logging.INFO):
        run_train(train_config(dataset, tmp_path / "out", max_train_steps=1, mask=mask))
    (line,) = [r for r in caplog.records if r.getMessage().startswith("teacher gating at timestep 999.5")]
    assert line.levelno == logging.WARNING
    assert line.getMessage().endswith(
        "prior preservation does almost nothing: lower --prior_preservation_timestep_threshold"
    )
    caplog.clear()
    mask = MaskLossSettings(**GATED, prior_preservation_timestep_threshold=300)
    with caplog.at_level(logging.INFO):
        run_train(train_config(dataset, tmp_path / "out2", max_train_steps=1, mask=mask))
    (line,) = [r for r in caplog.records if r.getMessage().startswith("teacher gating at timestep 300")]
    assert line.levelno == logging.INFO  # a gate that lets samples through stays an info line


# --- W6: a resume that changes the prior teacher -------------------------------------------------

EMA = MaskLossSettings(**GATED, prior_teacher_mode="ema", prior_teacher_ema_decay=0.9)
BASE = MaskLossSettings(**GATED)


@pytest.mark.parametrize(
    ("before", "after", "expected"),
    [
        (
            EMA,
            BASE,
            "that run's prior teacher was the EMA of the LoRA (--prior_teacher_mode ema), this run's is "
            "the base model: the EMA had not started yet; pass --prior_teacher_mode ema with the prior "
            "flags it had to keep the EMA teacher",
        ),
        (
            BASE,
            EMA,
            "that run's prior teacher was the base model, this run's is the EMA of the LoRA "
            "(--prior_teacher_mode ema): the EMA starts at step 100, as in a run that had it from the start",
        ),
    ],
    ids=["ema-to-base", "base-to-ema"],
)
def test_a_resume_that_changes_the_teacher_says_so(
    dataset: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    before: MaskLossSettings,
    after: MaskLossSettings,
    expected: str,
) -> None:
    out = tmp_path / "out"
    run_train(train_config(dataset, out, max_train_steps=1, mask=before))
    with caplog.at_level(logging.WARNING):
        run_train(train_config(dataset, out, max_train_steps=2, mask=after, resume=out / "step-000001"))
    (line,) = [r.getMessage() for r in caplog.records if "prior teacher" in r.getMessage()]
    assert line == f"--resume {out / 'step-000001'}: {expected}"
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # the same teacher again: no word
        run_train(train_config(dataset, out, max_train_steps=3, mask=after, resume=out / "step-000002"))
    assert "prior teacher" not in caplog.text


@pytest.mark.slow
def test_a_resume_that_drops_a_started_ema_teacher_says_what_is_lost(
    dataset: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "out"
    run_train(train_config(dataset, out, max_train_steps=100, mask=EMA))
    assert (out / "step-000100" / "ema.safetensors").is_file()
    with caplog.at_level(logging.WARNING):
        run_train(train_config(dataset, out, max_train_steps=101, mask=BASE, resume=out / "step-000100"))
    assert (
        f"--resume {out / 'step-000100'}: that run's prior teacher was the EMA of the LoRA "
        "(--prior_teacher_mode ema), this run's is the base model: its EMA weights (ema.safetensors) are not "
        "used and later checkpoints will not hold them;"
    ) in caplog.text
    assert not (out / "step-000101" / "ema.safetensors").exists()
    caplog.clear()
    other = tmp_path / "other"
    run_train(train_config(dataset, other, max_train_steps=100, mask=BASE))
    with caplog.at_level(logging.WARNING):
        run_train(train_config(dataset, other, max_train_steps=101, mask=EMA, resume=other / "step-000100"))
    assert (
        "the EMA starts as a copy of the LoRA of step 100, not as an average since step 100, so this run "
        "will differ from one that had the EMA teacher from the start"
    ) in caplog.text
