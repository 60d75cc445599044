"""The Thinker: Qwen2 decoder with multimodal rotary positions, plus its encoders.

`Decoder` is shared with the Talker (same layer shapes, its own config). Attribute names
equal checkpoint keys: `thinker.model.*`, `thinker.lm_head`, `thinker.visual.*`,
`thinker.audio_tower.*`. Forward passes take the KV cache, slots and positions explicitly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from encoders.audio import AudioEncoder
from encoders.vision import VisionEncoder
from omni.cache import KVCache
from omni.config import TalkerConfig, TextConfig, ThinkerConfig
from omni.layers import GatedMLP, RMSNorm, apply_rotary, column_major, fuse_linears, to_device


class MRotary(nn.Module):
    """Rotary frequencies for 3-component (t, h, w) positions; `mrope_section` splits head_dim/2."""

    def __init__(self, head_dim: int, theta: float, mrope_section: list[int] | None):
        super().__init__()
        half = head_dim // 2
        section = mrope_section or [half, 0, 0]
        if sum(section) != half:
            raise ValueError(f"mrope_section {section} must sum to head_dim/2 = {half}")
        self.register_buffer("inv_freq", 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim)),
                             persistent=False)
        # axis (0=t, 1=h, 2=w) that drives each frequency
        self.register_buffer("axis", torch.repeat_interleave(torch.arange(3), torch.tensor(section)), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (3, B, T) -> cos, sin (B, 1, T, head_dim)."""
        pos = positions.to(self.inv_freq.device).float()  # (3, B, T)
        chosen = pos[self.axis]  # (half, B, T): the axis each frequency follows
        freqs = chosen.permute(1, 2, 0) * self.inv_freq  # (B, T, half)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def cached_attention(q, k, v, k_cache, v_cache, slots, starts, kv_len, mask, one_slot=None) -> torch.Tensor:
    """Write the rotated k and v of T new rows into each slot's cache and attend over what the slot holds.

    q (B, nh, T, hd), k/v (B, nkv, T, hd); returns (B, nh, T, hd). `one_slot` (slot, start): a single
    conversation, whose cache rows are plain slices (no gather).
    """
    T = q.shape[2]
    if one_slot is not None:  # one conversation: plain slices of its cache rows, no gather
        slot, start = one_slot
        k_cache[slot, :, start:start + T] = k[0].to(k_cache.dtype)
        v_cache[slot, :, start:start + T] = v[0].to(v_cache.dtype)
        keys, values = k_cache[slot:slot + 1, :, :kv_len], v_cache[slot:slot + 1, :, :kv_len]
    else:
        idx = starts[:, None] + torch.arange(T, device=starts.device)  # (B, T) sequence indices
        k_cache[slots[:, None], :, idx] = k.transpose(1, 2).to(k_cache.dtype)
        v_cache[slots[:, None], :, idx] = v.transpose(1, 2).to(v_cache.dtype)
        keys = k_cache[slots, :, :kv_len]  # (B, nkv, S, hd)
        values = v_cache[slots, :, :kv_len]
    return F.scaled_dot_product_attention(q, keys.to(q.dtype), values.to(q.dtype), attn_mask=mask,
                                          enable_gqa=k.shape[1] != q.shape[1])


class Attention(nn.Module):
    def __init__(self, hidden: int, n_heads: int, n_kv: int, head_dim: int):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = n_heads, n_kv, head_dim
        self.q_proj = nn.Linear(hidden, n_heads * head_dim, bias=True)
        self.k_proj = nn.Linear(hidden, n_kv * head_dim, bias=True)
        self.v_proj = nn.Linear(hidden, n_kv * head_dim, bias=True)
        self.o_proj = nn.Linear(n_heads * head_dim, hidden, bias=False)
        self._qkv: tuple[torch.Tensor, torch.Tensor | None] | None = None  # set by fuse()

    def fuse(self) -> None:
        """q, k and v in one product (see `fuse_linears`)."""
        self._qkv = fuse_linears([self.q_proj, self.k_proj, self.v_proj])

    def forward(self, x, cos, sin, k_cache, v_cache, slots, starts, kv_len, mask, one_slot=None):
        B, T, _ = x.shape
        nh, nkv = self.n_heads, self.n_kv
        if self._qkv is None:
            q = self.q_proj(x).view(B, T, nh, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
            k = self.k_proj(x).view(B, T, nkv, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
            v = self.v_proj(x).view(B, T, nkv, self.head_dim).transpose(1, 2)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        else:
            qkv = F.linear(x, *self._qkv).view(B, T, nh + 2 * nkv, self.head_dim).transpose(1, 2)
            qk = apply_rotary(qkv[:, :nh + nkv], cos, sin)  # q and k rotated together
            q, k, v = qk[:, :nh], qk[:, nh:], qkv[:, nh + nkv:]
        out = cached_attention(q, k, v, k_cache, v_cache, slots, starts, kv_len, mask, one_slot)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig | TalkerConfig):
        super().__init__()
        self.self_attn = Attention(cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.get_head_dim())
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, k_cache, v_cache, slots, starts, kv_len, mask, one_slot=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, k_cache, v_cache, slots, starts, kv_len, mask,
                               one_slot)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """Qwen2 decoder stack (`embed_tokens`, `layers.N`, `norm`) over a KV cache."""

    def __init__(self, cfg: TextConfig | TalkerConfig, embed_dim: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, embed_dim or cfg.hidden_size)
        self.layers = nn.ModuleList(self.make_layer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = self.make_rotary(cfg)

    @staticmethod
    def make_layer(cfg, index: int) -> nn.Module:
        """Layer `index` of the stack: another family's decoder overrides this (and `make_rotary`)."""
        return DecoderLayer(cfg)

    @staticmethod
    def make_rotary(cfg) -> nn.Module:
        return MRotary(cfg.get_head_dim(), cfg.get_rope_theta(), cfg.get_mrope_section())

    def fuse(self, cpu: bool = False) -> None:
        """Serving layout, after loading: q/k/v and gate/up each one product; on a CPU the gate/up
        weight (the layer's largest) stored transposed, which a decode step streams ~3x faster."""
        for layer in self.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse(col_major=cpu)

    def allocate_cache(self, n_slots: int, max_len: int, dtype=None, device=None) -> KVCache:
        p = self.norm.weight
        return KVCache.allocate(len(self.layers), n_slots, self.cfg.num_key_value_heads, max_len,
                                self.cfg.get_head_dim(), dtype or p.dtype, device or p.device)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache, slots: torch.Tensor,
                n_valid: torch.Tensor | None = None, add_after: dict | None = None,
                capture: int | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Append `x` to each slot's cache and return final-norm hidden states.

        x (B, T, D) input embeddings; positions (3, B, T) rotary positions; slots (B,) cache slots;
        n_valid (B,) how many of the T rows are real (right-padded batches; default all);
        add_after {layer index: (rows (B, T) bool, features (N, D))}: features added to those rows of the
        hidden states after that layer (Qwen3's deepstack). Returns (B, T, D). Advances cache.lengths[slots].
        capture k: also return the hidden states after k layers, as transformers' `hidden_states[k]` numbers
        them (0 the inputs, k < n_layers layer k-1's output before its `add_after` features, n_layers the
        final norm's output): (hidden, captured), both (B, T, D). The Qwen3-Omni Talker reads layer
        `accept_hidden_layer` of the Thinker this way.
        """
        B, T, _ = x.shape
        device = x.device
        starts = cache.lengths[slots.cpu()]  # (B,) on CPU
        n_valid = torch.full((B,), T, dtype=torch.long) if n_valid is None else n_valid.cpu()
        ends = starts + n_valid
        kv_len = int(starts.max()) + T
        if kv_len > cache.max_len:
            raise ValueError(f"sequence of {kv_len} tokens exceeds the cache length {cache.max_len}")
        one_slot = (int(slots[0]), int(starts[0])) if B == 1 else None
        if B == 1 and T == 1 and int(n_valid[0]) == 1:
            mask = None  # one new token sees everything before it
        else:
            key_idx = torch.arange(kv_len)
            q_idx = starts[:, None] + torch.arange(T)  # (B, T)
            mask = (key_idx[None, None, :] <= q_idx[:, :, None]) & (key_idx[None, None, :] < ends[:, None, None])
            mask = to_device(mask[:, None], device)  # (B, 1, T, S)
        cos, sin = self.rotary(positions, x.dtype)
        slots_d, starts_d = to_device(slots.cpu(), device), to_device(starts, device)
        if capture is not None and not 0 <= capture <= len(self.layers):
            raise ValueError(f"capture must be a layer count in 0..{len(self.layers)}; got {capture}")
        captured = x if capture == 0 else None
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache.k[i], cache.v[i], slots_d, starts_d, kv_len, mask, one_slot)
            if capture == i + 1:
                captured = x
            if add_after and i in add_after:
                rows, feats = add_after[i]
                x = x.index_put((rows,), x[rows] + feats.to(x.dtype))
        cache.lengths[slots.cpu()] = ends
        if capture is None:
            return self.norm(x)
        out = self.norm(x)
        return out, (out if capture == len(self.layers) else captured)


class Thinker(nn.Module):
    def __init__(self, cfg: ThinkerConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Decoder(cfg.text_config)
        self.lm_head = nn.Linear(cfg.text_config.hidden_size, cfg.text_config.vocab_size, bias=False)
        self.visual = VisionEncoder(cfg.vision_config)
        self.audio_tower = AudioEncoder(cfg.audio_config)

    def fuse(self, cpu: bool = False) -> None:
        """Serving layout (see `Decoder.fuse`); on a CPU the vocabulary head is stored transposed too,
        which a decode step streams ~3x faster. Transposed weights sum in another order than the
        reference: equal to fp32 rounding, not bit for bit."""
        self.model.fuse(cpu)
        if cpu:
            column_major(self.lm_head)

    def embed(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None = None,
              video_embeds: torch.Tensor | None = None, audio_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with encoder outputs scattered into their placeholders.

        input_ids (B, T); *_embeds (N_placeholders, D) in prompt order. Returns (B, T, D).
        """
        x = self.model.embed_tokens(input_ids)
        for token, feats, what in ((self.cfg.image_token_index, image_embeds, "image"),
                                   (self.cfg.video_token_index, video_embeds, "video"),
                                   (self.cfg.audio_token_index, audio_embeds, "audio")):
            where = input_ids == token
            n = int(where.sum())
            have = 0 if feats is None else feats.shape[0]
            if n != have:
                raise ValueError(f"prompt has {n} {what} placeholder tokens but the encoder gave {have} features")
            if n:
                x = x.masked_scatter(where[..., None], feats.to(x.dtype))
        return x

    def encode_images(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        return self.visual(pixel_values.to(self.visual.patch_embed.proj.weight.dtype), grid_thw)

    def encode_audio(self, features: torch.Tensor, feature_lens: torch.Tensor) -> torch.Tensor:
        return self.audio_tower(features.to(self.audio_tower.conv1.weight.dtype), feature_lens)

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, cache: KVCache, slots: torch.Tensor,
                n_valid: torch.Tensor | None = None) -> torch.Tensor:
        """embeds (B, T, D), positions (3, B, T) -> hidden (B, T, D) after the final norm.

        Logits are `lm_head(hidden[...])` for the rows the caller needs (usually the last).
        """
        return self.model(embeds, positions, cache, slots, n_valid)
