"""OpenAI chat completions over HTTP, with speech out, on the engine (same app and port as /v1/realtime).

    POST /v1/chat/completions   messages with text, image_url, input_audio, video_url (and audio_url)
                                parts; modalities ["text"] or ["text", "audio"] with audio.voice and
                                audio.format (wav, pcm16, mp3, opus, flac); stream=True sends SSE chunks
                                whose deltas carry text, or audio {"id", "data", "transcript"}, then [DONE]
    GET  /v1/models, /v1/models/{id}

Each request is one engine conversation (opened, one respond, closed): the whole message list is
rendered as one prompt with Qwen's chat template, so earlier assistant turns are history, not
generated again. An assistant turn that was spoken refers back to it by `audio.id` (the server
remembers transcripts for an hour) or carries its text. Errors are OpenAI error objects:
400 (with `param`), 401, 404, 413, 429 (all engine slots in use), 503 (overloaded, shutting down);
a failure of ours is a 500 with a message, never a traceback. A client that disconnects cancels
its generation within one engine step.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time

from omni.types import AudioDelta, Done, Error, TextDelta
from streaming import schema
from streaming.audio_formats import AudioEncoder
from streaming.chat_request import ApiError, ChatRequests, Plan
from streaming.engine import EngineBusy
from streaming.protocol import new_id, token_kinds

log = logging.getLogger("omni.http")

DRAIN_FACTOR = 4  # an oversized body up to this many times the limit is read and dropped before the 413
AUDIO_CHUNK_BYTES = 24000  # PCM16 per streamed audio delta: 500 ms at 24 kHz


def install(app, server) -> None:
    """Add the HTTP API's routes to the server's app."""
    from starlette.routing import Route

    api = ChatAPI(server)
    server.chat_api = api
    app.router.routes += [Route("/v1/chat/completions", _Asgi(api.chat), methods=["POST"]),
                          Route("/v1/models", _Asgi(api.models), methods=["GET"]),
                          Route("/v1/models/{model:path}", _Asgi(api.models), methods=["GET"]),
                          Route("/v1/{rest:path}", _Asgi(_not_found), methods=["GET", "POST", "PUT", "PATCH", "DELETE"])]


class _Asgi:
    """A plain ASGI endpoint (Starlette passes non-function endpoints scope, receive, send as is)."""

    def __init__(self, fn):
        self.fn = fn

    async def __call__(self, scope, receive, send):
        await self.fn(scope, receive, send)


class _Reply:
    """What has been sent on one HTTP exchange, so an error after the headers is not a second response."""

    def __init__(self, send):
        self._send, self.started, self.disconnected = send, False, False

    async def start(self, status: int, content_type: str, headers: dict | None = None) -> None:
        hs = [(b"content-type", content_type.encode())]
        hs += [(k.lower().encode(), str(v).encode()) for k, v in (headers or {}).items()]
        self.started = True
        try:
            await self._send({"type": "http.response.start", "status": status, "headers": hs})
        except OSError:
            self.disconnected = True

    async def body(self, data: bytes, more: bool = False) -> None:
        try:
            await self._send({"type": "http.response.body", "body": data, "more_body": more})
        except OSError:  # the client went away (uvicorn's ClientDisconnected)
            self.disconnected = True

    async def json(self, status: int, obj: dict, headers: dict | None = None) -> None:
        await self.start(status, "application/json", headers)
        await self.body(json.dumps(obj).encode())

    async def error(self, e: ApiError) -> None:
        await self.json(e.status, e.body(), e.headers)


class ChatAPI:
    def __init__(self, server):
        self.server, self.engine, self.config = server, server.engine, server.config
        self.created = int(time.time())
        self.requests = ChatRequests(server)

    async def models(self, scope, receive, send) -> None:
        from starlette.requests import Request

        request, reply = Request(scope, receive), _Reply(send)
        if not self.server.authorized(request.headers):
            return await reply.error(_unauthorized())
        card = {"id": self.config.model_name, "object": "model", "created": self.created, "owned_by": "omni"}
        wanted = request.path_params.get("model")
        if wanted is None:
            return await reply.json(200, {"object": "list", "data": [card]})
        if wanted != self.config.model_name:
            return await reply.error(ApiError(404, f"the model {wanted!r} does not exist; this server has "
                                                   f"{self.config.model_name!r}", "model", "model_not_found"))
        await reply.json(200, card)

    async def chat(self, scope, receive, send) -> None:
        from starlette.requests import Request

        request, reply = Request(scope, receive), _Reply(send)
        conv = None
        try:
            if self.server.closing:
                raise ApiError(503, "the server is shutting down", code="server_shutdown")
            if not self.server.authorized(request.headers):
                raise _unauthorized()
            body = await self._body(request)
            plan = await self.requests.plan(body)
            try:
                conv = self.engine.open_conversation(system=plan.system)
            except EngineBusy as e:
                self.server.metrics.refused()
                raise ApiError(429, f"the server is at its conversation limit ({e}); try again shortly",
                               code="server_busy", type="server_error", headers={"Retry-After": "1"}) from None
            await self._answer(plan, conv, receive, reply)
        except ApiError as e:
            self.server.metrics.error(e.code)
            log.info("chat completion: %d %s (%s)", e.status, e.message, e.param)
            if not reply.started:
                await reply.error(e)
        except Exception as e:  # a bug of ours: one log line with the traceback, the client gets a message
            log.exception("chat completion failed")
            self.server.metrics.error("internal")
            self.server.metrics.server_error("http")
            if not reply.started:
                await reply.error(ApiError(500, f"internal error: {type(e).__name__}: {e}", code="internal"))
        finally:
            if conv is not None:
                conv.close()

    async def _body(self, request) -> dict:
        limit = self.config.max_request_bytes
        size = request.headers.get("content-length")
        size = int(size) if size is not None and size.isdigit() else None
        chunks, n = [], 0
        if size is None or size <= DRAIN_FACTOR * limit:  # read (or skip) it all, so the client gets our answer
            async for chunk in request.stream():
                n += len(chunk)
                if n <= limit:
                    chunks.append(chunk)
                elif n > DRAIN_FACTOR * limit:
                    break
        if n > limit or (size is not None and size > limit):
            raise ApiError(413, f"request body of {size or n} bytes is over the limit of {limit} bytes; send "
                                "smaller media", code="request_too_large")
        try:
            body = schema.loads(b"".join(chunks))
        except schema.JsonError as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}", None, "invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object", None, "invalid_json")
        return body

    async def _answer(self, plan: Plan, conv, receive, reply: _Reply) -> None:
        run = _Run(self, plan, conv)
        self.server.http_requests.add(run.cancel)

        async def watch():  # the body is read: the next message is the client going away
            while True:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    log.info("chat completion %s: client disconnected; cancelling", run.id)
                    run.cancel("client_gone")
                    return

        watcher = asyncio.create_task(watch())
        try:
            if plan.stream:
                await run.stream(reply)
            else:
                await run.whole(reply)
        finally:
            watcher.cancel()
            self.server.http_requests.discard(run.cancel)


class _Run:
    """One generation: engine events -> text (with stop sequences held back) and speech."""

    def __init__(self, api: ChatAPI, plan: Plan, conv):
        self.api, self.plan, self.conv = api, plan, conv
        self.id = new_id("chatcmpl").replace("_", "-", 1)
        self.audio_id = new_id("audio")
        self.created = int(time.time())
        self.cancelled: str | None = None
        self.stopped = False
        self.final: Done | Error | None = None
        self.t0 = time.perf_counter()

    def cancel(self, reason: str) -> None:
        if self.cancelled is None:
            self.cancelled = reason
            self.conv.cancel(reason)

    async def events(self):
        """('text', str), ('reasoning', str) and ('audio', pcm bytes) pieces; self.final is set at the end.

        A reasoning model's <think> block is `reasoning` (`reasoning_content` in the reply, as vLLM and
        DeepSeek's API give it): never the answer's text, never spoken, not matched against `stop`."""
        p = self.plan
        hold = max((len(s) for s in p.stop), default=1) - 1
        buf = ""
        kw = {"voice": p.voice} if p.speech else {}
        async for ev in self.conv.respond(p.parts, modalities=p.modalities, sampling=p.sampling,
                                          max_new_tokens=p.max_new_tokens, max_output_tokens=p.max_output_tokens,
                                          seed=p.seed, role=p.role, **kw):
            if isinstance(ev, TextDelta):
                if self.stopped or not ev.text:
                    continue
                if ev.reasoning:
                    yield "reasoning", ev.text
                    continue
                buf += ev.text
                hits = [i for i in (buf.find(s) for s in p.stop) if i >= 0]
                if hits:
                    self.stopped = True
                    out, buf = buf[:min(hits)], ""
                    self.conv.cancel("stop")
                else:
                    cut = len(buf) - hold
                    out, buf = buf[:cut], buf[cut:]
                if out:
                    yield "text", out
            elif isinstance(ev, AudioDelta):
                if not self.stopped and self.cancelled is None and ev.pcm:
                    yield "audio", ev.pcm
            else:
                self.final = ev
        if buf and not self.stopped:
            yield "text", buf

    def _outcome(self) -> tuple[str, dict, dict]:
        """(finish_reason, usage, timings), or raise the ApiError the engine's result stands for."""
        f = self.final
        if isinstance(f, Error) or f is None:
            f = f or Error("internal", "the response ended without a result")
            status, code = {"invalid_media": (400, "invalid_media"), "invalid_request": (400, "invalid_value"),
                            "context_length_exceeded": (400, "context_length_exceeded"),
                            "busy": (503, "server_busy")}.get(f.code, (500, f.code))
            param = "messages" if status == 400 else None
            if f.code == "invalid_media" and len(self.plan.media) == 1:  # the engine's decoding: name the part
                kind, param = self.plan.media[0]
                code = f"invalid_{kind}"
            raise ApiError(status, f.message, param, code)
        self.api.server.metrics.response_done(f.status, f.timings, f.usage)
        if f.status == "cancelled" and not self.stopped:
            if self.cancelled == "server_shutdown":
                raise ApiError(503, "the server is shutting down; the reply was cut short", code="server_shutdown")
            raise ApiError(499, "the request was cancelled", code="cancelled")
        finish = "length" if f.status == "incomplete" and not self.stopped else "stop"
        u = f.usage
        codec = u.get("codec_tokens", 0)
        kinds = token_kinds(u)["input"]
        prompt = u.get("prompt_tokens", 0) + u.get("cached_tokens", 0)
        usage = {"prompt_tokens": prompt, "completion_tokens": u.get("completion_tokens", 0) + codec,
                 "total_tokens": prompt + u.get("completion_tokens", 0) + codec,
                 "prompt_tokens_details": {"cached_tokens": u.get("cached_tokens", 0), "audio_tokens": kinds["audio"],
                                           "image_tokens": kinds["image"], "text_tokens": kinds["text"]},
                 "completion_tokens_details": {"reasoning_tokens": u.get("reasoning_tokens", 0), "audio_tokens": codec,
                                               "text_tokens": u.get("completion_tokens", 0)}}
        if self.plan.speech:
            usage["audio_seconds"] = u.get("audio_seconds", 0.0)
        log.info("chat completion %s: %s (%s) %s", self.id, f.status, finish, f.timings)
        return finish, usage, f.timings

    async def whole(self, reply: _Reply) -> None:
        text, reasoning, pcm = [], [], bytearray()
        async for kind, data in self.events():
            {"text": text.append, "reasoning": reasoning.append, "audio": pcm.extend}[kind](data)
        finish, usage, timings = self._outcome()
        text = "".join(text)
        message = {"role": "assistant", "content": text, "refusal": None}
        if reasoning:
            message["reasoning_content"] = "".join(reasoning)
        if self.plan.speech:
            audio = await asyncio.to_thread(AudioEncoder(self.plan.audio_format).whole, bytes(pcm))
            expires = self.api.requests.remember(self.audio_id, text)
            message["content"] = None
            message["audio"] = {"id": self.audio_id, "data": base64.b64encode(audio).decode(), "expires_at": expires,
                                "transcript": text}
        await reply.json(200, {"id": self.id, "object": "chat.completion", "created": self.created,
                               "model": self.plan.model, "system_fingerprint": None,
                               "choices": [{"index": 0, "message": message, "finish_reason": finish,
                                            "logprobs": None}],
                               "usage": usage, "timings": timings})

    def _chunk(self, delta: dict | None, finish: str | None = None, usage: dict | None = None) -> bytes:
        c = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.plan.model,
             "system_fingerprint": None,
             "choices": [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish,
                                                   "logprobs": None}]}
        if self.plan.include_usage:
            c["usage"] = usage
        return b"data: " + json.dumps(c).encode() + b"\n\n"

    async def stream(self, reply: _Reply) -> None:
        """SSE: the headers go out with the first piece, so errors before it get their own status."""
        p = self.plan
        enc = AudioEncoder(p.audio_format) if p.speech else None
        gen = self.events()
        first = True
        transcript = []

        async def open_stream():
            await reply.start(200, "text/event-stream; charset=utf-8", {"Cache-Control": "no-cache",
                                                                         "X-Accel-Buffering": "no"})
            await reply.body(self._chunk({"role": "assistant", "content": None if p.speech else "",
                                          "refusal": None}), True)

        try:
            async for kind, data in gen:
                if first:
                    await open_stream()
                    first = False
                if kind == "reasoning":
                    await reply.body(self._chunk({"reasoning_content": data}), True)
                elif kind == "text":
                    transcript.append(data)
                    delta = {"audio": {"id": self.audio_id, "transcript": data}} if p.speech else {"content": data}
                    await reply.body(self._chunk(delta), True)
                else:
                    for i in range(0, len(data), AUDIO_CHUNK_BYTES):
                        out = enc.push(data[i:i + AUDIO_CHUNK_BYTES])
                        if out:
                            await reply.body(self._chunk({"audio": {"id": self.audio_id, "data":
                                                                    base64.b64encode(out).decode()}}), True)
                if reply.disconnected:
                    self.cancel("client_gone")
        finally:
            await gen.aclose()
        try:
            finish, usage, timings = self._outcome()
        except ApiError as e:
            if first:
                raise
            log.info("chat completion %s: ended with %s", self.id, e.message)
            self.api.server.metrics.error(e.code)
            err = e.body()
            await reply.body(b"data: " + json.dumps(err).encode() + b"\n\n", True)
            await reply.body(b"data: [DONE]\n\n")
            return
        if first:
            await open_stream()
        if enc is not None:
            tail = enc.finish()
            expires = self.api.requests.remember(self.audio_id, "".join(transcript))
            audio = {"id": self.audio_id, "expires_at": expires}
            if tail:
                audio["data"] = base64.b64encode(tail).decode()
            await reply.body(self._chunk({"audio": audio}), True)
        await reply.body(self._chunk({}, finish), True)
        if p.include_usage:
            await reply.body(self._chunk(None, usage=usage), True)
        await reply.body(b"data: [DONE]\n\n")


async def _not_found(scope, receive, send) -> None:
    await _Reply(send).error(ApiError(404, f"no such endpoint: {scope['method']} {scope['path']}; this server has "
                                           "POST /v1/chat/completions, GET /v1/models and the websocket /v1/realtime",
                                      code="not_found"))


def _unauthorized() -> ApiError:
    return ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
