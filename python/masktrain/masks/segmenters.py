"""The human-parsing models ``masks tiers`` runs, each with the library made for it, returning one
label map (class id per pixel, at the image's own size) per image:

- a transformers folder (``--model DIR``: ``config.json``, safetensors weights, the image
  processor's ``preprocessor_config.json``), e.g. SegFormer human-parsing / clothes checkpoints:
  ``AutoImageProcessor`` + ``AutoModelForSemanticSegmentation``; the logits are upsampled to the
  image bilinearly, as transformers' ``post_process_semantic_segmentation`` does;
- a Sapiens segmentation TorchScript file (``--model sapiens_*_torchscript.pt2
  --trust_torchscript``): ``torch.jit.load``, with the preprocessing of Sapiens' own demo
  (``lite/demo``: 1024x768 bilinear resize, RGB, mean (123.5, 116.5, 103.5), std (58.5, 57.0,
  57.5) on 0..255), the 28 Goliath classes.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from masktrain.errors import ModelLoadError
from masktrain.masks.label_tables import SAPIENS_CLASSES
from masktrain.masks.tiny import TINY, tiny_segformer

SAPIENS_SIZE = (1024, 768)
"""Sapiens' input (height, width)."""
SAPIENS_MEAN = (123.5, 116.5, 103.5)
SAPIENS_STD = (58.5, 57.0, 57.5)


class Segmenter(Protocol):
    classes: list[str]
    """Class names by id."""

    def label_maps(self, images: list[Any]) -> list[np.ndarray]:
        """One (H, W) int64 label map per PIL image, at its size."""
        ...


def _upsampled_argmax(logits: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """(C, h, w) logits -> (H, W) class ids, the logits resized bilinearly to `size` (H, W)."""
    resized = torch.nn.functional.interpolate(
        logits[None].float(), size=size, mode="bilinear", align_corners=False
    )
    return resized[0].argmax(dim=0).cpu().numpy()


class TransformersSegmenter:
    def __init__(self, folder: Path, device: torch.device) -> None:
        from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

        if str(folder) == TINY:
            self.processor, self.model = tiny_segformer()
        else:
            self._load(folder, AutoImageProcessor, AutoModelForSemanticSegmentation)
        self.model = self.model.to(device).eval()
        self.device = device
        id2label = self.model.config.id2label
        self.classes = [str(id2label[i]) for i in range(len(id2label))]

    def _load(self, folder: Path, processor: Any, model: Any) -> None:
        try:
            self.processor = processor.from_pretrained(folder, local_files_only=True)
            self.model = model.from_pretrained(folder, local_files_only=True, use_safetensors=True)
        except (OSError, ValueError) as error:
            raise ModelLoadError(
                f"--model {folder}: not a transformers segmentation folder with safetensors weights and "
                f"its preprocessor_config.json ({error})"
            ) from None

    @torch.no_grad()
    def label_maps(self, images: list[Any]) -> list[np.ndarray]:
        inputs = self.processor(images=images, return_tensors="pt").to(self.device)
        logits = self.model(**inputs).logits
        return [
            _upsampled_argmax(row, (image.height, image.width))
            for row, image in zip(logits, images, strict=True)
        ]


class SapiensSegmenter:
    def __init__(self, path: Path, device: torch.device) -> None:
        try:
            with warnings.catch_warnings():  # torch deprecates TorchScript; Sapiens ships it
                warnings.filterwarnings("ignore", "`torch.jit.load` is deprecated", FutureWarning)
                self.model = torch.jit.load(str(path), map_location=device).eval()  # type: ignore[no-untyped-call]  # torch leaves it unannotated
        except RuntimeError as error:
            raise ModelLoadError(
                f"--model {path}: not a TorchScript file ({str(error).splitlines()[0]})"
            ) from None
        self.device = device
        self.classes = list(SAPIENS_CLASSES)

    @torch.no_grad()
    def label_maps(self, images: list[Any]) -> list[np.ndarray]:
        mean = torch.tensor(SAPIENS_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(SAPIENS_STD).view(1, 3, 1, 1)
        resized = [
            # OpenCV's INTER_LINEAR, as Sapiens' demo resizes: half-pixel centres, no antialiasing
            torch.nn.functional.interpolate(
                torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float(),
                size=SAPIENS_SIZE,
                mode="bilinear",
                align_corners=False,
            )
            for image in images
        ]
        batch = ((torch.cat(resized) - mean) / std).to(self.device)
        logits = self.model(batch)
        if logits.shape[1] != len(self.classes):
            raise ModelLoadError(
                f"--model: the TorchScript model gives {logits.shape[1]} classes, not Sapiens' "
                f"{len(self.classes)}"
            )
        return [
            _upsampled_argmax(row, (image.height, image.width))
            for row, image in zip(logits, images, strict=True)
        ]


def load_segmenter(model: Path, device: torch.device) -> Segmenter:
    if str(model) == TINY or model.is_dir():
        return TransformersSegmenter(model, device)
    return SapiensSegmenter(model, device)
