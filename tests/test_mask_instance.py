"""``masktrain masks instance``: face matching and person choice on synthetic detections with known
answers; once with a real face (scikit-image's public-domain astronaut, NASA) beside another person
(its cameraman), matched by dlib's shipped identity model; the command end to end with a tiny random
Mask2Former; the reference tool's refused --backend."""

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from masktrain.cli import main
from masktrain.config.masks import InstanceConfig
from masktrain.errors import FlagError
from masktrain.masks.face_id import Face, FaceIdentity
from masktrain.masks.instance import match_face, pick_person
from masktrain.masks.people import Person
from masktrain.masks.tiny import tiny_mask2former

skimage_data = pytest.importorskip("skimage.data")


def _face(box: tuple[int, int, int, int], *embedding: float) -> Face:
    return Face(box, np.array(embedding, dtype=np.float64))


def _person(h: int, w: int, rows: slice, cols: slice, score: float) -> Person:
    mask = np.zeros((h, w), dtype=bool)
    mask[rows, cols] = True
    return Person(mask, score)


def test_face_matching_never_guesses() -> None:
    reference = np.array([0.0, 0.0])
    subject, stranger, twin = (
        _face((0, 0, 4, 4), 0.1, 0.0),
        _face((10, 0, 14, 4), 2.0, 0.0),
        _face((20, 0, 24, 4), 0.0, 0.3),
    )
    assert match_face([stranger, subject], reference, 0.6) == pytest.approx(
        match_face([subject], reference, 0.6)
    )
    matched = match_face([stranger, subject], reference, 0.6)
    assert (matched.status, matched.face, matched.distance) == ("matched", subject, pytest.approx(0.1))
    assert match_face([], reference, 0.6).status == "no face"
    assert match_face([stranger], reference, 0.6).status == "no match"
    assert match_face([subject, twin], reference, 0.6).status == "ambiguous"
    assert match_face([subject, twin], reference, 0.2).status == "matched"  # a stricter threshold decides


def test_the_person_is_the_one_holding_the_face() -> None:
    left = _person(40, 80, slice(0, 40), slice(0, 40), 0.9)
    right = _person(40, 80, slice(0, 40), slice(40, 80), 0.95)
    assert pick_person([left, right], (10, 10, 20, 20)) is left  # the centre (15, 15) is in the left one
    small_but_sure = _person(40, 80, slice(10, 20), slice(10, 20), 0.99)
    assert pick_person([left, small_but_sure], (10, 10, 20, 20)) is small_but_sure  # best (score, area)
    beside = _person(40, 80, slice(0, 40), slice(18, 30), 0.5)
    assert pick_person([beside, right], (10, 10, 20, 20)) is beside  # no centre: the largest overlap
    assert pick_person([right], (10, 10, 20, 20)) is None


def test_a_real_face_is_matched_by_dlibs_shipped_model() -> None:
    identity = FaceIdentity()
    astronaut, camera = skimage_data.astronaut(), np.stack([skimage_data.camera()] * 3, -1)
    group = np.concatenate([astronaut, camera], axis=1)  # the subject left, another person right
    reference = np.asarray(Image.fromarray(astronaut[40:240, 120:320]).resize((160, 160)))
    (ref_face,) = identity.faces(reference)
    matched = match_face(identity.faces(group), ref_face.embedding, 0.6)
    assert matched.status == "matched" and matched.distance < 0.3
    _, top, right, bottom = matched.face.box
    assert right <= 512 and 60 < top < bottom < 200  # the astronaut's face, not the cameraman
    h, w = group.shape[:2]
    people = [_person(h, w, slice(0, h), slice(0, 512), 0.9), _person(h, w, slice(0, h), slice(512, w), 0.9)]
    assert pick_person(people, matched.face.box) is people[0]
    mirrored = np.concatenate([astronaut, astronaut[:, ::-1]], axis=1)  # the same person twice
    assert match_face(identity.faces(mirrored), ref_face.embedding, 0.6).status == "ambiguous"


def _mask2former(folder: Path) -> None:
    """The built-in tiny Mask2Former (a person class), saved as a transformers folder."""
    processor, model = tiny_mask2former()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


@pytest.mark.slow
def test_the_command_reports_every_photo_and_writes_binary_masks(tmp_path: Path) -> None:
    astronaut, camera = skimage_data.astronaut(), np.stack([skimage_data.camera()] * 3, -1)
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(np.concatenate([astronaut, camera], axis=1)).save(photos / "group.jpg")
    Image.fromarray(camera).save(photos / "nobody.png")  # no face dlib finds
    Image.fromarray(astronaut[40:240, 120:320]).save(tmp_path / "reference.png")
    _mask2former(tmp_path / "m2f")
    args = [
        "masks",
        "instance",
        "--input",
        str(photos),
        "--output",
        str(tmp_path / "out"),
        "--reference",
        str(tmp_path / "reference.png"),
        "--model",
        str(tmp_path / "m2f"),
        "--person_threshold",
        "0",
        "--write-empty-on-fail",
        "--device",
        "cpu",
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "2 mask(s) written" in result.output and "1 no face" in result.output
    with Image.open(tmp_path / "out" / "nobody.png") as empty:
        assert not np.asarray(empty).any()
    with Image.open(tmp_path / "out" / "group.png") as mask:
        assert mask.size == (1024, 512) and set(np.unique(np.asarray(mask))) <= {0, 255}
    refused = CliRunner().invoke(main, [*args, "--backend", "yolo"])
    assert refused.exit_code == 2 and "--backend yolo: ultralytics' YOLO is AGPL-3.0" in refused.output
    refused = CliRunner().invoke(main, [*args, "--yolo-conf", "0.25"])
    assert refused.exit_code == 2 and "--yolo-conf is the reference tool's, not masktrain's" in refused.output
    only = CliRunner().invoke(main, [*args[:5], str(tmp_path / "only"), *args[6:], "--files", "nobody"])
    assert only.exit_code == 0 and "1 mask(s) written" in only.output
    assert [p.name for p in (tmp_path / "only").iterdir()] == ["nobody.png"]


def test_bad_flags_are_named(tmp_path: Path) -> None:
    common = dict(input=tmp_path, output=tmp_path / "o", reference=tmp_path / "r.png", model=tmp_path)
    with pytest.raises(FlagError, match="--id-threshold must be > 0"):
        InstanceConfig(**common, id_threshold=0)
    with pytest.raises(FlagError, match="--backend sam3: SAM 3 needs its own environment"):
        InstanceConfig(**common, backend="sam3")


def test_the_device_is_the_commands_one_choice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``masktrain.device.resolve_device``: a --device this machine lacks stops before any model loads."""
    import torch

    from masktrain.masks import instance

    (tmp_path / "photos").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "photos" / "a.png")
    config = InstanceConfig(
        tmp_path / "photos", tmp_path / "out", tmp_path / "reference.png", Path("tiny"), device="cuda"
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(instance, "FaceIdentity", lambda: pytest.fail("a model loaded"))
    with pytest.raises(FlagError, match="--device cuda: no CUDA device is available"):
        instance.run(config)


@pytest.mark.slow
def test_the_docs_chain_tiers_instance_apply_cache_train(tmp_path: Path) -> None:
    """The "Make your masks" commands of docs/masks.md, as written, from make_sample's group photos
    to a trained LoRA (tiny models)."""
    import subprocess
    import sys

    from helpers import masktrain_command

    doc = (Path(__file__).resolve().parent.parent / "docs" / "masks.md").read_text()
    section = doc.split("## Make your masks", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    lines = section.replace("\\\n", " ").splitlines()
    script = Path(__file__).resolve().parent.parent / "scripts" / "make_sample.py"
    ran = 0
    for line in (x.split("#", 1)[0].strip() for x in lines):
        if not line or line.startswith("pip "):
            continue
        if line.startswith("python scripts/make_sample.py"):
            command = [sys.executable, str(script), *line.split()[2:]]
        else:
            command = masktrain_command(line.removeprefix("masktrain "))
        result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{line}\n{result.stdout[-2000:]}{result.stderr[-2000:]}"
        if "masks instance" in line:
            assert "2 mask(s) written (0 empty), 0 skipped (existing); 2 matched" in result.stdout
        ran += 1
    assert ran == 6 and (tmp_path / "sample" / "group_out" / "lora.safetensors").is_file()
    with Image.open(tmp_path / "sample" / "masks_subject" / "group_0.png") as mask:
        assert mask.size == (1024, 512)
