"""Files that cannot be read or written (issue 10): missing and unreadable dataset paths, captions
and output folders are one line and exit 2 before any model loads; a disk that fills up mid-run
is one line naming the file, a summary and exit 1, with nothing half-written; a second run never
removes a live run's temporaries.

CI runs as root, where permission bits do nothing: the permission cases run the command with
every capability dropped (``setpriv``, still uid 0, so the interpreter stays readable), and the
disk-full cases on a small tmpfs in a private mount namespace (``unshare``). Where the kernel
refuses either, the tests skip and say why."""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import cache_tiny, cached, make_dataset, masktrain_command, train_config
from masktrain import atomic
from masktrain.errors import ModelLoadError
from masktrain.models import get_family
from masktrain.train.loop import run as run_train


def _works(command: list[str]) -> str | None:
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except OSError as error:
        return str(error)
    return None if result.returncode == 0 else (result.stderr.strip() or f"exit {result.returncode}")


_NO_CAPS = ["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--"]
_NO_CAPS_REFUSED = _works([*_NO_CAPS, "true"])
_UNSHARE_REFUSED = _works(["unshare", "-rm", "true"])
needs_no_caps = pytest.mark.skipif(
    _NO_CAPS_REFUSED is not None, reason=f"cannot drop capabilities here: {_NO_CAPS_REFUSED}"
)
needs_tmpfs = pytest.mark.skipif(
    _UNSHARE_REFUSED is not None, reason=f"no private mount namespace here: {_UNSHARE_REFUSED}"
)


def run(command: list[str], *, no_caps: bool = False) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*(_NO_CAPS if no_caps else []), *command], capture_output=True, text=True, timeout=300
    )


def cache_command(root: Path) -> list[str]:
    return masktrain_command(
        "cache --dataset_config {toml} --arch wan --vae tiny --t5 tiny --device cpu",
        toml=root / "dataset.toml",
    )


def assert_setting_error(result: subprocess.CompletedProcess[str], *words: str) -> None:
    """Exit 2, one line naming the problem, and nothing loaded (no model, no traceback)."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "caching 1 dataset" not in result.stderr
    for word in words:
        assert word in result.stderr, result.stderr


# --- item 12: dataset paths, captions, output folders --------------------------------------------


@pytest.mark.slow
def test_a_missing_image_folder_is_one_line_before_any_load(tmp_path: Path) -> None:
    root = tmp_path / "data"
    make_dataset(root)
    (root / "dataset.toml").write_text((root / "dataset.toml").read_text().replace('"images"', '"gone"'))
    assert_setting_error(run(cache_command(root)), "'image_directory'", "gone: no such folder")
    train = masktrain_command(
        "train --dataset_config {toml} --arch wan --dit tiny --output_dir {out}",
        toml=root / "dataset.toml",
        out=tmp_path / "o",
    )
    assert_setting_error(run(train), "'image_directory'", "no such folder")


@pytest.mark.slow
@needs_no_caps
@pytest.mark.parametrize(
    ("target", "mode", "words"),
    [
        ("images", 0o000, ("'image_directory'", "cannot be read (permission denied)")),
        ("images", 0o644, ("'image_directory'", "can be listed but not searched")),
        ("masks", 0o000, ("'mask_directory'", "cannot be read")),
        ("images/item1.txt", 0o000, ("item1.txt: cannot read the caption file",)),
        ("cache", 0o555, ("'cache_directory'", "not writable (permission denied)")),
    ],
)
def test_unreadable_inputs_and_a_read_only_cache_folder(
    tmp_path: Path, target: str, mode: int, words: tuple
) -> None:
    root = tmp_path / "data"
    make_dataset(root)
    (root / "cache").mkdir()
    os.chmod(root / target, mode)
    try:
        assert_setting_error(run(cache_command(root), no_caps=True), *words)
    finally:
        os.chmod(root / target, 0o755)


@pytest.mark.slow
@needs_no_caps
def test_a_read_only_output_folder_is_one_line_before_any_load(tmp_path: Path) -> None:
    toml = cached(tmp_path / "data")
    out = tmp_path / "out"
    out.mkdir()
    os.chmod(out, 0o555)
    try:
        command = masktrain_command(
            "train --dataset_config {toml} --arch wan --dit tiny --output_dir {out}", toml=toml, out=out
        )
        assert_setting_error(run(command, no_caps=True), "--output_dir", "not writable (permission denied)")
    finally:
        os.chmod(out, 0o755)


# --- item 10: captions that are not UTF-8 ------------------------------------------------------


@pytest.mark.slow
def test_a_latin1_caption_names_the_file_and_how_to_convert_it(tmp_path: Path) -> None:
    root = tmp_path / "data"
    make_dataset(root)
    (root / "images" / "item2.txt").write_bytes("un café au lait".encode("latin-1"))
    assert_setting_error(run(cache_command(root)), "item2.txt: not UTF-8 text", "iconv -f latin1 -t utf-8")


# --- item 8: a disk that fills up -------------------------------------------------------------------


def on_small_disk(folder: Path, size: str, command: list[str]) -> subprocess.CompletedProcess[str]:
    """Run `command` with `folder` on a `size` tmpfs, then list what is left in it."""
    folder.mkdir(parents=True, exist_ok=True)
    script = f"mount -t tmpfs -o size={size} tmpfs {shlex.quote(str(folder))} && {shlex.join(command)}; "
    script += f'echo "exit=$?"; ls -a {shlex.quote(str(folder))}'
    return subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@needs_tmpfs
def test_a_full_disk_during_cache_is_a_summary_and_exit_1(tmp_path: Path) -> None:
    root = tmp_path / "data"
    make_dataset(root, count=6)
    result = on_small_disk(root / "cache", "20k", cache_command(root))
    assert "exit=1" in result.stdout, result.stderr
    assert "No space left on device" in result.stderr and "cannot write " in result.stderr
    assert "items, mask sources" in result.stderr and "failed" in result.stderr  # the summary line
    assert "Traceback" not in result.stderr
    assert "masktrain-tmp" not in result.stdout  # nothing half-written left in the folder


@pytest.mark.slow
@needs_tmpfs
def test_a_full_disk_during_train_is_one_line_and_exit_1(tmp_path: Path) -> None:
    toml = cached(tmp_path / "data")
    out = tmp_path / "out"
    command = masktrain_command(
        "train --dataset_config {toml} --arch wan --dit tiny --output_dir {out} --device cpu "
        "--max_train_steps 2 --network_dim 64",
        toml=toml,
        out=out,
    )
    result = on_small_disk(out, "64k", command)
    assert "exit=1" in result.stdout, result.stderr
    assert "Error: cannot write " in result.stderr and "No space left on device" in result.stderr
    assert "Traceback" not in result.stderr and "basic_ios" not in result.stderr
    assert "masktrain-tmp" not in result.stdout


# --- item 15: a live run's temporaries survive another run's start-up --------------------------------


HOLDER = """
import sys, time
from pathlib import Path
from masktrain import atomic
atomic.set_run_id("777")
with atomic.run_lock(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(600)
"""


def test_cleanup_removes_only_temporaries_of_runs_that_are_gone(tmp_path: Path) -> None:
    live_file = tmp_path / ".a.safetensors.777-4242.1.masktrain-tmp"
    live_folder = tmp_path / ".step-000001.777.masktrain-tmp"
    dead_file = tmp_path / ".b.safetensors.555-555.1.masktrain-tmp"
    native = tmp_path / ".c.png.555.ThreadId3.masktrain-tmp"  # the native writer's, run = its pid
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        live_file.write_bytes(b"live")
        live_folder.mkdir()
        dead_file.write_bytes(b"dead")
        native.write_bytes(b"dead")
        (tmp_path / ".masktrain-run.555.lock").write_bytes(b"")  # a killed run's lock file, unheld
        assert atomic.remove_stale_temporaries(tmp_path) == 2
        assert live_file.exists() and live_folder.exists()
        assert not dead_file.exists() and not native.exists()
        assert not (tmp_path / ".masktrain-run.555.lock").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()
    assert atomic.remove_stale_temporaries(tmp_path) == 2  # its run is gone now
    assert not live_file.exists() and not live_folder.exists()


@pytest.mark.slow
def test_a_second_cache_run_leaves_the_first_runs_temporaries_alone(tmp_path: Path) -> None:
    root = tmp_path / "data"
    make_dataset(root, count=24)
    first = subprocess.Popen([*cache_command(root), "--batch_size", "1"], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while first.poll() is None and time.monotonic() < deadline:  # the start-up of many later runs
        atomic.remove_stale_temporaries(root / "cache")
        time.sleep(0.001)
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-3000:]
    assert "24 items" in stderr and "0 failed" in stderr


# --- files get normal permissions; pickles are never loaded ------------------------------------------


def test_cache_and_checkpoint_files_get_normal_permissions(tmp_path: Path) -> None:
    previous = os.umask(0o022)
    try:
        toml = cached(tmp_path / "data")
        run_train(train_config(toml, tmp_path / "out", max_train_steps=1))
    finally:
        os.umask(previous)
    files = [*(tmp_path / "data" / "cache").iterdir(), *(tmp_path / "out" / "step-000001").iterdir()]
    files.append(tmp_path / "out" / "lora.safetensors")
    assert {oct(path.stat().st_mode & 0o777) for path in files} == {oct(0o644)}


def test_a_folder_with_only_pickled_weights_is_refused(tmp_path: Path) -> None:
    family = get_family("wan")
    vae = family.load_vae("tiny", torch.device("cpu"), torch.float32)
    vae.save_pretrained(tmp_path / "vae", safe_serialization=False)  # diffusion_pytorch_model.bin only
    assert not list((tmp_path / "vae").glob("*.safetensors"))
    with pytest.raises(ModelLoadError, match=r"^--vae .*vae: no \.safetensors weights .*pickle"):
        family.load_vae(str(tmp_path / "vae"), torch.device("cpu"), torch.float32)


# --- captions longer than the text encoder takes are counted -----------------------------------------


def test_captions_longer_than_the_encoder_takes_are_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "data"
    make_dataset(root, count=2)
    (root / "images" / "item1.txt").write_text("a very long caption " * 200)
    with caplog.at_level(logging.WARNING):
        (summary,) = cache_tiny(root)
    assert summary.truncated_captions == 1
    assert "1 captions are longer than the text encoder takes and were truncated" in caplog.text
    assert json.dumps(summary.line())  # the summary line itself is unchanged in shape
