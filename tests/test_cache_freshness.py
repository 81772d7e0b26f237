"""``train`` trains on the dataset as it is now (issue 10): items listed exactly as ``cache`` lists
them, each file made from that item's current image, mask and caption; stale, missing, failed
and foreign files are named, never trained on silently."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import cache_tiny, make_dataset, photo, tiered
from masktrain.data import cache_format as fmt
from masktrain.data.cached_items import find_cached_items
from masktrain.errors import CachedDataError, CacheSourceCollision, DataError
from masktrain.models.wan import WanFamily


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    make_dataset(root)
    cache_tiny(root)
    return root


def toml(root: Path) -> Path:
    return root / "dataset.toml"


def names(items: list) -> list[str]:
    return sorted(Path(fmt.read_metadata(item.latent_path).source).name for item in items)  # type: ignore[union-attr]


def touch_later(path: Path) -> None:
    """Change a file's modification time the way an edit does."""
    later = time.time() + 5
    os.utime(path, (later, later))


def not_ready(root: Path) -> str:
    with pytest.raises(CachedDataError) as raised:
        find_cached_items(toml(root), "wan")
    message = str(raised.value)
    assert f"run masktrain cache --dataset_config {toml(root)} --arch wan" in message
    assert "--skip_stale" in message
    return message


def test_a_fresh_cache_lists_every_item(dataset: Path) -> None:
    assert names(find_cached_items(toml(dataset), "wan")) == [f"item{i}.png" for i in range(4)]


# --- item 3: stale inputs -------------------------------------------------------------------------


def test_an_inverted_mask_is_stale(dataset: Path) -> None:
    mask = dataset / "masks" / "item1.png"
    Image.fromarray(255 - tiered(64, 64, 1)).save(mask)
    assert "item1.png (its image or mask changed since it was cached)" in not_ready(dataset)


def test_a_rewritten_caption_is_stale(dataset: Path) -> None:
    (dataset / "images" / "item2.txt").write_text("another caption")
    assert "item2.png (its caption changed since it was cached)" in not_ready(dataset)


def test_an_edited_image_is_stale(dataset: Path) -> None:
    touch_later(dataset / "images" / "item3.png")
    assert "item3.png (its image or mask changed" in not_ready(dataset)


def test_new_settings_make_every_item_stale(dataset: Path) -> None:
    toml(dataset).write_text(
        toml(dataset).read_text().replace("resolution = [64, 64]", "resolution = [48, 48]")
    )
    assert not_ready(dataset).count("the dataset settings changed") == 4


def test_a_new_image_without_a_cache_file_is_named(dataset: Path) -> None:
    Image.fromarray(photo(64, 64, 9)).save(dataset / "images" / "new.png")
    assert "new.png (not cached)" in not_ready(dataset)


def test_skip_stale_trains_on_the_rest_with_a_warning(
    dataset: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (dataset / "images" / "item2.txt").write_text("another caption")
    with caplog.at_level(logging.WARNING):
        items = find_cached_items(toml(dataset), "wan", skip_stale=True)
    assert names(items) == ["item0.png", "item1.png", "item3.png"]
    assert "--skip_stale: leaving out 1 item(s)" in caplog.text and "item2.png" in caplog.text


def test_a_rerun_of_cache_makes_stale_items_fresh(dataset: Path) -> None:
    Image.fromarray(255 - tiered(64, 64, 1)).save(dataset / "masks" / "item1.png")
    (summary,) = cache_tiny(dataset)
    assert (summary.rebuilt, summary.skipped) == (1, 3)
    assert len(find_cached_items(toml(dataset), "wan")) == 4


# --- item 2: items the dataset no longer has, or that failed --------------------------------------


def test_items_removed_from_a_jsonl_are_not_trained_on(tmp_path: Path) -> None:
    root = tmp_path / "data"
    make_dataset(root)
    lines = [json.dumps({"image_path": f"images/item{i}.png", "caption": f"c{i}"}) for i in range(4)]
    (root / "items.jsonl").write_text("\n".join(lines))
    toml(root).write_text(
        toml(root).read_text().replace('image_directory = "images"', 'image_jsonl_file = "items.jsonl"')
    )
    cache_tiny(root)
    (root / "items.jsonl").write_text("\n".join(lines[:2]))
    assert names(find_cached_items(toml(root), "wan")) == ["item0.png", "item1.png"]


def test_an_item_that_fails_in_cache_loses_its_old_file(dataset: Path) -> None:
    image = dataset / "images" / "item0.png"
    image.write_bytes(image.read_bytes()[:200])  # truncated after it was cached
    (summary,) = cache_tiny(dataset)
    assert [path.name for path, _ in summary.failed] == ["item0.png"]
    assert not list((dataset / "cache").glob("item0_*_wan.safetensors"))
    assert "item0.png (not cached)" in not_ready(dataset)


def test_a_duplicate_basename_fails_both_and_removes_their_old_files(dataset: Path) -> None:
    Image.fromarray(photo(64, 64, 5)).save(dataset / "images" / "item1.jpg", quality=95)
    (summary,) = cache_tiny(dataset)
    assert sorted(path.name for path, _ in summary.failed) == ["item1.jpg", "item1.png"]
    assert not list((dataset / "cache").glob("item1_*"))
    message = not_ready(dataset)
    assert "item1.png (cannot be cached: another image has the same basename" in message


# --- item 4: two TOMLs sharing one cache_directory ------------------------------------------------


def test_a_second_dataset_in_the_same_cache_folder_is_refused_by_name(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    make_dataset(first)
    make_dataset(second)
    shared = tmp_path / "shared_cache"
    for root in (first, second):
        toml(root).write_text(
            toml(root).read_text().replace('cache_directory = "cache"', f'cache_directory = "{shared}"')
        )
    cache_tiny(first)
    with pytest.raises(
        CacheSourceCollision, match=rf"was made for {first}/images/item0.png, not {second}/images/item0.png"
    ):
        cache_tiny(second)
    assert len(find_cached_items(toml(first), "wan")) == 4  # the first dataset's files are intact


def test_a_moved_dataset_folder_is_stale_not_a_collision(tmp_path: Path) -> None:
    root = tmp_path / "data"
    make_dataset(root)
    toml(root).write_text(
        toml(root).read_text().replace('cache_directory = "cache"', f'cache_directory = "{tmp_path}/cache"')
    )
    cache_tiny(root)
    moved = tmp_path / "moved"
    root.rename(moved)
    with pytest.raises(CachedDataError, match="no cache files for --arch wan; run masktrain cache"):
        find_cached_items(toml(moved), "wan")  # the files name the old folder: nothing is fresh
    (summary,) = cache_tiny(moved)
    assert summary.written == 4 and not summary.failed
    assert len(find_cached_items(toml(moved), "wan")) == 4


# --- item 14: macOS AppleDouble files --------------------------------------------------------------


def test_dot_underscore_files_are_ignored_everywhere(dataset: Path) -> None:
    for folder in ("images", "masks", "cache"):
        (dataset / folder / "._item0.png").write_bytes(b"\x00\x05\x16\x07AppleDouble")
    (dataset / "cache" / "._item0_0064x0064_wan.safetensors").write_bytes(b"\x00\x05\x16\x07")
    (summary,) = cache_tiny(dataset)
    assert (summary.items, summary.skipped, len(summary.failed)) == (4, 4, 0)
    assert len(find_cached_items(toml(dataset), "wan")) == 4


# --- item 1: cache refuses non-finite latents -----------------------------------------------------


def test_cache_refuses_to_write_non_finite_latents(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A VAE in bf16 can overflow; such latents are a failed item, never a file."""
    root = tmp_path / "data"
    make_dataset(root)
    real = WanFamily.encode_pixels

    def overflowing(self: WanFamily, vae: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        latents = real(self, vae, pixels)
        latents[0, 0, 0, 0, 0] = float("nan")
        return latents

    monkeypatch.setattr(WanFamily, "encode_pixels", overflowing)
    (summary,) = cache_tiny(root)
    assert summary.failed and all("non-finite" in reason for _, reason in summary.failed)
    for path in (root / "cache").glob("*_wan.safetensors"):
        assert all(torch.isfinite(t).all() for t in fmt.load_cache_file(path)[0].values())


def test_write_cache_file_refuses_non_finite_tensors(tmp_path: Path) -> None:
    metadata = fmt.CacheMetadata("wan", "src", "none", (8, 8), "f")
    with pytest.raises(DataError, match=r"x\.safetensors: latents_float32 holds non-finite values"):
        fmt.write_cache_file(
            tmp_path / "x.safetensors", {"latents_float32": torch.tensor([np.inf])}, metadata
        )
    assert list(tmp_path.iterdir()) == []
