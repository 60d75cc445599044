"""Typed hand-offs between stages: chat parts in, events out."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import numpy as np

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
    source: Source  # path or encoded bytes
    use_audio: bool | None = None  # audio-in-video; None: on when the video has sound


Part = Union[Text, Image, Audio, Video]


@dataclass
class Message:
    role: str  # system | user | assistant
    content: list[Part] = field(default_factory=list)

    @classmethod
    def of(cls, role: str, *parts: Part | str) -> "Message":
        return cls(role, [Text(p) if isinstance(p, str) else p for p in parts])
