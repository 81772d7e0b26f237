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
        """One (H, W) label map (integer class ids) per PIL image, at its size."""
        ...


def _class_by_class(logits: torch.Tensor, size: tuple[int, int]) -> bool:
    """Whether the classes are resized one at a time. torch picks its bilinear kernel by channel
    count, output size and layout (ATen's ``upsample_bilinear2d_kernel_impl_float``). For
    channels-first logits of more than 3 classes and an output with H + W > 128, the CPU kernel
    computes each pixel of each class on its own, as CUDA's does, so one class at a time gives the
    values of the whole call bit for bit. Smaller outputs, 3 classes or fewer, and 1x1 logits (which
    are channels-last too) are resized whole, as before: they are small."""
    return (
        logits.device.type in ("cpu", "cuda")
        and logits.shape[0] > 3
        and size[0] + size[1] > 128
        and logits.shape[1] * logits.shape[2] > 1
    )


def _upsampled_argmax(logits: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """(C, h, w) logits -> (H, W) class ids: the argmax of the logits resized bilinearly to `size`
    (H, W), in float32. Where :func:`_class_by_class`, one class is resized at a time and a running
    maximum kept (ties go to the lower class, as ``argmax`` gives them): two float planes of the
    image's size and its labels are held, not C float planes and int64 labels (about 11 bytes a
    pixel instead of 80 for 18 classes). The logits are made channels-first for it: a batch's may
    come back channels-last (oneDNN's convolutions on the CPU), which torch would resize whole with
    a kernel vectorised across classes, a few units in the last place away (an exact near-tie there
    can fall to the other class: about one pixel in millions)."""
    if not _class_by_class(logits, size):
        resized = torch.nn.functional.interpolate(
            logits[None].float(), size=size, mode="bilinear", align_corners=False
        )
        return resized[0].argmax(dim=0).cpu().numpy()
    logits = logits.contiguous()
    labels = torch.zeros(
        size, dtype=torch.uint8 if logits.shape[0] <= 256 else torch.int64, device=logits.device
    )
    best = torch.empty(0)
    for index in range(logits.shape[0]):
        plane = torch.nn.functional.interpolate(
            logits[None, index : index + 1].float(), size=size, mode="bilinear", align_corners=False
        )[0, 0]
        if index == 0:
            best = plane
            continue
        labels.masked_fill_(plane > best, index)
        torch.maximum(best, plane, out=best)
        del plane  # freed before the next class is resized
    return labels.cpu().numpy()


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
