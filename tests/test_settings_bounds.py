"""Settings that used to pass and then broke a run (issue 10): non-finite floats, unbounded sizes,
a mask folder that is the image folder, undecodable TOML, seeds and devices that no check named.
Each case is refused when the settings are built, with the flag or key in one line."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from masktrain import _native
from masktrain.config import (
    ConvertAlphaConfig,
    MaskLossSettings,
    NetworkSettings,
    TrainConfig,
    load_dataset_config,
)
from masktrain.config.dataset import MAX_FRAMES, MAX_SIDE
from masktrain.errors import ConfigError, FlagError, MaskOptionError, SettingError, TrainConfigError


def toml(tmp_path: Path, text: str, encoding: str = "utf-8") -> Path:
    path = tmp_path / "dataset.toml"
    path.write_bytes(text.encode(encoding))
    return path


# --- item 1: every float flag is finite -------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: NetworkSettings(network_alpha=math.inf), "--network_alpha must be a finite number > 0"),
        (lambda: NetworkSettings(network_alpha=math.nan), "--network_alpha must be a finite number > 0"),
        (lambda: MaskLossSettings(mask_gamma=math.inf), "--mask_gamma must be a finite number, got inf"),
        (
            lambda: MaskLossSettings(use_mask_loss=True, prior_preservation_weight=math.inf),
            "--prior_preservation_weight must be a finite number, got inf",
        ),
        (
            lambda: TrainConfig(Path("d.toml"), "wan", "tiny", Path("out"), timestep_boundary=math.nan),
            "--timestep_boundary must be in range (0, 1)",
        ),
    ],
)
def test_non_finite_floats_are_refused_naming_the_flag(build, message: str) -> None:
    with pytest.raises(SettingError) as raised:
        build()
    assert str(raised.value) == message


def test_the_cli_refuses_an_infinite_network_alpha(tmp_path: Path) -> None:
    path = toml(tmp_path, '[[datasets]]\nimage_directory = "images"\n')
    command = [sys.executable, "-m", "masktrain.cli", "train", "--dataset_config", str(path), "--arch", "wan"]
    command += ["--dit", "tiny", "--output_dir", str(tmp_path / "out"), "--network_alpha", "inf"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "--network_alpha must be a finite number > 0" in result.stderr


def test_a_non_finite_source_fps_is_refused(tmp_path: Path) -> None:
    path = toml(tmp_path, '[[datasets]]\nvideo_directory = "v"\nsource_fps = inf\n')
    with pytest.raises(ConfigError, match="'source_fps' must be a positive number, not inf"):
        load_dataset_config(path)


# --- item 5: a mask folder that is the image folder ---------------------------------------------


def test_a_mask_directory_equal_to_the_image_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    path = toml(tmp_path, '[[datasets]]\nimage_directory = "images"\nmask_directory = "./images/"\n')
    with pytest.raises(
        ConfigError, match="'mask_directory' is the image_directory: every image would be its own mask"
    ):
        load_dataset_config(path)
    with pytest.raises(FlagError, match="--mask_directory is the same as --image_directory"):
        ConvertAlphaConfig(tmp_path / "images", tmp_path / "images" / ".", tmp_path / "out")


def test_convert_alpha_cli_refuses_the_image_folder_as_mask_folder(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    command = [
        sys.executable,
        "-m",
        "masktrain.cli",
        "convert-alpha",
        "--image_directory",
        str(tmp_path / "images"),
    ]
    command += ["--mask_directory", str(tmp_path / "images"), "--output_directory", str(tmp_path / "out")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--mask_directory is the same as --image_directory" in result.stderr
    assert not (tmp_path / "out").exists()


# --- item 10: a TOML that is not UTF-8 ---------------------------------------------------------


def test_a_latin1_toml_names_the_file(tmp_path: Path) -> None:
    path = toml(tmp_path, '# café\n[[datasets]]\nimage_directory = "images"\n', encoding="latin-1")
    with pytest.raises(ConfigError) as raised:
        load_dataset_config(path)
    message = str(raised.value)
    assert message.startswith(f"{path}: not UTF-8 text") and "\n" not in message


# --- item 11: sizes that reach an allocation are bounded ------------------------------------------


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("resolution = 1048576", f"'resolution' 1048576x1048576 must be at most {MAX_SIDE} on each side"),
        ("resolution = [8192, 512]", f"'resolution' 8192x512 must be at most {MAX_SIDE} on each side"),
        ("max_bucket_reso = 100000", f"'max_bucket_reso' must be an integer <= {MAX_SIDE}, not 100000"),
        ("min_bucket_reso = 8", "'min_bucket_reso' must be an integer >= 16, not 8"),
        (
            "bucket_reso_steps = 65536",
            f"'bucket_reso_steps' must be an integer <= {MAX_SIDE}, not 65536",
        ),
    ],
)
def test_image_sizes_are_bounded(tmp_path: Path, line: str, message: str) -> None:
    path = toml(tmp_path, f'[[datasets]]\nimage_directory = "images"\n{line}\n')
    with pytest.raises(ConfigError, match=f": {_escape(message)}"):
        load_dataset_config(path)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("target_frames = [100001]", f"'target_frames' must be a list of integers in [1, {MAX_FRAMES}]"),
        ("max_frames = 1000000", f"'max_frames' must be an integer <= {MAX_FRAMES}, not 1000000"),
    ],
)
def test_frame_counts_are_bounded(tmp_path: Path, line: str, message: str) -> None:
    path = toml(tmp_path, f'[[datasets]]\nvideo_directory = "v"\n{line}\n')
    with pytest.raises(ConfigError, match=_escape(message)):
        load_dataset_config(path)


def test_the_largest_bucket_fits_the_decoders_pixel_limit() -> None:
    assert MAX_SIDE * MAX_SIDE <= _native.DEFAULT_PIXEL_LIMIT


def test_a_huge_resolution_is_an_error_not_an_abort(tmp_path: Path) -> None:
    """The red-team case: resolution = 1048576 used to abort in Rust (SIGABRT, exit 134)."""
    (tmp_path / "images").mkdir()
    path = toml(tmp_path, '[[datasets]]\nimage_directory = "images"\nresolution = 1048576\n')
    command = [sys.executable, "-m", "masktrain.cli", "cache", "--dataset_config", str(path), "--arch", "wan"]
    result = subprocess.run(
        [*command, "--vae", "tiny", "--t5", "tiny"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2, result.stderr
    assert "must be at most 4096 on each side" in result.stderr


# --- item 16: flags no check named ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"seed": 99999999999999999999}, "--seed must be an integer in [0, 2**63), got 99999999999999999999"),
        ({"seed": -1}, "--seed must be an integer in [0, 2**63), got -1"),
        ({"device": "tpu"}, "--device must be cpu, cuda, cuda:N or mps, not 'tpu'"),
    ],
)
def test_seed_and_device_name_the_flag(changes: dict, message: str) -> None:
    with pytest.raises(TrainConfigError) as raised:
        TrainConfig(Path("d.toml"), "wan", "tiny", Path("out"), **changes)
    assert str(raised.value) == message


def test_mask_gamma_messages_stay_the_guides_for_non_positive_values() -> None:
    with pytest.raises(MaskOptionError, match=r"^--mask_gamma must be > 0$"):
        MaskLossSettings(mask_gamma=0.0)


def _escape(text: str) -> str:
    import re

    return re.escape(text)
