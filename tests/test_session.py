"""The session's pure parts: protocol parsing and shapes, audio buffer, frame sampling, VAD."""

from __future__ import annotations

import asyncio
import base64
import json

import numpy as np
import pytest

from omni.types import Audio, Image, Video
from streaming.protocol import Dialect, ProtocolError, ResponseOptions, SessionConfig, parse, response_options, usage
from streaming.session import AudioBuffer, Session, sample_frames, turn_parts
from streaming.vad import SileroVad
from tests import media as make
from tests.realtime import speech, validate


def test_parse_names_what_is_wrong():
    assert parse(json.dumps({"type": "response.create", "event_id": "x"}))["type"] == "response.create"
    for msg, code, param in (("{", "invalid_json", None), ("[1]", "invalid_json", None),
                             ('{"type": 3}', "missing_required_parameter", "type"),
                             ('{"type": "session.delete"}', "invalid_event_type", "type"),
                             (b"\xff\xfe", "invalid_json", None)):
        with pytest.raises(ProtocolError) as e:
            parse(msg)
        assert (e.value.code, e.value.param) == (code, param)


def test_session_update_ga_and_beta_and_their_echo():
    cfg = SessionConfig().update({"type": "realtime", "instructions": "Hi", "output_modalities": ["audio"],
                                  "audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000},
                                                      "turn_detection": {"type": "server_vad", "threshold": 0.6}},
                                            "output": {"voice": "Ethan"}}}, beta=False, event_id="e")
    assert (cfg.instructions, cfg.output_modalities, cfg.input_rate, cfg.voice) == ("Hi", ("audio",), 16000, "Ethan")
    assert cfg.turn_detection.threshold == 0.6 and cfg.turn_detection.silence_duration_ms == 500
    assert cfg.update({"audio": {"input": {"turn_detection": None}}}, False, None).turn_detection is None
    validate(Dialect(False).event("session.updated", session=Dialect(False).session(cfg, "sess_1", "omni")))
    b = SessionConfig().update({"modalities": ["text", "audio"], "turn_detection": None, "voice": "Chelsie",
                                "input_audio_format": "pcm16"}, beta=True, event_id=None)
    assert b.output_modalities == ("text", "audio") and b.turn_detection is None
    validate(Dialect(True).event("session.updated", session=Dialect(True).session(b, "sess_1", "omni")), beta=True)
    with pytest.raises(ProtocolError) as e:
        SessionConfig().update({"input_audio_format": "g711_ulaw"}, beta=True, event_id="q")
    assert e.value.param == "session.input_audio_format" and e.value.event_id == "q"
    with pytest.raises(ProtocolError):
        SessionConfig().update({"type": "realtime", "output_modalities": ["video"]}, beta=False, event_id=None)


def test_response_options_and_done_shapes():
    cfg = SessionConfig(instructions="base", max_output_tokens=100)
    o = response_options({"response": {"output_modalities": ["audio"], "max_output_tokens": "inf"}}, cfg, False)
    assert o == ResponseOptions("base", ("audio",), None, None)
    o = response_options({"response": {"modalities": ["text"], "instructions": "now"}}, cfg, True)
    assert o.instructions == "now" and o.max_output_tokens == 100
    u = usage({"prompt_tokens": 10, "cached_tokens": 90, "completion_tokens": 5, "codec_tokens": 40})
    assert u["input_tokens"] == 100 and u["output_tokens"] == 45 and u["input_token_details"]["cached_tokens"] == 90
    for beta in (False, True):
        d = Dialect(beta)
        item = d.assistant_item("item_1", "incomplete", True, "hi")
        resp = d.response("resp_1", "cancelled", o, [item], {"type": "cancelled", "reason": "turn_detected"}, u)
        validate(d.event("response.done", response=resp), beta)
        ev = d.event("response.output_audio.delta", response_id="r", item_id="i", output_index=0,
                     content_index=0, delta="AAAA")
        assert ev["type"] == ("response.audio.delta" if beta else "response.output_audio.delta")
        validate(ev, beta)
    assert Dialect(True).event("conversation.item.done", item={}) is None


def test_audio_buffer_streamed_equals_one_shot_and_cuts_at_a_sample():
    x = (make.tone(1.0, sr=24000, freq=300, chirp_to=3000) * 32767).astype("<i2")
    whole = AudioBuffer(24000)
    whole.append(x)
    a = whole.take()
    chunked = AudioBuffer(24000)
    i = 0
    for n in [1, 7, 480, 2400, 3, 5000, 999] * 10:
        chunked.append(x[i:i + n])
        i += n
    chunked.append(x[i:])
    b = chunked.take()
    assert len(a) == len(b) == 16000
    np.testing.assert_allclose(a, b, atol=1e-6)
    direct = AudioBuffer(16000)
    direct.append(x[:16000])
    head = direct.take(upto=12000)  # the session clock's sample 12000: the rest stays for the next turn
    assert len(head) == 12000 and direct.samples == 4000 and direct.total == 16000
    np.testing.assert_array_equal(head, x[:12000] / 32768.0)


def test_frames_are_sampled_to_two_per_second_and_become_a_video_or_images():
    frames = [(t / 10, make.pattern_image(28, 28, seed=t)) for t in range(31)]  # 10 fps for 3 s
    kept = sample_frames(frames, 2.0)
    assert [t for t, _ in kept] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0]
    audio = np.zeros(48000, np.float32)
    frames[-1] = (3.0, make.pattern_image(56, 42))  # a camera that changed size: frames follow the latest
    (v,) = turn_parts(audio, frames, 2.0)
    assert isinstance(v, Video) and v.source.shape == (6, 56, 42, 3) and v.fps == 2.0 and v.audio is audio
    parts = turn_parts(audio, frames[:1], 2.0)
    assert [type(p) for p in parts] == [Image, Audio]
    (v,) = turn_parts(np.zeros(0, np.float32), frames[:20], 2.0)
    assert isinstance(v, Video) and not v.use_audio and v.audio is None


def test_live_frames_are_timed_by_the_input_audio_or_else_by_arrival():
    """Frames sent along with audio take its clock, however their arrival bunched up; frames alone, arrival's."""
    now, sent = [100.0], []
    s = Session(None, sent.append, dialect=Dialect(False), model_name="omni",
                defaults=SessionConfig(input_rate=16000, turn_detection=None), clock=lambda: now[0])
    frame = base64.b64encode(make.encode_image(make.pattern_image(28, 28), "mjpeg")).decode()

    async def turn(audio_s: float, apart_s: float) -> list:
        pcm = base64.b64encode(np.zeros(int(audio_s * 16000), "<i2").tobytes()).decode()
        for _ in range(4):
            await s.handle(json.dumps({"type": "input_image_buffer.append", "image": frame}))
            now[0] += apart_s
            if audio_s:
                await s.handle(json.dumps({"type": "input_audio_buffer.append", "audio": pcm}))
        await s.handle(json.dumps({"type": "input_audio_buffer.commit"}))
        parts, s.pending = s.pending, []
        return parts

    async def main():
        return await turn(0.6, 0.01), await turn(0.0, 0.5)

    (talked,), (seen,) = asyncio.run(main())  # 10 ms apart: faster than 30 per second, if it were not for the audio
    assert not [e for e in sent if e["type"] == "error"]
    assert isinstance(talked, Video) and talked.source.shape[0] == 4 and len(talked.audio) == 4 * 9600
    assert talked.fps == pytest.approx(1 / 0.6)
    assert isinstance(seen, Video) and seen.source.shape[0] == 4 and seen.audio is None and seen.fps == 2.0


def test_silero_vad_finds_speech_in_silence():
    voice = speech("The quick brown fox jumps over the lazy dog.", rate=16000)
    sil = np.zeros(16000, np.float32)
    vad = SileroVad(threshold=0.5, silence_ms=500)
    x = np.concatenate([sil, voice, sil, sil])
    events = []
    for i in range(0, len(x), 1000):  # chunks that do not line up with the 512-sample windows
        events += vad.push(x[i:i + 1000])
    assert [k for k, _ in events] == ["start", "stop"]
    (_, start), (_, stop) = events
    assert 900 <= start <= 1400
    assert 1000 + len(voice) // 16 <= stop <= 1000 + len(voice) // 16 + 1200
    quiet = SileroVad()
    assert quiet.push(np.zeros(48000, np.float32)) == []
