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
        """Its transformer blocks (block swap counts them), read off the model on the meta device."""
        from masktrain.models import get_family

        family = get_family(self.arch)
        return len(family.blocks(family.empty_transformer(self.config)))

    @property
    def latent_channels(self) -> int:
        """The channels of the latents it denoises (Qwen-Image's 16, packed 2x2 inside the model)."""
        return self._inputs.latent_channels

    @property
    def text_dim(self) -> int:
        return self._inputs.text_dim

    @property
    def _inputs(self) -> Any:
        from masktrain.models import get_family

        return get_family(self.arch).denoiser_inputs(self.config)


def _released(name: str) -> dict[str, Any]:
    return dict(catalog.released(name)[1].config)


# The released configs, from the catalog (what masktrain plan --dit NAME plans); a family's rows
# appear once its record is in the catalog.
_RELEASED = {
    "wan1.3b": ("WAN 2.1 1.3B", "wan", "wan2.1-1.3b"),
    "wan14b": ("WAN 14B / 2.2 expert", "wan", "wan2.1-14b"),
    "qwen20b": ("Qwen-Image 20B", "qwen_image", "qwen-image-20b"),
    "zimage6b": ("Z-Image 6B", "z_image", "z-image-6b"),
    "klein4b": ("FLUX.2 klein 4B", "flux2", "flux2-klein-4b"),
    "klein9b": ("FLUX.2 klein 9B", "flux2", "flux2-klein-9b"),
    "flux2dev": ("FLUX.2 dev 32B", "flux2", "flux2-dev"),
    "qwen21": ("Qwen-Image 2.1 7B", "qwen_image_2_1", "qwen-image-2.1-7b"),
}
MODELS = {
    key: ModelSpec(label, arch, _released(name))
    for key, (label, arch, name) in _RELEASED.items()
    if name in catalog.released_names()
}


def tiny_models() -> dict[str, ModelSpec]:
    """--tiny: each family's built-in tiny config under the same keys (a smoke run in seconds)."""
    from masktrain.models import get_family

    def tiny(arch: str) -> dict[str, Any]:
        config = get_family(arch).transformer_config("tiny", "--dit")
        assert config is not None
        return dict(config)

    return {
        key: ModelSpec(f"{spec.label} (tiny)", spec.arch, tiny(spec.arch)) for key, spec in MODELS.items()
    }


@dataclass(frozen=True)
class Shape:
    label: str
    pixels: tuple[int, int, int]  # (frames, height, width)
    text_tokens: int

    def latent(self, arch: str) -> tuple[int, int, int]:
        """(F, h, w) on the family's latent grid (its released VAE's factors)."""
        spec = catalog.arch(arch)
        frames, height, width = self.pixels
        factor = spec.spatial_factor
        return (frames - 1) // spec.temporal_factor + 1, height // factor, width // factor


SHAPES = {
    "1024sq": Shape("1024x1024 image", (1, 1024, 1024), 256),
    "720p": Shape("1280x720 image", (1, 720, 1280), 512),
    "clip81": Shape("81x832x480 clip", (81, 480, 832), 512),
    "256sq": Shape("256x256 image", (1, 256, 256), 512),
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
        *_image_family_rows(models),
    ]


def _image_family_rows(models: dict[str, ModelSpec]) -> list[Row]:
    """The newer image families at 1024x1024 on the cards their users have (12-24 GB), fp8, with
    the swap musubi-tuner's docs give for the big ones; only those whose record is in the catalog."""
    wanted = [
        ("zimage6b", 0, 16),
        ("klein4b", 0, 12),
        ("klein9b", 0, 24),
        ("qwen21", 0, 24),
        ("flux2dev", 29, 24),  # 32B: only a GPU can hold it, and only with block swap
    ]
    return [
        Row(key, "1024sq", fp8=True, swap=min(swap, models[key].layers - 1), target_gib=target)
        for key, swap, target in wanted
        if key in models
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
