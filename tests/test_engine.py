"""The engine: batched conversations equal solo runs, kept caches equal fresh runs, cancel, limits."""

from __future__ import annotations

import asyncio

import pytest
import torch

from omni.pipeline import GenerationResult, OmniModel
from omni.sampling import GREEDY
from omni.types import Done, Error, Image, Message, Text, TextDelta
from omni.processor import Prompt
from omni.rope import rope_positions
from streaming.engine import Engine, EngineBusy, EngineConfig, continuation_text
from tests import media as make


@pytest.fixture(scope="module")
def model(references):
    _, path = references("tiny")
    return OmniModel.load(path)


@pytest.fixture
def engine(model):
    eng = Engine(model, EngineConfig(max_sessions=3, max_context=1024, max_new_tokens=24))
    yield eng
    eng.shutdown()


async def collect(conv, parts, **kw):
    events = [ev async for ev in conv.respond(parts, sampling=GREEDY, **kw)]
    assert isinstance(events[-1], (Done, Error)), events[-1]
    return [e.token_id for e in events if isinstance(e, TextDelta)], events[-1]


def solo(model, messages, n=24):
    r = GenerationResult()
    list(model.generate_text(model.processor(messages), n, GREEDY, result=r))
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


def test_cancel_stops_and_keeps_the_conversation_usable(engine, model):
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

    got, final, after, done = asyncio.run(main())
    assert isinstance(final, Done) and final.status == "cancelled" and final.reason == "client_cancelled"
    assert 3 <= len(got) <= 4  # stops within one decode step
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
