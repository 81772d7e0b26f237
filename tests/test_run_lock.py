"""One run per folder (issue 21): a second ``train`` into a folder a live run holds is refused,
naming the holder; torchrun workers end with their launcher; run ids that two containers (each
command pid 1) cannot share."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import cached, masktrain_command, train_config, wait_for_steps, words
from masktrain import atomic
from masktrain.errors import TrainConfigError
from masktrain.train.loop import run as run_train


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return cached(tmp_path_factory.mktemp("data"))


# --- N4: one run per output folder ---------------------------------------------------------------

HOLDER = """
import sys, time
from pathlib import Path
from masktrain import atomic
with atomic.run_lock(Path(sys.argv[1]), owner="train"):
    print("locked", flush=True)
    time.sleep(600)
"""


def test_a_train_into_a_held_output_dir_is_refused_naming_the_holder_before_any_load(
    dataset: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        missing_dit = str(tmp_path / "missing.safetensors")  # a check after loading would name it
        for overwrite in (False, True):
            with pytest.raises(TrainConfigError) as raised:
                run_train(train_config(dataset, out, dit=missing_dit, overwrite=overwrite))
            message = str(raised.value)
            assert message.startswith(
                f"--output_dir {out} is being written by masktrain train (pid {holder.pid} on host "
                f"{socket.gethostname()}, since "
            )
            assert message.endswith(
                "): one run per output folder; wait for it to end (or stop it), or choose another "
                "--output_dir"
            )
            assert "\n" not in message
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()
    run_train(train_config(dataset, out, max_train_steps=1))  # its lock died with it
    assert (out / "step-000001").is_dir()
    assert not list(out.glob(".masktrain-*.lock"))  # a finished run leaves no lock file


@pytest.mark.slow
def test_a_second_train_into_a_live_runs_folder_exits_2_and_names_it(dataset: Path, tmp_path: Path) -> None:
    """The red-team case: a run resumed twice into one folder. The second is refused (exit 2, one
    line, the first's pid and host), before it loads anything; the first trains on untouched."""
    out = tmp_path / "out"
    run_train(train_config(dataset, out, max_train_steps=1))
    line = (
        "train --dataset_config {toml} --arch wan --dit {dit} --output_dir {out} --device cpu "
        "--network_dim 4 --network_alpha 4 --max_train_steps 100000 --save_every_n_steps 100000 "
        "--resume {resume}"
    )
    first = subprocess.Popen(
        masktrain_command(line, toml=dataset, dit="tiny", out=out, resume=out / "step-000001"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_steps(first, out / "metrics.jsonl", 3)
        command = masktrain_command(
            line, toml=dataset, dit=tmp_path / "missing.safetensors", out=out, resume=out / "step-000001"
        )
        second = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr
        assert "Traceback" not in second.stderr and "training wan" not in second.stderr
        expected = (
            f"Error: --output_dir {out} is being written by masktrain train (pid {first.pid} on host "
            f"{socket.gethostname()}, since "
        )
        assert expected in second.stderr
        assert first.poll() is None  # still training
    finally:
        first.send_signal(signal.SIGTERM)
        _, stderr = first.communicate(timeout=120)
    assert first.returncode == 130, stderr[-2000:]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1))  # one writer: no step twice


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_torchrun_workers_stop_when_their_launcher_is_killed(dataset: Path, tmp_path: Path) -> None:
    """The red-team case: ``kill -9`` of the torchrun launcher. Its workers (each in a session of
    its own) get ``LAUNCHER_DIED`` from the kernel (once per launcher thread: no abort), save a
    checkpoint after their step and exit, and the folder is free for the next run."""
    out = tmp_path / "out"
    command = [
        sys.executable,
        *words("-m torch.distributed.run --nproc_per_node 2 --master_port 29557 -m masktrain.cli train"),
        *words("--dataset_config {toml} --arch wan --dit tiny --output_dir {out}", toml=dataset, out=out),
        *words("--device cpu --max_train_steps 100000 --save_every_n_steps 100000"),
    ]
    log_file = tmp_path / "torchrun.log"
    with log_file.open("w") as sink:
        launcher = subprocess.Popen(
            command, stdout=sink, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"}
        )
    workers: list[int] = []
    try:
        wait_for_steps(launcher, out / "metrics.jsonl", 2, timeout=300)
        workers = _children(launcher.pid)
        assert len(workers) == 2, log_file.read_text()[-3000:]
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        deadline = time.monotonic() + 120
        while any(_running(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not any(_running(pid) for pid in workers), log_file.read_text()[-3000:]
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        for pid in workers:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
    text = log_file.read_text()
    assert "the torchrun launcher died: saving a checkpoint after this step" in text, text[-3000:]
    assert "Aborted" not in text, text[-3000:]
    assert "interrupted; resume with --resume" in text, text[-3000:]
    assert list(out.glob("step-*")) and atomic.owner(out) is None


# --- N17: run ids across pid namespaces ----------------------------------------------------------


def _unshare_refused() -> str | None:
    try:
        result = subprocess.run(["unshare", "-rpf", "--mount-proc", "true"], capture_output=True, timeout=30)
    except OSError as error:
        return str(error)
    return None if result.returncode == 0 else result.stderr.decode(errors="replace").strip()


_NO_PID_NAMESPACE = _unshare_refused()
needs_pid_namespace = pytest.mark.skipif(
    _NO_PID_NAMESPACE is not None, reason=f"no private pid namespace here: {_NO_PID_NAMESPACE}"
)
IN_NAMESPACE = ["unshare", "-rpf", "--kill-child", "--mount-proc", sys.executable, "-c"]

CONTAINER_A = """
import os, sys, time
from pathlib import Path
from masktrain import atomic
folder = Path(sys.argv[1])
with atomic.run_lock(folder):
    atomic.temp_path(folder / "a.safetensors").write_bytes(b"live")
    print(os.getpid(), atomic.RUN_ID, flush=True)
    time.sleep(600)
"""
CONTAINER_B = """
import os, sys
from pathlib import Path
from masktrain import atomic
folder = Path(sys.argv[1])
with atomic.run_lock(folder):
    removed = atomic.remove_stale_temporaries(folder)
print(os.getpid(), atomic.RUN_ID, removed, flush=True)
"""


@needs_pid_namespace
def test_two_pid_1_runs_in_one_folder_keep_apart(tmp_path: Path) -> None:
    """The red-team case: two containers, each running its command as pid 1, share a folder. The
    second neither waits on the first's lock nor removes its lock file or live temporaries."""
    a = subprocess.Popen([*IN_NAMESPACE, CONTAINER_A, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert a.stdout is not None
        pid_a, run_a = a.stdout.readline().split()
        b = subprocess.run(
            [*IN_NAMESPACE, CONTAINER_B, str(tmp_path)], capture_output=True, text=True, timeout=60
        )
        assert b.returncode == 0, b.stderr
        pid_b, run_b, removed = b.stdout.split()
        assert (pid_a, pid_b) == ("1", "1") and run_a != run_b
        assert run_a.startswith("1_") and run_b.startswith("1_")
        assert removed == "0"
        assert (tmp_path / f".masktrain-run.{run_a}.lock").exists()  # B's exit left A's lock alone
        (live,) = tmp_path.glob(f".a.safetensors.{run_a}-1.*{atomic.TEMP_SUFFIX}")
        assert atomic.remove_stale_temporaries(tmp_path) == 0  # a third run: A is live
    finally:
        a.send_signal(signal.SIGKILL)
        a.wait()
        if a.stdout is not None:
            a.stdout.close()
    deadline = time.monotonic() + 30  # the kernel ends A (unshare's --kill-child) right after unshare
    while live.exists() and time.monotonic() < deadline:
        atomic.remove_stale_temporaries(tmp_path)
        time.sleep(0.1)
    assert not live.exists()  # A is gone now


def test_the_run_id_is_the_pid_and_a_tag_of_host_boot_and_namespace() -> None:
    pid, tag = atomic.RUN_ID.split("_")
    assert pid == str(os.getpid()) and len(tag) == 8 and int(tag, 16) >= 0
