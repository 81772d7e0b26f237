#!/usr/bin/env bash
# The project's test command (README, .ci/run): installs what the tests need, then runs every
# gate -- rustfmt, clippy, cargo test, ruff, mypy --strict, stubtest, pytest (all of it, the
# slow tests included; `python -m pytest tests -m "not slow"` is the quick loop). Needs a Rust toolchain and
# Python >= 3.11 with pip; everything else comes from crates.io and PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."

export MATURIN_NO_INSTALL_RUST=1   # never try to download a toolchain
export HF_HUB_OFFLINE=1            # tests never touch the network

step() { printf '\n== %s\n' "$*"; }

step "install masktrain with its test extras (release build of the native module)"
python -m pip install --quiet --disable-pip-version-check '.[test]'

step "cargo fmt --check"
cargo fmt --all --check

step "cargo clippy -D warnings"
cargo clippy --all-targets --locked -- -D warnings

step "cargo test"
cargo test --workspace --locked

step "ruff"
ruff check python tests benches scripts
ruff format --check python tests benches scripts

step "mypy --strict python/masktrain (settings in pyproject.toml)"
python -m mypy

step "mypy.stubtest masktrain._native"
python -m mypy.stubtest masktrain._native

step "headless Chromium for the inspect page test (Debian's, installed when running as root)"
if command -v chromium >/dev/null 2>&1; then
    chromium --version
elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    { apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 \
        || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1; }; } \
        && chromium --version || echo "could not install chromium: the browser test will skip"
else
    echo "not root (or no apt-get): the inspect browser test skips; install chromium to run it"
fi

step "pytest"
# Run from tests/ against the installed wheel, not the source tree's python/ folder.
python -m pytest tests
