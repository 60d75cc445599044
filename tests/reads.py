"""Counting the values a piece of code reads back from tensors into Python: on CUDA each such read waits for
the device to finish everything queued before it.

Two modes count together: a function mode sees the Python-level reads (`int(t)`, `t.item()`, `bool(t)`,
`t.tolist()`, `t.numpy()`, ...), and a dispatch mode the `_local_scalar_dense` an op asks for inside
(counted only outside a read the function mode already counted). Neither alone is enough (measured, torch
2.13): `tolist` and `numpy` never reach the dispatcher, and neither does `bool(t)` of a CPU tensor under
inference mode. A whole-tensor read (`tolist`) counts once. On the CPU a read of a CPU-side bookkeeping
tensor (the KV cache's `lengths`) counts the same as a read of a sampled value: tests compare counts, they
do not name the tensor.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

_SCALAR_OPS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default)
_READS = {"tolist", "numpy", "item", "__int__", "__float__", "__bool__", "__index__", "__complex__"}


class _Dispatch(TorchDispatchMode):
    def __init__(self, counter: "ScalarReads"):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _SCALAR_OPS and not self.counter.inside:
            self.counter.n += 1
        return func(*args, **(kwargs or {}))


class _Function(TorchFunctionMode):
    def __init__(self, counter: "ScalarReads"):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", None) not in _READS or self.counter.inside:
            return func(*args, **(kwargs or {}))
        self.counter.n += 1
        self.counter.inside = True
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self.counter.inside = False


class ScalarReads:
    """`with ScalarReads() as reads: ...` then `reads.n`: tensor -> Python reads (a `tolist` counts once)."""

    def __init__(self):
        self.n, self.inside = 0, False
        self._modes = (_Function(self), _Dispatch(self))

    def __enter__(self) -> "ScalarReads":
        for m in self._modes:
            m.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for m in reversed(self._modes):
            m.__exit__(*exc)
