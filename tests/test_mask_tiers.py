"""``masktrain masks tiers``: every class of each built-in label table against hand-made label maps;
a tiny SegFormer (transformers' own post-processing as the reference) and a tiny TorchScript model
standing in for Sapiens (its demo's OpenCV preprocessing as the reference), end to end through the
CLI; EXIF rotation; images the native core refuses (one failed item each); what is refused (pickles,
TorchScript without --trust_torchscript, a --device this machine lacks)."""

import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from helpers import photo
from masktrain import _native
from masktrain.cli import main
from masktrain.config.masks import TiersConfig
from masktrain.errors import DataError, FlagError
from masktrain.masks.files import open_upright
from masktrain.masks.label_tables import ATR, LIP, SAPIENS
from masktrain.masks.tiers import choose_table, lookup
from masktrain.masks.tiny import tiny_segformer

# By hand, per table: the classes of each region (every other class is body).
FACE_HAIR_BACKGROUND = {
    "atr": ({"Face", "Sunglasses"}, {"Hat", "Hair"}, {"Background"}),
    "lip": ({"Face", "Sunglasses"}, {"Hat", "Hair"}, {"Background"}),
    "sapiens": (
        {"Face_Neck", "Lower_Lip", "Upper_Lip", "Lower_Teeth", "Upper_Teeth", "Tongue"},
        {"Hair"},
        {"Background"},
    ),
}
DETAILS = {
    "atr": {"Sunglasses"},
    "lip": {"Glove", "Sunglasses"},
    "sapiens": {"Left_Hand", "Right_Hand", "Lower_Lip", "Upper_Lip", "Lower_Teeth", "Upper_Teeth", "Tongue"},
}
COUNTS = {"atr": 18, "lip": 20, "sapiens": 28}


def _config(tmp_path: Path, **kwargs) -> TiersConfig:
    (tmp_path / "images").mkdir(exist_ok=True)
    return TiersConfig(input=tmp_path / "images", output=tmp_path / "masks", model=tmp_path, **kwargs)


def _expected(name: str, label: str, values: dict[str, int], details: str | None = None) -> int:
    face, hair, background = FACE_HAIR_BACKGROUND[name]
    if details is not None and label in DETAILS[name]:
        return values[details]
    if label in face:
        return values["face"]
    if label in hair:
        return values["hair"]
    return values["background"] if label in background else values["body"]


@pytest.mark.parametrize("table", [ATR, LIP, SAPIENS], ids=lambda t: t.name)
@pytest.mark.parametrize("details", [None, "body"])
def test_every_class_of_each_built_in_table_gets_its_tier(tmp_path: Path, table, details) -> None:
    classes = list(table.regions)
    assert len(classes) == COUNTS[table.name]
    config = _config(tmp_path, face=250, hair=90, body=140, background=5, details=details)
    values = {"face": 250, "hair": 90, "body": 140, "background": 5}
    label_map = np.arange(len(classes)).repeat(3).reshape(-1, 3)  # a hand-made map: every class, 3 pixels
    grey = lookup(classes, choose_table(classes, None), config)[label_map]
    for index, label in enumerate(classes):
        assert (grey[index] == _expected(table.name, label, values, details)).all(), label


def test_tables_match_class_names_loosely_and_by_position_when_unnamed() -> None:
    lip_as_named = [
        "background",
        "hat",
        "hair",
        "glove",
        "sunglasses",
        "UpperClothes",
        *list(LIP.regions)[6:],
    ]
    assert choose_table(lip_as_named, None).name == "lip"
    unnamed = [f"LABEL_{i}" for i in range(18)]
    table = choose_table(unnamed, "atr")
    assert table.region("LABEL_11") == "face" and table.is_detail("LABEL_3")
    with pytest.raises(FlagError, match="none of the built-in label sets"):
        choose_table(unnamed, None)
    with pytest.raises(FlagError, match="are not the 28 classes of sapiens"):
        choose_table(unnamed, "sapiens")


def test_a_toml_label_table(tmp_path: Path) -> None:
    path = tmp_path / "mine.toml"
    path.write_text('details = ["eyes"]\n[labels]\nbackground = "background"\nskin = "body"\neyes = "face"\n')
    table = choose_table(["background", "skin", "eyes"], str(path))
    config = _config(tmp_path, details="hair")
    assert list(lookup(["background", "skin", "eyes"], table, config)) == [0, 128, 80]
    path.write_text('[labels]\nskin = "torso"\n')
    with pytest.raises(FlagError, match=r"\[labels\] skin = 'torso'; a region is one of face, hair"):
        choose_table(["skin"], str(path))


def _segformer(folder: Path) -> None:
    """The built-in tiny SegFormer (ATR classes, as mattmdjaga/segformer_b2_clothes names them), saved
    as a transformers folder."""
    processor, model = tiny_segformer()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def _images(folder: Path) -> None:
    folder.mkdir()
    Image.fromarray(photo(48, 64, 1)).save(folder / "a.png")
    rotated = Image.fromarray(photo(40, 56, 2))
    exif = rotated.getexif()
    exif[0x0112] = 6  # EXIF orientation: rotate 90 clockwise to display
    rotated.save(folder / "b.jpg", exif=exif, quality=95)


@pytest.mark.slow
def test_tiers_from_a_segformer_folder_match_transformers_post_processing(tmp_path: Path) -> None:
    from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

    _segformer(tmp_path / "segformer")
    _images(tmp_path / "images")
    args = [
        "masks",
        "tiers",
        "--input",
        str(tmp_path / "images"),
        "--output",
        str(tmp_path / "masks"),
        "--model",
        str(tmp_path / "segformer"),
        "--batch_size",
        "2",
        "--device",
        "cpu",
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "2 mask(s) written, 0 skipped (existing), 0 failed (label table: atr)" in result.output

    processor = AutoImageProcessor.from_pretrained(tmp_path / "segformer")
    model = AutoModelForSemanticSegmentation.from_pretrained(tmp_path / "segformer").eval()
    values = {"face": 255, "hair": 80, "body": 128, "background": 0}
    for name in ("a.png", "b.jpg"):
        # the pixels cache trains on: the native decoder, EXIF applied (JPEG decoders differ by a few levels)
        rgb = Image.fromarray(_native.decode_image(tmp_path / "images" / name)[0])
        with torch.no_grad():
            outputs = model(**processor(images=[rgb], return_tensors="pt"))
        labels = processor.post_process_semantic_segmentation(
            outputs, target_sizes=[(rgb.height, rgb.width)]
        )[0]
        expected = np.vectorize(lambda i: _expected("atr", list(ATR.regions)[i], values))(labels.numpy())
        with Image.open(tmp_path / "masks" / f"{Path(name).stem}.png") as mask:
            assert mask.mode == "L" and mask.size == rgb.size  # b.jpg: 40x56 stored, 56 wide after EXIF
            got = np.asarray(mask)
        assert np.array_equal(got, expected) and len(np.unique(got)) >= 2
    assert (tmp_path / "masks" / "b.png").exists()
    again = CliRunner().invoke(main, [*args, "--skip_existing"])
    assert "0 mask(s) written, 2 skipped (existing)" in again.output
    # --model tiny is the same model, built in
    tiny = [*args[:5], str(tmp_path / "tiny"), "--model", "tiny"]
    assert CliRunner().invoke(main, tiny).exit_code == 0
    for name in ("a.png", "b.png"):
        with Image.open(tmp_path / "tiny" / name) as built_in, Image.open(tmp_path / "masks" / name) as saved:
            assert np.array_equal(np.asarray(built_in), np.asarray(saved))


class TinySapiens(torch.nn.Module):
    """28 logits per 4x4 patch, as Sapiens' segmentation head gives them at a lower resolution."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 28, kernel_size=4, stride=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def test_a_torchscript_model_needs_trust_and_matches_sapiens_preprocessing(tmp_path: Path) -> None:
    torch.manual_seed(0)
    with warnings.catch_warnings():  # torch 2.10+ calls TorchScript deprecated; Sapiens ships it
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(TinySapiens())
    scripted.save(str(tmp_path / "sapiens_torchscript.pt2"))
    _images(tmp_path / "images")
    common = dict(
        input=tmp_path / "images", output=tmp_path / "masks", model=tmp_path / "sapiens_torchscript.pt2"
    )
    with pytest.raises(FlagError, match="runs code when it loads; pass --trust_torchscript"):
        TiersConfig(**common)
    (tmp_path / "weights.pth").write_bytes(b"")
    with pytest.raises(FlagError, match="a pickle; masktrain never loads pickles"):
        TiersConfig(**{**common, "model": tmp_path / "weights.pth"}, trust_torchscript=True)
    from masktrain.masks.tiers import run

    summary = run(TiersConfig(**common, trust_torchscript=True, device="cpu"))
    assert (summary.written, summary.table) == (2, "sapiens")
    # Sapiens' demo: cv2 reads BGR, INTER_LINEAR to 768x1024, back to RGB, mean/std on 0..255
    image = cv2.imread(str(tmp_path / "images" / "a.png"))
    resized = cv2.resize(image, (768, 1024), interpolation=cv2.INTER_LINEAR)
    tensor = torch.from_numpy(resized.transpose(2, 0, 1)[[2, 1, 0]].copy()).float()
    tensor = (tensor - torch.tensor([123.5, 116.5, 103.5]).view(3, 1, 1)) / torch.tensor(
        [58.5, 57.0, 57.5]
    ).view(3, 1, 1)
    with torch.no_grad():
        logits = scripted(tensor[None])
    labels = torch.nn.functional.interpolate(logits, size=(48, 64), mode="bilinear").argmax(1)[0].numpy()
    values = {"face": 255, "hair": 80, "body": 128, "background": 0}
    expected = np.vectorize(lambda i: _expected("sapiens", list(SAPIENS.regions)[i], values))(labels)
    with Image.open(tmp_path / "masks" / "a.png") as mask:
        got = np.asarray(mask)
    # OpenCV resizes in 8-bit fixed point, masktrain in float: a label may flip where two are near-equal
    assert (got == expected).mean() > 0.98 and len(np.unique(got)) >= 2


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims `width` x `height` grey pixels (a decompression bomb's header)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + chunk(b"IEND", b"")
    )


def test_images_the_core_refuses_are_failed_items_and_the_rest_go_on(tmp_path: Path) -> None:
    """Red team N6: a decompression bomb was a PIL traceback that stopped the run."""
    (tmp_path / "images").mkdir()
    config = TiersConfig(
        input=tmp_path / "images", output=tmp_path / "masks", model=Path("tiny"), device="cpu"
    )
    Image.fromarray(photo(48, 64, 1)).save(config.input / "good.png")
    (config.input / "bomb.png").write_bytes(_png_header_only(100_000, 100_000))
    (config.input / "notes.png").write_text("not an image")
    from masktrain.masks.tiers import run

    summary = run(config)
    assert summary.written == 1 and (tmp_path / "masks" / "good.png").is_file()
    why = {path.name: reason for path, reason in summary.failed}
    assert sorted(why) == ["bomb.png", "notes.png"]
    assert "100000x100000 = 10000000000 pixels, over the limit" in why["bomb.png"]
    assert "not a supported image" in why["notes.png"]


def test_the_device_is_the_commands_one_choice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``masktrain.device.resolve_device``: a --device this machine lacks is a flag error before any
    model loads; two images with one basename are refused first."""
    (tmp_path / "images").mkdir()
    config = TiersConfig(
        input=tmp_path / "images", output=tmp_path / "masks", model=Path("tiny"), device="cuda"
    )
    Image.fromarray(photo(8, 8, 1)).save(config.input / "a.png")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    from masktrain.masks import tiers

    monkeypatch.setattr(tiers, "load_segmenter", lambda *_: pytest.fail("a model loaded"))
    with pytest.raises(FlagError, match="--device cuda: no CUDA device is available"):
        tiers.run(config)
    Image.fromarray(photo(8, 8, 1)).save(config.input / "a.jpg")
    with pytest.raises(DataError, match=r"--input .*: a\.jpg and a\.png would both make a\.png"):
        tiers.run(config)


def _full_resolution_labels(logits: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """What ``masks tiers`` did before (and transformers' post-processing does): every class's
    logits resized to the image in float32, then the argmax."""
    resized = torch.nn.functional.interpolate(
        logits[None].float(), size=size, mode="bilinear", align_corners=False
    )
    return resized[0].argmax(dim=0).numpy()


def test_tiers_labels_are_the_full_resolution_argmax_class_by_class(tmp_path: Path) -> None:
    """Red team N19: every class was resized to the full image in float32 (88 bytes a pixel). Now one
    class at a time with a running maximum, where torch's kernel makes that give the same values;
    the labels ``masks tiers`` maps to tiers are the full-resolution argmax's, pixel for pixel, on the
    tiny SegFormer (EXIF applied), and on logits full of exact ties and in bfloat16."""
    from masktrain.masks.segmenters import _class_by_class, _upsampled_argmax, load_segmenter

    (tmp_path / "images").mkdir()
    Image.fromarray(photo(240, 320, 3)).save(tmp_path / "images" / "wide.png")
    rotated = Image.fromarray(photo(133, 217, 4))
    exif = rotated.getexif()
    exif[0x0112] = 8
    rotated.save(tmp_path / "images" / "turned.jpg", exif=exif, quality=95)
    segmenter = load_segmenter(Path("tiny"), torch.device("cpu"))
    images = [open_upright(tmp_path / "images" / name) for name in ("wide.png", "turned.jpg")]
    assert [image.size for image in images] == [(320, 240), (133, 217)]
    with torch.no_grad():
        batch = segmenter.model(**segmenter.processor(images=images, return_tensors="pt")).logits
    for image, logits, labels in zip(images, batch, segmenter.label_maps(images), strict=True):
        size = (image.height, image.width)
        assert _class_by_class(logits, size)  # the memory-saving path is the one tested
        # channels-first, as an image alone comes out of the model (oneDNN hands a batch's back
        # channels-last, which torch resizes with a kernel a few units in the last place away)
        full = _full_resolution_labels(logits.contiguous(), size)
        assert np.array_equal(labels, full) and len(np.unique(full)) >= 2
    generator = torch.Generator().manual_seed(0)
    for logits in (
        torch.randn(18, 40, 30, generator=generator).mul(2).round(),  # many exact ties: the lower class wins
        torch.randn(28, 64, 48, generator=generator).bfloat16(),
        torch.randn(150, 16, 16, generator=generator),
    ):
        assert np.array_equal(
            _upsampled_argmax(logits, (301, 255)), _full_resolution_labels(logits, (301, 255))
        )
    for logits, size in (  # other kernels (small outputs, 3 classes, 1x1 logits): resized whole, as before
        (torch.randn(18, 8, 8, generator=generator), (48, 64)),
        (torch.randn(3, 8, 8, generator=generator), (300, 200)),
        (torch.randn(18, 1, 1, generator=generator), (300, 200)),
    ):
        assert not _class_by_class(logits, size)
        assert np.array_equal(_upsampled_argmax(logits, size), _full_resolution_labels(logits, size))


_PEAK = """
import resource, sys, torch
from masktrain.masks.segmenters import _upsampled_argmax
logits = torch.randn(18, 128, 96)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
labels = _upsampled_argmax(logits, (4000, 3000))
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024 / labels.size)
"""


@pytest.mark.slow
def test_tiers_labels_take_under_twenty_bytes_a_pixel() -> None:
    """Red team N19: 12.6 GB for a 144 MP photo. The peak memory of the labels of a 12 MP image from
    18 classes, in a process of its own: under 20 bytes a pixel (about 11; resizing every class at
    once took 46 here, and 18 float32 planes and int64 labels are 80 bytes a pixel)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _PEAK], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert float(done.stdout) < 20, done.stdout
