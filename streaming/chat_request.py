"""A chat completions request, parsed and checked: JSON body -> Plan (what the engine is fed, how to answer).

Media parts are fetched (data: URIs; http(s) only with --allow-remote-media; local paths only under
--media-root) and decoded here, off the event loop, so a bad one is a 400 naming its place in the
request (`param`). The message list becomes one prompt: the first non-system message's parts, and
each later message joined to it by the chat template's own turn markers, so the engine renders
exactly what Qwen's template renders for the whole list. Spoken assistant turns are found again by
their audio id (transcripts are kept for AUDIO_TTL_S).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from urllib.parse import unquote, urlsplit

import numpy as np

from omni import media
from omni.types import Audio, Image, Part, Text, Video
from streaming import schema
from streaming.audio_formats import FORMATS
from streaming.protocol import OPENAI_VOICES
from streaming.schema import INPUT_AUDIO_FORMATS

log = logging.getLogger("omni.http")

AUDIO_TTL_S = 3600  # how long an audio id can be referred back to
AUDIO_MEMORY = 4096  # audio ids remembered at most (the oldest go first)
ROLE_NAMES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class ApiError(Exception):
    """An OpenAI error object with its HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param, code)


@dataclass
class Plan:
    """A parsed request: what to feed the engine and how to answer."""

    model: str
    system: str | None
    role: str  # the first non-system message's role (the template opens with it)
    parts: list[Part]
    modalities: tuple[str, ...] = ("text",)
    voice: str | None = None
    audio_format: str = "wav"
    sampling: object = None  # SamplingParams or None (the checkpoint's)
    max_new_tokens: int | None = None
    max_output_tokens: int | None = None  # the client's limit on text and audio tokens together
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    media: list[tuple[str, str]] = field(default_factory=list)  # (kind, param) of each media part, in order

    @property
    def speech(self) -> bool:
        return "audio" in self.modalities


class ChatRequests:
    """Parses requests for one server: its model, voices, limits and media rules."""

    def __init__(self, server):
        self.server, self.engine, self.config = server, server.engine, server.config
        self.transcripts: OrderedDict[str, tuple[float, str]] = OrderedDict()  # audio id -> (expiry, text)

    async def plan(self, body: dict) -> Plan:
        """The request body -> Plan, or ApiError (400 with param, 413).

        The body is checked against the chat completion request's schema first (streaming/schema.py: the
        openai package's types and our extensions), then for what this server supports."""
        problem = schema.check(schema.chat_schema(), body)
        if problem is not None:
            raise bad(problem.message, problem.param, problem.code)
        model = body.get("model", self.config.model_name)
        if not isinstance(model, str):
            raise bad("model must be a string", "model", "invalid_type")
        for key in ("tools", "functions"):
            if body.get(key):
                raise bad(f"{key} are not supported by this server", key, "unsupported_parameter")
        if body.get("logprobs"):
            raise bad("logprobs are not supported by this server", "logprobs", "unsupported_parameter")
        rf = body.get("response_format")
        if rf is not None and (not isinstance(rf, dict) or rf.get("type") != "text"):
            raise bad("only response_format {'type': 'text'} is supported", "response_format", "unsupported_parameter")
        n = body.get("n", 1)
        if n not in (None, 1):
            raise bad("n must be 1: one choice per request", "n", "unsupported_value")
        stream = _opt(body, "stream", bool, False)
        so = _opt(body, "stream_options", dict, None) or {}
        include_usage = bool(so.get("include_usage")) if stream else False
        if so and not stream:
            raise bad("stream_options is only allowed with stream=true", "stream_options")

        mods = _opt(body, "modalities", list, None) or ["text"]
        if not mods or any(m not in ("text", "audio") for m in mods):
            raise bad(f"modalities must be ['text'] or ['text', 'audio']; got {mods!r}", "modalities")
        modalities = ("text", "audio") if "audio" in mods else ("text",)
        voice, fmt = None, "pcm16" if stream else "wav"
        if "audio" in modalities:
            served = self.engine.model
            if served.speech is None or not self.server.voices:
                why = served.speech_error or "this model cannot speak: no voices are loaded"
                raise bad(f"{why}; ask for modalities ['text']", "modalities", "unsupported_value")
            audio = _opt(body, "audio", dict, None) or {}
            voice = audio.get("voice")
            if voice is not None:
                if not isinstance(voice, str):
                    raise bad("audio.voice must be a string", "audio.voice", "invalid_type")
                if voice not in self.server.voices:
                    if voice.lower() not in OPENAI_VOICES:
                        raise bad(f"unknown voice {voice!r}; this model speaks with "
                                  f"{', '.join(self.server.voices)}", "audio.voice")
                    log.info("voice %r is not a model voice; using the default", voice)
                    voice = None
            fmt = audio.get("format", fmt)
            if fmt not in FORMATS:
                raise bad(f"audio.format must be one of {', '.join(FORMATS)}; got {fmt!r}", "audio.format")

        limit = self.engine.config.max_new_tokens
        max_new = max_out = None
        for key in ("max_completion_tokens", "max_tokens"):
            v = body.get(key)
            if v is not None:
                if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                    raise bad(f"{key} must be a positive integer; got {v!r}", key)
                max_new, max_out = min(v, limit), v
                break
        seed = body.get("seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise bad(f"seed must be an integer; got {seed!r}", "seed", "invalid_type")
        stop = body.get("stop")
        stop = [stop] if isinstance(stop, str) else stop
        if stop is not None and (not isinstance(stop, list) or len(stop) > 4
                                 or not all(isinstance(s, str) and s for s in stop)):
            raise bad("stop must be a non-empty string or a list of at most 4 of them", "stop")
        sampling = self._sampling(body)

        use_aiv = body.get("use_audio_in_video")
        mm = body.get("mm_processor_kwargs")
        if use_aiv is None and isinstance(mm, dict):
            use_aiv = mm.get("use_audio_in_video")
        if use_aiv is not None and not isinstance(use_aiv, bool):
            raise bad("use_audio_in_video must be true or false", "use_audio_in_video", "invalid_type")

        media_parts: list[tuple[str, str]] = []
        system, role, parts = await self._messages(body.get("messages"), use_aiv, media_parts)
        return Plan(model, system, role, parts, modalities, voice, fmt, sampling, max_new, max_out, seed, stop or [],
                    stream, include_usage, media_parts)

    def _sampling(self, body: dict):
        t, top_p = body.get("temperature"), body.get("top_p")
        if t is None and top_p is None:
            return None
        base = self.engine.model.default_sampling()
        if t is not None:
            if not isinstance(t, (int, float)) or isinstance(t, bool) or not 0 <= t <= 2:
                raise bad(f"temperature must be a number from 0 to 2; got {t!r}", "temperature")
            base = replace(base, temperature=float(t), greedy=t == 0)
        if top_p is not None:
            if not isinstance(top_p, (int, float)) or isinstance(top_p, bool) or not 0 < top_p <= 1:
                raise bad(f"top_p must be a number in (0, 1]; got {top_p!r}", "top_p")
            base = replace(base, top_p=float(top_p))
        return base

    async def _messages(self, msgs, use_aiv, media_parts: list) -> tuple[str | None, str, list[Part]]:
        """messages -> (system prompt, first role, parts); later turns are joined by template text."""
        if msgs is None:
            raise bad("messages is required", "messages", "missing_required_parameter")
        if not isinstance(msgs, list) or not msgs:
            raise bad("messages must be a non-empty list", "messages", "invalid_value" if msgs == [] else "invalid_type")
        roles = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict):
                raise bad(f"messages[{i}] must be an object", f"messages[{i}]", "invalid_type")
            role = m.get("role")
            if role not in ROLE_NAMES:
                raise bad(f"messages[{i}].role must be system, developer, user or assistant; got {role!r}",
                          f"messages[{i}].role")
            roles.append(ROLE_NAMES[role])
        system, first = None, 0
        if roles[0] == "system":
            system, first = self._text_only(msgs[0], 0), 1
        if first == len(msgs) or roles[-1] != "user":
            raise bad("the last message must be from the user", f"messages[{len(msgs) - 1}].role")
        parts: list[Part] = []
        for i in range(first, len(msgs)):
            if i > first:  # close the previous turn and open this one in Qwen's chat template
                parts.append(Text(f"<|im_end|>\n<|im_start|>{roles[i]}\n"))
            m = msgs[i]
            if roles[i] == "user":
                parts += await self._user_content(m.get("content"), i, use_aiv, media_parts)
            elif roles[i] == "assistant":
                parts.append(Text(self._assistant_text(m, i)))
            else:
                parts.append(Text(self._text_only(m, i)))
        return system, roles[first], parts

    def _text_only(self, m: dict, i: int) -> str:
        c = m.get("content")
        if isinstance(c, str):
            return c
        if isinstance(c, list) and c:
            out = []
            for j, p in enumerate(c):
                if not isinstance(p, dict) or p.get("type") not in ("text", "refusal") or \
                        not isinstance(p.get(p.get("type")), str):
                    raise bad(f"messages[{i}].content[{j}] must be a text part in a {m.get('role')} message",
                              f"messages[{i}].content[{j}]")
                out.append(p[p["type"]])
            return "".join(out)
        raise bad(f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content",
                  "invalid_type")

    def _assistant_text(self, m: dict, i: int) -> str:
        if m.get("tool_calls") or m.get("function_call"):
            raise bad("tool calls are not supported by this server", f"messages[{i}].tool_calls",
                      "unsupported_parameter")
        if m.get("content") not in (None, "", []):
            return self._text_only(m, i)
        audio = m.get("audio")
        if isinstance(audio, dict):
            if isinstance(audio.get("transcript"), str):
                return audio["transcript"]
            aid = audio.get("id")
            now = time.time()
            while self.transcripts and next(iter(self.transcripts.values()))[0] < now:
                self.transcripts.popitem(last=False)
            if aid in self.transcripts:
                return self.transcripts[aid][1]
            raise bad(f"unknown or expired audio id {aid!r}: send the assistant turn's text as content instead",
                      f"messages[{i}].audio.id")
        raise bad(f"messages[{i}] (assistant) needs content or audio.id", f"messages[{i}].content")

    def remember(self, audio_id: str, transcript: str) -> int:
        expires = int(time.time()) + AUDIO_TTL_S
        self.transcripts[audio_id] = (expires, transcript)
        while len(self.transcripts) > AUDIO_MEMORY:
            self.transcripts.popitem(last=False)
        return expires

    async def _user_content(self, content, i: int, use_aiv, media_parts: list) -> list[Part]:
        if isinstance(content, str):
            return [Text(content)]
        if not isinstance(content, list) or not content:
            raise bad(f"messages[{i}].content must be a string or a non-empty list of parts",
                      f"messages[{i}].content", "invalid_type")
        parts = []
        for j, p in enumerate(content):
            where = f"messages[{i}].content[{j}]"
            kind = p.get("type") if isinstance(p, dict) else None
            if kind == "text":
                if not isinstance(p.get("text"), str):
                    raise bad(f"{where}.text must be a string", f"{where}.text", "invalid_type")
                parts.append(Text(p["text"]))
            elif kind in ("image_url", "video_url", "audio_url"):
                ref = p.get(kind)
                url = ref.get("url") if isinstance(ref, dict) else ref
                param = f"{where}.{kind}.url" if isinstance(ref, dict) else f"{where}.{kind}"
                if not isinstance(url, str):
                    raise bad(f"{param} must be a string", param, "invalid_type")
                src = await self._source(url, param)
                parts.append(await asyncio.to_thread(_decode, kind, src, param, use_aiv))
                media_parts.append((kind.split("_")[0], param))
            elif kind == "input_audio":
                ia = p.get("input_audio")
                if not isinstance(ia, dict) or not isinstance(ia.get("data"), str):
                    raise bad(f"{where}.input_audio must be {{'data': base64, 'format': ...}}",
                              f"{where}.input_audio.data", "invalid_type")
                fmt = ia.get("format", "wav")
                if fmt not in INPUT_AUDIO_FORMATS:
                    raise bad(f"{where}.input_audio.format must be one of {', '.join(INPUT_AUDIO_FORMATS)}; "
                              f"got {fmt!r}", f"{where}.input_audio.format")
                raw = _b64(ia["data"], f"{where}.input_audio.data")
                parts.append(await asyncio.to_thread(_decode_input_audio, raw, fmt, f"{where}.input_audio.data"))
                media_parts.append(("audio", f"{where}.input_audio.data"))
            else:
                raise bad(f"{where}.type must be text, image_url, input_audio, video_url or audio_url; got "
                          f"{kind!r}", f"{where}.type")
        return parts

    async def _source(self, url: str, param: str):
        """A media URL -> bytes (data: URI, or fetched) or a local path under --media-root."""
        if url.startswith("data:"):
            head, sep, payload = url.partition(",")
            if not sep or not head.endswith(";base64"):
                raise bad(f"{param}: a data URI must be base64 (data:<type>;base64,...)", param)
            return _b64(payload, param)
        scheme = urlsplit(url).scheme.lower()
        if scheme in ("http", "https"):
            if not self.config.allow_remote_media:
                raise bad(f"{param}: remote media URLs are off on this server; send the media inline as a data: "
                          "URI (the operator can allow URLs with --allow-remote-media)", param,
                          "remote_media_disabled")
            return await asyncio.to_thread(self._fetch, url, param)
        if scheme in ("file", ""):
            root = self.config.media_root
            if root is None:
                raise bad(f"{param}: local file paths are off on this server; send the media inline as a data: "
                          "URI (the operator can allow a directory with --media-root)", param,
                          "local_media_disabled")
            path = os.path.realpath(unquote(urlsplit(url).path) if scheme == "file" else url)
            root = os.path.realpath(root)
            if os.path.commonpath([root, path]) != root:
                raise bad(f"{param}: {url} is outside the server's media root", param, "local_media_disabled")
            if not os.path.isfile(path):
                raise bad(f"{param}: no such file under the media root: {url}", param, "invalid_media")
            return path
        raise bad(f"{param}: unsupported URL scheme {scheme!r}; use a data: URI", param)

    def _fetch(self, url: str, param: str) -> bytes:
        import urllib.request

        limit = self.config.max_request_bytes
        try:
            with urllib.request.urlopen(url, timeout=30) as r:
                data = r.read(limit + 1)
        except Exception as e:
            raise bad(f"{param}: could not fetch {url}: {e}", param, "invalid_media") from None
        if len(data) > limit:
            raise ApiError(413, f"{param}: {url} is over {limit} bytes", param, "request_too_large")
        return data


def _opt(body: dict, key: str, kind: type, default):
    v = body.get(key, default)
    if v is not None and not isinstance(v, kind):
        raise bad(f"{key} must be {'a list' if kind is list else 'an object' if kind is dict else kind.__name__}",
                  key, "invalid_type")
    return default if v is None else v


def _b64(s: str, param: str) -> bytes:
    try:
        raw = base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError):
        raise bad(f"{param}: not valid base64", param) from None
    if not raw:
        raise bad(f"{param}: empty", param)
    return raw


def _decode(kind: str, src, param: str, use_aiv) -> Part:
    """Decode (images, audio) or probe (video: the engine samples its frames) a media part now, so a bad
    one is a 400 naming its place in the request."""
    what = {"image_url": "image", "video_url": "video", "audio_url": "audio"}[kind]
    try:
        if kind == "image_url":
            return Image(media.load_image(src))
        if kind == "audio_url":
            return Audio(media.load_audio(src))
        _probe_video(src)
        return Video(src, use_audio=use_aiv)
    except media.MediaError as e:
        raise bad(f"{param}: undecodable {what}: {e}", param, f"invalid_{what}") from None


def _probe_video(src) -> None:
    import av

    try:
        with av.open(io.BytesIO(src) if isinstance(src, bytes) else src) as c:
            if not c.streams.video:
                raise media.MediaError("no video stream in it")
    except av.error.FFmpegError as e:
        raise media.MediaError(f"not a video FFmpeg can read ({e.strerror or e})") from None


def _decode_input_audio(raw: bytes, fmt: str, param: str) -> Audio:
    if fmt == "pcm16":  # OpenAI's pcm16: 16-bit little-endian mono at 24 kHz
        if len(raw) % 2:
            raise bad(f"{param}: pcm16 audio must be 16-bit mono (an even number of bytes)", param, "invalid_audio")
        from streaming.session import AudioBuffer

        buf = AudioBuffer(24000)
        buf.append(np.frombuffer(raw, "<i2"))
        return Audio(buf.take())
    try:
        return Audio(media.load_audio(raw))
    except media.MediaError as e:
        raise bad(f"{param}: undecodable {fmt} audio: {e}", param, "invalid_audio") from None
