"""Typed hand-offs between stages: chat parts in, events out."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import numpy as np
import torch

Source = Union[str, Path, bytes, np.ndarray]


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class Image:
    source: Source  # path, encoded bytes, or uint8 (H, W, 3)


@dataclass(frozen=True)
class Audio:
    source: Source  # path, encoded bytes, or float32 mono samples at 16 kHz


@dataclass(frozen=True)
class Video:
    source: Source  # path, encoded bytes, or uint8 frames (T, H, W, 3) already sampled at `fps`
    use_audio: bool | None = None  # audio-in-video; None: on when the video has sound
    fps: float = 2.0  # frame rate of in-memory frames (a live camera's sampled frames)
    audio: np.ndarray | None = None  # float32 16 kHz mono sound aligned with in-memory frames


Part = Union[Text, Image, Audio, Video]


@dataclass
class Message:
    role: str  # system | user | assistant
    content: list[Part] = field(default_factory=list)

    @classmethod
    def of(cls, role: str, *parts: Part | str) -> "Message":
        return cls(role, [Text(p) if isinstance(p, str) else p for p in parts])


@dataclass(frozen=True)
class PromptStates:
    """The Thinker's view of the prompt, for the Talker's prefill."""

    input_ids: torch.Tensor  # (L,)
    embeds: torch.Tensor  # (L, D) input embeddings, encoder outputs in their placeholders
    hidden: torch.Tensor  # (L, D) final-norm hidden states
    positions: torch.Tensor  # (3, L) TMRoPE positions


@dataclass(frozen=True)
class ThinkerStep:
    """One reply token as the Thinker consumed it: its embedding and the hidden state it produced.

    Emitted after the token is fed back (one decode step after it was sampled), so the Talker
    runs one step behind the Thinker. The token that ends the reply is never fed, so it has none.
    """

    token_id: int
    embed: torch.Tensor  # (D,)
    hidden: torch.Tensor  # (D,) final-norm hidden state at this token


@dataclass(frozen=True)
class TextDelta:
    text: str
    token_id: int
    reasoning: bool = False  # inside the model's reasoning block (<think>...</think>, markers included): not the answer


@dataclass(frozen=True)
class AudioDelta:
    pcm: bytes  # 16-bit little-endian mono
    sample_rate: int
    index: int  # chunk number within the response


@dataclass(frozen=True)
class Done:
    status: str  # completed | cancelled | incomplete (length)
    usage: dict
    timings: dict
    reason: str | None = None  # for cancelled: client_cancelled | turn_detected | ...
    codec_ids: list[int] | None = None  # the Talker's codes, for a response with audio


@dataclass(frozen=True)
class Error:
    code: str  # busy | context_length_exceeded | invalid_media | invalid_request | internal
    message: str


Event = Union[TextDelta, AudioDelta, Done, Error]
