"""The three mask commands (``masks tiers | instance | apply-instance``) facing the red team's second
pass: one folder for both apply-instance inputs (N5), decompression bombs (N6) and unreadable photos
(N13) failing one item each while the run goes on, and the temporaries of a killed run removed, a
live run's kept, and the run's lock held on its output folder (N14). Real files, the real commands."""

from __future__ import annotations

import io
import logging
import signal
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from helpers import photo, read_array, save_array, tiered
from masktrain import atomic
from masktrain.cli import main

BOMB_LINE = "image is 100000x100000 = 10000000000 pixels, over the limit"


def _bomb(path: Path) -> Path:
    """A PNG whose header claims 100000 x 100000 grey pixels: a decompression bomb (the report's)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + chunk(b"IEND", b"")
    )
    return path


def _apply(weighted: Path, instance: Path | str, output: Path, *extra: str) -> list[str]:
    return [
        "masks",
        "apply-instance",
        "--weighted-masks",
        str(weighted),
        "--instance-masks",
        str(instance),
        "--output",
        str(output),
        *extra,
    ]


# --- N5: one folder for both apply-instance inputs ------------------------------------------------


@pytest.mark.parametrize("spelling", ["same", "trailing slash", "symlink"])
def test_one_folder_for_both_inputs_is_refused_before_anything_is_written(
    tmp_path: Path, spelling: str
) -> None:
    """Red team N5: --weighted-masks X --instance-masks X cut every mask by itself (hair zeroed), exit 0."""
    save_array(tmp_path / "tiers" / "group_0.png", tiered(32, 48, 0))
    instance = {
        "same": str(tmp_path / "tiers"),
        "trailing slash": f"{tmp_path / 'tiers'}/",
        "symlink": str(tmp_path / "link"),
    }[spelling]
    (tmp_path / "link").symlink_to(tmp_path / "tiers")
    result = CliRunner().invoke(main, _apply(tmp_path / "tiers", instance, tmp_path / "out"))
    assert result.exit_code == 2, result.output
    error = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert error == [
        f"Error: --instance-masks is --weighted-masks ({tmp_path / 'tiers'}): every mask would be cut by "
        "itself; point it at the subject masks (the --output of masktrain masks instance)"
    ]
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


# --- N6: decompression bombs in apply-instance ----------------------------------------------------


def test_apply_instance_fails_a_bomb_mask_alone_and_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Red team N6: a bomb weighted mask was a DecompressionBombError traceback that stopped the run.
    Now a bomb weighted mask, a bomb instance mask and a text file are three failed items, each named
    in one line, and the good mask is written; exit 1."""
    weighted, instance, out = tmp_path / "wm", tmp_path / "inst", tmp_path / "out"
    save_array(weighted / "a.png", tiered(32, 48, 1))
    save_array(weighted / "b.png", tiered(32, 48, 2))
    _bomb(weighted / "bomb.png")
    (weighted / "notes.png").write_text("not an image")
    save_array(instance / "a.png", np.full((32, 48), 255, np.uint8))
    _bomb(instance / "b.png")
    with caplog.at_level(logging.ERROR):
        result = CliRunner().invoke(main, _apply(weighted, instance, out))
    assert result.exit_code == 1, result.output
    assert "1 written (0 copied and 0 zeroed without an instance mask), 0 skipped, 3 failed" in result.output
    assert "Traceback" not in result.output
    assert sorted(p.name for p in out.iterdir()) == ["a.png"]
    assert np.array_equal(read_array(out / "a.png"), tiered(32, 48, 1))
    errors = sorted(r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)
    assert errors[0].startswith(f"failed: {instance / 'b.png'}: {BOMB_LINE}")
    assert errors[1].startswith(f"failed: {weighted / 'bomb.png'}: {BOMB_LINE}")
    assert (
        errors[2]
        == f"failed: {weighted / 'notes.png'}: not a supported image (PNG, JPEG, WebP or BMP expected)"
    )
    assert all("\n" not in line for line in errors)


# --- N6: a bomb --reference in masks instance -----------------------------------------------------


def test_a_bomb_reference_is_a_one_line_flag_error(tmp_path: Path) -> None:
    """Red team N6: --reference bomb.png was a traceback; now exit 2 with one line naming the flag and
    the file, before any model loads or anything is written."""
    save_array(tmp_path / "photos" / "a.png", photo(32, 32, 0))
    reference = _bomb(tmp_path / "reference.png")
    args = ["masks", "instance", "--input", str(tmp_path / "photos"), "--output", str(tmp_path / "out")]
    args += ["--reference", str(reference), "--model", "tiny", "--device", "cpu"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    error = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and error[0].startswith(f"Error: --reference {reference}: {BOMB_LINE}")
    assert error[0].endswith("; pass a photo of the subject's face")
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


# --- N14: a killed run's temporaries, a live run's, and this run's lock ---------------------------

_KILLED = """
import os, signal, sys
from pathlib import Path
from masktrain import atomic
target = Path(sys.argv[1])
with atomic.run_lock(target.parent):
    atomic.temp_path(target).write_bytes(b"half a png")
    os.kill(os.getpid(), signal.SIGKILL)
"""

_LIVE = """
import sys
from pathlib import Path
from masktrain import atomic
target = Path(sys.argv[1])
with atomic.run_lock(target.parent):
    temp = atomic.temp_path(target)
    temp.write_bytes(b"being written")
    print(temp, flush=True)
    sys.stdin.read()
"""


def _killed_mid_write(target: Path) -> list[str]:
    """A real run SIGKILLed while it writes `target`: its temporary and its (unheld) lock file stay;
    their names."""
    before = _hidden(target.parent)
    done = subprocess.run([sys.executable, "-c", _KILLED, str(target)], capture_output=True, timeout=60)
    assert done.returncode == -signal.SIGKILL, done.stderr
    left = sorted(set(_hidden(target.parent)) - set(before))
    assert sorted(name.endswith(atomic.TEMP_SUFFIX) for name in left) == [False, True], left  # and a lock
    return left


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture
def live_run(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """Another run, alive, writing `out/live.png`: (the output folder, its temporary)."""
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    process = subprocess.Popen(
        [sys.executable, "-c", _LIVE, str(out / "live.png")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    temp = Path(process.stdout.readline().strip())
    try:
        yield out, temp
    finally:
        process.communicate("", timeout=60)


class _LockProbe:
    """Wraps a command's ``write_mask``: before each write it notes the folder's hidden files (what
    the run's start-up left of a killed run), then makes a temporary named for this process and runs
    ``atomic.remove_stale_temporaries`` on the folder, as another run's start-up would: the temporary
    survives only if this run holds its lock on the folder."""

    def __init__(self, write_mask: Callable[[Path, np.ndarray], None]) -> None:
        self.write_mask = write_mask
        self.seen: list[list[str]] = []
        self.held: list[bool] = []

    def __call__(self, target: Path, mask: np.ndarray) -> None:
        self.seen.append(_hidden(target.parent))
        probe = atomic.temp_path(target.parent / "probe.png")
        probe.write_bytes(b"")
        atomic.remove_stale_temporaries(target.parent)
        self.held.append(probe.exists())
        probe.unlink(missing_ok=True)
        self.write_mask(target, mask)


@pytest.mark.slow
def test_apply_instance_removes_a_killed_runs_temporaries_and_holds_its_lock(
    tmp_path: Path, live_run: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Red team N14: `.a.png.<run>...masktrain-tmp` of a SIGKILLed run survived every later run. Now
    the next run removes it (and the dead run's lock file), keeps a live run's temporary, and holds
    its own lock while it writes."""
    from masktrain.masks import apply_instance

    out, live_temp = live_run
    save_array(tmp_path / "wm" / "a.png", tiered(16, 16, 0))
    save_array(tmp_path / "inst" / "a.png", np.full((16, 16), 255, np.uint8))
    live = _hidden(out)
    dead = _killed_mid_write(out / "a.png")
    probe = _LockProbe(apply_instance.write_mask)
    monkeypatch.setattr(apply_instance, "write_mask", probe)
    result = CliRunner().invoke(main, _apply(tmp_path / "wm", tmp_path / "inst", out))
    assert result.exit_code == 0, result.output
    assert probe.held == [True] and set(live) <= set(probe.seen[0])
    assert not set(dead) & set(probe.seen[0])  # the dead run's files were gone before the first write
    assert (out / "a.png").is_file() and live_temp.exists()
    assert _hidden(out) == live and live_temp.name in live  # the live run's files kept, the dead one's gone
    assert not set(dead) & set(_hidden(out))


@pytest.mark.slow
def test_tiers_removes_a_killed_runs_temporaries_and_holds_its_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Red team N14, for ``masks tiers``: the report's case, a kill mid-write then `--skip_existing`."""
    from masktrain.masks import tiers

    save_array(tmp_path / "images" / "p01.png", photo(32, 48, 0))
    save_array(tmp_path / "images" / "p02.png", photo(32, 48, 1))
    out = tmp_path / "out"
    out.mkdir()
    save_array(out / "p01.png", np.zeros((32, 48), np.uint8))  # done before the kill
    dead = _killed_mid_write(out / "p02.png")
    probe = _LockProbe(tiers.write_mask)
    monkeypatch.setattr(tiers, "write_mask", probe)
    args = ["masks", "tiers", "--input", str(tmp_path / "images"), "--output", str(out), "--model", "tiny"]
    result = CliRunner().invoke(main, [*args, "--device", "cpu", "--skip_existing"])
    assert result.exit_code == 0, result.output
    assert "1 mask(s) written, 1 skipped (existing), 0 failed" in result.output
    assert probe.held == [True] and not set(dead) & set(probe.seen[0])
    assert sorted(p.name for p in out.iterdir()) == ["p01.png", "p02.png"]  # no temporary, no lock file


# --- N6, N13 and N14 in masks instance (dlib and a tiny Mask2Former: seconds) -------------------


@pytest.mark.slow
def test_instance_fails_unreadable_photos_alone_and_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Red team N13 (a text file named .png, a truncated JPEG) and N6 (a bomb photo): each stopped the
    whole run before any mask. Now each is one failed item named in one line, the group photo gets
    its mask, the summary counts them, exit 1; a killed run's temporary is gone (N14)."""
    skimage_data = pytest.importorskip("skimage.data")
    from masktrain.masks import instance

    astronaut, camera = skimage_data.astronaut(), np.stack([skimage_data.camera()] * 3, -1)
    photos, out = tmp_path / "photos", tmp_path / "out"
    save_array(photos / "group.jpg", np.concatenate([astronaut, camera], axis=1))
    (photos / "a_text.png").write_text("notes, not a photo")
    jpeg = io.BytesIO()
    Image.fromarray(astronaut).save(jpeg, format="JPEG")
    (photos / "cut.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    _bomb(photos / "bomb.png")
    save_array(tmp_path / "reference.png", astronaut[40:240, 120:320])
    out.mkdir()
    dead = _killed_mid_write(out / "group.png")
    probe = _LockProbe(instance.write_mask)
    monkeypatch.setattr(instance, "write_mask", probe)
    args = ["masks", "instance", "--input", str(photos), "--output", str(out), "--model", "tiny"]
    args += ["--reference", str(tmp_path / "reference.png"), "--person_threshold", "0", "--device", "cpu"]
    with caplog.at_level(logging.ERROR):
        result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    assert "1 mask(s) written (0 empty), 0 skipped (existing); 3 failed, 1 matched" in result.output
    assert "Traceback" not in result.output
    assert sorted(p.name for p in out.iterdir()) == ["group.png"] and probe.held == [True]
    assert not set(dead) & set(probe.seen[0])
    assert set(np.unique(read_array(out / "group.png"))) == {0, 255}
    errors = sorted(r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)
    assert (
        errors[0]
        == f"failed: {photos / 'a_text.png'}: not a supported image (PNG, JPEG, WebP or BMP expected)"
    )
    assert errors[1].startswith(f"failed: {photos / 'bomb.png'}: {BOMB_LINE}")
    assert errors[2].startswith(f"failed: {photos / 'cut.jpg'}: cannot decode image, the file is truncated")
    assert len(errors) == 3


_NO_CAPS = ["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--"]  # root without DAC override


@pytest.mark.slow
def test_a_read_only_output_folder_is_still_one_line(tmp_path: Path) -> None:
    """The run lock is the first thing written into the output folder: a folder that cannot be
    written stays one line naming it (it was the first mask's), exit 1, no traceback."""
    if subprocess.run([*_NO_CAPS, "true"], capture_output=True).returncode != 0:
        pytest.skip("cannot drop capabilities here (setpriv)")
    save_array(tmp_path / "wm" / "a.png", tiered(16, 16, 0))
    save_array(tmp_path / "inst" / "a.png", np.full((16, 16), 255, np.uint8))
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o555)
    try:
        command = [
            *_NO_CAPS,
            sys.executable,
            "-m",
            "masktrain.cli",
            *_apply(tmp_path / "wm", tmp_path / "inst", out),
        ]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    finally:
        out.chmod(0o755)
    assert done.returncode == 1, done.stderr
    assert done.stderr.splitlines()[-1] == f"Error: cannot write {out}: Permission denied"
    assert "Traceback" not in done.stderr and not list(out.iterdir())
