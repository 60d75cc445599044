"""Qwen2.5-Omni vision encoder (ViT with window attention), keys = checkpoint's `thinker.visual.*`.

Input patches come in the image processor's order: per item, per temporal grid step, spatial-merge
blocks in raster order, and inside a block its m*m patches in raster order ("block-major").
Most blocks attend within windows of `window_size` pixels (window_size // patch // merge merged
patches per side); `fullatt_block_indexes` attend over a whole frame. Tokens are reordered into
window order once before the blocks and restored after the merger.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from omni.config import VisionConfig
from omni.layers import GatedMLP, RMSNorm, rotate_half


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: list[int]) -> torch.Tensor:
    """Non-causal attention within each segment [cu[i], cu[i+1]) of a packed sequence.

    q, k, v: (N, H, D) -> (N, H, D). Segments of equal length run as one batched SDPA call,
    so a frame with many same-size windows costs a handful of kernels, not one per window.
    """
    N, H, D = q.shape
    out = torch.empty_like(q)
    by_len: dict[int, list[int]] = {}
    for s, e in zip(cu_seqlens[:-1], cu_seqlens[1:]):
        if e > s:
            by_len.setdefault(e - s, []).append(s)
    for L, starts in by_len.items():
        if len(starts) * L == N:  # one group covers everything: no gather needed
            idx = None
            qs, ks, vs = (t.view(len(starts), L, H, D) for t in (q, k, v))
        else:
            idx = (torch.tensor(starts, device=q.device)[:, None] + torch.arange(L, device=q.device)).flatten()
            qs, ks, vs = (t[idx].view(len(starts), L, H, D) for t in (q, k, v))
        o = F.scaled_dot_product_attention(qs.transpose(1, 2), ks.transpose(1, 2), vs.transpose(1, 2))  # (B, H, L, D)
        o = o.transpose(1, 2).reshape(-1, H, D)
        if idx is None:
            return o
        out[idx] = o
    return out


def vision_position_ids(grid_thw: list[list[int]], merge: int) -> torch.Tensor:
    """(h, w) patch coordinates in block-major order, repeated per temporal step: (N, 2) long."""
    out = []
    for t, h, w in grid_thw:
        hpos = torch.arange(h)[:, None].expand(h, w)
        wpos = torch.arange(w)[None, :].expand(h, w)
        hw = torch.stack([hpos, wpos], -1).reshape(h // merge, merge, w // merge, merge, 2).transpose(1, 2)
        out.append(hw.reshape(-1, 2).repeat(t, 1))
    return torch.cat(out)


def window_index(grid_thw: list[list[int]], merge: int, win: int) -> tuple[torch.Tensor, list[int]]:
    """Merged-patch order that groups each frame's win x win windows, and the window boundaries.

    Returns index (N / merge^2,) long: position k of the window-ordered sequence holds merged
    patch index[k]; and cu (in patches, not merged patches) with empty windows dropped.
    """
    index, cu, offset = [], [0], 0
    for t, h, w in grid_thw:
        gh, gw = h // merge, w // merge
        nh, nw = -(-gh // win), -(-gw // win)
        ids = torch.arange(t * gh * gw).view(t, gh, gw)
        ids = F.pad(ids, (0, nw * win - gw, 0, nh * win - gh), value=-1)
        ids = ids.view(t, nh, win, nw, win).permute(0, 1, 3, 2, 4).reshape(t * nh * nw, win * win)
        counts = (ids >= 0).sum(1)
        index.append(ids[ids >= 0] + offset)  # row-major: window by window
        cu += (cu[-1] + counts[counts > 0].cumsum(0) * merge * merge).tolist()
        offset += t * gh * gw
    return torch.cat(index), cu


def frame_seqlens(grid_thw: list[list[int]]) -> list[int]:
    """Full attention spans one frame (one temporal grid step) of one item."""
    cu = [0]
    for t, h, w in grid_thw:
        cu += [cu[-1] + (i + 1) * h * w for i in range(t)]
    return cu


def rotary_cos_sin(pos: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """2D rotary: the first head_dim/4 frequencies turn with h, the next head_dim/4 with w.

    pos (N, 2) -> cos, sin (N, head_dim) float32.
    """
    d = head_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float) / d))  # (head_dim/4,)
    freqs = (pos[..., None].float() * inv_freq).flatten(1)  # (N, 2 * head_dim/4): [h freqs | w freqs]
    emb = torch.cat([freqs, freqs], -1)
    return emb.cos(), emb.sin()


def unwindow(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Undo the window reordering: x[k] belongs to merged patch index[k]."""
    out = torch.empty_like(x)
    out[index] = x
    return out


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        k = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.shape = (-1, cfg.in_channels, *k)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel_size=k, stride=k, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C*Tp*P*P) -> (N, D)
        x = x.to(self.proj.weight.dtype).view(self.shape)
        return self.proj(x).flatten(1)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu: list[int]) -> torch.Tensor:
        N = x.shape[0]
        q, k, v = (m(x).view(N, self.num_heads, -1) for m in (self.q, self.k, self.v))  # (N, H, hd)
        cos, sin = cos[:, None], sin[:, None]
        q = (q.float() * cos + rotate_half(q.float()) * sin).to(v.dtype)
        k = (k.float() * cos + rotate_half(k.float()) * sin).to(v.dtype)
        return self.proj(varlen_attention(q, k, v, cu).reshape(N, -1))


class Block(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = RMSNorm(cfg.hidden_size, eps=1e-6)
        self.norm2 = RMSNorm(cfg.hidden_size, eps=1e-6)
        self.attn = Attention(cfg.hidden_size, cfg.num_heads)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, bias=True)

    def forward(self, x, cos, sin, cu):
        x = x + self.attn(self.norm1(x), cos, sin, cu)
        return x + self.mlp(self.norm2(x))


class Merger(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        dim = cfg.hidden_size * cfg.spatial_merge_size**2
        self.ln_q = RMSNorm(cfg.hidden_size, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, cfg.out_hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, D) -> (N / m^2, out)
        return self.mlp(self.ln_q(x).view(-1, self.mlp[0].in_features))


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.merge = cfg.spatial_merge_size
        self.win = cfg.window_size // cfg.spatial_merge_size // cfg.patch_size  # merged patches per window side
        if self.win < 1:
            raise ValueError(f"vision window_size {cfg.window_size} is smaller than one merged patch "
                             f"({cfg.spatial_merge_size * cfg.patch_size} px); check the config")
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.theta = float((cfg.extra.get("rope_parameters") or {}).get("rope_theta", 10000.0))
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.depth)])
        self.merger = Merger(cfg)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """pixel_values (N, C*Tp*P*P) block-major patches of all items; grid_thw (n_items, 3)
        -> (N / merge^2, out_hidden_size), items in input order."""
        grid = [[int(v) for v in row] for row in grid_thw.tolist()]
        unit = self.merge**2
        N = pixel_values.shape[0]
        if N != sum(t * h * w for t, h, w in grid):
            raise ValueError(f"pixel_values has {N} patches but grid_thw {grid} describes "
                             f"{sum(t * h * w for t, h, w in grid)}")
        index, cu_win = window_index(grid, self.merge, self.win)
        cu_full = frame_seqlens(grid)
        index = index.to(pixel_values.device)

        x = self.patch_embed(pixel_values)  # (N, D)
        x = x.view(-1, unit, x.shape[-1])[index].view(N, -1)
        pos = vision_position_ids(grid, self.merge).to(pixel_values.device)
        cos, sin = rotary_cos_sin(pos, self.head_dim, self.theta)  # (N, hd)
        cos = cos.view(-1, unit, self.head_dim)[index].view(N, -1)
        sin = sin.view(-1, unit, self.head_dim)[index].view(N, -1)

        full = set(self.cfg.fullatt_block_indexes)
        for i, blk in enumerate(self.blocks):
            x = blk(x, cos, sin, cu_full if i in full else cu_win)
        return unwindow(self.merger(x), index)
