"""Media for batch jobs: what a file is (by content), and its segments decoded with PyAV.

`MediaPlan.open(path, options)` reads the file once without decoding pictures (packet times of
the video stream) and decodes the sound track, then `plan.segments()` decodes the pictures in
one pass and yields each segment as soon as its last sampled frame is in: frames sampled at
`fps` by the reference's rule applied to the segment (`features.sample_frame_indices`), sized by
its pixel budget, with the segment's slice of 16 kHz audio. The sound is counted in one streaming pass
and then decoded again as the segments need it (omni.media.AudioCursor), so memory stays at one segment
of sampled frames and sound whatever the file's length (the whole track, 230 MB per hour, is never held).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Iterator

import av
import numpy as np
import torch

from encoders import features
from omni import media
from omni.jobs.options import DecodeOptions
from omni.media import MediaError, open_container
from omni.types import Audio, Video

SR = media.SAMPLE_RATE
_MIN_AUDIO = SR // 10  # a segment's sound shorter than 0.1 s is left out (nothing to hear, and no mel frames)


@dataclass(frozen=True)
class Segment:
    index: int
    count: int  # segments in the item
    start: float  # seconds from the start of the media
    end: float
    part: Video | Audio  # in-memory, ready for the engine


def classify(path: str) -> str | None:
    """'video', 'audio', 'image' or None (not media FFmpeg can read), by content."""
    try:
        with av.open(path) as c:
            fmt = c.format.name
            if fmt == "image2" or fmt.endswith("_pipe"):
                return "image" if c.streams.video else None
            if _video_stream(c) is not None:
                return "video"
            return "audio" if c.streams.audio else None
    except (av.error.FFmpegError, OSError, UnicodeDecodeError):
        return None


def _video_stream(c):
    """The first video stream that is a moving picture (not an mp3's cover art)."""
    for s in c.streams.video:
        if not s.disposition & av.stream.Disposition.attached_pic:
            return s
    return None


def plan_segments(duration: float, segment_seconds: float) -> list[tuple[float, float]]:
    """[(start, end)] covering [0, duration]; a tail shorter than min(1 s, half a segment) joins
    the segment before it, so no caption is asked for a sliver."""
    if segment_seconds <= 0 or duration <= segment_seconds:
        return [(0.0, round(float(duration), 3))]
    edges = [k * segment_seconds for k in range(int(duration // segment_seconds) + 1)]
    if duration - edges[-1] < min(1.0, segment_seconds / 2):
        edges.pop()
    edges.append(duration)
    return [(round(float(a), 3), round(float(b), 3)) for a, b in zip(edges, edges[1:])]


@dataclass
class MediaPlan:
    path: str
    kind: str  # video | audio
    duration: float  # seconds
    has_audio: bool
    spans: list[tuple[float, float]]
    options: DecodeOptions
    audio_samples: int  # length of the 16 kHz sound track (0: none); decoded segment by segment
    picks: list[list[int]] | None = None  # video: per segment, the ordinal frame numbers to keep
    n_frames: int = 0

    @classmethod
    def open(cls, path: str, options: DecodeOptions = DecodeOptions()) -> "MediaPlan":
        name = path
        c = open_container(path, name)
        with c:
            fmt = c.format.name
            vs = _video_stream(c)
            if fmt == "image2" or fmt.endswith("_pipe"):
                raise MediaError(f"{name}: an image, not video or audio")
            if vs is None and not c.streams.audio:
                raise MediaError(f"{name}: no video or audio stream")
            if vs is not None:
                if vs.codec_context is None or vs.codec_context.codec is None:
                    raise MediaError(f"{name}: unsupported video codec")
                times, video_fps = _frame_times(c, vs, name)
            has_audio = bool(c.streams.audio)
            declared = c.duration / 1e6 if c.duration and c.duration > 0 else None  # from the container's header
        audio = media.count_audio(path) if has_audio else 0  # MediaError for corrupt or unsupported audio
        audio_s = audio / SR
        video_s = times[-1] + 1.0 / video_fps if vs is not None else 0.0
        duration = round(max(video_s, audio_s), 3)
        if declared and duration < 0.9 * declared - 0.25:
            raise MediaError(f"{name}: truncated: its header says {declared:.2f} s but the media ends at "
                             f"{duration:.2f} s")
        if vs is None:
            return cls(path, "audio", duration, True, plan_segments(duration, options.segment_seconds), options, audio)
        spans = plan_segments(duration, options.segment_seconds)
        picks = []
        for a, b in spans:
            lo, hi = bisect.bisect_left(times, a - 1e-6), bisect.bisect_left(times, b - 1e-6)
            if b >= duration:
                hi = len(times)
            if hi - lo < features.FRAME_FACTOR:  # past the end of the pictures (sound runs longer): last frames
                lo = max(0, min(lo, len(times) - features.FRAME_FACTOR))
                hi = lo + features.FRAME_FACTOR
            idx = features.sample_frame_indices(hi - lo, video_fps, options.fps, features.VIDEO_MIN_FRAMES,
                                                options.max_frames)
            picks.append([lo + i for i in idx])
        return cls(path, "video", duration, has_audio, spans, options, audio, picks, len(times))

    def segments(self) -> Iterator[Segment]:
        self._cursor = media.AudioCursor(self.path) if self.audio_samples else None
        try:
            if self.kind == "audio":
                for i, (a, b) in enumerate(self.spans):
                    yield Segment(i, len(self.spans), a, b, Audio(self._audio_slice(a, b, whole=True)))
                return
            yield from self._video_segments()
        finally:
            if self._cursor is not None:
                self._cursor.close()

    def _audio_slice(self, a: float, b: float, whole: bool = False) -> np.ndarray | None:
        if not self.audio_samples:
            return None
        end = self.audio_samples if b >= self.duration else int(round(b * SR))
        x = self._cursor.take(int(round(a * SR)), end)
        if len(x) < _MIN_AUDIO:
            if whole:  # audio-only: the model needs something to hear
                raise MediaError(f"{self.path}: audio segment {a:.2f}-{b:.2f} s has {len(x)} samples; too short")
            return None
        return x

    def _video_segments(self) -> Iterator[Segment]:
        name, o = self.path, self.options
        want: dict[int, list[tuple[int, int]]] = {}  # frame ordinal -> [(segment, slot)]
        for k, idx in enumerate(self.picks):
            for j, i in enumerate(idx):
                want.setdefault(i, []).append((k, j))
        last = [max(idx) for idx in self.picks]
        bufs: list[list | None] = [[None] * len(idx) for idx in self.picks]
        sizes: list[tuple[int, int] | None] = [None] * len(self.picks)
        nxt, n = 0, 0  # next segment to hand out; frames decoded
        try:
            c = av.open(name)
        except (av.error.FFmpegError, OSError) as e:
            raise MediaError(f"{name}: cannot reopen ({getattr(e, 'strerror', None) or e})") from None
        with c:
            vs = _video_stream(c)
            try:
                for frame in c.decode(vs):
                    for k, j in want.get(n, ()):
                        img = torch.from_numpy(frame.to_ndarray(format="rgb24"))[None]  # (1, H, W, 3)
                        if sizes[k] is None:
                            sizes[k] = features.video_frame_size(img.shape[1], img.shape[2], len(bufs[k]),
                                                                 max_pixels=o.max_pixels)
                        bufs[k][j] = features.resize_frames(img, *sizes[k])[0].numpy()
                    n += 1
                    while nxt < len(self.picks) and last[nxt] < n:
                        yield self._video_segment(nxt, np.stack(bufs[nxt]))
                        bufs[nxt] = None
                        nxt += 1
                    if nxt == len(self.picks):
                        return
            except av.error.FFmpegError as e:
                raise MediaError(f"{name}: corrupt or truncated video ({e.strerror or e})") from None
        raise MediaError(f"{name}: corrupt or truncated video (decoded {n} of {self.n_frames} frames)")

    def _video_segment(self, k: int, frames: np.ndarray) -> Segment:
        a, b = self.spans[k]
        # fps: the requested rate, as the reference's second_per_grid uses (not the rate achieved)
        return Segment(k, len(self.spans), a, b, Video(frames, fps=self.options.fps, audio=self._audio_slice(a, b)))


def _frame_times(c, vs, name: str) -> tuple[list[float], float]:
    """Presentation times (s, from the first frame) of the video's frames, by demuxing only."""
    try:
        pts = [p.pts for p in c.demux(vs) if p.size]
    except av.error.FFmpegError as e:
        raise MediaError(f"{name}: corrupt or truncated video ({e.strerror or e})") from None
    if len(pts) < features.FRAME_FACTOR:
        raise MediaError(f"{name}: video has {len(pts)} frame(s); need at least {features.FRAME_FACTOR}")
    rate = vs.average_rate or vs.guessed_rate
    tb = vs.time_base
    if None in pts or tb is None:
        if not rate:
            raise MediaError(f"{name}: video stream has no timestamps and no frame rate")
        return [i / float(rate) for i in range(len(pts))], float(rate)
    pts.sort()
    times = [float((p - pts[0]) * tb) for p in pts]
    fps = float(rate) if rate else (len(times) - 1) / max(times[-1], 1e-6)
    return times, fps
