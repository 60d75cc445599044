"""`omni caption --ray`: captioning on Ray Data, an actor pool of engines, this process the only writer.

    omni caption --ray [--address auto] --workers 8 --model DIR media/ --out captions.jsonl

The driver (this process) opens the record log, works out what is left exactly as `omni caption` does
(omni/jobs/caption.py's _Job: keys, resume, --retry-failed), and hands Ray Data only those items. Each
worker is one actor with its own engine (one GPU each on CUDA, `--threads` CPUs otherwise) and runs
the unchanged single-machine job on its batch of items (decoder threads ahead of the engine, up to
--batch-size segments batched in one decode step), with a record log in memory: its records come back
to the driver as rows, and the driver appends each one (one write, fsync) unless a record of that key
was already written. So:
  - a killed worker: Ray restarts the actor and retries its batch; nothing of the batch had reached
    the log (a worker writes nothing), and a record that comes twice is written once;
  - a killed driver: the log holds whole records up to the kill (a half line is cut off on open), and a
    rerun hands out only what is missing.
Long media stream (omni/jobs/decode.py with omni.media.AudioCursor): a worker holds one segment of
pictures and sound, not the whole sound track.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from omni.jobs.caption import CaptionOptions, Summary, _Job, run_caption
from omni.jobs.inputs import Item

log = logging.getLogger("omni.ray")


@dataclass(frozen=True)
class WorkerSpec:
    model: str | None  # --model as given (an embedded model is built on each node from its name)
    device: str
    dtype: str | None
    threads: int  # torch threads on the CPU
    options: CaptionOptions
    max_context: int
    model_id: str  # omni.jobs.inputs.model_identity, so keys equal the driver's
    captioner: bool


class MemoryLog:
    """A record log that keeps the records (a worker's: the driver writes them)."""

    repaired = 0

    def __init__(self):
        self.records: dict[str, dict] = {}
        self.order: list[dict] = []

    def append(self, record: dict) -> None:
        self.records[record["key"]] = record
        self.order.append(record)

    def close(self) -> None:
        pass


def _vm(field: str) -> int:
    """/proc/self/status VmRSS or VmHWM, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> bool:
    """Start VmHWM over at the current RSS (Linux: clear_refs 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _fixed_mmap_threshold(size: int = 1 << 20) -> None:
    """Serve big buffers from mmap, returned to the system when freed. glibc raises its mmap threshold each
    time such a buffer is freed, after which segment-sized arrays (7.7 MB per 2 minutes of sound) come from
    the per-thread heaps, where the decoder and engine threads fragment them: measured on a 30-minute file,
    RSS crept up by ~200 MB over the segments with the default and stayed flat with a fixed threshold."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, size)  # M_MMAP_THRESHOLD; a fixed value turns the adjusting off
    except (OSError, AttributeError):
        pass  # not glibc


class CaptionWorker:
    """One engine in Ray Data's actor pool; a call captions a batch of items and returns their records."""

    def __init__(self, spec: WorkerSpec):
        import torch

        from omni.cli import _dtype, resolve_model
        from omni.models import load_model
        from streaming.engine import Engine, EngineConfig

        _fixed_mmap_threshold()
        if spec.device == "cpu":
            torch.set_num_threads(spec.threads)
        o = spec.options
        model = load_model(resolve_model(spec.model), device=spec.device, dtype=_dtype(spec.dtype),
                           speech=bool(o.speak))
        self.engine = Engine(model, EngineConfig(max_sessions=o.batch_size, max_context=spec.max_context,
                                                 max_new_tokens=o.max_new_tokens, max_audio_s=o.max_speech_seconds))
        self.spec = spec

    def __call__(self, batch: dict) -> dict:
        items = [Item(**json.loads(x)) for x in batch["item"]]
        sink = MemoryLog()
        rss0 = _vm("VmRSS")
        reset = _reset_peak()
        s = self.spec
        run_caption(self.engine, items, Path(os.devnull), s.options, s.model_id, progress=None,
                    captioner=s.captioner, log=sink)
        peak = _vm("VmHWM") / 2**20 if reset else float("nan")  # the most RSS reached during this call
        recs = sink.order
        return {"key": [r["key"] for r in recs], "record": [json.dumps(r, ensure_ascii=False) for r in recs],
                "peak_rss_mb": [round(peak, 1)] * len(recs),
                "peak_rss_growth_mb": [round(peak - rss0 / 2**20, 1)] * len(recs),
                "worker_pid": [os.getpid()] * len(recs)}

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


@dataclass
class RayStats:
    workers: int = 0
    peak_rss_mb: float = 0.0  # the most RSS a worker reached while captioning (its model and engine included)
    peak_rss_growth_mb: float = 0.0  # the most a worker's RSS rose over a call's start while captioning it
    peak_rss_by_path: dict | None = None  # item path -> the peak RSS of the call that captioned it
    worker_pids: set | None = None
    duplicates: int = 0  # records that came back twice (a retried batch) and were written once


def run_caption_ray(items: list[Item], out: str | Path, options: CaptionOptions, spec: WorkerSpec, workers: int,
                    progress: TextIO | None = sys.stderr, items_per_call: int | None = None,
                    on_record=None) -> tuple[Summary, RayStats]:
    """Caption `items` on the Ray cluster this process is connected to; the JSONL `out` is written here
    only. items_per_call: items per worker call (default --batch-size: a killed worker redoes at most
    that many). on_record(record): tests, called after each record is written."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    from omni.scale.cluster import thread_env

    if options.speak:
        Path(options.speak).mkdir(parents=True, exist_ok=True)
    job = _Job(None, items, Path(out), options, spec.model_id, progress, spec.captioner)
    stats = RayStats(workers=workers, worker_pids=set(), peak_rss_by_path={})
    t0 = job.progress.t0 = time.perf_counter()
    try:
        if job.todo:
            ctx = DataContext.get_current()
            ctx.enable_progress_bars = False
            ctx.print_on_execution_start = False
            rows = [{"item": json.dumps({"path": it.path, "prompt": it.prompt, "size": it.size,
                                         "mtime_ns": it.mtime_ns})} for it in job.todo]
            per = items_per_call or options.batch_size
            cuda = str(spec.device).startswith("cuda")
            ds = ray.data.from_items(rows, override_num_blocks=max(1, -(-len(rows) // per)))
            ds = ds.map_batches(CaptionWorker, fn_constructor_args=(spec,), batch_size=per,
                                # one call at a time per worker: a call lasts seconds to minutes, and calls queued
                                # on a busy worker would leave another idle at the end of the job
                                compute=ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=1),
                                num_cpus=1 if cuda else spec.threads, num_gpus=1 if cuda else 0,
                                runtime_env={"env_vars": thread_env(1 if cuda else spec.threads)})
            written: set[str] = set()
            for row in ds.iter_rows():
                rec = json.loads(row["record"])
                stats.peak_rss_mb = max(stats.peak_rss_mb, float(row["peak_rss_mb"]))
                stats.peak_rss_growth_mb = max(stats.peak_rss_growth_mb, float(row["peak_rss_growth_mb"]))
                stats.worker_pids.add(int(row["worker_pid"]))
                stats.peak_rss_by_path[rec["path"]] = float(row["peak_rss_mb"])
                if rec["key"] in written:
                    stats.duplicates += 1
                    continue
                written.add(rec["key"])
                job.log.append(rec)
                if rec.get("status") == "ok":
                    job.summary.done += 1
                    job.summary.media_seconds += rec.get("duration") or 0.0
                    job.progress.done += 1
                else:
                    job.summary.failed += 1
                    job.progress.failed += 1
                job.progress.tick()
                if on_record is not None:
                    on_record(rec)
        job.progress.end()
        job.summary.wall_s = time.perf_counter() - t0
        job.subtitles()
        return job.summary, stats
    finally:
        job.log.close()


def cmd_caption_ray(args, items: list[Item], ignored: int, out: Path, options: CaptionOptions) -> int:
    from omni.cli import UserError, resolve_model
    from omni.jobs.inputs import model_identity
    from omni.jobs.records import LogBusy
    from omni.models import is_captioner
    from omni.scale.cluster import connect

    if args.workers < 1 or args.threads < 1:
        raise UserError("--workers and --threads must be at least 1")
    model_dir = resolve_model(args.model)
    spec = WorkerSpec(args.model, args.device, args.dtype, args.threads, options, args.max_context,
                      model_identity(model_dir), is_captioner(model_dir))
    cuda = str(args.device).startswith("cuda")
    # a local Ray declares room for the pool and Ray Data's read task (with fewer CPUs on 2 cores they deadlock)
    started = connect(args.address, "127.0.0.1",
                      num_cpus=None if cuda else max(os.cpu_count() or 1, args.workers * args.threads + 2))
    import ray

    try:
        summary, stats = run_caption_ray(items, out, options, spec, args.workers, None if args.quiet else sys.stderr)
    except LogBusy as e:
        raise UserError(str(e)) from None
    finally:
        if started:
            ray.shutdown()
    summary.ignored = ignored
    print(summary.line(out) + f" [{args.workers} Ray workers]", file=sys.stderr)
    if summary.outputs:
        print(f"caption: wrote {len(summary.outputs)} {options.format} files beside {out}", file=sys.stderr)
    return summary.exit_code
