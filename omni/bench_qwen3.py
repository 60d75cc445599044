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


def make_checkpoint(shape: str, out: Path, seed: int = 0) -> tuple[object, Path]:
    """The reference Qwen3-Omni built at `shape` with seeded random weights, saved sharded to `out` with the
    tokenizer and processing files a served checkpoint has."""
    import torch
    from transformers import Qwen3OmniMoeConfig, Qwen3OmniMoeForConditionalGeneration

    from omni.qwen3_omni_embedded import special_ids, write_processing_files, write_tokenizer

    d = json.loads((Path(__file__).resolve().parents[1] / "tests" / "data" / "tiny_qwen3_omni_config.json").read_text())
    th = d["thinker_config"]
    th["text_config"].update(SHAPES[shape])
    hidden, vocab = th["text_config"]["hidden_size"], th["text_config"]["vocab_size"]
    d["talker_config"]["thinker_hidden_size"] = th["vision_config"]["out_hidden_size"] = hidden
    th["audio_config"]["output_dim"] = hidden
    top, thinker_ids = special_ids(vocab)
    d.update(top)
    th.update(thinker_ids)
    for k in ("audio_token_id", "image_token_id", "video_token_id", "vision_start_token_id", "audio_start_token_id"):
        d["talker_config"][k] = thinker_ids[k]
    d.pop("model_type"), d.pop("architectures")
    torch.manual_seed(seed)
    model = Qwen3OmniMoeForConditionalGeneration(Qwen3OmniMoeConfig(**d)).eval()
    model.save_pretrained(out, max_shard_size="100MB")
    write_tokenizer(out, vocab)
    write_processing_files(out, [top["im_end_token_id"]])
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
