"""`omni serve`: the OpenAI Realtime websocket API on the engine.

    GET /v1/realtime?model=M   websocket (GA events; beta names with `OpenAI-Beta: realtime=v1`)
    GET /healthz               "ok"
    GET /metrics               Prometheus text

Each websocket is one Session on one engine Conversation. Receiving and sending run as two
tasks joined by a bounded queue: a client that stops reading is disconnected (1008) instead of
holding events in memory. With an API key, a missing or wrong `Authorization: Bearer` (or
browser subprotocol `openai-insecure-api-key.<key>`) is refused with 401 before the upgrade.
When every engine slot is taken the client gets an `error` event and close code 1013.
SIGTERM: stop accepting, cancel running responses (each ends with response.done), close 1001.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import signal
import sys
from dataclasses import dataclass, field
from http import HTTPStatus
from urllib.parse import parse_qs, urlsplit

from streaming.engine import EngineBusy
from streaming.metrics import Metrics
from streaming.protocol import Dialect, SessionConfig
from streaming.session import Limits, Session

log = logging.getLogger("omni.server")

SUBPROTOCOL = "realtime"
KEY_PROTOCOL = "openai-insecure-api-key."


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port (see RealtimeServer.port)
    api_key: str | None = None
    max_message_bytes: int = 8 << 20  # a bigger websocket message closes the connection (1009)
    send_queue: int = 4096  # events waiting for a slow client before it is disconnected
    idle_timeout_s: float = 600.0  # no client message and no response for this long: close
    model_name: str = "omni"
    defaults: SessionConfig = field(default_factory=SessionConfig)
    limits: Limits = field(default_factory=Limits)


class RealtimeServer:
    def __init__(self, engine, config: ServerConfig = ServerConfig(), on_turn=None):
        self.engine, self.config = engine, config
        self.metrics = Metrics()
        self.sessions: set[Session] = set()
        self.on_turn = on_turn  # tests: called with each turn's parts
        self._server = None
        self._closing = False
        self._handlers: set[asyncio.Task] = set()
        voices = getattr(engine.model, "voices", None) or {}
        self.voices = tuple(voices)

    @property
    def port(self) -> int:
        return self._server.sockets[0].getsockname()[1]

    async def start(self) -> None:
        from websockets.asyncio.server import serve

        c = self.config
        self._server = await serve(self._handle, c.host, c.port, process_request=self._process_request,
                                   select_subprotocol=self._select_subprotocol, max_size=c.max_message_bytes,
                                   compression=None, ping_interval=20, ping_timeout=60)
        log.info("serving ws://%s:%d/v1/realtime (%d sessions at most)", c.host, self.port,
                 self.engine.config.max_sessions)

    def _authorized(self, request) -> bool:
        key = self.config.api_key
        if not key:
            return True
        auth = request.headers.get("Authorization", "")
        if auth.startswith("Bearer ") and hmac.compare_digest(auth[7:].strip().encode(), key.encode()):
            return True
        for proto in ",".join(request.headers.get_all("Sec-WebSocket-Protocol")).split(","):
            proto = proto.strip()
            if proto.startswith(KEY_PROTOCOL) and hmac.compare_digest(proto[len(KEY_PROTOCOL):].encode(), key.encode()):
                return True
        return False

    def _process_request(self, connection, request):
        path = urlsplit(request.path).path.rstrip("/")
        if path == "/healthz":
            return connection.respond(HTTPStatus.OK, "ok\n")
        if path == "/metrics":
            resp = connection.respond(HTTPStatus.OK, self.metrics.render())
            resp.headers["Content-Type"] = "text/plain; version=0.0.4; charset=utf-8"
            return resp
        if path not in ("/v1/realtime", "/realtime"):
            return connection.respond(HTTPStatus.NOT_FOUND, "not found; the realtime API is at /v1/realtime\n")
        if self._closing:
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "the server is shutting down\n")
        if not self._authorized(request):
            log.info("refused %s: missing or wrong API key", connection.remote_address)
            return connection.respond(HTTPStatus.UNAUTHORIZED, "missing or wrong API key: send "
                                      "'Authorization: Bearer <key>' or the subprotocol "
                                      "'openai-insecure-api-key.<key>'\n")
        return None

    @staticmethod
    def _select_subprotocol(connection, subprotocols):
        return SUBPROTOCOL if SUBPROTOCOL in subprotocols else None

    async def _handle(self, ws) -> None:
        task = asyncio.current_task()
        self._handlers.add(task)
        try:
            await self._serve_session(ws)
        finally:
            self._handlers.discard(task)

    async def _serve_session(self, ws) -> None:
        from websockets.exceptions import ConnectionClosed

        c = self.config
        beta = "realtime=v1" in ws.request.headers.get("OpenAI-Beta", "")
        model = parse_qs(urlsplit(ws.request.path).query).get("model", [c.model_name])[0]
        dialect = Dialect(beta)
        try:
            conv = self.engine.open_conversation()
        except EngineBusy as e:
            self.metrics.refused()
            self.metrics.error("server_busy")
            log.warning("refused a session: %s", e)
            ev = dialect.error(f"the server is at its session limit ({e}); try again later", "server_busy",
                               type="server_error")
            try:
                await ws.send(json.dumps(ev))
                await ws.close(1013, "server busy: session limit reached")
            except ConnectionClosed:
                pass
            return
        queue: asyncio.Queue = asyncio.Queue(c.send_queue)
        overflow = asyncio.Event()

        def send(ev: dict) -> None:
            try:
                queue.put_nowait(ev)
            except asyncio.QueueFull:
                overflow.set()

        session = Session(conv, send, dialect=dialect, model_name=model, defaults=c.defaults, limits=c.limits,
                          metrics=self.metrics, voices=self.voices, on_turn=self.on_turn)
        session.ws = ws  # for shutdown's close
        self.sessions.add(session)
        self.metrics.session_opened()
        log.info("session %s: open (%s, %s, model %s)", session.id, ws.remote_address, "beta" if beta else "GA", model)

        async def sender():
            while True:
                ev = await queue.get()
                await ws.send(json.dumps(ev))

        async def watchdog():
            await overflow.wait()
            log.warning("session %s: client is not reading (%d events queued); disconnecting", session.id,
                        queue.qsize())
            await ws.close(1008, "client is not reading events fast enough")

        tasks = [asyncio.create_task(sender()), asyncio.create_task(watchdog())]
        reason = "client closed"
        try:
            await session.open()
            while True:
                try:
                    msg = await asyncio.wait_for(ws.recv(), c.idle_timeout_s)
                except asyncio.TimeoutError:
                    if session.responding:
                        continue
                    reason = "idle timeout"
                    await ws.close(1000, f"idle for {c.idle_timeout_s:g} s")
                    break
                await session.handle(msg)
                if any(t.done() for t in tasks):  # the sender failed or the watchdog closed the socket
                    break
        except ConnectionClosed as e:
            reason = f"closed ({e.rcvd.code if e.rcvd else 'no close frame'})"
        finally:
            await session.close()
            try:  # let the last events (response.done of a cancelled response) go out
                await asyncio.wait_for(_drain(queue), 2)
                if not tasks[0].done():
                    await asyncio.wait_for(_flush(queue, ws), 2)
            except (asyncio.TimeoutError, ConnectionClosed, Exception):
                pass
            for t in tasks:
                t.cancel()
            self.sessions.discard(session)
            self.metrics.session_closed()
            log.info("session %s: %s", session.id, reason)

    async def shutdown(self, timeout: float = 10.0) -> None:
        """Stop accepting; cancel running responses (each still gets its response.done); close 1001."""
        self._closing = True
        if self._server is None:
            return
        self._server.close(close_connections=False)
        for s in list(self.sessions):
            s.cancel("server_shutdown")
        tasks = [s.response.task for s in self.sessions if s.response is not None and s.response.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
        await asyncio.sleep(0.05)  # the senders pass the final events on
        for s in list(self.sessions):
            ws = getattr(s, "ws", None)
            if ws is not None:
                await ws.close(1001, "server shutting down")
        if self._handlers:
            await asyncio.wait(list(self._handlers), timeout=timeout)
        await self._server.wait_closed()


async def _drain(queue: asyncio.Queue) -> None:
    while not queue.empty():
        await asyncio.sleep(0.01)


async def _flush(queue: asyncio.Queue, ws) -> None:
    while not queue.empty():
        await ws.send(json.dumps(queue.get_nowait()))


def add_parser(subparsers, add_model_args) -> None:
    p = subparsers.add_parser(
        "serve", help="serve the OpenAI Realtime websocket API (text, audio and video in; text and speech out)",
        description="Serve GET /v1/realtime (OpenAI Realtime protocol, GA and beta, plus input_image_buffer.append "
                    "video frames), /healthz and /metrics.")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--api-key", default=os.environ.get("OMNI_API_KEY"),
                   help="require this key (Authorization: Bearer); default $OMNI_API_KEY, else no key")
    p.add_argument("--max-sessions", type=int, default=8, help="concurrent sessions (engine slots), default 8")
    p.add_argument("--max-context", type=int, default=8192, help="tokens per session, history included")
    p.add_argument("--max-new-tokens", type=int, default=512, help="reply length limit in tokens")
    p.add_argument("--idle-timeout", type=float, default=600.0, help="seconds without client messages before closing")
    p.add_argument("--modalities", choices=["text", "audio"], nargs="+",
                   help="default output modalities (default: audio when the model can speak, else text)")
    add_model_args(p)
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    from omni.cli import _dtype, resolve_model
    from streaming.engine import Engine, EngineConfig

    if not args.debug:
        logging.getLogger("omni").setLevel(logging.INFO)
    model_dir = resolve_model(args.model)
    engine = Engine.load(model_dir, device=args.device, dtype=_dtype(args.dtype),
                         config=EngineConfig(max_sessions=args.max_sessions, max_context=args.max_context,
                                             max_new_tokens=args.max_new_tokens))
    mods = tuple(args.modalities) if args.modalities else (("audio",) if engine.model.talker is not None
                                                            else ("text",))
    config = ServerConfig(host=args.host, port=args.port, api_key=args.api_key or None,
                          idle_timeout_s=args.idle_timeout, defaults=SessionConfig(output_modalities=mods))
    try:
        asyncio.run(_serve_until_signal(engine, config))
    finally:
        engine.shutdown()
    return 0


async def _serve_until_signal(engine, config: ServerConfig) -> None:
    server = RealtimeServer(engine, config)
    await server.start()
    print(f"omni: serving ws://{config.host}:{server.port}/v1/realtime", file=sys.stderr, flush=True)
    stop = asyncio.get_running_loop().create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, lambda s=sig: stop.done() or stop.set_result(s))
    sig = await stop
    log.info("%s: shutting down", signal.Signals(sig).name)
    await server.shutdown()
    print("omni: server stopped", file=sys.stderr, flush=True)
