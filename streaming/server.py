"""`omni serve`: the OpenAI Realtime websocket API (and the HTTP API, and the web demo) on the engine.

    GET /v1/realtime?model=M   websocket (GA events; beta names with `OpenAI-Beta: realtime=v1`)
    POST /v1/chat/completions  OpenAI chat completions with speech out; GET /v1/models (http_api.py)
    GET /healthz               "ok"
    GET /metrics               Prometheus text
    /                          the Gradio web demo (ui/app.py's mount_ui), when ServerConfig.ui

One FastAPI (Starlette) app served by uvicorn on one port: `RealtimeServer.app`. Each
websocket is one Session on one engine Conversation. Receiving and sending run as two tasks
joined by a bounded queue: a client that stops reading is disconnected (1008) instead of holding
events in memory. With an API key, a missing or wrong `Authorization: Bearer` (or browser
subprotocol `openai-insecure-api-key.<key>`) is refused with 401 before the upgrade. When every
engine slot is taken the client gets an `error` event and close code 1013.
SIGTERM: stop accepting, cancel running responses (each ends with response.done), close 1001.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import signal
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

from streaming.engine import EngineBusy
from streaming.metrics import Metrics, engine_metrics
from streaming.protocol import Dialect, SessionConfig
from streaming.session import Limits, Session

log = logging.getLogger("omni.server")

SUBPROTOCOL = "realtime"
KEY_PROTOCOL = "openai-insecure-api-key."
REALTIME_PATHS = ("/v1/realtime", "/realtime")


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
    ui: bool = False  # mount the web demo (ui/app.py's mount_ui) at "/"; `omni serve` turns it on
    max_request_bytes: int = 64 << 20  # HTTP API: a bigger request body gets 413
    allow_remote_media: bool = False  # HTTP API: fetch http(s) media URLs for callers
    media_root: str | None = None  # HTTP API: local media paths allowed under this directory only


class _DenialLogFilter(logging.Filter):
    """uvicorn's websockets-sansio protocol logs a refused upgrade (a 401 or 503 sent with the websocket
    denial-response extension) as an error, "ASGI callable returned without completing handshake";
    our websocket route always accepts, closes or refuses, so the line is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "returned without completing handshake" not in record.getMessage()


def _uvicorn_server(config):
    """A uvicorn.Server without its own signal handling: `omni serve` handles SIGTERM itself."""
    import contextlib

    import uvicorn

    err = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _DenialLogFilter) for f in err.filters):
        err.addFilter(_DenialLogFilter())

    class Server(uvicorn.Server):
        def capture_signals(self):
            return contextlib.nullcontext()

    return Server(config)


class RealtimeServer:
    def __init__(self, engine, config: ServerConfig = ServerConfig(), on_turn=None):
        self.engine, self.config = engine, config
        self.metrics = Metrics()
        self.sessions: set[Session] = set()
        self.on_turn = on_turn  # tests: called with each turn's parts
        self._uv = None
        self._sock: socket.socket | None = None
        self._serve_task: asyncio.Task | None = None
        self._closing = False
        self._handlers: set[asyncio.Task] = set()
        voices = getattr(engine.model, "voices", None) or {}
        self.voices = tuple(voices)
        self.ui_mounted = False
        self.http_requests: set = set()  # cancel(reason) callables of HTTP API generations in flight
        self.app = self._build_app()

    def _build_app(self):
        from fastapi import FastAPI
        from starlette.responses import PlainTextResponse
        from starlette.routing import Route, WebSocketRoute

        async def healthz(request):
            return PlainTextResponse(await self.health_text())

        async def metrics(request):
            return PlainTextResponse(await self.metrics_text(), media_type="text/plain; version=0.0.4; charset=utf-8")

        app = FastAPI(title="omni", docs_url=None, redoc_url=None, openapi_url=None)
        app.router.routes += [Route("/healthz", healthz, methods=["GET"]), Route("/metrics", metrics, methods=["GET"])]
        app.router.routes += [WebSocketRoute(path, self._handle) for path in REALTIME_PATHS]
        from streaming import http_api

        http_api.install(app, self)
        if self.config.ui:  # last: the demo is mounted at "/" and would shadow later routes
            try:
                from ui.app import mount_ui
            except ModuleNotFoundError as e:
                if e.name != "ui.app":
                    raise
                log.info("no web demo yet (ui/app.py is missing); serving the APIs only")
            else:
                mount_ui(app, self)
                self.ui_mounted = True
        return app

    async def health_text(self) -> str:
        """GET /healthz (a Ray Serve replica answers for every replica: omni/scale/serve.py)."""
        return "ok\n"

    async def metrics_text(self) -> str:
        """GET /metrics, Prometheus text: the server's counters and the engine's stages."""
        return self.metrics.render() + engine_metrics(self.engine.stats())

    @property
    def port(self) -> int:
        return self._sock.getsockname()[1]

    @property
    def closing(self) -> bool:
        return self._closing

    async def start(self) -> None:
        import uvicorn

        c = self.config
        family = socket.AF_INET6 if ":" in c.host else socket.AF_INET
        self._sock = socket.create_server((c.host, c.port), family=family, backlog=2048)
        self._sock.setblocking(False)
        self._uv = _uvicorn_server(uvicorn.Config(
            # uvicorn drops the TCP connection at once on a message over ws_max_size, so the client may see a
            # broken pipe; up to twice the limit the message is read and refused with a clean close (1009)
            self.app, log_config=None, access_log=False, ws_max_size=2 * c.max_message_bytes, ws_ping_interval=20,
            ws_ping_timeout=60, ws_per_message_deflate=False, timeout_graceful_shutdown=5,
            timeout_keep_alive=30))
        self._serve_task = asyncio.create_task(self._uv.serve(sockets=[self._sock]), name="uvicorn")
        while not self._uv.started:
            if self._serve_task.done():
                self._sock.close()
                self._serve_task.result()
                raise RuntimeError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)
        log.info("serving ws://%s:%d/v1/realtime (%d sessions at most)", c.host, self.port,
                 self.engine.config.max_sessions)

    def authorized(self, headers, subprotocols=()) -> bool:
        """Whether a request carries the API key (Bearer header, or the browser subprotocol)."""
        key = self.config.api_key
        if not key:
            return True
        auth = headers.get("authorization", "")
        if auth.startswith("Bearer ") and hmac.compare_digest(auth[7:].strip().encode(), key.encode()):
            return True
        for proto in subprotocols:
            proto = proto.strip()
            if proto.startswith(KEY_PROTOCOL) and hmac.compare_digest(proto[len(KEY_PROTOCOL):].encode(), key.encode()):
                return True
        return False

    async def _handle(self, ws) -> None:
        from starlette.responses import PlainTextResponse

        subprotocols = ws.scope.get("subprotocols") or []
        if self._closing:
            return await ws.send_denial_response(PlainTextResponse("the server is shutting down\n", 503))
        if not self.authorized(ws.headers, subprotocols):
            log.info("refused %s: missing or wrong API key", ws.client)
            return await ws.send_denial_response(PlainTextResponse(
                "missing or wrong API key: send 'Authorization: Bearer <key>' or the subprotocol "
                "'openai-insecure-api-key.<key>'\n", 401))
        await ws.accept(subprotocol=SUBPROTOCOL if SUBPROTOCOL in subprotocols else None)
        task = asyncio.current_task()
        self._handlers.add(task)
        try:
            await self._serve_session(ws)
        finally:
            self._handlers.discard(task)

    async def _serve_session(self, ws) -> None:
        c = self.config
        beta = "realtime=v1" in ws.headers.get("openai-beta", "")
        model = ws.query_params.get("model", c.model_name)
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
                await ws.send_text(json.dumps(ev))
            except Exception:
                pass
            await _close(ws, 1013, "server busy: session limit reached")
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
        log.info("session %s: open (%s, %s, model %s)", session.id, ws.client, "beta" if beta else "GA", model)

        async def sender():
            while True:
                ev = await queue.get()
                await ws.send_text(json.dumps(ev))

        async def watchdog():
            await overflow.wait()
            log.warning("session %s: client is not reading (%d events queued); disconnecting", session.id,
                        queue.qsize())
            await _close(ws, 1008, "client is not reading events fast enough")

        tasks = [asyncio.create_task(sender()), asyncio.create_task(watchdog())]
        reason = "client closed"
        try:
            await session.open()
            while True:
                try:
                    msg = await asyncio.wait_for(ws.receive(), c.idle_timeout_s)
                except asyncio.TimeoutError:
                    if session.responding:
                        continue
                    reason = "idle timeout"
                    await _close(ws, 1000, f"idle for {c.idle_timeout_s:g} s")
                    break
                if msg["type"] == "websocket.disconnect":
                    reason = f"closed ({msg.get('code', 'no close frame')})"
                    break
                data = msg.get("text")
                data = data if data is not None else msg.get("bytes") or b""
                if len(data) > c.max_message_bytes:
                    reason = f"message of {len(data)} bytes over the limit"
                    await _close(ws, 1009, f"message over {c.max_message_bytes} bytes")
                    break
                await session.handle(data)
                if any(t.done() for t in tasks):  # the sender failed or the watchdog closed the socket
                    break
        except Exception as e:  # the transport failed under us (a send or receive on a dead socket)
            reason = f"connection lost ({type(e).__name__}: {e})"
        finally:
            await session.close()
            try:  # let the last events (response.done of a cancelled response) go out
                await asyncio.wait_for(_drain(queue), 2)
                if not tasks[0].done():
                    await asyncio.wait_for(_flush(queue, ws), 2)
            except Exception:
                pass
            for t in tasks:
                t.cancel()
            await _close(ws, 1000, "")
            self.sessions.discard(session)
            self.metrics.session_closed()
            log.info("session %s: %s", session.id, reason)

    async def shutdown(self, timeout: float = 10.0) -> None:
        """Stop accepting; cancel running responses (each still gets its response.done); close 1001."""
        self._closing = True
        if self._uv is None:
            return
        for srv in getattr(self._uv, "servers", []):
            srv.close()  # no new connections
        await self.drain(timeout)
        self._uv.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self._serve_task), timeout + 6)
        except asyncio.TimeoutError:
            self._uv.force_exit = True
            log.warning("the HTTP server did not stop in time; forcing it")
            await asyncio.wait_for(self._serve_task, 5)
        self._sock.close()

    async def drain(self, timeout: float = 10.0) -> None:
        """Refuse new sessions and requests (503), cancel running responses (each still gets its
        response.done), close every websocket with 1001 and wait for their handlers. Without uvicorn
        (a Ray Serve replica serves `app` itself) this is the whole shutdown."""
        self._closing = True
        for s in list(self.sessions):
            s.cancel("server_shutdown")
        for cancel in list(self.http_requests):  # HTTP API generations in flight
            cancel("server_shutdown")
        tasks = [s.response.task for s in self.sessions if s.response is not None and s.response.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
        await asyncio.sleep(0.05)  # the senders pass the final events on
        for s in list(self.sessions):
            ws = getattr(s, "ws", None)
            if ws is not None:
                await _close(ws, 1001, "server shutting down")
        if self._handlers:
            await asyncio.wait(list(self._handlers), timeout=timeout)


async def _close(ws, code: int, reason: str) -> None:
    """Close a websocket unless it is closed already."""
    from starlette.websockets import WebSocketState

    if ws.application_state == WebSocketState.DISCONNECTED or ws.client_state == WebSocketState.DISCONNECTED:
        return
    try:
        await ws.close(code, reason)
    except Exception:
        pass


async def _drain(queue: asyncio.Queue) -> None:
    while not queue.empty():
        await asyncio.sleep(0.01)


async def _flush(queue: asyncio.Queue, ws) -> None:
    while not queue.empty():
        await ws.send_text(json.dumps(queue.get_nowait()))


def engine_config(args):
    """The EngineConfig `omni serve`'s flags ask for (one per replica under --ray)."""
    from streaming.engine import EngineConfig

    return EngineConfig(max_sessions=args.max_sessions, max_context=args.max_context,
                        max_new_tokens=args.max_new_tokens, max_audio_s=args.max_audio_seconds, greedy=args.greedy,
                        speech_worker={"auto": None, "on": True, "off": False}[args.speech_worker],
                        threads=args.threads, speech_threads=args.speech_threads, speech_device=args.speech_device)


def server_config(args, can_speak: bool, **overrides) -> ServerConfig:
    """The ServerConfig `omni serve`'s flags ask for; `can_speak`: whether the model has a speech part."""
    mods = tuple(args.modalities) if args.modalities else (("audio",) if can_speak else ("text",))
    kw = dict(host=args.host, port=args.port, api_key=args.api_key or None, idle_timeout_s=args.idle_timeout,
              defaults=SessionConfig(output_modalities=mods), ui=args.ui,
              max_request_bytes=int(args.max_request_mb * (1 << 20)), allow_remote_media=args.allow_remote_media,
              media_root=str(Path(args.media_root).resolve()) if args.media_root else None)
    return ServerConfig(**{**kw, **overrides})


def cmd_serve(args) -> int:
    from omni.cli import _dtype, resolve_model
    from streaming.engine import Engine

    if not args.debug:
        logging.getLogger("omni").setLevel(logging.INFO)
    if args.ray:
        from omni.scale.serve import cmd_serve_ray  # Ray is imported only here

        return cmd_serve_ray(args)
    model_dir = resolve_model(args.model)
    engine = Engine.load(model_dir, device=args.device, dtype=_dtype(args.dtype), config=engine_config(args))
    config = server_config(args, engine.model.speech is not None)
    try:
        asyncio.run(_serve_until_signal(engine, config))
    finally:
        engine.shutdown()
    return 0


async def _serve_until_signal(engine, config: ServerConfig) -> None:
    server = RealtimeServer(engine, config)
    await server.start()
    host = f"[{config.host}]" if ":" in config.host else config.host
    print(f"omni: serving ws://{host}:{server.port}/v1/realtime", file=sys.stderr, flush=True)
    print(f"omni: serving http://{host}:{server.port}/v1/chat/completions", file=sys.stderr, flush=True)
    if server.ui_mounted:
        print(f"omni: web demo at http://{host}:{server.port}/", file=sys.stderr, flush=True)
    stop = asyncio.get_running_loop().create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, lambda s=sig: stop.done() or stop.set_result(s))
    sig = await stop
    log.info("%s: shutting down", signal.Signals(sig).name)
    await server.shutdown()
    print("omni: server stopped", file=sys.stderr, flush=True)
