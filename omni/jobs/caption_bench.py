"""`omni bench caption`: captioning throughput (items per minute) at batch sizes 1 and 8, and how
much of the wall time the device is busy.

The media are generated here with PyAV (half H.264/AAC videos, half MP3s, `seconds` long), so the
numbers need no data set. One model load; a fresh engine (max_sessions = batch size) and a fresh
JSONL per batch size; a one-item warm-up first. Measured per run:
  - items/min and media seconds per wall second, from the job's own summary;
  - busy: seconds the engine worker spends in its model steps (prefill, batched decode, Talker),
    timed by wrapping those methods on the engine instance, over the job's wall time;
  - in flight: the fraction of wall time at least one segment is inside the engine (what an
    outside observer sees);
  - waiting: the fraction of consumer time spent waiting for a decoded segment (decode starving
    the model; ~0 when the decoder threads keep ahead).
"""

from __future__ import annotations

import tempfile
import threading
import time
from fractions import Fraction
from pathlib import Path


class BusyMeter:
    """Seconds the engine's worker spent in model steps since this meter was made (Engine.busy_s)."""

    def __init__(self, engine):
        self.engine, self.start = engine, engine.busy_s

    @property
    def busy(self) -> float:
        return self.engine.busy_s - self.start


def make_media(folder: Path, n: int, seconds: float, size: tuple[int, int] = (240, 320)) -> list[Path]:
    """n files: even ones H.264/AAC mp4 (moving gradient, chirp), odd ones MP3 (chirp)."""
    import av
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    h, w = size
    fps, sr = 10, 44100
    t = np.arange(int(seconds * sr)) / sr
    chirp = (0.4 * np.sin(2 * np.pi * (300 * t + 1350 * t * t / seconds))).astype(np.float32)[None]
    y, x = np.mgrid[0:h, 0:w]
    paths = []
    for i in range(n):
        path = folder / (f"clip{i:03d}.mp4" if i % 2 == 0 else f"tone{i:03d}.mp3")
        with av.open(str(path), "w") as out:  # every stream is added before the first packet is muxed
            aus = out.add_stream("aac" if i % 2 == 0 else "libmp3lame", rate=sr, layout="mono")
            if i % 2 == 0:
                vs = out.add_stream("libx264", rate=fps)
                vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
                for k in range(int(seconds * fps)):
                    img = np.stack([(x + 8 * k + i) % 256, y % 256, (x + y + 16 * k) % 256], -1).astype(np.uint8)
                    for p in vs.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                        out.mux(p)
                for p in vs.encode(None):
                    out.mux(p)
            fmt, fs = aus.codec_context.codec.audio_formats[0].name, aus.codec_context.frame_size or 1152
            rs = av.AudioResampler(format=fmt, layout="mono", rate=sr)
            for j in range(0, chirp.shape[1], fs):
                f = av.AudioFrame.from_ndarray(np.ascontiguousarray(chirp[:, j:j + fs]), format="fltp", layout="mono")
                f.sample_rate, f.pts, f.time_base = sr, j, Fraction(1, sr)
                for fr in rs.resample(f):
                    for p in aus.encode(fr):
                        out.mux(p)
            for p in aus.encode(None):
                out.mux(p)
        paths.append(path)
    return paths


def run_caption_bench(model_dir: str | Path, device: str = "cpu", dtype=None, batch_sizes=(1, 8),
                      items: int = 16, seconds: float = 6.0, segment_seconds: float = 30.0,
                      max_new_tokens: int = 32, workdir: str | Path | None = None, print_fn=print) -> list[dict]:
    """Caption `items` generated files once per batch size; returns one result dict per batch size."""
    from omni.jobs.caption import CaptionOptions, run_caption
    from omni.jobs.inputs import Item, model_identity
    from omni.jobs.options import DecodeOptions
    from omni.models import load_model
    from streaming.engine import Engine, EngineConfig

    tmp = tempfile.TemporaryDirectory(prefix="omni-bench-caption-") if workdir is None else None
    work = Path(workdir or tmp.name)
    try:
        files = make_media(work / "media", items, seconds)
        warm = make_media(work / "warm", 1, seconds)
        model = load_model(model_dir, device=device, dtype=dtype, speech=False)
        mid = model_identity(model_dir)
        results = []
        for bs in batch_sizes:
            opts = CaptionOptions(decode=DecodeOptions(segment_seconds=segment_seconds),
                                  max_new_tokens=max_new_tokens, batch_size=bs)
            engine = Engine(model, EngineConfig(max_sessions=bs, max_context=16384, max_new_tokens=max_new_tokens))
            try:
                run_caption(engine, [Item.at(str(p)) for p in warm], work / f"warm-{bs}.jsonl", opts, mid,
                            progress=None)
                meter = BusyMeter(engine)
                s = run_caption(engine, [Item.at(str(p)) for p in files], work / f"bench-{bs}.jsonl", opts, mid,
                                progress=None)
            finally:
                engine.shutdown()
            r = {"batch_size": bs, "items": items, "done": s.done, "failed": s.failed,
                 "items_per_min": round(s.items_per_min, 1), "wall_s": round(s.wall_s, 2),
                 "media_s_per_s": round(s.media_seconds / s.wall_s, 2) if s.wall_s else None,
                 "busy_fraction": round(meter.busy / s.wall_s, 3) if s.wall_s else None,
                 "inflight_fraction": round(s.inflight_s / s.wall_s, 3) if s.wall_s else None,
                 "waiting_fraction": round(s.waiting_s / (s.wall_s * bs), 3) if s.wall_s else None}
            results.append(r)
            print_fn(f"caption batch {bs}: {r['items_per_min']} items/min ({r['media_s_per_s']} media s/s), "
                     f"device busy {100 * r['busy_fraction']:.0f}% of wall, in flight "
                     f"{100 * r['inflight_fraction']:.0f}%, slots waiting for decode "
                     f"{100 * r['waiting_fraction']:.0f}%  [{items} items of {seconds:g} s, "
                     f"{max_new_tokens} tokens, {s.failed} failed]")
        return results
    finally:
        if tmp is not None:
            tmp.cleanup()
