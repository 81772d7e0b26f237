"""``masktrain masks instance``: the binary mask of one subject in group photos, as the reference
tool (``tools/create_instance_masks.py``) makes it, with masktrain's libraries: dlib finds and
embeds the faces (``masks.face_id``), the face that matches the reference photo's is the subject's,
and the person instance that contains it (``masks.people``) is the mask.

Matching never guesses: a photo where no face is within ``--id-threshold`` of the reference is
"no match", one where two or more are is "ambiguous"; both are reported per photo and get no mask
(with ``--fallback-largest`` a "no match" or "no face" photo takes its largest person instead; with
``--write-empty-on-fail`` a photo without a result gets an all-zero mask). The person: among the
instances that contain the face box's centre, the best (score, area); else the one that overlaps
the box most; none overlapping is "no person" (the reference tool's rules).

A photo that cannot be read (not an image, truncated, a decompression bomb over the pixel limit)
is "failed", named with why, and the others go on; a --reference that cannot be read is a flag
error before any model loads.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from masktrain.config.masks import InstanceConfig
from masktrain.device import resolve_device
from masktrain.errors import DataError, FlagError
from masktrain.masks.face_id import Face, FaceIdentity, distance
from masktrain.masks.files import UNREADABLE, list_inputs, open_upright, output_folder, write_mask
from masktrain.masks.people import Person, PersonSegmenter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Match:
    status: str
    """matched, no face, no match or ambiguous."""
    face: Face | None = None
    distance: float | None = None
    """The matched face's distance (or the nearest one's)."""


def match_face(faces: list[Face], reference: np.ndarray, threshold: float) -> Match:
    if not faces:
        return Match("no face")
    scored = sorted(((distance(face.embedding, reference), face) for face in faces), key=lambda pair: pair[0])
    within = [(d, face) for d, face in scored if d <= threshold]
    if not within:
        return Match("no match", distance=scored[0][0])
    if len(within) > 1:
        return Match("ambiguous", distance=within[1][0])
    return Match("matched", within[0][1], within[0][0])


def pick_person(people: list[Person], box: tuple[int, int, int, int]) -> Person | None:
    """The person instance of the face `box` (see the module docstring)."""
    left, top, right, bottom = box
    cx, cy = (left + right) // 2, (top + bottom) // 2
    containing = [
        p for p in people if 0 <= cy < p.mask.shape[0] and 0 <= cx < p.mask.shape[1] and p.mask[cy, cx]
    ]
    if containing:
        return max(containing, key=lambda p: (p.score, p.area))
    overlaps = [(int(p.mask[max(top, 0) : bottom, max(left, 0) : right].sum()), p) for p in people]
    best = max(overlaps, key=lambda pair: pair[0], default=(0, None))
    return best[1] if best[0] > 0 else None


@dataclass
class InstanceSummary:
    results: dict[str, str] = field(default_factory=dict)
    """Photo name -> matched / no face / no match / ambiguous / no person / largest person / failed."""
    failed: list[tuple[Path, str]] = field(default_factory=list)
    """Photos that could not be read, with why."""
    written: int = 0
    empty: int = 0
    skipped: int = 0

    def line(self) -> str:
        counts = Counter(self.results.values())
        parts = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
        return (
            f"{self.written} mask(s) written ({self.empty} empty), {self.skipped} skipped (existing); "
            f"{parts or 'no photos'}"
        )


def run(config: InstanceConfig) -> InstanceSummary:
    photos = list_inputs(config.input, "--input")
    if config.files is not None:
        unknown = sorted(set(config.files) - {p.stem for p in photos})
        if unknown:
            raise DataError(f"--files: no photo named {', '.join(unknown)} in {config.input}")
        photos = [p for p in photos if p.stem in config.files]
    device = resolve_device(config.device)  # a --device this machine lacks stops before any model loads
    try:
        reference_image = np.asarray(open_upright(config.reference))
    except UNREADABLE as error:
        raise FlagError(f"--reference {error}; pass a photo of the subject's face") from None
    identity = FaceIdentity()
    reference_faces = identity.faces(reference_image)
    if not reference_faces:
        raise FlagError(
            f"--reference {config.reference}: no face found; use a clear, frontal photo of the subject"
        )
    reference = max(reference_faces, key=lambda face: face.area).embedding
    segmenter = PersonSegmenter(config.model, device, config.person_threshold)
    summary = InstanceSummary()
    with output_folder(config.output):
        for path in tqdm(photos, desc="instance", unit="photo"):
            target = config.output / f"{path.stem}.png"
            if config.skip_existing and target.exists():
                summary.skipped += 1
                continue
            try:
                image = open_upright(path)
            except UNREADABLE as error:  # not an image, truncated, a decompression bomb: this photo fails
                summary.results[path.name] = "failed"
                summary.failed.append((path, str(error)))
                log.error("failed: %s", error)
                continue
            mask = _subject_mask(image, path.name, identity, reference, segmenter, config, summary)
            if mask is not None:
                write_mask(target, np.where(mask, 255, 0).astype(np.uint8))
                summary.written += 1
    return summary


def _subject_mask(
    image: Image.Image,
    name: str,
    identity: FaceIdentity,
    reference: np.ndarray,
    segmenter: PersonSegmenter,
    config: InstanceConfig,
    summary: InstanceSummary,
) -> np.ndarray | None:
    """The (H, W) bool mask of the subject in the photo `image` (an all-False one with
    --write-empty-on-fail, else None when there is no result), its status noted in `summary`."""
    matched = match_face(identity.faces(np.asarray(image)), reference, config.id_threshold)
    people = segmenter.people(image)
    person: Person | None = None
    status = matched.status
    if matched.face is not None:
        person = pick_person(people, matched.face.box)
        status = "matched" if person is not None else "no person"
    elif config.fallback_largest and status in ("no face", "no match") and people:
        person = max(people, key=lambda p: p.area)
        status = "largest person"
    summary.results[name] = status
    if person is not None:
        return person.mask
    where = f" (nearest face distance {matched.distance:.3f})" if matched.distance is not None else ""
    log.warning(
        "%s: %s%s; %s", name, status, where, "empty mask" if config.write_empty_on_fail else "no mask"
    )
    if not config.write_empty_on_fail:
        return None
    summary.empty += 1
    return np.zeros((image.height, image.width), dtype=np.bool_)
