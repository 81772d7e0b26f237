"""The memory flags of ``masktrain train`` (musubi-tuner's spellings): fp8 base weights, block swap,
the idle WAN 2.2 expert on the host, activation offload, and the attention backend.

Checked here, torch-free: the flags that need another flag, and that the package an attention
backend needs is installed (a one-line error naming what to install). The one check that needs
the model (``--blocks_to_swap`` at most its block count - 1) runs when it is loaded.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Literal

from masktrain.errors import TrainConfigError

Fp8Mode = Literal["e4m3", "scaled"]

#: ``--flag`` -> (diffusers attention backend, the module it imports, the pip package to install).
ATTENTION_BACKENDS: dict[str, tuple[str, str | None, str | None]] = {
    "sdpa": ("native", None, None),
    "flash_attn": ("flash", "flash_attn", "flash-attn"),
    "sage_attn": ("sage", "sageattention", "sageattention"),
    "xformers": ("xformers", "xformers", "xformers"),
}


@dataclass(frozen=True)
class MemorySettings:
    fp8_base: bool = False
    """Store the transformer blocks' Linear weights in float8 e4m3 (a plain cast unless
    --fp8_scaled); checkpoints already in fp8 are kept as stored."""
    fp8_scaled: bool = False
    """With --fp8_base: block-wise scales (one per output row and 64 inputs)."""
    blocks_to_swap: int = 0
    """Keep this many transformer blocks in host memory, streamed to the device when used (needs
    --gradient_checkpointing); auto: the fewest that fit the card (masktrain plan's answer)."""
    swap_auto: bool = False
    """``--blocks_to_swap auto``: ``blocks_to_swap`` is chosen by the plan before the model loads."""
    vram: float | None = None
    """The card's memory in GiB that --blocks_to_swap auto and the fit check plan for (default: the
    CUDA card's total)."""
    use_pinned_memory_for_block_swap: bool = False
    """Page-locked host copies for block swap and --offload_inactive_dit (faster copies, more
    locked RAM)."""
    offload_inactive_dit: bool = False
    """WAN 2.2 A14B: keep the expert that is not in use in host memory."""
    gradient_checkpointing_cpu_offload: bool = False
    """Keep the checkpointed block inputs in host memory between forward and backward (needs
    --gradient_checkpointing)."""
    attention: str = "sdpa"
    """Attention backend: sdpa (PyTorch), flash_attn, sage_attn or xformers (one switch each)."""

    def __post_init__(self) -> None:
        if self.fp8_scaled and not self.fp8_base:
            raise TrainConfigError("--fp8_scaled needs --fp8_base")
        if self.blocks_to_swap < 0:
            raise TrainConfigError(f"--blocks_to_swap must be >= 0, got {self.blocks_to_swap}")
        if self.vram is not None and not self.vram > 0:
            raise TrainConfigError(f"--vram must be a size in GiB > 0, got {self.vram}")
        if self.attention not in ATTENTION_BACKENDS:
            choices = ", --".join(ATTENTION_BACKENDS)
            raise TrainConfigError(f"unknown attention backend {self.attention!r}; use one of --{choices}")
        _, module, package = ATTENTION_BACKENDS[self.attention]
        if module is not None and importlib.util.find_spec(module) is None:
            raise TrainConfigError(f"--{self.attention} needs the {package} package: pip install {package}")

    @property
    def fp8_mode(self) -> Fp8Mode | None:
        if not self.fp8_base:
            return None
        return "scaled" if self.fp8_scaled else "e4m3"

    @property
    def on_host(self) -> bool:
        """Whether the transformer is read into host memory first and placed on the device after."""
        return self.blocks_to_swap > 0 or self.offload_inactive_dit


def attention_flag(sdpa: bool, flash_attn: bool, sage_attn: bool, xformers: bool) -> str:
    """The one attention backend the flags choose (sdpa when none)."""
    chosen = [
        name
        for name, on in (
            ("sdpa", sdpa),
            ("flash_attn", flash_attn),
            ("sage_attn", sage_attn),
            ("xformers", xformers),
        )
        if on
    ]
    if len(chosen) > 1:
        raise TrainConfigError(f"choose one attention backend, not --{' and --'.join(chosen)}")
    return chosen[0] if chosen else "sdpa"
