"""Cache files: naming, fingerprints, metadata, freshness, corrupt files and atomic writes."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import safetensors.torch
import torch

from masktrain import atomic
from masktrain.atomic import remove_stale_temporaries
from masktrain.data.cache_format import (
    FORMAT_VERSION,
    CacheMetadata,
    cache_status,
    fingerprint,
    item_cache_name,
    load_cache_file,
    read_metadata,
    text_cache_name,
    write_cache_file,
)
from masktrain.errors import CacheArchMismatch, CacheFileError, MaskTrainError

PARTS: dict[str, object] = {
    "source_size": 123456,
    "source_mtime_ns": 1_700_000_000_123_456_789,
    "mask": ["/data/masks/a.png", 2048, 1_700_000_000_000_000_000],
    "alpha_mask": True,
    "bucket": [512, 768],
    "resize_rules": "1",
    "vae": "tiny",
    "format_version": FORMAT_VERSION,
}


def metadata(**changes: object) -> CacheMetadata:
    fields: dict[str, object] = {
        "arch": "wan",
        "source": "/data/images/a.png",
        "mask_source": "alpha",
        "bucket": (512, 768),
        "fingerprint": fingerprint(PARTS),
        "extra": {"vae": "tiny"},
    }
    fields.update(changes)
    return CacheMetadata(**fields)  # type: ignore[arg-type]


def tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "latents_1x8x8_float32": torch.randn(16, 1, 8, 8, generator=generator),
        "latents_image_1x8x8_bfloat16": torch.randn(16, 1, 8, 8, generator=generator).bfloat16(),
        "mask_weights_1x8x8_float32": torch.rand(1, 1, 8, 8, generator=generator),
    }


def temporaries(directory: Path) -> list[Path]:
    return sorted(directory.glob(".*.masktrain-tmp"))


# --- naming ------------------------------------------------------------------------------------


def test_item_names_follow_musubi() -> None:
    assert item_cache_name("photo", (1024, 768), "wan") == "photo_1024x0768_wan.safetensors"
    assert item_cache_name("a_b", (64, 48), "qi") == "a_b_0064x0048_qi.safetensors"
    assert item_cache_name("clip", (832, 480), "wan", frames=(0, 81)) == (
        "clip_00000-081_0832x0480_wan.safetensors"
    )
    assert item_cache_name("clip", (12000, 480), "wan", frames=(120, 5)) == (
        "clip_00120-005_12000x0480_wan.safetensors"
    )


def test_text_names_follow_musubi() -> None:
    assert text_cache_name("photo", "wan") == "photo_wan_te.safetensors"
    assert text_cache_name("photo", "qi") == "photo_qi_te.safetensors"


# --- fingerprint -------------------------------------------------------------------------------


def test_fingerprint_is_short_sha256_of_canonical_json() -> None:
    expected = hashlib.sha256(b'{"a":1,"b":["x",true,null]}').hexdigest()[:32]
    assert fingerprint({"b": ["x", True, None], "a": 1}) == expected
    assert len(fingerprint(PARTS)) == 32


def test_fingerprint_ignores_key_order() -> None:
    reordered = dict(reversed(list(PARTS.items())))
    assert list(reordered) != list(PARTS)
    assert fingerprint(reordered) == fingerprint(PARTS)
    assert fingerprint({"outer": {"b": 1, "a": 2}}) == fingerprint({"outer": {"a": 2, "b": 1}})


@pytest.mark.parametrize("key", sorted(PARTS))
def test_fingerprint_changes_with_each_value(key: str) -> None:
    changed = dict(PARTS)
    value = PARTS[key]
    if isinstance(value, bool):
        changed[key] = not value
    elif isinstance(value, int):
        changed[key] = value + 1
    elif isinstance(value, list):
        changed[key] = [*value[:-1], value[-1] + 1]
    else:
        changed[key] = f"{value}x"
    assert fingerprint(changed) != fingerprint(PARTS)


def test_fingerprint_takes_paths_as_strings() -> None:
    assert fingerprint({"source": Path("/data/a.png")}) == fingerprint({"source": "/data/a.png"})


def test_fingerprint_rejects_values_without_a_stable_form() -> None:
    with pytest.raises(TypeError, match="object"):
        fingerprint({"thing": object()})


# --- metadata and round trip -------------------------------------------------------------------


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "cache" / item_cache_name("a", (1024, 768), "wan")
    written = tensors()
    write_cache_file(path, written, metadata())

    loaded, meta = load_cache_file(path)
    assert meta == metadata()
    assert read_metadata(path) == metadata()
    assert loaded.keys() == written.keys()
    for name, tensor in written.items():
        assert loaded[name].dtype == tensor.dtype
        assert loaded[name].shape == tensor.shape
        assert torch.equal(loaded[name], tensor)
    assert temporaries(path.parent) == []


def test_file_metadata_is_plain_strings(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    write_cache_file(path, tensors(), metadata())
    with safetensors.safe_open(path, "pt") as handle:
        raw = handle.metadata()
    assert raw == {
        "arch": "wan",
        "source": "/data/images/a.png",
        "mask_source": "alpha",
        "bucket": "512x768",
        "fingerprint": fingerprint(PARTS),
        "format_version": FORMAT_VERSION,
        "vae": "tiny",
    }


def test_text_embedding_metadata_has_no_bucket(tmp_path: Path) -> None:
    path = tmp_path / text_cache_name("a", "wan")
    meta = metadata(bucket=None, mask_source="none", extra={})
    write_cache_file(path, {"t5_bfloat16": torch.ones(7, 16, dtype=torch.bfloat16)}, meta)
    assert read_metadata(path) == meta
    assert meta.to_dict()["bucket"] == "none"


def test_views_and_graph_tensors_are_saved(tmp_path: Path) -> None:
    # musubi expands one spatial mask over the latent frames: a non-contiguous view.
    mask = torch.rand(1, 1, 1, 8, 8).expand(-1, -1, 5, -1, -1).squeeze(0)
    latents = torch.randn(16, 5, 8, 8, requires_grad=True) * 2
    path = tmp_path / "v.safetensors"
    write_cache_file(path, {"mask_weights_5x8x8_float32": mask, "latents_5x8x8_float32": latents}, metadata())
    loaded, _ = load_cache_file(path)
    assert torch.equal(loaded["mask_weights_5x8x8_float32"], mask)
    assert torch.equal(loaded["latents_5x8x8_float32"], latents.detach())


def test_metadata_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="mask_source"):
        metadata(mask_source="segmenter")
    with pytest.raises(ValueError, match="fingerprint"):
        metadata(extra={"fingerprint": "x"})


def test_from_dict_names_file_and_missing_key() -> None:
    raw = metadata().to_dict()
    del raw["fingerprint"]
    with pytest.raises(CacheFileError, match=r"/c/a\.safetensors.*'fingerprint'"):
        CacheMetadata.from_dict(raw, Path("/c/a.safetensors"))


def test_missing_metadata_key_in_a_file(tmp_path: Path) -> None:
    path = tmp_path / "a_0064x0048_wan.safetensors"
    raw = metadata().to_dict()
    del raw["mask_source"]
    safetensors.torch.save_file(tensors(), path, metadata=raw)
    with pytest.raises(CacheFileError, match="mask_source") as info:
        read_metadata(path)
    assert str(path) in str(info.value)
    with pytest.raises(CacheFileError, match="mask_source"):
        load_cache_file(path)


def test_musubi_cache_file_is_not_mistaken_for_ours(tmp_path: Path) -> None:
    path = tmp_path / "a_0064x0048_wan.safetensors"
    musubi = {"architecture": "wan", "width": "64", "height": "48", "format_version": "1.0.1"}
    safetensors.torch.save_file(tensors(), path, metadata=musubi)
    with pytest.raises(CacheFileError, match="another cache_directory"):
        cache_status(path, arch="wan", fingerprint="f")


def test_file_without_metadata(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    safetensors.torch.save_file(tensors(), path)
    with pytest.raises(CacheFileError, match="without metadata") as info:
        read_metadata(path)
    assert str(path) in str(info.value)


def test_malformed_bucket_in_file(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    safetensors.torch.save_file(tensors(), path, metadata={**metadata().to_dict(), "bucket": "512 by 768"})
    with pytest.raises(CacheFileError, match=r"bucket '512 by 768'"):
        read_metadata(path)


# --- freshness ---------------------------------------------------------------------------------


def test_cache_status(tmp_path: Path) -> None:
    path = tmp_path / "a_1024x0768_wan.safetensors"
    current = fingerprint(PARTS)
    assert cache_status(path, arch="wan", fingerprint=current) == "missing"

    write_cache_file(path, tensors(), metadata())
    assert cache_status(path, arch="wan", fingerprint=current) == "fresh"
    assert cache_status(path, arch="wan", fingerprint=fingerprint({**PARTS, "source_size": 1})) == "stale"

    write_cache_file(path, tensors(), metadata(format_version="0"))
    assert cache_status(path, arch="wan", fingerprint=current) == "stale"


def test_cache_status_arch_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    write_cache_file(path, tensors(), metadata(arch="qi"))
    with pytest.raises(CacheArchMismatch) as info:
        cache_status(path, arch="wan", fingerprint=fingerprint(PARTS))
    message = str(info.value)
    assert str(path) in message
    assert "was made for arch 'qi', not 'wan'" in message
    assert "cache_directory" in message
    assert "delete" in message
    assert isinstance(info.value, CacheFileError)
    assert isinstance(info.value, MaskTrainError)


# --- unreadable files --------------------------------------------------------------------------


def test_random_bytes(tmp_path: Path) -> None:
    path = tmp_path / "noise.safetensors"
    path.write_bytes(os.urandom(4096))
    for call in (read_metadata, load_cache_file):
        with pytest.raises(CacheFileError) as info:
            call(path)
        assert str(path) in str(info.value)


CUTS: dict[str, Callable[[int, int], int]] = {
    "empty": lambda size, header_end: 0,
    "inside the length prefix": lambda size, header_end: 5,
    "inside the header": lambda size, header_end: header_end // 2,
    "after the header": lambda size, header_end: header_end,
    "last byte missing": lambda size, header_end: size - 1,
}


@pytest.mark.parametrize("cut", sorted(CUTS))
def test_truncated_cache_file(tmp_path: Path, cut: str) -> None:
    whole = tmp_path / "whole.safetensors"
    write_cache_file(whole, tensors(), metadata())
    data = whole.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    length = CUTS[cut](len(data), header_end)
    path = tmp_path / "torn.safetensors"
    path.write_bytes(data[:length])

    def status(path: Path) -> str:
        return cache_status(path, arch="wan", fingerprint="f")

    for call in (read_metadata, load_cache_file, status):
        with pytest.raises(CacheFileError) as info:
            call(path)
        assert str(path) in str(info.value)


def test_directory_in_place_of_file(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    path.mkdir()
    with pytest.raises(CacheFileError, match=r"a\.safetensors"):
        read_metadata(path)


def test_loading_a_missing_file(tmp_path: Path) -> None:
    assert read_metadata(tmp_path / "none.safetensors") is None
    with pytest.raises(FileNotFoundError):
        load_cache_file(tmp_path / "none.safetensors")


# --- atomic writes -----------------------------------------------------------------------------


@pytest.mark.parametrize("pre_existing", [False, True])
def test_failed_write_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pre_existing: bool
) -> None:
    path = tmp_path / "a.safetensors"
    if pre_existing:
        write_cache_file(path, tensors(), metadata(source="old"))
    before = path.read_bytes() if pre_existing else None
    seen: list[Path] = []
    real_temp_path = atomic.temp_path

    def recorded_temp_path(target: Path) -> Path:
        seen.append(real_temp_path(target))
        return seen[-1]

    def fail_midway(descriptor: int) -> None:  # the bytes are in the temporary, not yet on disk
        raise RuntimeError("disk full")

    monkeypatch.setattr(atomic, "temp_path", recorded_temp_path)
    monkeypatch.setattr(atomic.os, "fsync", fail_midway)
    with pytest.raises(RuntimeError, match="disk full"):
        write_cache_file(path, tensors(), metadata(source="new"))

    assert len(seen) == 1
    assert seen[0].parent == tmp_path
    assert seen[0].name.startswith(".") and seen[0].name.endswith(".masktrain-tmp")
    assert str(os.getpid()) in seen[0].name
    assert temporaries(tmp_path) == []
    if pre_existing:
        assert path.read_bytes() == before
        assert read_metadata(path) == metadata(source="old")
    else:
        assert not path.exists()
    assert sorted(tmp_path.iterdir()) == ([path] if pre_existing else [])


def test_write_replaces_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    write_cache_file(path, tensors(), metadata(source="old"))
    write_cache_file(path, {"x_float32": torch.zeros(3)}, metadata(source="new"))
    loaded, meta = load_cache_file(path)
    assert meta.source == "new"
    assert list(loaded) == ["x_float32"]
    assert sorted(tmp_path.iterdir()) == [path]


def test_remove_stale_temporaries(tmp_path: Path) -> None:
    keep = [tmp_path / "a_0064x0048_wan.safetensors", tmp_path / ".hidden", tmp_path / "b.masktrain-tmp"]
    stale = [tmp_path / ".a.safetensors.4242.1.masktrain-tmp", tmp_path / ".b.png.7.ThreadId2.masktrain-tmp"]
    for file in keep + stale:
        file.write_bytes(b"x")
    assert remove_stale_temporaries(tmp_path) == 2
    assert sorted(tmp_path.iterdir()) == sorted(keep)
    assert remove_stale_temporaries(tmp_path) == 0
    assert remove_stale_temporaries(tmp_path / "absent") == 0


WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import torch

    from masktrain.data.cache_format import CacheMetadata, write_cache_file

    directory = Path(sys.argv[1])
    for index in range(1_000_000):
        # Distinct content per write, so a torn or mixed file cannot pass the check.
        values = torch.arange(4_000_000, dtype=torch.float32) + index
        meta = CacheMetadata("wan", "src", "file", (64, 64), "f", extra={"index": str(index)})
        write_cache_file(directory / f"item{index % 4}.safetensors", {"latents_float32": values}, meta)
        if index == 0:
            print("started", flush=True)
    """
)


@pytest.mark.slow
def test_killed_writer_leaves_no_torn_file(tmp_path: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == "started\n"
        time.sleep(0.5)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
        if process.stdout is not None:
            process.stdout.close()
    assert process.returncode == -signal.SIGKILL

    files = sorted(tmp_path.glob("*.safetensors"))
    assert files, "the writer finished no file before it was killed"
    for file in files:
        loaded, meta = load_cache_file(file)
        index = int(meta.extra["index"])
        assert file.name == f"item{index % 4}.safetensors"
        expected = torch.arange(4_000_000, dtype=torch.float32) + index
        assert torch.equal(loaded["latents_float32"], expected)

    leftovers = temporaries(tmp_path)
    assert remove_stale_temporaries(tmp_path) == len(leftovers)
    assert temporaries(tmp_path) == []
    assert all(not file.name.startswith(".") for file in tmp_path.iterdir())
