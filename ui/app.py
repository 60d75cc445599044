"""The web demo: a Gradio page at "/" of `omni serve`, a thin client of the realtime Session.

    mount_ui(app, server)   # the server's FastAPI app; `server` is its RealtimeServer

Each browser tab gets one `streaming.session.Session` on its own engine Conversation, built the
way the websocket server builds them, and drives it with the client events a websocket client
would send: `input_audio_buffer.append` (microphone PCM, 16 kHz), `input_image_buffer.append`
(camera frames, JPEG), `conversation.item.create` (typed text and attached files),
`input_audio_buffer.commit` + `response.create` (the "end turn" button; otherwise the server's VAD
ends spoken turns), `response.cancel`, `session.update` (voice, instructions). The page renders
the server events the Session sends back: transcript deltas into the chat, audio deltas into a
streaming player, `response.done` into per-turn timings, `error` into a notice. No second
inference path: what the page shows is what a websocket client would get.

Gradio runs async handlers on the server's event loop, where the Session and its response tasks
live. A spoken turn starts its reply inside a microphone chunk's handler; that handler sets a
`gr.State` whose change starts the same `_play` generator that typed turns use.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import logging
import mimetypes
import os
import shutil
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no phoning home

import gradio as gr  # noqa: E402

from ui.tab import INPUT_RATE, OUTPUT_RATE, Tab, jpeg, pcm16, wav  # noqa: E402

log = logging.getLogger("omni.ui")

FRAME_EVERY_S = 0.5  # camera frames at 2 per second: the model's video rate
MIC_EVERY_S = 0.25  # microphone chunk period
VIDEO_FRAMES = 8  # an attached video becomes at most this many frames (2 per second) plus its sound
PLAY_WAIT_S = 5.0  # how long the player waits for a reply to appear after a turn ended
FIRST_AUDIO_BYTES = int(0.2 * OUTPUT_RATE) * 2  # a reply's first chunk to the player: enough for AAC frames
FIRST_SEGMENT_WAIT_S = 2.0  # how long the player's stream waits for its encoder's first frames

CSS = """
#omni-note {border-left: 4px solid #d97706; padding: 0.4em 0.8em; background: #fffbeb; color: #78350f}
#omni-notice:not(:empty) {color: #b91c1c}
#omni-stats table {font-size: 0.85em}
"""
STOP_JS = "(...a) => { document.querySelectorAll('#omni-reply audio').forEach(e => e.pause()); return a; }"


def reply_player(**kw) -> gr.Audio:
    """The streamed reply player: a gr.Audio whose stream is never announced to the page empty.

    Gradio encodes a streamed chunk to AAC in an ffmpeg process and gives the page the stream's playlist
    with the first chunk; it waits only 0.1 s for the encoder's first frames. On a busy machine ffmpeg is not
    up by then, the page loads a playlist with no segments, and its HLS player reports a fatal error (then
    recovers). So this player's first chunk waits for its frames. (Gradio is pinned: `_encode_chunk` is its
    own; the instance's method is wrapped, since a subclass makes gradio write a .pyi beside this file.)
    """
    from gradio.audio_stream_encoder import segment_from_frames
    from gradio.components.audio import _stream_encoders

    player = gr.Audio(streaming=True, **kw)
    encode = player._encode_chunk

    def encode_first_whole(output_id: str, data: bytes):
        slot = _stream_encoders.get(output_id)
        first = slot is not None and slot.encoder is None
        chunk = encode(output_id, data)
        if chunk is None and first and slot.encoder is not None:
            chunk = segment_from_frames(slot.encoder, slot.encoder.take(timeout=FIRST_SEGMENT_WAIT_S))
        return chunk

    player._encode_chunk = encode_first_whole
    return player


class OmniUI:
    def __init__(self, server):
        self.server = server
        self.engine = server.engine
        model = self.engine.model
        self.speech = model.speech is not None and bool(model.voices)
        self.voices = list(getattr(server, "voices", ()) or getattr(model, "voices", {}) or [])
        self.default_voice = (model.default_voice if model.default_voice in self.voices
                              else (self.voices[0] if self.voices else None))
        self.tabs: dict[str, Tab] = {}
        self.idle_s = float(getattr(server.config, "idle_timeout_s", 600.0))  # as for a websocket session
        self._sweeper: asyncio.Task | None = None

    def new_session(self, send):
        """A Session on a new engine Conversation, as the websocket server builds one (raises EngineBusy)."""
        from streaming.engine import EngineBusy
        from streaming.protocol import Dialect
        from streaming.session import Session

        srv = self.server
        c = srv.config
        if getattr(srv, "closing", False):
            raise EngineBusy("the server is shutting down")
        try:
            conv = self.engine.open_conversation()
        except EngineBusy:
            srv.metrics.refused()
            srv.metrics.error("server_busy")
            raise
        s = Session(conv, send, dialect=Dialect(False), model_name=c.model_name, defaults=c.defaults,
                    limits=c.limits, metrics=srv.metrics, voices=tuple(self.voices),
                    on_turn=getattr(srv, "on_turn", None))
        srv.sessions.add(s)
        srv.metrics.session_opened()
        log.info("ui: session %s open", s.id)
        return s

    async def close_session(self, s) -> None:
        srv = self.server
        await s.close()
        if s in srv.sessions:
            srv.sessions.discard(s)
            srv.metrics.session_closed()
        log.info("ui: session %s closed", s.id)

    def model_info(self) -> str:
        from omni import embedded

        model = self.engine.model
        path = Path(getattr(model, "path", "") or "?")
        cfg = self.engine.config
        speech = (f"speech out with voices {', '.join(self.voices)}" if self.speech
                  else "text out only (this checkpoint has no talker/voices)")
        shown = str(path).replace("`", "'")
        line = (f"**Model:** `{shown}` · {speech} · up to {cfg.max_sessions} sessions, "
                f"{cfg.max_new_tokens} tokens per reply")
        if embedded.is_embedded(path):
            family = getattr(model, "family", "model")
            line += ("\n\n<div id='omni-note'>⚠️ This is an <b>embedded</b> model: a tiny, randomly "
                     f"initialised {family} made by this project so every code path runs with no download. "
                     "<b>Its replies are not meaningful.</b> For real answers restart with a real checkpoint: "
                     "<code>omni serve --model /path/to/checkpoint</code> (add "
                     "<code>--device cuda</code> on a GPU).</div>")
        return line

    async def tab(self, request) -> Tab:
        key = request.session_hash  # one per browser tab (gradio injects the request by the annotation)
        if self._sweeper is None or self._sweeper.done():  # on the server's loop, where the sessions live
            self._sweeper = asyncio.create_task(self._sweep(), name="omni-ui idle sweep")
        t = self.tabs.get(key)
        if t is None:
            t = self.tabs[key] = Tab(self)
            await t.ready()
        return t

    async def _sweep(self) -> None:
        """Close the sessions of tabs left idle for the server's idle timeout, so an open but forgotten
        page does not hold an engine slot; such a tab opens a new session when it is used again."""
        while not getattr(self.server, "closing", False):
            await asyncio.sleep(min(5.0, max(0.05, self.idle_s / 4)))
            for t in [t for t in list(self.tabs.values()) if t.idle(self.idle_s)]:
                log.info("ui: session %s idle for %.0f s; closing it", t.session.id, self.idle_s)
                try:
                    await t.release()
                except Exception:  # one tab's failure must not stop the sweep
                    log.exception("ui: closing an idle session failed")

    def build(self):
        family = getattr(self.engine.model, "family", "omni")
        with gr.Blocks(title=f"omni: {family}", analytics_enabled=False) as demo:
            gr.Markdown(f"## omni · talk to {family}\nSpeak (microphone, camera optional) or type with "
                        "attachments; the reply is spoken while it is being written.")
            gr.Markdown(self.model_info(), elem_id="omni-model")
            notice = gr.Markdown("", elem_id="omni-notice")
            trigger = gr.State(0)  # a spoken turn started a reply: its change runs the player
            mic_notice = gr.State("")  # errors from microphone chunks (shown without a stream's progress timer)
            with gr.Row():
                with gr.Column(scale=3):
                    chat = gr.Chatbot(label="Conversation", height=420, elem_id="omni-chat")
                    msg = gr.MultimodalTextbox(
                        placeholder="Type a message; attach an image, an audio or a video file",
                        file_types=["image", "audio", "video"], file_count="multiple", sources=["upload"],
                        show_label=False, elem_id="omni-input")
                    with gr.Row():
                        stop = gr.Button("Stop reply", variant="stop", elem_id="omni-stop")
                        clear = gr.Button("Clear conversation", elem_id="omni-clear")
                    stats = gr.Markdown("", elem_id="omni-stats")
                with gr.Column(scale=2):
                    player = reply_player(label="Reply (speech)", autoplay=True, interactive=False,
                                      elem_id="omni-reply", visible=self.speech)
                    mic = gr.Audio(sources=["microphone"], streaming=True, type="numpy",
                                   label="Microphone (the turn ends when you pause)", elem_id="omni-mic")
                    cam = gr.Image(sources=["webcam"], streaming=True, type="numpy", label="Camera",
                                   elem_id="omni-cam", height=240)
                    end_turn = gr.Button("End my turn", elem_id="omni-end-turn")
                    voice = gr.Dropdown(self.voices, value=self.default_voice, label="Voice",
                                        interactive=bool(self.voices), elem_id="omni-voice")
                    instructions = gr.Textbox(label="Instructions (system prompt)", lines=3,
                                              elem_id="omni-instructions")
                    apply = gr.Button("Apply instructions", elem_id="omni-apply", size="sm")

            shown = [chat, stats, notice]
            played = [chat, player, stats, notice]
            kw = dict(concurrency_limit=None, show_progress="hidden")
            demo.load(self.on_load, None, shown + [instructions], **kw)
            demo.unload(self.on_unload)
            msg.submit(self.on_submit, [msg], [msg] + played, **kw)
            end_turn.click(self.on_end_turn, None, played, **kw)
            trigger.change(self.on_play, None, played, trigger_mode="once", **kw)
            mic.stream(self.on_mic, [mic], [trigger, mic_notice], stream_every=MIC_EVERY_S, time_limit=None, **kw)
            mic_notice.change(lambda v: v, [mic_notice], [notice], **kw)
            cam.stream(self.on_frame, [cam], None, stream_every=FRAME_EVERY_S, time_limit=None, **kw)
            stop.click(self.on_stop, None, [notice], js=STOP_JS, **kw)
            clear.click(self.on_clear, None, shown + [player], **kw)
            voice.change(self.on_voice, [voice], [notice], **kw)
            apply.click(self.on_instructions, [instructions], [notice], **kw)
        return demo

    def _shown(self, t: Tab) -> tuple:
        return list(t.chat), t.stats(), t.notice

    async def on_load(self, request: gr.Request):
        t = await self.tab(request)
        s = t.session
        instr = None
        if s is not None:
            instr = s.cfg.instructions or s.conv.default_system
        return *self._shown(t), instr

    async def on_unload(self, request: gr.Request):
        t = self.tabs.pop(request.session_hash, None)
        if t is not None:
            await t.close()

    async def _attachments(self, t: Tab, files: list) -> list[dict] | None:
        """Attached files -> content parts (None with a notice when one cannot be read)."""
        from omni import media

        content = []
        for f in files:
            path = f if isinstance(f, str) else (f.get("path") if isinstance(f, dict) else getattr(f, "path", None))
            name = Path(path).name
            mime = mimetypes.guess_type(path)[0] or ""
            try:
                if mime.startswith("image/"):
                    raw = await asyncio.to_thread(Path(path).read_bytes)
                    content.append({"type": "input_image",
                                    "image_url": f"data:{mime};base64,{base64.b64encode(raw).decode()}"})
                elif mime.startswith("audio/"):
                    x = await asyncio.to_thread(media.load_audio, path, INPUT_RATE)
                    content.append({"type": "input_audio", "audio": base64.b64encode(pcm16(x)).decode()})
                elif mime.startswith("video/"):
                    # The protocol has no video content: up to VIDEO_FRAMES frames (2 per second) and the sound.
                    v = await asyncio.to_thread(media.load_video, path, 2.0, 2, VIDEO_FRAMES)
                    for fr in v.frames:
                        b = await asyncio.to_thread(jpeg, fr)
                        content.append({"type": "input_image",
                                        "image_url": f"data:image/jpeg;base64,{base64.b64encode(b).decode()}"})
                    if v.audio is not None and len(v.audio):
                        content.append({"type": "input_audio", "audio": base64.b64encode(pcm16(v.audio)).decode()})
                else:
                    t.notice = f"{name}: not an image, audio or video file ({mime or 'unknown type'})"
                    return None
            except media.MediaError as e:
                t.notice = f"could not read {name}: {e}"
                return None
        return content

    async def _to_page(self, t: Tab, frames):
        """A handler's frames (its output tuples) for the page, as long as `t` is the page's tab.

        Clear conversation runs alongside the handlers streaming to the page, and gradio works on a
        yielded frame (postprocessing, audio encoding) before it queues it for the page and asks for the
        next: a frame yielded just before Clear could land after Clear's empty page. So `t.close()` waits
        until no frame is between its yield and the next request (`t.sending`), and a closed tab's frames
        are dropped. The last frame changes nothing: gradio sends a generator's last frame again when it
        ends, which would bring an old page back if the tab closed meanwhile.
        """
        async with contextlib.aclosing(frames):
            async for out in frames:
                if t.closed:
                    break
                t.sending += 1
                try:
                    yield out
                finally:
                    t.sending -= 1
        yield gr.skip()

    async def on_submit(self, value, request: gr.Request):
        t = await self.tab(request)
        async for out in self._to_page(t, self._submit(t, value)):
            yield out

    async def _submit(self, t: Tab, value):
        value = value or {}
        text, files = (value.get("text") or "").strip(), value.get("files") or []
        if not await t.ready() or (not text and not files):
            yield gr.skip(), *self._frame(t)
            return
        if t.session.responding:
            t.notice = "A reply is still playing: stop it first (or wait for it to end)."
            yield gr.skip(), *self._frame(t)
            return
        t.notice = ""
        content = await self._attachments(t, files)
        if content is None:
            yield gr.skip(), *self._frame(t)
            return
        if text:
            content.append({"type": "input_text", "text": text})
        if not await t.send("conversation.item.create", item={"type": "message", "role": "user", "content": content}):
            yield gr.skip(), *self._frame(t)
            return
        for f in files:
            path = f if isinstance(f, str) else f.get("path")
            t.chat.append({"role": "user", "content": {"path": path}})
        if text:
            t.chat.append({"role": "user", "content": text})
        t.turn_end, t.next_source = time.perf_counter(), "typed"
        if not await t.send("response.create"):
            yield None, *self._frame(t)
            return
        first = True
        async for out in self._play(t):
            yield (None if first else gr.skip()), *out
            first = False

    def _frame(self, t: Tab, audio=None) -> tuple:
        chat, stats, notice = self._shown(t)
        return chat, gr.skip() if audio is None else audio, stats, notice

    async def _play(self, t: Tab):
        """Stream the newest reply no player has taken: its text into the chat as it is written, its speech
        into the player as it comes; then any newer reply (a spoken turn that barged in) in the same stream."""
        r, deadline = None, time.monotonic() + PLAY_WAIT_S
        while not t.closed:  # once cleared (or gone) the tab's reply never finishes
            nxt = next((x for x in reversed(t.order) if x.id not in t.playing), None)
            if nxt is not None:
                r = nxt
                t.playing.add(r.id)
            elif r is None or r.done and r.sent >= len(r.pcm):
                if r is not None or time.monotonic() > deadline or t.session is None or not t.session.responding:
                    yield self._frame(t)
                    return
            new = r.pcm[r.sent:] if r is not None else []
            if r is not None and r.sent == 0 and not r.done and sum(map(len, new)) < FIRST_AUDIO_BYTES:
                new = []  # a first chunk too short for the encoder to emit a frame from would open an empty stream
            if r is not None:
                r.sent += len(new)
            yield self._frame(t, wav(b"".join(new)) if new else None)
            await t.changed(0.25)

    async def on_play(self, request: gr.Request):
        t = await self.tab(request)
        async for out in self._to_page(t, self._play(t)):
            yield out

    async def on_end_turn(self, request: gr.Request):
        t = await self.tab(request)
        async for out in self._to_page(t, self._end_turn(t)):
            yield out

    async def _end_turn(self, t: Tab):
        if not await t.ready():
            yield self._frame(t)
            return
        if not t.session.responding:
            t.notice = ""
            if not await t.send("input_audio_buffer.commit"):
                yield self._frame(t)
                return
            t.turn_end, t.next_source = time.perf_counter(), "spoken"
            if not await t.send("response.create"):
                yield self._frame(t)
                return
        async for out in self._play(t):
            yield out

    async def on_mic(self, chunk, request: gr.Request):
        t = await self.tab(request)
        if chunk is None or not await t.ready():
            return gr.skip(), t.notice
        rate, x = chunk
        pcm = t.resample(int(rate), np.asarray(x))
        errors = t.errors
        if pcm:
            await t.send("input_audio_buffer.append", audio=base64.b64encode(pcm).decode())
        r = t.session.response if t.session is not None else None  # None: cleared meanwhile
        if r is not None and r.id not in t.playing and r.task is not None and not r.task.done():
            t.trigger += 1  # a VAD turn started a reply: the trigger's change plays it
        else:
            r = None
        return (t.trigger if r is not None else gr.skip()), (t.notice if t.errors != errors else gr.skip())

    async def on_frame(self, frame, request: gr.Request):
        t = await self.tab(request)
        if frame is None or not await t.ready():
            return
        b = await asyncio.to_thread(jpeg, np.asarray(frame))
        if await t.send("input_image_buffer.append", image=base64.b64encode(b).decode()):
            t.frames += 1

    async def on_stop(self, request: gr.Request):
        t = await self.tab(request)
        if t.session is not None and t.session.responding:
            t.notice = ""
            await t.send("response.cancel")
        else:
            t.notice = "There is no reply in progress to stop."
        return t.notice

    async def on_clear(self, request: gr.Request):
        t = await self.tab(request)
        await t.close()  # returns once no frame of the old conversation can land after this handler's
        if self.tabs.get(request.session_hash) is t:  # (a second click finds the first one's fresh tab)
            self.tabs[request.session_hash] = Tab(self)
        fresh = await self.tab(request)
        await fresh.ready()
        return *self._shown(fresh), None

    async def on_voice(self, v, request: gr.Request):
        t = await self.tab(request)
        if v and await t.ready():
            t.notice = ""
            await t.send("session.update", session={"type": "realtime", "audio": {"output": {"voice": v}}})
        return t.notice

    async def on_instructions(self, text, request: gr.Request):
        t = await self.tab(request)
        if await t.ready():
            t.notice = ""
            if await t.send("session.update", session={"type": "realtime", "instructions": text or ""}):
                if t.session is not None and t.session.conv.turns:
                    t.notice = ("Instructions updated; the conversation already started, so they are given "
                                "with your next turn (clear the conversation to make them the system prompt).")
        return t.notice


def theme():
    # System fonts only: the default theme's fonts would be fetched as files; nothing leaves the machine.
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "Segoe UI", "Helvetica", "Arial", "sans-serif"],
                             font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"])


def build_ui(server):
    """The Gradio Blocks for `server` (anything with .engine, .config, .metrics, .sessions, .voices)."""
    return OmniUI(server).build()


def ffmpeg_on_path() -> str:
    """The `ffmpeg` executable Gradio's streamed audio will run (it encodes the player's AAC with one).

    A machine without one gets the static build the imageio-ffmpeg wheel ships (a dependency), linked as
    `ffmpeg` into a folder of omni's cache that goes first on this process's PATH: nothing to install by hand.
    """
    found = shutil.which("ffmpeg")
    if found:
        return found
    import imageio_ffmpeg

    from omni.embedded import cache_dir

    exe = Path(imageio_ffmpeg.get_ffmpeg_exe())
    bin_dir = cache_dir().parent / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    link = bin_dir / "ffmpeg"
    if not link.exists() or link.resolve() != exe.resolve():
        tmp = bin_dir / f".ffmpeg.{os.getpid()}"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(exe)
        tmp.replace(link)  # atomic: two servers starting at once both end with a working link
    os.environ["PATH"] = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
    log.info("ui: using the ffmpeg of imageio-ffmpeg (%s) for the page's streamed audio", exe)
    return str(link)


def mount_ui(app, server, path: str = "/") -> None:
    """Serve the page at `path` of the FastAPI `app`. Mount it after the app's own routes: a mount at "/"
    matches every path, so routes added after it are never reached."""
    ffmpeg_on_path()
    key = getattr(server.config, "api_key", None)

    def auth(user: str, password: str) -> bool:  # the page drives the engine like the API, so it takes the same key
        return hmac.compare_digest(password.encode(), key.encode())

    gr.mount_gradio_app(app, build_ui(server), path=path, theme=theme(), css=CSS, footer_links=[],
                        ssr_mode=False, mcp_server=False, run_history=False, show_error=True, auth=auth if key else None,
                        auth_message="This server needs its API key: enter it as the password (any user name).")
