"""`omni caption --ray`: captioning on a real local Ray Data cluster (2 workers). Exactly once after a killed
worker and after SIGKILL of the driver; long media decoded as a stream (RSS measured in the worker)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import wave
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from omni import media
from omni.jobs.caption import CaptionOptions
from omni.jobs.decode import DecodeOptions, MediaPlan
from omni.jobs.inputs import expand, model_identity
from tests import media as make
from tests.ray_local import local_ray
from tests.test_caption import write_av

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray's own pydantic v1-style fields
GOOD, BAD = 8, 2
TOKENS = 6


def records(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_streamed_sound_equals_the_whole_track(tmp_path):
    """The chunks and the segments' slices are load_audio's samples, for audio and a video's sound."""
    write_av(tmp_path / "clip.mp4", "libx264", "aac", seconds=7.0)
    make.write_audio(tmp_path / "tone.mp3", make.tone(5.0, 44100), 44100, codec="mp3")
    for name, kind in (("clip.mp4", "video"), ("tone.mp3", "audio")):
        path = str(tmp_path / name)
        whole = media.load_audio(path)
        np.testing.assert_array_equal(np.concatenate(list(media.iter_audio(path))), whole)
        assert media.count_audio(path) == len(whole)
        plan = MediaPlan.open(path, DecodeOptions(segment_seconds=2.0, max_frames=4))
        assert plan.kind == kind and plan.audio_samples == len(whole)
        segs = list(plan.segments())
        assert len(segs) == len(plan.spans) > 2
        for s in segs:
            end = len(whole) if s.end >= plan.duration else int(round(s.end * 16000))
            np.testing.assert_array_equal(s.part.audio if kind == "video" else s.part.source,
                                          whole[int(round(s.start * 16000)):end])


@pytest.fixture(scope="module")
def cluster(embedded_dir):  # embedded_dir first: $OMNI_CACHE is set before Ray's workers inherit the environment
    with local_ray(num_cpus=4) as ray:
        yield ray


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    from omni.jobs.caption_bench import make_media

    d = tmp_path_factory.mktemp("ray_media")
    make_media(d, GOOD, 2.0, size=(48, 64))  # H.264/AAC mp4s and MP3s
    (d / "notes.mp4").write_text("these are my notes, not a video\n" * 40)
    (d / "empty.mp3").write_bytes(b"")
    return d


@pytest.fixture(scope="module")
def spec(embedded_dir):
    from omni.scale.data import WorkerSpec

    def make_spec(**kw):
        o = CaptionOptions(max_new_tokens=TOKENS, batch_size=2, **kw)
        return WorkerSpec(None, "cpu", None, 1, o, 4096, model_identity(embedded_dir), False)

    return make_spec


def check_once(out: Path, media_dir: Path) -> list[dict]:
    recs = records(out)
    keys = Counter(r["key"] for r in recs)
    assert max(keys.values()) == 1, "a record written twice"
    by_path = Counter(Path(r["path"]).name for r in recs)
    assert len(by_path) == GOOD + BAD and max(by_path.values()) == 1
    assert Counter(r["status"] for r in recs) == {"ok": GOOD, "error": BAD}
    for r in recs:
        if r["status"] == "error":
            assert r["path"].endswith(("notes.mp4", "empty.mp3")) and r["error"]
        else:
            assert r["segments"] and r["usage"]["completion_tokens"] > 0
    return recs


def worker_pids() -> list[int]:
    """PIDs of Ray Data's CaptionWorker actors on this machine (their process titles name the class)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if "ray::" in cmd and "CaptionWorker" in cmd:
                out.append(int(d.name))
    return out


def test_exactly_once_across_a_killed_worker(cluster, media_dir, spec, tmp_path):
    from omni.scale.data import run_caption_ray

    items, _ = expand([str(media_dir)])
    out = tmp_path / "c.jsonl"
    killed, after = [], []

    def on_record(rec):
        if killed:
            after.append(rec)
        else:  # the first batch is in: kill the worker that is busiest now, mid-batch
            pids = worker_pids()
            assert pids, "no CaptionWorker process found"
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])

    summary, _ = run_caption_ray(items, out, spec().options, spec(), workers=2, progress=None, items_per_call=2,
                                 on_record=on_record)
    assert killed
    check_once(out, media_dir)
    assert (summary.done, summary.failed) == (GOOD, BAD)
    assert after  # the pool went on after the kill (which worker took the retried batch is Ray's to choose)

    again, _ = run_caption_ray(items, out, spec().options, spec(), workers=2, progress=None)
    assert (again.done, again.failed, again.skipped, again.failed_before) == (0, 0, GOOD, BAD)
    check_once(out, media_dir)


def test_exactly_once_after_sigkill_of_the_driver(cluster, media_dir, tmp_path):
    """`omni caption --ray --address` (the test's cluster) killed with SIGKILL after its first records; a
    rerun does only what is missing."""
    out = tmp_path / "c.jsonl"
    address = cluster.get_runtime_context().gcs_address
    cmd = [sys.executable, "-m", "omni.cli", "caption", str(media_dir), "--out", str(out), "--ray", "--address",
           address, "--workers", "2", "--batch-size", "2", "--max-new-tokens", str(TOKENS), "--max-context", "4096",
           "--quiet"]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and p.poll() is None:
        if out.exists() and out.read_text().count("\n") >= 1:
            break
        time.sleep(0.05)
    assert p.poll() is None, p.stdout.read().decode()
    p.send_signal(signal.SIGKILL)
    p.wait(10)
    first = records(out)
    assert 1 <= len(first) < GOOD + BAD
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert r.returncode == 1, r.stderr  # 1: the bad files' error records
    recs = check_once(out, media_dir)
    assert {x["key"] for x in first} <= {x["key"] for x in recs}
    import re

    done, failed, skipped = map(int, re.search(r"caption: (\d+) done, (\d+) failed, (\d+) skipped", r.stderr).groups())
    assert done + failed == GOOD + BAD - len(first)  # only what was missing


LONG_S, SHORT_S = 1800, 720  # the short one has as many segments as the decoder runs ahead of the engine
# (the whole long track at 16 kHz float32 would be 110 MB)


def write_wav(path: Path, seconds: int) -> Path:
    t = np.arange(16000 * 60) / 16000
    minute = (0.3 * np.sin(2 * np.pi * (200 + 100 * np.sin(2 * np.pi * 0.2 * t)) * t) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        for _ in range(seconds // 60):
            w.writeframes(minute.tobytes())
    return path


def test_long_media_captions_with_bounded_memory(cluster, spec, tmp_path):
    """A worker's peak RSS captioning 30 minutes of sound equals its peak for 12 minutes (same 120 s segments):
    the sound is decoded segment by segment, never held whole. One file per worker, both fresh processes."""
    from omni.jobs.inputs import Item
    from omni.scale.data import run_caption_ray

    s = spec(decode=DecodeOptions(segment_seconds=120.0))
    files = {n: write_wav(tmp_path / f"{n}.wav", n) for n in (SHORT_S, LONG_S)}
    out = tmp_path / "long.jsonl"
    _, stats = run_caption_ray([Item.at(str(files[LONG_S])), Item.at(str(files[SHORT_S]))], out, s.options, s,
                               workers=2, progress=None, items_per_call=1)
    recs = {r["duration"]: r for r in records(out)}
    for n in (SHORT_S, LONG_S):
        assert recs[n]["status"] == "ok" and len(recs[n]["segments"]) == n // 120, recs[n]
    assert len(stats.worker_pids) == 2  # each file had a worker of its own
    peaks = {n: stats.peak_rss_by_path[str(files[n])] for n in files}
    whole_mb = LONG_S * 16000 * 4 / 2**20
    print(f"\nlong caption: worker peak RSS {peaks[SHORT_S]:.0f} MB for {SHORT_S // 60} min of sound, "
          f"{peaks[LONG_S]:.0f} MB for {LONG_S // 60} min (the whole track alone: {whole_mb:.0f} MB)")
    assert peaks[LONG_S] - peaks[SHORT_S] < whole_mb / 3, peaks
