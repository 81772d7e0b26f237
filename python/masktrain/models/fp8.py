"""fp8 base weights (``--fp8_base``, ``--fp8_scaled``): the transformer's Linear weights stored as
float8 e4m3 and dequantised to the compute dtype inside each forward.

Two modes, as in musubi-tuner:

- ``scaled`` (``--fp8_base --fp8_scaled``): one float32 scale per output row and block of 64
  inputs (``amax / 448``), musubi's block-wise scheme. Per-block scales follow the weight's local
  range, so an outlier costs precision only in its own 64 inputs; the scales are kept in float32
  (1/16 byte per weight, 6 % of the fp8 bytes) so the only rounding is e4m3's own. A Linear whose
  input size is not a multiple of 64 gets one scale per row.
- ``e4m3`` (``--fp8_base`` alone): a plain cast (values clamped to +-448), no scale.

Either way the error of each weight is at most half an e4m3 step: ``|w - deq(w)| <= max(|w| / 16,
s / 1024)`` with ``s`` the block's scale (1 for a plain cast; the second term is e4m3's subnormal
spacing), which the tests check block by block.

Which Linear layers: a family's :class:`Fp8Targets` (inside the transformer blocks; norms,
embeddings, modulation, time/text projections and the output head stay in the compute dtype).
peft's ``lora_A`` / ``lora_B`` are never quantised: quantisation happens when the base model is
loaded, before any adapter exists, and LoRA wraps the :class:`Fp8Linear` as its base layer.

Checkpoints that are already fp8 keep their own weights and scales: ComfyUI's ``*_fp8_e4m3fn``
files (no scales) and ``*_fp8_scaled`` files (a per-tensor ``scale_weight``, or ``weight_scale``
in ComfyUI's newer mixed-precision layout) load into :class:`Fp8Linear` as stored; nothing is
re-quantised.

The forward goes through :class:`_Fp8LinearFunction`, which saves the fp8 weight (not the
dequantised copy) for the backward pass, so without gradient checkpointing the autograd graph
holds fp8 bytes per layer, not bf16 ones. The base weight never gets a gradient.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from masktrain.config.memory import Fp8Mode

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
BLOCK = 64
"""Inputs per scale in ``scaled`` mode (musubi-tuner's block size)."""
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


@dataclass(frozen=True)
class Fp8Targets:
    """Which Linear layers hold fp8 weights: module names (as in ``named_modules()``) that fully
    match one of ``include`` and none of ``exclude``."""

    include: tuple[str, ...]
    exclude: tuple[str, ...] = ()

    def matches(self, name: str) -> bool:
        return any(re.fullmatch(p, name) for p in self.include) and not any(
            re.fullmatch(p, name) for p in self.exclude
        )


def quantize(weight: torch.Tensor, mode: Fp8Mode) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(fp8 weight, float32 scale or None) of a 2-D weight. ``scaled``: scale shape ``[out, in/64,
    1]`` (or ``[out, 1]`` when ``in`` is not a multiple of 64)."""
    if mode == "e4m3":
        return weight.clamp(-FP8_MAX, FP8_MAX).to(FP8), None
    w = weight.float()
    out_features, in_features = w.shape
    grouped = w.view(out_features, in_features // BLOCK, BLOCK) if in_features % BLOCK == 0 else w
    scale = (grouped.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=1e-12)
    quantized = (grouped / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8).view(out_features, in_features)
    return quantized, scale


def dequantize(weight: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The weight in `dtype`: ``q * scale`` per block (or per row / per tensor, by the scale's shape)."""
    if scale is None:
        return weight.to(dtype)
    w = weight.to(scale.dtype)
    if scale.ndim == 3:
        out_features, in_features = w.shape
        w = (w.view(out_features, scale.shape[1], -1) * scale).view(out_features, in_features)
    else:
        w = w * scale
    return w.to(dtype)


def error_bound(weight: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """The largest error e4m3 rounding may leave in each element of `weight` (see the module
    docstring): half a step, ``max(|w| / 16, s / 1024)``."""
    w = weight.float().abs()
    if scale is None:
        return torch.maximum(w / 16, torch.full_like(w, 2.0**-10))
    if scale.ndim == 3:
        step = scale.expand(-1, -1, w.shape[1] // scale.shape[1]).reshape(w.shape)
    else:
        step = scale.expand_as(w) if scale.ndim == 2 else scale * torch.ones_like(w)
    return torch.maximum(w / 16, step.float() * 2.0**-10)


class _Fp8LinearFunction(torch.autograd.Function):
    """``x @ deq(W).T + b`` that saves fp8 `W` (not its dequantised copy) for the backward."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None
    ) -> torch.Tensor:
        ctx.save_for_backward(weight, scale)
        return F.linear(x, dequantize(weight, scale, x.dtype), bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        weight, scale = ctx.saved_tensors
        grad_x = grad @ dequantize(weight, scale, grad.dtype) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None


class Fp8Linear(torch.nn.Linear):
    """An ``nn.Linear`` whose frozen weight is float8 e4m3 (``weight``), with an optional float32
    ``scale`` buffer; the bias stays in the compute dtype. It is an ``nn.Linear`` so peft wraps it
    like any base layer."""

    scale: torch.Tensor | None
    compute_dtype: torch.dtype
    """The dtype of the model's other weights; peft creates the adapter in it (its
    ``compute_dtype`` rule), never in fp8."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        scale_shape: tuple[int, ...] | None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.compute_dtype = dtype or torch.float32
        self.weight = torch.nn.Parameter(self.weight.detach().to(FP8), requires_grad=False)
        scale = None if scale_shape is None else torch.ones(scale_shape, device=device)
        self.register_buffer("scale", scale)

    @classmethod
    def like(
        cls, linear: torch.nn.Linear, scale_shape: tuple[int, ...] | None, dtype: torch.dtype
    ) -> Fp8Linear:
        """An empty (meta) replacement for `linear` whose bias is in `dtype`, to be filled by
        ``load_state_dict(assign=True)``."""
        return cls(
            linear.in_features, linear.out_features, linear.bias is not None, scale_shape, "meta", dtype
        )

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, mode: Fp8Mode) -> Fp8Linear:
        """`linear` with its weight quantised (the bias keeps its tensor)."""
        quantized, scale = quantize(linear.weight.detach(), mode)
        module = cls.like(linear, None if scale is None else tuple(scale.shape), linear.weight.dtype)
        module.weight = torch.nn.Parameter(quantized, requires_grad=False)
        module.scale = scale
        if linear.bias is not None:
            module.bias = linear.bias
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "meta":  # the planner's step (no autocast there): a bf16 run's dtype
            dtype = self.compute_dtype
        elif torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
        else:
            dtype = x.dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        out: torch.Tensor = _Fp8LinearFunction.apply(x.to(dtype), self.weight, self.scale, bias)
        return out

    def extra_repr(self) -> str:
        scale = "none" if self.scale is None else "x".join(map(str, self.scale.shape))
        return f"{super().extra_repr()}, fp8 e4m3, scale={scale}"


def fp8_bytes(model: torch.nn.Module) -> int:
    """Bytes held by fp8 weights and their scales."""
    total = 0
    for module in model.modules():
        if isinstance(module, Fp8Linear):
            total += module.weight.numel() * module.weight.element_size()
            if module.scale is not None:
                total += module.scale.numel() * module.scale.element_size()
    return total


def target_linears(model: torch.nn.Module, targets: Fp8Targets) -> list[str]:
    """The names of the plain ``nn.Linear`` modules of `model` that `targets` selects."""
    return [
        name
        for name, module in model.named_modules()
        if type(module) is torch.nn.Linear and targets.matches(name)
    ]


def replace_module(model: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def quantize_model(model: torch.nn.Module, targets: Fp8Targets | Iterable[str], mode: Fp8Mode) -> list[str]:
    """Quantise the selected Linear layers of an already-built model in place, one at a time (the
    tiny models and the text encoders; checkpoints are quantised while they are read)."""
    names = target_linears(model, targets) if isinstance(targets, Fp8Targets) else list(targets)
    for name in names:
        linear = model.get_submodule(name)
        assert isinstance(linear, torch.nn.Linear)
        replace_module(model, name, Fp8Linear.from_linear(linear, mode))
    return names
