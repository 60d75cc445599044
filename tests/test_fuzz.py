"""A seeded fuzzer against a real server on loopback: every malformed Realtime event and chat completion
body is the client's error, named where it is wrong, and the server goes on.

The corpus: every field of a valid event (GA and beta) or request given a value of the wrong JSON type,
unknown events, bad base64, huge and deeply nested JSON, NaN and 5000-digit numbers, lone surrogates,
random unicode, and the cases a fuzzing client once found answered as server errors. `python -m
tests.test_fuzz` only counts (sent, client errors, server errors, unanswered), for running the corpus
against another checkout of the server.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import re
import urllib.request

import pytest

from streaming.schema import JsonError, chat_schema, check, event_schema, loads
from tests import media as make
from tests.realtime import Raw
from tests.test_http_api import post
from tests.test_server import KEY, engine, model_dir, run, server, text_of  # noqa: F401 (fixtures)

SEED = 18
WRONG = (12345, True, {"x": 1}, [1], "wrong", 1.5)
PNG = base64.b64encode(make.encode_image(make.pattern_image(16, 16), "png")).decode()
PCM = base64.b64encode(b"\0\0" * 2400).decode()


def _param(path: tuple) -> str:
    out = ""
    for x in path:
        out += f"[{x}]" if isinstance(x, int) else (f".{x}" if out else x)
    return out


def _leaves(v, path=()):
    """Every (path, value) in a JSON value, containers included."""
    if path:
        yield path, v
    if isinstance(v, dict):
        for k, x in v.items():
            yield from _leaves(x, path + (k,))
    elif isinstance(v, list):
        for i, x in enumerate(v):
            yield from _leaves(x, path + (i,))


def _put(v, path, new):
    v = json.loads(json.dumps(v))
    node = v
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = new
    return v


def _wrong_for(value, rng: random.Random, n: int = 1) -> list:
    """`n` values of other JSON types. A string replaces only numbers and booleans: many objects and
    lists may be strings too (stop, content, image_url); no number replaces a number."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    kinds = [w for w in WRONG if type(w) is not type(value) and (number or not isinstance(w, str))
             and not (number and isinstance(w, (int, float)) and not isinstance(w, bool))]
    return rng.sample(kinds, n)


def _matches(got: str | None, want: str | None) -> bool:
    """want: "*" anything, "~p" p or under it, else exactly (None: no param)."""
    if want == "*":
        return True
    if want is not None and want.startswith("~"):
        return (got or "").startswith(want[1:])
    return got == want


def templates(beta: bool) -> list[dict]:
    """Valid client events, with every field the server reads."""
    td = {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300, "silence_duration_ms": 500,
          "create_response": True, "interrupt_response": True}
    if beta:
        session = {"modalities": ["text"], "instructions": "Be brief.", "voice": "Ethan",
                   "input_audio_format": "pcm16", "output_audio_format": "pcm16", "input_audio_sample_rate": 16000,
                   "turn_detection": td, "max_response_output_tokens": 8}
        response = {"modalities": ["text"], "instructions": "Be brief.", "voice": "Ethan",
                    "max_response_output_tokens": 8}
    else:
        session = {"type": "realtime", "instructions": "Be brief.", "output_modalities": ["text"],
                   "max_output_tokens": 8,
                   "audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000}, "turn_detection": td},
                             "output": {"format": {"type": "audio/pcm", "rate": 24000}, "voice": "Ethan"}}}
        response = {"instructions": "Be brief.", "output_modalities": ["text"], "max_output_tokens": 8,
                    "audio": {"output": {"voice": "Ethan"}}}
    content = [{"type": "input_text", "text": "hi"}, {"type": "input_audio", "audio": PCM}]
    if not beta:
        content.append({"type": "input_image", "image_url": "data:image/png;base64," + PNG})
    return [{"type": "session.update", "session": session},
            {"type": "input_audio_buffer.append", "audio": PCM},
            {"type": "input_image_buffer.append", "image": PNG},
            {"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": content}},
            {"type": "response.create", "response": response},
            {"type": "input_audio_buffer.commit"}, {"type": "input_audio_buffer.clear"},
            {"type": "response.cancel"}]


def _nested(depth: int):
    v = 1
    for _ in range(depth):
        v = [v]
    return v


def _unicode(rng: random.Random, n: int) -> str:
    return "".join(chr(rng.choice([rng.randrange(0x20, 0x7f), rng.randrange(0xa0, 0xd7ff),
                                   rng.randrange(0xe000, 0xfffd), rng.randrange(0x10000, 0x10ffff)]))
                   for _ in range(n))


def realtime_corpus(beta: bool, rng: random.Random) -> list[tuple[str, str | None, str | None, str | None]]:
    """(message, event_id to be echoed, code (None: any client error's), param as _matches takes it)."""
    out = []

    def ev(e: dict, code=None, param="*", echo=True):
        eid = f"fz{len(out)}_{'b' if beta else 'g'}"
        out.append((json.dumps({"event_id": eid, **e}), eid if echo else None, code, param))

    for t in templates(beta):  # wrong types at every field
        for path, value in _leaves(t):
            for w in _wrong_for(value, rng, 3):
                if path == ("type",):
                    param = "type"
                else:
                    param = "~" + _param(path)
                ev(_put(t, path, w), None, param)
        ev({**t, "event_id": 7}, "invalid_type", "event_id", echo=False)
    # what the fuzzing client found
    if beta:
        ev({"type": "session.update", "session": {"input_audio_sample_rate": 44100}}, "invalid_value",
           "session.input_audio_sample_rate")
        ev({"type": "session.update", "session": {"turn_detection": "server_vad"}}, "invalid_type",
           "session.turn_detection")
        ev({"type": "response.create", "response": {"voice": {"id": 3}}}, None, "~response.voice")
    else:
        for audio, param in (([], "session.audio"), ("pcm16", "session.audio"),
                             ({"input": "pcm16"}, "session.audio.input"),
                             ({"output": "pcm16"}, "session.audio.output"), ({"input": []}, "session.audio.input"),
                             ({"output": 24000}, "session.audio.output"),
                             ({"input": {"format": "pcm16"}}, "session.audio.input.format"),
                             ({"input": {"format": {"type": "audio/pcm", "rate": 44100}}},
                              "session.audio.input.format.rate"),
                             ({"input": {"turn_detection": []}}, "session.audio.input.turn_detection")):
            ev({"type": "session.update", "session": {"type": "realtime", "audio": audio}},
               "invalid_value" if param.endswith("rate") else "invalid_type", param)
        for audio, param in (("x", "response.audio"), ([], "response.audio"),
                             ({"output": "x"}, "response.audio.output"),
                             ({"output": {"voice": 5}}, "response.audio.output.voice")):
            ev({"type": "response.create", "response": {"audio": audio}}, "invalid_type", param)
        ev({"type": "session.update", "session": {"type": "transcription"}}, "invalid_value", "session.type")
    for _ in range(15):  # unknown events, some with unicode names
        name = rng.choice(["session.delete", "conversation.item.truncate", "response.audio.delta",
                           _unicode(rng, rng.randrange(1, 30))])
        ev({"type": name, "payload": _unicode(rng, 20)}, "invalid_event_type", "type")
    for bad in ("@@not base64@@", "abc", "====", "ä" * 8, PCM[:-1] + "!"):  # bad base64
        ev({"type": "input_audio_buffer.append", "audio": bad}, "invalid_value", "audio")
        ev({"type": "input_image_buffer.append", "image": bad}, None, "image")
    ev({"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [
        {"type": "input_audio", "audio": "@@"}]}}, "invalid_value", "item.content[0].audio")
    for _ in range(20):  # random unicode where a value or a key of a known type goes
        u = _unicode(rng, rng.randrange(1, 40))
        ev(rng.choice([{"type": "input_audio_buffer.append", "audio": u},
                       {"type": "response.create", "response": {"modalities" if beta else "output_modalities": [u]}},
                       {"type": "conversation.item.create", "item": {"type": "message", "role": u, "content": []}},
                       {"type": "session.update", "session": {"modalities" if beta else "output_modalities": [u],
                                                              **({} if beta else {"type": "realtime"})}}]))
    # huge: long strings, many values, long numbers (all under the 8 MB message limit)
    ev({"type": "input_audio_buffer.append", "audio": 5, "padding": "x" * (5 << 20)}, "invalid_type", "audio")
    ev({"type": "response.create", "response": {"metadata": {str(i): i for i in range(2000)}}}, "invalid_type",
       "~response.metadata")
    ev({"type": "conversation.item.create", "item": {"type": "message", "role": "user",
                                                     "content": [{"type": "input_text", "text": 1}] * 1000}},
       "invalid_type", "item.content[0].text")
    ev({"type": "response.create", "response": {"metadata": {str(i): i for i in range(6000)}}}, "invalid_json",
       None, echo=False)  # over the 10,000 values an event may hold
    raw = [('{"type": "response.create", "response": {"metadata": ' + "[" * 100_000 + "]" * 100_000 + "}}"),
           '{"type": "session.update", "session": ' * 50_000 + "{}" + "}" * 50_000,
           "[" * 1_000_000, '{"a":' * 200_000,
           json.dumps({"type": "response.create", "response": {"metadata": _nested(40)}}),
           '{"type": "response.create", "response": {"max_output_tokens": ' + "9" * 5000 + "}}",
           '{"type": "response.create", "response": {"max_output_tokens": NaN}}',
           '{"type": "response.create", "response": {"instructions": "\\ud800"}}',
           '{"type": "input_audio_buffer.append", "audio": "\\udfff"}', json.dumps([0] * 20_000),
           "not json", "", "{", '{"type": "response.create",}', '"just a string"', "null",
           "\u00ff\ufffe" + _unicode(rng, 50)]
    for r in raw:
        out.append((r, None, "invalid_json", None))
    rng.shuffle(out)
    return out


def chat_corpus(rng: random.Random) -> list[tuple[bytes, str | None]]:
    """(body, param as _matches takes it)."""
    wav = base64.b64encode(b"RIFF").decode()
    t = {"model": "omni", "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "hi"},
                                     {"type": "image_url", "image_url": {"url": "data:image/png;base64," + PNG}},
                                     {"type": "input_audio", "input_audio": {"data": wav, "format": "wav"}}]}],
        "max_completion_tokens": 2, "temperature": 0.5, "top_p": 0.9, "seed": 1, "stop": ["x"], "stream": False,
        "modalities": ["text"], "use_audio_in_video": True}
    out = []
    for path, value in _leaves(t):
        for w in _wrong_for(value, rng):
            out.append((json.dumps(_put(t, path, w)).encode(), "~" + _param(path)))
    out += [(json.dumps({**t, "messages": [{"role": "tool", "content": "x"}]}).encode(), "messages[0].role"),
            (json.dumps({**t, "messages": [{"role": "user", "content": [{"type": "file"}]}]}).encode(),
             "messages[0].content[0].type"),
            (json.dumps({**t, "messages": "hi"}).encode(), "messages"),
            (json.dumps({**t, "messages": [{"role": "user", "content": _unicode(rng, 10)}], "stop": [1]}).encode(),
             "stop[0]"),
            (json.dumps({k: v for k, v in t.items() if k != "messages"}).encode(), "messages")]
    raw = [b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", b"[" * 100_000, b'{"a":' * 100_000,
           b'{"model": "omni", "messages": [], "seed": ' + b"9" * 5000 + b"}", b'{"seed": NaN, "messages": []}',
           b'{"messages": [{"role": "user", "content": "\\ud800"}]}', b"\xff\xfe\x00", b"", b"[]", b"null",
           b'"x"', b"{", json.dumps([0] * 1000).encode()]
    out += [(r, None) for r in raw]
    rng.shuffle(out)
    return out


async def fuzz_realtime(url: str, beta: bool, corpus: list, wait: float) -> dict:
    """Send each message, take the error naming it (by event_id); a session ends with a normal text turn."""
    c = await Raw.connect(url, KEY, beta=beta)
    await c.until("session.created")
    tally = {"sent": 0, "client": 0, "server": 0, "unanswered": 0, "wrong": []}
    for msg, eid, code, param in corpus:
        await c.ws.send(msg)
        tally["sent"] += 1
        try:
            while True:
                ev = json.loads(await asyncio.wait_for(c.ws.recv(), wait))
                if ev["type"] == "error" and ev["error"].get("event_id") == eid:
                    break
        except asyncio.TimeoutError:
            tally["unanswered"] += 1
            tally["wrong"].append((msg[:200], "no error"))
            continue
        err = ev["error"]
        if err["type"] == "server_error":
            tally["server"] += 1
        else:
            tally["client"] += 1
        if err["type"] != "invalid_request_error" or (code and err["code"] != code) \
                or not _matches(err["param"], param) or not err["message"]:
            tally["wrong"].append((msg[:200], err))
    # the session goes on: a normal text turn
    await c.ws.send(json.dumps({"type": "session.update", "session": {"modalities": ["text"], "turn_detection": None}
                                if beta else {"type": "realtime", "output_modalities": ["text"],
                                              "audio": {"input": {"turn_detection": None}}}}))
    await c.ws.send(json.dumps({"type": "input_audio_buffer.clear"}))
    await c.ws.send(json.dumps({"type": "conversation.item.create", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Still there?"}]}}))
    await c.ws.send(json.dumps({"type": "response.create"}))
    evs = []
    while not evs or evs[-1]["type"] != "response.done" or evs[-1]["response"]["status"] == "cancelled":
        evs.append(await c.recv(60))
    tally["turn"] = evs[-1]["response"]["status"], text_of(evs, "response.text.delta" if beta else
                                                              "response.output_text.delta")
    await c.close()
    return tally


def fuzz(srv, wait: float = 10.0) -> tuple[dict, dict]:
    rng = random.Random(SEED)
    corpora = [(beta, realtime_corpus(beta, rng)) for beta in (False, True)]
    sessions = []  # four sessions: GA, beta, GA, beta, each with half of its dialect's corpus
    for half in (0, 1):
        for beta, corpus in corpora:
            n = len(corpus) // 2
            sessions.append((beta, corpus[:n] if half == 0 else corpus[n:]))

    async def main():
        return [await fuzz_realtime(srv.url, beta, part, wait) for beta, part in sessions]

    tallies = run(main(), timeout=600)
    ws = {k: sum(t[k] for t in tallies) for k in ("sent", "client", "server", "unanswered")}
    ws["wrong"] = [w for t in tallies for w in t["wrong"]]
    ws["turns"] = [t["turn"] for t in tallies]
    http = {"sent": 0, "4xx": 0, "5xx": 0, "wrong": []}
    for body, param in chat_corpus(rng):
        status, err, _ = post(srv, None, KEY, raw=body)
        http["sent"] += 1
        http["4xx" if 400 <= status < 500 else "5xx"] += 1
        p = err.get("error", {}).get("param")
        ok = status == 400 and err["error"]["type"] == "invalid_request_error" and _matches(p or None, param)
        if not ok:
            http["wrong"].append((body[:200], status, err))
    return ws, http


def server_errors(port: int) -> int | None:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    found = re.findall(r"^omni_server_errors_total\{[^}]*\} (\d+)$", text, re.M)
    return sum(map(int, found)) if found else None


def report(ws: dict, http: dict, port: int) -> str:
    return (f"realtime: {ws['sent']} sent, {ws['client']} client errors, {ws['server']} server errors, "
            f"{ws['unanswered']} unanswered, {len(ws['wrong'])} not as expected; chat completions: {http['sent']} "
            f"sent, {http['4xx']} 4xx, {http['5xx']} 5xx, {len(http['wrong'])} not as expected; /metrics server "
            f"errors: {server_errors(port)}")


def test_loads_bounds_depth_without_recursing():
    deepest = "[" * 32 + "]" * 32  # the limit
    assert loads(deepest) == json.loads(deepest)
    assert loads('["' + "[{" * 10_000 + '", "\\"[["]') == ["[{" * 10_000, '"[[']  # brackets in strings do not count
    assert loads('{"a": "\\ud83d\\ude00"}') == {"a": "\U0001f600"}  # a surrogate pair is one character
    for bad in ("[" * 33 + "]" * 33, "[" * 5_000_000, '{"a":' * 100_000, "[" + "0," * 200_000 + "0]", "[NaN]",
                "[Infinity]", "9" * 5000, '["\\ud800"]', '"\\udc00x"', b"\xff", "[1,]"):
        with pytest.raises(JsonError):
            loads(bad)


def test_schema_errors_name_the_member_the_input_was_meant_for():
    def p(kind, ev, beta=False):
        got = check(event_schema(kind, beta), {"type": kind, **ev})
        return got and (got.code, got.param)

    assert p("session.update", {"session": {"type": "realtime", "audio": {"input": {"format": {
        "type": "audio/pcm", "rate": 16000}}}}}) is None  # our extension
    assert p("session.update", {"session": {"turn_detection": None, "input_audio_sample_rate": 16000}}, True) is None
    assert p("session.update", {"session": {"type": "realtime", "audio": {"input": {"format": {
        "type": "audio/pcm", "rate": 44100}}}}}) == ("invalid_value", "session.audio.input.format.rate")
    assert p("session.update", {"session": {"type": "realtime", "audio": {"input": {"format": {
        "type": "audio/x"}}}}}) == ("invalid_value", "session.audio.input.format.type")
    assert p("session.update", {"session": {"audio": {}}}) == ("missing_required_parameter", "session.type")
    assert p("conversation.item.create", {"item": {"type": "message", "role": "tool", "content": []}}) == \
        ("invalid_value", "item.role")
    assert p("conversation.item.create", {"item": {"type": "mesage", "role": "user", "content": []}}) == \
        ("invalid_value", "item.type")
    assert p("conversation.item.create", {"item": {"type": "message", "role": "user", "content": [
        {"type": "input_text", "text": "hi"}, {"type": "input_video"}]}}) == ("invalid_value", "item.content[1].type")
    assert p("response.create", {"response": {"max_output_tokens": "lots"}}) == \
        ("invalid_type", "response.max_output_tokens")
    body = check(chat_schema(), {"messages": [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}},
        {"type": "image_url", "image_url": {"url": 5}}]}], "use_audio_in_video": True})
    assert (body.code, body.param) == ("invalid_type", "messages[0].content[1].image_url.url")
    assert "input should be a valid string" in body.message


def test_fuzzed_events_and_bodies_are_client_errors_and_the_server_goes_on(server):
    ws, http = fuzz(server)
    print(report(ws, http, server.port))
    for w in (ws["wrong"] + http["wrong"])[:10]:
        print(" ", w)
    assert ws["sent"] >= 400 and http["sent"] >= 40
    assert ws["server"] == 0 and http["5xx"] == 0
    assert not ws["wrong"], ws["wrong"][:5]
    assert not http["wrong"], http["wrong"][:5]
    assert ws["client"] == ws["sent"]
    assert all(status in ("completed", "incomplete") and text for status, text in ws["turns"]), ws["turns"]
    assert server_errors(server.port) == 0


if __name__ == "__main__":  # counts only: python -m tests.test_fuzz (with $OMNI_CACHE holding the embedded model)
    from omni import embedded
    from streaming.engine import Engine, EngineConfig
    from streaming.protocol import SessionConfig
    from streaming.server import ServerConfig
    from tests.realtime import ServerThread

    eng = Engine.load(embedded.ensure(), config=EngineConfig(max_sessions=4, max_context=4096, max_new_tokens=8))
    srv = ServerThread(eng, ServerConfig(port=0, api_key=KEY, defaults=SessionConfig(turn_detection=None)))
    try:
        ws, http = fuzz(srv, float(os.environ.get("FUZZ_WAIT", "2")))
        print(report(ws, http, srv.port))
        for w in (ws["wrong"] + http["wrong"])[:int(os.environ.get("FUZZ_SHOW", "0"))]:
            print(" ", w)
    finally:
        srv.stop()
        eng.shutdown()
