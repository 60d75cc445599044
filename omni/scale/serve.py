"""`omni serve --ray`: the whole app on Ray Serve, one replica per GPU (or per CPU thread budget).

    omni serve --ray [--address auto] --replicas 4 --model DIR --device cuda     # or --autoscale 1:8

Each replica is the app `omni serve` runs in one process (streaming/server.py's RealtimeServer: the
Realtime websocket, chat completions, /healthz, /metrics) with its own engine, built in the replica
by the same factories (`engine_config`, `server_config`). Serve's proxy (on `--host:--port`) forwards
each request to a replica; a websocket stays on the replica it reached for its whole life, so a
session's KV cache is always local.

Admission: Serve's `max_ongoing_requests` is the engine's `max_sessions` plus OPS_HEADROOM. The router
sends each request to the less loaded of two replicas (an open websocket counts as one ongoing
request), so sessions spread; when every engine slot of the chosen replica is taken, that replica
refuses exactly as a single server does (an `error` event and close 1013; HTTP 429). The headroom is
what lets /healthz, /metrics and those refusals through when every slot is taken; without it they
would queue in the proxy behind sessions that last minutes. Past the headroom the proxy queues at
most `max_queued_requests`, then answers 503: never a silent hang.

/healthz and /metrics on any replica answer for every replica: each replica posts its counters to a
small status actor once a second, and the answer labels each replica's samples `replica="..."`.

Drain: a replica Serve stops (scale-down, redeploy, shutdown) sees it within DRAIN_POLL_S and does
what SIGTERM does to one server: refuse new work (503), cancel running responses (each still ends
with response.done), close every websocket with 1001. Serve's `graceful_shutdown_timeout_s` is the
idle timeout plus a margin, so even a session the drain missed ends by its idle timeout before Serve
would drop it.

The web demo runs in its own one-replica application at /demo/ (the app's "/" redirects there):
Gradio keeps each tab's state in its process and drives it with separate HTTP requests (queue/join,
then queue/data), which Serve would spread over replicas.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import signal
import sys
import time
from dataclasses import dataclass

import ray
from ray import serve
from ray.serve.api import RunTarget

from omni.scale.cluster import NAMESPACE, connect, free_port, thread_env
from streaming.metrics import engine_metrics
from streaming.server import RealtimeServer

log = logging.getLogger("omni.ray")

APP = "omni"  # the API application, at "/"
DEMO_APP = "omni-demo"  # the web demo, at DEMO_PREFIX
DEMO_PREFIX = "/demo"
BOARD = "omni-status"  # the named actor replicas post their counters to
OPS_HEADROOM = 4  # ongoing requests past max_sessions: /healthz, /metrics, refusals
QUEUED = 16  # requests the proxy holds when every replica is past its headroom; then 503
REPORT_S = 1.0  # how often a replica posts its counters
STALE_S = 5.0  # a replica silent this long is left out of /healthz and /metrics
DRAIN_POLL_S = 0.2
HTTP_GRACE_S = 2.0  # in a drain, HTTP requests still running this long after the sessions closed are ended


@dataclass(frozen=True)
class ReplicaSpec:
    args: dict  # `omni serve`'s parsed flags (engine_config / server_config read them)
    threads: int  # torch threads on the CPU
    ui: bool  # this replica serves the web demo
    demo: bool  # a demo application runs beside this one ("/" redirects to it)


@ray.remote(num_cpus=0)
class StatusBoard:
    """The replicas' latest counters: {replica: (time, app, metrics text, summary)}."""

    def __init__(self):
        self.reports: dict = {}

    def report(self, replica: str, app: str, text: str, summary: dict) -> None:
        self.reports[replica] = (time.time(), app, text, summary)

    def forget(self, replica: str) -> None:
        self.reports.pop(replica, None)

    def snapshot(self) -> dict:
        now = time.time()
        self.reports = {k: v for k, v in self.reports.items() if now - v[0] < STALE_S}
        return dict(self.reports)


def _board(create: bool = False):
    if create:
        # detached, as Serve's applications are: it lives until undeploy(), not until this driver's handle goes
        return StatusBoard.options(name=BOARD, namespace=NAMESPACE, get_if_exists=True, lifetime="detached").remote()
    try:
        return ray.get_actor(BOARD, namespace=NAMESPACE)
    except ValueError:
        return None


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?( .*)$")


def label(line: str, replica: str) -> str:
    """A Prometheus sample line with `replica="..."` added to its labels."""
    m = _SAMPLE.match(line)
    if not m:
        return line
    name, labels, value = m.groups()
    inner = labels[1:-1] if labels else ""
    return f'{name}{{replica="{replica}"{"," + inner if inner else ""}}}{value}'


def merge_metrics(texts: dict[str, str]) -> str:
    """Several replicas' Prometheus texts as one: each family's HELP/TYPE once, then every replica's
    samples of it, labelled by replica."""
    families: dict[str, list[str]] = {}  # family -> header lines, in first-seen order
    samples: dict[str, list[str]] = {}
    for replica, text in sorted(texts.items()):
        fam = None
        for line in text.splitlines():
            if line.startswith("# "):
                parts = line.split(" ", 3)
                if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                    fam = parts[2]
                    head = families.setdefault(fam, [])
                    if line not in head:
                        head.append(line)
                    samples.setdefault(fam, [])
                continue
            if line.strip():
                samples.setdefault(fam, []).append(label(line, replica))
    out = []
    for fam, head in families.items():
        out += head + samples.get(fam, [])
    return "\n".join(out) + "\n"


class ReplicaServer(RealtimeServer):
    """One replica's app: the single-process server, plus the cluster-wide /healthz and /metrics, the
    drain Serve's stop triggers, and "/" leading to the demo application."""

    def __init__(self, engine, config, replica: str, app: str, demo: bool):
        self.replica, self.app_name, self.demo = replica, app, demo
        super().__init__(engine, config)
        self.asgi = _Tracked(self.app)  # what Serve serves: the app, with its HTTP requests in flight known
        self._tasks: list[asyncio.Task] = []
        self._drained: asyncio.Task | None = None

    async def drain(self, timeout: float = 10.0) -> None:
        """The single server's drain, then an end to HTTP requests that never end by themselves (the web
        demo's event streams): Serve waits for every ongoing request before it lets a replica go."""
        await super().drain(timeout)
        await self.asgi.end_all(grace=HTTP_GRACE_S)

    def _build_app(self):
        app = super()._build_app()
        if self.demo and not self.config.ui:
            from starlette.responses import RedirectResponse
            from starlette.routing import Route

            async def to_demo(request):
                return RedirectResponse(DEMO_PREFIX + "/", 307)

            app.router.routes.insert(0, Route("/", to_demo, methods=["GET", "HEAD"]))
        return app

    def summary(self) -> dict:
        m, e = self.metrics, self.engine
        with m.lock:
            ttfa = (m.ttfa.sum, m.ttfa.count)
        return {"sessions": e.active_conversations, "max_sessions": e.config.max_sessions,
                "waiting": len(getattr(e, "_waiting", ())),  # turns queued for their prefill in the engine
                "ttfa_sum": ttfa[0], "ttfa_count": ttfa[1], "app": self.app_name, "actor": _actor_name()}

    def own_metrics(self) -> str:
        s = self.summary()
        return self.metrics.render() + engine_metrics(self.engine.stats()) + (
            "# HELP omni_session_slots engine slots (max_sessions)\n# TYPE omni_session_slots gauge\n"
            f"omni_session_slots {s['max_sessions']}\n"
            "# HELP omni_turns_waiting turns queued in the engine for their prefill\n"
            f"# TYPE omni_turns_waiting gauge\nomni_turns_waiting {s['waiting']}\n")

    async def _everyone(self) -> dict:
        board = _board()
        reports = {}
        if board is not None:
            try:
                reports = await asyncio.wait_for(board.snapshot.remote(), 5)
            except Exception as e:
                log.warning("the status board did not answer (%s); this replica's figures only", e)
        reports[self.replica] = (time.time(), self.app_name, self.own_metrics(), self.summary())
        return reports

    async def health_text(self) -> str:
        lines = ["ok"]
        for rid, (_, app, _, s) in sorted((await self._everyone()).items()):
            ttfa = f"{s['ttfa_sum'] / s['ttfa_count']:.3f} s mean over {s['ttfa_count']}" if s["ttfa_count"] else "-"
            lines.append(f"replica {rid} ({app}): sessions {s['sessions']}/{s['max_sessions']}, "
                         f"waiting {s['waiting']}, time to first audio {ttfa}")
        return "\n".join(lines) + "\n"

    async def metrics_text(self) -> str:
        return merge_metrics({rid: r[2] for rid, r in (await self._everyone()).items()})

    def start_background(self) -> None:
        self._tasks = [asyncio.create_task(self._report()), asyncio.create_task(self._watch_stop())]

    async def _report(self) -> None:
        board = None
        while True:
            try:
                board = board or _board(create=True)  # under a Serve config (KubeRay) no driver made it
                if board is not None:
                    await board.report.remote(self.replica, self.app_name, self.own_metrics(), self.summary())
            except Exception:
                board = None
            await asyncio.sleep(REPORT_S)

    async def _watch_stop(self) -> None:
        while not _serve_stopping():
            await asyncio.sleep(DRAIN_POLL_S)
        log.info("replica %s: Serve is stopping it; draining %d sessions", self.replica, len(self.sessions))
        await self.drain_once()

    def drain_once(self) -> asyncio.Task:
        if self._drained is None:
            self._drained = asyncio.ensure_future(self.drain(timeout=10.0))
        return self._drained

    async def close(self) -> None:
        await self.drain_once()
        for t in self._tasks:
            t.cancel()
        board = _board()
        if board is not None:
            try:
                await asyncio.wait_for(board.forget.remote(self.replica), 2)
            except Exception:
                pass


class _Tracked:
    """An ASGI app whose HTTP requests in flight can be ended: each runs in a task of its own, which
    end_all() cancels; a cancelled request's response just ends (or is a 503 when it had not started)."""

    def __init__(self, app):
        self.app, self.tasks = app, set()
        self._ended: set = set()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracked_send(msg):
            nonlocal started
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        task = asyncio.ensure_future(self.app(scope, receive, tracked_send))
        self.tasks.add(task)
        try:
            await task
        except asyncio.CancelledError:
            if task not in self._ended:
                raise  # the client went away (Serve cancelled this request): as without us
            if not started:
                from starlette.responses import PlainTextResponse

                await PlainTextResponse("the server is shutting down\n", 503)(scope, receive, send)
        finally:
            self.tasks.discard(task)
            self._ended.discard(task)

    async def end_all(self, grace: float) -> None:
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=grace)
        for t in list(self.tasks):
            self._ended.add(t)
            t.cancel()
        await asyncio.sleep(0)


def _actor_name() -> str | None:
    """This replica's actor name in Serve's namespace (an operator's `ray.get_actor(name, namespace="serve")`)."""
    try:
        return ray.get_runtime_context().get_actor_name()
    except Exception:
        return None


def _serve_stopping() -> bool:
    """Whether Serve has begun stopping this replica. Serve has no public hook before it waits for the
    ongoing requests (our websockets) to end, and calls __del__ only after that wait: read the flag its
    replica sets when the stop begins."""
    try:
        w = ray._private.worker.global_worker
        return bool(w.actors[w.actor_id]._replica_impl._shutting_down)
    except Exception:
        return False


@serve.ingress()
class OmniReplica:
    def __init__(self, spec: ReplicaSpec):
        import torch

        from omni.cli import _dtype, resolve_model
        from streaming.engine import Engine
        from streaming.server import engine_config, server_config

        logging.getLogger("omni").setLevel(logging.INFO)
        args = argparse.Namespace(**spec.args)
        if args.device == "cpu":
            torch.set_num_threads(spec.threads)
        ctx = serve.get_replica_context()
        engine = Engine.load(resolve_model(args.model), device=args.device, dtype=_dtype(args.dtype),
                             config=engine_config(args))
        config = server_config(args, engine.model.speech is not None, ui=spec.ui)
        self.server = ReplicaServer(engine, config, ctx.replica_id.unique_id, ctx.app_name, spec.demo)
        self.server.start_background()

    def __serve_build_asgi_app__(self):
        return self.server.asgi

    async def __del__(self):
        await self.server.close()
        self.server.engine.shutdown()


def deployment_options(args, ui: bool = False) -> dict:
    """Serve options for `omni serve`'s flags: replicas or autoscaling, resources, admission, drain."""
    cuda = str(args.device).startswith("cuda")
    opts = dict(
        ray_actor_options={"num_cpus": 1 if cuda else replica_threads(args), "num_gpus": 1 if cuda else 0,
                           "runtime_env": {"env_vars": thread_env(1 if cuda else replica_threads(args))}},
        max_ongoing_requests=args.max_sessions + OPS_HEADROOM, max_queued_requests=QUEUED,
        graceful_shutdown_timeout_s=args.idle_timeout + 15.0, graceful_shutdown_wait_loop_s=0.5,
        health_check_period_s=5.0)
    if ui:
        opts["num_replicas"] = 1
    elif args.autoscale:
        lo, hi = parse_autoscale(args.autoscale)
        opts["autoscaling_config"] = {"min_replicas": lo, "initial_replicas": lo, "max_replicas": hi,
                                      "target_ongoing_requests": max(1.0, 0.75 * args.max_sessions),
                                      "upscale_delay_s": 10.0, "downscale_delay_s": 120.0}
    else:
        opts["num_replicas"] = args.replicas
    return opts


def parse_autoscale(text: str) -> tuple[int, int]:
    from omni.cli import UserError

    try:
        lo, hi = (int(x) for x in text.split(":"))
    except ValueError:
        raise UserError(f"--autoscale takes MIN:MAX (say 1:8); got {text!r}") from None
    if not 0 <= lo <= hi or hi < 1:
        raise UserError(f"--autoscale MIN:MAX needs 0 <= MIN <= MAX and MAX >= 1; got {text!r}")
    return lo, hi


def replica_threads(args) -> int:
    """A replica's torch threads on the CPU: --threads, default 1 under Ray (its Ray CPUs are as many)."""
    return args.threads or 1


def spec_args(args) -> dict:
    return {**{k: v for k, v in vars(args).items() if k != "func"}, "threads": replica_threads(args)}


def api_app(args):
    """The API application (bound, not running) for `omni serve` flags."""
    api = serve.deployment(name="OmniReplica", **deployment_options(args))(OmniReplica)
    return api.bind(ReplicaSpec(spec_args(args), replica_threads(args), ui=False, demo=bool(args.ui)))


def demo_app(args):
    """The web demo's one-replica application (route it at DEMO_PREFIX)."""
    ui = serve.deployment(name="OmniDemo", **deployment_options(args, ui=True))(OmniReplica)
    return ui.bind(ReplicaSpec(spec_args(args), replica_threads(args), ui=True, demo=True))


def _config_args(args: dict):
    import shlex

    from omni.cli import build_parser

    return build_parser().parse_args(["serve", "--ray", *shlex.split(str(args.get("flags", "")))])


def build_api(args: dict):
    """Serve config entry point (`import_path: omni.scale.serve:build_api`, as in docs/kuberay-rayservice.yaml):
    args {"flags": "<omni serve flags>"}, e.g. "--model /models/Qwen2.5-Omni-7B --device cuda --replicas 4"."""
    return api_app(_config_args(args))


def build_demo(args: dict):
    """Serve config entry point for the web demo (route_prefix /demo), the same flags as build_api's."""
    return demo_app(_config_args(args))


def deploy(args, blocking: bool = True) -> dict:
    """Start Serve's proxy on --host:--port and run the API application (and the demo's, with the UI on).
    Ray must be initialised. Returns {"url": ..., "apps": [...]}"""
    port = args.port or free_port(args.host)
    serve.start(http_options={"host": args.host, "port": port})
    _board(create=True)
    targets = [RunTarget(api_app(args), name=APP, route_prefix="/")]
    if args.ui:
        targets.append(RunTarget(demo_app(args), name=DEMO_APP, route_prefix=DEMO_PREFIX))
    apps = [t.name for t in targets]
    # both at once (each replica loads its model in parallel); serve.run_many waits until they run
    serve.run_many(targets, wait_for_applications_running=False)
    if blocking:
        wait_running(apps)
    host = f"[{args.host}]" if ":" in args.host else args.host
    return {"url": f"http://{host}:{port}", "port": port, "apps": apps}


def wait_running(apps: list[str], timeout: float = 600.0) -> None:
    from ray.serve.schema import ApplicationStatus

    deadline = time.monotonic() + timeout
    while True:
        st = serve.status().applications
        states = {a: st[a].status if a in st else None for a in apps}
        if all(s == ApplicationStatus.RUNNING for s in states.values()):
            return
        bad = [a for a, s in states.items() if s in (ApplicationStatus.DEPLOY_FAILED, ApplicationStatus.UNHEALTHY)]
        if bad:
            raise RuntimeError(f"Serve could not start {bad[0]}: {st[bad[0]].message}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"Serve applications not running after {timeout:.0f} s: {states}")
        time.sleep(0.25)


def undeploy(apps: list[str]) -> None:
    """Delete our applications (their replicas drain) and the status board."""
    running = serve.status().applications
    for a in apps:
        if a in running:
            serve.delete(a, _blocking=True)
    board = _board()
    if board is not None:
        ray.kill(board)


def cmd_serve_ray(args) -> int:
    from omni.cli import UserError

    if args.replicas < 1:
        raise UserError(f"--replicas must be at least 1; got {args.replicas}")
    if args.autoscale:
        parse_autoscale(args.autoscale)
    replicas = parse_autoscale(args.autoscale)[1] if args.autoscale else args.replicas
    cuda = str(args.device).startswith("cuda")
    cpus = None if cuda else max(os.cpu_count() or 1, (replicas + bool(args.ui)) * replica_threads(args))
    started = connect(args.address, args.host, num_cpus=cpus)
    stop = {"sig": None}

    def on_signal(sig, frame):  # before the deploy: a SIGTERM while replicas start still drains them
        stop["sig"] = sig

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    info = None
    try:
        info = deploy(args)
        url, ws = info["url"], info["url"].replace("http", "ws", 1)
        print(f"omni: serving {ws}/v1/realtime on Ray Serve ({args.autoscale or args.replicas} replicas)",
              file=sys.stderr, flush=True)
        print(f"omni: serving {url}/v1/chat/completions", file=sys.stderr, flush=True)
        if args.ui:
            print(f"omni: web demo at {url}{DEMO_PREFIX}/", file=sys.stderr, flush=True)
        while stop["sig"] is None:
            time.sleep(0.2)
        log.info("%s: draining the replicas", signal.Signals(stop["sig"]).name)
    finally:
        try:
            undeploy(info["apps"] if info else [APP, DEMO_APP] if args.ui else [APP])
            if started:
                serve.shutdown()
        finally:
            if started:
                ray.shutdown()
    print("omni: server stopped", file=sys.stderr, flush=True)
    return 0
