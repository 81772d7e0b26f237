"""Names and paths a dataset or a flag can hold that masktrain cannot use, each reported in one
line, never a traceback: an image whose file name is not UTF-8 (one failed item in ``cache``, an
item not ready in ``train``, one line in ``inspect``), a ``~user`` path of a user this machine
does not have (exit 2 naming the key), an ``image_directory`` without a supported image (exit 2
saying so, not ``0 items``), and a ``--device`` the ``masks`` commands cannot use (exit 2)."""

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from helpers import cache_tiny, cached, make_dataset, photo, train_config, words
from masktrain.cli import main
from masktrain.config.inspect import InspectConfig
from masktrain.data.cached_items import find_cached_items
from masktrain.errors import CachedDataError
from masktrain.inspect.page import run as run_inspect
from masktrain.train.loop import run as run_train

NOT_UTF8 = "the file name is not valid UTF-8; rename it"
NO_USER = "~masktrain_no_such_user"
COMMANDS = {
    "cache": "cache --dataset_config {t} --arch wan --vae tiny --t5 tiny --device cpu",
    "train": "train --dataset_config {t} --arch wan --dit tiny --device cpu --output_dir {o}",
    "inspect": "inspect --dataset_config {t} --output_dir {o}",
}


def latin1_item(root: Path) -> Path:
    """A Latin-1 named copy of item3 (name bytes ``bad\\xff.png``) with its mask and caption."""
    name = os.fsdecode(b"bad\xff.png")
    try:
        (root / "images" / name).write_bytes((root / "images" / "item3.png").read_bytes())
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system takes only UTF-8 names")
    (root / "masks" / name).write_bytes((root / "masks" / "item3.png").read_bytes())
    (root / "images" / os.fsdecode(b"bad\xff.txt")).write_text("a photo")
    return root / "images" / name


# --- N7: a file name that is not UTF-8 ------------------------------------------------------------


def test_cache_fails_only_the_item_whose_name_is_not_utf8(tmp_path: Path) -> None:
    toml = cached(tmp_path)
    bad = latin1_item(tmp_path)
    (summary,) = cache_tiny(tmp_path)
    assert (summary.items, summary.skipped, summary.written) == (5, 4, 0)
    assert summary.failed == [(bad, NOT_UTF8)]
    result = CliRunner().invoke(main, words(COMMANDS["cache"], t=toml))
    assert result.exit_code == 1, result.output  # the run goes on; a failed item is exit 1


def test_train_names_the_item_and_skip_stale_trains_without_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    toml = cached(tmp_path)
    bad = latin1_item(tmp_path)
    cache_tiny(tmp_path)
    ready = f"{bad} (cannot be cached: {NOT_UTF8})"
    with pytest.raises(CachedDataError, match="1 item") as error:
        find_cached_items(toml, "wan")
    assert f"1 item(s) not ready for training: {ready}; run masktrain cache" in str(error.value)
    caplog.set_level(logging.WARNING)
    run_train(train_config(toml, tmp_path / "out", max_train_steps=1, skip_stale=True))
    assert f"--skip_stale: leaving out 1 item(s) not ready for training: {ready}" in caplog.text
    assert (tmp_path / "out" / "lora.safetensors").is_file()


def test_inspect_lists_the_item_in_one_line(tmp_path: Path) -> None:
    toml = cached(tmp_path)
    bad = latin1_item(tmp_path)
    out = tmp_path / "inspect"
    (report,) = run_inspect(InspectConfig(toml, output_dir=out))
    assert report.failed == [f"{bad} (cannot be cached: {NOT_UTF8})"]
    assert [item.name for item in report.items] == [f"item{i}.png" for i in range(4)]
    assert json.loads((out / "summary.json").read_text())["datasets"][0]["failed"] == report.failed
    assert (
        "bad\\udcff.png (cannot be cached: the file name is not valid UTF-8"
        in (out / "index.html").read_text()
    )


# --- B12: ~user paths -----------------------------------------------------------------------------


def toml_with(root: Path, **keys: str) -> Path:
    values = {"image_directory": "images", "mask_directory": "masks", "cache_directory": "cache", **keys}
    lines = "\n".join(f'{key} = "{value}"' for key, value in values.items())
    path = root / "ds.toml"
    path.write_text(f"[general]\nresolution = 64\n\n[[datasets]]\n{lines}\n")
    return path


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("key", ["image_directory", "mask_directory", "cache_directory", "caption_directory"])
def test_a_home_folder_of_no_user_is_one_line_naming_the_key(tmp_path: Path, command: str, key: str) -> None:
    toml = toml_with(tmp_path, **{key: f"{NO_USER}/x"})
    result = CliRunner().invoke(main, words(COMMANDS[command], t=toml, o=tmp_path / "out"))
    assert result.exit_code == 2, result.output
    assert result.output.splitlines()[-1] == (
        f"Error: {toml}: [[datasets]] #1: '{key}' {NO_USER}/x: {NO_USER} names no home folder on this "
        "machine; write the full path"
    )


def test_a_jsonl_image_path_of_no_user_names_the_line(tmp_path: Path) -> None:
    (tmp_path / "items.jsonl").write_text(
        '{"image_path": "a.png", "caption": "a"}\n' + f'{{"image_path": "{NO_USER}/b.png", "caption": "b"}}\n'
    )
    toml = tmp_path / "ds.toml"
    toml.write_text(
        '[general]\nresolution = 64\n[[datasets]]\nimage_jsonl_file = "items.jsonl"\ncache_directory = "c"\n'
    )
    result = CliRunner().invoke(main, words(COMMANDS["cache"], t=toml))
    assert result.exit_code == 2, result.output
    assert result.output.splitlines()[-1] == (
        f"Error: {tmp_path / 'items.jsonl'}:2: 'image_path' {NO_USER}/b.png: {NO_USER} names no home "
        "folder on this machine; write the full path"
    )


def test_inspect_vae_of_no_user_is_one_line(tmp_path: Path) -> None:
    toml = make_dataset(tmp_path)
    result = CliRunner().invoke(main, words(f"inspect --dataset_config {{t}} --vae {NO_USER}/vae", t=toml))
    assert result.exit_code == 2, result.output
    assert result.output.splitlines()[-1] == (
        f"Error: --vae {NO_USER}/vae: {NO_USER} names no home folder on this machine; write the full path"
    )


@pytest.mark.parametrize(
    ("command", "flag", "value"),
    [
        ("cache --dataset_config {t} --arch wan --vae {v} --t5 tiny --device cpu", "--vae", "x.safetensors"),
        ("cache --dataset_config {t} --arch wan --vae tiny --t5 {v} --device cpu", "--t5", "t5"),
        ("train --dataset_config {t} --arch wan --dit {v} --device cpu --output_dir {o}", "--dit", "dit"),
    ],
)
def test_a_model_flag_of_no_user_is_one_line(tmp_path: Path, command: str, flag: str, value: str) -> None:
    toml = make_dataset(tmp_path)
    if command.startswith("train"):
        cache_tiny(tmp_path)
    spec = f"{NO_USER}/{value}"
    result = CliRunner().invoke(main, words(command, t=toml, o=tmp_path / "out", v=spec))
    assert result.exit_code == 2, result.output
    assert result.output.splitlines()[-1] == (
        f"Error: {flag} {spec}: {NO_USER} names no home folder on this machine; write the full path"
    )


# --- B13 / W12: a folder without a supported image ------------------------------------------------


@pytest.mark.parametrize("command", ["cache", "train"])
def test_a_folder_of_gif_and_tiff_files_says_no_supported_image(tmp_path: Path, command: str) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.gif", "b.tiff", "c.tif", "d.TIF"):
        Image.fromarray(photo(64, 64, 0)).save(images / name)
    (images / "a.txt").write_text("a photo")
    toml = toml_with(tmp_path)
    (tmp_path / "masks").mkdir()
    result = CliRunner().invoke(main, words(COMMANDS[command], t=toml, o=tmp_path / "out"))
    assert result.exit_code == 2, result.output
    assert result.output.splitlines()[-1] == (
        f"Error: {toml}: [[datasets]] #1: 'image_directory' {images}: no supported image was found there "
        "(masktrain reads .png, .jpg, .jpeg, .webp, .bmp files directly in the folder; found 2 .tif, "
        "1 .gif, 1 .tiff, 1 .txt); convert the images to PNG or point the key at the folder that holds them"
    )
    assert not (tmp_path / "cache").exists()


def test_an_empty_image_folder_says_it_found_nothing(tmp_path: Path) -> None:
    (tmp_path / "images" / "nested").mkdir(parents=True)
    Image.fromarray(photo(64, 64, 0)).save(tmp_path / "images" / "nested" / "a.png")
    toml = toml_with(tmp_path)
    (tmp_path / "masks").mkdir()
    result = CliRunner().invoke(main, words(COMMANDS["inspect"], t=toml, o=tmp_path / "out"))
    assert result.exit_code == 2, result.output
    assert result.output.splitlines()[-1].endswith(
        "no supported image was found there (masktrain reads .png, .jpg, .jpeg, .webp, .bmp files "
        "directly in the folder; found 1 sub-folder(s)); convert the images to PNG or point the key at "
        "the folder that holds them"
    )


# --- N15: --device of the masks commands ----------------------------------------------------------


def _masks_args(tmp_path: Path, command: str) -> list[str]:
    (tmp_path / "photos").mkdir(exist_ok=True)
    Image.fromarray(photo(64, 64, 0)).save(tmp_path / "photos" / "p.png")
    args = ["masks", command, "--input", str(tmp_path / "photos"), "--output", str(tmp_path / "out")]
    if command == "instance":
        args += ["--reference", str(tmp_path / "photos" / "p.png")]
    return [*args, "--model", "tiny"]


@pytest.mark.parametrize("command", ["tiers", "instance"])
@pytest.mark.parametrize(
    "device, line",
    [
        ("tpu", "Error: --device must be cpu, cuda, cuda:N or mps, not 'tpu'"),
        ("xla", "Error: --device must be cpu, cuda, cuda:N or mps, not 'xla'"),
        ("cuda", "Error: --device cuda: no CUDA device is available on this machine"),
        ("cuda:1", "Error: --device cuda:1: no CUDA device is available on this machine"),
    ],
)
def test_masks_device_is_one_line_before_any_model_loads(
    tmp_path: Path, command: str, device: str, line: str
) -> None:
    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    result = CliRunner().invoke(main, [*_masks_args(tmp_path, command), "--device", device])
    assert result.exit_code == 2, result.output
    assert result.output.splitlines()[-1] == line
    assert not (tmp_path / "out").exists()


def test_masks_tiers_runs_on_the_cpu_device(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, [*_masks_args(tmp_path, "tiers"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert np.asarray(Image.open(tmp_path / "out" / "p.png")).shape == (64, 64)
