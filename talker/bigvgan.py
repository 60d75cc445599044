"""BigVGAN vocoder: log-mel (B, 80, T) -> 24 kHz waveform (B, T * 240) (`token2wav.code2wav_bigvgan_model.*`).

Numbers follow transformers' `Qwen2_5OmniToken2WavBigVGANModel`: the mel is mapped to a clamped
dB scale, then conv_pre, transposed-conv upsampling (5*3*2*2*2*2 = 240) each followed by the mean
of AMP resblocks whose snake-beta activations run at 2x with Kaiser-sinc anti-aliasing filters.
The filters are computed here, not stored in the checkpoint. Always run in fp32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from omni.config import BigVGANConfig


def kaiser_sinc_filter1d(cutoff: float, half_width: float, kernel_size: int) -> torch.Tensor:
    """Kaiser-windowed sinc low-pass, normalised to unit DC gain: (1, 1, kernel_size)."""
    even = kernel_size % 2 == 0
    half = kernel_size // 2
    attenuation = 2.285 * (half - 1) * math.pi * 4 * half_width + 7.95
    if attenuation > 50.0:
        beta = 0.1102 * (attenuation - 8.7)
    elif attenuation >= 21.0:
        beta = 0.5842 * (attenuation - 21) ** 0.4 + 0.07886 * (attenuation - 21.0)
    else:
        beta = 0.0
    window = torch.kaiser_window(kernel_size, beta=beta, periodic=False, dtype=torch.float32)
    t = torch.arange(-half, half) + 0.5 if even else torch.arange(kernel_size) - half
    f = 2 * cutoff * window * torch.sinc(2 * cutoff * t)
    f /= f.sum()
    return f.view(1, 1, kernel_size)


class SnakeBeta(nn.Module):
    """x + sin^2(x e^alpha) / e^beta, per channel."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x):  # (B, C, T)
        alpha = torch.exp(self.alpha[None, :, None])
        beta = torch.exp(self.beta[None, :, None])
        return x + (1.0 / (beta + 1e-9)) * torch.pow(torch.sin(x * alpha), 2)


class UpSample1d(nn.Module):
    def __init__(self, ratio: int = 2, kernel_size: int = 12):
        super().__init__()
        self.ratio, self.kernel_size = ratio, kernel_size
        self.pad = kernel_size // ratio - 1
        self.pad_left = self.pad * ratio + (kernel_size - ratio) // 2
        self.pad_right = self.pad * ratio + (kernel_size - ratio + 1) // 2
        self.register_buffer("filter", kaiser_sinc_filter1d(0.5 / ratio, 0.6 / ratio, kernel_size), persistent=False)

    def forward(self, x):  # (B, C, T) -> (B, C, ratio * T)
        C = x.shape[1]
        x = F.pad(x, (self.pad, self.pad), mode="replicate")
        x = self.ratio * F.conv_transpose1d(x, self.filter.expand(C, -1, -1), stride=self.ratio, groups=C)
        return x[..., self.pad_left:-self.pad_right]


class DownSample1d(nn.Module):
    def __init__(self, ratio: int = 2, kernel_size: int = 12):
        super().__init__()
        self.ratio = ratio
        self.pad_left = kernel_size // 2 - int(kernel_size % 2 == 0)
        self.pad_right = kernel_size // 2
        self.register_buffer("filter", kaiser_sinc_filter1d(0.5 / ratio, 0.6 / ratio, kernel_size), persistent=False)

    def forward(self, x):  # (B, C, T) -> (B, C, T / ratio)
        C = x.shape[1]
        x = F.pad(x, (self.pad_left, self.pad_right), mode="replicate")
        return F.conv1d(x, self.filter.expand(C, -1, -1), stride=self.ratio, groups=C)


class AntiAliasedActivation1d(nn.Module):
    """Snake-beta at twice the rate: 2x Kaiser-sinc upsampling, the activation, low-pass and decimation.

    Runs in polyphase form. The upsampler's even and odd output samples are two 6-tap filters at
    the input rate, the activation runs on each phase, and the decimator sums 6 taps of each phase,
    so nothing at twice the rate is materialised and every filter is a 6-tap FIR along time.
    Equal to `downsample(act(upsample(x)))` (transformers' transposed convolution and replicate
    padding at both ends included) to fp32 rounding, at about a third of the time on a CPU.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.act = SnakeBeta(channels)
        self.upsample = UpSample1d(2, 12)
        self.downsample = DownSample1d(2, 12)
        up, down = 2 * self.upsample.filter.view(12), self.downsample.filter.view(12)
        for name, taps in (("up_even", up[torch.arange(11, 0, -2)]), ("up_odd", up[torch.arange(10, -1, -2)]),
                           ("down_even", down[0::2]), ("down_odd", down[1::2])):
            self.register_buffer(name, taps.reshape(1, 1, 6).repeat(channels, 1, 1), persistent=False)
        self._taps = {name: getattr(self, name)[0, 0].tolist() for name in ("up_even", "up_odd", "down_even", "down_odd")}

    def _fir(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """Filter `name` over every channel, 'valid' (length T - 5). A depthwise kernel vectorises across
        channels, so for the last stages' few channels six shifted multiply-adds along time are ~3x
        faster (and give the same numbers)."""
        C, n = x.shape[1], x.shape[-1] - 5
        if C > 4:
            return F.conv1d(x, getattr(self, name), groups=C)
        taps = self._taps[name]
        y = torch.mul(x[..., :n], taps[0])
        for k in range(1, 6):
            y.add_(x[..., k:k + n], alpha=taps[k])
        return y

    def forward(self, x):  # (B, C, T) -> (B, C, T)
        B, C, T = x.shape
        alpha = torch.exp(self.act.alpha)[None, :, None]
        inv_beta = 1.0 / (torch.exp(self.act.beta)[None, :, None] + 1e-9)

        def snake(u):  # SnakeBeta.forward, in place on a fresh tensor
            return torch.mul(u, alpha).sin_().square_().mul_(inv_beta).add_(u)

        x = torch.cat([x[..., :1].expand(B, C, 3), x, x[..., -1:].expand(B, C, 3)], -1)  # replicate pad
        even = snake(self._fir(x[..., :T + 5], "up_even"))  # upsampled[0::2]
        odd = snake(self._fir(x[..., 1:], "up_odd"))  # upsampled[1::2]
        # the decimator's replicate padding (5 left, 6 right of the 2x signal), phase by phase
        first, last = even[..., :1], odd[..., -1:]
        on_even = torch.cat([first.expand(B, C, 3), odd, last.expand(B, C, 2)], -1)
        on_odd = torch.cat([first.expand(B, C, 2), even, last.expand(B, C, 3)], -1)
        return self._fir(on_even, "down_even").add_(self._fir(on_odd, "down_odd"))


class AMPBlock(nn.Module):
    def __init__(self, channels: int, kernel_size: int, dilation: list[int]):
        super().__init__()

        def conv(d):
            return nn.Conv1d(channels, channels, kernel_size, 1, dilation=d, padding=(kernel_size * d - d) // 2)

        self.convs1 = nn.ModuleList(conv(d) for d in dilation)
        self.convs2 = nn.ModuleList(conv(1) for _ in dilation)
        self.activations = nn.ModuleList(AntiAliasedActivation1d(channels) for _ in range(2 * len(dilation)))

    def forward(self, x):
        acts = self.activations
        for i, (c1, c2) in enumerate(zip(self.convs1, self.convs2)):
            x = x + c2(acts[2 * i + 1](c1(acts[2 * i](x))))
        return x


def log_mel_to_input(mel: torch.Tensor) -> torch.Tensor:
    """The DiT's natural-log mel -> BigVGAN's input scale: dB - 20, floored at -115 dB, mapped to [-1, 1]."""
    min_level = torch.exp(torch.tensor(-115 / 20.0 * math.log(10), dtype=mel.dtype))
    db = 20 * torch.log10(torch.clamp(torch.exp(mel), min=min_level)) - 20
    return torch.clamp(2 * ((db + 115) / 115) - 1, -1, 1)


class BigVGAN(nn.Module):
    def __init__(self, cfg: BigVGANConfig):
        super().__init__()
        self.cfg = cfg
        c0 = cfg.upsample_initial_channel
        self.conv_pre = nn.Conv1d(cfg.mel_dim, c0, 7, 1, padding=3)
        # ups.N.0: the checkpoint keeps an extra ModuleList level
        self.ups = nn.ModuleList(
            nn.ModuleList([nn.ConvTranspose1d(c0 // 2**i, c0 // 2 ** (i + 1), k, u, padding=(k - u) // 2)])
            for i, (u, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes)))
        self.resblocks = nn.ModuleList(
            AMPBlock(c0 // 2 ** (i + 1), k, d)
            for i in range(len(cfg.upsample_rates))
            for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes))
        c_last = c0 // 2 ** len(cfg.upsample_rates)
        self.activation_post = AntiAliasedActivation1d(c_last)
        self.conv_post = nn.Conv1d(c_last, 1, 7, 1, padding=3, bias=False)

    @property
    def hop(self) -> int:
        return math.prod(self.cfg.upsample_rates)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """mel (B, mel_dim, T) natural-log mel from the DiT -> wave (B, T * hop) in [-1, 1]."""
        n = len(self.cfg.resblock_kernel_sizes)
        x = self.conv_pre(log_mel_to_input(mel))
        for i, up in enumerate(self.ups):
            x = up[0](x)
            x = sum(self.resblocks[i * n + j](x) for j in range(n)) / n
        x = self.conv_post(self.activation_post(x))
        return torch.clamp(x, -1.0, 1.0).squeeze(1)
