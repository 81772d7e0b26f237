"""``masktrain inspect``: its numbers against an independent count (numpy on the cache files read
with safetensors; the native mask preparation for items not cached), a partly stale cache, items
without masks or with a tiny subject, the page's references, the summary, the printed table; and
``train``'s warning when cached masks go unused."""

import html
import json
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from safetensors.numpy import load_file

from helpers import cached, photo, tiered
from masktrain import _native
from masktrain.cli import main
from masktrain.config.inspect import InspectConfig
from masktrain.inspect.page import run
from masktrain.train.loop import run as run_train

# The guide's tiers, written out here (not imported) so the count is independent.
FACE, SUBJECT = 0.75, 0.05


def _count(raw: np.ndarray) -> tuple[float, float, float]:
    cells = raw.size
    face = float((raw >= FACE).sum()) / cells
    body = float(((raw >= SUBJECT) & (raw < FACE)).sum()) / cells
    return face, body, 1 - face - body


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return cached(tmp_path / "data", "wan")


def test_numbers_match_an_independent_count_of_the_cache(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "inspect"
    (report,) = run(
        InspectConfig(dataset, output_dir=out, mask_gamma=0.7, mask_min_weight=0.1, prior_mask_threshold=0.1)
    )
    assert report.cache == "fresh" and len(report.items) == 4
    cache = dataset.parent / "cache"
    for item in report.items:
        (path,) = cache.glob(f"{Path(item.name).stem}_*_wan.safetensors")
        tensors = load_file(str(path))
        raw = next(v for k, v in tensors.items() if k.startswith("mask_weights"))[0, 0]
        face, body, background = _count(raw)
        assert (item.face, item.body, item.background) == pytest.approx((face, body, background), abs=1e-9)
        weights = np.clip(raw, 0, 1) ** 0.7 * 0.9 + 0.1
        assert item.mean_weight == pytest.approx(float(weights.mean()), rel=1e-6)
        assert item.prior_region == pytest.approx(float((raw < 0.1).mean()))
        assert (item.read_from, item.source, item.grid) == ("cache", "file", (8, 8))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["datasets"][0]["cache"] == "fresh"
    assert [i["name"] for i in summary["datasets"][0]["items"]] == [i.name for i in report.items]
    page = (out / "index.html").read_text()
    references = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert len(references) == 8 and all((out / ref).is_file() for ref in references)


def test_a_partly_stale_cache_reads_the_rest_from_the_sources(dataset: Path, tmp_path: Path) -> None:
    root = dataset.parent
    Image.fromarray(photo(64, 64, 9)).save(root / "images" / "item9.png")  # never cached
    (root / "images" / "item9.txt").write_text("new")
    Image.fromarray(tiered(64, 64, 9)).save(root / "masks" / "item9.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[0, 0] = 255  # item1 mask redrawn: a subject too small for one latent cell; stale in the cache
    Image.fromarray(mask).save(root / "masks" / "item1.png")
    (report,) = run(InspectConfig(dataset, output_dir=tmp_path / "inspect"))
    assert report.cache == "partly fresh"
    assert report.not_cached == ["item9.png"] and [s.split(" ")[0] for s in report.stale] == ["item1.png"]
    by_name = {item.name: item for item in report.items}
    for name in ("item1.png", "item9.png"):
        item = by_name[name]
        assert item.read_from == "sources"
        _, raw = _native.prepare_mask(root / "masks" / name, (64, 64), (64, 64), 8)
        assert (item.face, item.body, item.background) == pytest.approx(_count(raw))
    assert by_name["item1.png"].small_subject and report.small_subject == ["item1.png"]
    assert by_name["item0.png"].read_from == "cache"


def test_items_without_masks_and_the_printed_table(tmp_path: Path) -> None:
    toml = cached(tmp_path / "data", "wan", masks=False)
    result = CliRunner().invoke(
        main, ["inspect", "--dataset_config", str(toml), "--output_dir", str(tmp_path / "i")]
    )
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == [
        "dataset",
        "items",
        "no",
        "mask",
        "tiny",
        "subj",
        "face",
        "body",
        "bg",
        "cache",
    ]
    assert lines[1].split() == ["#1", "4", "4", "0", "-", "-", "-", "fresh"]
    summary = json.loads((tmp_path / "i" / "summary.json").read_text())
    assert summary["datasets"][0]["without_mask"] == [f"item{i}.png" for i in range(4)]


def test_train_warns_when_cached_masks_go_unused(dataset: Path, tmp_path: Path, caplog) -> None:
    from helpers import train_config
    from masktrain.config import MaskLossSettings

    caplog.set_level("WARNING")
    run_train(train_config(dataset, tmp_path / "out", max_train_steps=1, mask=MaskLossSettings()))
    assert "4 of 4 cached items hold mask weights, but --use_mask_loss is off" in caplog.text


def test_a_video_dataset_from_its_sources_then_from_its_cache(tmp_path: Path) -> None:
    """A video's numbers are its first clip's: before caching from its first frame and mask file,
    after caching from the cache file, and the two agree."""
    from helpers import cache_tiny, write_video

    (tmp_path / "videos").mkdir()
    (tmp_path / "masks").mkdir()
    write_video(tmp_path / "videos" / "clip.mkv", 9)
    (tmp_path / "videos" / "clip.txt").write_text("a clip")
    Image.fromarray(tiered(48, 64, 3)).save(tmp_path / "masks" / "clip.png")
    toml = tmp_path / "dataset.toml"
    toml.write_text(
        '[general]\nresolution = [64, 48]\n\n[[datasets]]\nvideo_directory = "videos"\n'
        'mask_directory = "masks"\ncache_directory = "cache"\ntarget_frames = [5]\n'
    )
    (before,) = run(InspectConfig(toml, output_dir=tmp_path / "before"))
    assert before.cache == "not cached" and before.items[0].read_from == "sources"
    cache_tiny(tmp_path)
    (after,) = run(InspectConfig(toml, output_dir=tmp_path / "after"))
    (item,) = after.items
    assert (item.read_from, item.source, item.grid) == ("cache", "file", (8, 6))
    (path,) = (tmp_path / "cache").glob("clip_*_wan.safetensors")
    raw = next(v for k, v in load_file(str(path)).items() if k.startswith("mask_weights"))[0, 0]
    assert (item.face, item.body, item.background) == pytest.approx(_count(raw))
    first = before.items[0]
    assert (first.face, first.body, first.background) == pytest.approx(
        (item.face, item.body, item.background)
    )


def _overwrite_floats(path: Path, key: str, count: int) -> None:
    """Overwrite the first `count` float32 of tensor `key` with 0xFF bytes (a NaN each), leaving the
    header, and so the file's freshness, as it was."""
    data = bytearray(path.read_bytes())
    size = int.from_bytes(data[:8], "little")
    start = 8 + size + json.loads(data[8 : 8 + size])[key]["data_offsets"][0]
    data[start : start + 4 * count] = b"\xff" * (4 * count)
    path.write_bytes(bytes(data))


def _strict_json(text: str) -> object:
    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_nan_mask_weights_in_a_fresh_looking_file_are_named_damaged(dataset: Path, tmp_path: Path) -> None:
    root = dataset.parent
    (path,) = (root / "cache").glob("item1_*_wan.safetensors")
    _overwrite_floats(path, "mask_weights_1x8x8_float32", 64)
    out = tmp_path / "inspect"
    (report,) = run(InspectConfig(dataset, output_dir=out))
    damage = (
        f"{path}: holds non-finite values (NaN or infinity) in mask_weights_1x8x8_float32; delete the file "
        "and run masktrain cache again"
    )
    assert report.damaged == [f"item1.png ({damage})"] and report.cache == "partly fresh"
    by_name = {item.name: item for item in report.items}
    item = by_name["item1.png"]
    assert (item.cache, item.read_from) == ("damaged", "sources")
    _, raw = _native.prepare_mask(root / "masks" / "item1.png", (64, 64), (64, 64), 8)
    assert (item.face, item.body, item.background) == pytest.approx(_count(raw))
    assert np.isfinite(item.mean_weight) and by_name["item0.png"].cache == "fresh"
    summary = _strict_json((out / "summary.json").read_text())
    assert summary["datasets"][0]["damaged"] == report.damaged
    assert "1 damaged in the cache: item1.png" in (out / "index.html").read_text()


def test_summary_json_writes_null_for_a_value_that_is_not_finite() -> None:
    from masktrain.inspect.report import DatasetReport, ItemReport, summary_json

    item = ItemReport("a.png", "file", "cache", "fresh", (64, 64), (8, 8), mean_weight=float("nan"))
    item.prior_region = float("inf")
    text = json.dumps(summary_json([DatasetReport(0, "images", items=[item])]), allow_nan=False)
    (written,) = _strict_json(text)["datasets"][0]["items"]
    assert (written["mean_weight"], written["prior_region"], written["face"]) == (None, None, 0.0)


def test_overlays_of_names_with_url_characters_are_referenced_by_their_url(tmp_path: Path) -> None:
    """Names with '#', '?', '%' and a backslash: each src / href, read as a browser reads it (HTML
    unescaped, then URL-decoded), is the overlay on disk; no tag of a name reaches the page."""
    from urllib.parse import unquote

    names = ["a#1", "b?x", "c%41", "<script>alert(2)<\\script>", "plain"]
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for index, stem in enumerate(names):
        Image.fromarray(photo(64, 64, index)).save(tmp_path / "images" / f"{stem}.png")
        Image.fromarray(tiered(64, 64, index)).save(tmp_path / "masks" / f"{stem}.png")
    toml = tmp_path / "dataset.toml"
    toml.write_text(
        '[general]\nresolution = 64\n[[datasets]]\nimage_directory = "images"\nmask_directory = "masks"\n'
        'cache_directory = "cache"\n'
    )
    out = tmp_path / "inspect"
    run(InspectConfig(toml, output_dir=out))
    page = (out / "index.html").read_text()
    references = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert len(references) == 2 * len(names)
    for reference in references:
        assert not set("#?\\<>") & set(reference)
        assert (out / unquote(html.unescape(reference))).is_file(), reference
    shown = {unquote(html.unescape(reference)) for reference in references}
    assert shown == {f"overlays/0_{stem}.png" for stem in names}
    assert "<script>" not in page and "&lt;script&gt;alert(2)&lt;\\script&gt;.png" in page
