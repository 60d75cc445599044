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
    max_chunk_codes: int = 192  # later chunks double up to this: less recomputed context per second of audio
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
    spk_null: torch.Tensor | None = None  # (1, enc_dim) ECAPA(zeros): the CFG half's voice
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
            spk, spk_null = self.dit.speaker(ref_mel), self.dit.speaker(torch.zeros_like(ref_mel))
        return Token2WavState(cond=cond, ref_mel=ref_mel, generator=generator, spk=spk, spk_null=spk_null)

    def push(self, state: Token2WavState, codes) -> list[torch.Tensor]:
        """Add codec codes (ids < num_embeds; no end token); returns the waveform chunks now final, each (samples,)."""
        self.add(state, codes)
        return self.advance([state])[0]

    def finish(self, state: Token2WavState) -> list[torch.Tensor]:
        """The utterance ended: returns the remaining waveform chunks."""
        state.finished = True
        return self.advance([state])[0]

    def add(self, state: Token2WavState, codes) -> None:
        """Add codes without running anything yet (see `advance`)."""
        if state.finished:
            raise RuntimeError("push after finish; call state.reset() to start a new utterance")
        state.codes.extend(int(c) for c in (codes.reshape(-1).tolist() if torch.is_tensor(codes) else codes))

    def advance(self, states: list[Token2WavState]) -> list[list[torch.Tensor]]:
        """Run every DiT chunk that is ready, for several utterances at once; their waveform chunks.

        Windows of equal length from different utterances go through the DiT as one batch (each
        row at its own frames, voice and noise); the result equals advancing each on its own.
        """
        out: dict[int, list[torch.Tensor]] = {id(st): [] for st in states}
        while True:
            jobs = [(st, *b) for st in states if (b := self._next_chunk(st)) is not None]
            if not jobs:
                break
            groups: dict[int, list] = {}
            for job in jobs:
                w0, w1 = self._window(*job)
                groups.setdefault(w1 - w0, []).append(job)
            for group in groups.values():
                self._dit_chunks(group)
            for st, _, _ in jobs:
                st.chunks_done += 1
            for st, waves in zip([j[0] for j in jobs], self._vocode([j[0] for j in jobs])):
                out[id(st)] += waves
        final = self._vocode(states)
        return [[w for w in out[id(st)] + rest if w.numel()] for st, rest in zip(states, final)]

    def codes_until_ready(self, state: Token2WavState) -> int:
        """How many more codes the next DiT window needs (0: ready now)."""
        o, n, s = self.opt, len(state.codes), state.codes_done
        if state.finished:
            return 0
        return max(0, s + chunk_size(o, state.chunks_done) + o.ahead_codes - n)

    def _next_chunk(self, state: Token2WavState) -> tuple[int, int] | None:
        o, n, s = self.opt, len(state.codes), state.codes_done
        if s >= n:
            return None
        size = chunk_size(o, state.chunks_done)
        if n >= s + size + o.ahead_codes:
            return s, s + size
        return (s, n) if state.finished else None  # the rest fits in one window: no extra seam

    def _window(self, state: Token2WavState, s: int, e: int) -> tuple[int, int]:
        return max(0, s - self.opt.back_codes), min(len(state.codes), e + self.opt.ahead_codes)

    @torch.no_grad()
    def _dit_chunks(self, jobs: list[tuple[Token2WavState, int, int]]) -> None:
        """DiT windows of equal length, one per utterance, in one batch."""
        o, r = self.opt, self.dit.cfg.repeats
        dev = self.dit.proj_out.weight.device  # noise is drawn on the CPU generator, the DiT may be on CUDA
        piece = r * o.chunk_codes
        codes, noise, starts = [], [], []
        for st, s, e in jobs:
            w0, w1 = self._window(st, s, e)
            while st.noise is None or st.noise.shape[1] < r * w1:
                new = draw_noise(st.generator, 1, piece, self.dit.cfg.mel_dim)
                st.noise = new if st.noise is None else torch.cat([st.noise, new], dim=1)
            codes.append(torch.tensor(st.codes[w0:w1]))
            noise.append(st.noise[0, r * w0:r * w1])
            starts.append(r * w0)
        cat = lambda name: torch.cat([getattr(st, name) for st, _, _ in jobs])  # noqa: E731
        start = starts[0] if len(jobs) == 1 else torch.tensor(starts)
        mel = sample_mel(self.dit, torch.stack(codes).to(dev), jobs[0][0].ref_mel, cat("cond"), steps=o.steps,
                         guidance_scale=o.guidance_scale, sway=o.sway, noise=torch.stack(noise).to(dev),
                         spk=cat("spk"), spk_null=cat("spk_null"), start=start)
        for i, (st, s, e) in enumerate(jobs):
            w0 = self._window(st, s, e)[0]
            m = mel[i:i + 1, :, r * (s - w0):r * (e - w0)]  # (1, mel_dim, r * (e - s))
            st.mel = m if st.mel is None else torch.cat([st.mel, m], dim=-1)
            st.codes_done = e

    @torch.no_grad()
    def _vocode(self, states: list[Token2WavState]) -> list[list[torch.Tensor]]:
        """Vocode each utterance's newly final mel (with context); equal-length windows in one batch."""
        C, hop = self.opt.voc_context, self.vocoder.hop
        plans, out = {}, [[] for _ in states]
        for i, st in enumerate(states):
            if st.mel is None:
                continue
            M, v = st.mel.shape[-1], st.frames_vocoded
            end = M if st.finished and st.codes_done == len(st.codes) else M - C
            if end > v:
                a, b = max(0, v - C), min(M, end + C)
                plans.setdefault(b - a, []).append((i, st, a, b, v, end))
        for group in plans.values():
            waves = self.vocoder(torch.cat([st.mel[..., a:b] for _, st, a, b, _, _ in group]))
            for row, (i, st, a, b, v, end) in enumerate(group):
                out[i].append(waves[row, (v - a) * hop:(end - a) * hop])
                st.frames_vocoded = end
        return out


def draw_stream_noise(generator: torch.Generator | None, frames: int, mel_dim: int, piece: int) -> torch.Tensor:
    """The noise a stream with these settings draws for `frames` mel frames: (1, frames, mel_dim)."""
    parts, have = [], 0
    while have < frames:
        parts.append(draw_noise(generator, 1, piece, mel_dim))
        have += piece
    return torch.cat(parts, dim=1)[:, :frames]
