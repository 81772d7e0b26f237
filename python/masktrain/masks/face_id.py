"""Face identity with dlib: its HOG frontal-face detector, its 5-point landmark model and its
ResNet face-recognition model (128-d embeddings; two faces are one person at a Euclidean distance
of 0.6 or less), the model files from the ``face-recognition-models`` package, so this works
offline with nothing to download (``pip install masktrain[masks]``: ``dlib-bin`` and
``face-recognition-models``; dlib is Boost-licensed, the 5-point and recognition models CC0).

The model files are found through the package's folder: its ``__init__`` imports
``pkg_resources``, which recent setuptools no longer ship.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from masktrain.errors import FlagError

INSTALL = "pip install masktrain[masks] (dlib-bin and face-recognition-models)"


@dataclass(frozen=True)
class Face:
    box: tuple[int, int, int, int]
    """left, top, right, bottom (pixels)."""
    embedding: np.ndarray

    @property
    def area(self) -> int:
        left, top, right, bottom = self.box
        return max(0, right - left) * max(0, bottom - top)


def _models() -> Path:
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise FlagError(f"masks instance needs face-recognition-models: {INSTALL}")
    return Path(next(iter(spec.submodule_search_locations))) / "models"


class FaceIdentity:
    def __init__(self, upsample: int = 1) -> None:
        try:
            import dlib  # type: ignore[import-untyped]  # no stubs
        except ImportError:
            raise FlagError(f"masks instance needs dlib: {INSTALL}") from None
        models = _models()
        self._dlib: Any = dlib
        self.detector = dlib.get_frontal_face_detector()
        self.landmarks = dlib.shape_predictor(str(models / "shape_predictor_5_face_landmarks.dat"))
        self.recognition = dlib.face_recognition_model_v1(
            str(models / "dlib_face_recognition_resnet_model_v1.dat")
        )
        self.upsample = upsample

    def faces(self, rgb: np.ndarray) -> list[Face]:
        """Every face dlib finds in an (H, W, 3) uint8 RGB image, with its embedding."""
        image = np.ascontiguousarray(rgb)
        found = []
        for rect in self.detector(image, self.upsample):
            shape = self.landmarks(image, rect)
            embedding = np.array(self.recognition.compute_face_descriptor(image, shape))
            found.append(Face((rect.left(), rect.top(), rect.right(), rect.bottom()), embedding))
        return found


def distance(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b))
