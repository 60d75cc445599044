"""The engine: batched conversations equal solo runs, kept caches equal fresh runs, cancel, limits."""

from __future__ import annotations

import asyncio

import pytest
import torch

from omni.pipeline import GenerationResult, OmniModel
from omni.sampling import GREEDY, SamplingParams
from omni.types import Done, Error, Image, Message, TextDelta
from omni.processor import Prompt
from omni.rope import rope_positions
from streaming.engine import Engine, EngineBusy, EngineConfig, continuation_text
from tests.reads import ScalarReads


@pytest.fixture(scope="module")
def model(references):
    _, path = references("tiny")
    return OmniModel.load(path)


@pytest.fixture
def engine(model):
    eng = Engine(model, EngineConfig(max_sessions=3, max_context=1024, max_new_tokens=24))
    yield eng
    eng.shutdown()


async def collect(conv, parts, sampling=GREEDY, **kw):
    events = [ev async for ev in conv.respond(parts, sampling=sampling, **kw)]
    assert isinstance(events[-1], (Done, Error)), events[-1]
    return [e.token_id for e in events if isinstance(e, TextDelta)], events[-1]


def solo(model, messages, n=24, sampling=GREEDY):
    r = GenerationResult()
    list(model.generate_text(model.processor(messages), n, sampling, result=r))
    return r.token_ids


QUESTIONS = ["What is happening here?", "Tell me a story about a cat.", "Why is the sky blue?"]


def test_concurrent_conversations_equal_solo_runs(engine, model):
    async def main():
        convs = [engine.open_conversation() for _ in QUESTIONS]

        async def staggered(i, conv, q):
            await asyncio.sleep(0.05 * i)  # join while the others are decoding
            return await collect(conv, [q])

        return await asyncio.gather(*(staggered(i, c, q) for i, (c, q) in enumerate(zip(convs, QUESTIONS))))

    results = asyncio.run(main())
    for (tokens, done), q in zip(results, QUESTIONS):
        assert tokens == solo(model, [Message.of("user", q)])
        assert isinstance(done, Done) and done.usage["completion_tokens"] == len(tokens)


def fresh_ids(proc, turns: list[tuple[str, list[int], bool]], last: str) -> list[int]:
    """The whole history as ids: each user turn, the reply as the model produced it, its end."""
    ids = proc([Message.of("user", turns[0][0])]).input_ids.tolist()
    for i, (_, reply, completed) in enumerate(turns):
        nxt = turns[i + 1][0] if i + 1 < len(turns) else last
        ids += reply + ([proc.tok.token_id("<|im_end|>")] if completed else [])
        ids += proc.tok.encode(continuation_text(completed) +
                               proc.render([Message.of("user", nxt)], default_system=False))
    return ids


def test_continuation_matches_the_chat_template(model):
    """Finished (pending <|im_end|>) or cut short, the kept-cache continuation is the template's own tokens."""
    proc = model.processor
    for completed in (True, False):
        whole = proc.tok.encode(proc.render([Message.of("user", "Q1"), Message.of("assistant", "A sunny day."),
                                             Message.of("user", "Q2")]))
        assert fresh_ids(proc, [("Q1", proc.tok.encode("A sunny day."), completed)], "Q2") == whole


def test_second_turn_on_kept_cache_equals_fresh_run(engine, model):
    async def main():
        conv = engine.open_conversation()
        a, done1 = await collect(conv, ["Describe a sunny day."], max_new_tokens=10)
        b, done2 = await collect(conv, ["Now a rainy one."], max_new_tokens=10)
        c, done3 = await collect(conv, ["And snow?"], max_new_tokens=6)
        return (a, done1), (b, done2), (c, done3)

    (a, done1), (b, done2), (c, done3) = asyncio.run(main())
    assert done2.usage["cached_tokens"] > 0 and done3.usage["cached_tokens"] > done2.usage["cached_tokens"]
    proc = model.processor
    history = [("Describe a sunny day.", a, done1.status == "completed")]
    ids = torch.tensor(fresh_ids(proc, history, "Now a rainy one."))
    pos, nxt = rope_positions(ids, [], proc.rope)
    r = GenerationResult()
    list(model.generate_text(Prompt(ids, pos, nxt), 10, GREEDY, result=r))
    assert b == r.token_ids
    history.append(("Now a rainy one.", b, done2.status == "completed"))
    ids = torch.tensor(fresh_ids(proc, history, "And snow?"))
    pos, nxt = rope_positions(ids, [], proc.rope)
    r = GenerationResult()
    list(model.generate_text(Prompt(ids, pos, nxt), 6, GREEDY, result=r))
    assert c == r.token_ids


@pytest.mark.parametrize("stop", ["<|im_end|>", "<|endoftext|>"])
def test_a_reply_that_stops_by_itself_leaves_the_cache_as_a_fresh_run_would(model, stop):
    """The worker feeds a sampled token before the host has read it, so a stop token enters the cache
    (and the repetition penalty's record) a step early and must be taken out again: turn 2 on the kept
    cache still equals a fresh run. <|endoftext|>, unlike <|im_end|>, is in no prompt, so a penalty
    left on it would show."""
    import copy

    penalised = SamplingParams(greedy=True, repetition_penalty=1.3)
    stopping = copy.deepcopy(model)
    proc = stopping.processor
    first = solo(model, [Message.of("user", "Describe a sunny day.")], n=8, sampling=penalised)
    boost = 1.05 * (penalised.repetition_penalty if stop == "<|im_end|>" else 1.0)  # <|im_end|> is penalised
    with torch.no_grad():  # the stop token now wins wherever the 4th token would have: a natural stop
        head = stopping.thinker.lm_head.weight
        head[proc.tok.token_id(stop)] = head[first[3]] * boost
    eng = Engine(stopping, EngineConfig(max_sessions=1, max_context=1024, max_new_tokens=24))
    try:
        async def main():
            conv = eng.open_conversation()
            return (await collect(conv, ["Describe a sunny day."], sampling=penalised),
                    await collect(conv, ["Now a rainy one."], max_new_tokens=10, sampling=penalised))

        (a, done1), (b, done2) = asyncio.run(main())
    finally:
        eng.shutdown()
    assert done1.status == "completed" and len(a) <= 3 and a == first[:len(a)]
    assert done2.usage["cached_tokens"] == done1.usage["prompt_tokens"] + len(a)  # the stop token went out again
    ids = torch.tensor(fresh_ids(proc, [("Describe a sunny day.", a, True)], "Now a rainy one."))
    pos, nxt = rope_positions(ids, [], proc.rope)
    r = GenerationResult()
    list(stopping.generate_text(Prompt(ids, pos, nxt), 10, penalised, result=r))
    assert b == r.token_ids


def test_decode_step_reads_no_sampled_token_back(model, monkeypatch):
    """The batched decode step feeds and samples on the device: the only numbers it reads are the cache's
    own lengths (host-side bookkeeping), a fixed few however many conversations it serves. Sampled tokens
    come back once per step, for the whole batch, a step later."""
    reads: dict[int, list[int]] = {}
    decode = Engine._decode

    def counted(self, turns, it, sampled):
        with ScalarReads() as mode:
            decode(self, turns, it, sampled)
        reads.setdefault(len(turns), []).append(mode.n)

    monkeypatch.setattr(Engine, "_decode", counted)
    eng = Engine(model, EngineConfig(max_sessions=3, max_context=1024, max_new_tokens=12))
    try:
        async def main():
            convs = [eng.open_conversation() for _ in QUESTIONS]
            return await asyncio.gather(*(collect(c, [q]) for c, q in zip(convs, QUESTIONS)))

        asyncio.run(main())
    finally:
        eng.shutdown()
    assert 2 in reads and 3 in reads
    # slot, start, longest start, valid rows: host bookkeeping, never one per conversation
    assert max(max(v) for v in reads.values()) <= 4 and max(reads[3]) <= max(reads[2])


def test_cancel_stops_and_keeps_the_conversation_usable(model):
    # One event buffered: the worker cannot run ahead of this consumer, so the count below does not
    # depend on how the two threads happen to be scheduled.
    engine = Engine(model, EngineConfig(max_sessions=1, max_context=1024, events_buffered=1))

    async def main():
        conv = engine.open_conversation()
        got = []
        async for ev in conv.respond(["Tell me a long story."], sampling=GREEDY, max_new_tokens=200):
            if isinstance(ev, TextDelta):
                got.append(ev.token_id)
                if len(got) == 3:
                    conv.cancel()
            else:
                final = ev
        after, done = await collect(conv, ["Shorter, please."], max_new_tokens=5)
        return got, final, after, done

    try:
        got, final, after, done = asyncio.run(main())
    finally:
        engine.shutdown()
    assert isinstance(final, Done) and final.status == "cancelled" and final.reason == "client_cancelled"
    assert 3 <= len(got) <= 4  # stops within one decode step: at most the token already on its way
    assert isinstance(done, Done) and done.usage["cached_tokens"] > 0 and after


def test_limits_busy_context_and_slot_reuse(model):
    eng = Engine(model, EngineConfig(max_sessions=2, max_context=128, max_new_tokens=8))
    try:
        a, b = eng.open_conversation(), eng.open_conversation()
        with pytest.raises(EngineBusy, match="2 conversation slots"):
            eng.open_conversation()
        a.close()

        async def main():
            c = None
            for _ in range(100):  # the worker frees the slot asynchronously
                try:
                    c = eng.open_conversation()
                    break
                except EngineBusy:
                    await asyncio.sleep(0.01)
            too_long = [ev async for ev in b.respond(["word " * 200])]
            ok = await collect(c, ["hi"])
            return too_long, ok

        too_long, ok = asyncio.run(main())
        assert isinstance(too_long[-1], Error) and too_long[-1].code == "context_length_exceeded"
        assert isinstance(ok[1], Done)
    finally:
        eng.shutdown()


def test_bad_media_is_an_error_event_and_the_conversation_goes_on(engine, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")

    async def main():
        conv = engine.open_conversation()
        err = [ev async for ev in conv.respond([Image(str(bad)), "what is it?"])]
        ok = await collect(conv, ["hello"])
        return err, ok

    err, ok = asyncio.run(main())
    assert isinstance(err[-1], Error) and err[-1].code == "invalid_media" and "bad.png" in err[-1].message
    assert isinstance(ok[1], Done)
