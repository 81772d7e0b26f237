"""One error root and one exit-code table; settings that are checked before anything heavy; the
torch-free floors (config, catalog, the train preflight)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import masktrain
from helpers import cache_tiny, photo
from masktrain import catalog, errors
from masktrain.config import OptimSettings, TrainConfig
from masktrain.errors import (
    CachedDataError,
    ConfigError,
    DataError,
    Interrupted,
    MaskTrainError,
    ModelLoadError,
    SettingError,
    TrainingInterrupted,
    exit_code,
)


def _public_exception_classes() -> list[type[BaseException]]:
    """Every exception class defined in the package, found by importing every module."""
    found: set[type[BaseException]] = set()
    for module_info in pkgutil.walk_packages(masktrain.__path__, "masktrain."):
        if module_info.name.endswith("__main__"):
            continue
        module = importlib.import_module(module_info.name)
        for _, value in inspect.getmembers(module, inspect.isclass):
            if issubclass(value, BaseException) and value.__module__.startswith("masktrain"):
                found.add(value)
    return sorted(found, key=lambda cls: cls.__qualname__)


def test_every_exception_class_is_under_one_of_the_two_roots() -> None:
    classes = _public_exception_classes()
    names = {cls.__name__ for cls in classes}
    # The walk really finds the classes, including the ones the native core raises.
    assert {"ModelLoadError", "CachedDataError", "TrainConfigError", "ImageDecodeError"} <= names
    outside = [cls.__qualname__ for cls in classes if not issubclass(cls, MaskTrainError | Interrupted)]
    assert outside == []
    assert issubclass(MaskTrainError, ValueError) and not issubclass(Interrupted, ValueError)


def test_the_native_core_raises_the_classes_of_masktrain_errors(tmp_path: Path) -> None:
    from masktrain import _native

    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(errors.ImageDecodeError) as raised:
        _native.decode_image(empty)
    assert type(raised.value) is errors.ImageDecodeError
    assert exit_code(raised.value) == 1


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (ConfigError("x"), 2),
        (errors.TrainConfigError("x"), 2),
        (errors.MaskOptionError("x"), 2),
        (errors.MissingMaskWeightsError("x"), 2),
        (ModelLoadError("x"), 2),
        (errors.ShapeRuleError("x"), 2),
        (errors.MissingTensor("x"), 2),
        (errors.LoraFileError("x"), 2),
        (CachedDataError("x"), 1),
        (errors.AspectMismatchError("x"), 1),
        (errors.VideoDecodeError("x"), 1),
        (errors.CacheArchMismatch("x"), 1),
        (MaskTrainError("x"), 1),
        (TrainingInterrupted(Path("out/step-000002")), 130),
        (RuntimeError("x"), 1),
    ],
)
def test_one_table_gives_the_exit_code(error: BaseException, code: int) -> None:
    assert exit_code(error) == code
    assert issubclass(SettingError, MaskTrainError) and issubclass(DataError, MaskTrainError)


def _run(*code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "\n".join(code)], capture_output=True, text=True, timeout=120
    )


def test_settings_and_catalog_import_neither_torch_nor_the_extension() -> None:
    result = _run(
        "import sys",
        "import masktrain, masktrain.config, masktrain.catalog, masktrain.errors",
        "from masktrain.config import TrainConfig, CacheConfig, MaskLossSettings",
        "heavy = ('torch', 'masktrain._native', 'diffusers', 'transformers')",
        "heavy = [m for m in heavy if m in sys.modules]",
        "assert not heavy, heavy",
    )
    assert result.returncode == 0, result.stderr


def test_cli_choices_come_from_the_catalog() -> None:
    from masktrain.cli import cache, train

    for command in (cache.cache, train.train):
        (arch,) = [p for p in command.params if p.name == "arch"]
        assert tuple(arch.type.choices) == catalog.ARCH_NAMES  # type: ignore[attr-defined]
    assert catalog.arch("wan").text_flag == "--t5"
    with pytest.raises(SettingError, match=r"--arch 'wann' is not supported; .*did you mean 'wan'"):
        catalog.arch("wann")


def test_cross_flag_rules_fail_when_the_config_is_built() -> None:
    with pytest.raises(
        errors.OptimConfigError, match="--lr_scheduler constant does not use --lr_warmup_steps"
    ):
        OptimSettings(lr_scheduler="constant", lr_warmup_steps=100)
    with pytest.raises(errors.TrainConfigError, match="--dit_high_noise is only for --arch wan"):
        TrainConfig(Path("d.toml"), "qwen_image", "tiny", Path("out"), dit_high_noise="tiny")


def test_bad_flags_fail_before_any_model_loads(tmp_path: Path) -> None:
    """--dit names a file that does not exist: a check that ran after loading would report that
    instead of the scheduler flags."""
    toml = tmp_path / "dataset.toml"
    toml.write_text('[[datasets]]\nimage_directory = "images"\n')
    base = [sys.executable, "-m", "masktrain.cli", "train", "--dataset_config", str(toml), "--arch", "wan"]
    flags = ["--dit", str(tmp_path / "missing.safetensors"), "--output_dir", str(tmp_path / "out")]
    command = [*base, *flags, "--lr_scheduler", "constant", "--lr_warmup_steps", "100"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "--lr_scheduler constant does not use --lr_warmup_steps" in result.stderr
    assert "missing.safetensors" not in result.stderr


def _image_dataset(root: Path, count: int, batch_size: int) -> Path:
    from PIL import Image

    (root / "images").mkdir(parents=True)
    for index in range(count):
        Image.fromarray(photo(32, 32, index)).save(root / "images" / f"item{index}.png")
    toml = root / "dataset.toml"
    toml.write_text(
        f"[general]\nresolution = [32, 32]\nbatch_size = {batch_size}\n\n"
        '[[datasets]]\nimage_directory = "images"\ncache_directory = "cache"\n'
    )
    return toml


def test_the_train_preflight_is_torch_free_and_names_what_to_do(tmp_path: Path) -> None:
    toml = _image_dataset(tmp_path, count=3, batch_size=2)
    uncached = [
        sys.executable,
        "-m",
        "masktrain.cli",
        "train",
        "--dataset_config",
        str(toml),
        "--arch",
        "wan",
        "--dit",
        "tiny",
        "--output_dir",
        str(tmp_path / "out"),
        "--device",
        "cpu",
    ]
    result = subprocess.run(uncached, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr  # a data problem, not a flag: exit 1, no usage line
    assert "no cache files for --arch wan; run masktrain cache" in result.stderr
    assert "Usage:" not in result.stderr and "Traceback" not in result.stderr

    cache_tiny(tmp_path)  # 3 images in batches of 2: 2 batches per epoch
    result = _run(
        "import sys",
        "from pathlib import Path",
        "from masktrain.config import TrainConfig",
        "from masktrain.train.preflight import preflight",
        f"config = TrainConfig(Path({str(toml)!r}), 'wan', 'tiny', Path('out'), max_train_epochs=3)",
        "plan = preflight(config, world=1)",
        "assert (len(plan.items), plan.batches_per_epoch, plan.total_steps) == (3, 2, 6), plan",
        "try:",
        "    preflight(config, world=4)",
        "except Exception as error:",
        "    print(type(error).__name__, error)",
        "assert 'torch' not in sys.modules",
    )
    assert result.returncode == 0, result.stderr
    assert "CachedDataError" in result.stdout and "fewer batches than processes (4)" in result.stdout
