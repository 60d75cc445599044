"""`omni caption` on PyAV-made media: one record per item (caption or one-line error), segments and
subtitles with valid times, keys that change with the options, exactly once across a SIGKILL."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import wave
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from omni.jobs.caption import CaptionOptions, run_caption
from omni.jobs.decode import DecodeOptions, MediaPlan, plan_segments
from omni.jobs.inputs import Item, expand
from omni.jobs.records import RecordLog
from omni.pipeline import OmniModel
from omni.types import Audio, Video
from streaming.engine import Engine, EngineConfig
from tests import media as make

ROOT = Path(__file__).resolve().parents[1]


def write_av(path: Path, vcodec: str | None, acodec: str | None, seconds: float = 4.0, fps: int = 10,
             height: int = 64, width: int = 80, sr: int = 48000) -> Path:
    """A moving square (vcodec) and a chirp (acodec) in any container PyAV writes."""
    with av.open(str(path), "w") as out:
        vs = out.add_stream(vcodec, rate=fps) if vcodec else None
        layout = "stereo" if acodec == "vorbis" else "mono"  # FFmpeg's own Vorbis encoder is stereo only
        aus = out.add_stream(acodec, rate=sr, layout=layout, options={"strict": "experimental"}) if acodec else None
        if vs is not None:
            vs.width, vs.height, vs.pix_fmt = width, height, "yuv420p"
            for f in make.moving_frames(int(seconds * fps), height, width):
                for p in vs.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                    out.mux(p)
            for p in vs.encode(None):
                out.mux(p)
        if aus is not None:
            fmt, fs = aus.codec_context.codec.audio_formats[0].name, aus.codec_context.frame_size or 1024
            wav = np.repeat(make.tone(seconds, sr, 300.0, 3000.0)[None], 2 if layout == "stereo" else 1, 0)
            rs = av.AudioResampler(format=fmt, layout=layout, rate=sr)
            for i in range(0, wav.shape[1], fs):
                f = av.AudioFrame.from_ndarray(np.ascontiguousarray(wav[:, i:i + fs]), format="fltp", layout=layout)
                f.sample_rate, f.pts, f.time_base = sr, i, Fraction(1, sr)
                for fr in rs.resample(f):
                    for p in aus.encode(fr):
                        out.mux(p)
            for p in aus.encode(None):
                out.mux(p)
    return path


GOOD = {  # name -> (kind, has_audio, duration)
    "clip.mp4": ("video", True, 7.0),  # H.264 + AAC, three segments of 3 s
    "vp9.webm": ("video", True, 4.0),  # VP9 + Opus
    "vp8.webm": ("video", True, 4.0),  # VP8 + Vorbis
    "silent.mp4": ("video", False, 3.0),  # video without audio: captioned from its frames
    "tone.wav": ("audio", True, 3.0),
    "tone.mp3": ("audio", True, 3.0),
}
BAD = {  # name -> what the error says
    "corrupt.mp4": "not a media file FFmpeg can read",
    "truncated.mp4": "not a media file FFmpeg can read",  # moov atom lost with the tail
    "truncated.webm": "truncated: its header says",
    "notes.mp4": "not a media file FFmpeg can read",  # text named .mp4
    "empty.mp4": "empty file",
    "unsupported.wav": "unsupported audio codec",
}


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("caption_media")
    write_av(d / "clip.mp4", "libx264", "aac", seconds=7.0)
    write_av(d / "vp9.webm", "libvpx-vp9", "libopus")
    write_av(d / "vp8.webm", "libvpx", "vorbis")
    write_av(d / "silent.mp4", "libx264", None, seconds=3.0)
    sub = d / "sub" / "deeper"
    sub.mkdir(parents=True)
    make.write_audio(sub / "tone.wav", make.tone(3.0), 16000)
    make.write_audio(d / "tone.mp3", make.tone(3.0, 44100), 44100, codec="mp3")
    good = (d / "clip.mp4").read_bytes()
    (d / "corrupt.mp4").write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 256, dtype=np.uint8)) + good[256:])
    (d / "truncated.mp4").write_bytes(good[:len(good) // 2])
    webm = (d / "vp9.webm").read_bytes()
    (d / "truncated.webm").write_bytes(webm[:len(webm) // 2])
    (d / "notes.mp4").write_text("these are my notes, not a video\n" * 40)
    (d / "empty.mp4").write_bytes(b"")
    pcm = np.zeros(16000, "<i2").tobytes()  # a WAV whose format tag (0x3333) no decoder knows
    (d / "unsupported.wav").write_bytes(b"RIFF" + (36 + len(pcm)).to_bytes(4, "little") + b"WAVEfmt " + bytes.fromhex(
        "10000000" "3333" "0100" "803e0000" "007d0000" "0200" "1000") + b"data" + len(pcm).to_bytes(4, "little") + pcm)
    (d / "picture.png").write_bytes(make.encode_image(make.pattern_image(32, 32)))  # an image: passed over
    (d / "README.md").write_text("not media\n")  # passed over
    return d


@pytest.fixture(scope="module")
def engine(embedded_dir):
    eng = Engine(OmniModel.load(embedded_dir), EngineConfig(max_sessions=4, max_context=4096, max_new_tokens=6,
                                                            max_codes=20))
    yield eng
    eng.shutdown()


def opts(**kw) -> CaptionOptions:
    decode = DecodeOptions(segment_seconds=kw.pop("segment_seconds", 3.0), fps=kw.pop("fps", 2.0))
    return CaptionOptions(**{"decode": decode, "max_new_tokens": 6, "batch_size": 4, **kw})


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def by_name(recs: list[dict]) -> dict[str, dict]:
    out = {}
    for r in recs:
        assert Path(r["path"]).name not in out, f"{r['path']} recorded twice"
        out[Path(r["path"]).name] = r
    return out


def test_every_file_gets_one_record_caption_or_one_line_error(media_dir, engine, tmp_path):
    items, ignored = expand([str(media_dir)])
    assert ignored == 2  # the PNG and the README, found by content
    assert {Path(i.path).name for i in items} == set(GOOD) | set(BAD)
    gone = tmp_path / "gone.wav"  # listed, then removed before it is decoded
    make.write_audio(gone, make.tone(1.0), 16000)
    items.append(Item.at(str(gone)))
    gone.unlink()
    seen = []  # conversations open at once, sampled while the job runs
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            seen.append(engine.active_conversations)
            time.sleep(0.002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        summary = run_caption(engine, items, tmp_path / "c.jsonl", opts(), progress=None)
    finally:
        stop.set()
        watcher.join()
    recs = by_name(records(tmp_path / "c.jsonl"))
    assert set(recs) == set(GOOD) | set(BAD) | {"gone.wav"}
    assert (summary.done, summary.failed, summary.exit_code) == (len(GOOD), len(BAD) + 1, 1)
    assert max(seen) >= 2, "segments were not batched through the engine"
    for name, (kind, has_audio, seconds) in GOOD.items():
        r = recs[name]
        assert r["status"] == "ok" and r["kind"] == kind and r["has_audio"] == has_audio, r
        assert abs(r["duration"] - seconds) < 0.1
        assert all(s["text"] for s in r["segments"]) and r["usage"]["completion_tokens"] > 0
        assert r["segments"][0]["start"] == 0 and r["segments"][-1]["end"] == r["duration"]
        assert all(a["end"] == b["start"] for a, b in zip(r["segments"], r["segments"][1:]))
    assert [(s["start"], s["end"]) for s in recs["clip.mp4"]["segments"]] == [(0, 3), (3, 6),
                                                                              (6, recs["clip.mp4"]["duration"])]
    for name, what in {**BAD, "gone.wav": "no such file"}.items():
        r = recs[name]
        assert r["status"] == "error" and what in r["error"] and "\n" not in r["error"], r
        assert r["error"].startswith(str(media_dir / name) if name != "gone.wav" else str(gone))
    assert len({r["key"] for r in recs.values()}) == len(recs)


def test_rerun_skips_and_options_that_change_the_caption_change_the_key(media_dir, engine, tmp_path):
    files = [str(media_dir / "tone.mp3"), str(media_dir / "silent.mp4"), str(media_dir / "notes.mp4")]
    items, _ = expand(files)
    out = tmp_path / "c.jsonl"
    first = run_caption(engine, items, out, opts(), progress=None)
    assert (first.done, first.failed) == (2, 1)
    again = run_caption(engine, items, out, opts(), progress=None)
    assert (again.done, again.failed, again.skipped, again.failed_before, again.exit_code) == (0, 0, 2, 1, 1)
    assert len(records(out)) == 3
    other = run_caption(engine, items, out, opts(prompt="Name the colours."), progress=None)
    assert (other.done, other.skipped) == (2, 0)
    new = records(out)[3:]
    assert {r["prompt"] for r in new if r["status"] == "ok"} == {"Name the colours."}
    assert run_caption(engine, items, out, opts(fps=1.0), progress=None).done == 2
    assert run_caption(engine, items, out, opts(segment_seconds=1.0), progress=None).done == 2
    os.utime(media_dir / "tone.mp3", ns=(time.time_ns(), time.time_ns()))  # the file changed: its identity did
    changed = run_caption(engine, expand(files)[0], out, opts(), progress=None)
    assert (changed.done, changed.skipped) == (1, 1)
    # a manifest's per-item prompt is part of the key: same file, two prompts, two records
    manifest = tmp_path / "list.jsonl"
    manifest.write_text(json.dumps({"path": str(media_dir / "silent.mp4"), "prompt": "Count the squares."}) + "\n" +
                        json.dumps({"path": "../" + (media_dir / "sub/deeper/tone.wav").relative_to(
                            media_dir.parent).as_posix(), "prompt": "Describe the pitch."}) + "\n")
    m_items, _ = expand([str(manifest)])
    assert [i.prompt for i in m_items] == ["Count the squares.", "Describe the pitch."]
    assert Path(m_items[1].path) == media_dir / "sub/deeper/tone.wav"
    assert run_caption(engine, m_items, out, opts(), progress=None).done == 2
    keys = [r["key"] for r in records(out)]
    assert len(keys) == len(set(keys))


SRT_TIME = r"(\d\d):([0-5]\d):([0-5]\d),(\d{3})"
VTT_TIME = r"(\d\d):([0-5]\d):([0-5]\d)\.(\d{3})"


def _seconds(m: tuple) -> float:
    h, mi, s, ms = map(int, m)
    return h * 3600 + mi * 60 + s + ms / 1000


def parse_srt(text: str) -> list[tuple[float, float, str]]:
    cues = []
    for n, block in enumerate(text.strip().split("\n\n"), 1):
        lines = block.split("\n")
        assert lines[0] == str(n), block
        m = re.fullmatch(f"{SRT_TIME} --> {SRT_TIME}", lines[1])
        assert m, lines[1]
        assert len(lines) >= 3 and all(ln.strip() for ln in lines[2:]), block
        cues.append((_seconds(m.groups()[:4]), _seconds(m.groups()[4:]), "\n".join(lines[2:])))
    return cues


def parse_vtt(text: str) -> list[tuple[float, float, str]]:
    head, *blocks = text.strip().split("\n\n")
    assert head == "WEBVTT"
    cues = []
    for block in blocks:
        lines = block.split("\n")
        m = re.fullmatch(f"{VTT_TIME} --> {VTT_TIME}", lines[0])
        assert m, lines[0]
        assert len(lines) >= 2 and all(ln.strip() and "-->" not in ln for ln in lines[1:]), block
        cues.append((_seconds(m.groups()[:4]), _seconds(m.groups()[4:]), "\n".join(lines[1:])))
    return cues


@pytest.mark.parametrize("fmt", ["srt", "vtt"])
def test_subtitles_beside_the_jsonl_have_valid_segment_times(media_dir, engine, tmp_path, fmt):
    items, _ = expand([str(media_dir / "clip.mp4"), str(media_dir / "sub"), str(media_dir / "empty.mp4")])
    out = tmp_path / "subs" / "c.jsonl"
    run_caption(engine, items, out, opts(format=fmt), progress=None)
    assert sorted(p.name for p in out.parent.iterdir()) == sorted(["c.jsonl", f"clip.{fmt}", f"tone.{fmt}"])
    recs = by_name(records(out))
    for name in ("clip", "tone"):
        cues = (parse_srt if fmt == "srt" else parse_vtt)((out.parent / f"{name}.{fmt}").read_text())
        segs = [s for s in recs[f"{name}.mp4" if name == "clip" else "tone.wav"]["segments"] if s["text"].strip()]
        assert [(a, b) for a, b, _ in cues] == [(s["start"], s["end"]) for s in segs]
        assert all(a < b for a, b, _ in cues) and all(x[1] <= y[0] for x, y in zip(cues, cues[1:]))
        want = ["\n".join(ln.strip() for ln in s["text"].split("\n") if ln.strip()) for s in segs]
        assert [t for _, _, t in cues] == [w.replace("-->", "->") if fmt == "vtt" else w for w in want]
    assert len(recs["clip.mp4"]["segments"]) == 3
    assert len(parse_srt("1\n00:00:00,000 --> 00:00:03,000\nhi\n")) == 1  # the parsers themselves


def test_a_half_written_last_record_is_cut_off_and_its_item_redone(media_dir, engine, tmp_path):
    items, _ = expand([str(media_dir / "sub/deeper/tone.wav"), str(media_dir / "tone.mp3")])
    out = tmp_path / "c.jsonl"
    run_caption(engine, items, out, opts(), progress=None)
    data = out.read_bytes()
    lines = data.splitlines(keepends=True)
    out.write_bytes(lines[0] + lines[1][:len(lines[1]) // 2])  # a crash in the middle of the second write
    summary = run_caption(engine, items, out, opts(), progress=None)
    assert (summary.done, summary.skipped, summary.repaired) == (1, 1, True)
    recs = records(out)
    assert sorted(Path(r["path"]).name for r in recs) == ["tone.mp3", "tone.wav"]
    log = RecordLog(out)  # whole again: nothing to cut
    assert not log.repaired and len(log.records) == 2
    log.close()


def test_one_job_per_output_file_and_a_progress_line(tmp_path):
    from omni.jobs.caption import Progress
    from omni.jobs.records import LogBusy

    with RecordLog(tmp_path / "c.jsonl"):
        with pytest.raises(LogBusy, match="another job is writing it"):
            RecordLog(tmp_path / "c.jsonl")
    RecordLog(tmp_path / "c.jsonl").close()  # free again once the first job is gone
    p = Progress(10, None)
    p.done, p.failed = 3, 1
    assert re.fullmatch(r"caption 4/10 \[#{9}\.{15}\] 1 failed \| [\d.]+ items/min \| ETA \S+", p.text()), p.text()


def test_option_defaults_equal_the_reference_constants():
    from encoders import features
    from omni.jobs import options

    for name in ("VIDEO_FPS", "VIDEO_MAX_FRAMES", "VIDEO_MIN_PIXELS", "VIDEO_MAX_PIXELS", "FRAME_FACTOR"):
        assert getattr(options, name) == getattr(features, name), name


def test_segments_decode_at_fps_with_the_segments_audio(media_dir):
    assert plan_segments(7.0, 3.0) == [(0, 3), (3, 6), (6, 7)]
    assert plan_segments(6.4, 3.0) == [(0, 3), (3, 6.4)]  # a sliver joins the segment before
    assert plan_segments(7.0, 0) == [(0, 7.0)]
    plan = MediaPlan.open(str(media_dir / "clip.mp4"), DecodeOptions(fps=2.0, segment_seconds=3.0, max_frames=4))
    segs = list(plan.segments())
    assert [(s.start, s.end) for s in segs] == plan.spans and len(segs) == 3
    for s in segs:
        assert isinstance(s.part, Video) and s.part.source.dtype == np.uint8
        assert s.part.source.shape[0] == 4  # 6 frames at 2 fps capped by max_frames
        assert abs(len(s.part.audio) - (s.end - s.start) * 16000) < 1000  # the segment's own sound
    # the square moves right: later segments show it further right
    xs = [np.argmax((s.part.source[0, :, :, 2] < 60).sum(0)) for s in segs]
    assert xs == sorted(xs) and xs[0] < xs[-1]
    audio = MediaPlan.open(str(media_dir / "tone.mp3"), DecodeOptions(segment_seconds=2.0))
    assert [type(s.part) for s in audio.segments()] == [Audio, Audio]


def test_speak_writes_one_wav_per_item(media_dir, embedded_dir, tmp_path):
    eng = Engine(OmniModel.load(embedded_dir, speech=True),
                 EngineConfig(max_sessions=2, max_context=4096, max_new_tokens=4, max_codes=12))
    try:
        items, _ = expand([str(media_dir / "tone.mp3"), str(media_dir / "silent.mp4")])
        summary = run_caption(eng, items, tmp_path / "c.jsonl", opts(speak=tmp_path / "wav", batch_size=2,
                                                                     segment_seconds=2.0), progress=None)
    finally:
        eng.shutdown()
    assert (summary.done, summary.failed) == (2, 0)
    recs = records(tmp_path / "c.jsonl")
    assert sorted(Path(r["wav"]).parent for r in recs) == [tmp_path / "wav"] * 2
    for r in recs:
        with wave.open(r["wav"]) as w:
            assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (24000, 1, 2)
            assert w.getnframes() > 0
    assert not list((tmp_path / "wav").glob(".*.part"))


def omni_caption(cache: Path, *args: str, wait: bool = True):
    env = {**os.environ, "OMNI_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "omni", "caption", *args]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    if wait:
        out, err = p.communicate(timeout=300)
        return p.returncode, err
    return p


def test_sigkill_mid_run_then_rerun_gives_every_item_exactly_once(media_dir, embedded_dir, tmp_path):
    cache = embedded_dir.parent
    src = tmp_path / "in"
    src.mkdir()
    for i in range(4):  # distinct files (identity is path, size, mtime)
        (src / f"clip{i:02d}.mp4").write_bytes((media_dir / "silent.mp4").read_bytes())
        (src / f"tone{i:02d}.mp3").write_bytes((media_dir / "tone.mp3").read_bytes())
    out = tmp_path / "c.jsonl"
    args = [str(src), "--out", str(out), "--max-new-tokens", "24", "--batch-size", "2", "--segment-seconds", "1"]
    kills = 0
    for wait_lines in (1, 4):  # kill twice, at different points
        p = omni_caption(cache, *args, wait=False)
        deadline = time.time() + 120
        while time.time() < deadline and p.poll() is None:
            if out.exists() and out.read_bytes().count(b"\n") >= wait_lines:
                break
            time.sleep(0.01)
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            kills += 1
        p.communicate()
    assert kills == 2, "the job finished before it could be killed"
    assert len(records(out)) < 8
    rc, err = omni_caption(cache, *args)
    assert rc == 0, err
    recs = records(out)
    assert sorted(Path(r["path"]).name for r in recs) == sorted(p.name for p in src.iterdir())
    assert all(r["status"] == "ok" for r in recs)
    assert re.search(r"caption: \d+ done, 0 failed, \d+ skipped", err), err
    rc, err = omni_caption(cache, *args)  # nothing left: no model loaded, nothing written
    assert rc == 0 and "0 done, 0 failed, 8 skipped" in err and len(records(out)) == 8


def test_cli_reports_bad_arguments_in_one_line(embedded_dir, tmp_path):
    rc, err = omni_caption(embedded_dir.parent, str(tmp_path / "nothing*.mp4"), "--out", str(tmp_path / "c.jsonl"))
    assert rc == 2 and "no file matches" in err and "Traceback" not in err
    from omni.cli import UserError, build_parser
    from omni.jobs.caption import options_from_args

    for bad, what in ((["--max-pixels", "10"], "--max-pixels must be at least"), (["--fps", "0"], "--fps must be"),
                      (["--segment-seconds", "-1"], "--segment-seconds must be")):
        with pytest.raises(UserError, match=what):
            options_from_args(build_parser().parse_args(["caption", "x.mp4", "--out", "c.jsonl", *bad]))


def test_caption_bench_measures_throughput_and_busy_time(embedded_dir, tmp_path):
    from omni.jobs.caption_bench import run_caption_bench

    lines = []
    results = run_caption_bench(embedded_dir, batch_sizes=(1, 2), items=2, seconds=2.0, max_new_tokens=4,
                                workdir=tmp_path, print_fn=lines.append)
    assert [r["batch_size"] for r in results] == [1, 2] and all(r["done"] == 2 for r in results)
    for r in results:
        assert r["items_per_min"] > 0 and 0 < r["busy_fraction"] <= 1 and 0 < r["inflight_fraction"] <= 1
    assert all("items/min" in ln and "device busy" in ln for ln in lines)
