"""The speech decoder on a worker of its own (streaming/speech_stage.py): back-pressure, a failing decoder, shutdown
with windows in flight, placement and busy time in /metrics. Streamed equals one-shot, 4 concurrent equal each
alone and cancel mid-speech run in both placements in test_engine_speech.py and test_qwen3_omni_speech.py."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from omni.pipeline import OmniModel
from omni.sampling import GREEDY
from omni.types import AudioDelta, Done, Error
from streaming.engine import Engine, EngineConfig
from streaming.metrics import engine_metrics
from streaming.speech_stage import SpeechWorker
from talker.talker import TALKER_GREEDY
from tests.test_engine_speech import WAVE_TOL, one_shot, pcm_to_float, speak


@pytest.fixture(scope="module")
def model(embedded_dir):
    return OmniModel.load(embedded_dir, speech=True)


def worker_engine(model, **kw) -> Engine:
    cfg = dict(max_sessions=2, max_context=512, max_new_tokens=16, max_codes=240, speech_worker=True)
    return Engine(model, EngineConfig(**{**cfg, **kw}))


AHEAD = 10  # speech_ahead_s 0.2 at 50 codes/s


def flood(model) -> tuple[list, dict]:
    """A 240-code reply whose consumer stops reading for 0.5 s after its second chunk: (events, the largest
    speech_queue_codes seen while it read and while it paused)."""
    eng = worker_engine(model, speech_ahead_s=0.2, events_buffered=4)
    peaks = {"reading": 0, "paused": 0}

    async def main():
        events, phase = [], "reading"

        async def sample():
            while True:
                peaks[phase] = max(peaks[phase], eng.stats()["speech_queue_codes"])
                await asyncio.sleep(0.002)

        sampler = asyncio.ensure_future(sample())
        async for e in eng.open_conversation().respond(["Talk for a long time."], modalities=("text", "audio"),
                                                        sampling=GREEDY, talker_sampling=TALKER_GREEDY, seed=3,
                                                        min_codes=240):
            events.append(e)
            if isinstance(e, AudioDelta) and e.index == 1:  # stop reading: the outbox fills, decoding pauses
                phase = "paused"
                await asyncio.sleep(0.5)
                phase = "reading"
        sampler.cancel()
        return events

    try:
        return asyncio.run(main()), peaks
    finally:
        eng.shutdown()


def test_a_flooded_speech_queue_holds_the_talker_back(model):
    """The Talker draws a code in ~2 ms, the decoder needs several times that per code: what waits between the two
    workers fills to max_ahead codes and stays there, also while the consumer stops reading for a while; the speech
    is still exactly the one-shot's."""
    events, peaks = flood(model)
    assert isinstance(events[-1], Done) and events[-1].usage["codec_tokens"] == 240
    assert AHEAD <= peaks["reading"] <= AHEAD + 2, peaks  # flooded, and held back (a step reads at most 2 codes)
    assert peaks["paused"] <= AHEAD + 2, peaks
    _, codes, wave = one_shot(model, "Talk for a long time.", 16, 240, min_codes=240)
    assert events[-1].codec_ids == codes
    np.testing.assert_allclose(pcm_to_float(events), wave, atol=WAVE_TOL, rtol=0)


def test_planted_no_back_pressure_floods_the_queue(model, monkeypatch):
    """The twin: a speech worker that never holds the Talker back lets the queue grow with the reply."""
    monkeypatch.setattr(SpeechWorker, "behind", lambda self, t: False)
    events, peaks = flood(model)
    assert isinstance(events[-1], Done) and max(peaks.values()) > 5 * AHEAD, peaks


def test_a_failing_decoder_fails_its_reply_and_the_worker_goes_on(model, monkeypatch):
    real, calls = model.speech.vocode, []

    def planted(vstates):
        calls.append(len(vstates))
        if len(calls) == 1:
            raise RuntimeError("planted decoder failure")
        return real(vstates)

    monkeypatch.setattr(model.speech, "vocode", planted)
    eng = worker_engine(model, max_codes=60)
    try:
        conv = eng.open_conversation()
        failed = asyncio.run(speak(conv, "Hello!"))
        again = asyncio.run(speak(conv, "Hello again!"))
        stats = eng.stats()
    finally:
        eng.shutdown()
    assert isinstance(failed[-1], Error) and "planted decoder failure" in failed[-1].message
    assert failed[-1].code == "internal"
    assert isinstance(again[-1], Done) and again[-1].status in ("completed", "incomplete")  # (a length limit)
    assert sum(len(e.pcm) for e in again if isinstance(e, AudioDelta)) == 2 * 480 * again[-1].usage["codec_tokens"]
    assert (stats["speaking"], stats["decoding"]) == (0, 0)


def test_shutdown_with_windows_in_flight_ends_the_reply_and_both_workers(model):
    eng = worker_engine(model, max_codes=600, max_new_tokens=64)

    async def main():
        events = []

        async def consume():
            async for e in eng.open_conversation().respond(["Talk for a long time."], modalities=("text", "audio"),
                                                            min_codes=600):
                events.append(e)

        task = asyncio.ensure_future(consume())
        while not any(isinstance(e, AudioDelta) for e in events):
            await asyncio.sleep(0.005)
        assert eng.stats()["decoding"] == 1
        t0 = time.monotonic()
        await asyncio.to_thread(eng.shutdown, 10)
        took = time.monotonic() - t0
        await asyncio.wait_for(task, 5)  # the reply ends: nobody waits forever
        return events, took

    events, took = asyncio.run(main())
    assert took < 5
    assert isinstance(events[-1], Done) and events[-1].status == "cancelled" and events[-1].reason == "engine_shutdown"
    assert events[-1].usage["codec_tokens"] < 600
    assert not eng._worker.is_alive() and not eng._voc._thread.is_alive()


@pytest.mark.parametrize("speech_worker", [True, False], ids=["speech-worker", "one-worker"])
def test_metrics_show_the_placement_and_busy_time_per_stage(model, speech_worker):
    eng = worker_engine(model, speech_worker=speech_worker, max_codes=60, threads=2, speech_threads=1)
    try:
        asyncio.run(speak(eng.open_conversation(), "Hello!"))
        text = engine_metrics(eng.stats())
    finally:
        eng.shutdown()
    busy = {line.split("{")[1].split("}")[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line.startswith("omni_engine_stage_busy_seconds_total{")}
    where = "speech" if speech_worker else "engine"
    assert set(busy) == {'stage="thinker",worker="engine"', 'stage="talker",worker="engine"',
                         f'stage="vocoder",worker="{where}"'}
    assert all(v > 0 for v in busy.values()), busy
    assert f"omni_engine_workers {2 if speech_worker else 1}" in text
    if speech_worker:
        assert 'omni_engine_worker_info{worker="engine",device="cpu",threads="1",stages="thinker,talker"} 1' in text
        assert 'omni_engine_worker_info{worker="speech",device="cpu",threads="1",stages="vocoder"} 1' in text
    else:
        assert 'omni_engine_worker_info{worker="engine",device="cpu",threads="2",stages="thinker,talker,vocoder"} 1' \
            in text
