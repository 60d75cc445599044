"""Helpers for the realtime server tests: a real server on a loopback port, raw clients, event checks."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
from pathlib import Path

import numpy as np
import pydantic

import openai.types.beta.realtime as beta_types
import openai.types.realtime as ga_types

GA_EVENT = pydantic.TypeAdapter(ga_types.RealtimeServerEvent)
BETA_EVENT = pydantic.TypeAdapter(beta_types.RealtimeServerEvent)


def validate(ev: dict, beta: bool = False) -> None:
    """Every server event must be one the openai SDK's types accept, with exactly its `type`."""
    if not beta and ev["type"] in ("session.created", "session.updated"):
        fmt = ev["session"]["audio"]["input"]["format"]
        if fmt.get("rate") == 16000:  # our one extension: 16 kHz PCM16 input
            ev = json.loads(json.dumps(ev))
            ev["session"]["audio"]["input"]["format"]["rate"] = 24000
    parsed = (BETA_EVENT if beta else GA_EVENT).validate_python(ev)
    assert parsed.type == ev["type"]


class ServerThread:
    """A RealtimeServer on its own event loop in a background thread (port 0: a free port)."""

    def __init__(self, engine, config):
        from streaming.server import RealtimeServer

        self.turns: list = []
        self.server = RealtimeServer(engine, config, on_turn=self.turns.append)
        self.loop = asyncio.new_event_loop()
        started = threading.Event()

        def run():
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(self.server.start())
            started.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert started.wait(30)
        self.port = self.server.port
        self.url = f"ws://127.0.0.1:{self.port}/v1/realtime?model=omni"

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.shutdown(timeout=5), self.loop).result(20)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


class Raw:
    """A raw `websockets` client that validates every event it receives."""

    def __init__(self, ws, beta: bool = False):
        self.ws, self.beta, self.events = ws, beta, []

    @classmethod
    async def connect(cls, url: str, key: str | None = None, beta: bool = False, **kw) -> "Raw":
        from websockets.asyncio.client import connect

        headers = {}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        if beta:
            headers["OpenAI-Beta"] = "realtime=v1"
        return cls(await connect(url, additional_headers=headers, max_size=None, **kw), beta)

    async def send(self, **ev) -> None:
        await self.ws.send(json.dumps(ev))

    async def recv(self, timeout: float = 30) -> dict:
        ev = json.loads(await asyncio.wait_for(self.ws.recv(), timeout))
        validate(ev, self.beta)
        self.events.append(ev)
        return ev

    async def until(self, kind: str, timeout: float = 60) -> list[dict]:
        """Events up to and including the first of type `kind`."""
        got = []
        while True:
            ev = await self.recv(timeout)
            got.append(ev)
            if ev["type"] == kind:
                return got

    async def close(self) -> None:
        await self.ws.close()


def pcm16(x: np.ndarray) -> bytes:
    return (np.clip(x, -1, 1) * 32767).astype("<i2").tobytes()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


SPEECH = Path(__file__).parent / "data" / "speech"  # made by scripts/make-test-speech


def speech_clip(text: str) -> Path:
    """The committed clip of `text` spoken by espeak-ng (its FLAC title is the text)."""
    import av

    clips = {}
    for f in sorted(SPEECH.glob("*.flac")):
        with av.open(str(f)) as c:
            clips[c.metadata.get("title")] = f
    if text not in clips:
        raise LookupError(f"no speech clip says {text!r} (have: {sorted(clips)}); add it to scripts/make-test-speech")
    return clips[text]


def speech(text: str, rate: int = 24000) -> np.ndarray:
    """Real speech (espeak-ng, committed) as float32 mono at `rate`."""
    from omni.media import load_audio

    return load_audio(str(speech_clip(text)), sr=rate)


def speech_samples(speech, codes: int) -> int:
    """The samples `codes` codec steps of a model's speech part make: 480 per Qwen2.5 code (50/s); 1920 per
    Qwen3 frame (12.5/s), less the 555 the last frame's causal convs hold back."""
    if hasattr(speech, "code2wav"):
        return speech.code2wav.out_len(codes)
    return codes * round(speech.sample_rate / speech.codec_hz)
