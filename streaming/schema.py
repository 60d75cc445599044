"""What clients send, checked against the protocols' published schemas before anything acts on it.

    ev = loads(message, max_depth=MAX_DEPTH)            # bounded JSON (JsonError)
    problem = check(event_schema("session.update", beta), ev)   # None, or the first Problem found

The schemas are the `openai` package's own TypedDicts: the Realtime client events, GA
(`openai.types.realtime`) and beta (`openai.types.beta.realtime`), and the chat completion request
(`openai.types.chat.completion_create_params`), validated by pydantic in strict mode (JSON's own
types: no "5" for 5, no true for 1). Keys the schema does not name are ignored, as the real API
ignores them. Two readings of the published types: `Iterable[X]`, which pydantic validates only
when the result is iterated (so not at all here), is read as a list; and a union's error is the
one of its member the input was meant for (its `type`/`role` matches), not one per member.

Beside them, as TypedDicts of their own, our extensions: the Qwen-Omni-Realtime video event
`input_image_buffer.append`; 16 kHz input audio (GA `audio.input.format.rate`, beta
`input_audio_sample_rate`); `input_image` content in beta items; beta `turn_detection: null`
(what the SDK sends to turn VAD off, though its type says otherwise); chat `video_url` / `audio_url`
parts, more input audio formats, `use_audio_in_video`, and an optional `model`. What the server
does not support (tool and function messages, file parts) is left out of the unions, so it is
refused where it is named; semantic checks (formats, rates, voices, limits) come after, in
protocol.py and chat_request.py.
"""

from __future__ import annotations

import collections.abc
import functools
import json
import logging
import re
import typing
from dataclasses import dataclass
from typing import Any, List, Literal, Optional, Union

import pydantic
from typing_extensions import NotRequired, Required, TypedDict, is_typeddict

import openai.types.beta.realtime as beta
import openai.types.chat as chat
from openai.types.beta.realtime.conversation_item_content_param import ConversationItemContentParam
from openai.types.beta.realtime.conversation_item_create_event_param import \
    ConversationItemCreateEventParam as BetaItemCreate
from openai.types.beta.realtime.conversation_item_param import ConversationItemParam as BetaItem
from openai.types.beta.realtime.session_update_event_param import Session as BetaSessionParam
from openai.types.beta.realtime.session_update_event_param import SessionTurnDetection as BetaTurnDetection
from openai.types.beta.realtime.session_update_event_param import SessionUpdateEventParam as BetaSessionUpdate
from openai.types.chat.chat_completion_assistant_message_param import Audio as AssistantAudio
from openai.types.chat.chat_completion_content_part_image_param import ImageURL
from openai.types.chat.chat_completion_content_part_input_audio_param import InputAudio
from openai.types.chat.completion_create_params import CompletionCreateParamsBase
from openai.types.realtime import (InputAudioBufferAppendEventParam, InputAudioBufferClearEventParam,
                                   InputAudioBufferCommitEventParam, RealtimeAudioConfigInputParam,
                                   RealtimeAudioConfigParam, RealtimeSessionCreateRequestParam,
                                   ResponseCancelEventParam, ResponseCreateEventParam, SessionUpdateEventParam)
from openai.types.realtime.conversation_item_create_event_param import ConversationItemCreateEventParam
from openai.types.realtime.realtime_audio_formats_param import AudioPCM, AudioPCMA, AudioPCMU

log = logging.getLogger("omni.schema")

MAX_DEPTH = 32  # nesting of objects and arrays; the deepest real event or request needs fewer than 10
MAX_VALUES = 100_000  # commas and colons outside strings: about the number of values in a document
MAX_EVENT_VALUES = 10_000  # in one realtime event (the real ones have fewer than 100)
INPUT_AUDIO_FORMATS = ("wav", "mp3", "flac", "ogg", "opus", "pcm16")  # chat input_audio (OpenAI: wav, mp3)


class JsonError(ValueError):
    """A message that is not JSON we accept (malformed, too deep, too many values, not Unicode)."""


_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")  # an escaped surrogate: paired (fine) or lone (not Unicode)


def loads(data: str | bytes, *, max_depth: int = MAX_DEPTH, max_values: int = MAX_VALUES) -> Any:
    """JSON text -> its value, refusing documents nested deeper than `max_depth` before decoding them
    (Python's decoder recurses: a deep document is a RecursionError, not a JSONDecodeError), and
    NaN/Infinity (not JSON), numbers too long to convert, and strings with lone surrogates (not Unicode)."""
    if isinstance(data, (bytes, bytearray)):
        try:
            data = bytes(data).decode(json.detect_encoding(data))
        except UnicodeDecodeError:
            raise JsonError("not UTF-8 text") from None
    skeleton = _STRING.sub('""', data)  # the strings' contents cannot open or close anything
    if skeleton.count(",") + skeleton.count(":") > max_values:
        raise JsonError(f"more than {max_values} values")
    if skeleton.count("[") + skeleton.count("{") > max_depth and _depth(skeleton) > max_depth:
        raise JsonError(f"nested deeper than {max_depth} levels")
    try:
        value = json.loads(data, parse_constant=_not_json)
    except json.JSONDecodeError as e:
        raise JsonError(f"{e.msg} at line {e.lineno} column {e.colno}") from None
    except (ValueError, RecursionError) as e:  # a number of over 4300 digits; a depth our scan missed
        raise JsonError(str(e)[:200]) from None
    if "\\u" in data and _SURROGATE.search(data):
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise JsonError("a string holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is not Unicode") \
                from None
    return value


def _not_json(name: str):
    raise ValueError(f"{name} is not JSON")


def _depth(skeleton: str) -> int:
    """The deepest nesting of brackets, in one pass (string contents already removed)."""
    import numpy as np

    b = np.frombuffer(skeleton.encode("utf-8", "surrogatepass"), np.uint8)
    step = (b == ord("[")).astype(np.int32) + (b == ord("{")) - (b == ord("]")) - (b == ord("}"))
    return int(np.cumsum(step).max(initial=0))


@dataclass(frozen=True)
class Problem:
    message: str
    code: str  # missing_required_parameter, invalid_type, invalid_value
    param: str | None  # where, e.g. "session.audio.input" or "messages[0].content[1].type"


TAG_KEYS = ("type", "role")  # the keys that tell a union's members apart in OpenAI's schemas
TYPE_ERRORS = ("_type", "_parsing", "is_instance_of", "model_attributes_type")


def check(adapter: pydantic.TypeAdapter, value: Any) -> Problem | None:
    """The first problem with `value` under the schema, or None when it conforms."""
    try:
        adapter.validate_python(value, strict=True)
    except pydantic.ValidationError as e:
        errors = e.errors(include_url=False)[:1000]  # the first 1000 say enough
        try:
            return _problem(errors, value)
        except Exception:  # a bug in the naming must not make the client's error ours: say it plainly
            log.exception("could not name the problem in %s", errors[0]["loc"])
            return Problem(f"{'.'.join(map(str, errors[0]['loc']))}: {errors[0]['msg']}", "invalid_value", None)
    return None


def _locate(e: dict, value: Any) -> tuple[tuple, tuple, dict]:
    """A pydantic error -> (path in the input, the union members it is under as (place, name), error).
    pydantic's loc mixes the input's keys with union members' names: the keys are the ones in the input."""
    loc, node, path, branches = e["loc"], value, [], []
    missing = e["type"] == "missing"
    for x in (loc[:-1] if missing else loc):
        if isinstance(node, dict) and isinstance(x, str) and x in node:
            path.append(x)
            node = node[x]
        elif isinstance(node, list) and isinstance(x, int) and not isinstance(x, bool) and 0 <= x < len(node):
            path.append(x)
            node = node[x]
        else:
            branches.append((tuple(path), x))
    if missing:
        path.append(loc[-1])
    return tuple(path), tuple(branches), e


def _rejects(err, branch) -> bool:
    """Whether the error is the member's own type/role differing: the input was not meant for that member."""
    path, _, e = err
    return (len(path) == len(branch[0]) + 1 and path[:-1] == branch[0] and path[-1] in TAG_KEYS
            and e["type"] in ("literal_error", "missing"))


def _resolve_unions(errs: list, value: Any) -> list:
    """Each union's errors -> those of the members the input was meant for, or one error on the tag."""
    while True:  # resolve the innermost unions first; a union is its place and the members it sits in
        points = {(bs[:-1], bs[-1][0]) for _, bs, _ in errs if bs}
        if not points:
            break
        outer, at = max(points, key=lambda p: (len(p[1]), len(p[0])))
        members, others = {}, []
        for err in errs:
            if err[1] and err[1][:-1] == outer and err[1][-1][0] == at:
                members.setdefault(err[1][-1], []).append(err)
            else:
                others.append(err)
        rejected = {b for b, es in members.items() if any(_rejects(x, b) for x in es)}
        kept = [x for b, es in members.items() if b not in rejected for x in es]
        if not kept:  # no member fits: the problem is the tag itself, as one error naming them all
            tags = [x for b, es in members.items() for x in es if _rejects(x, b)]
            keys = list(dict.fromkeys(x[0][-1] for x in tags))  # the one whose value no member takes is the problem
            node = _at(value, at)
            names = [b[1] for b in members]
            key = next((k for k in keys if not any(_takes(n, k, node.get(k) if isinstance(node, dict) else None)
                                                   for n in names)), keys[0])
            tag_errs = [x for x in tags if x[0][-1] == key]
            if all(x[2]["type"] == "missing" for x in tag_errs):
                e = {"type": "missing", "msg": "Field required"}
            else:
                expected = list(dict.fromkeys(x[2]["ctx"]["expected"] for x in tag_errs if x[2].get("ctx")))
                e = {"type": "literal_error", "msg": f"Input should be {_or(expected)}",
                     "input": next(x[2].get("input") for x in tag_errs if x[2]["type"] != "missing")}
            kept = [(tag_errs[0][0], tag_errs[0][1], e)]
        errs = others + [(p, bs[:-1], e) for p, bs, e in kept]
    return errs


def _problem(errors: list[dict], value: Any) -> Problem:
    errs = _resolve_unions([_locate(e, value) for e in errors], value)
    deepest = max(len(p) for p, _, _ in errs)
    path = next(p for p, _, _ in errs if len(p) == deepest)
    here = [e for p, _, e in errs if p == path]
    e = here[0]
    code = ("missing_required_parameter" if e["type"] == "missing" else
            "invalid_type" if any(e["type"].endswith(t) for t in TYPE_ERRORS) else "invalid_value")
    param = _param(path)
    msgs = list(dict.fromkeys(_lower(x["msg"]) for x in here))
    if e["type"] == "missing":
        message = f"missing required parameter {param!r}"
    else:
        message = f"{param or 'the event'}: {', or '.join(msgs)}; got {show(e.get('input'))}"
    more = len({p for p, _, _ in errs if p != path[:len(p)]})  # not counting the union members that lost
    if more:
        message += f" (and {more} more problem{'s' if more > 1 else ''})"
    return Problem(message, code, param)


def _at(value: Any, path: tuple) -> Any:
    for x in path:
        value = value[x]
    return value


def _takes(member: str, key: str, v: Any) -> bool:
    """Whether the union member named `member` has `key` as a Literal field that `v` is one of."""
    return any(v in lits.get(key, ()) and not isinstance(v, bool) for lits in _LITERALS.get(member, ()))


def _param(path: tuple) -> str | None:
    out = ""
    for x in path:
        out += f"[{x}]" if isinstance(x, int) else (f".{x}" if out else x)
    return out or None


def _or(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " or " + items[-1]


def _lower(msg: str) -> str:
    return msg[:1].lower() + msg[1:]


def show(v: Any) -> str:
    """A value as an error message quotes it: short."""
    if isinstance(v, dict):
        return "an object"
    if isinstance(v, list):
        return f"a list of {len(v)}"
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


# --- our extensions, beside the published types they extend ---

class _Pcm(AudioPCM, total=False):
    rate: Literal[24000, 16000]  # ours: PCM16 input at 16 kHz too (output stays 24 kHz)


class _AudioInput(RealtimeAudioConfigInputParam, total=False):
    format: Union[_Pcm, AudioPCMU, AudioPCMA]


class _Audio(RealtimeAudioConfigParam, total=False):
    input: _AudioInput


class _Session(RealtimeSessionCreateRequestParam, total=False):
    audio: _Audio


class _SessionUpdate(SessionUpdateEventParam, total=False):
    session: Required[_Session]  # realtime sessions only (no transcription sessions)


class ImageBufferAppend(TypedDict, total=False):
    """Qwen-Omni-Realtime's video frame: a base64 JPEG (or data URI), committed with the audio."""

    type: Required[Literal["input_image_buffer.append"]]
    image: Required[str]
    event_id: str


class _BetaSession(BetaSessionParam, total=False):
    input_audio_sample_rate: Literal[24000, 16000]  # ours: PCM16 input at 16 kHz
    turn_detection: Optional[BetaTurnDetection]  # null turns VAD off (the beta API accepts it; the SDK sends it)


class _BetaSessionUpdate(BetaSessionUpdate, total=False):
    session: Required[_BetaSession]


class _BetaContent(ConversationItemContentParam, total=False):
    type: Literal["input_text", "input_audio", "item_reference", "text", "audio", "input_image"]  # ours: images
    image_url: str
    detail: Literal["auto", "low", "high"]


class _BetaItem(BetaItem, total=False):
    content: List[_BetaContent]


class _BetaItemCreate(BetaItemCreate, total=False):
    item: Required[_BetaItem]


class _MediaURL(TypedDict, total=False):
    url: Required[str]


class VideoURLPart(TypedDict, total=False):
    """Ours (as vLLM's): a video as a URL or data URI; `use_audio_in_video` feeds its sound too."""

    type: Required[Literal["video_url"]]
    video_url: Required[Union[_MediaURL, str]]


class AudioURLPart(TypedDict, total=False):
    type: Required[Literal["audio_url"]]
    audio_url: Required[Union[_MediaURL, str]]


class _ImagePart(chat.ChatCompletionContentPartImageParam, total=False):
    image_url: Required[Union[ImageURL, str]]  # a bare URL string too


class _InputAudio(InputAudio, total=False):
    format: Literal[INPUT_AUDIO_FORMATS]  # more formats than OpenAI's; wav when left out


class _InputAudioPart(chat.ChatCompletionContentPartInputAudioParam, total=False):
    input_audio: Required[_InputAudio]


class _UserMessage(chat.ChatCompletionUserMessageParam, total=False):
    content: Required[Union[str, List[Union[chat.ChatCompletionContentPartTextParam, _ImagePart, _InputAudioPart,
                                            VideoURLPart, AudioURLPart]]]]


class _AssistantAudio(AssistantAudio, total=False):
    id: str
    transcript: str  # ours: the spoken turn's text, instead of its id


class _AssistantMessage(chat.ChatCompletionAssistantMessageParam, total=False):
    audio: Optional[_AssistantAudio]


class _MmKwargs(TypedDict, total=False):
    use_audio_in_video: bool


class ChatBody(CompletionCreateParamsBase, total=False):
    model: str  # optional: the served model
    messages: Required[List[Union[chat.ChatCompletionDeveloperMessageParam, chat.ChatCompletionSystemMessageParam,
                                  _UserMessage, _AssistantMessage]]]
    stream: Optional[bool]
    tools: Any  # not supported: refused by name in chat_request.py, whatever they hold
    functions: Any
    use_audio_in_video: bool  # ours (vLLM's): feed a video's sound with its frames
    mm_processor_kwargs: _MmKwargs


# --- the published types, read eagerly ---

_LITERALS: dict[str, list[dict]] = {}  # TypedDict name -> its Literal fields' values (one dict per such class)


def eager(tp, _memo: dict | None = None):
    """`tp` with every Iterable[X] inside it (TypedDicts included) read as List[X]."""
    memo = {} if _memo is None else _memo
    if is_typeddict(tp):
        if tp in memo:
            return memo[tp]
        memo[tp] = tp  # a recursive type keeps its own reference (none of ours is)
        fields = {}  # __required_keys__ is wrong under `from __future__ import annotations`: read the hints
        for k, t in typing.get_type_hints(tp, include_extras=True).items():
            required = tp.__total__
            if typing.get_origin(t) in (Required, NotRequired):
                required, t = typing.get_origin(t) is Required, typing.get_args(t)[0]
            fields[k] = (Required if required else NotRequired)[eager(t, memo)]
        new = TypedDict(tp.__name__, fields)
        _LITERALS.setdefault(tp.__name__, []).append(  # the tags, by the name pydantic's errors give members
            {k: typing.get_args(t) for k, t in typing.get_type_hints(new).items() if typing.get_origin(t) is Literal})
        new.__doc__ = tp.__doc__
        memo[tp] = new
        return new
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is collections.abc.Iterable:
        return List[eager(args[0], memo)]
    if origin is Union:
        return Union[tuple(eager(a, memo) for a in args)]
    if origin in (list, collections.abc.Sequence) and args:
        return List[eager(args[0], memo)]
    if origin is dict and args:
        return typing.Dict[args[0], eager(args[1], memo)]
    return tp


_COMMON = {"input_audio_buffer.append": InputAudioBufferAppendEventParam,
           "input_audio_buffer.commit": InputAudioBufferCommitEventParam,
           "input_audio_buffer.clear": InputAudioBufferClearEventParam,
           "input_image_buffer.append": ImageBufferAppend,
           "response.cancel": ResponseCancelEventParam}
_EVENTS = {False: {**_COMMON, "session.update": _SessionUpdate,
                   "conversation.item.create": ConversationItemCreateEventParam,
                   "response.create": ResponseCreateEventParam},
           True: {**_COMMON, "session.update": _BetaSessionUpdate, "conversation.item.create": _BetaItemCreate,
                  "response.create": beta.ResponseCreateEventParam}}
CLIENT_EVENTS = frozenset(_EVENTS[False])


@functools.cache
def event_schema(kind: str, beta: bool) -> pydantic.TypeAdapter:
    """The schema of one client event type (built on first use: pydantic takes a moment per type)."""
    return pydantic.TypeAdapter(eager(_EVENTS[beta][kind]))


@functools.cache
def chat_schema() -> pydantic.TypeAdapter:
    return pydantic.TypeAdapter(eager(ChatBody))
