"""`omni serve`: a real server on loopback, driven by the unmodified openai SDK and raw websockets.

Every server event a test receives is validated against the SDK's own types
(`openai.types.realtime.RealtimeServerEvent`, or the beta union for beta clients).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from omni.types import Audio, Image, Message, Video
from streaming.engine import Engine, EngineConfig
from streaming.protocol import SessionConfig
from streaming.server import ServerConfig
from tests import media as make
from tests.realtime import Raw, ServerThread, b64, pcm16, speech, speech_samples, validate

ROOT = Path(__file__).resolve().parents[1]
KEY = "test-key"
SESSIONS = 16


@pytest.fixture(scope="module", params=["qwen2.5-omni", "qwen3-omni"])
def model_dir(embedded_dir, request):
    """Each embedded model in turn: everything above the engine is the same for both families."""
    from omni import embedded

    return embedded.ensure(size=embedded.size_of("embedded:" + request.param))


@pytest.fixture(scope="module")
def engine(model_dir):
    eng = Engine.load(model_dir, config=EngineConfig(max_sessions=SESSIONS, max_context=4096, max_new_tokens=8,
                                                     max_codes=40))
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def server(engine):
    srv = ServerThread(engine, ServerConfig(port=0, api_key=KEY, defaults=SessionConfig(turn_detection=None)))
    yield srv
    srv.stop()


def run(coro, timeout=120):
    return asyncio.run(asyncio.wait_for(coro, timeout))


@pytest.fixture(scope="module")
def voice(tmp_path_factory):
    """'Hello, what can you see in this picture?' spoken by espeak-ng, float32 at 24 kHz."""
    return speech("Hello, what can you see in this picture?")


def sdk(port: int):
    from openai import AsyncOpenAI

    return AsyncOpenAI(api_key=KEY, websocket_base_url=f"ws://127.0.0.1:{port}/v1")


async def sdk_until(conn, kind: str, seen: list, beta: bool = False) -> list[dict]:
    """Raw events from an SDK connection up to `kind`, each validated."""
    got = []
    while True:
        ev = json.loads(await asyncio.wait_for(conn.recv_bytes(), 60))
        validate(ev, beta)
        got.append(ev)
        seen.append(ev["type"])
        if ev["type"] == kind:
            return got


def text_of(events: list[dict], kind: str = "response.output_text.delta") -> str:
    return "".join(e["delta"] for e in events if e["type"] == kind)


def test_sdk_ga_text_audio_image_turns_and_cancel(server):
    """GA client: session.update, text item, audio append+commit, input_image item, cancel; cache reused."""
    async def main():
        seen = []
        async with sdk(server.port).realtime.connect(model="omni") as conn:
            first = await sdk_until(conn, "session.created", seen)
            assert first[0]["type"] == "session.created"
            await conn.session.update(session={"type": "realtime", "output_modalities": ["text"],
                                               "instructions": "You are terse.",
                                               "audio": {"input": {"turn_detection": None}}})
            upd = (await sdk_until(conn, "session.updated", seen))[-1]
            assert upd["session"]["instructions"] == "You are terse."
            assert upd["session"]["audio"]["input"]["turn_detection"] is None

            await conn.conversation.item.create(item={"type": "message", "role": "user",
                                                      "content": [{"type": "input_text", "text": "Hi there!"}]})
            await conn.response.create()
            r1 = await sdk_until(conn, "response.done", seen)
            done1 = r1[-1]["response"]
            assert done1["status"] == "incomplete" and done1["status_details"]["reason"] == "max_output_tokens"
            assert done1["usage"]["output_tokens"] == 8 and text_of(r1)
            assert done1["output"][0]["content"][0]["text"] == text_of(r1)

            tone = make.tone(seconds=1.0, sr=24000)
            for i in range(0, len(tone), 4800):
                await conn.input_audio_buffer.append(audio=b64(pcm16(tone[i:i + 4800])))
            await conn.input_audio_buffer.commit()
            png = make.encode_image(make.pattern_image(64, 96), "png")
            await conn.conversation.item.create(item={"type": "message", "role": "user", "content": [
                {"type": "input_image", "image_url": "data:image/png;base64," + b64(png)},
                {"type": "input_text", "text": "What is this?"}]})
            await conn.response.create(response={"instructions": "Answer in one word.", "max_output_tokens": 5})
            r2 = await sdk_until(conn, "response.done", seen)
            done2 = r2[-1]["response"]
            assert done2["usage"]["output_tokens"] == 5
            assert done2["usage"]["input_token_details"]["cached_tokens"] > 0  # the first turn stayed in the cache
            assert any(e["type"] == "input_audio_buffer.committed" for e in r2)

            await conn.conversation.item.create(item={"type": "message", "role": "user",
                                                      "content": [{"type": "input_text", "text": "Tell a story."}]})
            await conn.response.create(response={"max_output_tokens": 2000})
            got = []
            while True:
                ev = json.loads(await asyncio.wait_for(conn.recv_bytes(), 60))
                validate(ev)
                got.append(ev)
                if ev["type"] == "response.output_text.delta" and sum(e["type"] == ev["type"] for e in got) == 3:
                    await conn.response.cancel()
                if ev["type"] == "response.done":
                    break
            done3 = got[-1]["response"]
            assert done3["status"] == "cancelled" and done3["status_details"]["reason"] == "client_cancelled"
            assert done3["usage"]["output_tokens"] < 2000
        return seen

    seen = run(main())
    # the GA event sequence of one text response
    start = seen.index("response.created")
    assert seen[start:start + 4] == ["response.created", "response.output_item.added", "conversation.item.added",
                                     "response.content_part.added"]
    end = seen.index("response.done")
    assert seen[end - 4:end + 1] == ["response.output_text.done", "response.content_part.done",
                                     "response.output_item.done", "conversation.item.done", "response.done"]


def test_sdk_beta_names(server):
    async def main():
        seen = []
        async with sdk(server.port).beta.realtime.connect(model="omni") as conn:
            await sdk_until(conn, "session.created", seen, beta=True)
            await conn.session.update(session={"modalities": ["text"], "turn_detection": None})
            await sdk_until(conn, "session.updated", seen, beta=True)
            await conn.conversation.item.create(item={"type": "message", "role": "user",
                                                      "content": [{"type": "input_text", "text": "Hello"}]})
            await conn.response.create(response={"modalities": ["text"]})
            evs = await sdk_until(conn, "response.done", seen, beta=True)
        return seen, evs

    seen, evs = run(main())
    assert "conversation.item.created" in seen and "response.text.delta" in seen and "response.text.done" in seen
    assert not any(t.startswith(("response.output_text", "response.output_audio")) for t in seen)
    assert text_of(evs, "response.text.delta")


def test_sdk_audio_output(server):
    """Speech out: output_audio deltas (PCM16 24 kHz) with the transcript, then their done events."""
    async def main():
        seen = []
        async with sdk(server.port).realtime.connect(model="omni") as conn:
            await sdk_until(conn, "session.created", seen)
            await conn.session.update(session={"type": "realtime", "output_modalities": ["audio"],
                                               "audio": {"input": {"turn_detection": None},
                                                         "output": {"voice": "Ethan"}}})
            await sdk_until(conn, "session.updated", seen)
            await conn.conversation.item.create(item={"type": "message", "role": "user",
                                                      "content": [{"type": "input_text", "text": "Say hi."}]})
            await conn.response.create()
            return await sdk_until(conn, "response.done", seen)

    evs = run(main())
    kinds = [e["type"] for e in evs]
    audio = b"".join(base64.b64decode(e["delta"]) for e in evs if e["type"] == "response.output_audio.delta")
    assert len(audio) > 0 and len(audio) % 2 == 0
    assert text_of(evs, "response.output_audio_transcript.delta")
    assert "response.output_text.delta" not in kinds
    assert kinds.index("response.output_audio.done") < kinds.index("response.done")
    done = evs[-1]["response"]
    assert done["output"][0]["content"][0]["type"] == "output_audio"
    codes = done["usage"]["output_token_details"]["audio_tokens"]
    assert 0 < codes <= 40  # max_codes (the embedded Qwen3's Talker ends its speech with the text)
    assert len(audio) == 2 * speech_samples(server.server.engine.model.speech, codes)



async def stream(c: Raw, x: np.ndarray, chunk: int = 2400) -> None:
    for i in range(0, len(x), chunk):
        await c.send(type="input_audio_buffer.append", audio=b64(pcm16(x[i:i + chunk])))


def test_server_vad_turn_and_barge_in(server, voice):
    """server_vad on real speech: started/stopped, auto commit + response; speech during it cancels it."""
    silence = np.zeros(24000, np.float32)

    async def main():
        c = await Raw.connect(server.url, KEY)
        await c.until("session.created")
        await c.send(type="session.update", session={
            "type": "realtime", "output_modalities": ["text"], "max_output_tokens": 3000,
            "audio": {"input": {"turn_detection": {"type": "server_vad", "silence_duration_ms": 400}}}})
        await c.until("session.updated")
        await stream(c, np.concatenate([silence, voice, silence]))
        first = await c.until("response.created")
        await c.send(type="session.update", session={"type": "realtime", "max_output_tokens": 8})  # from the next one
        await stream(c, np.concatenate([voice, silence]))  # the user talks over the reply
        second = await c.until("response.done")
        third = await c.until("response.done")
        await c.close()
        return first, second, third

    first, second, third = run(main())
    kinds = [e["type"] for e in first]
    assert kinds[:4] == ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                         "input_audio_buffer.committed", "conversation.item.added"]
    started, stopped = first[0], first[1]
    assert started["item_id"] == stopped["item_id"] == first[2]["item_id"]
    assert 700 <= started["audio_start_ms"] <= 1300  # speech begins after 1 s of silence
    dur = len(voice) * 1000 // 24000
    assert started["audio_start_ms"] + dur - 300 <= stopped["audio_end_ms"] <= started["audio_start_ms"] + dur + 900
    kinds2 = [e["type"] for e in second]
    assert "input_audio_buffer.speech_started" in kinds2
    done = second[-1]["response"]
    assert done["status"] == "cancelled" and done["status_details"]["reason"] == "turn_detected"
    assert kinds2.index("input_audio_buffer.speech_started") < len(kinds2) - 1
    kinds3 = [e["type"] for e in third]
    assert "input_audio_buffer.speech_stopped" in kinds3 and "response.created" in kinds3
    assert third[-1]["response"]["status"] in ("completed", "incomplete")


def test_video_frames_and_audio_make_one_time_aligned_turn(server, engine, voice):
    """Frames sent while the user talks reach the model as one Video carrying the turn's audio."""
    frames = [make.encode_image(make.pattern_image(56, 84, seed=i), "mjpeg") for i in range(4)]

    async def main():
        c = await Raw.connect(server.url, KEY, beta=True)  # the Qwen-Omni-Realtime dialect: beta + image frames
        await c.until("session.created")
        await c.send(type="session.update", session={"modalities": ["text"], "turn_detection": None,
                                                      "input_audio_sample_rate": 16000})
        await c.until("session.updated")
        audio16 = np.interp(np.arange(0, len(voice), 1.5), np.arange(len(voice)), voice)  # at 16 kHz: 2.3 s
        audio16 = audio16[: len(audio16) // 4 * 4]
        quarter = len(audio16) // 4
        for i, f in enumerate(frames):  # a frame's time is where the audio is when it arrives, however fast
            await c.send(type="input_image_buffer.append", image=b64(f))
            await stream(c, audio16[i * quarter:(i + 1) * quarter], 1600)
        await c.send(type="input_audio_buffer.commit")
        await c.send(type="response.create")
        evs = await c.until("response.done")
        # one frame: an image before the audio
        await c.send(type="input_image_buffer.append", image=b64(frames[0]))
        await stream(c, audio16[:8000], 1600)
        await c.send(type="input_audio_buffer.commit")
        await c.send(type="response.create")
        await c.until("response.done")
        await c.close()
        return evs, len(audio16)

    before = len(server.turns)
    evs, n_audio = run(main())
    assert evs[-1]["response"]["status"] in ("completed", "incomplete")
    video_turn, image_turn = server.turns[before:before + 2]
    (v,) = video_turn
    assert isinstance(v, Video) and v.source.shape[0] == 4 and v.use_audio
    assert abs(len(v.audio) - n_audio) < 160 and v.fps == pytest.approx(4 / (n_audio / 16000), rel=1e-3)
    proc = engine.model.processor
    ids = proc([Message("user", video_turn)]).input_ids.tolist()
    tok = proc.tok.token_id
    qwen3 = engine.model.family == "Qwen3-Omni"  # the two families name the media markers differently
    vision, audio, video_pad, audio_pad = (("<|vision_start|>", "<|audio_start|>", "<|video_pad|>", "<|audio_pad|>")
                                           if qwen3 else ("<|vision_bos|>", "<|audio_bos|>", "<|VIDEO|>", "<|AUDIO|>"))
    i = ids.index(tok(vision))
    assert ids[i + 1] == tok(audio)  # audio-in-video: one interleaved, time-aligned block
    assert tok(video_pad) in ids and tok(audio_pad) in ids
    assert [type(p) for p in image_turn] == [Image, Audio] and len(image_turn[1].source) == 8000


def test_bad_input_gets_an_error_and_the_session_goes_on(server):
    bad_png = b64(b"\x89PNG\r\n\x1a\nthis is not a png")
    cases = [
        ("not json", None, "invalid_json", None),
        (json.dumps({"type": "nope.nope", "event_id": "e1"}), "e1", "invalid_event_type", "type"),
        (json.dumps({"event_id": "e2"}), "e2", "missing_required_parameter", "type"),
        (json.dumps({"type": "input_audio_buffer.append", "event_id": "e3"}), "e3", "missing_required_parameter",
         "audio"),
        (json.dumps({"type": "input_audio_buffer.append", "event_id": "e4", "audio": "@@not base64@@"}), "e4",
         "invalid_value", "audio"),
        (json.dumps({"type": "input_audio_buffer.append", "event_id": "e5", "audio": b64(b"abc")}), "e5",
         "invalid_value", "audio"),
        (json.dumps({"type": "input_image_buffer.append", "event_id": "e6", "image": bad_png}), "e6",
         "invalid_image", "image"),
        (json.dumps({"type": "conversation.item.create", "event_id": "e7", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_image",
                                                            "image_url": "data:image/png;base64," + bad_png}]}}),
         "e7", "invalid_image", "item.content[0].image_url"),
        (json.dumps({"type": "conversation.item.create", "event_id": "e8", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_video"}]}}),
         "e8", "invalid_value", "item.content[0].type"),
        (json.dumps({"type": "session.update", "event_id": "e9", "session": {
            "type": "realtime", "audio": {"input": {"format": {"type": "audio/pcm", "rate": 44100}}}}}),
         "e9", "invalid_value", "session.audio.input.format.rate"),
        (json.dumps({"type": "input_audio_buffer.commit", "event_id": "e10"}), "e10",
         "input_audio_buffer_commit_empty", None),
        (json.dumps({"type": "response.cancel", "event_id": "e11"}), "e11", "response_cancel_not_active", None),
        (json.dumps({"type": "response.create", "event_id": "e12"}), "e12", "input_missing", None),
    ]

    async def main():
        c = await Raw.connect(server.url, KEY)
        await c.until("session.created")
        errors = []
        for msg, *_ in cases:
            await c.ws.send(msg)
            errors.append((await c.until("error"))[-1]["error"])
        await c.send(type="conversation.item.create", item={"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "Still there?"}]})
        await c.send(type="response.create", response={"output_modalities": ["text"]})
        evs = await c.until("response.done")
        await c.close()
        return errors, evs

    errors, evs = run(main())
    for err, (_, eid, code, param) in zip(errors, cases):
        assert (err["event_id"], err["code"], err["param"]) == (eid, code, param), err
        assert err["message"]
    assert evs[-1]["response"]["status"] in ("completed", "incomplete") and text_of(evs)
    assert not any(e["type"] == "error" for e in evs)


def test_auth_subprotocol_and_oversize_message(server):
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed, InvalidStatus

    async def main():
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            with pytest.raises(InvalidStatus) as e:
                await connect(server.url, additional_headers=headers)
            assert e.value.response.status_code == 401
        # a browser: the key as a subprotocol, "realtime" echoed back
        ws = await connect(server.url, subprotocols=["realtime", f"openai-insecure-api-key.{KEY}"])
        assert ws.subprotocol == "realtime"
        created = json.loads(await ws.recv())
        validate(created)
        assert created["type"] == "session.created"
        await ws.send("x" * (9 << 20))  # over max_message_bytes
        with pytest.raises(ConnectionClosed):
            while True:
                await asyncio.wait_for(ws.recv(), 30)
        return ws.close_code

    assert run(main()) == 1009
    health = urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=10).read()
    assert health == b"ok\n"
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=10).read().decode()
    assert "omni_sessions " in metrics and 'omni_responses_total{status="' in metrics
    assert 'omni_engine_stage_busy_seconds_total{stage="thinker",worker="engine"}' in metrics


def test_sessions_concurrent_limit_and_freed_slots(server):
    """16 sessions at once each finish two turns; a 17th is refused (1013); a dropped client frees its slot."""
    async def turn(c: Raw, text: str) -> dict:
        await c.send(type="conversation.item.create", item={"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": text}]})
        await c.send(type="response.create", response={"output_modalities": ["text"]})
        return (await c.until("response.done"))[-1]["response"]

    async def main():
        clients = await asyncio.gather(*(Raw.connect(server.url, KEY) for _ in range(SESSIONS)))
        await asyncio.gather(*(c.until("session.created") for c in clients))
        extra = await Raw.connect(server.url, KEY)
        err = await extra.recv()
        with pytest.raises(Exception):
            await extra.recv()
        refused = (err, extra.ws.close_code)

        async def two(i, c):
            a = await turn(c, f"Question {i}")
            b = await turn(c, f"And {i} again?")
            return a, b

        results = await asyncio.gather(*(two(i, c) for i, c in enumerate(clients)))
        # a client that disconnects mid-response frees its slot for the next one
        c0 = clients[0]
        await c0.send(type="conversation.item.create", item={"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "A long story, please."}]})
        await c0.send(type="response.create", response={"output_modalities": ["text"], "max_output_tokens": 3000})
        await c0.until("response.output_text.delta")
        await c0.ws.close()
        for _ in range(50):
            late = await Raw.connect(server.url, KEY)
            first = await late.recv()
            if first["type"] == "session.created":
                break
            await asyncio.sleep(0.1)
        late_done = await turn(late, "Hello?")
        await asyncio.gather(late.close(), *(c.close() for c in clients[1:]))
        return refused, results, late_done

    (err, code), results, late_done = run(main())
    assert err["type"] == "error" and err["error"]["code"] == "server_busy" and code == 1013
    for a, b in results:
        assert a["status"] == b["status"] == "incomplete"
        assert b["usage"]["input_token_details"]["cached_tokens"] > a["usage"]["input_token_details"]["cached_tokens"]
    assert late_done["status"] == "incomplete"


def test_omni_serve_cli_health_and_sigterm(embedded_dir, tmp_path):  # the CLI path is the same for both families: once
    """`omni serve` as a user runs it; SIGTERM mid-response: response.done (cancelled), close 1001, exit 0."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMNI_API_KEY": KEY}
    p = subprocess.Popen([sys.executable, "-m", "omni", "serve", "--port", "0", "--max-sessions", "2",
                          "--modalities", "text"], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    try:
        port = None
        deadline = time.time() + 120
        while port is None and time.time() < deadline:
            line = p.stderr.readline()
            if "serving ws://" in line:
                port = int(line.rsplit(":", 1)[1].split("/")[0])
            assert line or p.poll() is None, "omni serve exited early"
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10).read() == b"ok\n"

        async def main():
            seen = []
            async with sdk(port).realtime.connect(model="omni") as conn:
                await sdk_until(conn, "session.created", seen)
                await conn.conversation.item.create(item={"type": "message", "role": "user", "content": [
                    {"type": "input_text", "text": "Tell me everything."}]})
                await conn.response.create(response={"max_output_tokens": 4000})
                await sdk_until(conn, "response.output_text.delta", seen)
                p.send_signal(signal.SIGTERM)
                done = (await sdk_until(conn, "response.done", seen))[-1]
                from websockets.exceptions import ConnectionClosed
                with pytest.raises(ConnectionClosed) as e:
                    await asyncio.wait_for(conn.recv_bytes(), 30)
                return done, e.value.rcvd.code

        done, code = run(main())
        assert done["response"]["status"] == "cancelled" and code == 1001
        assert p.wait(30) == 0
    finally:
        if p.poll() is None:
            p.kill()
        err = p.stderr.read()
    assert "server stopped" in err and "session sess_" in err
