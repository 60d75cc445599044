"""Test media made with PyAV: images, audio files and H.264/AAC videos with known content."""

import io
from fractions import Fraction
from pathlib import Path

import av
import numpy as np


def pattern_image(height: int, width: int, seed: int = 0, alpha: bool = False) -> np.ndarray:
    """uint8 (H, W, 3|4): gradients, a sine texture and noise, so resampling and flips show."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    img = np.stack([x * 255 / max(width - 1, 1), y * 255 / max(height - 1, 1), 128 + 100 * np.sin(x / 5.0 + y / 9.0)], -1)
    img = np.clip(img + rng.normal(0, 25, img.shape), 0, 255).astype(np.uint8)
    if alpha:
        a = np.clip(x * 255 / max(width - 1, 1) + rng.normal(0, 30, x.shape), 0, 255).astype(np.uint8)
        img = np.concatenate([img, a[..., None]], -1)
    return img


def encode_image(img: np.ndarray, codec: str = "png") -> bytes:
    """uint8 (H, W, 3|4) -> PNG ("png"), JPEG ("mjpeg") or WebP ("libwebp") bytes."""
    h, w, c = img.shape
    fmt = "rgba" if c == 4 else "rgb24"
    pix = {"png": fmt, "mjpeg": "yuvj444p", "libwebp": "yuv420p"}[codec]
    buf = io.BytesIO()
    with av.open(buf, "w", format="image2pipe") as out:
        s = out.add_stream(codec, rate=1)
        s.width, s.height, s.pix_fmt = w, h, pix
        if codec == "mjpeg":
            s.codec_context.qmin = s.codec_context.qmax = 2  # near-lossless, so decoders agree closely
        for p in s.encode(av.VideoFrame.from_ndarray(img[..., :3] if pix != "rgba" else img, format=fmt)):
            out.mux(p)
        for p in s.encode(None):
            out.mux(p)
    return buf.getvalue()


def tone(seconds: float, sr: int = 16000, freq: float = 440.0, chirp_to: float | None = None) -> np.ndarray:
    """float32 mono sine (or linear chirp from freq to chirp_to), amplitude 0.5."""
    t = np.arange(int(round(seconds * sr))) / sr
    f1 = freq if chirp_to is None else chirp_to
    phase = 2 * np.pi * (freq * t + (f1 - freq) * t * t / (2 * max(seconds, 1e-9)))
    return (0.5 * np.sin(phase)).astype(np.float32)


def write_audio(path: Path, audio: np.ndarray, sr: int, codec: str = "pcm_s16le", channels: int = 1) -> Path:
    """Write mono float audio as wav (pcm_s16le), flac, mp3, aac (.m4a) or opus (.ogg); channels
    duplicates the signal (channel 2 is inverted half-amplitude so a wrong downmix shows)."""
    layout = "mono" if channels == 1 else "stereo"
    data = audio[None] if channels == 1 else np.stack([audio, -0.5 * audio])
    with av.open(str(path), "w") as out:
        s = out.add_stream(codec, rate=sr, layout=layout)
        fmt = s.codec_context.codec.audio_formats[0].name
        frame_size = s.codec_context.frame_size or 1024
        for i in range(0, data.shape[1], frame_size):
            chunk = np.ascontiguousarray(data[:, i:i + frame_size], dtype=np.float32)
            f = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=layout)
            f.sample_rate = sr
            f.pts = i
            f.time_base = Fraction(1, sr)
            for fr in _convert(f, fmt, layout, sr):
                for p in s.encode(fr):
                    out.mux(p)
        for p in s.encode(None):
            out.mux(p)
    return path


def _convert(frame, fmt, layout, sr):
    r = av.AudioResampler(format=fmt, layout=layout, rate=sr)
    return r.resample(frame) + r.resample(None)


def moving_frames(n: int, height: int, width: int) -> np.ndarray:
    """uint8 (n, H, W, 3): a bright square moving right over a gradient; frame i is findable."""
    base = pattern_image(height, width, seed=1) // 2
    frames = np.repeat(base[None], n, 0)
    size = max(4, min(height, width) // 4)
    for i in range(n):
        x0 = int((width - size) * i / max(n - 1, 1))
        frames[i, (height - size) // 2:(height + size) // 2, x0:x0 + size] = (255, 255, 0)
    return frames


def write_video(
    path: Path, seconds: float = 3.0, fps: int = 25, height: int = 96, width: int = 128,
    audio: bool = True, sr: int = 44100, codec: str = "libx264",
) -> Path:
    """H.264 (yuv420p) + AAC mono mp4 with a moving square and a chirp 300→3000 Hz."""
    n = int(round(seconds * fps))
    frames = moving_frames(n, height, width)
    with av.open(str(path), "w") as out:
        vs = out.add_stream(codec, rate=fps)
        vs.width, vs.height, vs.pix_fmt = width, height, "yuv420p"
        aus = out.add_stream("aac", rate=sr, layout="mono") if audio else None
        for i in range(n):
            for p in vs.encode(av.VideoFrame.from_ndarray(frames[i], format="rgb24")):
                out.mux(p)
        for p in vs.encode(None):
            out.mux(p)
        if aus is not None:
            wav = tone(seconds, sr, 300.0, 3000.0)[None]
            for i in range(0, wav.shape[1], 1024):
                f = av.AudioFrame.from_ndarray(np.ascontiguousarray(wav[:, i:i + 1024]), format="fltp", layout="mono")
                f.sample_rate, f.pts, f.time_base = sr, i, Fraction(1, sr)
                for p in aus.encode(f):
                    out.mux(p)
            for p in aus.encode(None):
                out.mux(p)
    return path
