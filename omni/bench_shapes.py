"""`omni bench --shape NAME`: the published Qwen-Omni shapes with random weights, built on the device.

Speed depends on shapes, not on what the weights say: a model built at the published `config.json` shapes
with random weights reads the same bytes and does the same arithmetic as the real one. The shapes are data
(omni/shapes/NAME.json, each naming its source and the values that could not be checked). Every part is
built by our own classes on the meta device, then each parameter is created empty on the device and filled
in place with random values: no file is written and no host copy of the weights exists. Encoders are built
on the meta device only (their size is counted); the prompt's image and audio rows are random encoder outputs
placed in their placeholders.

Stages (`--stages`, default all the family has):
  thinker    init time, weight and KV memory, prefill tokens/s of a multimodal prompt, the decode step at
             1/4/8/16 conversations against the bandwidth floor (the bytes a step reads: weights, routed
             experts only for MoE, and the KV rows)
  talker     the Talker's prefill and decode step against its floor. Qwen3: the prompt's user rows through
             `prefill_rows` and `start`; a step is one frame (80 ms of speech) per conversation: a Talker
             forward plus the code predictor's 15 sub-steps (`step_batch`); its floor counts the routed
             experts only and the code predictor's layers once per sub-step
  token2wav  the first DiT + BigVGAN window and the streaming real-time factor (Qwen2.5)
  code2wav   Code2Wav (fp32, as a load makes it) streamed on its chunk grid, one frame per stream per call
             of a batched `advance`, against one-shot `forward` on the same codes; the first chunk (Qwen3)
  ttfa       time to first audio with lengths forced, driving the stage functions the engine calls. Qwen3
             as the engine orders an iteration: one prefill (Thinker, then the Talker's), a batched Thinker
             step, a batched Talker step, a batched Code2Wav advance; conversation 0's first audio split
             into its parts; then on to --speech-seconds of speech each
`--dry` runs the same steps at the family's tiny test shape with a few tokens.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
SHAPES_DIR = Path(__file__).resolve().parent / "shapes"
TINY = {"qwen2_5_omni": ROOT / "tests" / "data" / "tiny_qwen2_5_omni_config.json",
        "qwen3_omni_moe": ROOT / "tests" / "data" / "tiny_qwen3_omni_config.json"}
STAGES = {"qwen2_5_omni": ("thinker", "talker", "token2wav", "ttfa"),
          "qwen3_omni_moe": ("thinker", "talker", "code2wav", "ttfa")}


def shape_names() -> list[str]:
    return sorted(p.stem for p in SHAPES_DIR.glob("*.json"))


def read_shape(name: str, dry: bool = False) -> dict:
    """The shape's config.json dict (notes under "_" keys kept); `dry`: the family's tiny test config."""
    path = SHAPES_DIR / f"{name}.json"
    if not path.exists():
        raise ValueError(f"unknown shape {name!r}; choose one of {', '.join(shape_names())}")
    d = json.loads(path.read_text())
    if dry:
        tiny = json.loads(TINY[d["model_type"]].read_text())
        tiny["_source"] = f"{TINY[d['model_type']].relative_to(ROOT)} (--dry: the tiny test shape of {name}'s family)"
        return tiny
    return d


def parse(d: dict):
    from omni.config import OmniConfig
    from omni.qwen3_omni_config import Qwen3OmniConfig

    d = {k: v for k, v in d.items() if not k.startswith("_")}
    return (OmniConfig if d["model_type"] == "qwen2_5_omni" else Qwen3OmniConfig).from_dict(d)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _now(device: torch.device) -> float:
    _sync(device)
    return time.perf_counter()


def _log(msg: str) -> None:
    print(f"omni bench: {msg}", file=sys.stderr, flush=True)


def nbytes(module: nn.Module, skip: tuple[str, ...] = ()) -> int:
    return sum(p.numel() * p.element_size() for n, p in module.named_parameters()
               if not p.is_meta and not any(n.startswith(s) for s in skip))


def nparams(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def materialise(module: nn.Module, device: torch.device, dtype: torch.dtype, seed: int = 0) -> float:
    """Give every meta parameter of `module` storage on `device` in `dtype`, filled in place (weights
    N(0, 0.02), norm scales 1, biases and log-scales 0), and move its computed buffers; seconds taken."""
    t0 = _now(device)
    g = torch.Generator(device=device).manual_seed(seed)
    for mod in module.modules():
        for name, p in list(mod._parameters.items()):
            if p is None or not p.is_meta:
                continue
            t = torch.empty(p.shape, dtype=dtype if p.is_floating_point() else p.dtype, device=device)
            if p.dim() >= 2:
                t.normal_(0.0, 0.02, generator=g)
            elif name in ("bias", "alpha", "beta"):
                t.zero_()
            else:
                t.fill_(1.0)
            mod._parameters[name] = nn.Parameter(t, requires_grad=False)
        for name, b in list(mod._buffers.items()):
            if b is not None and b.device != device:
                mod._buffers[name] = b.to(device)
    return _now(device) - t0


class Built:
    """The parts of one shape, each built on the meta device, the ones the stages need materialised."""

    def __init__(self, raw: dict, device: torch.device, dtype: torch.dtype, need: set[str]):
        from omni.weights import empty_params

        self.raw, self.cfg, self.device, self.dtype = raw, parse(raw), device, dtype
        self.family = raw["model_type"]
        self.init_s: dict[str, float] = {}
        self.params: dict[str, int] = {}  # every part, built or not
        self.thinker = self.talker = self.t2w = self.c2w = None
        with empty_params():
            if self.family == "qwen2_5_omni":
                from omni.thinker import Thinker
                from talker.bigvgan import BigVGAN
                from talker.dit import DiT
                from talker.talker import Talker

                self.thinker = Thinker(self.cfg.thinker_config)
                self.params["vision encoder"] = nparams(self.thinker.visual)
                self.params["audio encoder"] = nparams(self.thinker.audio_tower)
                talker = Talker(self.cfg.talker_config)
                dit, voc = DiT(self.cfg.token2wav_config.dit_config), BigVGAN(self.cfg.token2wav_config.bigvgan_config)
                self.params["talker"], self.params["dit"], self.params["bigvgan"] = map(nparams, (talker, dit, voc))
            else:
                from omni.qwen3_omni_thinker import Thinker

                self.thinker = Thinker(self.cfg.thinker_config, encoders=False)
                try:
                    from encoders.qwen3_omni_audio import Qwen3OmniAudioConfig, Qwen3OmniAudioEncoder
                    from encoders.qwen3_omni_vision import Qwen3OmniVisionConfig, Qwen3OmniVisionEncoder

                    tc = self.cfg.thinker_config
                    self.params["vision encoder"] = nparams(Qwen3OmniVisionEncoder(Qwen3OmniVisionConfig.from_dict(tc.vision_config)))
                    self.params["audio encoder"] = nparams(Qwen3OmniAudioEncoder(Qwen3OmniAudioConfig.from_dict(tc.audio_config)))
                except Exception as e:  # the encoders' own configs may want keys the shape does not record
                    _log(f"encoder sizes not counted ({e})")
                from talker.qwen3_omni_code2wav import Code2Wav, Code2WavConfig
                from talker.qwen3_omni_talker import Talker as Qwen3Talker

                talker = Qwen3Talker(self.cfg)
                c2w = Code2Wav(Code2WavConfig.from_dict(self.cfg.code2wav_config))
                self.params["talker"], self.params["code2wav"] = nparams(talker), nparams(c2w)
        th = self.thinker
        self.params["thinker decoder"] = nparams(th.model) + nparams(th.lm_head)
        if need & {"thinker", "ttfa"}:
            self.init_s["thinker"] = materialise(th.model, device, dtype) + materialise(th.lm_head, device, dtype, 1)
            t0 = _now(device)
            getattr(th, "fuse", th.model.fuse)(cpu=device.type == "cpu")  # the serving layout, as a load makes it
            self.init_s["thinker"] += _now(device) - t0
        elif need & {"talker"}:  # the Talker's prefill reads the Thinker's embedding of a few tokens
            self.init_s["thinker embedding"] = materialise(th.model.embed_tokens, device, dtype)
        if need & {"talker", "ttfa"}:
            self.talker = talker
            self.init_s["talker"] = materialise(talker, device, dtype, 2)
            if self.family == "qwen2_5_omni":
                talker.fuse(cpu=device.type == "cpu")
        if self.family == "qwen3_omni_moe" and need & {"code2wav", "ttfa"}:
            self.c2w = c2w
            self.init_s["code2wav"] = materialise(c2w, device, torch.float32, 3)  # fp32, as Qwen3OmniModel.load
        if self.family == "qwen2_5_omni" and need & {"token2wav", "ttfa"}:
            from talker.token2wav import Token2Wav

            self.init_s["token2wav"] = materialise(dit, device, torch.float32, 3) + materialise(voc, device, torch.float32, 4)
            dit.fuse()
            self.t2w = Token2Wav(dit.eval(), voc.eval())

    def weight_bytes(self) -> dict[str, int]:
        out = {"thinker": nbytes(self.thinker)}
        if self.talker is not None:
            out["talker"] = nbytes(self.talker)
        if self.t2w is not None:
            out["token2wav"] = nbytes(self.t2w.dit) + nbytes(self.t2w.vocoder)
        if self.c2w is not None:
            out["code2wav"] = nbytes(self.c2w)
        return out

    def kv_bytes_per_token(self, part: str = "thinker") -> int:
        c = (self.cfg.thinker_config.text_config if part == "thinker" else
             self.cfg.talker_config if self.family == "qwen2_5_omni" else self.talker_text_config())
        return c.num_hidden_layers * 2 * c.num_key_value_heads * c.get_head_dim() * torch.finfo(self.dtype).bits // 8

    def talker_text_config(self):
        from talker.qwen3_omni_talker import Qwen3OmniTalkerConfig

        return Qwen3OmniTalkerConfig.from_dict(self.cfg.talker_config).text_config


def bandwidth_gbs(device: torch.device) -> float:
    """Memory bandwidth as torch sees it: omni.bench's measure on a CPU; on CUDA the same two kernels
    (a copy, counted read + write, and a sum) over 1 GiB, best of 5, the higher of the two."""
    if device.type == "cpu":
        from omni.bench import _bandwidth_gbs

        return _bandwidth_gbs()
    a = torch.ones(256 * 2**20, device=device)
    b = torch.empty_like(a)
    best = 0.0
    for fn, n in ((lambda: b.copy_(a), 2 * a.numel() * 4), (a.sum, a.numel() * 4)):
        fn()
        for _ in range(5):
            t0 = _now(device)
            fn()
            best = max(best, n / (_now(device) - t0) / 1e9)
    del a, b
    return best


def matmul_tflops(device: torch.device, dtype: torch.dtype) -> float:
    n = 4096 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device).to(dtype)
    a @ a
    t0 = _now(device)
    for _ in range(3):
        a @ a
    return 3 * 2 * n**3 / (_now(device) - t0) / 1e12


def conv_flops_per_frame(c2w) -> float:
    """FLOPs of Code2Wav's conv stack per frame: each conv / linear's weight times its rate (samples per frame
    where it runs), walked in the order the stack applies them (as `Code2Wav._convs`)."""
    rate, total = 1, 0.0
    for m in list(c2w.upsample.modules()) + list(c2w.decoder.modules()):
        if isinstance(m, (nn.Conv1d, nn.Linear)):
            total += 2 * rate * m.weight.numel()
        elif isinstance(m, nn.ConvTranspose1d):  # every input sample meets the whole kernel
            total += 2 * rate * m.weight.numel()
            rate *= m.stride[0]
    return total


def qwen3_talker_bytes(b: Built, B: int, context: int) -> tuple[int, int, int]:
    """Bytes one Qwen3 Talker step (a frame for B conversations) reads: (dense and predictor weights, routed
    experts expected at B rows, KV rows). The code predictor's layers are read once per sub-step (G - 1),
    each of its heads once; the Talker's codec embedding and hidden_projection are not read by a step."""
    tk = b.talker
    dense = sum(p.numel() * p.element_size() for n, p in tk.model.named_parameters()
                if ".experts." not in n and not n.startswith("codec_embedding")) + nbytes(tk.codec_head) + nbytes(tk.text_projection)
    cp = tk.code_predictor
    G = tk.cfg.num_code_groups
    dense += (G - 1) * nbytes(cp.model, skip=("codec_embedding",)) + nbytes(cp.lm_head)
    tc = tk.cfg.text_config
    experts = sum(nbytes(layer.mlp.experts) for layer in tk.model.layers)
    routed = int(experts * min(1.0, 1 - (1 - tc.num_experts_per_tok / tc.num_experts) ** B))  # distinct experts hit
    return dense, routed, b.kv_bytes_per_token("talker") * B * context


def estimate_s(b: Built, o, bw: float, tflops: float, tflops32: float | None = None) -> float:
    """Seconds the run will take: memory-bound steps from the bytes they read, the rest from its FLOPs, and
    (Qwen3's speech, many small kernels) ~10 us a kernel."""
    el = torch.finfo(b.dtype).bits // 8
    th = b.params["thinker decoder"] * el
    tc = b.cfg.thinker_config.text_config
    if b.family == "qwen3_omni_moe":  # the bytes a step reads: all but the unrouted experts
        e = tc.num_hidden_layers * tc.num_experts * 3 * tc.hidden_size * tc.moe_intermediate_size * el
        th = th - e + e * min(1.0, tc.num_experts_per_tok / tc.num_experts * 2)
    flops = lambda params, rows: 2 * params * rows  # noqa: E731
    s = sum(b.init_s.values()) + 2 * sum(b.weight_bytes().values()) / (bw * 1e9)
    levels, P, n = o.levels, o.prompt_tokens, o.steps
    step = lambda nb, B: 1.5 * nb / (bw * 1e9) + flops(nb / el, B) / (tflops * 1e12)  # noqa: E731
    if "thinker" in o.stages:
        s += 2 * flops(th / el, P) / (tflops * 1e12) + 2 * sum(n * step(th, B) for B in levels)
    q3 = b.family == "qwen3_omni_moe"
    if q3 and b.talker is not None:
        tc = b.talker.cfg.text_config
        routed_all = sum(nparams(layer.mlp.experts) for layer in b.talker.model.layers)
        active = b.params["talker"] - routed_all * (1 - tc.num_experts_per_tok / tc.num_experts)
        G = b.talker.cfg.num_code_groups

        def talker_step(B):  # bytes, the rows' FLOPs and the launches of the 15 sub-steps, sampled row by row
            nb = sum(qwen3_talker_bytes(b, B, P))
            return 1.5 * nb / (bw * 1e9) + 2 * B * nb / el / (tflops * 1e12) + 1e-5 * (25 * tc.num_hidden_layers + (G - 1) * (100 + 10 * B))
    if q3 and b.c2w is not None:
        c2w_frame = (conv_flops_per_frame(b.c2w) + 2 * nparams(b.c2w.pre_transformer)) / ((tflops32 or tflops) * 1e12)
        c2w_launch = 1e-5 * 15 * len(b.c2w.pre_transformer.layers)  # the transformer's kernels, per frame
        frames = max(2, round(o.speech_seconds * 12.5))
    if "talker" in o.stages and b.talker is not None and not q3:
        tk = b.params["talker"] * el
        s += flops(tk / el, P) / (tflops * 1e12) + sum(n * step(tk, B) for B in levels)
    if "talker" in o.stages and q3:
        s += 2 * flops(active, P) / (tflops * 1e12) + sum((n + 4) * talker_step(B) for B in levels)
    if "code2wav" in o.stages and b.c2w is not None:  # streamed at ~2x one-shot's conv work, then one-shot
        s += sum(frames * (3 * B * c2w_frame + c2w_launch) for B in levels)
    if "ttfa" in o.stages and q3:
        s += sum(B * 2 * flops(th / el + active, P) / (tflops * 1e12)
                 + frames * (step(th, B) + talker_step(B) + 2 * B * c2w_frame + c2w_launch) for B in levels)
    dit_window = 36 * 2 * flops(b.params.get("dit", 0), 2 * 36) / (tflops * 1e12)  # RK4 x CFG over a window
    if "token2wav" in o.stages and b.t2w is not None:
        s += dit_window * (2 + sum(levels) * max(1, o.speech_seconds * 50 / 48))
    if "ttfa" in o.stages and b.t2w is not None:
        s += sum(B * (flops(th / el + b.params["talker"], P) / (tflops * 1e12) + dit_window) + 40 * step(th, B)
                 for B in levels)
    return s


def _prompt(b: Built, P: int, device: torch.device):
    """A multimodal prompt of P rows: text, an image, text, an audio clip, text; random encoder outputs in the
    placeholders. Returns (ids (1, P), embeds (1, P, D), positions (3, 1, P), deepstack or None, next position).
    Positions as TMRoPE lays them out (an image at one t on an h/w grid, audio one per token): speed does not
    depend on their values."""
    tc = b.cfg.thinker_config
    qwen3 = b.family == "qwen3_omni_moe"
    img_tok, aud_tok = (tc.image_token_id, tc.audio_token_id) if qwen3 else (tc.image_token_index, tc.audio_token_index)
    side = max(1, int((P // 2) ** 0.5))
    n_img = side * side  # one merged row per 28 (32) px: 1024 rows = a 896 x 896 px image (1024 x 1024 for Qwen3)
    n_aud = min(P // 4, 13 * 20 if qwen3 else 25 * 10)  # 20 s (10 s) of audio
    n_txt = P - n_img - n_aud
    if n_txt < 3:
        raise ValueError(f"--prompt-tokens {P} is too short for an image and an audio clip")
    a, c = n_txt // 3, n_txt - 2 * (n_txt // 3)
    vid_tok = tc.video_token_id if qwen3 else tc.video_token_index
    hi = min(tc.text_config.vocab_size, 100_000, img_tok, aud_tok, vid_tok)  # below every placeholder id
    g = torch.Generator().manual_seed(0)
    text = lambda n: torch.randint(0, hi, (n,), generator=g)  # noqa: E731
    ids = torch.cat([text(a), torch.full((n_img,), img_tok), text(a), torch.full((n_aud,), aud_tok), text(c)])
    pos, p = [], 0
    for kind, n in (("t", a), ("i", n_img), ("t", a), ("t", n_aud), ("t", c)):
        if kind == "t":
            pos.append(torch.arange(p, p + n).expand(3, n))
            p += n
        else:
            hh, ww = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
            pos.append(torch.stack([torch.full((n,), p), p + hh.reshape(-1), p + ww.reshape(-1)]))
            p += side
    positions = torch.cat(pos, 1)[:, None].to(device)
    D = tc.text_config.hidden_size
    th = b.thinker
    rnd = lambda n: torch.randn(n, D, device=device, dtype=b.dtype) * 0.02  # noqa: E731
    ids_d = ids[None].to(device)
    if qwen3:
        n_levels = len(tc.vision_config.get("deepstack_visual_indexes", [8, 16, 24]))
        embeds, deepstack = th.embed(ids_d, image=(rnd(n_img), [rnd(n_img) for _ in range(n_levels)]), audio=rnd(n_aud))
    else:
        embeds, deepstack = th.embed(ids_d, image_embeds=rnd(n_img), audio_embeds=rnd(n_aud)), None
    return ids_d, embeds, positions, deepstack, p


def _forward(b: Built, embeds, positions, cache, slots, deepstack=None):
    if b.family == "qwen3_omni_moe":
        return b.thinker(embeds, positions, cache, slots, deepstack=deepstack)
    return b.thinker(embeds, positions, cache, slots)


@torch.inference_mode()
def thinker_stage(b: Built, o) -> dict:
    dev, th = b.device, b.thinker
    P, levels = o.prompt_tokens, o.levels
    ids, embeds, positions, deepstack, next_pos = _prompt(b, P, dev)
    cache = th.model.allocate_cache(max(levels), P + 2 * o.steps + 8)
    kv_alloc = sum(t.numel() * t.element_size() for t in cache.k + cache.v)
    slot0 = torch.tensor([0])
    _log(f"thinker: prefill of {P} rows (warm-up on {min(P, 64)})")
    w = min(P, 64)
    _forward(b, embeds[:, :w], positions[..., :w], cache, slot0)
    cache.reset(0)
    t0 = _now(dev)
    hidden = _forward(b, embeds, positions, cache, slot0, deepstack)
    tok = th.lm_head(hidden[:, -1]).argmax(-1)
    prefill_s = _now(dev) - t0
    out = {"prompt_rows": P, "prefill_s": prefill_s, "prefill_tok_s": P / prefill_s,
           "kv_bytes_per_token": b.kv_bytes_per_token(), "kv_allocated_gb": kv_alloc / 1e9, "decode": []}
    dense = sum(p.numel() * p.element_size() for n, p in th.model.named_parameters()
                if not n.startswith("embed") and ".experts." not in n) + nbytes(th.lm_head)
    bw = o.bandwidth_gbs
    for B in levels:
        out["decode"].append(_decode(b, cache, B, P, next_pos, tok, dense, bw, o.steps))
        d = out["decode"][-1]
        _log(f"thinker: decode x{B}: {d['step_ms']:.2f} ms/step, floor {d['floor_ms']:.2f} ms ({d['ratio']:.2f}x)")
    return out


def _decode(b: Built, cache, B: int, P: int, next_pos: int, first, dense: int, bw: float, steps: int) -> dict:
    """B conversations at context P, one batched step after another, the sampled token fed back on the device
    (as the engine does). Timed without hooks; then the same steps again counting the experts each routes to."""
    dev, th = b.device, b.thinker
    slots = torch.arange(B)
    routed: list[int] = []

    def run(timed: bool) -> list[float]:
        cache.lengths[:B] = P  # the KV rows are there (zeros read as fast as values)
        tok = first.view(1, 1).expand(B, 1).clone()
        res = []
        for s in range(steps):
            routed.clear()
            t0 = _now(dev) if timed else 0.0
            pos = torch.full((3, B, 1), next_pos + s, device=dev)
            h = th(th.model.embed_tokens(tok), pos, cache, slots)
            tok = th.lm_head(h[:, -1]).argmax(-1, keepdim=True)
            res.append(_now(dev) - t0 if timed else sum(routed))
            if timed and s and s % max(1, steps // 4) == 0:
                _log(f"thinker: decode x{B}: step {s}/{steps}")
        return res

    run(True)  # warm-up
    times = run(True)
    hooks = _count_routed(th.model.layers, routed)
    experts = statistics.median(run(False)) if hooks else 0
    for h in hooks:
        h.remove()
    kv = b.kv_bytes_per_token() * B * (P + steps // 2)
    step, nb = statistics.median(times), dense + experts + kv
    floor = nb / (bw * 1e9)
    return {"conversations": B, "step_ms": step * 1e3, "tok_s": B / step, "weights_read_gb": (dense + experts) / 1e9,
            "kv_read_gb": kv / 1e9, "floor_ms": floor * 1e3, "ratio": step / floor}


def _count_routed(layers, routed: list) -> list:
    """Forward hooks on each MoE layer's router: every forward appends the bytes of the distinct experts it
    routed to to `routed`. Returns the hooks (remove them after)."""
    hooks = []
    for layer in layers:
        ex = getattr(layer.mlp, "experts", None)
        if ex is not None:
            per = (ex.gate_up_proj[0].numel() + ex.down_proj[0].numel()) * ex.down_proj.element_size()
            hooks.append(layer.mlp.gate.register_forward_hook(
                lambda m, a, out, per=per: routed.append(per * int(out[0].unique().numel()))))
    return hooks


def _talker_prompt(b: Built, L: int):
    from omni.types import PromptStates, ThinkerStep

    D, dev = b.cfg.thinker_config.text_config.hidden_size, b.device
    rnd = lambda *s: torch.randn(*s, device=dev, dtype=b.dtype) * 0.02  # noqa: E731
    ps = PromptStates(torch.randint(0, 1000, (L,)), rnd(L, D), rnd(L, D), torch.arange(L).expand(3, L))
    return ps, lambda: ThinkerStep(1, rnd(D), rnd(D))


@torch.inference_mode()
def talker_stage(b: Built, o) -> dict:
    if b.family == "qwen3_omni_moe":
        return qwen3_talker_stage(b, o)
    from talker import talker as tl

    dev, tk = b.device, b.talker
    P, levels, steps = o.prompt_tokens, o.levels, o.steps
    emb = b.thinker.model.embed_tokens
    cache = tk.model.allocate_cache(max(levels), P + 2 * steps + 16)
    ps, step_in = _talker_prompt(b, P)
    tl.start(tk, emb, _talker_prompt(b, 16)[0], 1, step_in(), cache=cache, slot=0)  # warm-up
    t0 = _now(dev)
    tl.start(tk, emb, ps, 1, step_in(), cache=cache, slot=0)
    prefill_s = _now(dev) - t0
    out = {"prefill_rows": P + 2, "prefill_s": prefill_s, "kv_bytes_per_token": b.kv_bytes_per_token("talker"),
           "step": []}
    weights = nbytes(tk, skip=("model.embed_tokens",))
    short, _ = _talker_prompt(b, 8)
    for B in levels:
        states = [tl.start(tk, emb, short, 1, step_in(), 4096, cache, i) for i in range(B)]
        cache.lengths[:B] = P + 2  # at the context of a full prompt
        gens = [torch.Generator(device=dev).manual_seed(i) for i in range(B)]
        times = []
        for s in range(steps + 2):
            for st in states:
                tl.push(st, step_in())
            t0 = _now(dev)  # as the engine steps: this step's codes stay on the device, the step before's are read
            tl.draw_batch(tk, states, [tl.TALKER_SAMPLING] * B, gens, min_codes=10**6)
            tl.read_codes(tk, states, keep=1)
            if s >= 2:  # two warm-up steps
                times.append(_now(dev) - t0)
        step = statistics.median(times)
        nb = weights + b.kv_bytes_per_token("talker") * B * (P + steps)
        floor = nb / (o.bandwidth_gbs * 1e9)
        out["step"].append({"conversations": B, "step_ms": step * 1e3, "codes_s": B / step,
                            "floor_ms": floor * 1e3, "ratio": step / floor})
        _log(f"talker: step x{B}: {step * 1e3:.2f} ms, floor {floor * 1e3:.2f} ms")
    return out


def _voice(b: Built, i: int):
    dc = b.cfg.token2wav_config.dit_config
    g = torch.Generator().manual_seed(100 + i)
    return torch.randn(1, dc.enc_emb_dim, generator=g), torch.randn(1, 300, dc.mel_dim, generator=g) - 5


@torch.inference_mode()
def token2wav_stage(b: Built, o) -> dict:
    t2w, dev = b.t2w, b.device
    opt = t2w.opt
    first = opt.chunk_codes + opt.ahead_codes
    hi = t2w.dit.cfg.num_embeds - 1  # codes 0 .. num_embeds - 2
    codes = lambda n, i: torch.randint(0, hi, (n,), generator=torch.Generator().manual_seed(i)).tolist()  # noqa: E731
    sr = 24000
    st = t2w.start(*_voice(b, 0), torch.Generator().manual_seed(0))
    t0 = _now(dev)
    wave = t2w.push(st, codes(first, 0))
    window_s = _now(dev) - t0
    out = {"first_window_codes": first, "first_window_s": window_s,
           "first_window_audio_s": sum(w.numel() for w in wave) / sr, "rtf": []}
    _log(f"token2wav: first window ({first} codes) {window_s:.2f} s")
    n = int(o.speech_seconds * 50)
    if n <= first:
        return out
    for B in o.levels:
        states = [t2w.start(*_voice(b, i), torch.Generator().manual_seed(i)) for i in range(B)]
        streams = [codes(n, i) for i in range(B)]
        samples = 0
        t0 = _now(dev)
        for k in range(n):  # one code per conversation per Talker step, as they arrive
            for s, c in zip(states, streams):
                t2w.add(s, [c[k]])
            if all(t2w.codes_until_ready(s) == 0 for s in states) or k == n - 1:
                samples += sum(w.numel() for ws in t2w.advance(states) for w in ws)
            if k and k % max(1, n // 4) == 0:
                _log(f"token2wav x{B}: {k}/{n} codes")
        for s in states:
            s.finished = True
        samples += sum(w.numel() for ws in t2w.advance(states) for w in ws)
        wall = _now(dev) - t0
        audio = samples / sr / B
        out["rtf"].append({"conversations": B, "wall_s": wall, "audio_s_each": audio, "rtf": wall / audio})
        _log(f"token2wav x{B}: RTF {wall / audio:.3f}")
    return out


@torch.inference_mode()
def ttfa_stage(b: Built, o) -> list[dict]:
    """Time to first audio for B conversations sent a prompt at once, lengths forced (no stop is honoured):
    each prompt prefilled in turn, then one batched Thinker step, Talker step and Token2Wav advance after
    another (the engine's stage functions, not its scheduler) until every conversation has audio."""
    if b.family == "qwen3_omni_moe":
        return qwen3_ttfa_stage(b, o)
    from omni.types import PromptStates, ThinkerStep
    from talker import talker as tl

    dev, th, tk, t2w = b.device, b.thinker, b.talker, b.t2w
    P = o.prompt_tokens
    res = []
    for B in o.levels:
        _, embeds, positions, _, next_pos = _prompt(b, P, dev)
        ids = torch.zeros(P, dtype=torch.long)
        cache = th.model.allocate_cache(B, P + 64)
        tcache = tk.model.allocate_cache(B, P + 96)
        t0 = _now(dev)
        prompts, toks, ttfa = [], [], [None] * B
        for i in range(B):
            h = th(embeds, positions, cache, torch.tensor([i]))
            prompts.append(PromptStates(ids, embeds[0], h[0], positions[:, 0].cpu()))
            toks.append(th.lm_head(h[:, -1]).argmax(-1, keepdim=True))
        tok = torch.cat(toks)
        slots = torch.arange(B)
        talkers = t2ws = None
        gens = [torch.Generator(device=dev).manual_seed(i) for i in range(B)]
        for s in range(60):
            e = th.model.embed_tokens(tok)
            h = th(e, torch.full((3, B, 1), next_pos + s, device=dev), cache, slots)
            tok = th.lm_head(h[:, -1]).argmax(-1, keepdim=True)
            steps = [ThinkerStep(0, e[i, 0], h[i, 0]) for i in range(B)]
            if talkers is None:
                talkers = [tl.start(tk, th.model.embed_tokens, prompts[i], 1, steps[i], 4096, tcache, i) for i in range(B)]
                t2ws = [t2w.start(*_voice(b, i), torch.Generator().manual_seed(i)) for i in range(B)]
                continue
            codes = tl.step_batch(tk, talkers, [tl.TALKER_GREEDY] * B, gens, min_codes=10**6)
            for i, c in enumerate(codes):
                tl.push(talkers[i], steps[i])
                if c is not None:  # random weights may pick a codec special: any code will do for speed
                    t2w.add(t2ws[i], [min(c, t2w.dit.cfg.num_embeds - 2)])
            for i, waves in enumerate(t2w.advance(t2ws)):
                if waves and ttfa[i] is None:
                    ttfa[i] = _now(dev) - t0
            if all(x is not None for x in ttfa):
                break
        done = [x for x in ttfa if x is not None]
        res.append({"conversations": B, "ttfa_p50_s": statistics.median(done) if done else None,
                    "ttfa_max_s": max(done) if done else None, "thinker_steps": s})
        _log(f"ttfa x{B}: median {res[-1]['ttfa_p50_s']}")
    return res


FRAME_S = 0.08  # Qwen3's codec: 12.5 frames per second of speech


def _qwen3_user_turn(b: Built, L: int) -> torch.Tensor:
    """(L,) ids as the Talker sees a prompt of L rows: a user turn of L - 3 rows (`<|im_start|>user`, text,
    `<|im_end|>`), then `<|im_start|>assistant\n`. Text ids only: a media row costs the same (hidden_projection
    is text_projection's shape) and needs grids that speed does not depend on."""
    c, tc = b.cfg, b.cfg.thinker_config
    hi = min(tc.text_config.vocab_size, 100_000, c.im_start_token_id, c.im_end_token_id, c.tts_eos_token_id,
             c.tts_bos_token_id, c.tts_pad_token_id, tc.audio_token_id, tc.image_token_id, tc.video_token_id,
             tc.audio_start_token_id, tc.vision_start_token_id)
    body = torch.randint(0, hi, (L - 6,), generator=torch.Generator().manual_seed(L))
    return torch.cat([torch.tensor([c.im_start_token_id, c.user_token_id]), body,
                      torch.tensor([c.im_end_token_id, c.im_start_token_id, c.assistant_token_id, body[0]])])


def _qwen3_talker_start(b: Built, ids, embeds, hidden, cache, slot: int, frames: int, token: int = 1):
    """What the engine does with a prefilled prompt: its user rows (`prefill_rows`), the Talker's prefill
    (`start`), reply token 0 pushed; codec eos blocked for `frames` frames (lengths forced)."""
    from talker import qwen3_omni_talker as tl

    prompt = tl.prefill_rows(b.talker, ids, embeds, hidden)
    state = tl.start(b.talker, prompt, b.thinker.model.embed_tokens, "ethan", cache=cache, slot=slot,
                     max_frames=frames, min_frames=frames)
    tl.push(state, token)
    return state


@torch.inference_mode()
def qwen3_talker_stage(b: Built, o) -> dict:
    """The Talker's prefill of a P-row prompt, then one frame per conversation per step (`step_batch`, the
    engine's sampling) at the context of that prompt, against the bytes a step reads."""
    from talker import qwen3_omni_talker as tl

    dev, tk, emb = b.device, b.talker, b.thinker.model.embed_tokens
    P, levels, steps = o.prompt_tokens, o.levels, o.steps
    D = b.cfg.thinker_config.text_config.hidden_size
    frames = steps + 8
    cache = tk.model.allocate_cache(max(levels), P + 9 + frames + 1)
    ids = _qwen3_user_turn(b, P)
    hidden = torch.randn(P, D, device=dev, dtype=b.dtype) * 0.02  # the accept layer's rows (media rows only read)
    short = _qwen3_user_turn(b, 16)
    st = _qwen3_talker_start(b, short, emb(short.to(dev)), hidden[:16], cache, 0, frames)  # warm-up
    tl.step_batch(tk, [st], [tl.TALKER_SAMPLING], [torch.Generator(device=dev).manual_seed(0)])
    t0 = _now(dev)
    st = _qwen3_talker_start(b, ids, emb(ids.to(dev)), hidden, cache, 0, frames)
    prefill_s = _now(dev) - t0
    rows = int(cache.lengths[0])
    out = {"prefill_rows": rows, "prefill_s": prefill_s, "prefill_tok_s": rows / prefill_s,
           "kv_bytes_per_token": b.kv_bytes_per_token("talker"), "frame_s": FRAME_S, "step": []}
    _log(f"talker: prefill of {rows} rows {prefill_s:.3f} s")
    routed: list[int] = []
    for B in levels:
        states = [_qwen3_talker_start(b, short, emb(short.to(dev)), hidden[:16], cache, i, frames) for i in range(B)]
        cache.lengths[:B] = rows  # at the context of the full prompt (its KV rows read as fast as these)
        gens = [torch.Generator(device=dev).manual_seed(i) for i in range(B)]
        times, counted = [], []
        for s in range(steps + 4):  # two warm-up steps, the timed ones, two counting the routed experts
            hooks = _count_routed(tk.model.layers, routed) if s >= steps + 2 else []
            routed.clear()
            t0 = _now(dev)
            tl.step_batch(tk, states, [tl.TALKER_SAMPLING] * B, gens)
            dt = _now(dev) - t0
            for h in hooks:
                h.remove()
            for i, st in enumerate(states):
                tl.push(st, 1 + (s * 7 + i) % 1000)  # the next reply token (its id does not change the work)
            if hooks:
                counted.append(sum(routed))
            elif s >= 2:
                times.append(dt)
        step = statistics.median(times)
        dense, _, kv = qwen3_talker_bytes(b, B, rows + steps // 2)
        experts = statistics.median(counted)
        floor = (dense + experts + kv) / (o.bandwidth_gbs * 1e9)
        out["step"].append({"conversations": B, "step_ms": step * 1e3, "frames_s": B / step,
                            "speech_x_real_time": B * FRAME_S / step, "weights_read_gb": (dense + experts) / 1e9,
                            "kv_read_gb": kv / 1e9, "floor_ms": floor * 1e3, "ratio": step / floor})
        _log(f"talker: step x{B}: {step * 1e3:.2f} ms per frame, floor {floor * 1e3:.2f} ms")
        for st in states:
            st.reset()
    return out


def _codes(b: Built, B: int, n: int, seed: int = 0) -> torch.Tensor:
    c = b.c2w.cfg
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, c.codebook_size, (B, c.num_quantizers, n), generator=g).to(b.device)


@torch.inference_mode()
def code2wav_stage(b: Built, o) -> dict:
    """Streamed (one frame per stream per batched `advance`, as frames come from Talker steps; the chunk grid
    decides when the conv stack runs; the last call `final`) against one-shot `forward` on the same codes."""
    c2w, dev = b.c2w, b.device
    sr = round(c2w.samples_per_frame / FRAME_S)
    n = max(2, round(o.speech_seconds / FRAME_S))
    warm = _codes(b, 1, min(n, 4), 99)
    for _ in range(2):  # warm-up, then the first chunk timed: one frame -> out_len(1) samples
        st = c2w.start()
        t0 = _now(dev)
        first = c2w.advance([st], [warm[0, :, :1]])[0]
        first_s = _now(dev) - t0
    c2w(warm)
    out = {"frames": n, "first_chunk_frames": 1, "first_chunk_samples": first.numel(), "first_chunk_s": first_s,
           "context_frames": c2w.context_frames, "max_chunk_frames": st.max_chunk_frames, "rtf": []}
    _log(f"code2wav: first chunk (1 frame -> {first.numel()} samples) {first_s * 1e3:.1f} ms")
    for B in o.levels:
        codes = _codes(b, B, n, B)
        streams = [c2w.start() for _ in range(B)]
        samples = [0] * B
        t0 = _now(dev)
        for k in range(n):
            waves = c2w.advance(streams, [codes[i, :, k:k + 1] for i in range(B)], final=[k == n - 1] * B)
            for i, w in enumerate(waves):
                samples[i] += w.numel()
            if k and k % max(1, n // 4) == 0:
                _log(f"code2wav x{B}: {k}/{n} frames")
        wall = _now(dev) - t0
        t0 = _now(dev)
        one = c2w(codes)
        one_s = _now(dev) - t0
        audio = samples[0] / sr
        out["rtf"].append({"conversations": B, "samples_each": samples[0], "samples_min": min(samples),
                           "expected_samples": c2w.out_len(n), "oneshot_samples": one.shape[-1],
                           "wall_s": wall, "oneshot_s": one_s, "audio_s_each": audio,
                           "rtf": wall / audio, "oneshot_rtf": one_s / audio, "stream_over_oneshot": wall / one_s})
        _log(f"code2wav x{B}: RTF {wall / audio:.3f} streamed, {one_s / audio:.3f} one-shot")
    return out


@torch.inference_mode()
def qwen3_ttfa_stage(b: Built, o) -> list[dict]:
    """Time to first audio for B conversations sent a prompt at once, lengths forced (no stop honoured), in
    the engine's order (streaming/engine.py `_run`): each iteration prefills one waiting prompt (Thinker
    prefill capturing the Talker's accept layer, `prefill_rows`, the Talker's `start`, reply token 0 pushed
    at once), steps the Thinker over the conversations prefilled before, steps the Talker over those ready,
    advances Code2Wav over the frames made. Conversation 0's first audio is split into its parts; then on
    until every conversation has --speech-seconds of speech."""
    from talker import qwen3_omni_talker as tl

    dev, th, tk, c2w = b.device, b.thinker, b.talker, b.c2w
    P, k = o.prompt_tokens, tk.cfg.accept_hidden_layer
    frames = max(2, round(o.speech_seconds / FRAME_S))
    ids = _qwen3_user_turn(b, P)
    res = []
    for B in o.levels:
        _, embeds, positions, deepstack, next_pos = _prompt(b, P, dev)
        cache = th.model.allocate_cache(B, P + frames + 8)
        tcache = tk.model.allocate_cache(B, P + 9 + frames + 1)
        gens = [torch.Generator(device=dev).manual_seed(i) for i in range(B)]
        talkers, streams, toks = [], [c2w.start() for _ in range(B)], []
        made, ttfa, parts = [0] * B, [None] * B, {}
        t0 = _now(dev)
        it = 0
        while any(m < frames for m in made) or not all(s.finished for s in streams):
            active = len(talkers)  # prefilled before this iteration
            if it < B:
                h, cap = th(embeds, positions, cache, torch.tensor([it]), deepstack=deepstack, capture_layer=k)
                toks.append(th.lm_head(h[:, -1]).argmax(-1))
                if it == 0:
                    parts["first_prefill_s"] = _now(dev) - t0
                talkers.append(_qwen3_talker_start(b, ids, embeds[0], cap[0], tcache, it, frames, int(toks[-1])))
                if it == 0:
                    parts["first_talker_prefill_s"] = _now(dev) - t0 - parts["first_prefill_s"]
            if active:
                tok = torch.cat(toks[:active])[:, None]
                pos = torch.tensor([next_pos + len(talkers[i].frames) for i in range(active)], device=dev)
                h = th(th.model.embed_tokens(tok), pos.view(1, active, 1).expand(3, active, 1), cache, torch.arange(active))
                new = th.lm_head(h[:, -1]).argmax(-1)
                for i, t in enumerate(new.tolist()):  # the host reads the tokens: the Talker takes ids
                    toks[i] = new[i:i + 1]
                    if made[i] < frames:
                        tl.push(talkers[i], t)
            go = [i for i, st in enumerate(talkers) if tl.ready(st)]
            if go:
                t1 = _now(dev) if 0 in go and not made[0] else None
                got = tl.step_batch(tk, [talkers[i] for i in go], [tl.TALKER_SAMPLING] * len(go), [gens[i] for i in go])
                if t1 is not None:
                    parts["first_frame_s"] = _now(dev) - t1
                feed = [(i, f) for i, f in zip(go, got) if f is not None]
                for i, _ in feed:
                    made[i] += 1
                t2 = _now(dev) if parts.get("first_chunk_s") is None else None
                waves = c2w.advance([streams[i] for i, _ in feed], [f[:, None] for _, f in feed],
                                    final=[made[i] >= frames for i, _ in feed])
                for (i, _), w in zip(feed, waves):
                    if w.numel() and ttfa[i] is None:
                        ttfa[i] = _now(dev) - t0
                        if i == 0:
                            parts["first_chunk_s"] = _now(dev) - t2
                            parts["first_chunk_samples"] = w.numel()
            it += 1
            if it > B + 4 * frames + 8:
                raise RuntimeError(f"ttfa x{B}: no progress after {it} iterations (frames made {made})")
        total = _now(dev) - t0
        res.append({"conversations": B, "ttfa_p50_s": statistics.median(ttfa), "ttfa_max_s": max(ttfa),
                    **parts,
                    "frames_each": frames, "total_s": total, "iterations": it,
                    "speech_x_real_time": B * frames * FRAME_S / total})
        _log(f"ttfa x{B}: median {res[-1]['ttfa_p50_s']:.3f} s, all {frames} frames in {total:.2f} s")
    return res


def run_shape(name: str, o) -> dict:
    """o: device, dtype, stages, levels, prompt_tokens, steps, speech_seconds, dry. Returns the figures."""
    dev = torch.device(o.device)
    raw = read_shape(name, o.dry)
    family = raw["model_type"]
    stages = [s for s in (o.stages or STAGES[family])]
    unknown = set(stages) - set(STAGES[family])
    if unknown:
        raise ValueError(f"unknown stage(s) {', '.join(sorted(unknown))} for {name}; choose from {', '.join(STAGES[family])}")
    o.stages = stages
    o.bandwidth_gbs = bandwidth_gbs(dev)
    tflops = matmul_tflops(dev, o.dtype)
    tflops32 = matmul_tflops(dev, torch.float32) if {"code2wav", "ttfa"} & set(stages) and o.dtype != torch.float32 else tflops
    _log(f"{name}{' (--dry)' if o.dry else ''} on {dev} in {str(o.dtype).removeprefix('torch.')}: "
         f"{o.bandwidth_gbs:.1f} GB/s, {tflops:.2f} TFLOP/s (matmul); building {', '.join(o.stages) or 'nothing'}")
    t0 = time.perf_counter()
    b = Built(raw, dev, o.dtype, set(o.stages))
    _log(f"built in {time.perf_counter() - t0:.1f} s; this run will take about "
         f"{estimate_s(b, o, o.bandwidth_gbs, tflops, tflops32):.0f} s more")
    res = {"shape": name, "dry": o.dry, "source": raw.get("_source"), "unverified": raw.get("_unverified", []),
           "device": str(dev), "dtype": str(o.dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
           "bandwidth_gb_s": o.bandwidth_gbs, "matmul_tflops": tflops, "init_s": b.init_s,
           "params_b": {k: v / 1e9 for k, v in b.params.items()},
           "weights_gb": {k: v / 1e9 for k, v in b.weight_bytes().items()}}
    fns = {"thinker": thinker_stage, "talker": talker_stage, "token2wav": token2wav_stage, "code2wav": code2wav_stage,
           "ttfa": ttfa_stage}
    for s in o.stages:
        t1 = time.perf_counter()
        res[s] = fns[s](b, o)
        _log(f"{s} done in {time.perf_counter() - t1:.1f} s")
    res["wall_s"] = time.perf_counter() - t0
    res["peak_memory_gb"] = (torch.cuda.max_memory_allocated(dev) / 1e9 if dev.type == "cuda" else
                             next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) * 1024 / 1e9)
    return res


def report(r: dict) -> str:
    lines = [f"{r['shape']}{' (--dry, tiny shape)' if r['dry'] else ''} on {r['device']} ({r['dtype']}, "
             f"{r['threads']} threads): bandwidth {r['bandwidth_gb_s']:.1f} GB/s, peak memory {r['peak_memory_gb']:.2f} GB",
             "  params (B): " + ", ".join(f"{k} {v:.3f}" for k, v in r["params_b"].items()),
             "  built weights (GB): " + ", ".join(f"{k} {v:.2f}" for k, v in r["weights_gb"].items()),
             "  init (s): " + ", ".join(f"{k} {v:.2f}" for k, v in r["init_s"].items())]
    rows = []
    if "thinker" in r:
        t = r["thinker"]
        lines.append(f"  thinker: KV {t['kv_bytes_per_token'] / 1024:.1f} KiB/token; prefill {t['prompt_rows']} rows "
                     f"{t['prefill_s']:.3f} s = {t['prefill_tok_s']:.0f} tok/s")
        rows += [("thinker step", d["conversations"], d["step_ms"], d["floor_ms"], d["ratio"], f"{d['tok_s']:.1f} tok/s")
                 for d in t["decode"]]
    if "talker" in r:
        t = r["talker"]
        lines.append(f"  talker: prefill {t['prefill_rows']} rows {t['prefill_s']:.3f} s"
                     + (f"; a step is one frame ({t['frame_s'] * 1e3:.0f} ms of speech) per conversation" if "frame_s" in t else ""))
        rows += [("talker step", d["conversations"], d["step_ms"], d["floor_ms"], d["ratio"],
                  f"{d['frames_s']:.1f} frames/s = {d['speech_x_real_time']:.2f}x real time" if "frames_s" in d
                  else f"{d['codes_s']:.1f} codes/s") for d in t["step"]]
    if "token2wav" in r:
        t = r["token2wav"]
        lines.append(f"  token2wav: first window ({t['first_window_codes']} codes -> {t['first_window_audio_s']:.2f} s "
                     f"of audio) {t['first_window_s']:.3f} s")
        rows += [("token2wav", d["conversations"], None, None, None, f"RTF {d['rtf']:.3f}") for d in t["rtf"]]
    if "code2wav" in r:
        t = r["code2wav"]
        lines.append(f"  code2wav (fp32): first chunk (1 frame -> {t['first_chunk_samples']} samples) "
                     f"{t['first_chunk_s'] * 1e3:.1f} ms; {t['frames']} frames streamed on the chunk grid 1, 2, 4, .., "
                     f"{t['max_chunk_frames']} ({t['context_frames']} frames of context)")
        rows += [("code2wav", d["conversations"], None, None, None,
                  f"RTF {d['rtf']:.3f} streamed, {d['oneshot_rtf']:.3f} one-shot ({d['stream_over_oneshot']:.2f}x)")
                 for d in t["rtf"]]
    rows += [("first audio", d["conversations"], None, None, None,
              f"p50 {d['ttfa_p50_s']:.3f} s, max {d['ttfa_max_s']:.3f} s" if d["ttfa_p50_s"] is not None else "-")
             for d in r.get("ttfa", [])]
    for d in r.get("ttfa", []):
        if "first_chunk_s" in d:
            lines.append(f"  first audio x{d['conversations']}, conversation 0: Thinker prefill {d['first_prefill_s']:.3f} s"
                         f" + Talker prefill {d['first_talker_prefill_s']:.3f} s + first frame {d['first_frame_s']:.3f} s"
                         f" + first chunk ({d['first_chunk_samples']} samples) {d['first_chunk_s']:.3f} s; "
                         f"{d['frames_each']} frames each in {d['total_s']:.2f} s ({d['speech_x_real_time']:.2f}x real time)")
    if rows:
        cells = [("stage", "convs", "step ms", "floor ms", "x floor", "throughput")] + [
            (a, str(n), "-" if s is None else f"{s:.2f}", "-" if f is None else f"{f:.2f}", "-" if x is None else f"{x:.2f}", t)
            for a, n, s, f, x, t in rows]
        w = [max(len(c[i]) for c in cells) for i in range(6)]
        lines += ["  " + "  ".join(v.ljust(w[i]) if i in (0, 5) else v.rjust(w[i]) for i, v in enumerate(c)) for c in cells]
    if r["unverified"]:
        lines.append("  shape values not verified against the published file: " + "; ".join(r["unverified"]))
    return "\n".join(lines)
