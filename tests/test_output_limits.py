"""Usage counted by kind and output limits that bound speech, over the Realtime websocket (raw client,
every server event validated by the openai SDK's types)."""

from __future__ import annotations

import asyncio
import base64

import numpy as np
import pytest

from streaming.engine import Engine, EngineConfig
from streaming.protocol import SessionConfig
from streaming.server import ServerConfig
from tests import media as make
from tests.realtime import Raw, ServerThread, b64, pcm16

KEY = "limits-key"


@pytest.fixture(scope="module")
def server(embedded_dir):
    eng = Engine.load(embedded_dir, config=EngineConfig(max_sessions=2, max_context=4096, max_new_tokens=400,
                                                        max_audio_s=4.0))
    srv = ServerThread(eng, ServerConfig(port=0, api_key=KEY, defaults=SessionConfig(turn_detection=None)))
    yield srv
    srv.stop()
    eng.shutdown()


def run(coro, timeout=180):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def turn(c: Raw, content: list[dict], **response) -> tuple[dict, bytes]:
    """One user item and one response: (response.done's response, the speech it streamed)."""
    await c.send(type="conversation.item.create", item={"type": "message", "role": "user", "content": content})
    await c.until("conversation.item.done")
    await c.send(type="response.create", response=response)
    evs = await c.until("response.done")
    audio = b"".join(base64.b64decode(e["delta"]) for e in evs if e["type"] == "response.output_audio.delta")
    return evs[-1]["response"], audio


def test_usage_counts_input_tokens_by_kind_and_the_cached_history(server):
    image = "data:image/png;base64," + base64.b64encode(make.encode_image(make.pattern_image(64, 96))).decode()
    audio = b64(pcm16(make.tone(1.0, sr=24000)))  # 1 s at 24 kHz: 25 audio tokens after resampling

    async def main():
        c = await Raw.connect(server.url, KEY)
        await c.until("session.created")
        await c.send(type="session.update", session={"type": "realtime", "output_modalities": ["text"]})
        await c.until("session.updated")
        one, _ = await turn(c, [{"type": "input_audio", "audio": audio}, {"type": "input_image", "image_url": image},
                                {"type": "input_text", "text": "What is this?"}], max_output_tokens=5)
        two, _ = await turn(c, [{"type": "input_text", "text": "And then?"}], max_output_tokens=5)
        await c.ws.close()
        return one["usage"], two["usage"]

    one, two = run(main())
    d = one["input_token_details"]
    assert d["audio_tokens"] == 25 and d["image_tokens"] > 0 and d["text_tokens"] > 0 and d["cached_tokens"] == 0
    assert d["audio_tokens"] + d["image_tokens"] + d["text_tokens"] == one["input_tokens"]
    assert d["cached_tokens_details"] == {"text_tokens": 0, "audio_tokens": 0, "image_tokens": 0}
    # turn 2 reuses turn 1's cache: its prompt and reply are cached input now, the media among them
    d2, c2 = two["input_token_details"], two["input_token_details"]["cached_tokens_details"]
    assert d2["cached_tokens"] >= one["input_tokens"] + one["output_tokens"] - 1  # (a cut reply's last token is new)
    assert c2["audio_tokens"] == 25 and c2["image_tokens"] == d["image_tokens"]
    assert sum(c2.values()) == d2["cached_tokens"] and d2["audio_tokens"] == 25 and d2["image_tokens"] == d["image_tokens"]
    assert two["input_tokens"] == d2["text_tokens"] + d2["audio_tokens"] + d2["image_tokens"]


@pytest.mark.parametrize("where", ["session", "response"])
def test_max_output_tokens_stops_text_and_speech(server, where):
    """16 output tokens with audio out: text and codec tokens together stay within 16, the speech stops there,
    and the response ends incomplete / max_output_tokens. Without the limit the same reply speaks far longer."""
    async def main():
        c = await Raw.connect(server.url, KEY)
        await c.until("session.created")
        session = {"type": "realtime", "output_modalities": ["audio"]}
        if where == "session":
            session["max_output_tokens"] = 16
        await c.send(type="session.update", session=session)
        await c.until("session.updated")
        limited = await turn(c, [{"type": "input_text", "text": "Tell me a long story."}],
                             **({"max_output_tokens": 16} if where == "response" else {}))
        free = await turn(c, [{"type": "input_text", "text": "Tell me a long story."}], max_output_tokens="inf")
        await c.ws.close()
        return limited, free

    (r, audio), (free, free_audio) = run(main())
    u = r["usage"]
    assert r["status"] == "incomplete" and r["status_details"]["reason"] == "max_output_tokens"
    out = u["output_token_details"]
    assert u["output_tokens"] == out["text_tokens"] + out["audio_tokens"] <= 16 and out["audio_tokens"] >= 4
    assert len(audio) == out["audio_tokens"] * 480 * 2  # exactly the speech of the codes counted
    # the server-wide bound (max_audio_s=4: 200 codes) still ends an unlimited reply's speech, also incomplete
    fo = free["usage"]["output_token_details"]
    assert fo["audio_tokens"] == 200 and len(free_audio) == 200 * 480 * 2 and free["status"] == "incomplete"
    assert np.frombuffer(audio, "<i2").std() > 0
