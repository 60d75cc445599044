"""Speech through the engine: streamed equals one-shot, batched equals solo, audio before the text ends, cancel."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from omni.pipeline import GenerationResult, OmniModel
from omni.sampling import GREEDY
from omni.types import AudioDelta, Done, Message, TextDelta
from streaming.engine import Engine, EngineConfig
from talker.talker import TALKER_GREEDY
from tests.reads import ScalarReads

WAVE_TOL = 4e-5  # PCM16 rounding (1/32767) over a waveform equal to fp32 rounding


@pytest.fixture(scope="module")
def model(embedded_dir):
    return OmniModel.load(embedded_dir, speech=True)


def pcm_to_float(events) -> np.ndarray:
    pcm = b"".join(e.pcm for e in events if isinstance(e, AudioDelta))
    return np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32767.0


async def speak(conv, text, **kw):
    return [e async for e in conv.respond([text], modalities=("text", "audio"), sampling=GREEDY,
                                          talker_sampling=TALKER_GREEDY, seed=3, **kw)]


def one_shot(model, text, n_text, n_codes, min_codes=0):
    r = GenerationResult()
    s = model.speak(model.processor([Message.of("user", text)]), max_new_tokens=n_text, sampling=GREEDY,
                    talker_sampling=TALKER_GREEDY, seed=3, max_codes=n_codes, min_codes=min_codes, result=r)
    return r.token_ids, s.codes, np.clip(s.wave.numpy(), -1, 1)


PLACEMENTS = pytest.mark.parametrize("speech_worker", [True, False], ids=["speech-worker", "one-worker"])


@PLACEMENTS
def test_streamed_speech_equals_one_shot_and_arrives_before_the_text_ends(model, speech_worker):
    eng = Engine(model, EngineConfig(max_sessions=1, max_context=512, max_new_tokens=48, max_codes=100,
                                     speech_worker=speech_worker))
    try:
        events = asyncio.run(speak(eng.open_conversation(), "Tell me about the sea."))
    finally:
        eng.shutdown()
    done = events[-1]
    assert isinstance(done, Done) and done.usage["codec_tokens"] == 100
    text = [e.token_id for e in events if isinstance(e, TextDelta)]
    want_text, want_codes, want_wave = one_shot(model, "Tell me about the sea.", 48, 100)
    assert text == want_text and done.codec_ids == want_codes
    wave = pcm_to_float(events)
    assert len(wave) == 480 * len(want_codes)  # 480 samples per code at 24 kHz
    np.testing.assert_allclose(wave, want_wave, atol=WAVE_TOL, rtol=0)
    if not speech_worker:  # one worker: the first audio chunk comes while the Thinker is still writing (with
        # a speech worker the Thinker is not held up by the decoder and may be done before its first window is)
        kinds = [type(e).__name__ for e in events]
        assert kinds.index("AudioDelta") < len(kinds) - 1 - kinds[::-1].index("TextDelta")
    indexes = [e.index for e in events if isinstance(e, AudioDelta)]
    assert indexes == list(range(len(indexes))) and len(indexes) >= 3


@PLACEMENTS
def test_concurrent_speech_equals_solo(model, speech_worker):
    questions = ["Hello!", "What is the weather like?", "Sing me a song.", "Count to five."]
    eng = Engine(model, EngineConfig(max_sessions=4, max_context=512, max_new_tokens=12, max_codes=60,
                                     speech_worker=speech_worker))

    async def main():
        convs = [eng.open_conversation() for _ in questions]

        async def staggered(i, c, q):
            await asyncio.sleep(0.03 * i)
            return await speak(c, q)

        return await asyncio.gather(*(staggered(i, c, q) for i, (c, q) in enumerate(zip(convs, questions))))

    try:
        results = asyncio.run(main())
    finally:
        eng.shutdown()
    for events, q in zip(results, questions):
        text, codes, wave = one_shot(model, q, 12, 60)
        assert [e.token_id for e in events if isinstance(e, TextDelta)] == text
        assert events[-1].codec_ids == codes
        np.testing.assert_allclose(pcm_to_float(events), wave, atol=WAVE_TOL, rtol=0)


@PLACEMENTS
def test_cancel_mid_speech_stops_audio_and_frees_the_talker(model, speech_worker):
    eng = Engine(model, EngineConfig(max_sessions=1, max_context=512, max_new_tokens=20, max_codes=400,
                                     speech_worker=speech_worker))

    async def main():
        conv = eng.open_conversation()
        events = []
        async for e in conv.respond(["Talk for a long time."], modalities=("text", "audio"), seed=1):
            events.append(e)
            if isinstance(e, AudioDelta):
                conv.cancel()
        for _ in range(100):  # the speech worker hears of the cancel after the reply's end: it forgets it soon
            if eng.stats()["decoding"] == 0:
                break
            await asyncio.sleep(0.01)
        freed = eng.stats()
        again = await speak(conv, "Again, briefly.", max_new_tokens=4)
        return events, again, freed

    try:
        events, again, freed = asyncio.run(main())
    finally:
        eng.shutdown()
    done = events[-1]
    assert isinstance(done, Done) and done.status == "cancelled"
    assert (freed["speaking"], freed["decoding"], freed["speech_queue_codes"]) == (0, 0, 0)
    first_audio = next(i for i, e in enumerate(events) if isinstance(e, AudioDelta))
    assert sum(isinstance(e, AudioDelta) for e in events[first_audio:]) <= 2  # at most the chunk in flight
    assert isinstance(again[-1], Done) and again[-1].usage["cached_tokens"] > 0
    assert any(isinstance(e, AudioDelta) for e in again)


def test_unknown_voice_is_an_error_event(model):
    eng = Engine(model, EngineConfig(max_sessions=1, max_context=256))

    async def main():
        conv = eng.open_conversation()
        return [e async for e in conv.respond(["hi"], modalities=("text", "audio"), voice="Nobody")]

    try:
        events = asyncio.run(main())
    finally:
        eng.shutdown()
    assert events[-1].code == "invalid_request" and "Chelsie" in events[-1].message


def test_talker_step_reads_no_code_back(model, monkeypatch):
    """The engine's batched Talker step feeds each drawn code to the next step on the device: it reads no
    number back beyond what the Talker's decoder forward reads for its KV bookkeeping (the same few whatever
    the batch). The host reads codes later, and never in the engine iteration that drew them."""
    import talker.talker as tl

    steps: dict[int, list[tuple[int, int]]] = {}  # batch size -> (reads of the step, reads of its forward)
    forward, draw, values, engine_speak = tl.Talker.forward, tl.draw_batch, tl._Drawn.values, Engine._speak
    iteration = {"now": 0}
    late: list[tuple[int, int]] = []  # (iteration drawn, iteration read) of every code read

    def counted_forward(self, *a, **k):
        with ScalarReads() as inner:
            out = forward(self, *a, **k)
        steps["forward"] = steps.get("forward", 0) + inner.n
        return out

    def counted_draw(talker, states, *a, **k):
        steps["forward"] = 0
        with ScalarReads() as mode:
            draw(talker, states, *a, **k)
        steps.setdefault(len(states), []).append((mode.n, steps["forward"]))
        for st in states:
            st.unread[-1][0].iteration = iteration["now"]

    def tracked_values(self):
        late.append((self.iteration, iteration["now"]))
        return values(self)

    def counted_speak(self, turns):
        iteration["now"] += 1
        return engine_speak(self, turns)

    monkeypatch.setattr(tl.Talker, "forward", counted_forward)
    monkeypatch.setattr(tl, "draw_batch", counted_draw)
    monkeypatch.setattr(tl._Drawn, "values", tracked_values)
    monkeypatch.setattr(Engine, "_speak", counted_speak)
    eng = Engine(model, EngineConfig(max_sessions=4, max_context=512, max_new_tokens=8, max_codes=24))
    try:
        async def main():
            solo = await speak(eng.open_conversation(), "Hello!")
            convs = [eng.open_conversation() for _ in range(3)]
            return [solo, *await asyncio.gather(*(speak(c, q) for c, q in zip(convs, ["Hi.", "Why?", "Sing."])))]

        results = asyncio.run(main())
    finally:
        eng.shutdown()
    assert all(r[-1].usage["codec_tokens"] == 24 for r in results)
    sizes = sorted(k for k in steps if k != "forward")
    assert 1 in sizes and max(sizes) >= 2, sizes
    for B in sizes:
        assert all(n == fwd for n, fwd in steps[B]), (B, steps[B])  # nothing read but the forward's bookkeeping
        assert max(n for n, _ in steps[B]) <= 4, (B, steps[B])
    assert late and all(read > drawn for drawn, read in late), late  # a code is read an iteration after its step


@pytest.fixture(scope="module")
def ending(model):
    """A copy whose Talker samples its codec end after a few codes (greedy): (model, the original's text and
    codes, the number of codes before the end)."""
    import copy

    ending = copy.deepcopy(model)
    text, free, _ = one_shot(model, "Tell me about the sea.", 24, 60)
    with torch.no_grad():  # the end code now beats the greedy code at code 12 (and perhaps earlier)
        w = ending.talker.codec_head.weight
        w[ending.talker.cfg.tts_codec_end_token_id] = 3 * w[free[12]]
    natural = len(one_shot(ending, "Tell me about the sea.", 24, 60)[1])
    assert 0 < natural <= 12
    return ending, text, free, natural


def test_speech_that_ends_by_itself_equals_one_shot(ending):
    """The engine sees the codec end a step late and drops the code drawn after it, so the codes and the wave
    equal the one-shot run's, which reads every code at once; with min_codes holding the end off, too (the
    engine counts the codes still in flight)."""
    ending, text, free, natural = ending
    eng = Engine(ending, EngineConfig(max_sessions=2, max_context=512, max_new_tokens=24, max_codes=60))
    try:  # min_codes = natural: the end is allowed exactly where it comes (one code too soon or late would show)
        for min_codes in (0, natural, 8):
            want_text, want_codes, want_wave = one_shot(ending, "Tell me about the sea.", 24, 60, min_codes)
            assert want_text == text and want_codes == free[:len(want_codes)]
            assert len(want_codes) == natural if min_codes <= natural else min_codes < len(want_codes), want_codes
            conv = eng.open_conversation()
            events = asyncio.run(speak(conv, "Tell me about the sea.", min_codes=min_codes))
            conv.close()
            done = events[-1]
            assert isinstance(done, Done)  # (the text runs to its length limit, so the reply is "incomplete")
            assert done.codec_ids == want_codes and done.usage["codec_tokens"] == len(want_codes)
            wave = pcm_to_float(events)
            assert len(wave) == 480 * len(want_codes)  # nothing spoken for the code drawn after the end
            np.testing.assert_allclose(wave, want_wave, atol=WAVE_TOL, rtol=0)
    finally:
        eng.shutdown()


def test_output_budget_is_spent_exactly_around_a_late_codec_end(ending):
    """max_output_tokens counts text and codes together. A code still on its way to the host counts (so the
    budget is never overrun), but when it proves to be the codec end its place goes back to the text: every
    budget is spent exactly, also where the end is in flight as the budget runs out (measured: M = 13 here
    would stop the text one token short if the end counted)."""
    ending, text, free, natural = ending
    eng = Engine(ending, EngineConfig(max_sessions=2, max_context=512, max_new_tokens=24, max_codes=60))
    try:
        for M in range(2, 16):
            conv = eng.open_conversation()
            done = asyncio.run(speak(conv, "Tell me about the sea.", max_output_tokens=M))[-1]
            conv.close()
            assert done.status == "incomplete" and done.codec_ids == free[:min(natural, len(done.codec_ids))]
            assert done.usage["completion_tokens"] + done.usage["codec_tokens"] == M, (M, done.usage)
        assert len(done.codec_ids) == natural  # the last budgets saw the speech end by itself
    finally:
        eng.shutdown()
