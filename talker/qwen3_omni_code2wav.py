"""Qwen3-Omni's Code2Wav: 16-codebook codec frames (12.5/s) -> 24 kHz waveform, one-shot and exactly streamed.

Keys = the checkpoint's `code2wav.*`. Each frame's codes are looked up (codebook q at rows
q*codebook_size..) and averaged -> a causal transformer whose attention sees the last `sliding_window`
frames (itself included) -> two x2 transposed convs (kernel = stride: per-frame) each with a ConvNeXt
block -> a causal conv -> one block per `upsample_rates` r (SnakeBeta, transposed conv of kernel 2r
trimmed by r each side, three residual units with causal k=7 convs at dilations 1, 3, 9) -> SnakeBeta,
causal conv to 1 channel, clamp to [-1, 1].

Every conv is causal except that a trimmed transposed conv's output sample m reads input floor(m/r) and
floor(m/r)+1; the trim drops the samples that would need the next input, so T frames give
`out_len(T)` samples (1920*T - 555 at the real rates (8, 5, 4, 3) x (2, 2)) and that output is a prefix
of the output of any longer code sequence: every sample returned is final when returned.

Streaming (`Code2WavStream`, no state on the module): the transformer runs one frame per forward with a
KV cache of the last sliding_window - 1 frames per layer (batched across streams). The conv stack runs
per chunk of frames on a fixed grid: chunk i holds min(2**i, max_chunk_frames) frames (1, 2, 4, 8, 16,
16, ...), and a chunk [b, e) is decoded over a window of `context_frames` cached transformer outputs
before b plus the chunk itself; the window's samples out_len(b) .. out_len(e) are kept. `context_frames`
is derived by walking the conv stack backwards from a frame's first new sample (see `first_frame`): at
the real and the tiny configs, out_len(u) = 1920u - 555 -> final conv k7: -6 -> per block r = 3, 4, 5, 8:
residual units -(6+18+54), then floor(./r) -> first conv k7: -6 -> ConvNeXt k7: -6, floor(./2) -> -6,
floor(./2) gives frame u - 10: 10 frames of context. The first chunk is one frame: out_len(1) = 1365
samples (57 ms) once the first frame is in; other rates give other numbers (the tests' "deep": 20 frames
of context, 42 samples; "wide": 8 frames, 1150 samples). `finish` decodes the last, partial chunk: one-shot
decoding of T frames ends at out_len(T) too (its last 555 samples would need frame T+1).

Why a fixed grid: a stream's work then depends only on frame indices, never on how its codes arrived, so
its output is bit-for-bit independent of the grouping of pushes (and equals one-shot to fp32 rounding;
on CPU a conv's numbers change in the last bit with its length, so each grouping would otherwise round
differently). A chunk of k frames costs k + context_frames frames of conv: 2.25x one-shot at k = 8,
1.6x at 16 (one window per frame would cost 11x). Batched over streams (`advance`): the j-th new frame
of every stream that has one goes through the transformer in one forward, each at its own position,
their caches stacked (always sliding_window - 1 slots; the slots before a stream's first frame are
masked), and the chunks that are complete go through the conv stack in one batch per window length.
Equal to advancing each stream alone to fp32 rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from omni.config import ConfigError, _build, _Rope, _to_dict
from omni.layers import GatedMLP, RMSNorm, apply_rotary


@dataclass
class Code2WavConfig(_Rope):
    """`code2wav_config` of config.json; defaults are transformers' Qwen3OmniMoeCode2WavConfig. Unknown keys
    are kept in `extra`; dropouts and initializer_range are training-only."""

    codebook_size: int = 2048
    hidden_size: int = 1024
    max_position_embeddings: int = 8000  # not a limit: rotary angles are computed for any position
    num_attention_heads: int = 16
    num_key_value_heads: int = 16
    head_dim: int | None = None  # hidden_size // num_attention_heads unless given
    attention_bias: bool = False
    sliding_window: int = 72  # frames each frame attends to, itself included
    intermediate_size: int = 3072
    hidden_act: str = "silu"
    layer_scale_initial_scale: float = 0.01
    rms_norm_eps: float = 1e-5
    num_hidden_layers: int = 8
    num_quantizers: int = 16
    upsample_rates: list[int] = field(default_factory=lambda: [8, 5, 4, 3])
    upsampling_ratios: list[int] = field(default_factory=lambda: [2, 2])
    decoder_dim: int = 1536
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    rope_theta: float | None = None
    rope_scaling: dict | None = None
    rope_parameters: dict | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "Code2WavConfig":
        cfg = _build(cls, d)
        cfg.upsample_rates, cfg.upsampling_ratios = list(cfg.upsample_rates), list(cfg.upsampling_ratios)
        cfg.check()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self)

    def get_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def check(self) -> None:
        p = self.rope_params()
        if p.get("rope_type", p.get("type", "default")) != "default":
            raise ConfigError(f"code2wav rope_type must be 'default'; got {p}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"code2wav num_attention_heads {self.num_attention_heads} is not a multiple of "
                              f"num_key_value_heads {self.num_key_value_heads}")
        if self.sliding_window < 1:
            raise ConfigError(f"code2wav sliding_window must be >= 1; got {self.sliding_window}")
        if self.decoder_dim % 2 ** len(self.upsample_rates):
            raise ConfigError(f"code2wav decoder_dim {self.decoder_dim} must be divisible by "
                              f"2**len(upsample_rates) = {2 ** len(self.upsample_rates)}")


class CausalConv(nn.Module):
    """Conv1d (stride 1) left-padded with zeros by its reach: output t reads inputs t - (k-1)*d .. t."""

    def __init__(self, cin: int, cout: int, kernel: int, dilation: int = 1, groups: int = 1):
        super().__init__()
        self.conv = nn.Conv1d(cin, cout, kernel, dilation=dilation, groups=groups)
        self.reach = (kernel - 1) * dilation

    def forward(self, x):  # (B, C, L) -> (B, C', L)
        return self.conv(F.pad(x, (self.reach, 0)))


class CausalTransConv(nn.Module):
    """ConvTranspose1d (kernel K, stride r) with K - r samples trimmed each side: L inputs -> (L-1)*r + 2r - K
    outputs; output m reads inputs floor(m/r) .. floor((m + K - r)/r)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int):
        super().__init__()
        self.conv = nn.ConvTranspose1d(cin, cout, kernel, stride=stride)
        self.kernel, self.stride, self.trim = kernel, stride, kernel - stride

    def forward(self, x):
        x = self.conv(x)
        return x[..., self.trim:x.shape[-1] - self.trim]


class SnakeBeta(nn.Module):
    """x + sin(x e^alpha)^2 / e^beta per channel (the reference's op order, so the numbers are the same)."""

    def __init__(self, dim: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(dim))
        self.beta = nn.Parameter(torch.zeros(dim))

    def forward(self, x):  # (B, C, L)
        alpha, beta = self.alpha.exp()[None, :, None], self.beta.exp()[None, :, None]
        return x + (1.0 / (beta + 1e-9)) * torch.pow(torch.sin(x * alpha), 2)


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = CausalConv(dim, dim, 7, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x):  # (B, C, L)
        h = self.norm(self.dwconv(x).permute(0, 2, 1))
        h = self.gamma * self.pwconv2(F.gelu(self.pwconv1(h)))
        return x + h.permute(0, 2, 1)


class ResidualUnit(nn.Module):
    def __init__(self, dim: int, dilation: int):
        super().__init__()
        self.act1 = SnakeBeta(dim)
        self.conv1 = CausalConv(dim, dim, 7, dilation=dilation)
        self.act2 = SnakeBeta(dim)
        self.conv2 = CausalConv(dim, dim, 1)

    def forward(self, x):
        return x + self.conv2(self.act2(self.conv1(self.act1(x))))


class DecoderBlock(nn.Module):
    def __init__(self, cin: int, cout: int, rate: int):
        super().__init__()
        self.block = nn.ModuleList([SnakeBeta(cin), CausalTransConv(cin, cout, 2 * rate, rate)]
                                   + [ResidualUnit(cout, d) for d in (1, 3, 9)])

    def forward(self, x):
        for m in self.block:
            x = m(x)
        return x


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float):
        super().__init__()
        self.scale = nn.Parameter(torch.full((dim,), init))

    def forward(self, x):
        return self.scale * x


class Attention(nn.Module):
    def __init__(self, cfg: Code2WavConfig):
        super().__init__()
        hd, bias, H = cfg.get_head_dim(), cfg.attention_bias, cfg.hidden_size
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, hd
        self.q_proj = nn.Linear(H, self.n_heads * hd, bias=bias)
        self.k_proj = nn.Linear(H, self.n_kv * hd, bias=bias)
        self.v_proj = nn.Linear(H, self.n_kv * hd, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * hd, H, bias=bias)

    def forward(self, x, cos, sin, past_k, past_v, mask):
        """x (B, S, H) at cos/sin (B|1, 1, S, hd); past_k/v (B, nkv, P, hd) post-RoPE, P may be 0; mask (B|1, 1,
        S, P+S) bool, True = attend. Returns (B, S, H) and keys/values (B, nkv, P+S, hd)."""
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, S, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, S, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_kv != self.n_heads)
        return self.o_proj(out.transpose(1, 2).reshape(B, S, -1)), k, v


class TransformerLayer(nn.Module):
    def __init__(self, cfg: Code2WavConfig):
        super().__init__()
        H = cfg.hidden_size
        self.self_attn = Attention(cfg)
        self.mlp = GatedMLP(H, cfg.intermediate_size, cfg.hidden_act)
        self.input_layernorm = RMSNorm(H, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(H, cfg.rms_norm_eps)
        self.self_attn_layer_scale = LayerScale(H, cfg.layer_scale_initial_scale)
        self.mlp_layer_scale = LayerScale(H, cfg.layer_scale_initial_scale)

    def forward(self, x, cos, sin, past_k, past_v, mask):
        h, k, v = self.self_attn(self.input_layernorm(x), cos, sin, past_k, past_v, mask)
        x = x + self.self_attn_layer_scale(h)
        return x + self.mlp_layer_scale(self.mlp(self.post_attention_layernorm(x))), k, v


class Transformer(nn.Module):
    """`code2wav.pre_transformer.*`: the frames' causal sliding-window transformer and its final norm."""

    def __init__(self, cfg: Code2WavConfig):
        super().__init__()
        self.layers = nn.ModuleList([TransformerLayer(cfg) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        hd = cfg.get_head_dim()
        inv_freq = 1.0 / (cfg.get_rope_theta() ** (torch.arange(0, hd, 2, dtype=torch.float) / hd))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def rotary(self, positions: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, S) -> cos, sin (B, 1, S, hd), as the reference computes them."""
        freqs = positions[..., None].float() * self.inv_freq
        emb = torch.cat([freqs, freqs], dim=-1)[:, None]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, x, positions, past_k, past_v, mask):
        """x (B, S, H); positions (B|1, S); past_k/v: per layer (B, nkv, P, hd). Returns normed (B, S, H) and
        the per-layer keys/values (B, nkv, P+S, hd)."""
        cos, sin = self.rotary(positions, x.dtype)
        ks, vs = [], []
        for layer, pk, pv in zip(self.layers, past_k, past_v):
            x, k, v = layer(x, cos, sin, pk, pv, mask)
            ks.append(k)
            vs.append(v)
        return self.norm(x), ks, vs


@dataclass
class Code2WavStream:
    """One utterance being streamed: the transformer's KV window, its cached outputs, counters."""

    keys: torch.Tensor  # (layers, nkv, sliding_window-1, hd) post-RoPE keys of the last frames, oldest first;
    values: torch.Tensor  # the slots before the first frame are zeros and masked out
    hidden: torch.Tensor  # (hidden_size, n) transformer outputs of frames hidden_from .. frames - 1
    max_chunk_frames: int = 16  # the chunk grid: 1, 2, 4, ... up to this many frames a chunk
    hidden_from: int = 0
    frames: int = 0  # frames received
    decoded: int = 0  # frames whose samples are out (a chunk boundary)
    chunks: int = 0  # chunks decoded
    emitted: int = 0  # samples returned (= out_len(decoded))
    finished: bool = False

    @property
    def chunk_end(self) -> int:
        """The frame the next chunk ends before."""
        return self.decoded + min(2 ** self.chunks, self.max_chunk_frames)

    def reset(self) -> None:
        """Start a new utterance with the same buffers."""
        self.keys.zero_()
        self.values.zero_()
        self.hidden = self.hidden[:, :0]
        self.hidden_from = self.frames = self.decoded = self.chunks = self.emitted = 0
        self.finished = False


class Code2Wav(nn.Module):
    def __init__(self, cfg: Code2WavConfig):
        super().__init__()
        self.cfg = cfg
        H, D = cfg.hidden_size, cfg.decoder_dim
        self.pre_transformer = Transformer(cfg)
        self.code_embedding = nn.Embedding(cfg.codebook_size * cfg.num_quantizers, H)
        self.register_buffer("code_offset", torch.arange(cfg.num_quantizers).view(1, -1, 1) * cfg.codebook_size,
                             persistent=False)
        self.upsample = nn.ModuleList([nn.ModuleList([CausalTransConv(H, H, f, f), ConvNeXtBlock(H)])
                                       for f in cfg.upsampling_ratios])
        rates = cfg.upsample_rates
        self.decoder = nn.ModuleList(
            [CausalConv(H, D, 7)]
            + [DecoderBlock(D // 2 ** i, D // 2 ** (i + 1), r) for i, r in enumerate(rates)]
            + [SnakeBeta(D // 2 ** len(rates)), CausalConv(D // 2 ** len(rates), 1, 7)])
        self.samples_per_frame = math.prod(rates + cfg.upsampling_ratios)  # 1920 at the real config
        self.kv_frames = cfg.sliding_window - 1  # past frames a frame attends to (71), the KV cache's length
        self.context_frames = self._context_frames()  # past frames the conv stack needs (10 at the real config)

    # --- sizes and receptive field, walked over the conv modules themselves ---

    def _convs(self) -> list[nn.Module]:
        """The CausalConv / CausalTransConv modules in the order the conv stack applies them."""
        if "_conv_list" not in self.__dict__:
            self.__dict__["_conv_list"] = [m for m in list(self.upsample.modules()) + list(self.decoder.modules())
                                           if isinstance(m, (CausalConv, CausalTransConv))]
        return self.__dict__["_conv_list"]

    def out_len(self, frames: int) -> int:
        """Samples of `frames` frames (1920*frames - 555 at the real config; 0 for none)."""
        n = frames
        if n <= 0:
            return 0
        for m in self._convs():
            if isinstance(m, CausalTransConv):
                n = (n - 1) * m.stride + m.kernel - 2 * m.trim
        return max(n, 0)

    def first_frame(self, sample: int) -> int:
        """The earliest frame output sample `sample` depends on (negative: it reaches into the zero padding).
        A causal conv reaches back (k-1)*d inputs; a trimmed transposed conv's output m reads input floor(m/r)
        first; residual branches add the sample itself, never earlier."""
        m = sample
        for c in reversed(self._convs()):
            m = m - c.reach if isinstance(c, CausalConv) else (m + c.trim - c.kernel) // c.stride + 1
        return m

    def _context_frames(self) -> int:
        u = 4 * self.cfg.sliding_window + 1000  # far from the start: the context no longer depends on u
        ctx = {u + i - self.first_frame(self.out_len(u + i)) for i in range(3)}
        if len(ctx) != 1:
            raise ConfigError(f"code2wav conv stack is not shift-invariant per frame (contexts {ctx})")
        return max(ctx.pop(), 0)

    def window_start(self, frames_before: int) -> int:
        """First frame of the conv window that makes frame `frames_before`'s samples exactly."""
        return max(0, self.first_frame(self.out_len(frames_before)))

    # --- one-shot ---

    def embed(self, codes: torch.LongTensor) -> torch.Tensor:
        """codes (B, Q, T) -> (B, T, H): the mean of the frame's Q code embeddings."""
        if codes.dim() != 3 or codes.shape[1] != self.cfg.num_quantizers:
            raise ValueError(f"codes must be (batch, {self.cfg.num_quantizers} codebooks, frames); "
                             f"got {tuple(codes.shape)}")
        return self.code_embedding(codes + self.code_offset).mean(1)

    def vocode(self, hidden: torch.Tensor) -> torch.Tensor:
        """Transformer outputs (B, H, T) -> waveform (B, 1, out_len(T)), clamped to [-1, 1]."""
        x = hidden
        for up, block in self.upsample:
            x = block(up(x))
        for m in self.decoder:
            x = m(x)
        return x.clamp(min=-1, max=1)

    @torch.no_grad()
    def forward(self, codes: torch.LongTensor) -> torch.Tensor:
        """codes (B, num_quantizers, T), codebook 0 first -> waveform (B, 1, out_len(T)) at 24 kHz."""
        x = self.embed(codes)
        T, W = x.shape[1], self.cfg.sliding_window
        pos = torch.arange(T, device=x.device)
        mask = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - W)  # (T, T) query x key
        empty = x.new_zeros(x.shape[0], self.cfg.num_key_value_heads, 0, self.cfg.get_head_dim())
        L = self.cfg.num_hidden_layers
        h, _, _ = self.pre_transformer(x, pos[None], [empty] * L, [empty] * L, mask[None, None])
        return self.vocode(h.transpose(1, 2))

    # --- streaming ---

    def start(self, max_chunk_frames: int = 16) -> Code2WavStream:
        """A new, empty stream on the module's device and dtype (its chunks grow to `max_chunk_frames`)."""
        c, p = self.cfg, self.code_embedding.weight
        shape = (c.num_hidden_layers, c.num_key_value_heads, c.sliding_window - 1, c.get_head_dim())
        return Code2WavStream(keys=p.new_zeros(shape), values=p.new_zeros(shape),
                              hidden=p.new_zeros(c.hidden_size, 0), max_chunk_frames=max_chunk_frames)

    def push(self, stream: Code2WavStream, codes: torch.LongTensor) -> torch.Tensor:
        """Add frames (num_quantizers, k), k >= 0; returns the samples of the chunks they complete."""
        return self.advance([stream], [codes])[0]

    def finish(self, stream: Code2WavStream) -> torch.Tensor:
        """End the utterance: the samples of its last, partial chunk (all of `forward(all codes)` is then
        out); later pushes are refused until `stream.reset()`."""
        return self.advance([stream], [stream.keys.new_zeros(self.cfg.num_quantizers, 0, dtype=torch.long)],
                            final=[True])[0]

    @torch.no_grad()
    def advance(self, streams: list[Code2WavStream], codes: list[torch.LongTensor],
                final: list[bool] | None = None) -> list[torch.Tensor]:
        """Add frames to several streams at once (codes[i] (num_quantizers, k_i), any k_i >= 0); returns each
        stream's newly final samples (n_i,): those of the chunks now complete, and for a `final` stream the
        rest (it is then finished). One batched transformer forward per frame index j over the streams that
        have a j-th new frame, then one conv pass per window length. Equals `push` on each alone."""
        if len(streams) != len(codes):
            raise ValueError(f"{len(streams)} streams but {len(codes)} code tensors")
        if len({id(s) for s in streams}) != len(streams):
            raise ValueError("a stream appears twice in one advance; concatenate its codes instead")
        Q = self.cfg.num_quantizers
        for s, c in zip(streams, codes):
            if s.finished:
                raise RuntimeError("push after finish; call stream.reset() to start a new utterance")
            if c.dim() != 2 or c.shape[0] != Q:
                raise ValueError(f"codes must be ({Q} codebooks, frames); got {tuple(c.shape)}")
        dev = self.code_embedding.weight.device
        counts = [c.shape[1] for c in codes]
        new = [self.embed(c[None].to(dev))[0] if k else None for c, k in zip(codes, counts)]  # (k_i, H)
        for s, h in zip(streams, self._transformer_steps(streams, new, counts)):
            if h is not None:
                s.hidden = torch.cat([s.hidden, h], dim=1)
        return self._conv_chunks(streams, final or [False] * len(streams))

    def _transformer_steps(self, streams, new, counts) -> list[torch.Tensor | None]:
        W = self.cfg.sliding_window
        out: list[list[torch.Tensor]] = [[] for _ in streams]
        for j in range(max(counts, default=0)):
            idx = [i for i, k in enumerate(counts) if k > j]
            group = [streams[i] for i in idx]
            x = torch.stack([new[i][j] for i in idx])[:, None]  # (B, 1, H)
            pos = torch.tensor([[s.frames] for s in group], device=x.device)  # (B, 1)
            slot = torch.arange(W, device=x.device)
            have = torch.tensor([min(s.frames, self.kv_frames) for s in group], device=x.device)
            mask = (slot[None] >= W - 1 - have[:, None])[:, None, None]  # (B, 1, 1, W): filled slots + itself
            keys = torch.stack([s.keys for s in group], dim=1)  # (L, B, nkv, W-1, hd)
            values = torch.stack([s.values for s in group], dim=1)
            h, ks, vs = self.pre_transformer(x, pos, keys.unbind(0), values.unbind(0), mask)
            for b, (i, s) in enumerate(zip(idx, group)):
                s.keys = torch.stack([k[b, :, 1:] for k in ks])
                s.values = torch.stack([v[b, :, 1:] for v in vs])
                s.frames += 1
                out[i].append(h[b, 0])
        return [torch.stack(o, dim=1) if o else None for o in out]

    def _conv_chunks(self, streams: list[Code2WavStream], final: list[bool]) -> list[torch.Tensor]:
        U = self.samples_per_frame
        # (j-th chunk of this call, window length) -> (stream, chunk start, window (H, len), keep from, keep to):
        # a stream's own chunks never share a batch, so alone it always runs batches of one
        jobs: dict[tuple[int, int], list] = {}
        for i, (s, last) in enumerate(zip(streams, final)):
            j = 0
            while s.decoded < s.frames and (s.frames >= s.chunk_end or last):
                b, e = s.decoded, min(s.chunk_end, s.frames)
                a = self.window_start(b)
                if a < s.hidden_from:
                    raise RuntimeError(f"conv window needs frame {a}, cache starts at {s.hidden_from}")
                window = s.hidden[:, a - s.hidden_from:e - s.hidden_from]
                jobs.setdefault((j, e - a), []).append((i, b, window, self.out_len(b) - U * a, self.out_len(e) - U * a))
                s.decoded, s.chunks, j = e, s.chunks + 1, j + 1
            keep = self.window_start(s.decoded)  # what the next chunk's window reads from
            s.hidden, s.hidden_from = s.hidden[:, keep - s.hidden_from:], keep
            if last:
                s.finished = True
        pieces: list[list] = [[] for _ in streams]  # (chunk start, samples) per stream
        for group in jobs.values():
            wave = self.vocode(torch.stack([w for _, _, w, _, _ in group]))  # (N, 1, out_len(len))
            for row, (i, b, _, lo, hi) in enumerate(group):
                pieces[i].append((b, wave[row, 0, lo:hi]))
        out = []
        for s, p in zip(streams, pieces):
            wave = torch.cat([w for _, w in sorted(p, key=lambda x: x[0])]) if p else self.code_embedding.weight.new_zeros(0)
            s.emitted += wave.numel()
            out.append(wave)
        return out
