"""Qwen3-Omni's speech part as the engine drives it (omni.models: "the speech part").

The Talker (talker/qwen3_omni_talker.py) makes a frame of 16 codes per step from the reply's token ids
(not the Thinker's states: a token goes in as soon as the host knows it); Code2Wav
(talker/qwen3_omni_code2wav.py) streams each frame's final samples exactly. One frame is 80 ms of speech
(12.5 frames/s); the first audio goes out after the first frame: 1365 samples at the real rates.

What a conversation keeps between turns (`remember_prompt`): its user turns as Talker rows with their
positions (`TalkerPrompt`, accumulated turn by turn: nothing is projected twice) and how many of them the
Talker's KV slot still holds. A reply's Talker prefill then runs over the new user rows only: the
state's `reset` at the end of a turn keeps the user rows in the slot and drops the assistant and codec
rows after them (the Talker's prompt has no assistant turns: they are never fed back).

Code2Wav's chunks (its stream's fixed grid): the first is one frame, later ones double up to
`max_chunk_frames` (16: 1.28 s). A chunk of k frames costs k + 10 frames of conv work, so growing chunks
cut the stream's overhead over one-shot decoding from 11x (a window per frame) to 1.6x, while the first
audio still goes out after the first frame. A window ready for one conversation may wait a few steps for
another's (the engine's batching); the grid, not the timing, decides what is computed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

import talker.qwen3_omni_talker as talker_lib
from omni.types import ThinkerStep
from talker.qwen3_omni_code2wav import Code2Wav, Code2WavStream
from talker.qwen3_omni_talker import TalkerPrompt, TalkerSampling


@dataclass
class TalkerMemory:
    """A conversation's Talker prefix: its user turns so far, and how many of their rows the KV slot holds."""

    prompt: TalkerPrompt | None = None
    kept: int = 0


@dataclass
class VocoderState:
    """One utterance's Code2Wav stream and the frames waiting for its next chunk."""

    stream: Code2WavStream
    pending: list = field(default_factory=list)  # (G,) frames not given to the stream yet
    finished: bool = False  # no more frames will come


@dataclass
class SpeechState:
    """The Talker's state of one reply, and the memory its `reset` updates."""

    talker: talker_lib.TalkerState
    memory: TalkerMemory
    unread = ()  # every frame is read in the step that draws it (its code 0 decides whether speech goes on)

    @property
    def codes(self) -> list:
        return self.talker.frames

    @property
    def finished(self) -> bool:
        return self.talker.finished

    @finished.setter
    def finished(self, value: bool) -> None:
        self.talker.finished = value

    def reset(self) -> None:
        """End the reply: the slot keeps the user rows (the next turn's Talker prefix), nothing after them."""
        self.talker.reset(keep_user_rows=True)
        self.memory.kept = self.talker.user_rows


class Qwen3Speech:
    codec_hz = 12.5  # frames per second of speech
    reads_thinker_states = False  # the Talker reads reply token ids: each goes in once the host knows it
    sample_rate = 24000

    def __init__(self, talker: talker_lib.Talker, code2wav: Code2Wav, thinker_embed: torch.nn.Embedding,
                 max_chunk_frames: int = 16):
        if code2wav.samples_per_frame * self.codec_hz != self.sample_rate:
            raise ValueError(f"code2wav makes {code2wav.samples_per_frame} samples per frame, not "
                             f"{self.sample_rate / self.codec_hz:g} (24 kHz at 12.5 frames/s)")
        self.talker, self.code2wav, self.thinker_embed = talker, code2wav, thinker_embed
        self.max_chunk_frames = max_chunk_frames

    def allocate_cache(self, n_slots: int, max_context: int, max_codes: int):
        """The Talker's KV rows: the user rows (at most the context), 9 fixed rows, a row per frame."""
        return self.talker.model.allocate_cache(n_slots, max_context + 10 + max_codes)

    # --- what a conversation keeps ---

    @staticmethod
    def new_memory() -> TalkerMemory:
        return TalkerMemory()

    def remember_prompt(self, memory: TalkerMemory, prompt, embeds: torch.Tensor, hidden: torch.Tensor) -> TalkerMemory:
        """A prefilled turn: its user rows join the conversation's (hidden: the Thinker's accept layer)."""
        memory.prompt = talker_lib.prefill_rows(
            self.talker, prompt.input_ids, embeds, hidden, prompt.image_grid_thw, prompt.video_grid_thw,
            prompt.audio_feature_lens, prompt.video_second_per_grid,
            use_audio_in_video=any(m.kind == "video" and m.with_audio for m in prompt.media), after=memory.prompt)
        return memory

    @staticmethod
    def remember_token(memory: TalkerMemory, token: int, embed, hidden, position) -> TalkerMemory:
        return memory  # reply tokens are not part of a later turn's Talker prompt

    @staticmethod
    def talker_prompt(memory: TalkerMemory) -> TalkerMemory:
        return memory

    # --- a reply's speech ---

    def start(self, cache, slot: int, memory: TalkerMemory, voice: str, first: ThinkerStep,
              noise_generator=None) -> tuple[SpeechState, VocoderState]:
        """Prefill the Talker (the user rows its slot does not hold yet, then the fixed rows) and feed the
        reply's first token. Code2Wav draws no noise: `noise_generator` is unused."""
        cap = int(cache.max_len) - memory.prompt.rows.shape[0] - 10
        state = talker_lib.start(self.talker, memory.prompt, self.thinker_embed, voice, cache=cache, slot=slot,
                                 max_frames=cap, kept=memory.kept)
        memory.kept = 0  # until the reply ends the slot holds more than the user rows
        talker_lib.push(state, first.token_id)
        return SpeechState(state, memory), VocoderState(self.code2wav.start(self.max_chunk_frames))

    @staticmethod
    def push(state: SpeechState, step: ThinkerStep | None) -> None:
        talker_lib.push(state.talker, None if step is None else step.token_id)

    @staticmethod
    def ready(state: SpeechState) -> bool:
        return talker_lib.ready(state.talker)

    def step(self, states: list[SpeechState], samplings: list[TalkerSampling], generators: list,
             min_codes: list[int]) -> list[list]:
        """The next frame ((G,) codes) of every `ready` state in one batched step: per state [frame], or []
        where speech ended (codec eos)."""
        for st, m in zip(states, min_codes):
            st.talker.min_frames = m
        frames = talker_lib.step_batch(self.talker, [s.talker for s in states], samplings, generators)
        return [[f] if f is not None else [] for f in frames]

    @staticmethod
    def read(states: list[SpeechState]) -> list[list]:
        return [[] for _ in states]  # nothing is left in flight

    @staticmethod
    def codec_ids(state: SpeechState) -> list[list[int]]:
        """The reply's frames as lists of codes (codebook 0 first)."""
        return [f.tolist() for f in state.talker.frames]

    # --- Code2Wav ---

    @staticmethod
    def add_codes(vstate: VocoderState, frames: list) -> None:
        vstate.pending.extend(frames)

    @staticmethod
    def codes_until_ready(vstate: VocoderState) -> int:
        """Frames the next chunk still needs (0: it can run now; a finished utterance's rest always can)."""
        if vstate.finished:
            return 0
        return max(0, vstate.stream.chunk_end - vstate.stream.frames - len(vstate.pending))

    @torch.inference_mode()
    def vocode(self, vstates: list[VocoderState]) -> list[list[torch.Tensor]]:
        """Several utterances' new frames in one batched Code2Wav advance: each one's new samples (those of the
        chunks now complete; a finished utterance's rest)."""
        go = [v for v in vstates if (v.pending or v.finished) and not v.stream.finished]
        G = self.code2wav.cfg.num_quantizers
        codes = [torch.stack(v.pending, 1) if v.pending else torch.zeros(G, 0, dtype=torch.long) for v in go]
        waves = self.code2wav.advance([v.stream for v in go], codes, final=[v.finished for v in go]) if go else []
        out = {id(v): [w.float()] for v, w in zip(go, waves) if w.numel()}
        for v in go:
            v.pending = []
        return [out.get(id(v), []) for v in vstates]

    def move_vocoder(self, device: torch.device) -> None:
        """Code2Wav onto `device` (an engine's speech worker's); frames follow it in `advance`."""
        self.code2wav.to(device)
