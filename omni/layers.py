"""Small building blocks shared by the Thinker, the Talker and the encoders."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:  # one fused op, same numbers
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), self.weight.shape, None, self.eps).to(x.dtype)


ACT = {"silu": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
       "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x), "relu": F.relu}


def activation(name: str):
    try:
        return ACT[name]
    except KeyError:
        raise ValueError(f"unsupported activation {name!r}; known: {sorted(ACT)}") from None


@torch.no_grad()
def column_major(linear: nn.Linear) -> None:
    """Store the weight transposed in memory (same shape and values): on a CPU, a decode step's
    (1, in) x (in, out) product then streams the weight at several times the speed."""
    linear.weight = nn.Parameter(linear.weight.T.contiguous().T, requires_grad=False)


@torch.no_grad()
def fuse_linears(linears: list[nn.Linear], col_major: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One (weight, bias) for several Linear layers that read the same input: one product instead
    of several. The layers' parameters become views of it, so names, values and checkpoint layout
    are unchanged. Built after loading. `col_major`: stored transposed (see `column_major`)."""
    w = torch.cat([m.weight for m in linears])
    if col_major:
        w = w.T.contiguous().T
    b = torch.cat([m.bias for m in linears]) if linears[0].bias is not None else None
    i = 0
    for m in linears:
        n = m.out_features
        m.weight = nn.Parameter(w[i:i + n], requires_grad=False)
        if b is not None:
            m.bias = nn.Parameter(b[i:i + n], requires_grad=False)
        i += n
    return w, b


class GatedMLP(nn.Module):
    """SwiGLU feed-forward: down(act(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int, act: str = "silu", bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)
        self.act = activation(act)
        self._gate_up: tuple[torch.Tensor, torch.Tensor | None] | None = None  # set by fuse()

    def fuse(self, col_major: bool = False) -> None:
        """Gate and up in one product (see `fuse_linears`)."""
        self._gate_up = fuse_linears([self.gate_proj, self.up_proj], col_major)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._gate_up is None:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        gate, up = F.linear(x, *self._gate_up).chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor onto `device` without waiting for it: on CUDA through pinned memory, queued
    on the stream (a copy from pageable memory can synchronise the host with the device)."""
    if device.type != "cuda" or x.device.type == "cuda":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (..., T, D); cos/sin broadcastable to it."""
    return x * cos + rotate_half(x) * sin
