"""The web demo in a real browser: Debian's Chromium, headless, driven by playwright, against
`omni serve`'s own app (RealtimeServer with the UI mounted at "/") on a loopback port.

Chromium's fake microphone plays a WAV of espeak-ng speech made here, its fake camera a Y4M
made here. Screenshots go to artifacts/ui/ (git-ignored); OMNI_UI_DOCS_SCREENSHOT=1 also
refreshes docs/ui.png for the README.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import shutil
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from omni import embedded
from omni.types import Audio, Image, Text, Video
from streaming.engine import Engine, EngineBusy, EngineConfig
from streaming.protocol import SessionConfig
from streaming.server import ServerConfig
from tests import media as make
from tests.realtime import Raw, ServerThread
from tests.ui_helpers import CHROMIUM, CHROMIUM_ARGS, speech_wav, y4m

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "artifacts" / "ui"
SESSIONS = 3
REPLY_S = 60  # generous: two cores share the engine, Chromium and the encoder
PLAYING = "() => { const a = document.querySelector('#omni-reply audio'); return a && a.currentTime > 0.3; }"
DONE = "() => /done|cut at the length limit/.test(document.querySelector('#omni-stats').innerText)"
EMPTY = ("() => !document.querySelector('#omni-chat [data-testid=bot], #omni-chat [data-testid=user]') && "
         "/Per-turn timings appear here/.test(document.querySelector('#omni-stats').innerText)")
# after a clear, records anything of the old conversation that comes back: a message, timings, speech playing
WATCH = """() => { window.omniStale = []; window.omniWatch = setInterval(() => {
    const chat = document.querySelector('#omni-chat');
    if (chat.querySelector('[data-testid=bot], [data-testid=user]')) window.omniStale.push('chat: ' + chat.innerText);
    if (!/Per-turn timings appear here/.test(document.querySelector('#omni-stats').innerText))
        window.omniStale.push('stats: ' + document.querySelector('#omni-stats').innerText);
    if ([...document.querySelectorAll('#omni-reply audio')].some(a => !a.paused))
        window.omniStale.push('audio playing');
}, 50); }"""
CLEARED_S = 3.0  # how long a cleared page is watched for a late update from the old conversation


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium chromium-driver ffmpeg")
    os.environ["OMNI_CACHE"] = str(tmp_path_factory.mktemp("omni_cache"))
    eng = Engine.load(embedded.ensure(), config=EngineConfig(max_sessions=SESSIONS, max_context=4096,
                                                             max_new_tokens=40, max_codes=150))
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def server(engine):
    srv = ServerThread(engine, ServerConfig(port=0, ui=True, defaults=SessionConfig(turn_detection=None)))
    assert srv.server.ui_mounted
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def devices(tmp_path_factory):
    d = tmp_path_factory.mktemp("devices")
    # the silence after the words ends the turn (server VAD) and outlasts the reply, so the looping
    # fake microphone does not barge in during the test
    return speech_wav(d / "mic.wav", "Hello! What can you see on my camera?", silence_s=12.0), y4m(d / "cam.y4m")


@pytest.fixture(scope="module")
def browser(devices):
    from playwright.sync_api import sync_playwright

    wav, cam = devices
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS + [
            "--autoplay-policy=no-user-gesture-required", f"--use-file-for-fake-audio-capture={wav}",
            f"--use-file-for-fake-video-capture={cam}"])
        yield b
        b.close()


class Page:
    """A fresh browser context on the demo, recording console errors and every request's address."""

    def __init__(self, browser, url: str):
        self.ctx = browser.new_context(viewport={"width": 1280, "height": 1000})
        self.page = self.ctx.new_page()
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(f"page error: {e}"))
        self.ctx.on("request", lambda r: self.requests.append(r.url))
        self.page.on("websocket", lambda ws: self.requests.append(ws.url))
        self.page.goto(url)
        self.page.wait_for_selector("#omni-input textarea", timeout=30000)

    def foreign(self) -> list[str]:
        """Requests to anything but this machine."""
        return [u for u in self.requests if not u.startswith(("data:", "blob:"))
                and urlsplit(u).hostname not in ("127.0.0.1", "localhost", "::1")]

    def assert_clean(self) -> None:
        assert not self.errors, f"console errors: {self.errors}"
        assert not self.foreign(), f"requests that left the machine: {self.foreign()}"

    def send(self, text: str, *files: Path) -> None:
        if files:
            self.page.set_input_files("#omni-input input[type=file]", [str(f) for f in files])
            self.page.wait_for_function("n => document.querySelectorAll('#omni-input .thumbnail-item').length >= n",
                                        arg=len(files), timeout=15000)
        box = self.page.locator("#omni-input textarea")
        box.fill(text)
        box.press("Enter")

    def bot(self) -> list[str]:
        return self.page.locator("#omni-chat [data-testid=bot]").all_inner_texts()

    def wait_reply_text(self, n: int = 1, timeout: float = REPLY_S) -> str:
        """The n-th assistant message once it has some transcript text."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            bots = self.bot()
            if len(bots) >= n and bots[n - 1].strip() not in ("", "…"):
                return bots[n - 1]
            time.sleep(0.1)
        raise AssertionError(f"no reply text after {timeout} s; chat: {self.bot()}; notice: {self.notice()}")

    def wait_text(self, selector: str, text: str, timeout: float = REPLY_S) -> None:
        self.page.locator(selector).get_by_text(text).first.wait_for(timeout=timeout * 1000)

    def clear(self) -> None:
        """Clear conversation: the page empties, and nothing of the old conversation comes back (watched a while)."""
        self.page.locator("#omni-clear").click()
        self.page.wait_for_function(EMPTY, timeout=20000)
        self.page.evaluate(WATCH)
        self.page.wait_for_timeout(CLEARED_S * 1000)
        stale = self.page.evaluate("() => { clearInterval(window.omniWatch); return window.omniStale; }")
        assert not stale, f"the cleared page showed the old conversation again: {stale[:3]}"

    def notice(self) -> str:
        return self.page.locator("#omni-notice").inner_text()

    def shot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / name
        self.page.screenshot(path=str(path), full_page=True)
        return path

    def close(self) -> None:
        self.ctx.close()


@pytest.fixture
def page(browser, server):
    p = Page(browser, f"http://127.0.0.1:{server.port}/")
    yield p
    p.close()


def test_page_loads_offline_and_names_the_model(page, server):
    page.page.wait_for_timeout(1500)  # late requests (fonts, analytics) would show up by now
    note = page.page.locator("#omni-note").inner_text()
    assert "not meaningful" in note and "--model" in note
    assert "embedded-v" in page.page.locator("#omni-model").inner_text()
    assert page.page.locator("#omni-voice input").input_value() == "Chelsie"
    assert "You are Qwen" in page.page.locator("#omni-instructions textarea").input_value()
    assert any(urlsplit(u).path == "/" for u in page.requests)
    # voice and instructions go to the tab's session as session.update
    page.page.locator("#omni-voice input").click()
    page.page.get_by_role("option", name="Ethan").click()
    page.page.locator("#omni-instructions textarea").fill("Answer in one short sentence.")
    page.page.locator("#omni-apply").click()
    deadline = time.monotonic() + 20
    while not any(s.cfg.voice == "Ethan" and s.cfg.instructions == "Answer in one short sentence."
                  for s in list(server.server.sessions)):
        assert time.monotonic() < deadline, [(s.cfg.voice, s.cfg.instructions) for s in server.server.sessions]
        time.sleep(0.1)
    page.assert_clean()
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=10) as r:  # same port
        assert r.read().strip() == b"ok"

    async def realtime():  # the websocket API is not shadowed by the page mounted at "/"
        ws = await Raw.connect(server.url)
        try:
            assert (await ws.recv())["type"] == "session.created"
        finally:
            await ws.close()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # playwright's sync API holds this thread's loop
        pool.submit(asyncio.run, asyncio.wait_for(realtime(), 30)).result()


def test_typed_message_with_image_is_written_and_spoken(page, server, tmp_path):
    img = tmp_path / "pattern.png"
    img.write_bytes(make.encode_image(make.pattern_image(56, 84)))
    turns = len(server.turns)
    page.send("What is in this picture?", img)
    text = page.wait_reply_text()
    assert text.strip()
    # the reply's speech plays in the page while it streams: the audio element's clock advances
    page.page.wait_for_function(PLAYING, timeout=REPLY_S * 1000)
    page.wait_text("#omni-stats", "typed")
    page.page.wait_for_function(DONE, timeout=REPLY_S * 1000)
    # what reached the engine: the picture (as an image) and the text, through the realtime session
    parts = server.turns[turns]
    assert [type(p) for p in parts] == [Image, Text] and parts[0].source.shape == (56, 84, 3)
    user = page.page.locator("#omni-chat [data-testid=user]")
    assert user.locator("img").count() == 1 and "What is in this picture?" in user.last.inner_text()
    page.shot("typed_reply.png")
    page.assert_clean()


def test_spoken_turn_with_camera_gets_a_reply(page, server):
    turns = len(server.turns)
    p = page.page
    p.locator("#omni-cam").get_by_text("Click to Access Webcam").click()
    p.locator("#omni-cam button.capture-button").click(timeout=15000)  # start streaming frames
    p.wait_for_timeout(1000)  # a couple of frames before the words end
    p.locator("#omni-mic").get_by_role("button", name="Record").click(timeout=15000)
    page.wait_text("#omni-chat", "(spoken turn", timeout=REPLY_S)
    page.wait_reply_text()
    page.page.wait_for_function(PLAYING, timeout=REPLY_S * 1000)
    page.wait_text("#omni-stats", "spoken")
    page.page.wait_for_function(DONE, timeout=REPLY_S * 1000)
    parts = server.turns[turns]
    # the speech arrived as audio (alone, with still frames, or inside a video with its sound)
    audio = [p for p in parts if isinstance(p, Audio)] + [p.audio for p in parts if isinstance(p, Video)]
    frames = sum(1 for p in parts if isinstance(p, Image)) + sum(len(p.source) for p in parts if isinstance(p, Video))
    assert len(audio) == 1 and frames >= 1, parts
    seconds = len(audio[0].source if isinstance(audio[0], Audio) else audio[0]) / 16000
    assert 1.0 < seconds < 6.0
    shot = page.shot("spoken_reply.png")
    p.locator("#omni-mic").get_by_role("button", name="Stop").click()
    if os.environ.get("OMNI_UI_DOCS_SCREENSHOT"):
        assert shot.stat().st_size < 300_000, shot.stat().st_size
        shutil.copy(shot, ROOT / "docs" / "ui.png")
    page.assert_clean()


def test_stop_cancels_the_reply_in_progress(page, server):
    cancelled = server.server.metrics.responses["cancelled"]
    page.send("Tell me a very long story about the sea.")
    page.wait_reply_text()
    page.page.locator("#omni-stop").click()
    page.wait_text("#omni-chat", "(stopped)", timeout=15)
    page.wait_text("#omni-stats", "stopped", timeout=15)
    assert server.server.metrics.responses["cancelled"] == cancelled + 1
    assert page.page.evaluate("() => [...document.querySelectorAll('#omni-reply audio')].every(a => a.paused)")
    # the conversation goes on after a stop
    page.send("And now a short one.")
    page.wait_reply_text(2)
    page.assert_clean()


def test_clear_during_and_right_after_a_reply_leaves_a_fresh_conversation(page, server):
    sessions, cancelled = {s.id for s in server.server.sessions}, server.server.metrics.responses["cancelled"]
    page.send("Tell me a very long story about the sea.")
    page.wait_reply_text()
    page.clear()  # while the reply is still written and spoken
    assert server.server.metrics.responses["cancelled"] == cancelled + 1  # it was: closing the session ended it
    assert {s.id for s in server.server.sessions} - sessions  # a fresh session behind the page
    page.send("Say one word.")
    page.wait_reply_text()
    page.page.wait_for_function(DONE, timeout=REPLY_S * 1000)
    page.clear()  # the moment the reply has finished on the page
    # the new conversation works and shows only itself
    page.send("Hello again.")
    page.wait_reply_text()
    page.page.wait_for_function(DONE, timeout=REPLY_S * 1000)
    assert page.page.locator("#omni-chat [data-testid=user]").all_inner_texts() == ["Hello again."]
    assert len(page.bot()) == 1
    assert page.page.locator("#omni-stats tbody tr").count() == 1
    page.assert_clean()


def test_errors_show_on_the_page_and_it_stays_usable(page, browser, server, engine, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nthis is not really a picture")
    page.send("Look at this", bad)
    page.page.wait_for_function("() => /undecodable image/.test(document.querySelector('#omni-notice').innerText)",
                                timeout=20000)
    assert not page.bot()  # nothing was sent to the model
    page.page.reload()  # a fresh tab: the failed message (and its attachment) stayed in the box for fixing
    page.page.wait_for_selector("#omni-input textarea", timeout=30000)
    noise = tmp_path / "broken.wav"
    noise.write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot audio at all")
    page.send("And listen to this", noise)
    page.page.wait_for_function("() => /could not read broken.wav/.test("
                                "document.querySelector('#omni-notice').innerText)", timeout=20000)
    page.page.reload()
    page.page.wait_for_selector("#omni-input textarea", timeout=30000)
    clip = make.write_video(tmp_path / "clip.mp4", seconds=2.0, fps=10, height=64, width=96, audio=True)
    turns = len(server.turns)
    page.send("What happens in this clip?", clip)
    page.wait_reply_text()
    kinds = [type(p) for p in server.turns[turns]]  # frames at 2 per second, the sound track, the text
    assert kinds.count(Image) >= 2 and kinds[-2:] == [Audio, Text], kinds
    page.assert_clean()

    # every engine slot taken: a new tab says so, and works once a slot is free again
    deadline = time.monotonic() + 60
    while engine.active_conversations > 1:  # the reloaded tabs' sessions end when gradio sees them gone
        assert time.monotonic() < deadline, f"{engine.active_conversations} conversations still open"
        time.sleep(0.2)
    held = []
    while True:  # until the engine refuses (slots of closed tabs free up a moment after they close)
        try:
            held.append(engine.open_conversation())
        except EngineBusy:
            break
        assert len(held) <= SESSIONS
    other = Page(browser, f"http://127.0.0.1:{server.port}/")
    try:
        other.page.wait_for_function("() => /session limit/.test(document.querySelector('#omni-notice').innerText)",
                                     timeout=20000)
        for c in held:
            c.close()
        held = []
        other.page.wait_for_timeout(3500)  # the tab retries at most every 3 s
        other.send("Is there room now?")
        other.wait_reply_text()
        other.assert_clean()
    finally:
        for c in held:
            c.close()
        other.close()


def test_with_an_api_key_the_page_asks_for_it(engine):
    import http.cookiejar
    import urllib.error
    import urllib.parse
    import urllib.request

    srv = ServerThread(engine, ServerConfig(port=0, ui=True, api_key="sesame"))
    try:
        base = f"http://127.0.0.1:{srv.port}"
        jar = http.cookiejar.CookieJar()
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
        with pytest.raises(urllib.error.HTTPError) as e:
            opener.open(f"{base}/gradio_api/login_check", timeout=10)
        assert e.value.code == 401
        for password, code in (("wrong", 400), ("sesame", 200)):
            form = urllib.parse.urlencode({"username": "me", "password": password}).encode()
            try:
                code_got = opener.open(f"{base}/login", data=form, timeout=10).status
            except urllib.error.HTTPError as err:
                code_got = err.code
            assert code_got == code, password
        assert opener.open(f"{base}/gradio_api/login_check", timeout=10).status == 200
    finally:
        srv.stop()


def test_the_embedded_qwen3_speaks_on_the_page(browser, server):
    """The same page on the other family: its own default voice, no fixed system prompt, speech that plays."""
    q3 = embedded.ensure(size=embedded.size_of("embedded:qwen3-omni"))  # in the cache the engine fixture set
    eng = Engine.load(q3, config=EngineConfig(max_sessions=1, max_context=4096, max_new_tokens=20, max_codes=60))
    srv = ServerThread(eng, ServerConfig(port=0, ui=True, defaults=SessionConfig(turn_detection=None)))
    page = Page(browser, f"http://127.0.0.1:{srv.port}/")
    try:
        assert page.page.locator("#omni-voice input").input_value() == "Ethan"
        assert page.page.locator("#omni-instructions textarea").input_value() == ""
        assert "Qwen3-Omni" in page.page.locator("#omni-note").inner_text()
        page.send("Tell me a story.")
        assert page.wait_reply_text().strip()
        page.page.wait_for_function(PLAYING, timeout=REPLY_S * 1000)
        page.page.wait_for_function(DONE, timeout=REPLY_S * 1000)
        page.shot("qwen3_reply.png")
        page.assert_clean()
    finally:
        page.close()
        srv.stop()
        eng.shutdown()
