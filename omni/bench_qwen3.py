"""`omni bench qwen3`: Qwen3-Omni's Thinker, transformers' `generate` against ours, side by side.

Random weights in the official layout (experts one tensor each, sharded with an index) at two shapes: the
shared tiny config and a generated ~100 M-parameter MoE ("moe100m": 6 layers, 32 experts, top-8, the real
head layout). On the same prompt with lengths forced equal (greedy, `--text-tokens` new tokens):
  1. transformers' thinker `generate`, one conversation (its default experts backend, as a user runs it);
  2. our engine (omni.models.load_model + streaming.engine, as `omni serve` runs it), 1, 4 and 8
     conversations at once on the same prompt through our processor (one batched forward per step);
  3. the load: seconds, and peak host memory over the checkpoint's size (measured in a fresh process);
  4. our MoE decode step (B=1) against the bandwidth floor counted over the bytes a step really reads:
     every non-expert weight plus only the experts the step routes to.
The checkpoint carries the real Qwen vocabulary cut to the shape's vocab_size, Qwen3-Omni's added tokens after
it, so the same prompt text goes through transformers and through us.

`--speech` (run_qwen3_speech_bench): speaking instead. transformers' `generate` with audio out (greedy, one
conversation; the wave comes at the end, so its time to first audio is its total) against our engine speaking
at 1, 4 and 8 conversations, on the same prompt with the reply tokens the Talker reads and the frames forced
equal on both sides (asserted): total, time to first audio, RTF, speech-seconds per wall-second, the ratios to
the targets, and where the time went per stage (bench-only timers around the model's methods, also up to the
first audio). Code2Wav keeps transformers' init, whose wave is near-silent: the same arithmetic, so the same time.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {
    "tiny": {},
    "moe100m": {"vocab_size": 8192, "hidden_size": 768, "num_hidden_layers": 6, "num_attention_heads": 12,
                "num_key_value_heads": 4, "head_dim": 64, "num_experts": 32, "num_experts_per_tok": 8,
                "moe_intermediate_size": 384, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6,
                                                                   "mrope_section": [8, 12, 12], "interleaved": True}},
}


# The talker and Code2Wav per shape. tiny: the shared tiny config as is (4 codebooks of 32 codes, 1920 samples per
# frame). moe100m: the published codec numbers (talker vocab 3072 with Qwen3-Omni-30B-A3B-Instruct's codec specials
# and voices, 16 codebooks of 2048, upsampling 2*2*8*5*4*3 = 1920 samples per 80 ms frame at 24 kHz, the 72-frame
# window) and widths scaled down with the thinker (the published talker is 20 layers of hidden 1024, 128 experts
# top-6; code predictor 5 layers; Code2Wav 8 layers, decoder 1536 channels).
SPEECH = {
    "tiny": {},
    "moe100m": {
        "talker_config": {
            "num_code_groups": 16, "codec_pad_id": 2148, "codec_bos_id": 2149, "codec_eos_token_id": 2150,
            "codec_nothink_id": 2155, "codec_think_bos_id": 2156, "codec_think_eos_id": 2157,
            "speaker_id": {"chelsie": 2301, "ethan": 2302, "aiden": 2303},
            "text_config": {"vocab_size": 3072, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4,
                            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
                            "moe_intermediate_size": 192, "shared_expert_intermediate_size": 384, "num_experts": 16,
                            "num_experts_per_tok": 4, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6,
                                                                          "mrope_section": [8, 12, 12],
                                                                          "interleaved": True}},
            "code_predictor_config": {"vocab_size": 2048, "hidden_size": 256, "intermediate_size": 768,
                                      "num_hidden_layers": 5, "num_attention_heads": 4, "num_key_value_heads": 2,
                                      "head_dim": 64, "num_code_groups": 16}},
        "code2wav_config": {"codebook_size": 2048, "num_quantizers": 16, "hidden_size": 256, "intermediate_size": 512,
                            "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4,
                            "decoder_dim": 128},
    },
}


def _merge(d: dict, new: dict) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(d.get(k), dict) and k != "speaker_id":
            _merge(d[k], v)
        else:
            d[k] = v


def _role_ids(out: Path, top: dict) -> None:
    """system/user/assistant_token_id: the Talker keeps a turn by the token after `<|im_start|>`. The real vocabulary
    cut to a few thousand ids spells "assistant" (and at the tiny shape "user") in several tokens, so the first of
    them stands for the role: transformers' generate with audio out and ours read the same ids."""
    from omni.tokenizer import TextTokenizer

    tok = TextTokenizer.from_dir(out)
    for role in ("system", "user", "assistant"):
        top[f"{role}_token_id"] = tok.encode(role)[0]


def _init_talker_experts(model, seed: int) -> None:
    """transformers 5.23 leaves the talker's stacked experts as torch.empty (its _init_weights skips them):
    uninitialised memory, ~0 in a fresh process and huge or NaN after other work. Seeded as its other weights."""
    import torch

    g = torch.Generator().manual_seed(seed + 7)
    std = model.config.talker_config.text_config.initializer_range
    with torch.no_grad():
        for layer in model.talker.model.layers:
            layer.mlp.experts.gate_up_proj.normal_(0, std, generator=g)
            layer.mlp.experts.down_proj.normal_(0, std, generator=g)


def make_checkpoint(shape: str, out: Path, seed: int = 0) -> tuple[object, Path]:
    """The reference Qwen3-Omni built at `shape` with seeded random weights (transformers' own init; Code2Wav's
    makes a near-silent wave, which costs the same to compute), saved sharded to `out` with the tokenizer and
    processing files a served checkpoint has."""
    import torch
    from transformers import Qwen3OmniMoeConfig, Qwen3OmniMoeForConditionalGeneration

    from omni.qwen3_omni_embedded import special_ids, write_processing_files, write_tokenizer

    d = json.loads((Path(__file__).resolve().parents[1] / "tests" / "data" / "tiny_qwen3_omni_config.json").read_text())
    th = d["thinker_config"]
    th["text_config"].update(SHAPES[shape])
    _merge(d, SPEECH[shape])
    hidden, vocab = th["text_config"]["hidden_size"], th["text_config"]["vocab_size"]
    d["talker_config"]["thinker_hidden_size"] = th["vision_config"]["out_hidden_size"] = hidden
    th["audio_config"]["output_dim"] = hidden
    top, thinker_ids = special_ids(vocab)
    write_tokenizer(out, vocab)
    _role_ids(out, top)
    thinker_ids["user_token_id"] = top["user_token_id"]
    d.update(top)
    th.update(thinker_ids)
    for k in ("audio_token_id", "image_token_id", "video_token_id", "vision_start_token_id", "audio_start_token_id"):
        d["talker_config"][k] = thinker_ids[k]
    d.pop("model_type"), d.pop("architectures")
    torch.manual_seed(seed)
    model = Qwen3OmniMoeForConditionalGeneration(Qwen3OmniMoeConfig(**d)).eval()
    _init_talker_experts(model, seed)
    model.save_pretrained(out, max_shard_size="100MB")
    write_processing_files(out, [top["im_end_token_id"]])
    # generate with audio out reads the talker's audio_config, which 5.23 does not set on it (FACTS.md)
    model.config.talker_config.audio_config = model.config.thinker_config.audio_config
    return model, out


PROMPT = ("Here is a long story about a cat who lived by the sea, and every morning walked along the harbour "
          "to watch the fishing boats come in. Tell me what happened next.")


# Peak memory from VmHWM, which a new process image starts afresh (ru_maxrss carries the parent's over exec).
_LOAD = """
import sys, time
def hwm():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
import torch
from omni.qwen3_omni_config import Qwen3OmniConfig
from omni.qwen3_omni_thinker import Thinker
from omni.weights import Checkpoint, empty_params, load_module
torch.ones(1)
base = hwm()
t0 = time.perf_counter()
ckpt = Checkpoint(sys.argv[1])
with empty_params():
    th = Thinker(Qwen3OmniConfig.from_file(sys.argv[1]).thinker_config, encoders=False)
load_module(th.model, ckpt, "thinker.model.")
load_module(th.lm_head, ckpt, "thinker.lm_head.")
print(time.perf_counter() - t0, (hwm() - base) * 1024,
      sum(p.numel() * p.element_size() for p in th.parameters()))
"""


def _load_memory(path: Path) -> dict:
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", _LOAD, str(path)], capture_output=True, text=True, cwd=root,
                         check=True).stdout.split()
    seconds, peak, weights = float(out[0]), int(out[1]), int(out[2])
    return {"load_s": seconds, "weights_mb": weights / 1e6, "peak_rss_growth_mb": peak / 1e6,
            "peak_over_weights": peak / weights}


def _ours(model, n_new: int, n_conv: int) -> tuple[dict, list[int]]:
    """Our engine: n_conv conversations sent PROMPT at once, every reply forced to n_new greedy tokens."""
    import asyncio

    from omni.sampling import GREEDY
    from omni.types import TextDelta
    from streaming.engine import Engine, EngineConfig

    eng = Engine(model, EngineConfig(max_sessions=n_conv + 1, max_context=512, max_new_tokens=n_new))  # + warm-up

    async def one(conv):
        return [ev.token_id async for ev in conv.respond([PROMPT], sampling=GREEDY, min_new_tokens=n_new)
                if isinstance(ev, TextDelta)]

    async def run(n):
        return await asyncio.gather(*(one(eng.open_conversation()) for _ in range(n)))

    try:
        asyncio.run(run(1))  # warm-up
        t0 = time.perf_counter()
        out = asyncio.run(run(n_conv))
        t = time.perf_counter() - t0
    finally:
        eng.shutdown()
    assert all(len(o) == n_new for o in out), [len(o) for o in out]
    return {"run": f"omni engine x{n_conv}", "conversations": n_conv, "total_s": t,
            "tok_s": n_conv * n_new / t}, out[0]


def _reference(model, ids, n_new: int) -> tuple[dict, list[int]]:
    import torch

    def generate():
        return model.thinker.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new,
                                      min_new_tokens=n_new, do_sample=False)

    with torch.inference_mode():
        generate()  # warm-up, as ours
        t0 = time.perf_counter()
        got = generate()
        t = time.perf_counter() - t0
    return {"run": "transformers", "conversations": 1, "total_s": t, "tok_s": n_new / t}, got[0, ids.shape[1]:].tolist()


def _moe_step(th, ids, steps: int = 32) -> dict:
    """B=1 decode step against the floor over the bytes it reads: non-expert weights + routed experts."""
    import torch

    from omni.bench import _bandwidth_gbs

    dec = th.model
    dense = sum(p.numel() * p.element_size() for n, p in dec.named_parameters()
                if not n.startswith("embed") and ".experts." not in n)
    dense += th.lm_head.weight.numel() * th.lm_head.weight.element_size()
    per_expert = {}
    routed: list[int] = []

    def hook(mod, args, out):
        routed.append(per_expert[id(mod)] * int(out[0].unique().numel()))

    for layer in dec.layers:
        ex = getattr(layer.mlp, "experts", None)
        if ex is None:
            continue
        per_expert[id(layer.mlp.gate)] = (ex.gate_up_proj[0].numel() + ex.down_proj[0].numel()) * ex.down_proj.element_size()

    L = ids.shape[1]
    cache = dec.allocate_cache(1, L + steps + 8)

    def run(timed: bool) -> list[float]:
        out = []
        cache.reset(0)
        with torch.inference_mode():
            h = th(dec.embed_tokens(ids), torch.arange(L).view(1, 1, L).expand(3, 1, L), cache, torch.tensor([0]))
            tok = th.lm_head(h[:, -1]).argmax(-1, keepdim=True)
            for s in range(steps):
                routed.clear()
                t0 = time.perf_counter()
                h = th(dec.embed_tokens(tok), torch.full((3, 1, 1), L + s), cache, torch.tensor([0]))
                tok = th.lm_head(h[:, -1]).argmax(-1, keepdim=True)
                out.append(time.perf_counter() - t0 if timed else dense + sum(routed))
        return out

    times = min((run(True) for _ in range(3)), key=statistics.median)  # untimed by the routing hooks
    hooks = [layer.mlp.gate.register_forward_hook(hook) for layer in dec.layers if hasattr(layer.mlp, "gate")]
    step_bytes = run(False)  # the same greedy steps again, counting the experts each one routes to
    for hk in hooks:
        hk.remove()
    bw = _bandwidth_gbs()
    step, nbytes = statistics.median(times), statistics.median(step_bytes)
    floor = nbytes / (bw * 1e9)
    all_experts = sum(p.numel() * p.element_size() for n, p in dec.named_parameters() if ".experts." in n)
    return {"step_ms": step * 1e3, "read_mb": nbytes / 1e6, "all_experts_mb": all_experts / 1e6,
            "bandwidth_gb_s": bw, "floor_ms": floor * 1e3, "ratio": step / floor}


def run_qwen3_bench(shapes: list[str], n_new: int, concurrency: list[int], reference: bool = True,
                    print_fn=print) -> dict:
    from omni.models import load_model
    from omni.types import Message

    rows, extra = [], {}
    for shape in shapes:
        with tempfile.TemporaryDirectory(prefix=f"omni-bench-qwen3-{shape}-") as tmp:
            print(f"omni bench qwen3: {shape}", file=sys.stderr)
            ref, path = make_checkpoint(shape, Path(tmp))
            model = load_model(path)
            ids = model.processor([Message.of("user", PROMPT)]).input_ids[None]
            same = None
            if reference:
                row, want = _reference(ref, ids, n_new)
                rows.append({"shape": shape, **row})
            del ref
            for n in concurrency:
                row, first = _ours(model, n_new, n)
                rows.append({"shape": shape, **row})
                if reference and n == 1:
                    same = first == want
            extra[shape] = {"load": _load_memory(path), "moe_step": _moe_step(model.thinker, ids),
                            "tokens_equal_reference": same, "prompt_tokens": int(ids.shape[1])}
    return {"rows": rows, **extra}


def print_report(res: dict, print_fn=print) -> None:
    cols = [("shape", "{}"), ("run", "{}"), ("total_s", "{:.3f}"), ("tok_s", "{:.1f}")]
    cells = [[c for c, _ in cols]] + [[f.format(r[c]) if r.get(c) is not None else "-" for c, f in cols]
                                      for r in res["rows"]]
    w = [max(len(r[i]) for r in cells) for i in range(len(cols))]
    lines = ["  ".join(v.rjust(x) for v, x in zip(r, w)) for r in cells]
    print_fn("\n".join([lines[0], "  ".join("-" * x for x in w), *lines[1:]]))
    for shape, e in res.items():
        if shape == "rows":
            continue
        ld, st = e["load"], e["moe_step"]
        print_fn(f"\n{shape}: greedy tokens equal the reference: {e['tokens_equal_reference']}")
        print_fn(f"  load {ld['load_s']:.2f} s, {ld['weights_mb']:.0f} MB of weights, peak host memory growth "
                 f"{ld['peak_rss_growth_mb']:.0f} MB = {ld['peak_over_weights']:.2f}x the weights")
        print_fn(f"  MoE decode step {st['step_ms']:.2f} ms; reads {st['read_mb']:.1f} MB (experts in all "
                 f"{st['all_experts_mb']:.1f} MB) -> floor {st['floor_ms']:.2f} ms at {st['bandwidth_gb_s']:.1f} GB/s"
                 f" -> {st['ratio']:.2f}x the floor")


# --- `omni bench qwen3 --speech`: transformers' generate with audio out against our engine speaking ---

class _Stages:
    """Seconds and calls per stage over a run: methods of the model's own objects shadowed by timed wrappers for
    the run (the bench only; the engine and model files are untouched), restored on exit."""

    def __init__(self, *wraps: tuple[object, str, str]):
        self.wraps, self.s, self.n, self._undo = wraps, {}, {}, []
        self.calls: list[tuple[float, float, str]] = []  # (start, end, stage) of every call

    def __enter__(self):
        for obj, name, stage in self.wraps:
            fn, own = getattr(obj, name), name in vars(obj)  # own: a module's function (else a bound method)

            def timed(*a, _fn=fn, _stage=stage, **k):
                t0 = time.perf_counter()
                try:
                    return _fn(*a, **k)
                finally:
                    t1 = time.perf_counter()
                    self.s[_stage] = self.s.get(_stage, 0.0) + t1 - t0
                    self.n[_stage] = self.n.get(_stage, 0) + 1
                    self.calls.append((t0, t1, _stage))

            setattr(obj, name, timed)
            self._undo.append((obj, name, fn if own else None))
        return self

    def __exit__(self, *exc):
        for obj, name, fn in reversed(self._undo):
            setattr(obj, name, fn) if fn is not None else delattr(obj, name)
        self._undo.clear()

    def report(self, nested: dict[str, str], until: float | None = None) -> dict:
        """{stage: {"s", "calls"}} over the calls that ended by `until` (all by default); a stage in `nested`
        (inner: outer) is taken out of its outer one's seconds."""
        out = {}
        for t0, t1, stage in self.calls:
            if until is None or t1 <= until:
                v = out.setdefault(stage, {"s": 0.0, "calls": 0})
                v["s"] += t1 - t0
                v["calls"] += 1
        for inner, outer in nested.items():
            if inner in out and outer in out:
                out[outer]["s"] -= out[inner]["s"]
        return out


def _speech_reference(ref, ids, n_text: int, frames: int) -> tuple[dict, list, dict]:
    """transformers' greedy generate with audio out, one conversation: the wave comes at the end (its whole
    utterance is decoded by Code2Wav after the talker), so its time to first audio is its total."""
    import torch

    codes = []

    def record(mod, args, kwargs, out):  # the frames the talker made (code 0's last draw has no residual codes)
        if out.hidden_states[1] is not None:
            codes.append(out.hidden_states[1][0].tolist())

    hook = ref.talker.register_forward_hook(record, with_kwargs=True)
    stages = _Stages((ref.thinker, "generate", "thinker generate"), (ref.talker, "generate", "talker generate"),
                     (ref.talker.code_predictor, "generate", "code predictor"),
                     (ref.code2wav, "chunked_decode", "code2wav"))
    try:
        with stages, torch.inference_mode():
            t0 = time.perf_counter()
            text, wave = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), return_audio=True,
                                      speaker="ethan", thinker_do_sample=False, talker_do_sample=False,
                                      thinker_max_new_tokens=n_text, thinker_min_new_tokens=n_text,
                                      thinker_eos_token_id=ref.config.im_end_token_id,
                                      talker_max_new_tokens=frames + 1, talker_min_new_tokens=frames)
            wall = time.perf_counter() - t0
    finally:
        hook.remove()
    reply = text[0, ids.shape[1]:].tolist()
    assert len(reply) == n_text and len(codes) == frames, (len(reply), len(codes))
    audio = wave.numel() / 24000
    row = {"run": "transformers x1", "conversations": 1, "total_s": wall, "ttfa_s": wall, "audio_s": audio,
           "rtf": wall / audio, "speech_s_per_wall_s": audio / wall, "frames": len(codes),
           "talker_text_tokens": n_text - 1, "wave_peak": float(wave.abs().max())}  # its last token is never fed back, so the talker never reads it
    return row, codes, stages.report({"code predictor": "talker generate"})


def _speech_ours(model, n_text: int, frames: int, n_conv: int) -> tuple[dict, list, dict]:
    """Our engine: n_conv conversations sent PROMPT at once, each reply forced to n_text greedy tokens (all spoken)
    and `frames` frames of speech; the first audio goes out after the first frame."""
    import asyncio

    import talker.qwen3_omni_talker as talker_lib
    from omni.sampling import GREEDY
    from omni.types import AudioDelta, Done, Error
    from streaming.engine import Engine, EngineConfig

    eng = Engine(model, EngineConfig(max_sessions=n_conv, max_context=512, max_new_tokens=n_text, max_codes=frames,
                                     events_buffered=10_000))
    sp = model.speech

    async def one(conv):
        t0 = time.perf_counter()
        ttfa, first, samples, done = None, None, 0, None
        async for ev in conv.respond([PROMPT], modalities=("text", "audio"), sampling=GREEDY, min_new_tokens=n_text,
                                     min_codes=frames):
            if isinstance(ev, AudioDelta):
                if ttfa is None:
                    ttfa, first = time.perf_counter() - t0, time.perf_counter()
                samples += len(ev.pcm) // 2
            elif isinstance(ev, Error):
                raise RuntimeError(ev.message)
            elif isinstance(ev, Done):
                done = ev
        return {"ttfa": ttfa, "first_audio": first, "start": t0, "samples": samples, "done": done}

    async def run():
        convs = [eng.open_conversation() for _ in range(n_conv)]
        t0 = time.perf_counter()
        res = await asyncio.gather(*(one(c) for c in convs))
        return res, time.perf_counter() - t0

    stages = _Stages((model, "prefill", "thinker prefill"), (model, "decode", "thinker decode"),
                     (sp, "remember_prompt", "talker user rows"), (sp, "start", "talker prefill"),
                     (sp, "step", "talker step"), (talker_lib, "predict_residuals", "code predictor"),
                     (sp.code2wav, "advance", "code2wav"))
    with stages:
        try:
            res, wall = asyncio.run(run())
        finally:
            eng.shutdown()  # the worker's last step ends (and counts its busy time) before the stages are read
    busy = eng.busy_s
    for r in res:
        u = r["done"].usage
        assert u["completion_tokens"] == n_text and u["codec_tokens"] == frames, u
    audio = sum(r["samples"] for r in res) / 24000
    prof = stages.report({"code predictor": "talker step"})
    prof["engine other"] = {"s": busy - sum(v["s"] for v in prof.values()), "calls": None}  # sampling, events
    first = min(res, key=lambda r: r["first_audio"])  # what ran before the first audio went out
    prof["before first audio"] = {k: v for k, v in stages.report({"code predictor": "talker step"},
                                                                 until=first["first_audio"]).items()}
    prof["before first audio"]["wall"] = {"s": first["first_audio"] - first["start"], "calls": None}
    row = {"run": f"omni engine x{n_conv}", "conversations": n_conv, "total_s": wall,
           "ttfa_s": statistics.median(r["ttfa"] for r in res), "ttfa_max_s": max(r["ttfa"] for r in res),
           "audio_s": audio / n_conv, "rtf": wall / (audio / n_conv), "speech_s_per_wall_s": audio / wall,
           "frames": frames, "talker_text_tokens": n_text}
    return row, res[0]["done"].codec_ids, prof


def run_qwen3_speech_bench(shapes: list[str], n_text: int, frames: int, concurrency: list[int], repeat: int = 2,
                           reference: bool = True) -> dict:
    """Per shape: the reference and our x1 alternate `repeat` times (the fastest of each kept; the first round pays
    one-time set-up), then our other levels once. The talker reads n_text reply tokens on both sides: the
    reference generates n_text + 1 (its last is never fed back), ours n_text (each spoken as the host reads it)."""
    from omni.models import load_model
    from omni.types import Message

    rows, extra = [], {}
    for shape in shapes:
        with tempfile.TemporaryDirectory(prefix=f"omni-bench-qwen3-speech-{shape}-") as tmp:
            print(f"omni bench qwen3 --speech: {shape}", file=sys.stderr)
            ref, path = make_checkpoint(shape, Path(tmp))
            model = load_model(path, speech=True)
            ids = model.processor([Message.of("user", PROMPT)]).input_ids[None]
            best, profiles, codes = {}, {}, {}

            def keep(out):
                row, got, prof = out
                print(f"  {row['run']}: {row['total_s']:.2f} s", file=sys.stderr)
                if row["run"] not in best or row["total_s"] < best[row["run"]]["total_s"]:
                    best[row["run"]], profiles[row["run"]], codes[row["run"]] = row, prof, got

            for _ in range(max(1, repeat)):  # alternate, so a drift in machine speed hits both sides alike
                if reference:
                    keep(_speech_reference(ref, ids, n_text + 1, frames))
                keep(_speech_ours(model, n_text, frames, 1))
            for n in concurrency:
                if n != 1:
                    keep(_speech_ours(model, n_text, frames, n))
            rows += [{"shape": shape, **best[r]} for r in best]
            params = {k: sum(p.numel() for p in getattr(ref, k).parameters()) for k in ("thinker", "talker", "code2wav")}
            extra[shape] = {"profiles": profiles, "params_m": {k: v / 1e6 for k, v in params.items()},
                            "codes_equal_reference": (codes["transformers x1"] == codes["omni engine x1"]
                                                      if reference else None),
                            "prompt_tokens": int(ids.shape[1]), "frames": frames, "text_tokens": n_text}
            del ref
    return {"rows": rows, **extra, "targets": _speech_targets(rows)}


def _speech_targets(rows: list[dict]) -> list[dict]:
    out = []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        by = {r["run"]: r for r in rows if r["shape"] == shape}
        ref, one, eight = by.get("transformers x1"), by.get("omni engine x1"), by.get("omni engine x8")
        if ref and one:
            for r in (one, *(v for k, v in by.items() if k not in ("transformers x1", "omni engine x1"))):
                r["ttfa_over_ref_total"] = r["ttfa_s"] / ref["total_s"]
            one["total_over_ref_total"] = one["total_s"] / ref["total_s"]
            out.append({"what": f"{shape}: time to first audio <= 0.05 x the reference's total",
                        "value": f"{one['ttfa_over_ref_total']:.3f}x", "met": one["ttfa_over_ref_total"] <= 0.05})
            out.append({"what": f"{shape}: total, one conversation <= 0.5 x the reference's",
                        "value": f"{one['total_over_ref_total']:.3f}x", "met": one["total_over_ref_total"] <= 0.5})
        if one and eight:
            out.append({"what": f"{shape}: what batching 8 buys: speech-seconds per wall-second, x8 over x1",
                        "value": f"{eight['speech_s_per_wall_s'] / one['speech_s_per_wall_s']:.2f}x", "met": None})
    return out


def print_speech_report(res: dict, print_fn=print) -> None:
    cols = [("shape", "{}"), ("run", "{}"), ("total_s", "{:.3f}"), ("ttfa_s", "{:.3f}"), ("audio_s", "{:.2f}"),
            ("rtf", "{:.3f}"), ("speech_s_per_wall_s", "{:.2f}"), ("ttfa_over_ref_total", "{:.3f}"),
            ("total_over_ref_total", "{:.3f}"), ("frames", "{}")]
    cells = [[c for c, _ in cols]] + [[f.format(r[c]) if r.get(c) is not None else "-" for c, f in cols]
                                      for r in res["rows"]]
    w = [max(len(r[i]) for r in cells) for i in range(len(cols))]
    lines = ["  ".join(v.rjust(x) for v, x in zip(r, w)) for r in cells]
    print_fn("\n".join([lines[0], "  ".join("-" * x for x in w), *lines[1:]]))
    print_fn("(ttfa_s: median over the conversations; the reference's is its total: it decodes the whole utterance "
             "at the end. rtf: wall / one conversation's audio)")
    for shape, e in res.items():
        if shape in ("rows", "targets"):
            continue
        p = e["params_m"]
        print_fn(f"\n{shape}: {e['text_tokens']} reply tokens and {e['frames']} frames each; params thinker "
                 f"{p['thinker']:.1f} M, talker {p['talker']:.1f} M, code2wav {p['code2wav']:.1f} M; codes equal the "
                 f"reference: {e['codes_equal_reference']}")
        def parts(prof):
            return ", ".join(f"{k} {v['s']:.3f} s" + (f" ({v['calls']})" if v["calls"] else "")
                             for k, v in prof.items() if k != "before first audio")

        for run, prof in e["profiles"].items():
            total = next(r["total_s"] for r in res["rows"] if r["shape"] == shape and r["run"] == run)
            print_fn(f"  {run} ({total:.3f} s): {parts(prof)}")
            if "before first audio" in prof:
                print_fn(f"    before its first audio: {parts(prof['before first audio'])}")
    print_fn("\ntargets:")
    for t in res["targets"]:
        mark = "--" if t["met"] is None else "ok" if t["met"] else "MISSED"
        print_fn(f"  [{mark}] {t['what']}: {t['value']}")
