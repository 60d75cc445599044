"""What one browser tab shows of its realtime Session: server events in, chat, speech and timings out.

`Tab.on_event` is the Session's `send`: it turns transcript deltas into the chat, audio deltas into
PCM chunks for the player, `response.done` into per-turn timings and `error` into the page's notice.
No gradio here; ui/app.py renders a Tab.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import time
import wave
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger("omni.ui")

OUTPUT_RATE = 24000  # PCM16 mono from response.output_audio.delta
INPUT_RATE = 16000  # what the page sends the session (our protocol extension: no resampling there)
RETRY_S = 3.0  # a tab without a session (the server was full) tries to open one at most this often
IDLE_NOTE = ("this tab was idle, so its session was closed to free the server; a new conversation starts here "
             "and the model does not remember the turns above")
FLUSH_S = 5.0  # how long closing a tab waits for frames it handed to gradio to be queued for the page


def wav(pcm: bytes, rate: int = OUTPUT_RATE) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm)
    return buf.getvalue()


def jpeg(frame: np.ndarray, quality: int = 85) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(frame[..., :3])).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def pcm16(x: np.ndarray) -> bytes:
    return (np.clip(x, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


class Resampler:
    """Microphone chunks (int16 or float, any rate, mono or interleaved channels) -> PCM16 at 16 kHz."""

    def __init__(self):
        self.rate, self._r = None, None

    def __call__(self, rate: int, x: np.ndarray) -> bytes:
        import av

        if x.ndim == 2:  # (samples, channels)
            x = x.mean(axis=1)
        if x.dtype.kind == "f":
            x = np.clip(x, -1, 1) * 32767.0
        x = x.astype(np.int16)
        if rate == INPUT_RATE:
            return x.astype("<i2").tobytes()
        if self._r is None or rate != self.rate:
            self.rate, self._r = rate, av.AudioResampler(format="s16", layout="mono", rate=INPUT_RATE)
        f = av.AudioFrame.from_ndarray(x[None], format="s16", layout="mono")
        f.sample_rate = rate
        return b"".join(o.to_ndarray()[0].astype("<i2").tobytes() for o in self._r.resample(f))


@dataclass
class Reply:
    """One response as the page saw it."""

    id: str
    turn: int
    source: str  # "typed" or "spoken"
    started: float  # perf_counter when the user's turn ended (button, send, or VAD speech_stopped)
    chat_index: int
    text: str = ""
    pcm: list[bytes] = field(default_factory=list)
    sent: int = 0  # pcm chunks handed to the player
    audio_bytes: int = 0
    first_text: float | None = None
    first_audio: float | None = None
    last_audio: float | None = None
    ended: float | None = None
    status: str | None = None
    reason: str | None = None
    usage: dict = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return self.status is not None

    @property
    def outcome(self) -> str:
        if self.status == "cancelled":
            return "interrupted" if self.reason == "turn_detected" else "stopped"
        return {"completed": "done", "incomplete": "cut at the length limit"}.get(self.status, self.status or "speaking…")

    @property
    def audio_s(self) -> float:
        return self.audio_bytes / 2 / OUTPUT_RATE


class Tab:
    """One browser tab: its Session and what the page shows of it."""

    def __init__(self, ui):
        """ui: has new_session(send), close_session(s), speech, default_voice."""
        self.ui = ui
        self.session = None
        self.chat: list[dict] = []
        self.replies: dict[str, Reply] = {}
        self.order: list[Reply] = []
        self.notice = ""
        self.errors = 0  # error events seen (a handler compares before/after to learn that its event failed)
        self.turn_end: float | None = None
        self.frames = 0  # camera frames sent since the last committed turn
        self.speech_ms: list[int] = [0, 0]
        self.playing: set[str] = set()  # replies a player generator has taken
        self.sending = 0  # frames yielded to gradio that it has not queued for the page yet (OmniUI._to_page)
        self.closed = False  # cleared or gone: another tab owns the page, this one never writes to it again
        self.trigger = 0
        self.next_source = "spoken"  # what the next reply answers: a VAD turn unless a handler says otherwise
        self.resample = Resampler()
        self._changed = asyncio.Event()
        self._retry_at = 0.0
        self._opening = asyncio.Lock()
        self.last_used = time.monotonic()  # the page's last event (the idle sweep gives the slot back after a while)
        self.released = False  # the session was closed for being idle; the next action opens a new one

    async def open(self) -> bool:
        """A fresh Session (and Conversation); False with a notice when the server is full."""
        from streaming.engine import EngineBusy

        try:
            self.session = self.ui.new_session(self.on_event)
        except EngineBusy as e:
            self.session = None
            self.notice = (f"The server is at its session limit ({e}); close another tab or try again later "
                           "(any action here retries).")
            return False
        self.notice = ""
        await self.session.open()
        ui = self.ui
        await self.send("session.update", session={
            "type": "realtime", "output_modalities": ["audio"] if ui.speech else ["text"],
            "audio": {"input": {"format": {"type": "audio/pcm", "rate": INPUT_RATE},
                                "turn_detection": {"type": "server_vad", "create_response": True,
                                                   "interrupt_response": True}},
                      "output": {"voice": ui.default_voice}}})
        return True

    async def close(self) -> None:
        """End the session for good. Returns once no frame of this tab is still on its way to the page (or
        after FLUSH_S), so that what the caller shows next is not overwritten by one."""
        self.closed = True
        self._changed.set()  # its players wake up and end
        s, self.session = self.session, None
        if s is not None:
            await self.ui.close_session(s)
        deadline = time.monotonic() + FLUSH_S
        while self.sending and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    async def ready(self) -> bool:
        """Whether there is a session; without one, try to open one (at most every RETRY_S)."""
        self.last_used = time.monotonic()
        async with self._opening:  # a new tab's first events (load, microphone, camera) race to open it
            if self.session is not None:
                return True
            if self.closed or time.monotonic() < self._retry_at:
                return False
            self._retry_at = time.monotonic() + RETRY_S
            if not await self.open():
                return False
            if self.released:  # said in the chat, where the model's memory starts again
                self.released = False
                self.notice = IDLE_NOTE
                if self.chat:
                    self.chat.append({"role": "assistant", "content": f"*({IDLE_NOTE})*"})
            return True

    def idle(self, timeout_s: float) -> bool:
        """Whether the tab holds a session it has not used for `timeout_s` (and is not answering in)."""
        s = self.session
        return (s is not None and not s.responding and not self.playing_now()
                and time.monotonic() - self.last_used > timeout_s)

    def playing_now(self) -> bool:
        return any(not r.done or r.sent < len(r.pcm) for r in self.order if r.id in self.playing)

    async def release(self) -> None:
        """Give the engine slot back (idle); unlike close() the tab lives on and reopens when used."""
        async with self._opening:
            s, self.session = self.session, None
            if s is None:
                return
            self.released = True
            self._retry_at = 0.0
            await self.ui.close_session(s)

    async def send(self, kind: str, **fields) -> bool:
        """Hand one client event to the session; False when it answered with an error event."""
        if self.session is None:  # closed while the handler was on its way here
            return False
        before = self.errors
        self.last_used = time.monotonic()
        await self.session.handle(json.dumps({"type": kind, **fields}))
        return self.errors == before

    def on_event(self, ev: dict) -> None:
        """The session's `send`: synchronous and cheap (it runs inside the session's code)."""
        kind, now = ev["type"], time.perf_counter()
        if kind == "error":
            err = ev["error"]
            self.errors += 1
            self.notice = f"{err.get('message')} ({err.get('code')})"
            log.info("ui: error event: %s", self.notice)
        elif kind == "input_audio_buffer.speech_started":
            self.speech_ms[0] = ev.get("audio_start_ms", 0)
        elif kind == "input_audio_buffer.speech_stopped":
            self.speech_ms[1] = ev.get("audio_end_ms", 0)
            self.turn_end = now
        elif kind == "input_audio_buffer.committed":
            said = max(0, self.speech_ms[1] - self.speech_ms[0]) / 1000
            what = f"(spoken turn, {said:.1f} s" if said else "(spoken turn"
            if self.frames:
                what += f", with {self.frames} camera frame{'s' * (self.frames != 1)}"
            what += ")"
            self.chat.append({"role": "user", "content": what})
            self.frames = 0
        elif kind == "response.created":
            rid = ev["response"]["id"]
            started = self.turn_end or now
            self.turn_end = None
            self.chat.append({"role": "assistant", "content": "…"})
            r = Reply(rid, len(self.order) + 1, self.next_source, started, len(self.chat) - 1)
            self.next_source = "spoken"
            self.replies[rid] = r
            self.order.append(r)
        elif kind in ("response.output_audio_transcript.delta", "response.output_text.delta"):
            r = self.replies.get(ev.get("response_id"))
            if r is not None:
                r.first_text = r.first_text or now
                r.text += ev["delta"]
                self.chat[r.chat_index]["content"] = r.text
        elif kind == "response.output_audio.delta":
            r = self.replies.get(ev.get("response_id"))
            if r is not None:
                pcm = base64.b64decode(ev["delta"])
                r.first_audio = r.first_audio or now
                r.last_audio = now
                r.pcm.append(pcm)
                r.audio_bytes += len(pcm)
        elif kind == "response.done":
            self.last_used = time.monotonic()  # idle counts from the end of the last reply too
            resp = ev["response"]
            r = self.replies.get(resp["id"])
            if r is not None:
                r.ended, r.status = now, resp["status"]
                r.reason = (resp.get("status_details") or {}).get("reason")
                r.usage = resp.get("usage") or {}
                if r.status != "completed":
                    self.chat[r.chat_index]["content"] = (r.text or "") + f" *({r.outcome})*"
                elif not r.text:
                    self.chat[r.chat_index]["content"] = "*(no text)*"
        self._changed.set()

    async def changed(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except asyncio.TimeoutError:
            pass
        self._changed.clear()

    def stats(self) -> str:
        if not self.order:
            return "*Per-turn timings appear here after the first reply.*"
        rows = ["| turn | input | first text | first audio | audio | RTF | status |",
                "|---:|---|---:|---:|---:|---:|---|"]
        for r in self.order[-8:]:
            ft = f"{r.first_text - r.started:.2f} s" if r.first_text else "–"
            fa = f"{r.first_audio - r.started:.2f} s" if r.first_audio else "–"
            rtf = "–"
            if r.audio_bytes and r.status in ("completed", "incomplete"):
                rtf = f"{((r.last_audio or r.ended) - r.started) / r.audio_s:.2f}"
            rows.append(f"| {r.turn} | {r.source} | {ft} | {fa} | {r.audio_s:.1f} s | {rtf} | {r.outcome} |")
        rows.append("\n*First text / first audio: seconds from the end of your turn. RTF (real-time factor): "
                    "seconds spent per second of speech; below 1 is faster than real time.*")
        return "\n".join(rows)
