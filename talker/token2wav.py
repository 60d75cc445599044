"""Streaming Token2Wav: codec codes pushed as they come -> 24 kHz waveform chunks.

transformers has no streaming token2wav; this follows the usual scheme (FACTS.md). Codes are cut
into DiT chunks of `chunk_codes`, then twice that, up to `max_chunk_codes` (less context is
recomputed per second of audio once the first chunk is out); each chunk's mel comes from a full RK4 sampling over a window
that adds `back_codes` before and `ahead_codes` after it, on the utterance's own positions, block
grid and noise (so a window is a slice of the one-shot problem). Each DiT output depends on
neighbouring blocks and the ODE compounds that over 36 evaluations, so a window differs slightly
from the one-shot mel; when the whole utterance fits in one window it is the one-shot result.
A chunk's mel is final once computed. BigVGAN then runs on final mel with `voc_context` frames of
context each side; with >= 20 frames it equals one-shot vocoding to fp32 rounding (receptive
field measured at 27 frames each side), so the last `voc_context` frames wait for the next chunk.

`Token2Wav` holds the modules and options only; per-utterance state is a `Token2WavState`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from talker.bigvgan import BigVGAN
from talker.dit import DiT, draw_noise, sample_mel


@dataclass(frozen=True)
class StreamOptions:
    chunk_codes: int = 24  # codes in the first DiT chunk (48 mel frames, 0.48 s of audio)
    max_chunk_codes: int = 96  # later chunks double up to this: less recomputed context per second of audio
    ahead_codes: int = 12  # future codes the DiT window sees; first chunk once chunk+ahead = 36 codes exist
    back_codes: int = 24  # past codes the DiT window sees (their mel is recomputed and dropped)
    voc_context: int = 20  # mel frames of vocoder context each side (>= 20: equals one-shot in fp32)
    steps: int = 10  # ODE time points, as transformers
    guidance_scale: float = 0.5
    sway: float | None = -1.0


@dataclass
class Token2WavState:
    """One utterance: the codes so far, final mel, noise drawn so far, what was already emitted."""

    cond: torch.Tensor  # (1, enc_emb_dim) voice vector
    ref_mel: torch.Tensor  # (1, T_ref, mel_dim) voice reference mel
    generator: torch.Generator | None = None
    spk: torch.Tensor | None = None  # (1, enc_dim) ECAPA(ref_mel), computed once
    codes: list[int] = field(default_factory=list)
    noise: torch.Tensor | None = None  # (1, frames drawn, mel_dim), drawn in fixed pieces
    mel: torch.Tensor | None = None  # (1, mel_dim, final frames)
    codes_done: int = 0  # codes whose mel is final
    chunks_done: int = 0
    frames_vocoded: int = 0  # mel frames turned into waveform
    finished: bool = False

    def reset(self) -> None:
        """Forget the utterance, keep the voice and generator (reseed it for a reproducible rerun)."""
        self.codes, self.noise, self.mel = [], None, None
        self.codes_done = self.frames_vocoded = self.chunks_done = 0
        self.finished = False


def chunk_size(o: StreamOptions, index: int) -> int:
    """Codes in DiT chunk `index`: chunk_codes, then doubling up to max_chunk_codes."""
    return min(max(o.max_chunk_codes, o.chunk_codes), o.chunk_codes * 2 ** index)


def chunk_bounds(o: StreamOptions, n_codes: int) -> list[tuple[int, int]]:
    """(start, end) codes of each DiT chunk of a finished utterance of n_codes, however they arrived."""
    bounds, s = [], 0
    while s < n_codes:
        size = chunk_size(o, len(bounds))
        e = s + size if n_codes >= s + size + o.ahead_codes else n_codes
        bounds.append((s, e))
        s = e
    return bounds


class Token2Wav:
    def __init__(self, dit: DiT, vocoder: BigVGAN, options: StreamOptions = StreamOptions()):
        self.dit, self.vocoder, self.opt = dit, vocoder, options
        if options.chunk_codes < 1 or options.ahead_codes < 0 or options.back_codes < 0 or options.voc_context < 0:
            raise ValueError(f"chunk_codes must be >= 1 and contexts >= 0; got {options}")

    def start(self, cond: torch.Tensor, ref_mel: torch.Tensor, generator: torch.Generator | None = None) -> Token2WavState:
        """cond (1, enc_emb_dim), ref_mel (1, T_ref, mel_dim) of the voice (spk_dict.pt)."""
        dev = self.dit.proj_out.weight.device
        cond = cond.float().reshape(1, -1).to(dev)
        ref_mel = ref_mel.float().reshape(1, -1, ref_mel.shape[-1]).to(dev)
        with torch.no_grad():
            spk = self.dit.speaker(ref_mel)
        return Token2WavState(cond=cond, ref_mel=ref_mel, generator=generator, spk=spk)

    def push(self, state: Token2WavState, codes) -> list[torch.Tensor]:
        """Add codec codes (ids < num_embeds; no end token); returns the waveform chunks now final, each (samples,)."""
        if state.finished:
            raise RuntimeError("push after finish; call state.reset() to start a new utterance")
        state.codes.extend(int(c) for c in (codes.reshape(-1).tolist() if torch.is_tensor(codes) else codes))
        return self._advance(state)

    def finish(self, state: Token2WavState) -> list[torch.Tensor]:
        """The utterance ended: returns the remaining waveform chunks."""
        state.finished = True
        return self._advance(state)

    def _advance(self, state: Token2WavState) -> list[torch.Tensor]:
        o, out = self.opt, []
        n = len(state.codes)
        while state.codes_done < n:
            s = state.codes_done
            size = chunk_size(o, state.chunks_done)
            if n >= s + size + o.ahead_codes:
                e = s + size
            elif state.finished:
                e = n  # the rest fits in this window: one window, no extra seam
            else:
                break
            self._dit_chunk(state, s, e)
            state.chunks_done += 1
            out += self._vocode(state)
        out += self._vocode(state)
        return [w for w in out if w.numel()]

    @torch.no_grad()
    def _dit_chunk(self, state: Token2WavState, s: int, e: int) -> None:
        o, r = self.opt, self.dit.cfg.repeats
        w0, w1 = max(0, s - o.back_codes), min(len(state.codes), e + o.ahead_codes)
        piece = r * o.chunk_codes
        while state.noise is None or state.noise.shape[1] < r * w1:
            new = draw_noise(state.generator, 1, piece, self.dit.cfg.mel_dim)
            state.noise = new if state.noise is None else torch.cat([state.noise, new], dim=1)
        dev = self.dit.proj_out.weight.device  # noise is drawn on the CPU generator, the DiT may be on CUDA
        codes = torch.tensor(state.codes[w0:w1], device=dev).unsqueeze(0)
        mel = sample_mel(self.dit, codes, state.ref_mel, state.cond, steps=o.steps, guidance_scale=o.guidance_scale,
                         sway=o.sway, noise=state.noise[:, r * w0:r * w1].to(dev), spk=state.spk, start=r * w0)
        mel = mel[..., r * (s - w0):r * (e - w0)]  # (1, mel_dim, r * (e - s))
        state.mel = mel if state.mel is None else torch.cat([state.mel, mel], dim=-1)
        state.codes_done = e

    @torch.no_grad()
    def _vocode(self, state: Token2WavState) -> list[torch.Tensor]:
        if state.mel is None:
            return []
        M, C, v = state.mel.shape[-1], self.opt.voc_context, state.frames_vocoded
        done = state.finished and state.codes_done == len(state.codes)
        end = M if done else M - C
        if end <= v:
            return []
        a, b = max(0, v - C), min(M, end + C)
        hop = self.vocoder.hop
        wave = self.vocoder(state.mel[..., a:b])[0, (v - a) * hop:(end - a) * hop]
        state.frames_vocoded = end
        return [wave]


def draw_stream_noise(generator: torch.Generator | None, frames: int, mel_dim: int, piece: int) -> torch.Tensor:
    """The noise a stream with these settings draws for `frames` mel frames: (1, frames, mel_dim)."""
    parts, have = [], 0
    while have < frames:
        parts.append(draw_noise(generator, 1, piece, mel_dim))
        have += piece
    return torch.cat(parts, dim=1)[:, :frames]
