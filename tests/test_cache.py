"""`masktrain cache` end to end on the tiny models: the stored mask weights against an
independent computation of the reference rules (PIL / OpenCV / torch), latents against the VAE
run on reference-resized pixels, the fallback chain and its counts, staleness, and the CLI."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import reference
from helpers import cache_tiny, masktrain_command, photo, tiered, words
from masktrain.cli import main
from masktrain.config import CacheConfig
from masktrain.data import cache_format as fmt
from masktrain.data.buckets import musubi_buckets
from masktrain.models import get_family

RESOLUTION = (128, 128)


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """alpha.png (RGBA), file.png + mask, wide.jpg + mask (another bucket), bare.png (no mask)."""
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    Image.fromarray(np.dstack([photo(160, 160, 1), tiered(160, 160, 1)]), "RGBA").save(images / "alpha.png")
    Image.fromarray(photo(200, 150, 2)).save(images / "file.png")
    Image.fromarray(tiered(200, 150, 2)).save(masks / "file.png")
    Image.fromarray(photo(120, 240, 3)).save(images / "wide.jpg", quality=95)
    Image.fromarray(tiered(60, 120, 3)).save(masks / "wide.png")  # same aspect, half size
    Image.fromarray(photo(128, 128, 4)).save(images / "bare.png")
    for stem in ("alpha", "file", "wide", "bare"):
        (images / f"{stem}.txt").write_text(f"a photo of {stem}", encoding="utf-8")
    write_toml(tmp_path, alpha_mask=True)
    return tmp_path


def write_toml(
    root: Path, alpha_mask: bool, resolution: tuple[int, int] = RESOLUTION, extra: str = ""
) -> Path:
    path = root / "dataset.toml"
    path.write_text(
        f"""
[general]
resolution = [{resolution[0]}, {resolution[1]}]
enable_bucket = true

[[datasets]]
image_directory = "images"
mask_directory = "masks"
cache_directory = "cache"
alpha_mask = {str(alpha_mask).lower()}
{extra}
""",
        encoding="utf-8",
    )
    return path


cache = cache_tiny


def item_file(root: Path, stem: str, arch: str = "wan") -> Path:
    (path,) = (root / "cache").glob(f"{stem}_*x*_{arch}.safetensors")
    return path


def test_wan_cache_matches_the_reference_rules(dataset: Path) -> None:
    (summary,) = cache(dataset)
    assert (summary.items, summary.written, summary.skipped, len(summary.failed)) == (4, 4, 0, 0)
    assert dict(summary.sources) == {"alpha": 1, "file": 2, "none": 1}

    family = get_family("wan")
    vae = family.load_vae("tiny", torch.device("cpu"), torch.float32)
    buckets = musubi_buckets(RESOLUTION)
    with Image.open(dataset / "images/alpha.png") as alpha:
        masks = {"alpha": np.array(alpha.getchannel("A"))}
    for stem in ("file", "wide"):
        with Image.open(dataset / f"masks/{stem}.png") as mask:
            masks[stem] = np.array(mask.convert("L"))
    for stem, source in [("alpha", "alpha"), ("file", "file"), ("wide", "file"), ("bare", "none")]:
        tensors, meta = fmt.load_cache_file(item_file(dataset, stem))
        (image_path,) = [p for p in (dataset / "images").glob(f"{stem}.*") if p.suffix != ".txt"]
        with Image.open(image_path) as opened:
            pil = opened.copy()
        bucket = reference.nearest_aspect_bucket(pil.size, buckets)
        assert (meta.arch, meta.mask_source, meta.bucket, meta.source) == (
            "wan",
            source,
            bucket,
            str(image_path),
        )
        h, w = bucket[1] // 8, bucket[0] // 8
        weights = tensors[f"mask_weights_1x{h}x{w}_float32"]
        assert weights.shape == (1, 1, h, w) and weights.dtype == torch.float32
        if stem in masks:
            expected = reference.latent_mask(reference.resize_mask_to_bucket(masks[stem], bucket))
            torch.testing.assert_close(weights[0, 0], torch.from_numpy(expected), rtol=0, atol=1e-6)
        else:
            assert (weights == 1).all()
        latents = tensors[f"latents_1x{h}x{w}_float32"]
        if image_path.suffix == ".png":  # exact pixels: the same VAE on reference pixels
            rgb = np.array(pil)[..., :3] if pil.mode == "RGBA" else np.array(pil.convert("RGB"))
            pixels = torch.from_numpy(reference.resize_image_to_bucket(rgb, bucket)).permute(2, 0, 1)
            expected = family.encode_pixels(vae, (pixels.float() / 127.5 - 1)[None, :, None])[0]
            torch.testing.assert_close(latents, expected, rtol=1e-5, atol=1e-5)
        text, text_meta = fmt.load_cache_file(dataset / "cache" / f"{stem}_wan_te.safetensors")
        assert text_meta.arch == "wan" and text["text_embeds_float32"].shape[1] == 32


def test_qwen_image_cache_uses_its_vae_grid(dataset: Path) -> None:
    (summary,) = cache(dataset, arch="qwen_image")
    assert summary.written == 4 and not summary.failed
    tensors, meta = fmt.load_cache_file(item_file(dataset, "file", "qwen_image"))
    w, h = meta.bucket
    # The tiny Qwen-Image VAE compresses 4x (8x for the real one); the mask follows the VAE.
    assert tensors[f"latents_1x{h // 4}x{w // 4}_float32"].shape == (4, 1, h // 4, w // 4)
    assert tensors[f"mask_weights_1x{h // 4}x{w // 4}_float32"].shape == (1, 1, h // 4, w // 4)
    text, _ = fmt.load_cache_file(dataset / "cache" / "file_qwen_image_te.safetensors")
    assert text["text_embeds_float32"].shape[1] == 16


def test_reruns_skip_fresh_items_and_rebuild_exactly_what_changed(dataset: Path) -> None:
    cache(dataset)
    before = {p.name: p.stat().st_mtime_ns for p in (dataset / "cache").iterdir()}
    (summary,) = cache(dataset)
    assert (summary.written, summary.skipped) == (0, 4)
    assert {p.name: p.stat().st_mtime_ns for p in (dataset / "cache").iterdir()} == before

    os.utime(dataset / "masks/file.png", ns=(1, 1))  # touching a mask rebuilds its item only
    (summary,) = cache(dataset)
    assert (summary.written, summary.rebuilt, summary.skipped) == (1, 1, 3)

    write_toml(dataset, alpha_mask=False)  # alpha.png now falls back to full weight
    (summary,) = cache(dataset)
    assert (summary.written, summary.rebuilt) == (4, 4)
    assert fmt.read_metadata(item_file(dataset, "alpha")).mask_source == "none"

    write_toml(dataset, alpha_mask=False, resolution=(96, 96))
    (summary,) = cache(dataset)
    assert summary.rebuilt == 4
    assert len(list((dataset / "cache").glob("*_wan.safetensors"))) == 4  # no stale leftovers


def test_without_alpha_the_guide_warns_about_missing_mask_files(
    dataset: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_toml(dataset, alpha_mask=False)
    (summary,) = cache(dataset)
    assert dict(summary.sources) == {"file": 2, "none": 2}
    assert "2 images have no matching mask file" in caplog.text
    assert "2 items had no mask (no alpha + no file). Filled with full-weight (255)." in caplog.text


def test_require_mask_fails_the_item_without_one(dataset: Path) -> None:
    write_toml(dataset, alpha_mask=True, extra="require_mask = true")
    (summary,) = cache(dataset)
    assert summary.written == 3
    ((path, reason),) = summary.failed
    assert path.name == "bare.png" and "require_mask=true but no mask found" in reason


def test_a_cache_file_of_another_arch_is_refused_by_name(dataset: Path) -> None:
    cache(dataset)
    path = item_file(dataset, "file")
    tensors, meta = fmt.load_cache_file(path)
    fmt.write_cache_file(path, tensors, fmt.CacheMetadata(**{**meta.__dict__, "arch": "qwen_image"}))
    with pytest.raises(fmt.CacheArchMismatch, match=r"file_.*_wan\.safetensors.*qwen_image"):
        cache(dataset)


@pytest.mark.slow
def test_cli_runs_the_guides_command_and_checks_flags(dataset: Path) -> None:
    base = [sys.executable, "-m", "masktrain.cli", "cache", "--dataset_config", str(dataset / "dataset.toml")]
    ok = subprocess.run(
        [*base, "--arch", "wan", "--vae", "tiny", "--t5", "tiny", "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ok.returncode == 0, ok.stderr
    assert "4 items, mask sources alpha=1 file=2 none=1" in ok.stderr
    assert "1 items had no mask (no alpha + no file). Filled with full-weight (255)." in ok.stderr
    wrong = subprocess.run(
        [*base, "--arch", "wan", "--vae", "tiny", "--text_encoder", "tiny"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert wrong.returncode == 2 and "--text_encoder is not used with --arch wan" in wrong.stderr
    missing = subprocess.run(
        [*base, "--arch", "wan", "--vae", str(dataset / "nope"), "--t5", "tiny"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert missing.returncode == 2 and "--vae" in missing.stderr and "nope" in missing.stderr


@pytest.mark.slow
def test_torchrun_shards_items_across_two_cpu_processes(dataset: Path) -> None:
    cache(dataset)  # one process, into cache/
    single = {p.name: fmt.load_cache_file(p)[0] for p in (dataset / "cache").iterdir()}
    toml = write_toml(dataset, alpha_mask=True).read_text().replace('"cache"', '"cache_ddp"')
    (dataset / "ddp.toml").write_text(toml)
    command = [
        sys.executable,
        *words("-m torch.distributed.run --standalone --nproc_per_node 2 -m masktrain.cli cache"),
        *words(
            "--dataset_config {toml} --arch wan --vae tiny --t5 tiny --device cpu", toml=dataset / "ddp.toml"
        ),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    # Rank 0 reports the merged summary once.
    assert result.stderr.count("4 items, mask sources alpha=1 file=2 none=1, 4 written") == 1
    sharded = {p.name: fmt.load_cache_file(p)[0] for p in (dataset / "cache_ddp").iterdir()}
    assert sharded.keys() == single.keys()
    for name, tensors in single.items():
        for key, tensor in tensors.items():
            # Mask weights come from the native core: exact. Latents and text embeddings go through
            # other batch compositions and torchrun's one-thread BLAS: float rounding only (latents
            # are unit-scale, normalised by the tiny VAE's ~0.01 channel std, so ~1e-6 absolute).
            exact = key.startswith("mask_weights")
            torch.testing.assert_close(
                sharded[name][key], tensor, rtol=0 if exact else 1e-5, atol=0 if exact else 1e-5
            )


@pytest.mark.slow
def test_a_killed_run_leaves_no_torn_file_and_its_rerun_finishes_the_rest(tmp_path: Path) -> None:
    import signal
    import time

    images = tmp_path / "images"
    images.mkdir()
    for i in range(40):
        Image.fromarray(np.dstack([photo(128, 128, i), tiered(128, 128, i)]), "RGBA").save(
            images / f"i{i:02d}.png"
        )
    (tmp_path / "masks").mkdir()
    write_toml(tmp_path, alpha_mask=True)
    command = masktrain_command(
        "cache --dataset_config {toml} --arch wan --vae tiny --t5 tiny --device cpu --batch_size 1",
        toml=tmp_path / "dataset.toml",
    )
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list((tmp_path / "cache").glob("*_wan.safetensors"))) < 3 and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)

    done = list((tmp_path / "cache").glob("*_wan.safetensors"))
    assert 3 <= len(done) < 40, "the run must be killed midway"
    for path in done:  # every file that exists is complete
        tensors, meta = fmt.load_cache_file(path)
        assert meta.mask_source == "alpha" and tensors["mask_weights_1x16x16_float32"].shape == (1, 1, 16, 16)

    (summary,) = cache(tmp_path)
    assert (summary.skipped, summary.written) == (len(done), 40 - len(done))
    assert len(list((tmp_path / "cache").glob("*_wan.safetensors"))) == 40
    assert not list((tmp_path / "cache").glob(".*masktrain-tmp"))


def test_overlapped_preparation_yields_the_same_chunks_in_order(dataset: Path) -> None:
    """The accelerator path (next chunk prepared on a thread) cannot run on a CPU-only machine
    end to end; its chunk pipeline is checked here against the in-turn path."""
    from masktrain.cache.images import ImageCacher
    from masktrain.cache.setup import CacheSetup
    from masktrain.cache.stages import prepared_chunks
    from masktrain.config import load_dataset_config
    from masktrain.data.discovery import discover_images

    (ds,) = load_dataset_config(dataset / "dataset.toml").datasets
    family = get_family("wan")
    config = CacheConfig(dataset_config=dataset / "dataset.toml", arch="wan", vae="tiny", text_encoder="tiny")
    cacher = ImageCacher(
        CacheSetup(
            config,
            family,
            family.load_vae("tiny", torch.device("cpu"), torch.float32),
            ds,
            discover_images(ds),
        )
    )
    items = discover_images(ds).items
    chunks = [items[:1], items[1:3], items[3:]]
    in_turn = list(prepared_chunks(cacher, chunks, overlap=False))
    overlapped = list(prepared_chunks(cacher, chunks, overlap=True))
    assert [c for c, _ in overlapped] == chunks
    for (_, a), (_, b) in zip(in_turn, overlapped, strict=True):
        assert [x.path for x in a] == [y.path for y in b]
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x.latent_mask, y.latent_mask)


def test_damaged_files_are_rebuilt_and_no_skip_existing_rebuilds_text_too(dataset: Path) -> None:
    cache(dataset)
    (dataset / "cache" / "file_wan_te.safetensors").write_bytes(b"garbage")
    item_file(dataset, "wide").write_bytes(b"garbage")
    (summary,) = cache(dataset)
    assert (summary.written, summary.rebuilt, summary.skipped) == (1, 1, 3)
    assert fmt.load_cache_file(dataset / "cache" / "file_wan_te.safetensors")[1].arch == "wan"

    text = dataset / "cache" / "alpha_wan_te.safetensors"
    os.utime(text, ns=(1, 1))
    (summary,) = cache(dataset, skip_existing=False)
    assert (summary.written, summary.skipped) == (4, 0)
    assert text.stat().st_mtime_ns != 1


def test_bucket_no_upscale_keeps_small_images_at_their_own_size(dataset: Path) -> None:
    # 100x70 (EXIF-rotated from 70x100) is smaller than 128x128: bucket (96, 64), not an enlargement.
    rotated = Image.fromarray(photo(100, 70, 5))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display: 70x100 stored, 100x70 shown
    rotated.save(dataset / "images/small.jpg", quality=95, exif=exif)
    Image.fromarray(tiered(70, 100, 5)).save(dataset / "masks/small.png")
    write_toml(dataset, alpha_mask=True, extra="bucket_no_upscale = true")
    (summary,) = cache(dataset)
    assert (summary.written, len(summary.failed)) == (5, 0)

    buckets = musubi_buckets(RESOLUTION)
    tensors, meta = fmt.load_cache_file(item_file(dataset, "small"))
    assert meta.bucket == (96, 64) and meta.extra["original_size"] == "100x70"
    assert tensors["latents_1x8x12_float32"].shape == (16, 1, 8, 12)
    expected = reference.latent_mask(reference.resize_mask_to_bucket(tiered(70, 100, 5), (96, 64)))
    torch.testing.assert_close(tensors["mask_weights_1x8x12_float32"][0, 0], torch.from_numpy(expected))
    # Larger than the resolution's area: the normal nearest-aspect bucket.
    assert fmt.read_metadata(item_file(dataset, "file")).bucket == reference.nearest_aspect_bucket(
        (150, 200), buckets
    )
    assert fmt.read_metadata(item_file(dataset, "bare")).bucket == (128, 128)  # area equal: its own size

    write_toml(dataset, alpha_mask=True)  # the flag is part of the fingerprint
    (summary,) = cache(dataset)
    assert summary.rebuilt == 5
    assert fmt.read_metadata(item_file(dataset, "small")).bucket == reference.nearest_aspect_bucket(
        (100, 70), buckets
    )


@pytest.mark.parametrize("device, kind", [("cuda", "CUDA"), ("mps", "MPS")])
def test_a_device_this_machine_lacks_is_one_line_before_any_model_loads(
    dataset: Path, device: str, kind: str
) -> None:
    """`cache --device cuda` (or mps) without that device: exit 2 and one line, nothing cached."""
    if torch.cuda.is_available() if device == "cuda" else torch.backends.mps.is_available():
        pytest.skip(f"this machine has a {kind} device")
    line = "cache --dataset_config {toml} --arch wan --vae tiny --t5 tiny --device " + device
    result = CliRunner().invoke(main, words(line, toml=dataset / "dataset.toml"))
    assert result.exit_code == 2, result.output
    assert (
        result.output.splitlines()[-1]
        == f"Error: --device {device}: no {kind} device is available on this machine"
    )
    assert not (dataset / "cache").exists()
