"""Builders the test files share (so no test file imports another): synthetic photos and tiered
masks, video files, and a ``cache`` run on the built-in tiny models."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import av
import numpy as np


def tiered(h: int, w: int, seed: int) -> np.ndarray:
    """A tiered mask: body 128 below a hair ring 80 around a face 255, background 0."""
    y, x = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(seed)
    cx, cy = w * rng.uniform(0.4, 0.6), h * rng.uniform(0.35, 0.5)
    mask = np.zeros((h, w), np.uint8)
    mask[(abs(x - cx) < w * 0.25) & (y > cy)] = 128
    mask[((x - cx) / (w * 0.2)) ** 2 + ((y - cy) / (h * 0.2)) ** 2 < 1] = 80
    mask[((x - cx) / (w * 0.1)) ** 2 + ((y - cy) / (h * 0.1)) ** 2 < 1] = 255
    return mask


def photo(h: int, w: int, seed: int) -> np.ndarray:
    """An RGB gradient with seeded noise."""
    y, x = np.mgrid[0:h, 0:w]
    noise = np.random.default_rng(seed).integers(-15, 16, (h, w, 3))
    return (
        (np.stack([x * 255 // w, y * 255 // h, (x + y) * 127 // (w + h)], -1) + noise)
        .clip(0, 255)
        .astype(np.uint8)
    )


def frame(index: int, w: int = 64, h: int = 48) -> np.ndarray:
    """Red = 10 * index (the frame's identity), a green bar that moves, a blue gradient."""
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[..., 0] = 10 * index
    rgb[:, (3 * index) % w, 1] = 255
    rgb[..., 2] = np.arange(w, dtype=np.uint8)[None, :] * 3
    return rgb


def write_video(
    path: Path, count: int, w: int = 64, h: int = 48, fps: int = 30, lossless: bool = True
) -> None:
    """FFV1 in Matroska (lossless RGB, frames decode exactly) or H.264 in MP4."""
    codec, pix_fmt = ("ffv1", "bgr0") if lossless else ("libx264", "yuv420p")
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, pix_fmt
        for index in range(count):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame(index, w, h), format="rgb24")))
        container.mux(stream.encode())


def cache_tiny(root: Path, arch: str = "wan", **overrides: Any) -> Any:
    """``masktrain cache`` of ``root/dataset.toml`` with the tiny models on the CPU; returns the
    summaries."""
    from masktrain.cache import run
    from masktrain.config import CacheConfig

    settings: dict[str, Any] = {
        "dataset_config": root / "dataset.toml",
        "arch": arch,
        "vae": "tiny",
        "text_encoder": "tiny",
        "device": "cpu",
    }
    return run(CacheConfig(**{**settings, **overrides}))


def words(line: str, **paths: object) -> list[str]:
    """A command line written as on a shell, one list item per word; ``{name}`` placeholders are
    filled after the split, so a path with spaces stays one word."""
    return [word.format(**{name: str(value) for name, value in paths.items()}) for word in line.split()]


def masktrain_command(line: str, **paths: object) -> list[str]:
    """``python -m masktrain.cli`` followed by `line` (see :func:`words`)."""
    return [sys.executable, "-m", "masktrain.cli", *words(line, **paths)]


MASKED_PRIOR_SETTINGS_KWARGS: dict[str, Any] = {
    "use_mask_loss": True,
    "mask_gamma": 0.7,
    "prior_preservation_weight": 1.0,
    "prior_mask_threshold": 0.1,
    "normalize_per_sample": True,
}


def make_dataset(root: Path, *, masks: bool = True, count: int = 4) -> Path:
    """`count` 64x64 photos with tiered masks (or none) and captions, in batches of 2."""
    from PIL import Image

    images = root / "images"
    images.mkdir(parents=True)
    mask_lines = ""
    if masks:
        (root / "masks").mkdir()
        mask_lines = 'mask_directory = "masks"'
    for index in range(count):
        Image.fromarray(photo(64, 64, index)).save(images / f"item{index}.png")
        if masks:
            Image.fromarray(tiered(64, 64, index)).save(root / "masks" / f"item{index}.png")
        (images / f"item{index}.txt").write_text(f"a photo of subject {index}")
    toml = root / "dataset.toml"
    toml.write_text(
        f"""
[general]
resolution = [64, 64]
batch_size = 2

[[datasets]]
image_directory = "images"
cache_directory = "cache"
{mask_lines}
"""
    )
    return toml


def cached(root: Path, arch: str = "wan", **kwargs: Any) -> Path:
    """:func:`make_dataset`, cached with the tiny models; returns its TOML."""
    toml = make_dataset(root, **kwargs)
    cache_tiny(root, arch)
    return toml


def train_config(toml: Path, out: Path, arch: str = "wan", **kwargs: Any) -> Any:
    """A small ``TrainConfig`` on the tiny models (masked prior preservation, rank 4)."""
    from masktrain.config import MaskLossSettings, NetworkSettings, OptimSettings, TrainConfig

    defaults: dict[str, Any] = dict(
        dataset_config=toml,
        arch=arch,
        dit="tiny",
        output_dir=out,
        device="cpu",
        max_train_steps=4,
        network=NetworkSettings(network_dim=4, network_alpha=4.0),
        optim=OptimSettings(learning_rate=1e-3),
        mask=MaskLossSettings(**MASKED_PRIOR_SETTINGS_KWARGS),
    )
    defaults.update(kwargs)
    return TrainConfig(**defaults)


def wait_for_steps(process: Any, metrics: Path, steps: int, timeout: float = 120) -> None:
    """Wait until a training `process` has logged `steps` optimizer steps to `metrics`."""
    import time

    deadline = time.monotonic() + timeout
    while not (metrics.exists() and metrics.read_text().count("\n") >= steps):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.2)


# --- tiny denoisers with a LoRA (test_lora_export.py, test_lora_file.py) ---------------------------

LORA_ARCHES = ["wan", "qwen_image"]
LORA_RANK, LORA_ALPHA = 4, 2.0  # alpha != rank, so a lost alpha shows; alpha / rank is exact in binary

WAN_BLOCK = [
    *(f"attn{i}.{p}" for i in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0")),
    "ffn.net.0.proj",
    "ffn.net.2",
]
QWEN_BLOCK = [
    *(f"attn.{p}" for p in ("to_q", "to_k", "to_v", "add_k_proj", "add_v_proj", "add_q_proj", "to_out.0")),
    "attn.to_add_out",
    "img_mlp.net.0.proj",
    "img_mlp.net.2",
    "txt_mlp.net.0.proj",
    "txt_mlp.net.2",
]
DEFAULT_TARGETS = {
    "wan": [f"blocks.{b}.{m}" for b in range(2) for m in WAN_BLOCK],
    "qwen_image": [f"transformer_blocks.{b}.{m}" for b in range(2) for m in QWEN_BLOCK],
}


def randn(*shape: int, seed: int = 0) -> Any:
    import torch

    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def tiny_denoiser(arch: str) -> Any:
    """The built-in tiny transformer of `arch`, without an adapter."""
    import torch

    from masktrain.models import get_family

    return get_family(arch).load_transformer("tiny", "--dit", torch.device("cpu"), torch.float32)


def denoiser_inputs(arch: str) -> tuple[Any, Any, Any]:
    """(noisy latents, sigmas, text) of two samples for `arch`'s tiny transformer."""
    import torch

    from masktrain.models import get_family

    family = get_family(arch)
    if arch == "wan":
        noisy, text = randn(2, 16, 3, 4, 4), [randn(5, 32, seed=1), randn(9, 32, seed=2)]
    else:
        noisy, text = randn(2, 4, 1, 4, 6), [randn(3, 16, seed=1), randn(6, 16, seed=2)]
    return noisy, torch.tensor([0.3, 0.85]), family.collate_text(text)


def denoiser_output(arch: str, transformer: Any) -> Any:
    """`transformer`'s prediction on :func:`denoiser_inputs`."""
    import torch

    from masktrain.models import get_family

    with torch.no_grad():
        return get_family(arch).predict(transformer, *denoiser_inputs(arch))


def trained_lora(arch: str, seed: int = 0) -> Any:
    """A tiny denoiser with an adapter whose weights are all nonzero (seeded, reproducible)."""
    from masktrain.models import get_family

    transformer = tiny_denoiser(arch)
    nonzero_lora(transformer, get_family(arch), seed)
    return transformer


def nonzero_lora(transformer: Any, family: Any, seed: int = 0) -> list[str]:
    """Add the family's default LoRA to `transformer` (rank 4) with every B weight drawn from a
    seeded normal, so the adapter changes the output; returns the adapted module names."""
    import torch

    from masktrain.denoiser.lora import add_lora

    torch.manual_seed(seed)  # peft's Kaiming init of lora_A draws from the global generator
    names = add_lora(transformer, family, rank=LORA_RANK, alpha=LORA_ALPHA)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return names


def adapted_modules(transformer: Any) -> list[str]:
    from peft.tuners.lora import LoraLayer

    return [name for name, module in transformer.named_modules() if isinstance(module, LoraLayer)]


def pipeline_with_fresh_base(arch: str) -> Any:
    """diffusers' pipeline of `arch` on the tiny models, its transformer without an adapter."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline, WanPipeline

    from masktrain.models import get_family

    family = get_family(arch)
    cpu, f32 = torch.device("cpu"), torch.float32
    encoder = family.load_text_encoder("tiny", cpu, f32)
    components = dict(
        transformer=tiny_denoiser(arch),
        vae=family.load_vae("tiny", cpu, f32),
        text_encoder=encoder.model,
        tokenizer=encoder.tokenizer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
    )
    return WanPipeline(**components) if arch == "wan" else QwenImagePipeline(**components)


def read_safetensors(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """(tensors, metadata) of a safetensors file."""
    import safetensors
    import safetensors.torch

    with safetensors.safe_open(path, "pt") as handle:
        metadata = handle.metadata()
    return safetensors.torch.load_file(path), metadata


def save_array(path: Path, array: Any) -> Path:
    """`array` written as an image (PNG by the suffix), its folder made."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def read_array(path: Path) -> Any:
    """The pixels of the image at `path` as a numpy array."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image)


def check_lora_round_trip(
    tmp_path: Path, layout: str, family: Any, fresh: Any, output: Any, pipeline: Any | None
) -> list[str]:
    """A LoRA with nonzero weights on ``fresh()`` saved in `layout` loads back to the same
    ``output(model)``: through masktrain's loader, and through diffusers' own ``load_lora_weights``
    of ``pipeline(fresh())`` when given (None: a layout diffusers does not read). Returns the
    adapted module names."""
    from masktrain.denoiser.lora import load_lora_into, save_lora

    trained = fresh()
    names = nonzero_lora(trained, family)
    expected = output(trained)
    assert (expected - output(fresh())).abs().max() > 1e-3
    path = tmp_path / f"{layout}.safetensors"
    save_lora(path, trained, family, layout=layout, metadata={})
    loaded = fresh()
    load_lora_into(loaded, path, family)
    assert (output(loaded) - expected).abs().max() == 0
    if pipeline is not None:
        with_lora = pipeline(fresh())
        with_lora.load_lora_weights(str(path))
        assert (output(with_lora.transformer) - expected).abs().max() <= 1e-6
    return names


class TickCounter:
    """A pure-Python thread that keeps counting while it runs (``with TickCounter() as ticks``;
    ``ticks.count``): it stalls while another thread holds the GIL, so a native call that releases
    the GIL lets it count on."""

    def __init__(self) -> None:
        import threading

        self.count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        import time

        while not self._stop.is_set():
            self.count += 1
            time.sleep(0)

    def __enter__(self) -> TickCounter:
        import time

        self._thread.start()
        time.sleep(0.02)
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def tiny_sampler(family: Any, width: int, height: int) -> Any:
    """``sample(cfg, transformer=None)``: one 2-step image of "a cat" from `family`'s tiny models
    (its tiny transformer unless another is given) through its ``generate``, seeded, with the
    family's negative prompt when ``cfg > 1``."""
    import torch

    from masktrain.models.base import SampleRequest

    cpu, f32 = torch.device("cpu"), torch.float32
    encoder = family.load_text_encoder("tiny", cpu, f32)
    tiny, vae = family.load_transformer("tiny", "--dit", cpu, f32), family.load_vae("tiny", cpu, f32)
    text = family.collate_text(family.encode_text(encoder, ["a cat"]))
    negative = family.collate_text(family.encode_text(encoder, [family.default_negative_prompt]))

    def sample(cfg: float, transformer: Any = None) -> Any:
        request = SampleRequest(
            width=width,
            height=height,
            frames=1,
            steps=2,
            cfg_scale=cfg,
            flow_shift=None,
            text=text,
            negative=negative if cfg > 1 else None,
            generator=torch.Generator().manual_seed(0),
        )
        return family.generate(transformer or tiny, None, 0.0, vae, request)

    return sample
