"""Qwen3-Omni's Thinker: the MoE decoder (QK-norm, interleaved M-RoPE, deepstack) with its encoders.

Attribute names equal checkpoint keys (`thinker.model.*`, `thinker.lm_head`, `thinker.visual.*`,
`thinker.audio_tower.*`), except the experts: the checkpoint stores each expert's
`mlp.experts.E.{gate,up,down}_proj.weight`, and `Experts` holds them stacked in two tensors, which
`omni.weights.load_module` fills expert by expert (`Experts.checkpoint_parts`). Forward passes take the
KV cache, slots and positions explicitly, like omni/thinker.py's Qwen2.5 decoder, whose stack and cached
attention this one reuses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from encoders.qwen3_omni_audio import Qwen3OmniAudioConfig, Qwen3OmniAudioEncoder
from encoders.qwen3_omni_vision import Qwen3OmniVisionConfig, Qwen3OmniVisionEncoder
from omni.layers import GatedMLP, RMSNorm, activation, apply_rotary
from omni.qwen3_omni_config import Qwen3OmniTextConfig, Qwen3OmniThinkerConfig
from omni.qwen3_omni_rope import MRotary
from omni.thinker import Decoder, cached_attention
from omni.thinker import DecoderLayer as Qwen2DecoderLayer

_grouped_mm = getattr(torch, "_grouped_mm", None)


class Attention(nn.Module):
    """GQA with RMS-normed q and k per head (before RoPE); no biases."""

    def __init__(self, cfg: Qwen3OmniTextConfig):
        super().__init__()
        hd, bias = cfg.get_head_dim(), cfg.attention_bias
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, hd
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * hd, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * hd, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * hd, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * hd, cfg.hidden_size, bias=bias)
        self.q_norm = RMSNorm(hd, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(hd, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, k_cache, v_cache, slots, starts, kv_len, mask, one_slot=None):
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.n_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(B, T, self.n_kv, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = cached_attention(q, k, v, k_cache, v_cache, slots, starts, kv_len, mask, one_slot)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class Experts(nn.Module):
    """`n` gated MLPs stacked: gate_up_proj (n, 2I, H) = [gate; up] per expert, down_proj (n, H, I).

    A batch's (token, expert) pairs are sorted by expert and each weight is one grouped product over
    them (`torch._grouped_mm`, with the experts' row offsets): no loop over experts, no host sync.
    """

    def __init__(self, n: int, hidden: int, inter: int, act: str):
        super().__init__()
        self.n = n
        self.gate_up_proj = nn.Parameter(torch.empty(n, 2 * inter, hidden))
        self.down_proj = nn.Parameter(torch.empty(n, hidden, inter))
        self.act = activation(act)

    def checkpoint_parts(self) -> dict[str, list[tuple[str, ...]]]:
        """Each stacked weight's checkpoint tensors, per expert, concatenated along the rows."""
        return {"gate_up_proj": [(f"{e}.gate_proj.weight", f"{e}.up_proj.weight") for e in range(self.n)],
                "down_proj": [(f"{e}.down_proj.weight",) for e in range(self.n)]}

    def forward(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x (N, H); experts, weights (N, k): each token's chosen experts and their weights -> (N, H)."""
        N, k = experts.shape
        flat = experts.reshape(-1)
        order = flat.argsort(stable=True)
        token = order // k  # the token of each sorted (token, expert) pair
        offsets = torch.bincount(flat, minlength=self.n).cumsum(0).to(torch.int32)
        rows = x[token]
        if _grouped_mm is not None:
            gate, up = _grouped_mm(rows, self.gate_up_proj.transpose(1, 2), offs=offsets).chunk(2, dim=-1)
            out = _grouped_mm(self.act(gate) * up, self.down_proj.transpose(1, 2), offs=offsets)
        else:  # older torch: one product per expert that has tokens
            out = torch.empty_like(rows)
            bounds = [0] + offsets.tolist()
            for e in range(self.n):
                a, b = bounds[e], bounds[e + 1]
                if b > a:
                    gate, up = F.linear(rows[a:b], self.gate_up_proj[e]).chunk(2, dim=-1)
                    out[a:b] = F.linear(self.act(gate) * up, self.down_proj[e])
        out = out * weights.reshape(-1)[order, None].to(out.dtype)
        return torch.zeros_like(x).index_add_(0, token, out)


class Router(nn.Module):
    """Softmax over the experts in fp32, the top k, renormalised to sum to one (`norm_topk_prob`)."""

    def __init__(self, cfg: Qwen3OmniTextConfig):
        super().__init__()
        self.top_k, self.renormalise = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.weight = nn.Parameter(torch.zeros(cfg.num_experts, cfg.hidden_size))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, H) -> (experts (N, k), weights (N, k) in x's dtype)."""
        probs = F.linear(x, self.weight).softmax(dim=-1, dtype=torch.float)
        weights, experts = probs.topk(self.top_k, dim=-1)
        if self.renormalise:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return experts, weights.to(x.dtype)


class SparseMoE(nn.Module):
    def __init__(self, cfg: Qwen3OmniTextConfig):
        super().__init__()
        self.gate = Router(cfg)
        self.experts = Experts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        return self.experts(flat, *self.gate(flat)).view(shape)


class DecoderLayer(Qwen2DecoderLayer):
    """Pre-norm attention then MLP, as Qwen2.5's layer (its forward), with Qwen3's attention and MoE."""

    def __init__(self, cfg: Qwen3OmniTextConfig, index: int):
        nn.Module.__init__(self)
        self.self_attn = Attention(cfg)
        self.mlp = (SparseMoE(cfg) if cfg.is_moe(index)
                    else GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act))
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class TextDecoder(Decoder):
    """`thinker.model`: embed_tokens, MoE layers, norm, over a KV cache (see omni.thinker.Decoder)."""

    @staticmethod
    def make_layer(cfg: Qwen3OmniTextConfig, index: int) -> nn.Module:
        return DecoderLayer(cfg, index)

    @staticmethod
    def make_rotary(cfg: Qwen3OmniTextConfig) -> nn.Module:
        return MRotary.from_config(cfg)

    def fuse(self, cpu: bool = False) -> None:  # the experts are stacked already; nothing to fuse
        pass


class Thinker(nn.Module):
    def __init__(self, cfg: Qwen3OmniThinkerConfig, encoders: bool = True):
        super().__init__()
        self.cfg = cfg
        text = cfg.text_config
        self.model = TextDecoder(text)
        self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        if encoders:
            self.visual = Qwen3OmniVisionEncoder(Qwen3OmniVisionConfig.from_dict(cfg.vision_config))
            self.audio_tower = Qwen3OmniAudioEncoder(Qwen3OmniAudioConfig.from_dict(cfg.audio_config))

    def embed(self, input_ids: torch.Tensor, image: tuple | None = None, video: tuple | None = None,
              audio: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple | None]:
        """Token embeddings with encoder outputs in their placeholders, and the deepstack features.

        input_ids (B, T); image / video: the vision encoder's (merged (N, D), [level (N, D)]) for all images
        (videos) in prompt order; audio (N, D). Returns (embeds (B, T, D), deepstack or None) with deepstack
        = (visual rows (B, T), [per level: features of every image and video row, in row order]).
        """
        c = self.cfg
        x = self.model.embed_tokens(input_ids)
        masks = {}
        for token, feats, what in ((c.image_token_id, image, "image"), (c.video_token_id, video, "video"),
                                   (c.audio_token_id, audio, "audio")):
            where = input_ids == token
            n = int(where.sum())
            main = feats[0] if isinstance(feats, tuple) else feats
            have = 0 if main is None else main.shape[0]
            if n != have:
                raise ValueError(f"prompt has {n} {what} placeholder tokens but the encoder gave {have} features")
            if n:
                x = x.masked_scatter(where[..., None], main.to(x.dtype))
                masks[what] = where
        visual = [(masks[k], f[1]) for k, f in (("image", image), ("video", video)) if k in masks]
        if not visual:
            return x, None
        rows = visual[0][0] if len(visual) == 1 else visual[0][0] | visual[1][0]
        levels = []
        for i in range(len(visual[0][1])):
            level = x.new_zeros(int(rows.sum()), x.shape[-1])
            for where, feats in visual:
                level[where[rows]] = feats[i].to(x.dtype)
            levels.append(level)
        return x, (rows, levels)

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, cache, slots: torch.Tensor,
                n_valid: torch.Tensor | None = None, deepstack: tuple | None = None,
                capture_layer: int | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """embeds (B, T, D), positions (3, B, T) -> hidden (B, T, D) after the final norm.

        deepstack (rows (B, T) bool, [features (N, D)] per level): level i is added to the visual rows
        after decoder layer i. capture_layer k (the Talker's `accept_hidden_layer`): return
        (hidden, hidden after k layers) instead, numbered as transformers' `hidden_states[k]`
        (see omni.thinker.Decoder.forward).
        """
        add_after = None
        if deepstack is not None:
            rows, levels = deepstack
            add_after = {i: (rows, f) for i, f in enumerate(levels)}
        if capture_layer is None:
            return self.model(embeds, positions, cache, slots, n_valid, add_after)
        return self.model(embeds, positions, cache, slots, n_valid, add_after, capture=capture_layer)
