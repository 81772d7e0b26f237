"""The rows ``bench_memory.py`` measures: the real model configs, the shapes users train, and the
GPU and CPU plans (GPU rows in priority order)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from masktrain import catalog


@dataclass(frozen=True)
class ModelSpec:
    label: str
    arch: str  # --arch
    config: dict[str, Any] = field(hash=False)  # diffusers constructor kwargs

    @property
    def layers(self) -> int:
        return int(self.config["num_layers"])

    @property
    def latent_channels(self) -> int:  # Qwen-Image packs 2x2 latent cells: in_channels = 4 x 16
        return int(self.config["in_channels" if self.arch == "wan" else "out_channels"])

    @property
    def text_dim(self) -> int:
        return int(self.config["text_dim" if self.arch == "wan" else "joint_attention_dim"])


def _released(name: str) -> dict[str, Any]:
    return dict(catalog.released(name)[1].config)


MODELS = {  # the released configs, from the catalog (what masktrain plan --dit NAME plans)
    "wan1.3b": ModelSpec("WAN 2.1 1.3B", "wan", _released("wan2.1-1.3b")),
    "wan14b": ModelSpec("WAN 14B / 2.2 expert", "wan", _released("wan2.1-14b")),
    "qwen20b": ModelSpec("Qwen-Image 20B", "qwen_image", _released("qwen-image-20b")),
}


def tiny_models() -> dict[str, ModelSpec]:
    """--tiny: the built-in 2-layer test configs under the same keys (a smoke run in seconds)."""
    from masktrain.models import qwen_image, wan

    return {
        key: ModelSpec(f"{spec.label} (tiny)", spec.arch, dict(wan.TINY_TRANSFORMER))
        if spec.arch == "wan"
        else ModelSpec(f"{spec.label} (tiny)", spec.arch, dict(qwen_image.TINY_TRANSFORMER))
        for key, spec in MODELS.items()
    }


@dataclass(frozen=True)
class Shape:
    label: str
    latent: tuple[int, int, int]  # (F, h, w): the VAE's 8x spatial, 4x temporal compression
    text_tokens: int


SHAPES = {
    "1024sq": Shape("1024x1024 image", (1, 128, 128), 256),
    "720p": Shape("1280x720 image", (1, 90, 160), 512),
    "clip81": Shape("81x832x480 clip", (21, 60, 104), 512),
    "256sq": Shape("256x256 image", (1, 32, 32), 512),
}


@dataclass(frozen=True)
class Row:
    model: str
    shape: str
    fp8: bool
    swap: int = 0
    offload: bool = False  # gradient checkpointing's activations on the host
    prior: bool = True  # masked + prior preservation; False: masked only
    pin: bool = True
    target_gib: float | None = None

    @property
    def mode(self) -> str:
        parts = ["fp8" if self.fp8 else "bf16"]
        if self.swap:
            parts.append(f"swap{self.swap}" + ("" if self.pin else " unpinned"))
        loss = "prior" if self.prior else "masked"
        return f"{'+'.join(parts)}, ckpt{'+offload' if self.offload else ''}, {loss}"

    @property
    def id(self) -> str:
        return self.model + "-" + self.shape + "-" + self.mode.replace(", ", "-").replace(" ", "-")

    def twin(self, **changes: Any) -> Row:
        return replace(self, target_gib=None, **changes)


def gpu_plan(models: dict[str, ModelSpec]) -> list[Row]:
    """In priority order: what the targets need first, then the rest."""

    def swap(model: str, n: int) -> int:  # --tiny models have 2 blocks
        return min(n, models[model].layers - 1)

    q16, q45, w20 = swap("qwen20b", 16), swap("qwen20b", 45), swap("wan14b", 20)
    wan = Row("wan14b", "720p", fp8=True, swap=w20, target_gib=24)
    qwen = Row("qwen20b", "1024sq", fp8=True, swap=q16, target_gib=24)
    return [
        qwen,
        replace(qwen, swap=q45, target_gib=12),
        wan,
        wan.twin(swap=0),  # swap overhead
        wan.twin(prior=False),  # prior / masked with swap on
        replace(qwen, swap=0, target_gib=30),
        replace(qwen, fp8=False, swap=0, target_gib=42),
        qwen.twin(swap=q45, prior=False),
        wan.twin(offload=True),
        wan.twin(pin=False),
        wan.twin(fp8=False, swap=0),
        qwen.twin(swap=q45, offload=True),
        wan.twin(shape="clip81"),
        wan.twin(shape="clip81", offload=True),
    ]


def cpu_plan(models: dict[str, ModelSpec], quick: bool) -> list[Row]:
    """WAN 1.3B at 256x256 in every mode (a step takes 10-30 s on 2 cores); `quick`: two modes
    that between them cover every code path."""
    half = models["wan1.3b"].layers // 2
    base = Row("wan1.3b", "256sq", fp8=True)
    if quick:
        return [base.twin(fp8=False, prior=False), base.twin(swap=half, offload=True)]
    return [
        base.twin(fp8=fp8, swap=n, offload=offload, prior=prior)
        for fp8, n in ((False, 0), (True, 0), (True, half))
        for offload in (False, True)
        for prior in (False, True)
    ]
