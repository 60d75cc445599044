"""The checks a CUDA machine must pass, run on every machine: on `cuda` when there is one, otherwise the same
checks on the CPU at tiny shapes (so they are proven before any GPU is seen). scripts/device-check runs them.

bf16 tolerance: logits of a bf16 model stay within BF16_TOL of the fp32 model's largest logit. bf16 keeps
8 significant bits (relative rounding 2^-8 = 0.4 %); a few layers of products accumulate a few roundings.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from omni.bench_shapes import Built, _prompt, read_shape
from omni.pipeline import GenerationResult, OmniModel
from omni.sampling import GREEDY
from omni.types import Done, Message, TextDelta
from streaming.engine import Engine, EngineConfig

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BF16_TOL = 3e-2  # of the fp32 logits' largest magnitude


def _pair(parts: set[str]) -> tuple[Built, Built]:
    """The tiny Qwen2.5 shape built twice on DEVICE: fp32 random weights, and the same values in bf16."""
    raw = read_shape("qwen2.5-omni-7b", dry=True)
    ref, low = Built(raw, DEVICE, torch.float32, parts), Built(raw, DEVICE, torch.bfloat16, parts)
    for a, b in ((ref.thinker, low.thinker), (ref.talker, low.talker)):
        if a is None:
            continue
        with torch.no_grad():
            for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
                if not p.is_meta:
                    q.copy_(p.to(q.dtype))
    return ref, low


def _close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    err = (got.float() - want.float()).abs().max().item() / want.float().abs().max().item()
    assert err <= BF16_TOL, f"{what}: bf16 differs from fp32 by {err:.4f} of the logits' scale (> {BF16_TOL})"


@torch.inference_mode()
def test_bf16_thinker_decode_matches_fp32():
    ref, low = _pair({"thinker"})
    logits = {}
    for b in (ref, low):
        th = b.thinker
        torch.manual_seed(0)  # the same random encoder outputs for both
        _, embeds, positions, _, p = _prompt(b, 64, DEVICE)
        cache = th.model.allocate_cache(1, 96)
        slot = torch.tensor([0])
        rows = [th.lm_head(th(embeds, positions, cache, slot)[:, -1])]
        tok = rows[0].argmax(-1, keepdim=True) if b is ref else logits["ref_tokens"][0]
        fed = [tok]
        for s in range(8):  # teacher-forced: both models are fed the fp32 model's greedy tokens
            rows.append(th.lm_head(th(th.model.embed_tokens(tok), torch.full((3, 1, 1), p + s, device=DEVICE),
                                      cache, slot)[:, -1]))
            tok = rows[-1].argmax(-1, keepdim=True) if b is ref else logits["ref_tokens"][s + 1]
            fed.append(tok)
        logits[b.dtype] = torch.cat(rows)
        if b is ref:
            logits["ref_tokens"] = fed
    _close(logits[torch.bfloat16], logits[torch.float32], f"thinker prefill + 8 decode steps on {DEVICE}")


@torch.inference_mode()
def test_bf16_batched_decode_matches_solo():
    """Four conversations at different lengths in one decode step equal each one alone, within BF16_TOL."""
    _, low = _pair({"thinker"})
    th = low.thinker
    lengths = [40, 64, 17, 52]
    _, embeds, positions, _, _ = _prompt(low, 64, DEVICE)
    cache = th.model.allocate_cache(4, 80)
    tok = torch.tensor([[5], [6], [7], [8]], device=DEVICE)
    solo = []
    for i, L in enumerate(lengths):
        cache.reset(i)
        th(embeds[:, :L], positions[..., :L], cache, torch.tensor([i]))
        solo.append(th.lm_head(th(th.model.embed_tokens(tok[i:i + 1]), torch.full((3, 1, 1), 200, device=DEVICE),
                                  cache, torch.tensor([i]))[:, -1]))
        cache.lengths[i] = L
    batched = th.lm_head(th(th.model.embed_tokens(tok), torch.full((3, 4, 1), 200, device=DEVICE), cache,
                            torch.arange(4))[:, -1])
    _close(batched, torch.cat(solo), f"4 batched conversations vs solo on {DEVICE}")


@torch.inference_mode()
def test_bf16_talker_matches_fp32():
    from talker import talker as tl
    from omni.types import PromptStates, ThinkerStep

    ref, low = _pair({"talker"})
    g = torch.Generator().manual_seed(0)
    D = ref.cfg.thinker_config.text_config.hidden_size
    prompt = PromptStates(torch.arange(20), torch.randn(20, D, generator=g), torch.randn(20, D, generator=g),
                          torch.arange(20).expand(3, 20))
    steps = [ThinkerStep(1, torch.randn(D, generator=g), torch.randn(D, generator=g)) for _ in range(6)]
    got = {}
    for b in (ref, low):
        cast = lambda x: x.to(DEVICE, b.dtype)  # noqa: E731
        ps = PromptStates(prompt.input_ids, cast(prompt.embeds), cast(prompt.hidden), prompt.positions)
        st = tl.start(b.talker, b.thinker.model.embed_tokens, ps, 1, ThinkerStep(1, cast(steps[0].embed),
                                                                                 cast(steps[0].hidden)))
        rows = []
        for s in steps[1:]:
            tl.step(b.talker, st, ThinkerStep(1, cast(s.embed), cast(s.hidden)), tl.TALKER_GREEDY, min_codes=99)
            rows.append(st.last_logits)
        got[b.dtype] = torch.cat(rows)
    # the codes each drew may differ on near-ties; the first step's logits follow the same inputs
    _close(got[torch.bfloat16][:1], got[torch.float32][:1], f"talker prefill logits on {DEVICE}")


@torch.inference_mode()
def test_talker_step_waits_for_nothing():
    """The Talker's batched step as the engine runs it (talker.draw_batch: forward, sampling, the codes fed back
    on the device) only queues work. On CUDA every call in it that would wait for the device raises
    (torch.cuda.set_sync_debug_mode("error")); on the CPU the same claim is the read count: nothing read but
    the decoder's own KV bookkeeping (tests/reads.py). The codes reach the host a step later (read_codes)."""
    from omni.types import PromptStates, ThinkerStep
    from talker import talker as tl
    from tests.reads import ScalarReads

    _, low = _pair({"talker"})
    tk, emb = low.talker, low.thinker.model.embed_tokens
    g = torch.Generator().manual_seed(0)
    D = low.cfg.thinker_config.text_config.hidden_size
    on = lambda *s: torch.randn(*s, generator=g).to(DEVICE, low.dtype)  # noqa: E731
    cache = tk.model.allocate_cache(3, 64)
    states = [tl.start(tk, emb, PromptStates(torch.arange(12), on(12, D), on(12, D), torch.arange(12).expand(3, 12)),
                       1, ThinkerStep(1, on(D), on(D)), cache=cache, slot=i) for i in range(3)]
    gens = [torch.Generator(device=DEVICE).manual_seed(i) for i in range(3)]
    forward, reads = tk.forward, {}

    def counted(*a, **k):
        with ScalarReads() as r:
            out = forward(*a, **k)
        reads["forward"] = r.n
        return out

    tk.forward = counted  # an instance attribute: only this built copy counts
    try:
        for s in range(4):  # the first step draws from the prefill's logits, the others run a forward
            for st in states:
                tl.push(st, ThinkerStep(1, on(D), on(D)))
            reads["forward"] = 0
            if DEVICE.type == "cuda":
                torch.cuda.set_sync_debug_mode("error")
            try:
                with ScalarReads() as r:
                    tl.draw_batch(tk, states, [tl.TALKER_SAMPLING] * 3, gens, min_codes=10**6)
            finally:
                if DEVICE.type == "cuda":
                    torch.cuda.set_sync_debug_mode(0)
            assert r.n == reads["forward"] <= 4, (s, r.n, reads)
            new = tl.read_codes(tk, states, keep=1)
            assert [len(c) for c in new] == [0 if s == 0 else 1] * 3 and all(len(st.unread) == 1 for st in states)
    finally:
        del tk.forward
    assert [len(c) for c in tl.read_codes(tk, states)] == [1, 1, 1] and all(len(st.codes) == 4 for st in states)


@pytest.fixture(scope="module")
def model(embedded_dir):
    return OmniModel.load(embedded_dir, device=str(DEVICE), dtype=torch.bfloat16, speech=False)


QUESTIONS = ["What is happening here?", "Tell me a story about a cat.", "Why is the sky blue?", "Count to ten."]


@torch.inference_mode()
def _solo(model, q: str, n: int) -> tuple[list[int], list[float]]:
    """Greedy tokens alone, and at each one the gap between the top two logits it was chosen from."""
    r = GenerationResult()
    list(model.generate_text(model.processor([Message.of("user", q)]), n, GREEDY, result=r))
    prompt = model.processor([Message.of("user", q)])
    cache = model.allocate_cache(1, len(prompt) + n + 1)
    _, _, logits = model.prefill(prompt, cache, 0)
    gaps, pos = [], prompt.next_position
    for t in r.token_ids:
        top = logits.float().topk(2).values[0]
        gaps.append(((top[0] - top[1]) / logits.float().abs().max()).item())
        _, _, logits = model.decode(torch.tensor([[t]], device=model.device), model.decode_positions([pos]).to(model.device),
                                    cache, torch.tensor([0]))
        pos += 1
    return r.token_ids, gaps


def test_four_concurrent_conversations_equal_solo(model):
    """Through the engine on DEVICE in bf16: each reply equals the solo run up to the first token whose
    choice was a near-tie (top-2 gap under BF16_TOL), where bf16 makes no promise."""
    eng = Engine(model, EngineConfig(max_sessions=4, max_context=512, max_new_tokens=16))

    async def main():
        async def one(c, q):
            return [e.token_id async for e in c.respond([q], sampling=GREEDY, min_new_tokens=16)
                    if isinstance(e, TextDelta)]
        return await asyncio.gather(*(one(eng.open_conversation(), q) for q in QUESTIONS))

    try:
        got = asyncio.run(main())
    finally:
        eng.shutdown()
    for q, tokens in zip(QUESTIONS, got):
        want, gaps = _solo(model, q, 16)
        sure = next((i for i, g in enumerate(gaps) if g < BF16_TOL), len(want))
        assert tokens[:sure] == want[:sure], (q, tokens, want, gaps)
        assert len(tokens) == 16


def test_cancel_mid_reply(model):
    eng = Engine(model, EngineConfig(max_sessions=1, max_context=1024, events_buffered=1))

    async def main():
        conv = eng.open_conversation()
        got, final = [], None
        async for ev in conv.respond(["Tell me a long story."], sampling=GREEDY, max_new_tokens=200, min_new_tokens=200):
            if isinstance(ev, TextDelta):
                got.append(ev.token_id)
                if len(got) == 3:
                    conv.cancel()
            else:
                final = ev
        after = [e async for e in conv.respond(["Shorter."], sampling=GREEDY, max_new_tokens=4)]
        return got, final, after

    try:
        got, final, after = asyncio.run(main())
    finally:
        eng.shutdown()
    assert isinstance(final, Done) and final.status == "cancelled"
    assert 3 <= len(got) <= 4  # within one decode step
    assert isinstance(after[-1], Done) and any(isinstance(e, TextDelta) for e in after)  # the conversation goes on


def test_speech_worker_on_its_own_stream_equals_one_worker(embedded_dir):
    """The speech decoder on its own worker (on CUDA: its own stream, the default there) speaks as the engine's
    worker does alone: the same codes, the same wave."""
    import numpy as np

    from omni.types import AudioDelta
    from talker.talker import TALKER_GREEDY

    speaking = OmniModel.load(embedded_dir, device=str(DEVICE), speech=True)

    def run(speech_worker: bool):
        eng = Engine(speaking, EngineConfig(max_sessions=2, max_context=512, max_new_tokens=6, max_codes=40,
                                            speech_worker=speech_worker))

        async def main():
            async def one(c, q):
                return [e async for e in c.respond([q], modalities=("text", "audio"), sampling=GREEDY,
                                                   talker_sampling=TALKER_GREEDY, seed=1, min_codes=40)]
            return await asyncio.gather(*(one(eng.open_conversation(), q) for q in QUESTIONS[:2]))

        try:
            return asyncio.run(main())
        finally:
            eng.shutdown()

    for split, alone in zip(run(True), run(False)):
        assert split[-1].codec_ids == alone[-1].codec_ids and len(split[-1].codec_ids) == 40
        wave = [np.frombuffer(b"".join(e.pcm for e in ev if isinstance(e, AudioDelta)), "<i2") for ev in (split, alone)]
        assert len(wave[0]) == len(wave[1]) and np.abs(wave[0].astype(int) - wave[1].astype(int)).max() <= 4
