"""An idle web-demo tab gives its engine slot back after the server's idle timeout, and gets a new session
(saying so on the page) when it is used again. Drives ui.app's handlers on the server's own loop, as gradio
does, without a browser (tests/test_ui.py has the browser)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import pytest

from streaming.engine import Engine, EngineConfig
from streaming.protocol import SessionConfig
from streaming.server import ServerConfig
from tests.realtime import ServerThread

IDLE_S = 1.5


@dataclass
class Request:  # what the handlers read of gradio's request
    session_hash: str


@pytest.fixture(scope="module")
def served(embedded_dir):
    eng = Engine.load(embedded_dir, config=EngineConfig(max_sessions=2, max_context=2048, max_new_tokens=4,
                                                        max_codes=10))
    srv = ServerThread(eng, ServerConfig(port=0, idle_timeout_s=IDLE_S, ui=False,
                                         defaults=SessionConfig(output_modalities=("text",), turn_detection=None)))
    yield eng, srv
    srv.stop()
    eng.shutdown()


def on_loop(srv, coro, timeout=60):
    return asyncio.run_coroutine_threadsafe(coro, srv.loop).result(timeout)


async def settled(eng, n: int) -> int:
    """Engine slots in use once the worker has caught up with closes (at most 5 s)."""
    deadline = time.monotonic() + 5
    while eng.active_conversations != n and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return eng.active_conversations


async def submit(ui, req, text):
    frames = [f async for f in ui.on_submit({"text": text, "files": []}, req)]
    return frames


def test_idle_tab_frees_its_slot_and_reopens_when_used(served):
    from ui.app import OmniUI

    eng, srv = served
    ui = OmniUI(srv.server)
    req, busy = Request("tab-a"), Request("tab-b")

    async def main():
        t = await ui.tab(req)
        assert t.session is not None and eng.active_conversations == 1
        await submit(ui, req, "Hi")  # a reply, then nothing: idle
        assert t.order and t.order[-1].done
        other = await ui.tab(busy)
        first = t.session.id
        deadline = time.monotonic() + IDLE_S + 5
        while t.session is not None and time.monotonic() < deadline:
            await other.ready()  # what every handler of the other tab does first: it is in use
            await asyncio.sleep(0.1)
        assert t.session is None and other.session is not None and await settled(eng, 1) == 1
        assert srv.server.metrics.sessions == 1
        await submit(ui, req, "Hello again")  # used again: a new session, and the page says why
        assert t.session is not None and t.session.id != first
        held = sum(x.session is not None for x in (t, other))  # (the other tab may have gone idle meanwhile)
        assert await settled(eng, held) == srv.server.metrics.sessions == held
        said = [m["content"] for m in t.chat if m["role"] == "assistant"]
        assert any("idle" in m and "new conversation" in m for m in said)
        assert t.order[-1].done and t.order[-1].status in ("completed", "incomplete")
        for key in (req, busy):
            await ui.on_unload(key)
        assert await settled(eng, 0) == 0 and srv.server.metrics.sessions == 0

    on_loop(srv, main())
