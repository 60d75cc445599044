"""Token2Wav flow-matching DiT: codec codes + voice -> 80-bin mel (`token2wav.code2wav_dit_model.*`).

Numbers follow transformers' `Qwen2_5OmniToken2WavDiTModel`: an ECAPA speaker encoder over the
voice's reference mel, a codec embedding repeated `repeats` (2) times in time, AdaLN-zero blocks
with block attention (`block_size` mel frames; some layers also see one block ahead or back), and
rotary on the first head only. `sample_mel` is the reference's RK4 sampler with CFG and sway.

`DiT.forward` is pure: the sampler builds the classifier-free-guidance batch itself. `start` is
the absolute mel frame of x[:, 0], so a window of a longer utterance uses the same positions and
block grid as the whole one (token2wav.py streams that way).
"""

from __future__ import annotations

import math

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from omni.config import DiTConfig
from omni.layers import apply_rotary, fuse_linears


def _conv(cin: int, cout: int, k: int, dilation: int = 1) -> nn.Conv1d:
    return nn.Conv1d(cin, cout, k, dilation=dilation, padding="same", padding_mode="reflect")


class TimeDelayNetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, dilation: int):
        super().__init__()
        self.conv = _conv(cin, cout, k, dilation)

    def forward(self, x):  # (B, C, T)
        return F.relu(self.conv(x))


class Res2NetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, scale: int, k: int, dilation: int):
        super().__init__()
        self.blocks = nn.ModuleList(TimeDelayNetBlock(cin // scale, cout // scale, k, dilation) for _ in range(scale - 1))
        self.scale = scale

    def forward(self, x):
        outs = []
        for i, part in enumerate(torch.chunk(x, self.scale, dim=1)):
            if i == 0:
                y = part
            elif i == 1:
                y = self.blocks[0](part)
            else:
                y = self.blocks[i - 1](part + y)
            outs.append(y)
        return torch.cat(outs, dim=1)


class SqueezeExcitationBlock(nn.Module):
    def __init__(self, cin: int, se: int, cout: int):
        super().__init__()
        self.conv1 = _conv(cin, se, 1)
        self.conv2 = _conv(se, cout, 1)

    def forward(self, x):
        s = torch.sigmoid(self.conv2(F.relu(self.conv1(x.mean(dim=2, keepdim=True)))))
        return x * s


class SqueezeExcitationRes2NetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, scale: int, se: int, k: int, dilation: int):
        super().__init__()
        self.tdnn1 = TimeDelayNetBlock(cin, cout, 1, 1)
        self.res2net_block = Res2NetBlock(cout, cout, scale, k, dilation)
        self.tdnn2 = TimeDelayNetBlock(cout, cout, 1, 1)
        self.se_block = SqueezeExcitationBlock(cout, se, cout)

    def forward(self, x):
        return self.se_block(self.tdnn2(self.res2net_block(self.tdnn1(x)))) + x


def _stats(x, w):  # weighted mean and std over time; w broadcasts to x (B, C, T)
    mean = (w * x).sum(2)
    std = torch.sqrt((w * (x - mean.unsqueeze(2)).pow(2)).sum(2).clamp(1e-12))
    return mean, std


class AttentiveStatisticsPooling(nn.Module):
    def __init__(self, channels: int, attention_channels: int):
        super().__init__()
        self.tdnn = TimeDelayNetBlock(channels * 3, attention_channels, 1, 1)
        self.conv = _conv(attention_channels, channels, 1)

    def forward(self, x):  # (B, C, T) -> (B, 2C, 1)
        T = x.shape[-1]
        uniform = torch.ones(x.shape[0], 1, T, dtype=x.dtype) / T
        mean, std = _stats(x, uniform)
        a = torch.cat([x, mean.unsqueeze(2).expand(-1, -1, T), std.unsqueeze(2).expand(-1, -1, T)], dim=1)
        a = F.softmax(self.conv(torch.tanh(self.tdnn(a))), dim=2)
        mean, std = _stats(x, a)
        return torch.cat((mean, std), dim=1).unsqueeze(2)


class ECAPA(nn.Module):
    """Speaker encoder over the voice's reference mel (ECAPA-TDNN)."""

    def __init__(self, c: DiTConfig):
        super().__init__()
        ch, ks, dil = c.enc_channels, c.enc_kernel_sizes, c.enc_dilations
        if not len(ch) == len(ks) == len(dil):
            raise ValueError(f"enc_channels, enc_kernel_sizes, enc_dilations must have equal lengths; got {len(ch)}, {len(ks)}, {len(dil)}")
        self.blocks = nn.ModuleList([TimeDelayNetBlock(c.mel_dim, ch[0], ks[0], dil[0])])
        for i in range(1, len(ch) - 1):
            self.blocks.append(SqueezeExcitationRes2NetBlock(ch[i - 1], ch[i], c.enc_res2net_scale, c.enc_se_channels, ks[i], dil[i]))
        self.mfa = TimeDelayNetBlock(ch[-1], ch[-1], ks[-1], dil[-1])
        self.asp = AttentiveStatisticsPooling(ch[-1], c.enc_attention_channels)
        self.fc = _conv(ch[-1] * 2, c.enc_dim, 1)

    def forward(self, mel):  # (B, T, mel_dim) -> (B, enc_dim)
        x = mel.transpose(1, 2)
        hs = []
        for blk in self.blocks:
            x = blk(x)
            hs.append(x)
        x = self.mfa(torch.cat(hs[1:], dim=1))
        return self.fc(self.asp(x)).squeeze(-1)


class InputEmbedding(nn.Module):
    def __init__(self, c: DiTConfig):
        super().__init__()
        self.proj = nn.Linear(c.mel_dim + c.enc_dim + c.enc_emb_dim + c.emb_dim, c.hidden_size)
        self.spk_encoder = ECAPA(c)


class CodecEmbedding(nn.Module):
    def __init__(self, c: DiTConfig):
        super().__init__()
        self.codec_embed = nn.Embedding(c.num_embeds + 1, c.emb_dim)


class TimestepEmbedding(nn.Module):
    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.time_mlp = nn.ModuleList([nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim)])

    def forward(self, t):  # (B,) in [0, 1] -> (B, dim)
        half = self.freq_dim // 2
        f = torch.exp(torch.arange(half).float() * -(math.log(10000) / (half - 1)))
        e = 1000 * t.unsqueeze(1) * f.unsqueeze(0)
        h = torch.cat((e.sin(), e.cos()), dim=-1).to(t.dtype)
        for layer in self.time_mlp:
            h = layer(h)
        return h


class AdaLayerNormZero(nn.Module):
    def __init__(self, dim: int, n: int):
        super().__init__()
        self.linear = nn.Linear(dim, dim * n)


class Attention(nn.Module):
    def __init__(self, c: DiTConfig):
        super().__init__()
        inner = c.head_dim * c.num_attention_heads
        self.heads = c.num_attention_heads
        self.to_q = nn.Linear(c.hidden_size, inner)
        self.to_k = nn.Linear(c.hidden_size, inner)
        self.to_v = nn.Linear(c.hidden_size, inner)
        self.to_out = nn.ModuleList([nn.Linear(inner, c.hidden_size)])
        self._qkv: tuple[torch.Tensor, torch.Tensor | None] | None = None  # set by fuse()

    def fuse(self) -> None:
        """q, k and v in one product (after loading; see `omni.layers.fuse_linears`)."""
        self._qkv = fuse_linears([self.to_q, self.to_k, self.to_v])

    def forward(self, x, cos, sin, mask):  # x (B, T, D); cos/sin (T, hd) or (B, 1, T, hd); mask: BlockPlan or (.., T, T)
        B, T, _ = x.shape
        if self._qkv is None:
            q, k, v = (p(x).view(B, T, self.heads, -1).transpose(1, 2) for p in (self.to_q, self.to_k, self.to_v))
        else:
            q, k, v = F.linear(x, *self._qkv).view(B, T, 3, self.heads, -1).permute(2, 0, 3, 1, 4)  # (B, nh, T, hd)
        # The checkpoint was trained with interleaved rotary on the first head only.
        q = torch.cat([apply_rotary(_deinterleave(q[:, :1]), cos, sin), q[:, 1:]], dim=1)
        k = torch.cat([apply_rotary(_deinterleave(k[:, :1]), cos, sin), k[:, 1:]], dim=1)
        if isinstance(mask, BlockPlan):
            y = block_attention(q, k, v, mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.to_out[0](y.transpose(1, 2).reshape(B, T, -1))


@dataclass(frozen=True)
class BlockLayout:
    """Attention restricted to whole blocks: a query in block i sees the keys of blocks i-back .. i+ahead.

    offset: frames of the first block that lie before x[:, 0] (start % block_size).
    """

    block: int
    back: int
    ahead: int
    offset: int


@dataclass(frozen=True)
class BlockPlan:
    """Index work of `block_attention` for one layout and length, done once per window."""

    layout: BlockLayout
    blocks: int  # n: blocks the frames touch
    neighbours: torch.Tensor  # (n * S,): for each block, its S neighbour blocks (clamped at the ends)
    key_bias: torch.Tensor  # (n, 1, S * block): 0 for neighbour frames inside the window, -inf elsewhere

    @classmethod
    def make(cls, lay: BlockLayout, T: int, device) -> "BlockPlan":
        n = -(-(lay.offset + T) // lay.block)
        frame_ok = F.pad(torch.ones(T, dtype=torch.bool), (lay.offset, n * lay.block - lay.offset - T)).view(n, lay.block)
        idx = torch.arange(n)
        shifts = range(-min(lay.back, n - 1), min(lay.ahead, n - 1) + 1)  # no block lies further away than n - 1
        shifted = torch.stack([(idx + sh).clamp(0, n - 1) for sh in shifts], 1)  # (n, S)
        inside = torch.stack([((idx + sh) >= 0) & ((idx + sh) < n) for sh in shifts], 1)  # (n, S)
        key_ok = (frame_ok[shifted] & inside[..., None]).view(n, 1, -1)
        # an additive mask: the attention kernel skips the checks a boolean one costs
        key_bias = torch.zeros(key_ok.shape).masked_fill_(~key_ok, float("-inf"))
        return cls(lay, n, shifted.reshape(-1).to(device), key_bias.to(device))


def block_attention(q, k, v, plan: BlockPlan):
    """Exact block-local attention without a (T, T) mask: (B, h, T, d) -> (B, h, T, d).

    Queries are cut into blocks; each attends to its own and its neighbour blocks' keys, so the
    cost is T x block x (1 + back + ahead) instead of T x T.
    """
    B, h, T, d = q.shape
    lay, n = plan.layout, plan.blocks
    pad = (0, 0, lay.offset, n * lay.block - lay.offset - T)
    qb, kb, vb = (F.pad(x, pad).view(B, h, n, lay.block, d) for x in (q, k, v))
    # neighbour blocks of every block side by side along the key axis: (B, h, n, S * block, d)
    kn = kb.index_select(2, plan.neighbours).view(B, h, n, -1, d)
    vn = vb.index_select(2, plan.neighbours).view(B, h, n, -1, d)
    y = F.scaled_dot_product_attention(qb, kn, vn, attn_mask=plan.key_bias)  # (B, h, n, block, d)
    return y.reshape(B, h, n * lay.block, d)[:, :, lay.offset:lay.offset + T]


def _deinterleave(x):  # (x0, x1, x2, x3, ...) -> (x0, x2, ..., x1, x3, ...)
    return torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)


class FeedForward(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        # ff.{0,3}: the checkpoint's Linear, GELU(tanh), Dropout, Linear
        self.ff = nn.ModuleList([nn.Linear(dim, inner), nn.Identity(), nn.Identity(), nn.Linear(inner, dim)])

    def forward(self, x):
        return self.ff[3](F.gelu(self.ff[0](x), approximate="tanh"))


class DiTBlock(nn.Module):
    def __init__(self, c: DiTConfig, ahead: int, back: int):
        super().__init__()
        self.attn_norm = AdaLayerNormZero(c.hidden_size, 6)
        self.attn = Attention(c)
        self.ff = FeedForward(c.hidden_size, int(c.hidden_size * c.ff_mult))
        self.ahead, self.back = ahead, back

    def attention_mask(self, grid: BlockLayout | torch.Tensor, T: int, device):
        """This layer's attention pattern over a window: a BlockPlan when every row shares one block grid
        (`grid` a BlockLayout), else a boolean mask from `grid`, (.., T, T) key block - query block."""
        if isinstance(grid, BlockLayout):
            return BlockPlan.make(BlockLayout(grid.block, self.back, self.ahead, grid.offset), T, device)
        return (grid >= -float(self.back)) & (grid <= float(self.ahead))

    def forward(self, x, temb, cos, sin, mask):
        D = x.shape[-1]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = torch.chunk(self.attn_norm.linear(F.silu(temb)), 6, dim=1)
        h = F.layer_norm(x, (D,), eps=1e-6) * (1 + scale_msa[:, None]) + shift_msa[:, None]
        x = x + gate_msa.unsqueeze(1) * self.attn(h, cos, sin, mask)
        h = F.layer_norm(x, (D,), eps=1e-6) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        return x + gate_mlp.unsqueeze(1) * self.ff(h)


class DiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        c = cfg
        self.time_embed = TimestepEmbedding(c.hidden_size)
        self.text_embed = CodecEmbedding(c)
        self.input_embed = InputEmbedding(c)
        self.transformer_blocks = nn.ModuleList(
            DiTBlock(c, int(i in c.look_ahead_layers), int(i in c.look_backward_layers)) for i in range(c.num_hidden_layers))
        self.norm_out = AdaLayerNormZero(c.hidden_size, 2)
        self.proj_out = nn.Linear(c.hidden_size, c.mel_dim)
        hd = c.head_dim
        inv_freq = 1.0 / (cfg.get_rope_theta() ** (torch.arange(0, hd, 2, dtype=torch.float) / hd))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def speaker(self, ref_mel):  # (B, T_ref, mel_dim) -> (B, enc_dim)
        return self.input_embed.spk_encoder(ref_mel)

    def fuse(self) -> None:
        """Serving layout, after loading: q/k/v in one product per layer."""
        for layer in self.transformer_blocks:
            layer.attn.fuse()

    def forward(self, x, spk, cond, codes, t, start: int | torch.Tensor = 0):
        """One velocity evaluation.

        x (B, T, mel_dim) noisy mel; spk (B, enc_dim) = speaker(ref_mel); cond (B, enc_emb_dim) the
        voice vector; codes (B, T / repeats) codec ids (0 = the "dropped" code used by CFG); t (B,)
        flow time; start: absolute mel frame of x[:, 0], one for all rows or (B,) one per row (windows
        of several utterances in one batch). Returns the velocity (B, T, mel_dim).
        """
        if codes.shape[1] * self.cfg.repeats != x.shape[1]:
            raise ValueError(f"x has {x.shape[1]} mel frames but codes give {codes.shape[1]} x {self.cfg.repeats}")
        return self.velocity(self.prepare(spk, cond, codes, start), x, t)

    def prepare(self, spk, cond, codes, start: int | torch.Tensor = 0) -> "DiTWindow":
        """Everything a window's velocity evaluations share (the sampler makes 36): the input
        projection of voice and codes, rotary angles, each layer's attention pattern."""
        c = self.cfg
        B, T = codes.shape[0], codes.shape[1] * c.repeats
        device = spk.device
        code = torch.repeat_interleave(self.text_embed.codec_embed(codes), c.repeats, dim=1)  # (B, T, emb_dim)
        rest = torch.cat((spk.unsqueeze(1).expand(B, T, -1), code, cond.unsqueeze(1).expand(B, T, -1)), dim=-1)
        proj = self.input_embed.proj  # its input is [x, spk, code, cond]: all but x are fixed for the window
        fixed = F.linear(rest, proj.weight[:, c.mel_dim:], proj.bias)  # (B, T, D)
        per_row = torch.is_tensor(start) and start.dim() == 1
        pos = (start.view(-1, 1).cpu() if per_row else start) + torch.arange(T)  # (B, T) or (T,)
        freqs = pos[..., None].float() * self.inv_freq.cpu()
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(device), emb.sin().to(device)  # (T, hd) or (B, T, hd)
        offsets = {int(o) for o in (start.view(-1) if per_row else torch.tensor([start])) % c.block_size}
        if per_row:
            cos, sin = cos[:, None], sin[:, None]
        if len(offsets) == 1:  # every row on the same block grid: block-local attention, no (T, T) mask
            grid = BlockLayout(c.block_size, 0, 0, offsets.pop())
        else:
            blk = pos // c.block_size
            grid = (blk[..., None, :] - blk[..., :, None]).to(device)  # (.., T, T): key block - query block
            if per_row:
                grid = grid[:, None]
        masks = [layer.attention_mask(grid, T, device) for layer in self.transformer_blocks]
        return DiTWindow(fixed, proj.weight[:, :c.mel_dim].contiguous(), cos, sin, masks)

    def velocity(self, win: "DiTWindow", x, t):
        """x (B, T, mel_dim) at flow time t (B,) -> velocity (B, T, mel_dim), over a prepared window."""
        temb = self.time_embed(t)  # (B, D)
        h = torch.addmm(win.fixed.flatten(0, 1), x.flatten(0, 1), win.x_weight.T).view(win.fixed.shape)
        for layer, mask in zip(self.transformer_blocks, win.masks):
            h = layer(h, temb, win.cos, win.sin, mask)
        scale, shift = torch.chunk(self.norm_out.linear(F.silu(temb)), 2, dim=1)
        h = F.layer_norm(h, (h.shape[-1],), eps=1e-6) * (1 + scale)[:, None, :] + shift[:, None, :]
        return self.proj_out(h)


@dataclass
class DiTWindow:
    """`DiT.prepare`'s result; holds tensors for one sampling call, never stored on the module."""

    fixed: torch.Tensor  # (B, T, D) input projection of voice, codes, bias
    x_weight: torch.Tensor  # (D, mel_dim) the projection's columns for the noisy mel
    cos: torch.Tensor
    sin: torch.Tensor
    masks: list  # per layer: BlockPlan or boolean mask


def time_points(steps: int = 10, sway: float | None = -1.0) -> torch.Tensor:
    """Flow times 0..1, bent by `sway` toward t=0 as in the reference: (steps,)."""
    t = torch.linspace(0, 1, steps, dtype=torch.float32)
    if sway is not None:
        t += sway * (torch.cos(torch.pi / 2 * t) - 1 + t)
    return t


def draw_noise(generator: torch.Generator | None, batch: int, frames: int, mel_dim: int) -> torch.Tensor:
    """Initial noise (B, frames, mel_dim); generator None draws from the global RNG like transformers."""
    return torch.randn(batch, frames, mel_dim, generator=generator)


@torch.no_grad()
def sample_mel(
    dit: DiT,
    codes: torch.Tensor,
    ref_mel: torch.Tensor,
    cond: torch.Tensor,
    *,
    steps: int = 10,
    guidance_scale: float = 0.5,
    sway: float | None = -1.0,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    spk: torch.Tensor | None = None,
    start: int | torch.Tensor = 0,
    spk_null: torch.Tensor | None = None,
) -> torch.Tensor:
    """codes (B, T_codes) -> mel (B, mel_dim, repeats * T_codes).

    RK4 (3/8 rule) over `steps` time points with classifier-free guidance, as transformers'
    `sample`. noise (B, T, mel_dim) overrides drawing from `generator`. spk (B, enc_dim) may be
    passed precomputed (it depends on ref_mel only). start: absolute mel frame of the window, or
    (B,) one per row when windows of several utterances share the batch. spk_null (B, enc_dim):
    speaker(zeros like ref_mel), the CFG half's voice, if already computed.
    """
    c = dit.cfg
    B = codes.shape[0]
    T = codes.shape[1] * c.repeats
    last = int(start.max()) if torch.is_tensor(start) else start
    if last + T > c.max_position_embeddings:
        raise ValueError(f"mel length {last + T} exceeds dit max_position_embeddings {c.max_position_embeddings}; pass fewer codes")
    if torch.is_tensor(start) and guidance_scale >= 1e-5:
        start = torch.cat([start, start])  # the unconditioned half of the CFG batch sits at the same frames
    y = noise if noise is not None else draw_noise(generator, B, T, c.mel_dim)
    if y.shape != (B, T, c.mel_dim):
        raise ValueError(f"noise must be {(B, T, c.mel_dim)}; got {tuple(y.shape)}")
    ref_mel, cond = ref_mel.float(), cond.float()
    if spk is None:
        spk = dit.speaker(ref_mel)
    if guidance_scale >= 1e-5:
        # batch [conditioned; unconditioned]: no voice, no reference mel, all codes -> 0
        spk = torch.cat([spk, dit.speaker(torch.zeros_like(ref_mel)) if spk_null is None else spk_null], dim=0)
        cond = torch.cat([cond, torch.zeros_like(cond)], dim=0)
        codes = torch.cat([codes, torch.zeros_like(codes)], dim=0)

    win = dit.prepare(spk, cond, codes, start)

    def velocity(t, x):
        n = codes.shape[0]
        if guidance_scale < 1e-5:
            return dit.velocity(win, x, t.repeat(n))
        out = dit.velocity(win, torch.cat([x, x], dim=0), t.repeat(n))
        guided, null = torch.chunk(out, 2, dim=0)
        return guided + (guided - null) * guidance_scale

    ts = time_points(steps, sway)
    third, two_thirds = 1 / 3, 2 / 3
    for t0, t1 in zip(ts[:-1], ts[1:]):
        dt = t1 - t0
        k1 = velocity(t0, y)
        k2 = velocity(t0 + dt * third, y + dt * k1 * third)
        k3 = velocity(t0 + dt * two_thirds, y + dt * (k2 - k1 * third))
        k4 = velocity(t1, y + dt * (k1 - k2 + k3))
        y = y + (k1 + 3 * (k2 + k3) + k4) * dt / 8
    return y.permute(0, 2, 1)
