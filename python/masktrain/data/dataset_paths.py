"""The folders and files a dataset TOML names, checked before any model loads: each that is read
must exist and be readable (a folder also searchable: one that can be listed but not searched
loses every item in it silently), an ``image_directory`` must hold an image masktrain reads (a
folder of GIF or TIFF files would cache 0 items), each that is written must be writable. Every
problem is one line naming the TOML key or flag (exit 2)."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from masktrain import _native
from masktrain.config.dataset import DatasetConfig, ImageDatasetConfig
from masktrain.errors import ConfigError, SettingError


def check_readable(config: DatasetConfig) -> None:
    """Every folder and file the datasets read."""
    for number, dataset in enumerate(config.datasets, start=1):
        where = f"{config.source}: [[datasets]] #{number}"
        if isinstance(dataset, ImageDatasetConfig):
            sources = {
                "image_directory": dataset.image_directory,
                "image_jsonl_file": dataset.image_jsonl_file,
            }
        else:
            sources = {
                "video_directory": dataset.video_directory,
                "video_jsonl_file": dataset.video_jsonl_file,
            }
        sources |= {
            "mask_directory": dataset.mask_directory,
            "default_mask_file": dataset.default_mask,
            "caption_directory": dataset.caption_directory,
        }
        for key, path in sources.items():
            if path is not None:
                problem = _unreadable(path, folder=not key.endswith("_file"))
                if problem is None and key == "image_directory":
                    problem = _without_images(path)
                if problem:
                    name = key.removesuffix("_file") if key == "default_mask_file" else key
                    raise ConfigError(f"{where}: '{name}' {path}: {problem}")


def check_writable(folder: Path, what: str, error: type[SettingError] = ConfigError) -> None:
    """`folder` (or the nearest existing folder above it, where it will be created) can be written."""
    existing = folder
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise error(f"{what} {folder}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise error(
            f"{what} {folder}: {existing} is not writable (permission denied); "
            "choose a folder you can write to"
        )


def _unreadable(path: Path, folder: bool) -> str | None:
    if not path.exists():
        return "no such folder" if folder else "no such file"
    if folder != path.is_dir():
        return "is a file, expected a folder" if folder else "is a folder, expected a file"
    if not os.access(path, os.R_OK):
        return "cannot be read (permission denied)"
    if folder and not os.access(path, os.X_OK):
        return (
            "can be listed but not searched (no execute permission), so every item in it would be lost; "
            "fix its permissions (chmod +x)"
        )
    return None


def _without_images(folder: Path) -> str | None:
    """Why `folder` gives no image to cache (the formats read, and what it holds), or None."""
    if _native.list_images(folder):
        return None
    kinds = Counter(
        "sub-folder(s)" if entry.is_dir() else (Path(entry.name).suffix.lower() or "without an extension")
        for entry in os.scandir(folder)
        if not entry.name.startswith(".")
    )
    most = sorted(kinds.items(), key=lambda kind_count: (-kind_count[1], kind_count[0]))[:6]
    found = ", ".join(f"{count} {kind}" for kind, count in most) or "nothing"
    reads = ", ".join(f".{extension}" for extension in _native.IMAGE_EXTENSIONS)
    return (
        f"no supported image was found there (masktrain reads {reads} files directly in the folder; "
        f"found {found}); convert the images to PNG or point the key at the folder that holds them"
    )
