"""`omni serve --ray`: the app on a real local Ray Serve (2 replicas), driven through Serve's proxy by raw
websockets and the openai SDK. Every Realtime event is validated against the SDK's types."""

from __future__ import annotations

import asyncio
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
from openai import RateLimitError

from omni.cli import build_parser
from tests.ray_local import local_ray
from tests.realtime import Raw
from tests.test_http_api import KEY, chunks, client, stream_text

SLOTS = 2  # per replica: 2 replicas hold 4 sessions
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray's own pydantic v1-style fields


def test_without_ray_flag_ray_is_not_imported():
    import subprocess
    import sys

    code = ("import sys; from omni.cli import build_parser; p = build_parser(); "
            "[p.parse_args(a) for a in (['serve'], ['caption', 'x', '--out', 'o.jsonl'], ['bench', 'serve', '--ray'])]; "
            "import streaming.server, omni.jobs.caption, omni.bench; assert 'ray' not in sys.modules, 'ray imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def serve_args(*extra: str):
    return build_parser().parse_args(
        ["serve", "--ray", "--replicas", "2", "--port", "0", "--max-sessions", str(SLOTS), "--max-new-tokens", "512",
         "--max-context", "2048", "--api-key", KEY, "--modalities", "text", *extra])


def test_the_kuberay_example_is_a_valid_serve_config_of_our_builders():
    import importlib

    import yaml
    from ray.serve.deployment import Application
    from ray.serve.schema import ServeDeploySchema

    doc = yaml.safe_load((Path(__file__).resolve().parents[1] / "docs" / "kuberay-rayservice.yaml").read_text())
    config = ServeDeploySchema.model_validate(yaml.safe_load(doc["spec"]["serveConfigV2"]))
    assert [a.route_prefix for a in config.applications] == ["/", "/demo"]
    for a in config.applications:
        module, name = a.import_path.split(":")
        app = getattr(importlib.import_module(module), name)(a.args)
        assert isinstance(app, Application)


@pytest.fixture(scope="module")
def cluster(embedded_dir):  # embedded_dir first: $OMNI_CACHE is set before Ray's workers inherit the environment
    with local_ray() as ray:
        yield ray


@pytest.fixture(scope="module")
def served(cluster):
    from omni.scale import serve as oserve

    info = oserve.deploy(serve_args())
    yield SimpleNamespace(**info, ws=info["url"].replace("http", "ws", 1) + "/v1/realtime?model=omni")
    if info["apps"][0] in cluster_apps():  # test_shutdown_drains deletes them itself
        oserve.undeploy(info["apps"])


def cluster_apps() -> list[str]:
    from ray import serve

    return list(serve.status().applications)


def run(coro, timeout=120):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.read().decode()


def replica_sessions(served) -> dict[str, int]:
    """replica -> open sessions, from /metrics (every replica's figures, whichever replica answers)."""
    out = {}
    for line in get(served.url + "/metrics").splitlines():
        if line.startswith("omni_sessions{"):
            out[line.split('replica="')[1].split('"')[0]] = int(line.rsplit(" ", 1)[1])
    return {r: n for r, n in out.items() if r not in demo_replicas()}


def demo_replicas() -> set[str]:
    import ray

    from omni.scale import serve as oserve

    return {r for r, v in ray.get(oserve._board().snapshot.remote()).items() if v[1] == oserve.DEMO_APP}


async def wait_sessions(served, want: list[int], timeout: float = 10) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while True:
        got = await asyncio.to_thread(replica_sessions, served)
        if sorted(got.values()) == want or time.monotonic() > deadline:
            return got
        await asyncio.sleep(0.3)


async def session(served) -> Raw:
    c = await Raw.connect(served.ws, key=KEY)
    assert (await c.recv())["type"] == "session.created"
    return c


async def turn(c: Raw, text: str, **response) -> list[dict]:
    await c.send(type="conversation.item.create",
                 item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]})
    await c.send(type="response.create", **({"response": response} if response else {}))
    return await c.until("response.done")


def test_four_sessions_two_turns_stay_on_their_replicas(served):
    async def main():
        cs = [await session(served) for _ in range(4)]
        try:
            spread = await wait_sessions(served, [2, 2])
            assert sorted(spread.values()) == [2, 2], spread  # both replicas hold sessions

            async def two_turns(c):
                first = (await turn(c, "Hello there!", max_output_tokens=8))[-1]["response"]
                second = (await turn(c, "And again?", max_output_tokens=8))[-1]["response"]
                return first, second

            for first, second in await asyncio.gather(*(two_turns(c) for c in cs)):
                assert first["status"] in ("completed", "incomplete") and first["usage"]["output_tokens"] > 0
                assert first["usage"]["input_token_details"]["cached_tokens"] == 0
                # turn 2 reused this session's KV cache: it reached the same replica's engine
                assert second["usage"]["input_token_details"]["cached_tokens"] > 0
        finally:
            for c in cs:
                await c.close()
        assert sorted((await wait_sessions(served, [0, 0])).values()) == [0, 0]

    run(main())


def test_sse_chat_completion_streams_through_serve(served):
    c = client(SimpleNamespace(port=served.port))
    cs = chunks(c.chat.completions.create(model="omni", stream=True, max_completion_tokens=6,
                                          messages=[{"role": "user", "content": "Hello there!"}]))
    assert len(cs) >= 3 and stream_text(cs)
    assert cs[-1].choices[0].finish_reason in ("stop", "length")


def test_web_demo_is_one_replica_of_its_own_behind_the_key(served):
    from gradio_client import Client

    assert cluster_apps() == ["omni", "omni-demo"] or sorted(cluster_apps()) == ["omni", "omni-demo"]
    with urllib.request.urlopen(served.url + "/", timeout=30) as r:  # "/" of the API leads to the demo
        assert r.geturl() == served.url + "/demo/" and b"<html" in r.read(2000).lower()
    with pytest.raises(Exception):  # the page takes the API key as its password, as without Ray
        Client(served.url + "/demo/", verbose=False)
    c = Client(served.url + "/demo/", auth=("user", KEY), verbose=False)
    assert "/on_submit" in c.view_api(return_format="dict", print_info=False)["named_endpoints"]
    health = get(served.url + "/healthz")
    assert "(omni-demo)" in health and health.count("(omni)") == 2, health


def test_key_and_capacity_refusals_are_the_single_server_ones(served):
    async def main():
        with pytest.raises(Exception, match="401"):
            await Raw.connect(served.ws)  # no key: 401 before the upgrade, through the proxy
        cs = [await session(served) for _ in range(2 * SLOTS)]
        try:
            await wait_sessions(served, [SLOTS, SLOTS])
            extra = await Raw.connect(served.ws, key=KEY)
            ev = await extra.recv()
            assert ev["type"] == "error" and ev["error"]["code"] == "server_busy"
            await extra.ws.wait_closed()
            assert extra.ws.close_code == 1013
            with pytest.raises(RateLimitError):  # HTTP: 429, as from one server
                await asyncio.to_thread(client(SimpleNamespace(port=served.port)).chat.completions.create,
                                        model="omni", messages=[{"role": "user", "content": "Hi"}])
            for _ in range(30):  # ops requests still get through (each replica reports every REPORT_S: poll)
                text = await asyncio.to_thread(get, served.url + "/healthz")
                if text.count(f"sessions {SLOTS}/{SLOTS}") == 2:
                    break
                await asyncio.sleep(0.3)
            assert text.startswith("ok\n") and text.count(f"sessions {SLOTS}/{SLOTS}") == 2, text
            assert "omni_sessions_refused_total" in await asyncio.to_thread(get, served.url + "/metrics")
        finally:
            for c in cs:
                await c.close()
        await wait_sessions(served, [0, 0])

    run(main())


def test_a_stopped_replica_closes_its_sessions_cleanly(served, cluster):
    """Stop one replica the way Serve's scale-down does (its graceful shutdown): its sessions get their
    response.done and a 1001 close; the other replica's sessions carry on."""
    from omni.scale import serve as oserve

    async def main():
        cs = [await session(served) for _ in range(4)]
        await wait_sessions(served, [2, 2])
        board = cluster.get(oserve._board().snapshot.remote())
        victim = sorted(r for r, v in board.items() if v[1] == oserve.APP)[0]
        for c in cs:  # long replies, so each replica has responses running when the stop comes
            await c.send(type="conversation.item.create", item={"type": "message", "role": "user", "content": [
                {"type": "input_text", "text": "Tell me a long story."}]})
            await c.send(type="response.create", response={"max_output_tokens": 160})
        for c in cs:
            await c.until("response.created")
        actor = cluster.get_actor(board[victim][3]["actor"], namespace="serve")
        stopping = actor.perform_graceful_shutdown.remote()

        async def outcome(c):
            try:
                done = await c.until("response.done", timeout=60)
                await asyncio.wait_for(c.ws.wait_closed(), 2)
                return done[-1]["response"], c.ws.close_code
            except asyncio.TimeoutError:
                return None, None  # still open: the other replica's session

        results = await asyncio.gather(*(outcome(c) for c in cs))
        closed = [(r, code) for r, code in results if code is not None]
        assert len(closed) == 2, results
        for r, code in closed:
            assert code == 1001 and r["status"] == "cancelled"
        alive = [c for c, (r, code) in zip(cs, results) if code is None]
        assert len(alive) == 2
        for c in alive:  # its reply ran to its end meanwhile; a new turn works
            assert (await turn(c, "Still there?", max_output_tokens=8))[-1]["response"]["status"] in (
                "completed", "incomplete")
            await c.close()
        await asyncio.to_thread(cluster.get, stopping, timeout=60)
        cluster.kill(actor)  # what the controller does after a graceful stop (it then starts a replacement)

    run(main(), timeout=180)


def test_shutdown_drains_every_session(served):
    """Deleting the applications (what `omni serve --ray` does on SIGTERM) closes live sessions with 1001,
    with a web demo page's event streams open too, and does not wait out Serve's graceful timeout."""
    from gradio_client import Client

    from omni.scale import serve as oserve

    async def main():
        c = Client(served.url + "/demo/", auth=("user", KEY), verbose=False)
        c.submit(api_name="/on_load")  # a page's queue stream, open while it is shut down
        cs = [await session(served) for _ in range(2)]
        t0 = time.monotonic()
        await asyncio.to_thread(oserve.undeploy, served.apps)
        took = time.monotonic() - t0
        for x in cs:
            await asyncio.wait_for(x.ws.wait_closed(), 5)
            assert x.ws.close_code == 1001
        assert took < 30, took
        with pytest.raises(urllib.error.URLError):
            get(served.url + "/healthz")

    run(main(), timeout=120)
