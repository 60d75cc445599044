"""The Talker: a Qwen2 decoder over codec tokens, driven by the Thinker's states.

Keys: `talker.thinker_to_talker_proj`, `talker.model.*` (embed_tokens over the codec vocab
with the Thinker's width, layers at the Talker's width), `talker.codec_head`.
"""

from __future__ import annotations

import torch
from torch import nn

from omni.cache import KVCache
from omni.config import TalkerConfig
from omni.thinker import Decoder


class Talker(nn.Module):
    def __init__(self, cfg: TalkerConfig):
        super().__init__()
        self.cfg = cfg
        self.thinker_to_talker_proj = nn.Linear(cfg.embedding_size, cfg.hidden_size)
        self.model = Decoder(cfg, embed_dim=cfg.embedding_size)  # inputs arrive projected to its width
        self.codec_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(self, inputs: torch.Tensor, positions: torch.Tensor, cache: KVCache, slots: torch.Tensor,
                n_valid: torch.Tensor | None = None) -> torch.Tensor:
        """inputs (B, T, embedding_size): codec embedding + thinker states; returns codec logits (B, T, V)."""
        hidden = self.model(self.thinker_to_talker_proj(inputs), positions, cache, slots, n_valid)
        return self.codec_head(hidden)
