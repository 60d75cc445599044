"""`omni caption`: caption many video and audio files through the engine, resumable, exactly once.

    omni caption PATH... --out captions.jsonl [--prompt TEXT] [--format jsonl|srt|vtt]
                 [--segment-seconds 30] [--fps 2] [--max-frames N] [--max-pixels N]
                 [--batch-size N] [--speak DIR] [--model DIR]

Decoder threads (PyAV) turn each file into segments of in-memory frames and sound and queue
them a little ahead of the model; `--batch-size` consumers each run one segment at a time in
its own engine conversation, so up to that many segments decode in one batched step. An item's
record (all its segments, or the one-line error) is appended to the JSONL and fsync'd when the
item is finished; a rerun skips every key already in the file (see records.py, inputs.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from omni.jobs.inputs import Item, record_key
from omni.jobs.options import (FRAME_FACTOR, VIDEO_FPS, VIDEO_MAX_FRAMES, VIDEO_MAX_PIXELS, VIDEO_MIN_PIXELS,
                               DecodeOptions)
from omni.jobs.records import RecordLog, write_subtitles

if TYPE_CHECKING:  # torch and PyAV load only when a job runs, so `omni --help` stays quick
    from omni.jobs.decode import MediaPlan, Segment

DEFAULT_PROMPT = "Describe this {kind} in detail: what is seen and heard."


@dataclass(frozen=True)
class CaptionOptions:
    prompt: str | None = None  # for items without their own (manifest) prompt; None: DEFAULT_PROMPT
    decode: DecodeOptions = DecodeOptions()
    max_new_tokens: int = 256
    seed: int = 0  # sampling seed of every segment
    speak: Path | None = None  # write one WAV per item here (the Talker speaks the caption)
    voice: str | None = None
    max_speech_seconds: float = 30.0  # per segment (the engine's max_audio_s)
    batch_size: int = 4  # segments in flight through the engine at once
    decode_workers: int = 2  # decoder threads
    format: str = "jsonl"  # jsonl | srt | vtt (subtitles beside the JSONL, besides the JSONL itself)
    retry_failed: bool = False  # redo items whose record in the log is an error

    def key_options(self) -> dict:
        """The options that change the caption (they go into every record's key)."""
        d = self.decode
        return {"fps": d.fps, "segment_seconds": d.segment_seconds, "max_frames": d.max_frames,
                "max_pixels": d.max_pixels, "max_new_tokens": self.max_new_tokens, "seed": self.seed,
                "speech": {"voice": self.voice, "max_seconds": self.max_speech_seconds} if self.speak else None}


@dataclass
class Summary:
    total: int = 0  # items asked for
    done: int = 0  # captioned in this run
    failed: int = 0  # error records written in this run
    skipped: int = 0  # already in the log (captioned before)
    failed_before: int = 0  # already in the log as errors, not retried
    ignored: int = 0  # non-media files passed over in directories and globs
    media_seconds: float = 0.0  # of the items captioned in this run
    wall_s: float = 0.0
    waiting_s: float = 0.0  # summed over consumers: time a free slot waited for a decoded segment
    inflight_s: float = 0.0  # time at least one segment was in the engine
    repaired: bool = False  # a half-written last record was cut off and redone
    outputs: list[str] = field(default_factory=list)  # subtitle files written

    @property
    def items_per_min(self) -> float:
        return 60.0 * (self.done + self.failed) / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def exit_code(self) -> int:
        return 1 if self.failed or self.failed_before else 0

    def line(self, out: Path) -> str:
        hours = self.media_seconds / 3600
        speed = f" ({hours / (self.wall_s / 3600):.1f}x real time)" if self.wall_s > 0 and hours else ""
        extra = f", {self.failed_before} failed before (--retry-failed redoes them)" if self.failed_before else ""
        ign = f", {self.ignored} non-media files passed over" if self.ignored else ""
        return (f"caption: {self.done} done, {self.failed} failed, {self.skipped} skipped (already in {out.name})"
                f"{extra}{ign}; {self.items_per_min:.1f} items/min; {hours:.3f} media hours{speed}; "
                f"{_clock(self.wall_s)} wall")


def _clock(s: float) -> str:
    s = int(round(s))
    h, rem = divmod(s, 3600)
    return f"{h}h{rem // 60:02d}m{rem % 60:02d}s" if h else f"{rem // 60}m{rem % 60:02d}s"


class Progress:
    """One status line on stderr: items done, failures, items per minute, ETA. Redrawn in place on
    a terminal; elsewhere (logs, CI) a line every `every` seconds."""

    def __init__(self, total: int, stream: TextIO | None, every: float = 10.0):
        self.total, self.stream, self.every = total, stream, every
        self.done = self.failed = 0
        self.t0 = time.perf_counter()
        self._last = 0.0
        self.tty = bool(stream) and hasattr(stream, "isatty") and stream.isatty()

    def text(self) -> str:
        n = self.done + self.failed
        el = time.perf_counter() - self.t0
        rate = 60.0 * n / el if el > 0 and n else 0.0
        eta = _clock((self.total - n) / rate * 60) if rate else "?"
        width = 24
        fill = int(width * n / self.total) if self.total else width
        return (f"caption {n}/{self.total} [{'#' * fill}{'.' * (width - fill)}] {self.failed} failed | "
                f"{rate:.1f} items/min | ETA {eta}")

    def tick(self, force: bool = False) -> None:
        if not self.stream:
            return
        now = time.perf_counter()
        if self.tty:
            self.stream.write("\r" + self.text() + "\x1b[K")
            self.stream.flush()
        elif force or now - self._last >= self.every:
            self._last = now
            self.stream.write(self.text() + "\n")
            self.stream.flush()

    def end(self) -> None:
        if self.stream and self.tty:
            self.stream.write("\r" + self.text() + "\x1b[K\n")
            self.stream.flush()
        elif self.stream:
            self.tick(force=True)


@dataclass
class _ItemState:
    plan: MediaPlan | None = None
    results: dict = field(default_factory=dict)  # segment index -> (Segment, text, pcm chunks, Done)
    closed: bool = False  # recorded (ok or error): later results for it are dropped
    sample_rate: int = 24000


def _one_line(msg: str) -> str:
    return " ".join(str(msg).split())


class _Job:
    def __init__(self, engine, items: list[Item], out: Path, options: CaptionOptions, model_id: str,
                 progress: TextIO | None, captioner: bool, log=None):
        self.engine, self.out, self.o, self.model_id = engine, Path(out), options, model_id
        self.log = log if log is not None else RecordLog(self.out)
        self.summary = Summary(total=len(items), repaired=bool(self.log.repaired))
        self.keys: dict[Item, str] = {}
        self.prompts: dict[Item, str | None] = {}
        self.todo: list[Item] = []
        kopts = options.key_options()
        # A captioning-only model (omni.models.is_captioner) takes an audio-only user turn: no instruction by default.
        self.captioner = captioner
        self.default_prompt = "" if self.captioner else DEFAULT_PROMPT
        for it in items:
            prompt = it.prompt if it.prompt is not None else options.prompt
            key = record_key(it, prompt if prompt is not None else self.default_prompt, kopts, model_id)
            self.keys[it], self.prompts[it] = key, prompt
            rec = self.log.records.get(key)
            if rec is None or (options.retry_failed and rec.get("status") != "ok"):
                self.todo.append(it)
            elif rec.get("status") == "ok":
                self.summary.skipped += 1
            else:
                self.summary.failed_before += 1
        self.progress = Progress(len(self.todo), progress)
        self.state: dict[Item, _ItemState] = {it: _ItemState() for it in self.todo}
        self.stop = threading.Event()
        self._inflight, self._busy_since = 0, 0.0

    # -- decoding (threads) -------------------------------------------------------------------

    def _put(self, msg) -> bool:
        fut = asyncio.run_coroutine_threadsafe(self.q.put(msg), self.loop)
        while True:
            try:
                fut.result(timeout=0.5)
                return True
            except concurrent.futures.TimeoutError:
                if self.stop.is_set():
                    fut.cancel()
                    return False

    def _decoder(self, todo) -> None:
        try:
            while not self.stop.is_set():
                with self.todo_lock:
                    it = next(todo, None)
                if it is None:
                    return
                try:
                    from omni.jobs.decode import MediaPlan

                    plan = MediaPlan.open(it.path, self.o.decode)
                    st = os.stat(it.path)
                    if (st.st_size, st.st_mtime_ns) != (it.size, it.mtime_ns):
                        raise ValueError(f"{it.path}: changed while the job ran; rerun to caption the new version")
                    for seg in plan.segments():
                        if not self._put(("seg", it, (plan, seg))):
                            return
                except (ValueError, OSError) as e:  # MediaError is a ValueError
                    self._put(("fail", it, str(e)))
                except Exception as e:  # a decoder bug must not stop the run: the item fails, with the cause
                    self._put(("fail", it, f"{it.path}: cannot decode ({type(e).__name__}: {e})"))
        finally:
            self._put(("eof", None, None))

    # -- captioning (asyncio) -----------------------------------------------------------------

    async def run(self) -> Summary:
        self.loop = asyncio.get_running_loop()
        t0 = self.progress.t0 = time.perf_counter()
        o = self.o
        if o.speak and self.todo:
            await self._check_speech()
        self.q: asyncio.Queue = asyncio.Queue(maxsize=o.batch_size + o.decode_workers)
        self.todo_lock = threading.Lock()
        todo = iter(self.todo)
        n_dec = max(1, min(o.decode_workers, len(self.todo)))
        self.eofs, self.n_dec = 0, n_dec
        threads = [threading.Thread(target=self._decoder, args=(todo,), name=f"omni-decode-{i}", daemon=True)
                   for i in range(n_dec)] if self.todo else []
        for t in threads:
            t.start()
        ticker = asyncio.create_task(self._tick())
        try:
            if self.todo:
                await asyncio.gather(*(self._consumer() for _ in range(o.batch_size)))
        finally:
            self.stop.set()
            ticker.cancel()
            if self.todo:
                await self._settle()
        self.progress.end()
        self.summary.wall_s = time.perf_counter() - t0
        return self.summary

    async def _tick(self) -> None:
        while True:
            self.progress.tick()
            await asyncio.sleep(0.5)

    async def _settle(self) -> None:
        """Wait for the engine to process our closes, so it never calls back into a closed loop."""
        for _ in range(500):
            if self.engine.active_conversations == 0:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0)

    async def _check_speech(self) -> None:
        from omni.types import Error, Text

        conv = await self._open()
        try:
            async for ev in conv.respond([Text("Hi")], modalities=("text", "audio"), max_new_tokens=1, seed=0):
                if isinstance(ev, Error):
                    raise SpeechUnavailable(f"--speak: {ev.message}")
        finally:
            conv.close()

    async def _open(self):
        from streaming.engine import EngineBusy

        deadline = time.monotonic() + 120
        while True:
            try:
                return self.engine.open_conversation(voice=self.o.voice)
            except EngineBusy:  # our last close has not reached the worker yet
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.005)

    async def _consumer(self) -> None:
        while True:
            t = time.perf_counter()
            kind, it, x = await self.q.get()
            if kind == "seg":
                self.summary.waiting_s += time.perf_counter() - t
            if kind == "eof":
                self.eofs += 1
                if self.eofs == self.n_dec:  # everything is decoded and taken: wake the other consumers
                    for _ in range(self.o.batch_size - 1):
                        self.q.put_nowait(("end", None, None))
                    return
                continue
            if kind == "end":
                return
            st = self.state[it]
            if kind == "fail":
                self._fail(it, x)
            elif kind == "seg" and not st.closed:
                st.plan = x[0]
                await self._caption(it, x[1])

    async def _caption(self, it: Item, seg: Segment) -> None:
        from omni.types import AudioDelta, Done, Error, Text, TextDelta

        st = self.state[it]
        prompt = self.prompts[it] or self.default_prompt.format(kind=st.plan.kind)
        if self.captioner and st.plan.kind != "audio":
            return self._fail(it, f"{it.path}: this captioning-only model describes audio only; "
                                  "caption video with a general (instruct or thinking) checkpoint")
        modalities = ("text", "audio") if self.o.speak else ("text",)
        text, pcm, end = [], [], None
        conv = await self._open()
        if self._inflight == 0:
            self._busy_since = time.perf_counter()
        self._inflight += 1
        try:
            async for ev in conv.respond([seg.part] + ([Text(prompt)] if prompt else []), modalities=modalities,
                                         max_new_tokens=self.o.max_new_tokens, seed=self.o.seed):
                if isinstance(ev, TextDelta):
                    if not ev.reasoning:  # a reasoning model's <think> block is not the caption
                        text.append(ev.text)
                elif isinstance(ev, AudioDelta):
                    pcm.append(ev.pcm)
                    st.sample_rate = ev.sample_rate
                elif isinstance(ev, (Done, Error)):
                    end = ev
        finally:
            conv.close()
            self._inflight -= 1
            if self._inflight == 0:
                self.summary.inflight_s += time.perf_counter() - self._busy_since
        if st.closed:  # the item failed elsewhere (a later segment did not decode) while this one ran
            return
        if isinstance(end, Error) or end is None:
            what = f"{end.code}: {end.message}" if end else "no reply"
            where = f" (segment {seg.start:.1f}-{seg.end:.1f} s)" if seg.count > 1 else ""
            return self._fail(it, f"{it.path}{where}: {what}")
        if end.status == "cancelled":
            return self._fail(it, f"{it.path}: caption cancelled ({end.reason})")
        # the segment without its media: an item's finished segments wait here for the rest of it, and holding
        # their frames and sound would make memory grow with the file's length
        st.results[seg.index] = (dataclasses.replace(seg, part=None), "".join(text), pcm, end)
        if len(st.results) == seg.count:
            self._finish(it)

    # -- records --------------------------------------------------------------------------------

    def _base(self, it: Item) -> dict:
        prompt = self.prompts[it]
        return {"key": self.keys[it], "path": it.path, "size": it.size, "mtime_ns": it.mtime_ns,
                "prompt": prompt, "options": self.o.key_options(), "model": self.model_id}

    def _fail(self, it: Item, msg: str) -> None:
        st = self.state[it]
        if st.closed:
            return
        st.closed = True
        self.log.append({**self._base(it), "status": "error", "error": _one_line(msg)})
        self.summary.failed += 1
        self.progress.failed += 1
        self.progress.tick()

    def _finish(self, it: Item) -> None:
        from omni.wav import WavWriter

        st = self.state[it]
        plan = st.plan
        segs = [st.results[i] for i in range(len(st.results))]
        rec = {**self._base(it), "status": "ok", "kind": plan.kind, "duration": plan.duration,
               "has_audio": plan.has_audio}
        if rec["prompt"] is None:
            rec["prompt"] = self.default_prompt.format(kind=plan.kind)
        rec["text"] = "\n".join(t.strip() for _, t, _, _ in segs)
        rec["segments"] = [{"start": s.start, "end": s.end, "text": t, "finish": d.status} for s, t, _, d in segs]
        rec["usage"] = {k: sum(d.usage.get(k, 0) for _, _, _, d in segs)
                        for k in ("prompt_tokens", "completion_tokens")}
        if self.o.speak:
            wav = Path(self.o.speak) / f"{Path(it.path).stem}.{self.keys[it][:8]}.wav"
            try:  # atomic: the WAV is whole before the record says the item is done
                with WavWriter(wav, st.sample_rate) as w:
                    for _, _, pcm, _ in segs:
                        for chunk in pcm:
                            w.write(chunk)
            except OSError as e:
                st.closed = False
                return self._fail(it, f"{wav}: cannot write speech ({e})")
            rec["wav"] = str(wav)
        st.closed = True
        self.log.append(rec)
        st.results.clear()
        self.summary.done += 1
        self.summary.media_seconds += plan.duration
        self.progress.done += 1
        self.progress.tick()

    def subtitles(self) -> None:
        if self.o.format in ("srt", "vtt"):
            recs = [self.log.records[k] for k in self.keys.values() if k in self.log.records]
            self.summary.outputs = [str(p) for p in write_subtitles(recs, self.out, self.o.format)]


class SpeechUnavailable(RuntimeError):
    """--speak with an engine that cannot speak."""


def run_caption(engine, items: list[Item], out: str | Path, options: CaptionOptions = CaptionOptions(),
                model_id: str = "model", progress: TextIO | None = sys.stderr, captioner: bool | None = None,
                log=None) -> Summary:
    """Caption `items` through `engine`, appending to the JSONL `out`; returns the summary (exit
    code in `summary.exit_code`). `engine` is an Engine (max_sessions >= options.batch_size) or a
    function making one, called only when something is left to do (then shut down here).
    captioner: whether the model is a captioning-only one (omni.models.is_captioner); None: the Engine's
    model says. log: where records go instead of `out`'s RecordLog (anything with `records`, `append`,
    `close`, `repaired`: a Ray Data worker collects them for the driver, the only writer of `out`)."""
    if options.speak:
        Path(options.speak).mkdir(parents=True, exist_ok=True)
    if captioner is None:
        captioner = bool(getattr(getattr(engine, "model", None), "captioner", False))
    job = _Job(engine, items, Path(out), options, model_id, progress, captioner, log)
    owned = None
    try:
        if job.todo and not hasattr(engine, "open_conversation"):
            job.engine = owned = engine()
        summary = asyncio.run(job.run())
        job.subtitles()
        return summary
    finally:
        job.log.close()
        if owned is not None:
            owned.shutdown()


# -- command line ---------------------------------------------------------------------------------


def add_parser(subparsers, add_model_args) -> None:
    p = subparsers.add_parser(
        "caption", help="caption many video and audio files (resumable JSONL; srt/vtt)",
        description="Caption video and audio files with the Thinker, batched through the engine. Records go to a "
                    "JSONL, one line per item, exactly once: a rerun (after a crash, too) skips what is done.")
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="files, directories (recursive; media found by content), globs, or manifests (.txt: one "
                        "path per line; .jsonl: {\"path\": ..., \"prompt\": ...})")
    p.add_argument("--out", required=True, metavar="FILE", help="the JSONL of records (appended to; resumable)")
    p.add_argument("--prompt", help=f"the instruction for each item (default: {DEFAULT_PROMPT!r})")
    p.add_argument("--format", choices=["jsonl", "srt", "vtt"], default="jsonl",
                   help="srt/vtt: also write one subtitle file per item beside the JSONL")
    p.add_argument("--segment-seconds", type=float, default=30.0,
                   help="caption long media in segments of this many seconds (0: whole file; default 30)")
    p.add_argument("--fps", type=float, default=VIDEO_FPS, help="video frames sampled per second (default 2)")
    p.add_argument("--max-frames", type=int, default=VIDEO_MAX_FRAMES, help="frames per segment at most")
    p.add_argument("--max-pixels", type=int, default=VIDEO_MAX_PIXELS,
                   help=f"pixels per frame at most (at least {VIDEO_MIN_PIXELS})")
    p.add_argument("--batch-size", type=int, default=4, help="segments captioned at once (default 4)")
    p.add_argument("--decode-workers", type=int, default=2, help="decoder threads (default 2)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--max-context", type=int, default=16384, help="tokens per segment's prompt and caption")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--speak", metavar="DIR", help="also speak each caption: one WAV per item in DIR")
    p.add_argument("--voice", help="voice for --speak (default: the model's default)")
    p.add_argument("--max-speech-seconds", type=float, default=30.0, help="speech per segment at most (default 30)")
    p.add_argument("--retry-failed", action="store_true", help="redo items whose record is an error")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    r = p.add_argument_group("scaling out on Ray Data (pip install -e '.[ray]'; see README \"Scaling out\")")
    r.add_argument("--ray", action="store_true",
                   help="caption on Ray Data: a pool of --workers engines, each batching --batch-size segments; "
                        "this process stays the only writer of --out (exactly once and resume as without --ray); "
                        "without --address a local Ray is started on this machine")
    r.add_argument("--address", metavar="HOST:PORT|auto",
                   help="with --ray: join this Ray cluster (auto: the one `ray start` began on this node); "
                        "default: start a local one on this machine")
    r.add_argument("--workers", type=int, default=1,
                   help="with --ray: engines in the actor pool (one GPU each with --device cuda), default 1")
    r.add_argument("--threads", type=int, default=1,
                   help="with --ray on the CPU: torch threads (and Ray CPUs) per worker (default 1)")
    add_model_args(p)
    p.set_defaults(func=cmd_caption)


def options_from_args(args) -> CaptionOptions:
    from omni.cli import UserError

    if args.fps <= 0:
        raise UserError(f"--fps must be positive; got {args.fps}")
    if args.segment_seconds < 0:
        raise UserError(f"--segment-seconds must be 0 (whole file) or positive; got {args.segment_seconds}")
    if args.max_frames < FRAME_FACTOR:
        raise UserError(f"--max-frames must be at least {FRAME_FACTOR}; got {args.max_frames}")
    if args.max_pixels < VIDEO_MIN_PIXELS:
        raise UserError(f"--max-pixels must be at least {VIDEO_MIN_PIXELS} (the model's minimum frame); "
                        f"got {args.max_pixels}")
    if args.batch_size < 1 or args.decode_workers < 1 or args.max_new_tokens < 1:
        raise UserError("--batch-size, --decode-workers and --max-new-tokens must be at least 1")
    return CaptionOptions(
        prompt=args.prompt, decode=DecodeOptions(args.fps, args.segment_seconds, args.max_frames, args.max_pixels),
        max_new_tokens=args.max_new_tokens, seed=args.seed, speak=Path(args.speak) if args.speak else None,
        voice=args.voice, max_speech_seconds=args.max_speech_seconds, batch_size=args.batch_size,
        decode_workers=args.decode_workers, format=args.format,
        retry_failed=args.retry_failed)


def cmd_caption(args) -> int:
    from omni.cli import UserError, _dtype, resolve_model
    from omni.jobs.inputs import InputError, expand, model_identity
    from omni.jobs.records import LogBusy

    options = options_from_args(args)
    try:
        items, ignored = expand(args.paths)
    except InputError as e:
        raise UserError(str(e)) from None
    if not items:
        raise UserError("nothing to caption: no video or audio files in " + " ".join(args.paths))
    out = Path(args.out)
    if out.suffix.lower() != ".jsonl":
        raise UserError(f"--out must name a .jsonl file; got {out}")
    if args.ray:
        from omni.scale.data import cmd_caption_ray  # Ray is imported only here

        return cmd_caption_ray(args, items, ignored, out, options)
    model_dir = resolve_model(args.model)

    from omni.models import is_captioner, load_model
    from streaming.engine import Engine, EngineConfig

    def engine():
        model = load_model(model_dir, device=args.device, dtype=_dtype(args.dtype), speech=bool(args.speak))
        return Engine(model, EngineConfig(max_sessions=options.batch_size, max_context=args.max_context,
                                          max_new_tokens=options.max_new_tokens,
                                          max_audio_s=options.max_speech_seconds))

    try:
        summary = run_caption(engine, items, out, options, model_identity(model_dir),
                              None if args.quiet else sys.stderr, captioner=is_captioner(model_dir))
    except (LogBusy, SpeechUnavailable) as e:
        raise UserError(str(e)) from None
    summary.ignored = ignored
    print(summary.line(out), file=sys.stderr)
    if summary.outputs:
        print(f"caption: wrote {len(summary.outputs)} {options.format} files beside {out}", file=sys.stderr)
    return summary.exit_code
