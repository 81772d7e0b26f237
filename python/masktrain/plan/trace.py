"""Counting the bytes of live tensors, op by op: how ``masktrain plan`` finds the activations of a
training step without running it, and how its tests measure a real one.

:class:`LiveBytes` is a ``TorchDispatchMode``: every tensor an op returns is counted once per
storage (views share theirs) until the last tensor on that storage is freed, and the peak is kept;
a view or in-place result of a tensor made before the mode (a weight's transpose that autograd
keeps, an optimizer's update of a LoRA weight) holds no new memory and is not counted.
It works alike on real CPU tensors and on the meta device, where ops only compute shapes: the plan
runs the step on a meta model in a second, the check runs it on a real one on the CPU. Tensors
made before the mode (the weights, the batch) are not counted: the plan adds them by their shapes.
What a kernel allocates inside one op and frees before returning (an attention kernel's workspace)
is not seen either; the plan adds it per backend.

:class:`MetaAutocast` gives meta tensors the casts ``torch.autocast`` makes on a real device (the
meta device has no autocast): the inputs of matrix products, convolutions and attention go to the
compute dtype, and a leaf that requires grad (a float32 LoRA weight) is cast once per context and
the copy kept until the context ends, as autocast's cast cache does. Attention runs as a flash
kernel holds it (the meta device's own fallback would build the token x token matrix).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map


class LiveBytes(TorchDispatchMode):  # type: ignore[no-untyped-call]  # torch leaves it unannotated
    """The bytes of the tensors ops made that are still alive (:attr:`now`) and their most
    (:attr:`peak`), over every ``with`` block this mode is entered for. `counted` decides which
    tensors count (all by default; the check leaves out those that would live on the host)."""

    def __init__(self, counted: Callable[[torch.Tensor], bool] | None = None) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.counted = counted
        self.now = 0
        self.peak = 0
        self._live: dict[int, list[int]] = {}  # storage -> [bytes, tensors alive on it]
        self._skipped: set[int] = set()  # storages left out (and the tensors viewing them)

    def reset_peak(self) -> None:
        """Start a new peak from what is alive now."""
        self.peak = self.now

    def forget(self, tensor: torch.Tensor) -> None:
        """Stop counting `tensor`'s storage (it has gone to the host)."""
        key = tensor.untyped_storage()._cdata
        entry = self._live.pop(key, None)
        if entry is not None:
            self.now -= entry[0]
        self._skipped.add(key)
        # once it is freed, a new storage may take its address: that one counts
        weakref.finalize(tensor, self._skipped.discard, key)

    def forget_grad(self, parameter: torch.Tensor) -> None:
        """:meth:`forget` a parameter's gradient (a ``register_post_accumulate_grad_hook``)."""
        if parameter.grad is not None:
            self.forget(parameter.grad)

    def left_out(self, tensor: torch.Tensor) -> bool:
        """Whether `tensor`'s storage was :meth:`forget`-ten."""
        return tensor.untyped_storage()._cdata in self._skipped

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)
        }
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                key = value.untyped_storage()._cdata
                # a view or in-place result of a tensor made before the mode (a weight's
                # transpose, an optimizer's update of a LoRA weight) holds no new memory
                if key in inputs and key not in self._live:
                    continue
                self._track(value)
        return out

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self._skipped:
            return
        if self.counted is not None and not self.counted(tensor):
            return
        entry = self._live.get(key)
        if entry is None:
            entry = self._live[key] = [storage.nbytes(), 0]
            self.now += entry[0]
            self.peak = max(self.peak, self.now)
        entry[1] += 1
        weakref.finalize(tensor, self._release, key)

    def _release(self, key: int) -> None:
        entry = self._live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.now -= entry[0]
            del self._live[key]


_LOWER_PRECISION = {
    torch.nn.functional.linear,
    torch.matmul,
    torch.Tensor.matmul,
    torch.Tensor.__matmul__,
    torch.mm,
    torch.bmm,
    torch.addmm,
    torch.baddbmm,
    torch.nn.functional.conv1d,
    torch.nn.functional.conv2d,
    torch.nn.functional.conv3d,
    torch.nn.functional.scaled_dot_product_attention,
}
"""The ops torch's autocast runs in the lower precision that these models call."""
_ATTENTION = torch.nn.functional.scaled_dot_product_attention


class MetaAutocast(TorchFunctionMode):
    """``torch.autocast(dtype=dtype)`` for meta tensors (see the module docstring)."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype
        self._cache: dict[int, torch.Tensor] = {}

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in _LOWER_PRECISION:
            args, kwargs = tree_map(self._cast, args), tree_map(self._cast, kwargs)
        if func is _ATTENTION:
            return _flash_attention(*args, **kwargs)
        return func(*args, **kwargs)

    def _cast(self, value: Any) -> Any:
        if (
            not isinstance(value, torch.Tensor)
            or not value.is_floating_point()
            or value.dtype in (self.dtype, torch.float8_e4m3fn, torch.float8_e5m2)
        ):
            return value
        if value.is_leaf and value.requires_grad:  # autocast's cast cache
            cached = self._cache.get(id(value))
            if cached is None:
                cached = self._cache[id(value)] = value.to(self.dtype)
            return cached
        return value.to(self.dtype)


def _flash_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """Attention as a flash kernel holds it (the output and the log-sum-exp, not the token x token
    matrix the meta device's fallback would build): PyTorch's CPU flash kernel, which has a meta
    implementation."""
    out = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale
    )
    result: torch.Tensor = out[0]
    return result


@contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    """``torch.autocast`` on a real device, :class:`MetaAutocast` on the meta device; nothing
    without a dtype."""
    if dtype is None:
        yield
    elif device.type == "meta":
        with MetaAutocast(dtype):
            yield
    else:
        with torch.autocast(device.type, dtype=dtype):
            yield
