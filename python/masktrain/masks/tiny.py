"""The built-in tiny mask models (``--model tiny``), as ``--dit tiny`` is for training: real
transformers models with random weights from a fixed seed, small enough for the CPU, so the mask
commands run end to end without downloaded weights (their masks are noise):

- a SegFormer with the 18 ATR classes (``masks tiers``), its decode head's logits spread so that
  it predicts several classes;
- a Mask2Former (Swin backbone) with COCO's ``person`` class (``masks instance``).
"""

from __future__ import annotations

from typing import Any

import torch

from masktrain.masks.label_tables import ATR

TINY = "tiny"


def _seeded(build: Any) -> Any:
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(0)
        return build()
    finally:
        torch.random.set_rng_state(state)


def tiny_segformer() -> tuple[Any, Any]:
    """(image processor, model) of the tiny ATR SegFormer."""
    from transformers import SegformerConfig, SegformerForSemanticSegmentation
    from transformers.models.segformer import SegformerImageProcessorPil

    config = SegformerConfig(
        num_encoder_blocks=2,
        depths=[1, 1],
        sr_ratios=[2, 1],
        hidden_sizes=[8, 16],
        patch_sizes=[7, 3],
        strides=[4, 2],
        num_attention_heads=[1, 2],
        mlp_ratios=[2, 2],
        decoder_hidden_size=16,
        id2label=dict(enumerate(ATR.regions)),
        label2id={name: i for i, name in enumerate(ATR.regions)},
    )
    model = _seeded(lambda: SegformerForSemanticSegmentation(config))
    with torch.no_grad():  # random weights predict one class everywhere; spread the logits
        model.decode_head.classifier.weight.mul_(50)
    return SegformerImageProcessorPil(size={"height": 64, "width": 64}), model


def tiny_mask2former() -> tuple[Any, Any]:
    """(image processor, model) of the tiny person Mask2Former."""
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig
    from transformers.models.mask2former import Mask2FormerImageProcessorPil

    # out_features is a backbone keyword transformers' typed config leaves unannotated
    stages: dict[str, Any] = {"out_features": ["stage1", "stage2", "stage3", "stage4"]}
    backbone = SwinConfig(embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=4, **stages)
    config = Mask2FormerConfig(
        backbone_config=backbone,
        hidden_dim=32,
        mask_feature_size=32,
        feature_size=32,
        num_queries=4,
        encoder_layers=1,
        decoder_layers=2,
        encoder_feedforward_dim=32,
        dim_feedforward=32,
        num_attention_heads=2,
        common_stride=4,
        id2label={0: "person", 1: "car"},
        label2id={"person": 0, "car": 1},
    )
    model = _seeded(lambda: Mask2FormerForUniversalSegmentation(config))
    return Mask2FormerImageProcessorPil(size={"shortest_edge": 128, "longest_edge": 256}), model
