"""`omni bench qwen3`: Qwen3-Omni's Thinker, transformers' `generate` against ours, side by side.

Random weights in the official layout (experts one tensor each, sharded with an index) at two shapes: the
shared tiny config and a generated ~100 M-parameter MoE ("moe100m": 6 layers, 32 experts, top-8, the real
head layout). On the same prompt with lengths forced equal (greedy, `--text-tokens` new tokens):
  1. transformers' thinker `generate`, one conversation (its default experts backend, as a user runs it);
  2. our Thinker, 1, 4 and 8 conversations decoding together (one batched forward per step);
  3. the load: seconds, and peak host memory over the checkpoint's size (measured in a fresh process);
  4. our MoE decode step (B=1) against the bandwidth floor counted over the bytes a step really reads:
     every non-expert weight plus only the experts the step routes to.
Our Thinker is driven directly here: Qwen3-Omni's processor and serving come later (issue 13's rest).
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
    """The reference Qwen3-Omni built at `shape` with seeded random weights, saved sharded to `out`."""
    import torch
    from transformers import Qwen3OmniMoeConfig, Qwen3OmniMoeForConditionalGeneration

    d = json.loads((Path(__file__).resolve().parents[1] / "tests" / "data" / "tiny_qwen3_omni_config.json").read_text())
    d["thinker_config"]["text_config"].update(SHAPES[shape])
    d["talker_config"]["thinker_hidden_size"] = d["thinker_config"]["text_config"]["hidden_size"]
    d["thinker_config"]["vision_config"]["out_hidden_size"] = d["thinker_config"]["text_config"]["hidden_size"]
    d["thinker_config"]["audio_config"]["output_dim"] = d["thinker_config"]["text_config"]["hidden_size"]
    d.pop("model_type"), d.pop("architectures")
    torch.manual_seed(seed)
    model = Qwen3OmniMoeForConditionalGeneration(Qwen3OmniMoeConfig(**d)).eval()
    model.save_pretrained(out, max_shard_size="100MB")
    return model, out


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


def _ours(path: Path, ids, n_new: int, n_conv: int) -> tuple[dict, object]:
    import torch

    from omni.qwen3_omni_config import Qwen3OmniConfig
    from omni.qwen3_omni_thinker import Thinker
    from omni.weights import empty_params, load_module

    with empty_params():
        th = Thinker(Qwen3OmniConfig.from_file(path).thinker_config, encoders=False)
    load_module(th.model, path, "thinker.model.")
    load_module(th.lm_head, path, "thinker.lm_head.")
    L = ids.shape[1]
    cache = th.model.allocate_cache(n_conv, L + n_new + 8)
    out = [[] for _ in range(n_conv)]
    with torch.inference_mode():
        t0 = time.perf_counter()
        last = []
        for i in range(n_conv):
            pos = torch.arange(L).view(1, 1, L).expand(3, 1, L)
            h = th(th.model.embed_tokens(ids), pos, cache, torch.tensor([i]))
            last.append(th.lm_head(h[:, -1]).argmax(-1))
        tok = torch.stack(last)  # (B, 1)
        t1 = time.perf_counter()
        for s in range(n_new - 1):
            for i in range(n_conv):
                out[i].append(int(tok[i]))
            pos = torch.full((3, n_conv, 1), L + s)
            h = th(th.model.embed_tokens(tok), pos, cache, torch.arange(n_conv))
            tok = th.lm_head(h[:, -1]).argmax(-1, keepdim=True)
        for i in range(n_conv):
            out[i].append(int(tok[i]))
        t2 = time.perf_counter()
    row = {"run": f"omni thinker x{n_conv}", "conversations": n_conv, "total_s": t2 - t0, "prefill_s": t1 - t0,
           "tok_s": n_conv * n_new / (t2 - t0), "decode_tok_s": n_conv * (n_new - 1) / (t2 - t1)}
    return row, (th, out[0])


def _reference(model, ids, n_new: int) -> tuple[dict, list[int]]:
    import torch

    with torch.inference_mode():
        t0 = time.perf_counter()
        got = model.thinker.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new,
                                     min_new_tokens=n_new, do_sample=False)
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
    import torch

    rows, extra = [], {}
    for shape in shapes:
        with tempfile.TemporaryDirectory(prefix=f"omni-bench-qwen3-{shape}-") as tmp:
            print(f"omni bench qwen3: {shape}", file=sys.stderr)
            model, path = make_checkpoint(shape, Path(tmp))
            V = model.config.thinker_config.text_config.vocab_size
            ids = torch.randint(0, V - 16, (1, 48), generator=torch.Generator().manual_seed(1))
            same = None
            if reference:
                row, want = _reference(model, ids, n_new)
                rows.append({"shape": shape, **row})
            del model
            th = None
            for n in concurrency:
                row, (th, first) = _ours(path, ids, n_new, n)
                rows.append({"shape": shape, **row})
                if reference and n == 1:
                    same = first == want
            extra[shape] = {"load": _load_memory(path), "moe_step": _moe_step(th, ids),
                            "tokens_equal_reference": same}
    return {"rows": rows, **extra}


def print_report(res: dict, print_fn=print) -> None:
    cols = [("shape", "{}"), ("run", "{}"), ("total_s", "{:.3f}"), ("prefill_s", "{:.3f}"), ("tok_s", "{:.1f}"),
            ("decode_tok_s", "{:.1f}")]
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
