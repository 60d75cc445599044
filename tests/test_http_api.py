"""`omni serve`'s chat completions API: a real server on loopback, the unmodified openai SDK and raw HTTP.

Every response and chunk is validated with the SDK's own pydantic types (`ChatCompletion`,
`ChatCompletionChunk`); audio is decoded with PyAV in the format asked for.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import http.server
import io
import json
import struct
import threading
import time
import urllib.request

import av
import numpy as np
import openai
import pytest
from openai import AsyncOpenAI, BadRequestError, OpenAI, RateLimitError
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from omni import embedded
from streaming.engine import Engine, EngineConfig
from streaming.protocol import SessionConfig
from streaming.server import ServerConfig
from tests import media as make
from tests.realtime import Raw, ServerThread, speech_samples

KEY = "http-key"
SLOTS = 4
CODES = 40  # speech per reply: at most 40 codec tokens = 0.8 s
LIMIT = 46  # max_completion_tokens of the speech tests: text and codec tokens together


@pytest.fixture(scope="module", params=["qwen2.5-omni", "qwen3-omni"])
def engine(embedded_dir, request):  # each embedded model in turn (embedded_dir: the session's private cache)
    eng = Engine.load(embedded.ensure(size=embedded.size_of("embedded:" + request.param)), config=EngineConfig(max_sessions=SLOTS, max_context=4096,
                                                             max_new_tokens=3000, max_codes=CODES))
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def server(engine):
    srv = ServerThread(engine, ServerConfig(port=0, api_key=KEY, max_request_bytes=2 << 20,
                                            defaults=SessionConfig(turn_detection=None)))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """A PNG, a 1 s WAV and a 2 s H.264+AAC mp4, as the content parts a client sends."""
    d = tmp_path_factory.mktemp("media")
    png = make.encode_image(make.pattern_image(56, 84), "png")
    wav = make.write_audio(d / "a.wav", make.tone(1.0), 16000).read_bytes()
    mp4 = make.write_video(d / "v.mp4", seconds=2.0, fps=4, height=56, width=84).read_bytes()
    return {"image": {"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64(png)}},
            "audio": {"type": "input_audio", "input_audio": {"data": b64(wav), "format": "wav"}},
            "video": {"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + b64(mp4)}},
            "png": png, "dir": d}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def client(server, **kw) -> OpenAI:
    return OpenAI(api_key=KEY, base_url=f"http://127.0.0.1:{server.port}/v1", max_retries=0, **kw)


def aclient(server) -> AsyncOpenAI:
    return AsyncOpenAI(api_key=KEY, base_url=f"http://127.0.0.1:{server.port}/v1", max_retries=0)


def create(c: OpenAI, **kw) -> ChatCompletion:
    """A non-streaming completion, validated strictly from the raw JSON with the SDK's type."""
    raw = c.chat.completions.with_raw_response.create(model="omni", **kw)
    r = ChatCompletion.model_validate(raw.http_response.json())
    assert r.object == "chat.completion" and len(r.choices) == 1
    return r


def chunks(stream) -> list[ChatCompletionChunk]:
    out = []
    for ch in stream:
        out.append(ChatCompletionChunk.model_validate(ch.to_dict()))
    return out


def stream_text(cs: list[ChatCompletionChunk]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in cs if c.choices)


def stream_audio(cs: list[ChatCompletionChunk]) -> tuple[bytes, str, set]:
    data, text, ids = [], [], set()
    for c in cs:
        a = c.choices[0].delta.to_dict().get("audio") if c.choices else None
        if a:
            ids.add(a["id"])
            data.append(base64.b64decode(a.get("data", "")))
            text.append(a.get("transcript") or "")
    return b"".join(data), "".join(text), ids


def decode(data: bytes) -> tuple[str, int, np.ndarray]:
    with av.open(io.BytesIO(data)) as c:
        s = c.streams.audio[0]
        x = np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(s)])
        return c.format.name, s.codec_context.sample_rate, x


def post(server, body, key: str | None = KEY, raw: bytes | None = None) -> tuple[int, dict, dict]:
    req = urllib.request.Request(f"http://127.0.0.1:{server.port}/v1/chat/completions",
                                 data=raw if raw is not None else json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {key}"} if key else {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        text = e.read().decode()
        assert "Traceback" not in text
        return e.code, json.loads(text), dict(e.headers)


def user(*content) -> list[dict]:
    return [{"role": "user", "content": list(content)}]


TEXT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello there!"}]


def test_models_and_text_sync_async_stream_equal(server):
    c = client(server)
    models = c.models.list()
    assert [m.id for m in models.data] == ["omni"] and c.models.retrieve("omni").id == "omni"

    greedy = dict(messages=TEXT, max_completion_tokens=12, temperature=0, seed=3)
    r = create(c, **greedy)
    text = r.choices[0].message.content
    assert text and r.choices[0].finish_reason == "length" and r.choices[0].message.audio is None
    assert r.usage.completion_tokens == 12 and r.usage.prompt_tokens > 10
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12

    cs = chunks(c.chat.completions.create(model="omni", stream=True, stream_options={"include_usage": True},
                                          **greedy))
    assert cs[0].choices[0].delta.role == "assistant"
    assert stream_text(cs) == text
    assert [x.choices[0].finish_reason for x in cs if x.choices][-1] == "length"
    assert cs[-1].choices == [] and cs[-1].usage.completion_tokens == 12
    assert all(x.id == cs[0].id for x in cs)

    async def main():
        ac = aclient(server)
        whole = await ac.chat.completions.create(model="omni", **greedy)
        got = []
        async for ch in await ac.chat.completions.create(model="omni", stream=True, **greedy):
            got.append(ChatCompletionChunk.model_validate(ch.to_dict()))
        return whole, got

    whole, got = asyncio.run(main())
    assert whole.choices[0].message.content == text and stream_text(got) == text
    assert got[-1].usage is None  # no include_usage: no usage chunk

    # sampling with a seed is repeatable; max_tokens is the older name of the limit
    s1 = create(c, messages=TEXT, max_tokens=10, temperature=1.0, top_p=0.9, seed=7).choices[0].message.content
    s2 = create(c, messages=TEXT, max_tokens=10, temperature=1.0, top_p=0.9, seed=7).choices[0].message.content
    assert s1 == s2


def test_stop_sequences(server):
    """A stop string that spans two streamed pieces: nothing of it is sent, in either mode."""
    c = client(server)
    greedy = dict(messages=TEXT, max_completion_tokens=16, temperature=0)
    pieces = [x.choices[0].delta.content for x in chunks(c.chat.completions.create(model="omni", stream=True,
                                                                                      **greedy))
              if x.choices and x.choices[0].delta.content]
    k = next(i for i in range(1, len(pieces) - 1) if len(pieces[i]) >= 2 and len(pieces[i + 1]) >= 2)
    stop = pieces[k][-2:] + pieces[k + 1][:2]
    text = "".join(pieces)
    want = text[:text.find(stop)]
    assert len(want) >= len("".join(pieces[:k]))
    r = create(c, stop=[stop, "never appears"], **greedy)
    assert r.choices[0].message.content == want and r.choices[0].finish_reason == "stop"
    cs = chunks(c.chat.completions.create(model="omni", stream=True, stop=stop, **greedy))
    assert stream_text(cs) == want and cs[-1].choices[0].finish_reason == "stop"


def test_speech_formats_with_image_audio_and_video_parts(server, engine, parts):
    """Text + audio out in every format, from a prompt with an image, audio and a video with sound."""
    c, speech = client(server), engine.model.speech
    content = [parts["image"], parts["audio"], parts["video"], {"type": "text", "text": "What do you see and hear?"}]
    results = {}
    for fmt in ("wav", "mp3", "flac", "opus", "pcm16"):
        r = create(c, messages=user(*content), modalities=["text", "audio"], audio={"voice": "Ethan", "format": fmt},
                   max_completion_tokens=LIMIT, temperature=0, seed=1, extra_body={"use_audio_in_video": True})
        m = r.choices[0].message
        assert m.content is None and m.audio.transcript and m.audio.id.startswith("audio_")
        assert m.audio.expires_at > time.time()
        u = r.usage
        codes = u.completion_tokens_details.audio_tokens
        # max_completion_tokens bounds text and speech together (as OpenAI counts output tokens)
        assert 10 <= codes <= CODES and u.completion_tokens == codes + u.completion_tokens_details.text_tokens <= LIMIT
        assert r.choices[0].finish_reason == "length"
        assert u.model_extra["audio_seconds"] == pytest.approx(speech_samples(speech, codes) / 24000, abs=1e-3)
        d = u.prompt_tokens_details  # by kind: the image and the video's frames are image tokens, both sounds audio
        # 3 s of sound: 75 audio tokens at Qwen2.5's 25/s, ~40 at Qwen3's 13/s
        assert d.image_tokens > 0 and d.audio_tokens > 30 and d.text_tokens > 0 and d.cached_tokens == 0
        assert d.image_tokens + d.audio_tokens + d.text_tokens == u.prompt_tokens
        results[fmt] = (base64.b64decode(m.audio.data), m.audio.transcript, u.prompt_tokens, codes)
    assert len({(t, n) for _, t, _, n in results.values()}) == 1  # same seed and settings: same reply
    pcm, codes = results["pcm16"][0], results["pcm16"][3]
    assert len(pcm) == speech_samples(speech, codes) * 2  # 24 kHz PCM16
    assert results["wav"][0][44:] == pcm and results["wav"][0][:4] == b"RIFF"
    ref = np.frombuffer(pcm, "<i2").astype(np.float32) / 32768
    for fmt, container in (("wav", "wav"), ("mp3", "mp3"), ("flac", "flac"), ("opus", "ogg")):
        name, rate, x = decode(results[fmt][0])
        assert name == container
        assert rate == (48000 if fmt == "opus" else 24000)  # Opus decodes at 48 kHz; its header says 24 kHz:
        if fmt == "opus":
            head = results[fmt][0]
            i = head.index(b"OpusHead")
            assert struct.unpack("<I", head[i + 12:i + 16])[0] == 24000
        seconds = len(x) / rate
        assert abs(seconds - len(ref) / 24000) < 0.1, (fmt, seconds)
        if fmt == "flac":
            assert x.astype("<i2").tobytes() == pcm  # lossless

    # the video's sound reached the model: without it the prompt is shorter
    r = create(c, messages=user(parts["video"], {"type": "text", "text": "Hi"}), max_completion_tokens=2,
               extra_body={"use_audio_in_video": False})
    r2 = create(c, messages=user(parts["video"], {"type": "text", "text": "Hi"}), max_completion_tokens=2,
                extra_body={"use_audio_in_video": True})
    assert r2.usage.prompt_tokens > r.usage.prompt_tokens + 20  # 2 s of audio: 50 tokens (Qwen2.5), 26 (Qwen3)


def test_streamed_speech_equals_whole_and_refers_back(server):
    """SSE audio deltas {id, data, transcript}; the transcript equals the non-streamed one; a later
    request refers back to the spoken turn by audio.id, which equals sending its transcript."""
    c = client(server)
    ask = dict(messages=user({"type": "text", "text": "Say hi."}), modalities=["text", "audio"], temperature=0,
               seed=5, max_completion_tokens=LIMIT)
    whole = create(c, audio={"voice": "Chelsie", "format": "pcm16"}, **ask)
    t0 = time.perf_counter()
    cs = []
    first_audio = None
    for ch in c.chat.completions.create(model="omni", stream=True, audio={"voice": "Chelsie", "format": "pcm16"},
                                        stream_options={"include_usage": True}, **ask):
        cs.append(ChatCompletionChunk.model_validate(ch.to_dict()))
        a = ch.choices[0].delta.to_dict().get("audio") if ch.choices else None
        if first_audio is None and a and a.get("data"):
            first_audio = time.perf_counter() - t0
    pcm, transcript, ids = stream_audio(cs)
    assert transcript == whole.choices[0].message.audio.transcript
    assert pcm == base64.b64decode(whole.choices[0].message.audio.data)  # same seed: the same speech
    assert len(ids) == 1 and cs[-1].usage == whole.usage
    assert len(pcm) == pytest.approx(whole.usage.model_extra["audio_seconds"] * 48000, abs=48)  # seconds to 1 ms
    assert first_audio is not None
    print(f"time to first audio over HTTP streaming: {first_audio:.3f} s")

    # streamed mp3: the pieces join into one valid file
    cs = chunks(c.chat.completions.create(model="omni", stream=True, audio={"voice": "Ethan", "format": "mp3"},
                                          **ask))
    data, _, _ = stream_audio(cs)
    name, rate, x = decode(data)
    assert name == "mp3" and rate == 24000 and abs(len(x) / rate - whole.usage.model_extra["audio_seconds"]) < 0.1

    # multi-turn: the spoken assistant turn by audio.id == the same turn as text
    aid = whole.choices[0].message.audio.id
    follow = {"role": "user", "content": "And then?"}
    by_id = create(c, messages=[*ask["messages"], {"role": "assistant", "audio": {"id": aid}}, follow],
                   max_completion_tokens=8, temperature=0)
    by_text = create(c, messages=[*ask["messages"], {"role": "assistant", "content": transcript}, follow],
                     max_completion_tokens=8, temperature=0)
    streamed_id = next(iter(ids))
    by_streamed_id = create(c, messages=[*ask["messages"], {"role": "assistant", "audio": {"id": streamed_id}},
                                         follow], max_completion_tokens=8, temperature=0)
    assert by_id.choices[0].message.content == by_text.choices[0].message.content \
        == by_streamed_id.choices[0].message.content
    assert by_id.usage.prompt_tokens == by_text.usage.prompt_tokens > whole.usage.prompt_tokens
    with pytest.raises(BadRequestError) as e:
        c.chat.completions.create(model="omni", messages=[*ask["messages"], {"role": "assistant",
                                                                               "audio": {"id": "audio_nope"}}, follow])
    assert e.value.body["param"] == "messages[1].audio.id"


def test_history_is_rendered_as_qwens_chat_template(server, engine, parts):
    """system + user (media) + assistant + user in one request: the prompt the engine builds equals the
    processor's own rendering of those four messages (no turn generated again, nothing lost)."""
    from omni.types import Message, Text

    api = server.server.chat_api
    body = {"messages": [{"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
                         {"role": "user", "content": [parts["image"], {"type": "text", "text": "What is it?"}]},
                         {"role": "assistant", "content": "A pattern."},
                         {"role": "system", "content": "Now be verbose."},
                         {"role": "user", "content": [parts["audio"], {"type": "text", "text": "And this?"}]}]}
    plan = asyncio.run(api.requests.plan(body))
    proc = engine.model.processor
    ours = proc([Message("system", [Text(plan.system)]), Message(plan.role, plan.parts)])
    img, aud = [p for p in plan.parts if not isinstance(p, Text)]
    want = proc([Message("system", [Text("Be brief.")]), Message("user", [img, Text("What is it?")]),
                 Message("assistant", [Text("A pattern.")]), Message("system", [Text("Now be verbose.")]),
                 Message("user", [aud, Text("And this?")])])
    assert ours.input_ids.tolist() == want.input_ids.tolist()
    assert ours.positions.tolist() == want.positions.tolist()
    assert [m for m, _ in plan.media] == ["image", "audio"]


def test_bad_requests_get_openai_errors(server, parts):
    bad_png = "data:image/png;base64," + b64(b"\x89PNG\r\n\x1a\nnot a png")
    ok = user({"type": "text", "text": "hi"})
    cases = [
        ({"messages": ok}, None, 401, "invalid_api_key", None),
        ({"messages": ok}, "wrong", 401, "invalid_api_key", None),
        ({}, KEY, 400, "missing_required_parameter", "messages"),
        ({"messages": []}, KEY, 400, "invalid_value", "messages"),
        ({"messages": [{"role": "tool", "content": "x"}]}, KEY, 400, "invalid_value", "messages[0].role"),
        ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}, KEY, 400,
         "invalid_value", "messages[1].role"),
        ({"messages": user({"type": "file", "file": {}})}, KEY, 400, "invalid_value", "messages[0].content[0].type"),
        ({"messages": user({"type": "image_url", "image_url": {"url": bad_png}})}, KEY, 400, "invalid_image",
         "messages[0].content[0].image_url.url"),
        ({"messages": user({"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}})}, KEY, 400,
         "invalid_value", "messages[0].content[0].image_url.url"),
        ({"messages": user({"type": "input_audio", "input_audio": {"data": b64(b"noise" * 50), "format": "mp3"}})},
         KEY, 400, "invalid_audio", "messages[0].content[0].input_audio.data"),
        ({"messages": user({"type": "input_audio", "input_audio": {"data": b64(b"abc"), "format": "pcm16"}})},
         KEY, 400, "invalid_audio", "messages[0].content[0].input_audio.data"),
        ({"messages": user({"type": "input_audio", "input_audio": {"data": b64(b"ab"), "format": "aiff"}})},
         KEY, 400, "invalid_value", "messages[0].content[0].input_audio.format"),
        ({"messages": user({"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + b64(parts["png"])}})},
         KEY, 400, "invalid_video", "messages[0].content[0].video_url.url"),
        ({"messages": user({"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/x.png"}})}, KEY, 400,
         "remote_media_disabled", "messages[0].content[0].image_url.url"),
        ({"messages": user({"type": "image_url", "image_url": {"url": "/etc/passwd"}})}, KEY, 400,
         "local_media_disabled", "messages[0].content[0].image_url.url"),
        ({"messages": ok, "modalities": ["text", "audio"], "audio": {"voice": "Nobody", "format": "wav"}}, KEY, 400,
         "invalid_value", "audio.voice"),
        ({"messages": ok, "modalities": ["text", "audio"], "audio": {"voice": "Ethan", "format": "aiff"}}, KEY, 400,
         "invalid_value", "audio.format"),
        ({"messages": ok, "modalities": ["video"]}, KEY, 400, "invalid_value", "modalities[0]"),
        ({"messages": ok, "n": 2}, KEY, 400, "unsupported_value", "n"),
        ({"messages": ok, "temperature": 5}, KEY, 400, "invalid_value", "temperature"),
        ({"messages": ok, "max_tokens": 0}, KEY, 400, "invalid_value", "max_tokens"),
        ({"messages": ok, "stop": ["a", "b", "c", "d", "e"]}, KEY, 400, "invalid_value", "stop"),
        ({"messages": ok, "tools": [{"type": "function"}]}, KEY, 400, "unsupported_parameter", "tools"),
        ({"messages": user({"type": "text", "text": "word " * 5000})}, KEY, 400, "context_length_exceeded",
         "messages"),
    ]
    for body, key, status, code, param in cases:
        got, err, _ = post(server, {"model": "omni", **body}, key)
        assert (got, err["error"]["code"], err["error"]["param"]) == (status, code, param), (body, err)
        assert err["error"]["message"] and err["error"]["type"] == "invalid_request_error"
    got, err, _ = post(server, None, raw=b"{not json")
    assert got == 400 and err["error"]["code"] == "invalid_json"
    got, err, _ = post(server, None, raw=b"x" * (3 << 20))
    assert got == 413 and err["error"]["code"] == "request_too_large"
    # the SDK raises its own error classes with the error object
    with pytest.raises(BadRequestError) as e:
        client(server).chat.completions.create(model="omni", messages=ok, modalities=["text", "audio"],
                                               audio={"voice": "Nobody", "format": "wav"})
    assert e.value.status_code == 400 and e.value.body["param"] == "audio.voice"
    # unknown API paths get an error object too
    req = urllib.request.Request(f"http://127.0.0.1:{server.port}/v1/embeddings", data=b"{}", method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 404 and json.loads(e.value.read())["error"]["code"] == "not_found"
    # still serving
    assert create(client(server), messages=ok, max_completion_tokens=2).usage.completion_tokens == 2


def test_busy_engine_is_429_and_slots_come_back(server, engine):
    assert wait_free(engine)  # slots of finished requests are released by the engine's worker, just after
    held = [engine.open_conversation() for _ in range(SLOTS)]
    try:
        got, err, headers = post(server, {"model": "omni", "messages": user({"type": "text", "text": "hi"})})
        assert got == 429 and err["error"]["code"] == "server_busy" and headers["retry-after"] == "1"
        with pytest.raises(RateLimitError):
            client(server).chat.completions.create(model="omni", messages=TEXT)
    finally:
        for conv in held:
            conv.close()
    assert wait_free(engine)
    assert create(client(server), messages=TEXT, max_completion_tokens=2).choices[0].message.content


def wait_free(engine, timeout: float = 10.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if engine.active_conversations == 0:
            return True
        time.sleep(0.02)
    return False


def test_client_disconnect_mid_stream_cancels(server, engine):
    body = json.dumps({"model": "omni", "stream": True, "max_completion_tokens": 3000, "seed": 0, "messages": [
        {"role": "user", "content": "Tell me everything you know, at length."}]})
    metrics = server.server.metrics
    before = metrics.responses["cancelled"]
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", "/v1/chat/completions", body, {"Authorization": f"Bearer {KEY}",
                                                         "Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200 and r.getheader("content-type").startswith("text/event-stream")
    for _ in range(3):
        assert r.readline().startswith(b"data: {")
        r.readline()
    assert engine.active_conversations == 1
    t = time.time()
    conn.sock.close()
    conn.close()
    assert wait_free(engine), "the dropped request still holds its engine slot"
    assert time.time() - t < 5
    assert metrics.responses["cancelled"] == before + 1


def test_http_and_two_websockets_at_once(server):
    async def ws_turn(text: str) -> dict:
        c = await Raw.connect(server.url, KEY)
        await c.until("session.created")
        await c.send(type="conversation.item.create", item={"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": text}]})
        await c.send(type="response.create", response={"output_modalities": ["text"], "max_output_tokens": 20})
        done = (await c.until("response.done"))[-1]["response"]
        await c.close()
        return done

    async def main():
        http_reply = aclient(server).chat.completions.create(model="omni", messages=TEXT, max_completion_tokens=20,
                                                             modalities=["text", "audio"],
                                                             audio={"voice": "Ethan", "format": "wav"})
        return await asyncio.wait_for(asyncio.gather(http_reply, ws_turn("One?"), ws_turn("Two?")), 120)

    h, a, b = asyncio.run(main())
    assert h.choices[0].message.audio.transcript and base64.b64decode(h.choices[0].message.audio.data)[:4] == b"RIFF"
    assert a["status"] in ("completed", "incomplete") and b["status"] in ("completed", "incomplete")


def test_media_root_and_remote_media_when_allowed(engine, parts):
    """Local paths under --media-root and http URLs with --allow-remote-media; nothing outside the root."""
    root = parts["dir"] / "root"
    root.mkdir(exist_ok=True)
    (root / "p.png").write_bytes(parts["png"])
    (parts["dir"] / "outside.png").write_bytes(parts["png"])

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(root), **kw)

        def log_message(self, *a):
            pass

    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    srv = ServerThread(engine, ServerConfig(port=0, api_key=KEY, media_root=str(root), allow_remote_media=True))
    try:
        def ask(url):
            return post(srv, {"model": "omni", "max_completion_tokens": 2, "messages": user(
                {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is it?"})})

        for url in (str(root / "p.png"), f"file://{root / 'p.png'}", f"http://127.0.0.1:{files.server_port}/p.png"):
            status, r, _ = ask(url)
            assert status == 200 and r["usage"]["completion_tokens"] == 2, (url, r)
        for url in (str(root / ".." / "outside.png"), f"file://{parts['dir'] / 'outside.png'}"):
            status, r, _ = ask(url)
            assert status == 400 and r["error"]["code"] == "local_media_disabled", (url, r)
        status, r, _ = ask(f"http://127.0.0.1:{files.server_port}/missing.png")
        assert status == 400 and r["error"]["code"] == "invalid_media"
    finally:
        srv.stop()
        files.shutdown()


def test_shutdown_ends_a_running_stream_with_an_error(engine):
    srv = ServerThread(engine, ServerConfig(port=0))
    c = OpenAI(api_key="none", base_url=f"http://127.0.0.1:{srv.port}/v1", max_retries=0)
    stream = c.chat.completions.create(model="omni", stream=True, max_completion_tokens=3000, seed=0,
                                       messages=[{"role": "user", "content": "Talk for a long time."}])
    assert next(iter(stream)).choices[0].delta.role == "assistant"
    t = time.time()
    stopper = threading.Thread(target=srv.stop)
    stopper.start()
    with pytest.raises(openai.APIError) as e:
        for _ in stream:
            pass
    stopper.join(30)
    assert "shutting down" in str(e.value) and time.time() - t < 15
    assert wait_free(engine)
