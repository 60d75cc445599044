"""`omni bench serve --ray` and `omni bench caption --ray`: 2 replicas (workers) against 1 on this machine,
and what Serve's proxy adds to time to first audio.

serve: a local Ray Serve with 1, then 2 replicas of `omni serve --greedy` (one torch thread each); per
replica `--sessions` Realtime sessions, each `--turns` spoken replies to the same text, all at once;
throughput = speech seconds (and replies) per wall second, from the first response.create to the last
response.done. Greedy and equal prompts make every reply the same work. Then the proxy: one session,
one turn at a time, alternating between the Serve app (1 replica) and a plain `omni serve` process on
the same machine (same flags, one thread): the median time from response.create to the first audio
delta, as the client sees it, each way; the difference is what the proxy (and the replica's actor
process) adds.

caption: `--items` generated files (half H.264/AAC mp4, half MP3) captioned by 1, then 2 workers, each
a fresh pool; items/min over the whole run (worker start-up included) and in steady state (from the
first record to the last).
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TEXT = "Tell me about the sea."


def add_arguments(p) -> None:
    g = p.add_argument_group("omni bench serve|caption --ray (omni/scale/bench.py)")
    g.add_argument("--ray", action="store_true", help="serve, caption: on a local Ray, 2 replicas/workers against 1")
    g.add_argument("--sessions", type=int, default=4, help="serve --ray: sessions per replica (default 4)")
    g.add_argument("--turns", type=int, default=3, help="serve --ray: replies per session (default 3)")
    g.add_argument("--ttfa-turns", type=int, default=12, help="serve --ray: proxy latency samples each way (default 12)")
    g.add_argument("--items", type=int, default=24, help="caption --ray: generated files (default 24)")


def _ensure_ray_env() -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


async def _sessions(ws_url: str, n: int, turns: int, key: str | None = None) -> dict:
    """n sessions at once, `turns` spoken replies each; -> wall, replies, speech seconds, ttfa list."""
    from websockets.asyncio.client import connect

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    ttfa, speech, replies, ready = [], [0.0], [0], []

    opening = asyncio.Lock()  # sessions open one after another, as clients arrive (see README: bursts)

    async def one():
        async with opening:
            ws = await connect(ws_url, additional_headers=headers, max_size=None)
            await _until(ws, "session.created")
            await ws.send(json.dumps({"type": "session.update", "session": {
                "type": "realtime", "output_modalities": ["audio"], "audio": {"input": {"turn_detection": None}}}}))
            await _until(ws, "session.updated")
        ready.append(1)
        async with ws:
            await start.wait()
            for _ in range(turns):
                await ws.send(json.dumps({"type": "conversation.item.create", "item": {
                    "type": "message", "role": "user", "content": [{"type": "input_text", "text": TEXT}]}}))
                t0 = time.perf_counter()
                await ws.send(json.dumps({"type": "response.create"}))
                first = None
                while True:
                    ev = json.loads(await asyncio.wait_for(ws.recv(), 300))
                    if ev["type"] == "response.output_audio.delta" and first is None:
                        first = time.perf_counter() - t0
                    if ev["type"] == "error":
                        raise RuntimeError(f"bench session: {ev['error']}")
                    if ev["type"] == "response.done":
                        break
                ttfa.append(first)
                speech[0] += ev["response"]["usage"].get("output_token_details", {}).get("audio_tokens", 0) / 50.0
                replies[0] += 1

    start = asyncio.Event()
    tasks = [asyncio.create_task(one()) for _ in range(n)]
    try:
        while len(ready) < n:  # every session open and set up before the clock starts
            for t in tasks:
                if t.done():
                    t.result()  # one failed: its error
            await asyncio.sleep(0.05)
        t0 = time.perf_counter()
        start.set()
        await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "replies": replies[0], "speech_s": speech[0], "ttfa": [x for x in ttfa if x is not None]}


async def _round_trips(urls: dict[str, str], n: int) -> dict[str, float]:
    """Median seconds of a small client event and the server's answer (session.update -> session.updated) on
    one open session per url, alternating: the transport's share of any reply's first delta, free of the
    model's compute time (which is what makes time-to-first-audio samples noisy)."""
    from websockets.asyncio.client import connect

    wss = {k: await connect(u, max_size=None) for k, u in urls.items()}
    out: dict[str, list[float]] = {k: [] for k in urls}
    try:
        for ws in wss.values():
            await _until(ws, "session.created")
        for i in range(n):
            for k, ws in wss.items():
                t0 = time.perf_counter()
                await ws.send(json.dumps({"type": "session.update", "session": {
                    "type": "realtime", "instructions": f"Be brief ({i})."}}))
                await _until(ws, "session.updated")
                out[k].append(time.perf_counter() - t0)
    finally:
        for ws in wss.values():
            await ws.close()
    return {k: statistics.median(v) for k, v in out.items()}


async def _until(ws, kind: str) -> dict:
    while True:
        ev = json.loads(await asyncio.wait_for(ws.recv(), 120))
        if ev["type"] == kind:
            return ev
        if ev["type"] == "error":
            raise RuntimeError(f"bench session: {ev['error']}")


def _cpu_by_process() -> dict[str, float]:
    """CPU seconds so far of this machine's Ray processes (by title) and of this one."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            stat = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(d.name) == os.getpid():
            name = "bench client (this process)"
        elif cmd.startswith("ray::"):
            name = cmd.split()[0]
        elif "omni.cli serve" in cmd:
            name = "omni serve"
        else:
            continue
        out[f"{name} [{d.name}]"] = (int(stat[11]) + int(stat[12])) / tick
    return out


def _cpu_delta(before: dict, after: dict) -> dict[str, float]:
    d = {k: round(v - before.get(k, 0.0), 2) for k, v in after.items()}
    return {k: v for k, v in sorted(d.items(), key=lambda kv: -kv[1]) if v >= 0.05}


def _serve_args(replicas: int, sessions: int, port: int):
    from omni.cli import build_parser

    return build_parser().parse_args(
        ["serve", "--ray", "--replicas", str(replicas), "--port", str(port), "--max-sessions", str(sessions),
         "--max-new-tokens", "24", "--max-audio-seconds", "1.5", "--greedy", "--no-ui", "--threads", "1"])


def run_serve_bench(sessions: int = 4, turns: int = 3, ttfa_turns: int = 12, print_fn=print) -> dict:
    _ensure_ray_env()
    import ray
    from ray import serve

    from omni import embedded
    from omni.scale import serve as oserve
    from omni.scale.cluster import connect, free_port

    embedded.ensure()
    connect(None, "127.0.0.1", num_cpus=4)
    res: dict = {"sessions_per_replica": sessions, "turns": turns, "runs": []}
    try:
        port = free_port("127.0.0.1")
        for replicas in (1, 2):
            info = oserve.deploy(_serve_args(replicas, sessions, port))
            ws = info["url"].replace("http", "ws", 1) + "/v1/realtime?model=omni"
            asyncio.run(_sessions(ws, 1, 1))  # warm-up: first-call allocations in every replica alike
            if replicas == 2:
                asyncio.run(_sessions(ws, 2, 1))
            cpu0 = _cpu_by_process()
            r = asyncio.run(_sessions(ws, sessions * replicas, turns))
            cpu = _cpu_delta(cpu0, _cpu_by_process())
            row = {"replicas": replicas, "wall_s": round(r["wall_s"], 2), "replies": r["replies"],
                   "speech_s": round(r["speech_s"], 2), "speech_s_per_s": round(r["speech_s"] / r["wall_s"], 3),
                   "replies_per_min": round(60 * r["replies"] / r["wall_s"], 1),
                   "ttfa_median_s": round(statistics.median(r["ttfa"]), 3) if r["ttfa"] else None,
                   "cpu_s": cpu, "load_avg_1m": os.getloadavg()[0]}
            res["runs"].append(row)
            print_fn(f"serve --ray x{replicas}: {row['replies']} replies ({row['speech_s']} s of speech) in "
                     f"{row['wall_s']} s: {row['speech_s_per_s']} speech s/s, {row['replies_per_min']} replies/min, "
                     f"median time to first audio {row['ttfa_median_s']} s\n  CPU seconds in that time: "
                     + ", ".join(f"{k} {v}" for k, v in cpu.items()))
            oserve.undeploy(info["apps"])  # each configuration starts from nothing (no rolling update under load)
        one, two = res["runs"]
        res["speedup"] = round(two["speech_s_per_s"] / one["speech_s_per_s"], 2)
        # the proxy: 1 replica through Serve against one plain `omni serve` process, alternating
        info = oserve.deploy(_serve_args(1, sessions, port))
        ws_serve = info["url"].replace("http", "ws", 1) + "/v1/realtime?model=omni"
        direct_port = free_port("127.0.0.1")
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen([sys.executable, "-m", "omni.cli", "serve", "--port", str(direct_port), "--no-ui",
                                 "--max-sessions", str(sessions), "--max-new-tokens", "24", "--max-audio-seconds",
                                 "1.5", "--greedy"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
        try:
            ws_direct = f"ws://127.0.0.1:{direct_port}/v1/realtime?model=omni"
            _wait_http(f"http://127.0.0.1:{direct_port}/healthz", proc)
            samples = {"serve": [], "direct": []}
            for url in (ws_serve, ws_direct):  # warm-up each
                asyncio.run(_sessions(url, 1, 1))
            for _ in range(ttfa_turns):
                for name, url in (("serve", ws_serve), ("direct", ws_direct)):
                    samples[name] += asyncio.run(_sessions(url, 1, 1))["ttfa"]
            med = {k: statistics.median(v) for k, v in samples.items()}
            rt = asyncio.run(_round_trips({"serve": ws_serve, "direct": ws_direct}, 200))
            res["ttfa"] = {"serve_median_s": round(med["serve"], 4), "direct_median_s": round(med["direct"], 4),
                           "proxy_added_ms": round(1000 * (med["serve"] - med["direct"]), 1), "samples": ttfa_turns,
                           "round_trip_serve_ms": round(1000 * rt["serve"], 2),
                           "round_trip_direct_ms": round(1000 * rt["direct"], 2),
                           "round_trip_added_ms": round(1000 * (rt["serve"] - rt["direct"]), 2)}
            print_fn(f"one event and its answer (session.update), medians of 200: through Serve "
                     f"{1000 * rt['serve']:.2f} ms, plain omni serve {1000 * rt['direct']:.2f} ms: the proxy adds "
                     f"{res['ttfa']['round_trip_added_ms']:.2f} ms to every client-to-server-to-client trip")
            print_fn(f"time to first audio, one session: through Serve {1000 * med['serve']:.1f} ms, plain omni serve "
                     f"{1000 * med['direct']:.1f} ms (medians of {ttfa_turns}): the proxy adds "
                     f"{res['ttfa']['proxy_added_ms']:.1f} ms")
        finally:
            proc.terminate()
            proc.wait(30)
            oserve.undeploy(info["apps"])
        res["targets"] = [
            {"what": "2 replicas' speech per wall second >= 1.7 x one's", "value": f"{res['speedup']}x",
             "met": res["speedup"] >= 1.7},
            {"what": "Serve's proxy adds <= 20 ms to time to first audio (medians of whole turns: noisy)",
             "value": f"{res['ttfa']['proxy_added_ms']} ms", "met": res["ttfa"]["proxy_added_ms"] <= 20},
            {"what": "... and to the round trip a first audio delta rides on (response.create in, delta out)",
             "value": f"{res['ttfa']['round_trip_added_ms']} ms", "met": res["ttfa"]["round_trip_added_ms"] <= 20}]
        return res
    finally:
        serve.shutdown()
        ray.shutdown()


def _wait_http(url: str, proc, timeout: float = 120) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"omni serve exited: {proc.stderr.read()[-2000:]}")
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            time.sleep(0.25)
    raise RuntimeError(f"{url} did not answer in {timeout:.0f} s")


def run_caption_bench_ray(items: int = 24, seconds: float = 4.0, max_new_tokens: int = 32, batch_size: int = 4,
                          print_fn=print) -> dict:
    _ensure_ray_env()
    import ray

    from omni import embedded
    from omni.jobs.caption import CaptionOptions
    from omni.jobs.caption_bench import make_media
    from omni.jobs.inputs import Item, model_identity
    from omni.scale.cluster import connect
    from omni.scale.data import WorkerSpec, run_caption_ray

    model_dir = embedded.ensure()
    connect(None, "127.0.0.1", num_cpus=4)
    res: dict = {"items": items, "seconds": seconds, "max_new_tokens": max_new_tokens, "batch_size": batch_size,
                 "runs": []}
    try:
        with tempfile.TemporaryDirectory(prefix="omni-bench-caption-ray-") as tmp:
            files = make_media(Path(tmp) / "media", items, seconds)
            opts = CaptionOptions(max_new_tokens=max_new_tokens, batch_size=batch_size)
            spec = WorkerSpec(None, "cpu", None, 1, opts, 16384, model_identity(model_dir), False)
            for workers in (1, 2):
                times = []
                t0 = time.perf_counter()
                s, stats = run_caption_ray([Item.at(str(p)) for p in files], Path(tmp) / f"w{workers}.jsonl", opts,
                                           spec, workers, progress=None,
                                           on_record=lambda rec: times.append(time.perf_counter()))
                wall = time.perf_counter() - t0
                steady = 60 * (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else None
                row = {"workers": workers, "done": s.done, "failed": s.failed, "wall_s": round(wall, 2),
                       "items_per_min": round(60 * (s.done + s.failed) / wall, 1),
                       "steady_items_per_min": round(steady, 1) if steady else None,
                       "worker_peak_rss_mb": round(stats.peak_rss_mb)}
                res["runs"].append(row)
                print_fn(f"caption --ray x{workers}: {row['done']} done, {row['failed']} failed in {row['wall_s']} s: "
                         f"{row['items_per_min']} items/min overall (worker start-up included), "
                         f"{row['steady_items_per_min']} items/min from the first record to the last; worker peak RSS "
                         f"{row['worker_peak_rss_mb']} MB")
        one, two = res["runs"]
        res["speedup"] = round(two["items_per_min"] / one["items_per_min"], 2)
        res["steady_speedup"] = (round(two["steady_items_per_min"] / one["steady_items_per_min"], 2)
                                 if one["steady_items_per_min"] and two["steady_items_per_min"] else None)
        res["targets"] = [{"what": "2 workers' items/min >= 1.7 x one's (whole run)", "value": f"{res['speedup']}x",
                           "met": res["speedup"] >= 1.7}]
        return res
    finally:
        ray.shutdown()


def cmd_bench_ray(args) -> int:
    import torch

    from omni.cli import UserError

    torch.set_num_threads(args.threads)
    if args.what == "serve":
        res = run_serve_bench(args.sessions, args.turns, args.ttfa_turns)
    elif args.what == "caption":
        res = run_caption_bench_ray(args.items)
    else:
        raise UserError(f"--ray benchmarks serve or caption; got {args.what!r}")
    print("\ntargets:")
    for t in res["targets"]:
        print(f"  [{'ok' if t['met'] else 'MISSED'}] {t['what']}: {t['value']}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0
