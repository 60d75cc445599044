"""`omni bench`: transformers' reference against our engine, side by side in one process.

For each checkpoint (the embedded default and a generated ~107 M-parameter "small" one), on the
same input (an image, 5 s of speech-like audio, a question) with lengths forced equal (text
tokens and codec tokens):
  1. transformers' `generate` with audio output (one WAV at the end);
  2. our engine, one conversation;
  3. our engine, 4 and 8 concurrent conversations;
our engine in each placement (--placements): `one` (one worker runs every stage, --threads torch threads),
`one-2x` (the same with twice the threads) and `split` (the speech decoder on a worker of its own, --threads
each: as many cores as one-2x); and, on the small checkpoint, the Thinker's decode step against the memory-bandwidth floor.
The reference and the one-conversation run alternate `--repeat` times and the fastest of each is
reported. Prints a table and writes --json.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path


def add_parser(sub, add_model_args) -> None:
    p = sub.add_parser("bench", help="benchmark the engine against transformers' reference",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("what", nargs="?", choices=["engine", "caption", "qwen3", "serve"], default="engine",
                   help="engine: against transformers (default); caption: captioning throughput; "
                        "serve --ray / caption --ray: 2 Ray Serve replicas / Ray Data workers against 1; "
                        "qwen3: Qwen3-Omni's Thinker against transformers at the tiny and moe100m shapes "
                        "(--configs tiny,moe100m); with --speech, speaking: generate with audio out against our engine")
    p.add_argument("--json", metavar="PATH", help="write the results here")
    p.add_argument("--configs", default="default,small", help="embedded sizes to run (default: default,small)")
    p.add_argument("--text-tokens", type=int, default=64)
    p.add_argument("--speech-seconds", type=float, default=10.0)
    p.add_argument("--concurrency", default="1,4,8", help="engine runs (default 1,4,8)")
    p.add_argument("--concurrency-small", default="1,4",
                   help="engine runs on the small config, whose DiT alone is slower than real time on a CPU core "
                        "(default 1,4)")
    p.add_argument("--placements", default="one,one-2x,split",
                   help="engine placements to run, each at every level: one (one worker, --threads), one-2x (one "
                        "worker, twice the threads), split (the speech decoder on its own worker, --threads each) "
                        "(default: all three)")
    p.add_argument("--no-reference", action="store_true", help="skip transformers' reference run")
    p.add_argument("--speech", action="store_true",
                   help="qwen3: speech instead of text: time to first audio, total, RTF and speech-seconds per "
                        "wall-second with a per-stage profile; --text-tokens reply tokens (default there 16) and "
                        "--speech-seconds of speech (default there 2: 25 frames) forced on both sides")
    p.add_argument("--repeat", type=int, default=2,
                   help="the reference and the one-conversation run alternate this many times; the fastest of each "
                        "is reported (the first pays one-time set-up: kernel selection, allocations) (default 2)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1); the engine rows: per worker (see --placements)")
    g = p.add_argument_group("published shapes with random weights (omni/bench_shapes.py)")
    g.add_argument("--shape", metavar="NAME", help="qwen2.5-omni-3b, qwen2.5-omni-7b or qwen3-omni-30b-a3b: build it "
                   "on --device with random weights and measure it (concurrency default 1,4,8,16; --dtype of the Thinker and "
                   "Talker default bfloat16 on every device, Token2Wav and Code2Wav float32)")
    g.add_argument("--stages", help="a subset of thinker,talker,token2wav,ttfa (Qwen3: thinker,talker,code2wav,ttfa)")
    g.add_argument("--dry", action="store_true", help="the same steps at the family's tiny test shape")
    g.add_argument("--prompt-tokens", type=int, default=2048, help="multimodal prompt rows (default 2048)")
    g.add_argument("--steps", type=int, default=16, help="timed decode steps per level (default 16)")
    from omni.scale.bench import add_arguments  # imports no Ray

    add_arguments(p)
    add_model_args(p)
    p.set_defaults(func=cmd_bench)


def _inputs():
    import numpy as np

    from omni.types import Audio, Image, Text

    y, x = np.mgrid[0:224, 0:224]
    img = np.stack([x, y, (x + y) // 2], -1).astype(np.uint8)
    t = np.arange(5 * 16000) / 16000
    f0 = 140 + 30 * np.sin(2 * np.pi * 0.5 * t)  # a voiced, gliding pitch with syllable-rate envelope
    voiced = sum(np.sin(2 * np.pi * k * np.cumsum(f0) / 16000) / k for k in range(1, 12))
    audio = (0.3 * voiced * (0.55 + 0.45 * np.sin(2 * np.pi * 3.5 * t))).astype(np.float32)
    return [Image(img), Audio(audio), Text("What do you see and hear? Answer in detail.")]


def _run_reference(path: Path, prompt, n_text: int, n_codes: int) -> dict:
    import torch
    from transformers import Qwen2_5OmniForConditionalGeneration

    ref = Qwen2_5OmniForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    feats, mask = prompt.padded_audio()
    talker_eos = [ref.config.talker_config.tts_codec_pad_token_id, ref.config.talker_config.tts_codec_end_token_id]
    kw = dict(input_ids=prompt.input_ids[None], attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
              thinker_pixel_values=prompt.pixel_values, image_grid_thw=prompt.image_grid_thw,
              input_features=feats, feature_attention_mask=mask)
    t0 = time.perf_counter()
    with torch.no_grad():
        _, wav = ref.generate(**kw, generation_mode="audio", speaker="Chelsie", thinker_max_new_tokens=n_text,
                              thinker_min_new_tokens=n_text, talker_max_new_tokens=n_codes,
                              talker_min_new_tokens=n_codes, talker_eos_token_id=talker_eos)
    wall = time.perf_counter() - t0
    audio_s = wav.numel() / 24000
    return {"run": "transformers", "conversations": 1, "ttft_s": None, "ttfa_s": wall, "total_s": wall,
            "audio_s": audio_s, "rtf": wall / audio_s, "text_tok_s": n_text / wall, "codec_tok_s": n_codes / wall}


PLACEMENTS = {"one": ("", lambda t: dict(speech_worker=False, threads=t)),
              "one-2x": (" 2x threads", lambda t: dict(speech_worker=False, threads=2 * t)),
              "split": (" speech worker", lambda t: dict(speech_worker=True, threads=2 * t, speech_threads=t))}


def _run_engine(model, parts, n_text: int, n_codes: int, n_conv: int, placement: str = "one",
                threads: int = 1) -> dict:
    import asyncio

    from omni.types import AudioDelta, Done, Error
    from streaming.engine import Engine, EngineConfig

    suffix, config = PLACEMENTS[placement]
    eng = Engine(model, EngineConfig(max_sessions=n_conv, max_context=4096, max_new_tokens=n_text,
                                     max_codes=n_codes, events_buffered=10_000, **config(threads)))

    async def one(conv, i):
        t0 = time.perf_counter()
        ttft = ttfa = None
        samples = 0
        async for ev in conv.respond(parts, modalities=("text", "audio"), seed=i, min_new_tokens=n_text,
                                     min_codes=n_codes):
            if ttft is None and not isinstance(ev, (Done, Error)):
                ttft = time.perf_counter() - t0
            if isinstance(ev, AudioDelta):
                ttfa = ttfa or time.perf_counter() - t0
                samples += len(ev.pcm) // 2
            elif isinstance(ev, Error):
                raise RuntimeError(ev.message)
            elif isinstance(ev, Done):
                done = ev
        return dict(ttft=ttft, ttfa=ttfa, total=time.perf_counter() - t0, audio=samples / 24000,
                    text=done.usage["completion_tokens"], codes=done.usage["codec_tokens"],
                    text_time=done.timings["time_to_first_token_s"])

    async def main():
        convs = [eng.open_conversation() for _ in range(n_conv)]
        t0 = time.perf_counter()
        res = await asyncio.gather(*(one(c, i) for i, c in enumerate(convs)))
        return res, time.perf_counter() - t0

    try:
        res, wall = asyncio.run(main())
    finally:
        eng.shutdown()
    stats = eng.stats()
    audio = sum(r["audio"] for r in res)
    ttfas = sorted(r["ttfa"] for r in res)
    out = {"run": f"omni x{n_conv}{suffix}", "conversations": n_conv, "placement": placement,
           "busy_s": {f"{b['stage']}@{b['worker']}": round(b["s"], 3) for b in stats["busy"]},
           "ttft_s": statistics.median(r["ttft"] for r in res), "ttfa_s": statistics.median(ttfas),
           "total_s": wall, "audio_s": audio / n_conv, "rtf": wall / (audio / n_conv),
           "text_tok_s": sum(r["text"] for r in res) / wall, "codec_tok_s": sum(r["codes"] for r in res) / wall,
           "speech_s_per_wall_s": audio / wall}
    if n_conv > 1:
        out["ttfa_p50_s"] = ttfas[len(ttfas) // 2]
        out["ttfa_p95_s"] = ttfas[min(len(ttfas) - 1, round(0.95 * (len(ttfas) - 1)))]
    return out


def _bandwidth_gbs() -> float:
    """Memory bandwidth as this machine gives torch, 256 MiB buffers: the higher (stricter floor) of
    a copy (bytes read + written) and a read-only sum, best of 5 each."""
    import torch

    a = torch.ones(64 * 2**20)  # 256 MiB of fp32
    b = torch.empty_like(a)
    best = {}
    for name, fn, nbytes in (("copy", lambda: b.copy_(a), 2 * a.numel() * 4), ("read", a.sum, a.numel() * 4)):
        fn()
        t = min(_timed(fn) for _ in range(5))
        best[name] = nbytes / t / 1e9
    return max(best.values())


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _decode_step(model, steps: int = 64, rounds: int = 3) -> dict:
    """The Thinker's B=1 decode step against the floor: the weights it must read ÷ bandwidth.

    The step is the median of `steps` steps, best of `rounds` rounds (as the bandwidth is a best of 5)."""
    import torch

    th = model.thinker
    dec = th.model
    weight_bytes = sum(p.numel() * p.element_size() for n, p in dec.named_parameters() if not n.startswith("embed"))
    weight_bytes += th.lm_head.weight.numel() * th.lm_head.weight.element_size()
    cache = dec.allocate_cache(1, steps + 64)
    slot = torch.zeros(1, dtype=torch.long)
    tok = torch.zeros(1, 1, dtype=torch.long)
    medians = []
    with torch.inference_mode():
        for _ in range(rounds):
            cache.reset(0)
            dec(dec.embed_tokens(torch.zeros(1, 32, dtype=torch.long)), torch.arange(32).expand(3, 1, 32), cache, slot)
            times = []
            for i in range(steps):
                t0 = time.perf_counter()
                h = th(dec.embed_tokens(tok), torch.full((3, 1, 1), 32 + i), cache, slot)
                tok = th.lm_head(h[:, -1]).argmax(-1, keepdim=True)
                times.append(time.perf_counter() - t0)
            medians.append(statistics.median(times))
    bw = _bandwidth_gbs()
    step = min(medians)
    floor = weight_bytes / (bw * 1e9)
    return {"weight_mb": weight_bytes / 1e6, "bandwidth_gb_s": bw, "floor_ms": floor * 1e3, "step_ms": step * 1e3,
            "ratio": step / floor}


def _table(rows: list[dict]) -> str:
    cols = [("config", "{}"), ("run", "{}"), ("ttft_s", "{:.3f}"), ("ttfa_s", "{:.3f}"), ("total_s", "{:.2f}"),
            ("audio_s", "{:.2f}"), ("rtf", "{:.3f}"), ("text_tok_s", "{:.1f}"), ("codec_tok_s", "{:.1f}"),
            ("speech_s_per_wall_s", "{:.3f}"), ("ttfa_p50_s", "{:.3f}"), ("ttfa_p95_s", "{:.3f}")]
    cells = [[c for c, _ in cols]] + [[f.format(r[c]) if r.get(c) is not None else "-" for c, f in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines = ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def cmd_bench(args) -> int:
    if getattr(args, "ray", False) or args.what == "serve":
        from omni.scale.bench import cmd_bench_ray  # Ray is imported only here

        return cmd_bench_ray(args)
    import torch

    if args.shape:
        from omni.bench_shapes import report, run_shape

        torch.set_num_threads(args.threads)
        conc = "1,4,8,16" if args.concurrency == "1,4,8" else args.concurrency  # the shape bench's own default
        args.levels = [int(x) for x in conc.split(",") if x]
        args.stages = [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else None
        args.dtype = getattr(torch, args.dtype or "bfloat16")
        res = run_shape(args.shape, args)
        print(report(res))
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=2))
        return 0

    if args.what == "caption":
        from omni.cli import resolve_model
        from omni.jobs.caption_bench import run_caption_bench

        torch.set_num_threads(args.threads)
        rows = run_caption_bench(resolve_model(args.model), device=args.device, print_fn=print)
        if args.json:
            Path(args.json).write_text(json.dumps({"caption": rows}, indent=2))
        return 0

    if args.what == "qwen3":
        from omni.bench_qwen3 import print_report, run_qwen3_bench

        torch.set_num_threads(args.threads)
        shapes = [s for s in args.configs.split(",") if s] if args.configs != "default,small" else ["tiny", "moe100m"]
        if args.speech:
            from omni.bench_qwen3 import print_speech_report, run_qwen3_speech_bench

            n_text = 16 if args.text_tokens == 64 else args.text_tokens  # the speech bench's own defaults
            frames = 25 if args.speech_seconds == 10.0 else max(1, round(args.speech_seconds * 12.5))
            res = run_qwen3_speech_bench(shapes, n_text, frames, [int(x) for x in args.concurrency.split(",") if x],
                                         repeat=args.repeat, reference=not args.no_reference)
            print_speech_report(res)
            if args.json:
                Path(args.json).write_text(json.dumps({**res, "settings": {
                    "text_tokens": n_text, "frames": frames, "threads": args.threads, "repeat": args.repeat}},
                    indent=2))
            return 0
        res = run_qwen3_bench(shapes, args.text_tokens, [int(x) for x in args.concurrency.split(",") if x],
                              reference=not args.no_reference)
        print_report(res)
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=2))
        return 0

    from omni import embedded
    from omni.pipeline import OmniModel
    from omni.types import Message

    torch.set_num_threads(args.threads)
    n_codes = int(args.speech_seconds * 50)
    parts = _inputs()
    placements = [p.strip() for p in args.placements.split(",") if p.strip()]
    if unknown := [p for p in placements if p not in PLACEMENTS]:
        print(f"omni bench: unknown placement {', '.join(unknown)} (one of {', '.join(PLACEMENTS)})", file=sys.stderr)
        return 2
    rows, extra = [], {}
    sizes = [s.strip() for s in args.configs.split(",") if s.strip()]
    for size in sizes:
        path = Path(args.model) if args.model and size == "model" else embedded.ensure(size=size)
        print(f"omni bench: {size} ({path})", file=sys.stderr)
        model = OmniModel.load(path, device=args.device, speech=True)
        prompt = model.processor([Message("user", parts)])
        levels = [int(x) for x in (args.concurrency_small if size == "small" else args.concurrency).split(",") if x]
        best: dict[str, dict] = {}

        def keep(row: dict) -> None:
            runs = best.get(row["run"], {}).get("runs", 0) + 1
            if row["run"] not in best or row["total_s"] < best[row["run"]]["total_s"]:
                best[row["run"]] = {"config": size, **row}
            best[row["run"]]["runs"] = runs
            print(f"  {row['run']}: {row['total_s']:.2f} s", file=sys.stderr)

        reference = not args.no_reference
        for _ in range(max(1, args.repeat)):  # alternate, so a drift in machine speed hits both sides alike
            if reference:
                try:
                    keep(_run_reference(path, prompt, args.text_tokens, n_codes))
                except ImportError:
                    reference = False
                    print("  transformers is not installed: no reference column (pip install -e '.[test]')",
                          file=sys.stderr)
            if 1 in levels:
                for pl in placements:
                    keep(_run_engine(model, parts, args.text_tokens, n_codes, 1, pl, args.threads))
        for n in levels:
            if n != 1:
                for pl in placements:
                    keep(_run_engine(model, parts, args.text_tokens, n_codes, n, pl, args.threads))
        rows += best.values()
        if size == "small":
            extra["small_decode_step"] = _decode_step(model)
    targets = _targets(rows, extra)
    print(_table(rows))
    print("\nbusy seconds per stage (stage@worker):")
    for r in rows:
        if r.get("busy_s"):
            print(f"  {r['config']} {r['run']}: " + ", ".join(f"{k} {v:.2f}" for k, v in r["busy_s"].items()))
    if "small_decode_step" in extra:
        d = extra["small_decode_step"]
        print(f"\nsmall Thinker decode step: {d['step_ms']:.2f} ms; floor {d['floor_ms']:.2f} ms "
              f"({d['weight_mb']:.0f} MB of weights at {d['bandwidth_gb_s']:.1f} GB/s) -> {d['ratio']:.2f}x the floor")
    print("\ntargets:")
    for t in targets:
        print(f"  [{'ok' if t['met'] else 'MISSED'}] {t['what']}: {t['value']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, **extra, "targets": targets,
                                               "settings": {"text_tokens": args.text_tokens, "codes": n_codes,
                                                            "threads": args.threads, "repeat": args.repeat}},
                                              indent=2))
    return 0


def _targets(rows: list[dict], extra: dict) -> list[dict]:
    out = []
    for cfg in sorted({r["config"] for r in rows}):
        by = {r["run"]: r for r in rows if r["config"] == cfg}
        ref, one = by.get("transformers"), by.get("omni x1")
        if ref and one:
            out.append({"what": f"{cfg}: total wall, one conversation <= 0.5 x reference",
                        "value": f"{one['total_s'] / ref['total_s']:.2f}x", "met": one["total_s"] <= 0.5 * ref["total_s"]})
            out.append({"what": f"{cfg}: time to first audio <= 0.15 x reference total",
                        "value": f"{one['ttfa_s'] / ref['total_s']:.3f}x", "met": one["ttfa_s"] <= 0.15 * ref["total_s"]})
        for suffix, _ in PLACEMENTS.values():
            eight = by.get(f"omni x8{suffix}")
            if one and eight:
                ratio = eight["speech_s_per_wall_s"] / one["speech_s_per_wall_s"]
                out.append({"what": f"{cfg}: 8 conversations' speech per wall second{suffix} >= 3 x one's (one "
                                    "worker)", "value": f"{ratio:.2f}x", "met": ratio >= 3})
        split = by.get("omni x1 speech worker")
        if one and split:
            out.append({"what": f"{cfg}: one conversation's time to first audio with the speech worker <= one "
                                "worker's", "value": f"{split['ttfa_s']:.3f} s vs {one['ttfa_s']:.3f} s",
                        "met": split["ttfa_s"] <= one["ttfa_s"]})
    if "small_decode_step" in extra:
        r = extra["small_decode_step"]["ratio"]
        out.append({"what": "small: Thinker decode step <= 2 x bandwidth floor", "value": f"{r:.2f}x", "met": r <= 2})
    return out
