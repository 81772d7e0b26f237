"""The memory benchmark runs end to end: ``benches/bench_memory.py --tiny --quick`` (tiny WAN
configs, the CPU plan's two modes and the fp8 single-file load test) prints a row with a finite
step time for each mode."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODES = ("bf16, ckpt, masked", "fp8+swap1, ckpt+offload, prior")


@pytest.mark.slow
def test_bench_memory_tiny_quick(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "benches/bench_memory.py", "--tiny", "--quick", "--data", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    for mode in MODES:
        row = [line for line in lines if mode in line]
        assert len(row) == 1, f"no single row for {mode!r} in:\n{result.stdout}"
        # columns after the mode: load GiB, step GiB, step s, ...
        numbers = row[0].split(mode, 1)[1].split()
        assert "not run" not in row[0], row[0]
        assert all(math.isfinite(float(value)) for value in numbers[:3]), row[0]
    assert "fp8 single-file load (" in result.stdout and "not run" not in result.stdout
