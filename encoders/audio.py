"""Qwen2.5-Omni audio encoder (Whisper-style), keys = checkpoint's `thinker.audio_tower.*`.

Each clip's log-mel frames are cut into windows of n_window*2 frames (2 s; the last one may be
shorter). Every window runs the convolutions on its own (zero padding at its edges), gets
sinusoidal positions starting at 0, and attends only within itself. The windows of a clip are
then concatenated again, average-pooled by 2 and projected: 100 mel frames/s -> 25 tokens/s.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from encoders.vision import varlen_attention
from omni.config import AudioConfig
from omni.layers import activation


def audio_token_count(n_frames: int) -> int:
    """Output tokens for a clip of n_frames mel frames (conv stride 2, then pool 2)."""
    after_conv = (n_frames - 1) // 2 + 1
    return (after_conv - 2) // 2 + 1


def audio_windows(n_frames: int, window: int) -> list[int]:
    """Frame counts of the windows a clip is cut into: full windows then the remainder."""
    return [window] * (n_frames // window) + ([n_frames % window] if n_frames % window else [])


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """Whisper's positional table (length, channels): [sin | cos]."""
    inc = math.log(max_timescale) / (channels // 2 - 1)
    inv = torch.exp(-inc * torch.arange(channels // 2).float())
    t = torch.arange(length)[:, None] * inv[None, :]
    return torch.cat([t.sin(), t.cos()], dim=1)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, k_bias: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim, bias=k_bias)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cu: list[int]) -> torch.Tensor:  # (T, D) -> (T, D)
        T = x.shape[0]
        q, k, v = (m(x).view(T, self.num_heads, -1) for m in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(varlen_attention(q, k, v, cu).reshape(T, -1))


class Layer(nn.Module):
    def __init__(self, cfg: AudioConfig, k_bias: bool = False):
        super().__init__()
        d = cfg.d_model
        self.self_attn = Attention(d, cfg.encoder_attention_heads, k_bias)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, cfg.encoder_ffn_dim)
        self.fc2 = nn.Linear(cfg.encoder_ffn_dim, d)
        self.final_layer_norm = nn.LayerNorm(d)
        self.act = activation(cfg.activation_function)

    def forward(self, x: torch.Tensor, cu: list[int]) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x), cu)
        return x + self.fc2(self.act(self.fc1(self.final_layer_norm(x))))


class AudioEncoder(nn.Module):
    def __init__(self, cfg: AudioConfig):
        super().__init__()
        if cfg.scale_embedding:
            raise ValueError("audio scale_embedding=True is not supported (Qwen2.5-Omni uses False)")
        d = cfg.d_model
        self.window = cfg.n_window * 2
        self.conv1 = nn.Conv1d(cfg.num_mel_bins, d, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1)
        # In the checkpoint but unused by the encoder itself: the thinker's audio bos/eos
        # come from its text embeddings.
        self.audio_bos_eos_token = nn.Embedding(2, cfg.output_dim)
        self.layers = nn.ModuleList([Layer(cfg) for _ in range(cfg.encoder_layers)])
        self.ln_post = nn.LayerNorm(d)
        self.proj = nn.Linear(d, cfg.output_dim)

    def forward(self, features: torch.Tensor, feature_lens: torch.Tensor) -> torch.Tensor:
        """features (n_mels, total_frames), clips concatenated in time; feature_lens (n_clips,)
        -> (sum of audio_token_count(len), output_dim), clips in input order."""
        lens = [int(n) for n in feature_lens.tolist()]
        if sum(lens) != features.shape[1]:
            raise ValueError(f"feature_lens sum to {sum(lens)} frames but features has {features.shape[1]}")
        chunks = [w for n in lens for w in audio_windows(n, self.window)]  # frames per window
        x = features.T.to(self.conv1.weight.dtype).split(chunks)
        x = nn.utils.rnn.pad_sequence(x, batch_first=True).transpose(1, 2)  # (W, n_mels, Lmax)
        L = x.shape[2]
        valid = torch.arange(L, device=x.device) < torch.tensor(chunks, device=x.device)[:, None]  # (W, Lmax)
        x = F.gelu(self.conv1(x)) * valid[:, None]  # padding must look like conv2's zero padding
        x = F.gelu(self.conv2(x)).transpose(1, 2)  # (W, Lc, D)
        x = x + sinusoids(x.shape[1], x.shape[2]).to(x.device, x.dtype)
        out_lens = [(c - 1) // 2 + 1 for c in chunks]
        keep = torch.arange(x.shape[1], device=x.device) < torch.tensor(out_lens, device=x.device)[:, None]
        x = x[keep]  # (T, D), window after window

        cu = [0]
        for n in out_lens:
            cu.append(cu[-1] + n)
        for layer in self.layers:
            x = layer(x, cu)

        # pool pairs inside each clip (an odd last frame is dropped)
        first, start = [], 0
        for n in lens:
            first.append(start + 2 * torch.arange(audio_token_count(n), device=x.device))
            start += (n - 1) // 2 + 1
        first = torch.cat(first)
        x = (x[first] + x[first + 1]) / 2
        return self.proj(self.ln_post(x))
