"""PCM16 WAV output that never leaves a half-written file behind."""

from __future__ import annotations

import os
import struct
import tempfile
from pathlib import Path

import numpy as np
import torch


def to_pcm16(wave: torch.Tensor | np.ndarray) -> bytes:
    """float waveform in [-1, 1] -> little-endian 16-bit PCM bytes."""
    x = wave.detach().float().cpu().numpy() if torch.is_tensor(wave) else np.asarray(wave, dtype=np.float32)
    return (np.clip(x, -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()


def _header(n_bytes: int, sample_rate: int) -> bytes:
    return (b"RIFF" + struct.pack("<I", 36 + n_bytes) + b"WAVEfmt " +
            struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, sample_rate * 2, 2, 16) +
            b"data" + struct.pack("<I", n_bytes))


class WavWriter:
    """Append PCM16 chunks as they come; `close()` fixes the header and renames into place.

    Writes to a temporary file in the target's directory, so a crash or an error leaves the
    target untouched (or absent) rather than half written. Fails at once if the directory
    cannot be written.
    """

    def __init__(self, path: str | Path, sample_rate: int = 24000):
        self.path = Path(path)
        self.sample_rate = sample_rate
        self.n_bytes = 0
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".part", dir=self.path.parent or ".")
        self.tmp = Path(tmp)
        self.f = os.fdopen(fd, "wb")
        self.f.write(_header(0, sample_rate))

    def write(self, pcm: bytes) -> None:
        self.f.write(pcm)
        self.n_bytes += len(pcm)

    def close(self) -> None:
        self.f.seek(0)
        self.f.write(_header(self.n_bytes, self.sample_rate))
        self.f.close()
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o666 & ~umask)  # mkstemp made it private; give it the usual mode
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.f.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "WavWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
