"""One realtime session, apart from I/O: client events in, server events out, on an engine Conversation.

    session = Session(conv, send, dialect=Dialect(beta), model_name="omni")
    session.start()                      # session.created
    await session.handle(message)        # for each websocket message, in order
    await session.close()

`send(event)` is synchronous and must not block (the server puts events on a bounded queue).
The session owns: the input audio buffer (PCM16 at 24 or 16 kHz, resampled to 16 kHz as it
arrives), the video frame buffer (timed by the input audio, thinned to the video rate), the user
parts gathered since the last response, the VAD, and at most one running response. One
Conversation per session, so the engine keeps its KV cache across turns.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Callable

import av
import numpy as np

from omni import media
from omni.types import Audio, AudioDelta, Done, Error, Image, Part, Text, TextDelta, Video
from streaming.metrics import Metrics
from streaming.protocol import (OPENAI_VOICES, Dialect, ProtocolError, ResponseOptions, SessionConfig, b64decode,
                                data_uri, new_id, parse, require, response_options, usage)
from streaming.vad import SileroVad

log = logging.getLogger("omni.session")

SAMPLE_RATE = 16000  # what the audio encoder takes
MIN_COMMIT_S = 0.1  # a commit needs at least this much audio (or some video frames)
MAX_DELTA_BYTES = 24000  # output audio per delta event: 500 ms of PCM16 at 24 kHz


@dataclass(frozen=True)
class Limits:
    max_audio_s: float = 120.0  # input audio buffered before a commit
    max_frame_bytes: int = 4 << 20  # one encoded video frame
    max_fps: float = 30.0  # frames arriving faster than this are refused
    video_fps: float = 2.0  # frames kept for the model (at most this rate)
    max_frames: int = 120  # frames kept between turns (the oldest go first)


class AudioBuffer:
    """PCM16 mono at `rate` in, float32 16 kHz out, resampled as it streams."""

    def __init__(self, rate: int):
        self.rate = rate
        self.chunks: list[np.ndarray] = []
        self.samples = 0  # 16 kHz samples held
        self.total = 0  # 16 kHz samples ever appended (the session's audio clock)
        self._resampler = None

    def append(self, pcm: np.ndarray) -> np.ndarray:
        """int16 samples -> the float32 16 kHz samples they became (also kept in the buffer)."""
        if len(pcm) == 0:
            return np.zeros(0, np.float32)
        if self.rate == SAMPLE_RATE:
            x = pcm.astype(np.float32) / 32768.0
        else:
            if self._resampler is None:
                self._resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
            f = av.AudioFrame.from_ndarray(pcm[None], format="s16", layout="mono")
            f.sample_rate = self.rate
            out = [o.to_ndarray()[0] for o in self._resampler.resample(f)]
            x = np.concatenate(out) if out else np.zeros(0, np.float32)
        if len(x):
            self.chunks.append(x)
            self.samples += len(x)
            self.total += len(x)
        return x

    def _flush(self) -> None:
        if self._resampler is not None:
            out = [o.to_ndarray()[0] for o in self._resampler.resample(None)]
            self._resampler = None
            for x in out:
                self.chunks.append(x)
                self.samples += len(x)
                self.total += len(x)

    def take(self, upto: int | None = None) -> np.ndarray:
        """The buffered audio up to the session clock's sample `upto` (all of it by default)."""
        if upto is None:
            self._flush()
        x = np.concatenate(self.chunks) if self.chunks else np.zeros(0, np.float32)
        keep = 0 if upto is None else max(0, min(len(x), self.total - upto))
        head, rest = x[:len(x) - keep], x[len(x) - keep:]
        self.chunks, self.samples = ([rest] if len(rest) else []), len(rest)
        return head

    def trim(self, keep: int) -> None:
        """Keep only the last `keep` samples (the VAD's prefix padding while nobody speaks)."""
        if self.samples > keep:
            x = np.concatenate(self.chunks)[self.samples - keep:]
            self.chunks, self.samples = [x], len(x)

    def clear(self) -> None:
        self.take()
        self.chunks, self.samples = [], 0


def sample_frames(frames: list[tuple[float, np.ndarray]], fps: float) -> list[tuple[float, np.ndarray]]:
    """Keep frames at least 1/fps apart (timestamps in seconds, in arrival order)."""
    out, nxt = [], -np.inf
    for t, f in frames:
        if t >= nxt:
            out.append((t, f))
            nxt = t + 1.0 / fps - 1e-3
    return out


def _within(a: tuple[float, ...], b: tuple[float, ...], gap: float) -> bool:
    """Whether times b (arrival, audio) are less than `gap` seconds after a on every clock."""
    return all(y - x < gap for x, y in zip(a, b))


def _resize(frame: np.ndarray, h: int, w: int) -> np.ndarray:
    if frame.shape[:2] == (h, w):
        return frame
    return av.VideoFrame.from_ndarray(frame, format="rgb24").reformat(width=w, height=h).to_ndarray(format="rgb24")


def turn_parts(audio: np.ndarray, frames: list[tuple[float, np.ndarray]], max_fps: float = 2.0) -> list[Part]:
    """A committed turn's media as chat parts: its audio, with the frames seen since the last turn.

    Three or more frames become one Video at the frames' own rate (at most `max_fps`) carrying
    the turn's audio (audio-in-video: TMRoPE interleaves them in time); one or two frames become
    Images before the Audio.
    """
    has_audio = len(audio) > 0
    frames = sample_frames(frames, max_fps)
    if len(frames) <= 2:
        return [Image(f) for _, f in frames] + ([Audio(audio)] if has_audio else [])
    if len(frames) % 2:  # the vision encoder takes frames in pairs: drop the oldest
        frames = frames[1:]
    span = frames[-1][0] - frames[0][0]
    fps = min(max_fps, (len(frames) - 1) / span) if span > 0 else max_fps
    h, w = frames[-1][1].shape[:2]
    stack = np.stack([_resize(f, h, w) for _, f in frames])  # (T, H, W, 3)
    return [Video(stack, use_audio=has_audio, fps=max(fps, 0.25), audio=audio if has_audio else None)]


@dataclass
class _Response:
    id: str
    item_id: str
    opts: ResponseOptions
    task: asyncio.Task | None = None
    cancelled: str | None = None  # reason, once cancel was asked


class Session:
    def __init__(self, conv, send: Callable[[dict | None], None], *, dialect: Dialect, model_name: str,
                 defaults: SessionConfig = SessionConfig(), limits: Limits = Limits(), metrics: Metrics | None = None,
                 voices: tuple[str, ...] = (), on_turn: Callable[[list[Part]], None] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.conv, self._send, self.dialect, self.model_name = conv, send, dialect, model_name
        self.id = new_id("sess")
        self.cfg, self.limits, self.metrics = defaults, limits, metrics or Metrics()
        self.voices, self.on_turn, self.clock = voices, on_turn, clock
        self.log = logging.LoggerAdapter(log, {"session": self.id})
        self.audio = AudioBuffer(self.cfg.input_rate)
        self.frames: deque[tuple[float, float, np.ndarray]] = deque(maxlen=limits.max_frames)  # (arrival, audio, frame)
        self._last_frame_in = (-np.inf, -np.inf)  # the times of the last frame (kept or not), as in self.frames
        self.pending: list[Part] = []  # user parts since the last response
        self.pending_items = 0
        self.last_item: str | None = None
        self.response: _Response | None = None
        self.vad: SileroVad | None = None
        self._speech_item: str | None = None  # item id announced by speech_started
        self._speech_start = 0  # session-clock sample where speech started
        self._system_sent: str | None = None  # the instructions the conversation was opened with
        self._turns = 0
        self._vad_origin = 0  # session-clock sample where the VAD's own clock starts

    def send(self, ev: dict | None) -> None:
        if ev is not None:
            if ev["type"] == "error":
                self.metrics.error(ev["error"].get("code"))
            self._send(ev)

    async def open(self) -> None:
        """Start the VAD when the session turns on server_vad, then say session.created."""
        await self._configure_vad(None)
        self.send(self.dialect.event("session.created", session=self._session()))

    async def _configure_vad(self, old) -> None:
        td = self.cfg.turn_detection
        if td is None:
            self.vad = None
        elif self.vad is None or td != old:
            self.vad = await asyncio.to_thread(SileroVad, td.threshold, td.silence_duration_ms)
            self._vad_origin = self.audio.total

    def _session(self) -> dict:
        cfg = self.cfg
        if cfg.instructions is None:
            cfg = replace(cfg, instructions=self.conv.default_system)
        return self.dialect.session(cfg, self.id, self.model_name)

    async def handle(self, message: str | bytes) -> None:
        """Act on one client message; any problem with it becomes an `error` event."""
        event_id = None
        try:
            ev = parse(message, self.dialect.beta)
            event_id = ev.get("event_id")
            await getattr(self, "_on_" + ev["type"].replace(".", "_"))(ev)
        except ProtocolError as e:
            self.log.info("session %s: %s (%s)", self.id, e.message, e.code)
            self.send(self.dialect.error(e.message, e.code, e.param, e.event_id or event_id, e.type))
        except media.MediaError as e:
            self.send(self.dialect.error(str(e), "invalid_media", None, event_id))
        except Exception as e:  # a bug of ours must not end the session either; the operator sees it counted
            self.log.exception("session %s: failed on a client event", self.id)
            self.metrics.server_error("realtime")
            self.send(self.dialect.error(f"internal error: {e}", "internal", None, event_id, "server_error"))

    async def close(self) -> None:
        r = self.response
        if r is not None and r.task is not None and not r.task.done():
            self.cancel("client_gone")
            try:
                await asyncio.wait_for(asyncio.shield(r.task), 5)
            except (asyncio.TimeoutError, asyncio.CancelledError, Exception):
                r.task.cancel()
        self.conv.close()

    def cancel(self, reason: str) -> bool:
        r = self.response
        if r is None or r.task is None or r.task.done() or r.cancelled:
            return False
        r.cancelled = reason
        self.conv.cancel(reason)
        return True

    @property
    def responding(self) -> bool:
        r = self.response
        return r is not None and r.task is not None and not r.task.done() and r.cancelled is None

    async def _on_session_update(self, ev: dict) -> None:
        eid = ev.get("event_id")
        cfg = self.cfg.update(ev.get("session"), self.dialect.beta, eid)
        if cfg.voice is not None and cfg.voice != self.cfg.voice and self.voices and cfg.voice not in self.voices:
            if cfg.voice in OPENAI_VOICES:
                self.log.info("session %s: voice %r is not a model voice; using the default", self.id, cfg.voice)
            else:
                raise ProtocolError(f"unknown voice {cfg.voice!r}; this model speaks with {', '.join(self.voices)}",
                                    "invalid_value", "session.audio.output.voice" if not self.dialect.beta
                                    else "session.voice", eid)
        if cfg.input_rate != self.cfg.input_rate:
            if self.audio.samples:
                raise ProtocolError("cannot change the input audio rate while audio is buffered; commit or clear "
                                    "it first", "invalid_value", "session.audio.input.format.rate", eid)
            clock = self.audio.total
            self.audio = AudioBuffer(cfg.input_rate)
            self.audio.total = clock
        old, self.cfg = self.cfg.turn_detection, cfg
        await self._configure_vad(old)
        self.send(self.dialect.event("session.updated", session=self._session()))

    async def _on_input_audio_buffer_append(self, ev: dict) -> None:
        eid = ev.get("event_id")
        raw = b64decode(require(ev, "audio", str, "audio", eid), "audio", eid)
        if len(raw) % 2:
            raise ProtocolError("audio must be 16-bit PCM mono: got an odd number of bytes", "invalid_value",
                                "audio", eid)
        if (self.audio.samples + len(raw) // 2 * SAMPLE_RATE / self.cfg.input_rate) / SAMPLE_RATE > \
                self.limits.max_audio_s:
            raise ProtocolError(f"the input audio buffer is full ({self.limits.max_audio_s:g} s); commit or clear "
                                "it (this chunk was dropped)", "input_audio_buffer_full", "audio", eid)
        x = self.audio.append(np.frombuffer(raw, "<i2"))
        if self.vad is not None and len(x):
            await self._vad_step(x)

    async def _vad_step(self, x: np.ndarray) -> None:
        td = self.cfg.turn_detection
        origin = self._vad_origin
        for kind, ms in await asyncio.to_thread(self.vad.push, x):
            at = origin + ms * SAMPLE_RATE // 1000  # session-clock sample
            if kind == "start":
                self._speech_item = new_id("item")
                self._speech_start = at
                self.send(self.dialect.event("input_audio_buffer.speech_started", audio_start_ms=ms,
                                             item_id=self._speech_item))
                if td.interrupt_response and self.cancel("turn_detected"):
                    self.log.info("session %s: barge-in cancelled response %s", self.id, self.response.id)
            else:
                item = self._speech_item or new_id("item")
                self._speech_item = None
                self.send(self.dialect.event("input_audio_buffer.speech_stopped", audio_end_ms=ms, item_id=item))
                self._commit(None, item, upto=at, since=self._speech_start - td.prefix_padding_ms * 16)
                if td.create_response:
                    await self._respond(None, response_options({}, self.cfg, self.dialect.beta))
        if not self.vad.speaking:  # keep the prefix padding (and the VAD's start-up margin) while nobody speaks
            self.audio.trim((td.prefix_padding_ms + 300) * SAMPLE_RATE // 1000)

    async def _on_input_audio_buffer_commit(self, ev: dict) -> None:
        self._commit(ev.get("event_id"), self._speech_item or new_id("item"))
        self._speech_item = None
        if self.vad is not None:
            self.vad.reset()
            self._vad_origin = self.audio.total

    async def _on_input_audio_buffer_clear(self, ev: dict) -> None:
        self.audio.clear()
        self.send(self.dialect.event("input_audio_buffer.cleared"))

    async def _on_input_image_buffer_append(self, ev: dict) -> None:
        eid = ev.get("event_id")
        # Two times: arrival, and the seconds of input audio received before it. While the client streams
        # audio the second is its own clock: it puts the frame at the speech it came with, however the network
        # or our scheduler spaced their arrival. Frames are too close together only when they are on both.
        at = (self.clock(), self.audio.total / SAMPLE_RATE)
        b64 = require(ev, "image", str, "image", eid)
        if len(b64) * 3 // 4 > self.limits.max_frame_bytes:
            raise ProtocolError(f"video frame over {self.limits.max_frame_bytes} bytes (this frame was dropped)",
                                "frame_too_large", "image", eid)
        if _within(self._last_frame_in, at, 1.0 / self.limits.max_fps):
            raise ProtocolError(f"video frames faster than {self.limits.max_fps:g} per second (this frame was "
                                "dropped); send at most 2 per second", "frame_rate_exceeded", "image", eid)
        self._last_frame_in = at
        raw = data_uri(b64, "image", eid)
        if self.frames and _within(self.frames[-1][:2], at, 1.0 / self.limits.video_fps - 1e-3):
            return  # the model sees at most video_fps frames per second; this one falls between them
        try:
            frame = await asyncio.to_thread(media.load_image, raw)
        except media.MediaError as e:
            raise ProtocolError(f"undecodable video frame: {e}", "invalid_image", "image", eid) from None
        if len(self.frames) == self.frames.maxlen:
            self.log.debug("session %s: frame buffer full; dropping the oldest frame", self.id)
        self.frames.append((*at, frame))

    def _commit(self, event_id: str | None, item_id: str, upto: int | None = None, since: int | None = None) -> None:
        audio = self.audio.take(upto)
        if since is not None and upto is not None:  # VAD turns start prefix_padding_ms before the speech
            audio = audio[max(0, len(audio) - (upto - since)):]
        clock = 1 if len({heard for _, heard, _ in self.frames}) > 1 else 0  # the audio's if it ran with the frames
        frames = [(f[clock], f[2]) for f in self.frames]
        self.frames.clear()
        if len(audio) < MIN_COMMIT_S * SAMPLE_RATE and not frames:
            raise ProtocolError(f"buffer too small: expected at least {int(MIN_COMMIT_S * 1000)} ms of audio, "
                                f"have {len(audio) * 1000 // SAMPLE_RATE} ms", "input_audio_buffer_commit_empty",
                                None, event_id)
        parts = turn_parts(audio, frames, self.limits.video_fps)
        self.log.info("session %s: committed %.2f s of audio, %d frames", self.id, len(audio) / SAMPLE_RATE,
                      len(frames))
        self.send(self.dialect.event("input_audio_buffer.committed", item_id=item_id,
                                     previous_item_id=self.last_item))
        content = [{"type": "input_audio", "transcript": None}] if len(audio) else []
        content += [{"type": "input_image"} for p in parts if isinstance(p, Image)]
        self._add_item(item_id, content, parts)

    def _add_item(self, item_id: str, content: list[dict], parts: list[Part]) -> None:
        item = self.dialect.user_item(item_id, content)
        self.send(self.dialect.event("conversation.item.added", item=item, previous_item_id=self.last_item))
        self.send(self.dialect.event("conversation.item.done", item=item, previous_item_id=self.last_item))
        self.last_item = item_id
        self.pending += parts
        self.pending_items += 1

    async def _on_conversation_item_create(self, ev: dict) -> None:
        eid = ev.get("event_id")
        item = require(ev, "item", dict, "item", eid)
        if item.get("type", "message") != "message":
            raise ProtocolError("only message items are supported", "invalid_value", "item.type", eid)
        if item.get("role") != "user":
            raise ProtocolError("only user messages can be added (use session instructions for system text)",
                                "invalid_value", "item.role", eid)
        content = require(item, "content", list, "item.content", eid)
        parts, shown = [], []
        for i, c in enumerate(content):
            p = f"item.content[{i}]"
            if not isinstance(c, dict):
                raise ProtocolError(f"{p} must be an object", "invalid_type", p, eid)
            kind = c.get("type")
            if kind in ("input_text", "text"):
                parts.append(Text(require(c, "text", str, f"{p}.text", eid)))
                shown.append({"type": "input_text", "text": c["text"]})
            elif kind == "input_audio":
                raw = b64decode(require(c, "audio", str, f"{p}.audio", eid), f"{p}.audio", eid)
                if len(raw) < 2 or len(raw) % 2:
                    raise ProtocolError(f"{p}.audio must be 16-bit PCM mono at {self.cfg.input_rate} Hz",
                                        "invalid_value", f"{p}.audio", eid)
                buf = AudioBuffer(self.cfg.input_rate)
                buf.append(np.frombuffer(raw, "<i2"))
                parts.append(Audio(buf.take()))
                shown.append({"type": "input_audio", "transcript": c.get("transcript")})
            elif kind == "input_image":
                key = "image_url" if "image_url" in c else "image"
                raw = data_uri(require(c, key, str, f"{p}.{key}", eid), f"{p}.{key}", eid)
                try:
                    img = await asyncio.to_thread(media.load_image, raw)
                except media.MediaError as e:
                    raise ProtocolError(f"{p}.{key}: undecodable image: {e}", "invalid_image", f"{p}.{key}",
                                        eid) from None
                parts.append(Image(img))
                shown.append({"type": "input_image", "detail": c.get("detail") or "auto"})
            else:
                raise ProtocolError(f"{p}.type must be input_text, input_audio or input_image; got {kind!r}",
                                    "invalid_value", f"{p}.type", eid)
        if not parts:
            raise ProtocolError("item.content is empty", "invalid_value", "item.content", eid)
        self._add_item(item.get("id") or new_id("item"), shown, parts)

    async def _on_response_create(self, ev: dict) -> None:
        await self._respond(ev.get("event_id"), response_options(ev, self.cfg, self.dialect.beta))

    async def _on_response_cancel(self, ev: dict) -> None:
        if not self.cancel("client_cancelled"):
            raise ProtocolError("there is no response in progress to cancel", "response_cancel_not_active", None,
                                ev.get("event_id"))

    async def _respond(self, event_id: str | None, opts: ResponseOptions) -> None:
        if self.responding:
            raise ProtocolError("the conversation already has an active response; cancel it or wait for "
                                "response.done", "conversation_already_has_active_response", None, event_id)
        parts = self.pending
        instr = opts.instructions if opts.instructions != self.conv.default_system else None
        if self._turns == 0:
            self._system_sent = instr
            self.conv.set_system(instr)
        elif instr is not None and instr != self._system_sent:
            parts = [Text(instr)] + parts  # instructions after the first turn: say them in this turn
        if not self.pending:
            raise ProtocolError("nothing to respond to: add an item or commit audio first",
                                "input_missing", None, event_id)
        self.pending, self.pending_items = [], 0
        self._turns += 1
        prev = self.response.task if self.response is not None else None
        r = _Response(new_id("resp"), new_id("item"), opts)
        self.response = r
        if self.on_turn is not None:
            self.on_turn(parts)
        r.task = asyncio.create_task(self._run(r, parts, prev), name=f"response {r.id}")

    async def _run(self, r: _Response, parts: list[Part], prev: asyncio.Task | None) -> None:
        d, audio = self.dialect, "audio" in r.opts.output_modalities
        ids = {"response_id": r.id, "item_id": r.item_id, "output_index": 0, "content_index": 0}
        self.send(d.event("response.created", response=d.response(r.id, "in_progress", r.opts, [])))
        if prev is not None:  # a cancelled response still winding down
            await asyncio.gather(prev, return_exceptions=True)
        item = d.assistant_item(r.item_id, "in_progress", audio)
        self.send(d.event("response.output_item.added", response_id=r.id, output_index=0, item=item))
        self.send(d.event("conversation.item.added", item=item, previous_item_id=self.last_item))
        self.last_item = r.item_id
        part = {"type": "audio", "transcript": ""} if audio else {"type": "text", "text": ""}
        self.send(d.event("response.content_part.added", part=part, **ids))
        text, final = [], None
        modalities = ("text", "audio") if audio else ("text",)
        kw = {"voice": r.opts.voice if r.opts.voice in self.voices else None} if audio else {}
        try:
            async for ev in self.conv.respond(parts, modalities=modalities, max_new_tokens=r.opts.max_output_tokens,
                                              max_output_tokens=r.opts.max_output_tokens, **kw):
                if isinstance(ev, TextDelta):
                    if ev.reasoning:  # the Realtime protocol has no reasoning channel: the answer only
                        continue
                    text.append(ev.text)
                    if ev.text:
                        kind = "response.output_audio_transcript.delta" if audio else "response.output_text.delta"
                        self.send(d.event(kind, delta=ev.text, **ids))
                elif isinstance(ev, AudioDelta):
                    if r.cancelled:  # barge-in: the audio stops now, not when the engine's queue drains
                        continue
                    for i in range(0, len(ev.pcm), MAX_DELTA_BYTES):
                        self.send(d.event("response.output_audio.delta",
                                          delta=base64.b64encode(ev.pcm[i:i + MAX_DELTA_BYTES]).decode(), **ids))
                else:
                    final = ev
        except asyncio.CancelledError:
            final = Done("cancelled", {}, {}, reason=r.cancelled or "client_gone")
            raise
        finally:
            self._finish(r, "".join(text), final, audio, ids)

    def _finish(self, r: _Response, text: str, final, audio: bool, ids: dict) -> None:
        d = self.dialect
        if isinstance(final, Error) or final is None:
            err = final or Error("internal", "the response ended without a result")
            self.send(d.error(err.message, err.code, None, None,
                              "server_error" if err.code in ("internal", "busy") else "invalid_request_error"))
            status = "failed"
            details = {"type": "failed", "error": {"type": "server_error" if err.code == "internal" else
                                                   "invalid_request_error", "code": err.code, "message": err.message}}
            used, timings = {}, {}
        else:
            status, used, timings = final.status, final.usage, final.timings
            reason = {"cancelled": final.reason if final.reason in ("turn_detected", "client_cancelled") else None,
                      "incomplete": "max_output_tokens"}.get(status)
            details = {"type": status, "reason": reason} if status != "completed" else None
        if audio:
            self.send(d.event("response.output_audio.done", **ids))
            self.send(d.event("response.output_audio_transcript.done", transcript=text, **ids))
            part = {"type": "audio", "transcript": text}
        else:
            self.send(d.event("response.output_text.done", text=text, **ids))
            part = {"type": "text", "text": text}
        self.send(d.event("response.content_part.done", part=part, **ids))
        item = d.assistant_item(r.item_id, "completed" if status == "completed" else "incomplete", audio, text)
        self.send(d.event("response.output_item.done", response_id=r.id, output_index=0, item=item))
        self.send(d.event("conversation.item.done", item=item, previous_item_id=None))
        self.send(d.event("response.done", response=d.response(r.id, status, r.opts, [item], details,
                                                              usage(used) if used else None)))
        self.metrics.response_done(status, timings, used)
        self.log.info("session %s: response %s %s (%s) %s", self.id, r.id, status, details and details.get("reason"),
                      timings)
