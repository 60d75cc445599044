"""Decode images, audio and video with PyAV (bundled FFmpeg) into the arrays encoders/features.py takes.

Every failure raises MediaError with one line naming the input and what is wrong.
"""

import io
import os
from dataclasses import dataclass

import av
import numpy as np
import torch

from encoders import features

SAMPLE_RATE = features.SAMPLE_RATE


class MediaError(ValueError):
    """A media input cannot be used; the message names the input and the problem."""


@dataclass(frozen=True)
class Video:
    frames: np.ndarray  # (T, H, W, 3) uint8 sampled frames, already at the per-frame pixel budget
    fps: float  # rate the kept frames were actually sampled at: T / total_frames * video_fps
    second_per_grid: float  # what the reference feeds TMRoPE: temporal_patch_size / requested fps
    audio: np.ndarray | None  # (L,) float32 16 kHz mono of the whole audio track, None without one
    duration: float  # seconds of video: total_frames / video_fps


def _name(src) -> str:
    if isinstance(src, (bytes, bytearray, memoryview)):
        return f"<{len(src)} bytes>"
    return str(src)


def open_container(src, name: str):
    """av.open a path or bytes; a MediaError naming the input for anything FFmpeg cannot open."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        if len(src) == 0:
            raise MediaError(f"{name}: empty input")
        target = io.BytesIO(bytes(src))
    else:
        path = os.fspath(src)
        if not os.path.exists(path):
            raise MediaError(f"{name}: no such file")
        if os.path.isdir(path):
            raise MediaError(f"{name}: is a directory, not a media file")
        if os.path.getsize(path) == 0:
            raise MediaError(f"{name}: empty file")
        target = path
    try:
        return av.open(target)
    except av.error.InvalidDataError:
        raise MediaError(f"{name}: not a media file FFmpeg can read") from None
    except (av.error.FFmpegError, OSError) as e:
        raise MediaError(f"{name}: cannot open ({getattr(e, 'strerror', None) or e})") from None


def _check_decoder(stream, name: str, kind: str):
    if stream.codec_context is None or stream.codec_context.codec is None:
        raise MediaError(f"{name}: unsupported {kind} codec")


def _rgb(frame) -> np.ndarray:
    """A decoded frame -> uint8 (H, W, 3); alpha is composited over white like qwen-omni-utils'
    to_rgb (PIL paste with the alpha as mask, same integer rounding)."""
    has_alpha = frame.format.name.startswith(("rgba", "bgra", "argb", "abgr", "yuva", "gbrap", "ya", "pal8"))
    if not has_alpha:
        return frame.to_ndarray(format="rgb24")
    rgba = frame.to_ndarray(format="rgba").astype(np.int32)
    a = rgba[..., 3:]
    t = rgba[..., :3] * a + 255 * (255 - a) + 128  # PIL's rounded x / 255
    return ((t + (t >> 8)) >> 8).astype(np.uint8)


def load_image(src) -> np.ndarray:
    """JPEG/PNG/WebP/... path or bytes -> uint8 (H, W, 3) RGB (first frame of animated images)."""
    name = _name(src)
    with open_container(src, name) as c:
        if not c.streams.video:
            raise MediaError(f"{name}: no image in it")
        stream = c.streams.video[0]
        _check_decoder(stream, name, "image")
        try:
            frame = next(c.decode(stream), None)
        except av.error.FFmpegError as e:
            raise MediaError(f"{name}: corrupt or truncated image ({e.strerror or e})") from None
        if frame is None:
            raise MediaError(f"{name}: corrupt or truncated image (no frame decoded)")
        img = _rgb(frame)
    h, w = img.shape[:2]
    if max(h, w) / min(h, w) > features.MAX_ASPECT_RATIO:
        raise MediaError(f"{name}: image is {w}x{h}; aspect ratio must be at most {features.MAX_ASPECT_RATIO}:1")
    return img


def _decode_audio(c, stream, name: str, sr: int) -> np.ndarray:
    _check_decoder(stream, name, "audio")
    # Resample each channel, then average them: librosa.load(mono=True), which the reference
    # uses, takes the channel mean; FFmpeg's own downmix weights channels differently.
    resampler = av.AudioResampler(format="fltp", rate=sr)
    chunks = []
    try:
        for frame in c.decode(stream):
            frame.pts = None  # resample by sample count; timestamps from broken files only add gaps
            chunks += [f.to_ndarray() for f in resampler.resample(frame)]
    except av.error.FFmpegError as e:
        raise MediaError(f"{name}: corrupt or truncated audio ({e.strerror or e})") from None
    chunks += [f.to_ndarray() for f in resampler.resample(None)]
    if not chunks:
        raise MediaError(f"{name}: audio stream has no samples")
    return np.concatenate(chunks, axis=1).mean(0).astype(np.float32)


def iter_audio(src, sr: int = SAMPLE_RATE):
    """The first audio stream of a path (or bytes) as float32 (n,) mono chunks at sr, decoded one frame at a
    time: memory stays at a frame whatever the length. Concatenated, the chunks equal load_audio's samples."""
    name = _name(src)
    with open_container(src, name) as c:
        if not c.streams.audio:
            raise MediaError(f"{name}: no audio stream")
        stream = c.streams.audio[0]
        _check_decoder(stream, name, "audio")
        resampler = av.AudioResampler(format="fltp", rate=sr)  # per channel, then averaged: as _decode_audio
        try:
            for frame in c.decode(stream):
                frame.pts = None
                for f in resampler.resample(frame):
                    yield f.to_ndarray().mean(0).astype(np.float32)
        except av.error.FFmpegError as e:
            raise MediaError(f"{name}: corrupt or truncated audio ({e.strerror or e})") from None
        for f in resampler.resample(None):
            yield f.to_ndarray().mean(0).astype(np.float32)


class AudioCursor:
    """Forward-only slices of a file's 16 kHz sound, decoded as they are asked for (iter_audio): what is
    behind the last slice is let go, so a long file never sits in memory whole."""

    def __init__(self, src, sr: int = SAMPLE_RATE):
        self._chunks = iter_audio(src, sr)
        self._buf: list[np.ndarray] = []
        self._start = 0  # sample index of _buf's first sample
        self._have = 0  # samples in _buf

    def take(self, a: int, b: int) -> np.ndarray:
        """Samples [a, b) (fewer at the end of the stream); a must not go back before the previous slice's b."""
        if a < self._start:
            raise ValueError(f"AudioCursor goes forward only: asked for {a} after {self._start}")
        while self._start + self._have < b:
            x = next(self._chunks, None)
            if x is None:
                break
            self._buf.append(x)
            self._have += len(x)
        data = np.concatenate(self._buf) if len(self._buf) > 1 else (self._buf[0] if self._buf else
                                                                      np.zeros(0, np.float32))
        out = data[a - self._start:b - self._start].copy()
        cut = min(max(b - self._start, 0), len(data))  # segments follow each other: the next starts at b
        keep = data[cut:].copy()
        self._start, self._buf, self._have = self._start + cut, [keep] if len(keep) else [], len(keep)
        return out

    def close(self) -> None:
        self._chunks.close()


def count_audio(src, sr: int = SAMPLE_RATE) -> int:
    """How many samples at sr load_audio would return, in constant memory (MediaError as load_audio)."""
    n = sum(len(x) for x in iter_audio(src, sr))
    if n == 0:
        raise MediaError(f"{_name(src)}: audio stream has no samples")
    return n


def load_audio(src, sr: int = SAMPLE_RATE) -> np.ndarray:
    """Any FFmpeg-readable audio (or the audio track of a video) -> float32 (L,) mono at sr."""
    name = _name(src)
    with open_container(src, name) as c:
        if not c.streams.audio:
            raise MediaError(f"{name}: no audio stream")
        audio = _decode_audio(c, c.streams.audio[0], name, sr)
    if audio.size == 0:
        raise MediaError(f"{name}: audio stream has no samples")
    return audio


def load_video(
    src, fps: float = features.VIDEO_FPS, min_frames: int = features.VIDEO_MIN_FRAMES,
    max_frames: int = features.VIDEO_MAX_FRAMES, min_pixels: int = features.VIDEO_MIN_PIXELS,
    max_pixels: int = features.VIDEO_MAX_PIXELS, total_pixels: int = features.VIDEO_TOTAL_PIXELS,
    with_audio: bool = True,
) -> Video:
    """Video path or bytes -> Video with frames sampled and sized by qwen-omni-utils' rules
    (fps frames per second, min/max frame counts, per-frame pixel budget), plus 16 kHz audio."""
    name = _name(src)
    with open_container(src, name) as c:
        if not c.streams.video:
            raise MediaError(f"{name}: no video stream")
        stream = c.streams.video[0]
        _check_decoder(stream, name, "video")
        # Count frames by demuxing (cheap); the rare codec where packets != frames is fixed below.
        try:
            total = sum(1 for p in c.demux(stream) if p.size)
        except av.error.FFmpegError as e:
            raise MediaError(f"{name}: corrupt or truncated video ({e.strerror or e})") from None
        rate = stream.average_rate or stream.guessed_rate
        video_fps = float(rate) if rate else 0.0
        if total and not video_fps and stream.duration and stream.time_base:
            video_fps = total / float(stream.duration * stream.time_base)
        frames, decoded = _sample(c, stream, name, total, video_fps, fps, min_frames, max_frames,
                                  min_pixels, max_pixels, total_pixels)
        if decoded != total:
            total = decoded
            frames, decoded = _sample(c, stream, name, total, video_fps, fps, min_frames, max_frames,
                                      min_pixels, max_pixels, total_pixels)
            if frames is None:
                raise MediaError(f"{name}: frame count changes between decodes; file is corrupt")
        audio = None
        if with_audio and c.streams.audio:
            c.seek(0)
            audio = _decode_audio(c, c.streams.audio[0], name, SAMPLE_RATE)
    n = frames.shape[0]
    return Video(frames=frames, fps=n / total * video_fps, second_per_grid=features.second_per_grid(fps),
                 audio=audio, duration=total / video_fps)


def _sample(c, stream, name, total, video_fps, fps, min_frames, max_frames, min_pixels, max_pixels, total_pixels):
    """Decode from the start, keeping the sampled frames resized to the video's frame size.
    -> (frames (n, h, w, 3) uint8, number of frames decoded)"""
    if total == 0:
        raise MediaError(f"{name}: video stream has no frames")
    if not video_fps:
        raise MediaError(f"{name}: video stream has no frame rate")
    if total < features.FRAME_FACTOR:
        raise MediaError(f"{name}: video has {total} frame; need at least {features.FRAME_FACTOR}")
    idx = features.sample_frame_indices(total, video_fps, fps, min_frames, max_frames)
    want = {}
    for j, i in enumerate(idx):
        want.setdefault(i, []).append(j)
    out, size, decoded = [None] * len(idx), None, 0
    c.seek(0)
    try:
        for frame in c.decode(stream):
            if decoded in want:
                img = torch.from_numpy(frame.to_ndarray(format="rgb24"))[None]
                if size is None:
                    size = features.video_frame_size(img.shape[1], img.shape[2], len(idx), min_pixels,
                                                     max_pixels, total_pixels)
                img = features.resize_frames(img, *size)[0].numpy()
                for j in want[decoded]:
                    out[j] = img
            decoded += 1
    except av.error.FFmpegError as e:
        raise MediaError(f"{name}: corrupt or truncated video ({e.strerror or e})") from None
    if decoded != total:  # caller re-samples with the true count
        return None, decoded
    return np.stack(out), decoded
