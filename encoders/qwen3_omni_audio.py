"""Qwen3-Omni audio encoder ("AuT"), keys = checkpoint's `thinker.audio_tower.*`.

Each clip's log-mel frames are cut into chunks of n_window*2 frames (1 s; the last one may be shorter).
Every chunk runs three stride-2 Conv2d over (mel, time) on its own, is flattened per time step
(channels x mel/8) and projected by `conv_out`, gets sinusoidal positions starting at 0 and keeps its
first conv_len(frames) steps: a full chunk of 100 frames gives 13 tokens. The tokens of each clip then
attend within windows of n_window_infer frames' worth of chunks (800 frames = 8 chunks = 104 tokens),
and ln_post -> proj1 -> act -> proj2 maps them to the thinker's width.

Like the reference, all chunks of one call are zero-padded to the longest chunk *before* the
convolutions, and nothing masks the padding between them: a chunk shorter than the longest one (a
clip's tail, or a short clip) sees the convolved padding at its last step, and the attention window
is measured in steps of the longest chunk. So a clip's tokens can depend on the other clips of the
call (only when it has a tail chunk, or when every clip of the call is under 1 s); results equal the
reference per call, and `conv_chunksize` (how many chunks convolve at once, for memory) changes nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from encoders import audio
from omni.layers import activation

CHUNK_FRAMES = 100  # n_window * 2: the only chunk the reference's token count (13 per chunk) is right for


@dataclass(frozen=True)
class Qwen3OmniAudioConfig:
    """`thinker_config.audio_config` of config.json; missing keys take transformers' defaults (the real
    checkpoints set output_dim to the thinker's hidden size, 2048). Dropouts and initializer_range are
    training-only and ignored."""

    num_mel_bins: int = 128
    encoder_layers: int = 32
    encoder_attention_heads: int = 20
    encoder_ffn_dim: int = 5120
    d_model: int = 1280
    activation_function: str = "gelu"  # of the layers' MLPs and between proj1/proj2; the convs use exact GELU
    scale_embedding: bool = False  # read but never applied, as in the reference
    max_source_positions: int = 1500  # rows of the sinusoid table
    n_window: int = 50  # half a chunk, in mel frames
    output_dim: int = 3584  # the thinker's hidden size
    n_window_infer: int = 800  # attention window in mel frames (a multiple of n_window*2; floored to one)
    conv_chunksize: int = 500  # chunks per convolution batch: memory only, results are the same
    downsample_hidden_size: int = 480  # channels of the three Conv2d

    @classmethod
    def from_dict(cls, d: dict) -> "Qwen3OmniAudioConfig":
        names = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in d.items() if k in names})
        cfg.check()
        return cfg

    def check(self) -> None:
        if self.d_model % self.encoder_attention_heads:
            raise ValueError(f"audio d_model {self.d_model} is not divisible by encoder_attention_heads "
                             f"{self.encoder_attention_heads}; check the config")
        if self.n_window * 2 != CHUNK_FRAMES:
            raise ValueError(f"audio n_window must be 50 (1 s chunks of 100 mel frames); got {self.n_window}: "
                             "the reference counts 13 tokens per chunk whatever the chunk length")
        if self.n_window_infer < self.n_window * 2:
            raise ValueError(f"audio n_window_infer {self.n_window_infer} is shorter than one chunk "
                             f"({self.n_window * 2} frames); the reference divides by zero there")
        if self.conv_chunksize < 1:
            raise ValueError(f"audio conv_chunksize must be at least 1; got {self.conv_chunksize}")


def conv_len(n_frames: int) -> int:
    """Time steps left after the three stride-2 convolutions (kernel 3, padding 1)."""
    for _ in range(3):
        n_frames = (n_frames - 1) // 2 + 1
    return n_frames


def audio_token_count(n_frames: int) -> int:
    """Output tokens for a clip of n_frames mel frames: 13 per full 1 s chunk plus its tail's."""
    return (n_frames // CHUNK_FRAMES) * conv_len(CHUNK_FRAMES) + conv_len(n_frames % CHUNK_FRAMES)


def audio_chunks(n_frames: int, chunk: int) -> list[int]:
    """Frame counts of the chunks a clip is cut into: full chunks then the remainder."""
    return [chunk] * (n_frames // chunk) + ([n_frames % chunk] if n_frames % chunk else [])


def chunk_features(features: torch.Tensor, lengths: list[int], chunk: int) -> list[torch.Tensor]:
    """features (n_mels, total_frames) -> every clip's chunks, clip after clip, each (n_mels, frames)."""
    sizes = [c for n in lengths for c in audio_chunks(n, chunk)]
    return list(features.split(sizes, dim=1))


def chunk_positions(n_chunks: int, steps: int) -> torch.Tensor:
    """Position of every conv step: (n_chunks, steps) long, restarting at 0 in each chunk."""
    return torch.arange(steps).expand(n_chunks, steps)


def attention_windows(token_counts: list[int], window: int) -> list[int]:
    """cu_seqlens of the attention windows: each clip's tokens cut into windows of `window` tokens, the
    last one shorter; no window spans two clips."""
    cu = [0]
    for n in token_counts:
        for w in [window] * (n // window) + ([n % window] if n % window else []):
            cu.append(cu[-1] + w)
    return cu


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """Whisper's positional table (length, channels): [sin | cos]."""
    inc = math.log(max_timescale) / (channels // 2 - 1)
    inv = torch.exp(-inc * torch.arange(channels // 2).float())
    t = torch.arange(length)[:, None] * inv[None, :]
    return torch.cat([t.sin(), t.cos()], dim=1)


class Sinusoids(nn.Module):
    """The computed position table as a non-persistent buffer, at the reference's own path
    (`positional_embedding.positional_embedding`) so a checkpoint that stores it loads (and is ignored)."""

    def __init__(self, length: int, channels: int):
        super().__init__()
        if channels % 2:
            raise ValueError(f"audio d_model must be even for the sinusoid table; got {channels}")
        self.register_buffer("positional_embedding", sinusoids(length, channels), persistent=False)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:  # (...) long -> (..., channels)
        if positions.numel() and int(positions.max()) >= self.positional_embedding.shape[0]:
            raise ValueError(f"audio position {int(positions.max())} is past max_source_positions "
                             f"{self.positional_embedding.shape[0]}")
        return self.positional_embedding[positions.to(self.positional_embedding.device)]


class Layer(audio.Layer):
    """Qwen2.5-Omni's audio encoder layer (encoders/audio.py) with a biased k projection, and fp16 activations
    clamped finite as the reference does."""

    def __init__(self, cfg: Qwen3OmniAudioConfig):
        super().__init__(cfg, k_bias=True)

    def forward(self, x: torch.Tensor, cu: list[int]) -> torch.Tensor:
        x = super().forward(x, cu)
        if x.dtype == torch.float16:
            big = torch.finfo(x.dtype).max - 1000
            x = x.clamp(-big, big)
        return x


class Qwen3OmniAudioEncoder(nn.Module):
    def __init__(self, cfg: Qwen3OmniAudioConfig):
        super().__init__()
        cfg.check()
        self.cfg = cfg
        self.chunk = cfg.n_window * 2
        self.chunks_per_window = cfg.n_window_infer // self.chunk
        self.conv_chunksize = cfg.conv_chunksize
        d, c = cfg.d_model, cfg.downsample_hidden_size
        self.positional_embedding = Sinusoids(cfg.max_source_positions, d)
        self.layers = nn.ModuleList([Layer(cfg) for _ in range(cfg.encoder_layers)])
        self.ln_post = nn.LayerNorm(d)
        self.conv2d1 = nn.Conv2d(1, c, 3, 2, padding=1)
        self.conv2d2 = nn.Conv2d(c, c, 3, 2, padding=1)
        self.conv2d3 = nn.Conv2d(c, c, 3, 2, padding=1)
        self.conv_out = nn.Linear(c * conv_len(cfg.num_mel_bins), d, bias=False)
        self.proj1 = nn.Linear(d, d)
        self.act = activation(cfg.activation_function)
        self.proj2 = nn.Linear(d, cfg.output_dim)

    def downsample(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, n_mels, L) -> (B, C, n_mels/8, L/8)
        x = F.gelu(self.conv2d1(x))
        x = F.gelu(self.conv2d2(x))
        return F.gelu(self.conv2d3(x))

    def forward(self, features: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        """features (n_mels, total_frames) log-mel, clips concatenated in time; lengths: frames per clip
        (a tensor is accepted too) -> (sum of audio_token_count(n), output_dim), clips in input order."""
        lens = [int(n) for n in (lengths.tolist() if isinstance(lengths, torch.Tensor) else lengths)]
        if any(n <= 0 for n in lens):
            raise ValueError(f"audio clip lengths must be positive mel frame counts; got {lens}")
        if features.dim() != 2 or features.shape[0] != self.cfg.num_mel_bins:
            raise ValueError(f"audio features must be (n_mels={self.cfg.num_mel_bins}, frames); "
                             f"got {tuple(features.shape)}")
        if sum(lens) != features.shape[1]:
            raise ValueError(f"audio lengths sum to {sum(lens)} frames but features has {features.shape[1]}")
        if not lens:
            return features.new_zeros(0, self.cfg.output_dim, dtype=self.proj2.weight.dtype)
        chunks = chunk_features(features, lens, self.chunk)
        steps = [conv_len(c.shape[1]) for c in chunks]
        x = nn.utils.rnn.pad_sequence([c.T for c in chunks], batch_first=True)  # (N, Lmax, n_mels)
        x = x.transpose(1, 2)[:, None].to(self.conv2d1.weight.dtype)  # (N, 1, n_mels, Lmax)
        x = torch.cat([self.downsample(b) for b in x.split(self.conv_chunksize)])  # (N, C, F, t)
        N, C, Fq, t = x.shape
        x = self.conv_out(x.permute(0, 3, 1, 2).reshape(N, t, C * Fq))  # (N, t, D)
        x = x + self.positional_embedding(chunk_positions(N, t)).to(x.dtype)
        keep = torch.arange(t, device=x.device) < torch.tensor(steps, device=x.device)[:, None]  # (N, t)
        x = x[keep]  # (T, D), chunk after chunk

        # the window is counted in steps of the longest chunk, t (13 when any chunk is full)
        cu = attention_windows([audio_token_count(n) for n in lens], t * self.chunks_per_window)
        for layer in self.layers:
            x = layer(x, cu)
        return self.proj2(self.act(self.proj1(self.ln_post(x))))
