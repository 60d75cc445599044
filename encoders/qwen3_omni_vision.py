"""Qwen3-Omni vision encoder (ViT with a learned, resampled position table and deepstack outputs),
keys = checkpoint's `thinker.visual.*`.

Input patches come in the image processor's order (as for Qwen2.5-Omni, see encoders/vision.py):
per item, per temporal grid step, spatial-merge blocks in raster order, and inside a block its
m*m patches in raster order ("block-major"). Each patch gets
- a learned absolute position: the square `pos_embed` table (side x side, side^2 =
  num_position_embeddings) resampled to the frame's h x w grid, bilinear with corners aligned;
- 2-D rotary on q/k (first head_dim/4 frequencies turn with h, the next head_dim/4 with w).
Every block attends over one whole frame (one temporal grid step of one item); there are no windows.
The blocks listed in `deepstack_visual_indexes` also feed their own merger (`merger_list.k`), whose
outputs the thinker adds to its hidden states at visual positions after its first decoder layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from encoders.vision import frame_seqlens, varlen_attention, vision_position_ids
from omni.layers import activation, rotate_half


@dataclass(frozen=True)
class Qwen3OmniVisionConfig:
    """`thinker_config.vision_config` of config.json; missing keys take transformers' defaults (the
    30B-A3B ViT; real checkpoints set out_hidden_size to the thinker's hidden size, 2048)."""

    depth: int = 27
    hidden_size: int = 1152
    hidden_act: str = "gelu_pytorch_tanh"  # of the blocks' MLPs; the mergers use exact GELU
    intermediate_size: int = 4304
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 16
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    out_hidden_size: int = 3584  # the thinker's hidden size
    num_position_embeddings: int = 2304  # a square table: 48 x 48
    deepstack_visual_indexes: tuple[int, ...] = (8, 16, 24)  # blocks whose outputs feed merger_list
    rope_theta: float = 10000.0  # from rope_parameters.rope_theta

    @classmethod
    def from_dict(cls, d: dict) -> "Qwen3OmniVisionConfig":
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        rope = d.get("rope_parameters") or {}
        if rope.get("rope_type", "axial") != "axial":
            raise ValueError(f"vision rope_parameters.rope_type must be 'axial'; got {rope['rope_type']!r}")
        if "rope_theta" in rope:
            kw["rope_theta"] = rope["rope_theta"]
        if "deepstack_visual_indexes" in kw:
            kw["deepstack_visual_indexes"] = tuple(kw["deepstack_visual_indexes"])
        for k in ("patch_size", "temporal_patch_size"):
            if isinstance(kw.get(k), (list, tuple)):
                raise ValueError(f"vision {k} must be one int; got {kw[k]}")
        cfg = cls(**kw)
        cfg.check()
        return cfg

    def check(self) -> None:
        head_dim = self.hidden_size // self.num_heads
        if self.hidden_size % self.num_heads or head_dim % 4:
            raise ValueError(f"vision hidden_size {self.hidden_size} / num_heads {self.num_heads} must give a "
                             f"head_dim divisible by 4 (2-D rotary); check the config")
        if math.isqrt(self.num_position_embeddings) ** 2 != self.num_position_embeddings:
            raise ValueError(f"vision num_position_embeddings {self.num_position_embeddings} is not a square")
        bad = [i for i in self.deepstack_visual_indexes if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"vision deepstack_visual_indexes {list(bad)} outside the {self.depth} blocks")


def interpolate_positions(table: torch.Tensor, grid_thw: list[list[int]], merge: int) -> torch.Tensor:
    """The learned (side*side, D) table resampled to each item's h x w grid, block-major, repeated
    per temporal step: (N, D) float32.

    Bilinear with align_corners=True: patch row i of h reads table row i*(side-1)/(h-1), the
    corners map onto the table's corners (what the reference's 4-tap gather computes).
    """
    side = math.isqrt(table.shape[0])
    grid = table.float().view(side, side, -1).permute(2, 0, 1)[None]  # (1, D, side, side)
    out = []
    for t, h, w in grid_thw:
        x = F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=True)[0]  # (D, h, w)
        x = x.permute(1, 2, 0).reshape(h // merge, merge, w // merge, merge, -1).transpose(1, 2)
        out.append(x.reshape(h * w, -1).repeat(t, 1))
    return torch.cat(out)


def rotary_cos_sin(pos: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """pos (N, 2) (h, w) patch coordinates, inv_freq (head_dim/4,) -> cos, sin (N, head_dim) float32,
    laid out [h freqs | w freqs | h freqs | w freqs] for `rotate_half`."""
    freqs = (pos[..., None].float() * inv_freq.float()).flatten(1)  # (N, head_dim/2)
    emb = torch.cat([freqs, freqs], -1)
    return emb.cos(), emb.sin()


class PatchEmbed(nn.Module):
    def __init__(self, cfg: Qwen3OmniVisionConfig):
        super().__init__()
        k = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel_size=k, stride=k, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C*Tp*P*P) -> (N, D)
        # A Conv3d whose kernel equals its input is one matrix product; F.linear skips the
        # conv's im2col and is several times faster on a CPU, same numbers.
        w = self.proj.weight
        return F.linear(x.to(w.dtype), w.view(w.shape[0], -1), self.proj.bias)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu: list[int]) -> torch.Tensor:
        N = x.shape[0]
        q, k, v = self.qkv(x).view(N, 3, self.num_heads, -1).unbind(1)  # (N, H, hd) each
        cos, sin = cos[:, None], sin[:, None]
        q = (q.float() * cos + rotate_half(q.float()) * sin).to(v.dtype)
        k = (k.float() * cos + rotate_half(k.float()) * sin).to(v.dtype)
        return self.proj(varlen_attention(q, k, v, cu).reshape(N, -1))


class MLP(nn.Module):
    def __init__(self, cfg: Qwen3OmniVisionConfig):
        super().__init__()
        self.linear_fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.linear_fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg: Qwen3OmniVisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=1e-6)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=1e-6)
        self.attn = Attention(cfg.hidden_size, cfg.num_heads)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, cu):
        x = x + self.attn(self.norm1(x), cos, sin, cu)
        return x + self.mlp(self.norm2(x))


class Merger(nn.Module):
    """m*m neighbouring patches -> one token. The final merger normalises each patch (`ln_q` over D);
    the deepstack mergers normalise the concatenated block (`ln_q` over m*m*D, "postshuffle")."""

    def __init__(self, cfg: Qwen3OmniVisionConfig, postshuffle: bool):
        super().__init__()
        dim = cfg.hidden_size * cfg.spatial_merge_size**2
        self.postshuffle = postshuffle
        self.ln_q = nn.LayerNorm(dim if postshuffle else cfg.hidden_size, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, cfg.out_hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, D) -> (N / m^2, out)
        dim = self.mlp[0].in_features
        x = self.ln_q(x.view(-1, dim)) if self.postshuffle else self.ln_q(x).view(-1, dim)
        return self.mlp(x)


class Qwen3OmniVisionEncoder(nn.Module):
    def __init__(self, cfg: Qwen3OmniVisionConfig):
        super().__init__()
        cfg.check()
        self.cfg = cfg
        self.merge = cfg.spatial_merge_size
        self.deepstack_visual_indexes = list(cfg.deepstack_visual_indexes)
        head_dim = cfg.hidden_size // cfg.num_heads
        d = head_dim // 2  # half the head turns with h, half with w
        self.register_buffer("inv_freq", 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float) / d)),
                             persistent=False)  # (head_dim/4,)
        self.patch_embed = PatchEmbed(cfg)
        self.pos_embed = nn.Embedding(cfg.num_position_embeddings, cfg.hidden_size)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.depth)])
        self.merger = Merger(cfg, postshuffle=False)
        self.merger_list = nn.ModuleList([Merger(cfg, postshuffle=True) for _ in cfg.deepstack_visual_indexes])

    def forward(self, pixels: torch.Tensor, grid_thw: list[list[int]]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """pixels (N, C*Tp*P*P) block-major patches of all items; grid_thw [[t, h, w], ...] in patches
        (a (n_items, 3) tensor is accepted too)
        -> merged tokens (N / m^2, out_hidden_size), items in input order, and one
           (N / m^2, out_hidden_size) deepstack feature per entry of deepstack_visual_indexes."""
        if isinstance(grid_thw, torch.Tensor):
            grid_thw = grid_thw.tolist()
        grid = [[int(v) for v in row] for row in grid_thw]
        N = pixels.shape[0]
        if N != sum(t * h * w for t, h, w in grid):
            raise ValueError(f"pixels has {N} patches but grid_thw {grid} describes "
                             f"{sum(t * h * w for t, h, w in grid)}")
        if any(h % self.merge or w % self.merge for _, h, w in grid):
            raise ValueError(f"grid_thw {grid}: h and w must be multiples of spatial_merge_size {self.merge}")
        dev = pixels.device
        cu = frame_seqlens(grid)

        x = self.patch_embed(pixels)  # (N, D)
        x = x + interpolate_positions(self.pos_embed.weight, grid, self.merge).to(x.dtype)
        cos, sin = rotary_cos_sin(vision_position_ids(grid, self.merge).to(dev), self.inv_freq)  # (N, hd)

        deepstack = []
        for i, blk in enumerate(self.blocks):
            x = blk(x, cos, sin, cu)
            if i in self.deepstack_visual_indexes:
                deepstack.append(self.merger_list[self.deepstack_visual_indexes.index(i)](x))
        return self.merger(x), deepstack
