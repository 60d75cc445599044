"""Preallocated KV cache: one tensor pair per layer, indexed by slot and sequence index.

Sequence index is the order in which tokens entered the cache (0, 1, 2, ...), not the
rotary position (TMRoPE positions are not one per token). A slot is one conversation;
`lengths[slot]` counts the tokens it holds. The cache is a value passed into the model,
never stored on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KVCache:
    k: list[torch.Tensor]  # per layer (n_slots, n_kv_heads, max_len, head_dim)
    v: list[torch.Tensor]
    lengths: torch.Tensor  # (n_slots,) int64 on CPU: tokens held per slot

    @classmethod
    def allocate(cls, n_layers: int, n_slots: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> "KVCache":
        shape = (n_slots, n_kv_heads, max_len, head_dim)
        return cls(
            k=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)],
            v=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)],
            lengths=torch.zeros(n_slots, dtype=torch.long),
        )

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    def reset(self, slot: int) -> None:
        self.lengths[slot] = 0

    def truncate(self, slot: int, length: int) -> None:
        """Forget everything after `length` tokens (e.g. a cancelled turn)."""
        self.lengths[slot] = min(int(self.lengths[slot]), length)
