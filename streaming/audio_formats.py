"""Speech out in the formats OpenAI's chat completions offer, encoded as it streams (PyAV).

    enc = AudioEncoder("mp3")          # wav | pcm16 | mp3 | opus | flac
    out = enc.push(pcm16_chunk)        # bytes of the file so far not yet returned (may be b"")
    out += enc.finish()                # the rest; joined, the pieces are one valid file

`pcm16` is raw 16-bit little-endian mono at 24 kHz (what OpenAI streams). `wav` streamed has
the "unknown length" sizes (0xFFFFFFFF) in its header; `AudioEncoder.whole(pcm, fmt)` writes a
file with exact sizes. `opus` is Ogg Opus.
"""

from __future__ import annotations

import io
import struct

import av
import numpy as np

SAMPLE_RATE = 24000
FORMATS = ("wav", "pcm16", "mp3", "opus", "flac")
MIME = {"wav": "audio/wav", "pcm16": "audio/pcm", "mp3": "audio/mpeg", "opus": "audio/ogg", "flac": "audio/flac"}
_CODEC = {"mp3": ("mp3", "libmp3lame"), "opus": ("ogg", "libopus"), "flac": ("flac", "flac")}  # container, codec


def wav_header(n_bytes: int | None, sample_rate: int = SAMPLE_RATE) -> bytes:
    """PCM16 mono WAV header; n_bytes None: length unknown (a stream)."""
    data = 0xFFFFFFFF if n_bytes is None else n_bytes
    riff = 0xFFFFFFFF if n_bytes is None else 36 + n_bytes
    return (b"RIFF" + struct.pack("<I", riff) + b"WAVEfmt " +
            struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, sample_rate * 2, 2, 16) + b"data" + struct.pack("<I", data))


class AudioEncoder:
    def __init__(self, fmt: str, sample_rate: int = SAMPLE_RATE):
        if fmt not in FORMATS:
            raise ValueError(f"audio format must be one of {', '.join(FORMATS)}; got {fmt!r}")
        self.fmt, self.rate = fmt, sample_rate
        self._started = False
        self._pts = 0
        self._sent = 0
        self._buf = self._box = self._stream = None
        if fmt in _CODEC:
            container, codec = _CODEC[fmt]
            self._buf = io.BytesIO()
            self._box = av.open(self._buf, "w", format=container)
            self._stream = self._box.add_stream(codec, rate=sample_rate, layout="mono")
            if fmt == "mp3":
                self._stream.bit_rate = 64000

    def push(self, pcm: bytes) -> bytes:
        if self._stream is None:
            head = b""
            if self.fmt == "wav" and not self._started:
                head = wav_header(None, self.rate)
            self._started = True
            return head + pcm
        if pcm:
            x = np.frombuffer(pcm, "<i2")[None]  # (1, n)
            frame = av.AudioFrame.from_ndarray(x, format="s16", layout="mono")
            frame.sample_rate, frame.pts = self.rate, self._pts
            self._pts += x.shape[1]
            for packet in self._stream.encode(frame):
                self._box.mux(packet)
        return self._take()

    def finish(self) -> bytes:
        if self._stream is None:
            return self.push(b"") if not self._started else b""
        for packet in self._stream.encode(None):
            self._box.mux(packet)
        self._box.close()
        return self._take()

    def _take(self) -> bytes:
        data = self._buf.getbuffer()[self._sent:].tobytes()
        self._sent += len(data)
        return data

    def whole(self, pcm: bytes) -> bytes:
        """The complete file for all of `pcm` at once (exact WAV sizes; container trailers in place)."""
        if self.fmt == "wav":
            return wav_header(len(pcm), self.rate) + pcm
        if self.fmt == "pcm16":
            return pcm
        self.push(pcm)
        self.finish()
        return self._buf.getvalue()
