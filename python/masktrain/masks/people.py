"""Person instances from a transformers universal-segmentation folder (Mask2Former, MaskFormer,
OneFormer trained on COCO: the ``person`` class), through the library's own instance
post-processing (``post_process_instance_segmentation``), each mask at the image's size."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from masktrain.errors import ModelLoadError
from masktrain.masks.label_tables import normalize
from masktrain.masks.tiny import TINY, tiny_mask2former


@dataclass(frozen=True)
class Person:
    mask: np.ndarray
    """(H, W) bool."""
    score: float

    @property
    def area(self) -> int:
        return int(self.mask.sum())


class PersonSegmenter:
    def __init__(self, folder: Path, device: torch.device, threshold: float) -> None:
        from transformers import AutoImageProcessor, AutoModelForUniversalSegmentation

        try:
            if str(folder) == TINY:
                self.processor, model = tiny_mask2former()
            else:
                self.processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)  # type: ignore[no-untyped-call,unused-ignore]  # unannotated before transformers 5.2x
                model = AutoModelForUniversalSegmentation.from_pretrained(
                    folder, local_files_only=True, use_safetensors=True
                )
        except (OSError, ValueError) as error:
            raise ModelLoadError(
                f"--model {folder}: not a transformers Mask2Former / MaskFormer / OneFormer folder with "
                f"safetensors weights and its preprocessor_config.json ({error})"
            ) from None
        self.model = model.to(device).eval()
        self.device, self.threshold = device, threshold
        labels = self.model.config.id2label
        self.person_ids = {int(i) for i, name in labels.items() if normalize(str(name)) == "person"}
        if not self.person_ids:
            first = ", ".join(map(str, list(labels.values())[:5]))
            raise ModelLoadError(
                f"--model {folder}: no 'person' class among its labels ({first}, ...); use a COCO instance "
                "or panoptic checkpoint"
            )
        self.oneformer = self.model.config.model_type == "oneformer"

    @torch.no_grad()
    def people(self, image: Any) -> list[Person]:
        kwargs: dict[str, Any] = {"task_inputs": ["instance"]} if self.oneformer else {}
        inputs = self.processor(images=[image], return_tensors="pt", **kwargs).to(self.device)
        outputs = self.model(**inputs)
        result = self.processor.post_process_instance_segmentation(
            outputs, threshold=self.threshold, target_sizes=[(image.height, image.width)]
        )[0]
        segmentation = result["segmentation"].cpu().numpy()
        return [
            Person(segmentation == info["id"], float(info["score"]))
            for info in result["segments_info"]
            if int(info["label_id"]) in self.person_ids
        ]
