"""Helpers for the web demo tests: Chromium's command line and media for its fake microphone and camera."""

from __future__ import annotations

from pathlib import Path

import numpy as np

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"]


def speech_wav(path: Path, text: str, silence_s: float = 3.0) -> Path:
    """Speech (espeak-ng, committed) followed by silence (so the server's VAD sees the turn end), 48 kHz mono
    16-bit WAV.

    Chromium's fake microphone loops the file; the silence after the words ends each turn.
    """
    import av

    from tests.realtime import speech_clip

    with av.open(str(speech_clip(text))) as c:
        r = av.AudioResampler(format="s16", layout="mono", rate=48000)
        chunks = [f.to_ndarray()[0] for fr in c.decode(audio=0) for f in r.resample(fr)]
        chunks += [f.to_ndarray()[0] for f in r.resample(None)]
    x = np.concatenate(chunks + [np.zeros(int(48000 * silence_s), np.int16)])
    import wave

    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(48000)
        w.writeframes(x.astype("<i2").tobytes())
    return path


def y4m(path: Path, frames: int = 30, width: int = 320, height: int = 240, fps: int = 10) -> Path:
    """A moving colour pattern as a YUV4MPEG2 (4:2:0) file for Chromium's fake camera."""
    with open(path, "wb") as f:
        f.write(f"YUV4MPEG2 W{width} H{height} F{fps}:1 Ip A1:1 C420jpeg\n".encode())
        yy, xx = np.mgrid[0:height, 0:width]
        for i in range(frames):
            y = ((xx + yy + 8 * i) % 256).astype(np.uint8)
            u = np.full((height // 2, width // 2), (64 + 6 * i) % 256, np.uint8)
            v = np.full((height // 2, width // 2), (192 - 5 * i) % 256, np.uint8)
            f.write(b"FRAME\n" + y.tobytes() + u.tobytes() + v.tobytes())
    return path
