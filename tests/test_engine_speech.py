"""Speech through the engine: streamed equals one-shot, batched equals solo, audio before the text ends, cancel."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from omni.pipeline import GenerationResult, OmniModel
from omni.sampling import GREEDY
from omni.types import AudioDelta, Done, Message, TextDelta
from streaming.engine import Engine, EngineConfig
from talker.talker import TALKER_GREEDY

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


def one_shot(model, text, n_text, n_codes):
    r = GenerationResult()
    s = model.speak(model.processor([Message.of("user", text)]), max_new_tokens=n_text, sampling=GREEDY,
                    talker_sampling=TALKER_GREEDY, seed=3, max_codes=n_codes, result=r)
    return r.token_ids, s.codes, np.clip(s.wave.numpy(), -1, 1)


def test_streamed_speech_equals_one_shot_and_arrives_before_the_text_ends(model):
    eng = Engine(model, EngineConfig(max_sessions=1, max_context=512, max_new_tokens=48, max_codes=100))
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
    # streaming: the first audio chunk comes while the Thinker is still writing
    kinds = [type(e).__name__ for e in events]
    assert kinds.index("AudioDelta") < len(kinds) - 1 - kinds[::-1].index("TextDelta")
    indexes = [e.index for e in events if isinstance(e, AudioDelta)]
    assert indexes == list(range(len(indexes))) and len(indexes) >= 3


def test_concurrent_speech_equals_solo(model):
    questions = ["Hello!", "What is the weather like?", "Sing me a song.", "Count to five."]
    eng = Engine(model, EngineConfig(max_sessions=4, max_context=512, max_new_tokens=12, max_codes=60))

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


def test_cancel_mid_speech_stops_audio_and_frees_the_talker(model):
    eng = Engine(model, EngineConfig(max_sessions=1, max_context=512, max_new_tokens=20, max_codes=400))

    async def main():
        conv = eng.open_conversation()
        events = []
        async for e in conv.respond(["Talk for a long time."], modalities=("text", "audio"), seed=1):
            events.append(e)
            if isinstance(e, AudioDelta):
                conv.cancel()
        again = await speak(conv, "Again, briefly.", max_new_tokens=4)
        return events, again

    try:
        events, again = asyncio.run(main())
    finally:
        eng.shutdown()
    done = events[-1]
    assert isinstance(done, Done) and done.status == "cancelled"
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
