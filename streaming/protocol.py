"""The OpenAI Realtime wire protocol, pure: parse and check client events, build server events.

A client event is parsed with bounded depth and checked against its schema (streaming/schema.py)
before anything reads it; the checks here are the semantic ones (what this server supports).

Server events are built with their GA names and shapes (the `openai` SDK's
`openai.types.realtime.RealtimeServerEvent`); `Dialect(beta=True)` renames them and reshapes
sessions, items and responses for clients that sent `OpenAI-Beta: realtime=v1`
(`openai.types.beta.realtime`). The Qwen-Omni-Realtime video event `input_image_buffer.append`
is accepted in both dialects.

Our one extension of the format: input audio may be PCM16 at 16 kHz (GA
`audio.input.format = {"type": "audio/pcm", "rate": 16000}`, beta `input_audio_sample_rate: 16000`).
"""

from __future__ import annotations

import base64
import binascii
import secrets
from dataclasses import dataclass, field, replace
from typing import Any

from streaming import schema

CLIENT_EVENTS = schema.CLIENT_EVENTS
INPUT_RATES = (24000, 16000)  # PCM16 mono input; 24 kHz is the protocol's default
OUTPUT_RATE = 24000
OPENAI_VOICES = frozenset({"alloy", "ash", "ballad", "coral", "echo", "sage", "shimmer", "verse", "marin", "cedar"})

# GA server event name -> beta name (None: the beta protocol has no such event)
BETA_NAMES = {
    "response.output_text.delta": "response.text.delta",
    "response.output_text.done": "response.text.done",
    "response.output_audio.delta": "response.audio.delta",
    "response.output_audio.done": "response.audio.done",
    "response.output_audio_transcript.delta": "response.audio_transcript.delta",
    "response.output_audio_transcript.done": "response.audio_transcript.done",
    "conversation.item.added": "conversation.item.created",
    "conversation.item.done": None,
}
BETA_CONTENT = {"output_text": "text", "output_audio": "audio"}


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(10)}"


class ProtocolError(Exception):
    """A client event we cannot act on: becomes an `error` event; the session goes on."""

    def __init__(self, message: str, code: str = "invalid_request", param: str | None = None,
                 event_id: str | None = None, type: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.code, self.param, self.event_id, self.type = message, code, param, event_id, type


def parse(data: str | bytes, beta: bool = False) -> dict:
    """One websocket message -> a client event dict of a known `type` that conforms to its schema
    (streaming/schema.py: the openai package's types, GA or beta, and our extensions); raises ProtocolError."""
    try:
        ev = schema.loads(data, max_values=schema.MAX_EVENT_VALUES)
    except schema.JsonError as e:
        raise ProtocolError(f"invalid JSON: {e}", "invalid_json") from None
    if not isinstance(ev, dict):
        raise ProtocolError("an event must be a JSON object", "invalid_json")
    event_id = ev.get("event_id")
    if event_id is not None and not isinstance(event_id, str):
        raise ProtocolError("event_id must be a string", "invalid_type", "event_id")
    kind = ev.get("type")
    if not isinstance(kind, str):
        raise ProtocolError("missing the event's `type`", "missing_required_parameter", "type", event_id)
    if kind not in CLIENT_EVENTS:
        raise ProtocolError(f"unknown event type {schema.show(kind)}; expected one of "
                            f"{', '.join(sorted(CLIENT_EVENTS))}", "invalid_event_type", "type", event_id)
    problem = schema.check(schema.event_schema(kind, beta), ev)
    if problem is not None:
        raise ProtocolError(problem.message, problem.code, problem.param, event_id)
    return ev


def require(obj: dict, key: str, kind: type | tuple, param: str, event_id: str | None) -> Any:
    if key not in obj or obj[key] is None:
        raise ProtocolError(f"missing required parameter {param!r}", "missing_required_parameter", param, event_id)
    if not isinstance(obj[key], kind):
        raise ProtocolError(f"{param} has the wrong type ({type(obj[key]).__name__})", "invalid_type", param, event_id)
    return obj[key]


def b64decode(s: Any, param: str, event_id: str | None) -> bytes:
    if not isinstance(s, str):
        raise ProtocolError(f"{param} must be a base64 string", "invalid_type", param, event_id)
    try:
        return base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError(f"{param} is not valid base64", "invalid_value", param, event_id) from None


def data_uri(s: Any, param: str, event_id: str | None) -> bytes:
    """`data:image/png;base64,...` (or bare base64) -> bytes."""
    if not isinstance(s, str):
        raise ProtocolError(f"{param} must be a data URI string", "invalid_type", param, event_id)
    if s.startswith("data:"):
        head, sep, body = s.partition(",")
        if not sep or not head.endswith(";base64"):
            raise ProtocolError(f"{param}: only base64 data URIs (data:image/...;base64,...) are accepted",
                                "invalid_value", param, event_id)
        s = body
    elif s.startswith(("http://", "https://")):
        raise ProtocolError(f"{param}: the server does not fetch URLs; send the image as a data URI",
                            "invalid_value", param, event_id)
    return b64decode(s, param, event_id)


@dataclass(frozen=True)
class TurnDetection:
    type: str = "server_vad"
    threshold: float = 0.5  # speech probability that starts speech
    prefix_padding_ms: int = 300  # audio kept before the detected start
    silence_duration_ms: int = 500  # silence that ends speech
    create_response: bool = True
    interrupt_response: bool = True  # barge-in: speech during a response cancels it

    def to_dict(self) -> dict:
        return {"type": self.type, "threshold": self.threshold, "prefix_padding_ms": self.prefix_padding_ms,
                "silence_duration_ms": self.silence_duration_ms, "create_response": self.create_response,
                "interrupt_response": self.interrupt_response}


@dataclass(frozen=True)
class SessionConfig:
    instructions: str | None = None
    output_modalities: tuple[str, ...] = ("text",)
    voice: str | None = None  # None: the model's default voice
    input_rate: int = 24000
    turn_detection: TurnDetection | None = field(default_factory=TurnDetection)
    max_output_tokens: int | None = None  # None: the engine's limit ("inf")

    def update(self, s: Any, beta: bool, event_id: str | None) -> "SessionConfig":
        """Apply a session.update's `session` object (fields left out stay as they are)."""
        if not isinstance(s, dict):
            raise ProtocolError("session must be an object", "invalid_type", "session", event_id)
        return (_update_beta if beta else _update_ga)(self, s, event_id)


def _check_modalities(m: Any, param: str, event_id) -> tuple[str, ...]:
    if not isinstance(m, list) or not m or any(x not in ("text", "audio") for x in m):
        raise ProtocolError(f"{param} must be a non-empty list of 'text' and/or 'audio'", "invalid_value", param,
                            event_id)
    return tuple(dict.fromkeys(m))


def _check_tokens(v: Any, param: str, event_id) -> int | None:
    if v == "inf" or v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 4096:
        raise ProtocolError(f"{param} must be an integer 1..4096 or 'inf'", "invalid_value", param, event_id)
    return v


def _check_str(v: Any, param: str, event_id) -> str:
    if not isinstance(v, str):
        raise ProtocolError(f"{param} must be a string", "invalid_type", param, event_id)
    return v


def _turn_detection(td: Any, param: str, event_id) -> TurnDetection | None:
    if td is None:
        return None
    if not isinstance(td, dict):
        raise ProtocolError(f"{param} must be an object or null", "invalid_type", param, event_id)
    if td.get("type", "server_vad") != "server_vad":
        raise ProtocolError(f"{param}.type: only 'server_vad' (or null for client commits) is supported",
                            "invalid_value", f"{param}.type", event_id)
    out = TurnDetection()
    for key, kind in (("threshold", (int, float)), ("prefix_padding_ms", int), ("silence_duration_ms", int),
                      ("create_response", bool), ("interrupt_response", bool)):
        if td.get(key) is not None:
            v = td[key]
            if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
                raise ProtocolError(f"{param}.{key} has the wrong type", "invalid_type", f"{param}.{key}", event_id)
            out = replace(out, **{key: v})
    if not 0.0 < out.threshold < 1.0:
        raise ProtocolError(f"{param}.threshold must be between 0 and 1", "invalid_value", f"{param}.threshold",
                            event_id)
    if not (0 <= out.prefix_padding_ms <= 5000 and 100 <= out.silence_duration_ms <= 10000):
        raise ProtocolError(f"{param}: prefix_padding_ms must be 0..5000 and silence_duration_ms 100..10000",
                            "invalid_value", param, event_id)
    return out


def _update_ga(cfg: SessionConfig, s: dict, event_id) -> SessionConfig:
    if s.get("type", "realtime") != "realtime":
        raise ProtocolError("session.type must be 'realtime' (transcription sessions are not supported)",
                            "invalid_value", "session.type", event_id)
    if "instructions" in s:
        cfg = replace(cfg, instructions=_check_str(s["instructions"], "session.instructions", event_id))
    if "output_modalities" in s:
        cfg = replace(cfg, output_modalities=_check_modalities(s["output_modalities"], "session.output_modalities",
                                                               event_id))
    if "max_output_tokens" in s:
        cfg = replace(cfg, max_output_tokens=_check_tokens(s["max_output_tokens"], "session.max_output_tokens",
                                                           event_id))
    audio = s.get("audio") or {}
    if not isinstance(audio, dict):
        raise ProtocolError("session.audio must be an object", "invalid_type", "session.audio", event_id)
    inp, out = audio.get("input") or {}, audio.get("output") or {}
    if "format" in inp:
        f = inp["format"]
        if not isinstance(f, dict) or f.get("type", "audio/pcm") != "audio/pcm":
            raise ProtocolError("session.audio.input.format: only audio/pcm (PCM16 mono) is supported",
                                "invalid_value", "session.audio.input.format", event_id)
        rate = f.get("rate", 24000)
        if rate not in INPUT_RATES:
            raise ProtocolError(f"session.audio.input.format.rate must be 24000 or 16000; got {rate}",
                                "invalid_value", "session.audio.input.format.rate", event_id)
        cfg = replace(cfg, input_rate=rate)
    if "turn_detection" in inp:
        cfg = replace(cfg, turn_detection=_turn_detection(inp["turn_detection"], "session.audio.input.turn_detection",
                                                          event_id))
    if "format" in out:
        f = out["format"]
        if not isinstance(f, dict) or f.get("type", "audio/pcm") != "audio/pcm" or f.get("rate", 24000) != 24000:
            raise ProtocolError("session.audio.output.format: only audio/pcm at 24000 Hz is produced",
                                "invalid_value", "session.audio.output.format", event_id)
    if out.get("voice") is not None:
        cfg = replace(cfg, voice=_check_str(out["voice"], "session.audio.output.voice", event_id))
    return cfg


def _update_beta(cfg: SessionConfig, s: dict, event_id) -> SessionConfig:
    if "instructions" in s:
        cfg = replace(cfg, instructions=_check_str(s["instructions"], "session.instructions", event_id))
    if "modalities" in s:
        cfg = replace(cfg, output_modalities=_check_modalities(s["modalities"], "session.modalities", event_id))
    if "max_response_output_tokens" in s:
        cfg = replace(cfg, max_output_tokens=_check_tokens(s["max_response_output_tokens"],
                                                           "session.max_response_output_tokens", event_id))
    for key in ("input_audio_format", "output_audio_format"):
        if s.get(key, "pcm16") != "pcm16":
            raise ProtocolError(f"session.{key}: only pcm16 is supported", "invalid_value", f"session.{key}", event_id)
    if "input_audio_sample_rate" in s:
        rate = s["input_audio_sample_rate"]
        if rate not in INPUT_RATES:
            raise ProtocolError(f"session.input_audio_sample_rate must be 24000 or 16000; got {rate}",
                                "invalid_value", "session.input_audio_sample_rate", event_id)
        cfg = replace(cfg, input_rate=rate)
    if "turn_detection" in s:
        cfg = replace(cfg, turn_detection=_turn_detection(s["turn_detection"], "session.turn_detection", event_id))
    if s.get("voice") is not None:
        cfg = replace(cfg, voice=_check_str(s["voice"], "session.voice", event_id))
    return cfg


@dataclass(frozen=True)
class ResponseOptions:
    """What one response.create asks for, over the session's defaults."""

    instructions: str | None
    output_modalities: tuple[str, ...]
    voice: str | None
    max_output_tokens: int | None


def response_options(ev: dict, cfg: SessionConfig, beta: bool) -> ResponseOptions:
    eid = ev.get("event_id")
    r = ev.get("response") or {}
    if not isinstance(r, dict):
        raise ProtocolError("response must be an object", "invalid_type", "response", eid)
    if r.get("conversation", "auto") not in ("auto", None):
        raise ProtocolError("response.conversation: only the session's conversation ('auto') is supported",
                            "invalid_value", "response.conversation", eid)
    if r.get("input") is not None:
        raise ProtocolError("response.input is not supported; add items with conversation.item.create",
                            "invalid_value", "response.input", eid)
    instr = cfg.instructions if r.get("instructions") is None else _check_str(r["instructions"],
                                                                               "response.instructions", eid)
    mkey = "modalities" if beta else "output_modalities"
    mods = cfg.output_modalities if r.get(mkey) is None else _check_modalities(r[mkey], f"response.{mkey}", eid)
    tkey = "max_response_output_tokens" if beta else "max_output_tokens"
    tokens = cfg.max_output_tokens if tkey not in r else _check_tokens(r[tkey], f"response.{tkey}", eid)
    voice = cfg.voice
    v = r.get("voice") if beta else ((r.get("audio") or {}).get("output") or {}).get("voice")
    if v is not None:
        voice = _check_str(v, "response.voice" if beta else "response.audio.output.voice", eid)
    return ResponseOptions(instr, mods, voice, tokens)


class Dialect:
    """Builds server events as GA or beta shapes."""

    def __init__(self, beta: bool = False):
        self.beta = beta

    def event(self, kind: str, **fields) -> dict | None:
        """A server event with a fresh event_id; None when the dialect has no such event."""
        if self.beta and kind in BETA_NAMES:
            kind = BETA_NAMES[kind]
            if kind is None:
                return None
        return {"event_id": new_id("event"), "type": kind, **fields}

    def error(self, message: str, code: str | None = None, param: str | None = None, event_id: str | None = None,
              type: str = "invalid_request_error") -> dict:
        return self.event("error", error={"type": type, "code": code, "message": message, "param": param,
                                          "event_id": event_id})

    def session(self, cfg: SessionConfig, session_id: str, model: str) -> dict:
        vad = cfg.turn_detection.to_dict() if cfg.turn_detection else None
        tokens = "inf" if cfg.max_output_tokens is None else cfg.max_output_tokens
        if self.beta:
            s = {"id": session_id, "object": "realtime.session",  # beta `model` is a closed list of OpenAI's
                 "modalities": list(cfg.output_modalities), "instructions": cfg.instructions, "voice": cfg.voice,
                 "input_audio_format": "pcm16", "output_audio_format": "pcm16", "turn_detection": vad,
                 "max_response_output_tokens": tokens, "tools": [], "tool_choice": "none"}
            if cfg.input_rate != 24000:
                s["input_audio_sample_rate"] = cfg.input_rate
            return s
        return {"type": "realtime", "id": session_id, "object": "realtime.session", "model": model,
                "output_modalities": list(cfg.output_modalities), "instructions": cfg.instructions,
                "max_output_tokens": tokens, "tools": [], "tool_choice": "none",
                "audio": {"input": {"format": {"type": "audio/pcm", "rate": cfg.input_rate},
                                    "turn_detection": vad},
                          "output": {"format": {"type": "audio/pcm", "rate": OUTPUT_RATE}, "voice": cfg.voice}}}

    def user_item(self, item_id: str, content: list[dict]) -> dict:
        if self.beta:  # the beta item has no image content type: images are in the turn, not in the echo
            content = [c for c in content if c["type"] != "input_image"]
        return {"id": item_id, "object": "realtime.item", "type": "message", "role": "user", "status": "completed",
                "content": content}

    def assistant_item(self, item_id: str, status: str, audio: bool, text: str | None = None) -> dict:
        content = []
        if text is not None:
            c = {"type": "output_audio", "transcript": text} if audio else {"type": "output_text", "text": text}
            if self.beta:
                c["type"] = BETA_CONTENT[c["type"]]
            content.append(c)
        return {"id": item_id, "object": "realtime.item", "type": "message", "role": "assistant", "status": status,
                "content": content}

    def response(self, resp_id: str, status: str, opts: ResponseOptions, output: list[dict],
                 status_details: dict | None = None, usage: dict | None = None) -> dict:
        tokens = "inf" if opts.max_output_tokens is None else opts.max_output_tokens
        r = {"id": resp_id, "object": "realtime.response", "status": status, "status_details": status_details,
             "output": output, "conversation_id": None, "usage": usage, "metadata": None,
             "max_output_tokens": tokens}
        if self.beta:
            r.update(modalities=list(opts.output_modalities), voice=opts.voice, output_audio_format="pcm16")
        else:
            r.update(output_modalities=list(opts.output_modalities),
                     audio={"output": {"format": {"type": "audio/pcm", "rate": OUTPUT_RATE}, "voice": opts.voice}})
        return r


def usage(engine_usage: dict) -> dict:
    """The engine's Done.usage -> the protocol's usage object.

    Input tokens include the cached history (cached tokens are a subset of them, as the protocol
    defines), each counted by kind: video frames are image tokens, a video's sound audio tokens.
    """
    new, cached = engine_usage.get("prompt_tokens", 0), engine_usage.get("cached_tokens", 0)
    text_out, audio_out = engine_usage.get("completion_tokens", 0), engine_usage.get("codec_tokens", 0)
    kinds = token_kinds(engine_usage)
    return {"input_tokens": new + cached, "output_tokens": text_out + audio_out,
            "total_tokens": new + cached + text_out + audio_out,
            "input_token_details": {**{f"{k}_tokens": n for k, n in kinds["input"].items()}, "cached_tokens": cached,
                                    "cached_tokens_details": {f"{k}_tokens": n for k, n in kinds["cached"].items()}},
            "output_token_details": {"text_tokens": text_out, "audio_tokens": audio_out}}


def token_kinds(engine_usage: dict) -> dict:
    """{"input": all prompt tokens (new and cached), "cached": the cached ones}, each {text, audio, image}."""
    zero = {"text": 0, "audio": 0, "image": 0}
    new = engine_usage.get("prompt_token_kinds") or zero
    cached = engine_usage.get("cached_token_kinds") or zero
    return {"input": {k: new[k] + cached[k] for k in zero}, "cached": dict(cached)}
