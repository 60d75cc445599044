"""The speech decoder as a stage of the engine: a reply's codec codes in, its audio chunks out.

The model's speech part turns codes into waves in windows (`add_codes`, `codes_until_ready`, `vocode`:
Qwen2.5's Token2Wav, Qwen3's Code2Wav). This module runs that decoder in one of two placements behind one
interface (`start`, `codes`, `finish`, `drop`, `behind`), so the engine's worker does not care which:

- `Inline`: the engine's worker runs the ready windows itself, between its Talker steps (every stage on
  one thread). A ready window may wait a few Talker steps for another reply whose window is that close
  (T2W_SLACK codes, T2W_MAX_WAIT steps): both then go through the decoder as one batch.
- `SpeechWorker`: a thread of its own, with its own torch thread budget on the CPU and its own CUDA stream
  (or device). The engine's worker sends each reply's codes as it reads them and the end of its speech;
  the speech worker runs every ready window, batched across replies, and puts the audio chunks on the
  reply's outbox itself. When a reply's last chunk is out it tells the engine (`on_spoken`), which then
  ends the reply, so the reply's final event always follows its audio.

Back-pressure: the engine's Talker does not step a reply that is `behind`: `max_ahead` of its codes sent
and not yet taken in by the decoder (taken in: decoded, or waiting in the decoder's state for the codes
its next window needs). So what waits between the two workers is at most `max_ahead` codes per reply,
however slow the decoder or the reply's consumer (a reply whose consumer is behind is not decoded; its
codes then stay untaken and its Talker pauses).

A dropped reply (cancelled, closed, failed) is forgotten: its queued codes are never decoded, and a chunk
being decoded when the drop came is not sent (the outbox takes nothing after the reply's final event).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from omni.types import AudioDelta
from omni.wav import to_pcm16

log = logging.getLogger("omni.engine")

T2W_SLACK = 4  # inline: a ready window waits for another reply's at most this many codes away ...
T2W_MAX_WAIT = 4  # ... and for at most this many Talker steps


@dataclass(eq=False)
class _Utterance:
    """One reply's speech on the decoder's side."""

    turn: object  # the engine's turn: its outbox (`emit`) and audio counters (`audio_index`, `audio_samples`,
    # `t_first_audio`, written here only) and back-pressure counters (`codes_sent` by the engine, `codes_taken` here)
    vstate: object  # the speech part's vocoder state
    received: int = 0  # codes given to the vocoder state
    finished: bool = False  # no more codes will come
    waited: int = 0  # inline: Talker steps a ready window has waited for company


class _Stage:
    def __init__(self, speech, max_ahead: int):
        self.speech, self.max_ahead = speech, max(1, max_ahead)
        self.busy_s = 0.0  # seconds spent decoding
        self._utts: dict[object, _Utterance] = {}  # by turn (compared by identity); owned by the thread that decodes

    def behind(self, t) -> bool:
        """Whether the reply's Talker must wait for the decoder (max_ahead codes sent and not taken in)."""
        return t.codes_sent - t.codes_taken >= self.max_ahead

    def _start(self, t, vstate) -> None:
        self._utts[t] = _Utterance(t, vstate)

    def _codes(self, t, codes: list) -> None:
        u = self._utts.get(t)
        if u is not None:
            self.speech.add_codes(u.vstate, codes)
            u.received += len(codes)

    def _finish(self, t) -> None:
        u = self._utts.get(t)
        if u is not None:
            u.finished = u.vstate.finished = True

    def _ready(self) -> list[_Utterance]:
        return [u for u in self._utts.values() if self.speech.codes_until_ready(u.vstate) == 0]

    def _decode(self, utts: list[_Utterance]) -> list:
        """Run the ready windows of `utts` as one batch and send their chunks; returns the turns whose speech
        is now all out (and forgets them)."""
        t0 = time.perf_counter()
        chunks = self.speech.vocode([u.vstate for u in utts])
        self.busy_s += time.perf_counter() - t0
        spoken = []
        for u, waves in zip(utts, chunks):
            t = u.turn
            for wave in waves:
                if not t.emit.put(AudioDelta(to_pcm16(wave), self.speech.sample_rate, t.audio_index)):
                    break  # the reply has ended (dropped meanwhile): nothing more goes out
                if t.t_first_audio is None:
                    t.t_first_audio = time.perf_counter()
                t.audio_samples += wave.numel()
                t.audio_index += 1
            if u.finished:
                del self._utts[t]
                spoken.append(t)
        return spoken

    def _take_in(self) -> None:
        """Codes waiting for more of their kind count as taken in (the back-pressure counter)."""
        for u in self._utts.values():
            if self.speech.codes_until_ready(u.vstate) > 0:
                u.turn.codes_taken = u.received

    def stats(self) -> dict:
        return {"utterances": len(self._utts), "busy_s": self.busy_s}


class Inline(_Stage):
    """The engine's worker decodes, between its Talker steps (see the module's docstring)."""

    def behind(self, t) -> bool:
        return False  # it decodes in the same loop as the Talker steps: it cannot fall behind

    def start(self, t, vstate) -> None:
        t.codes_sent = t.codes_taken = 0
        self._start(t, vstate)

    def codes(self, t, codes: list) -> None:
        t.codes_sent += len(codes)
        self._codes(t, codes)

    def finish(self, t) -> None:
        self._finish(t)

    def drop(self, t) -> None:
        self._utts.pop(t, None)

    def run(self) -> list:
        """Decode what is ready (a ready window may wait for company); the turns whose speech is all out."""
        utts = list(self._utts.values())
        need = {u: self.speech.codes_until_ready(u.vstate) for u in utts}
        ready = [u for u in utts if need[u] == 0]
        soon = [u for u in utts if 0 < need[u] <= T2W_SLACK and not u.finished]
        spoken = []
        if ready and soon and all(u.waited < T2W_MAX_WAIT and not u.finished for u in ready):
            for u in ready:
                u.waited += 1
        elif ready:
            for u in ready:
                u.waited = 0
            spoken = self._decode(ready)
        self._take_in()
        return spoken

    def close(self, timeout: float) -> None:
        pass


class SpeechWorker(_Stage):
    """The decoder on a thread of its own (see the module's docstring). `on_spoken(turn)`: the reply's speech
    is all out; `on_failed(turn, message)`: its decoding failed (both called on this worker's thread)."""

    def __init__(self, speech, max_ahead: int, on_spoken, on_failed, threads: int | None = None,
                 main_device: torch.device | None = None, device: torch.device | None = None):
        super().__init__(speech, max_ahead)
        self.on_spoken, self.on_failed, self.threads = on_spoken, on_failed, threads
        self._main_cuda = main_device is not None and main_device.type == "cuda"
        self.device = device
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="omni-speech", daemon=True)
        self._thread.start()

    # --- the engine's worker ---

    def _send(self, *msg) -> None:
        ready = None
        if self._main_cuda:  # what the message refers to was queued on the engine's stream: wait for it there
            ready = torch.cuda.Event()
            ready.record()
        self._inbox.put((ready, *msg))

    def start(self, t, vstate) -> None:
        t.codes_sent = t.codes_taken = 0
        self._send("start", t, vstate)

    def codes(self, t, codes: list) -> None:
        t.codes_sent += len(codes)
        self._send("codes", t, codes)

    def finish(self, t) -> None:
        self._send("finish", t)

    def drop(self, t) -> None:
        self._send("drop", t)

    def close(self, timeout: float) -> None:
        self._stop.set()
        self._inbox.put((None, "wake"))
        self._thread.join(timeout)

    # --- this worker ---

    def _apply(self, msg, stream) -> None:
        ready, kind, *args = msg
        if ready is not None and stream is not None:
            stream.wait_event(ready)
        if kind == "start":
            self._start(*args)
        elif kind == "codes":
            self._codes(*args)
        elif kind == "finish":
            self._finish(*args)
        elif kind == "drop":
            self._utts.pop(args[0], None)

    def _take(self, timeout: float | None, stream) -> None:
        try:
            msg = self._inbox.get(timeout=timeout) if timeout else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._apply(msg, stream)
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _run(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        stream = None
        if self.device is not None and self.device.type == "cuda":
            if self.device.index is not None:
                torch.cuda.set_device(self.device)
            stream = torch.cuda.Stream(self.device)
        idle = None
        with torch.inference_mode(), (torch.cuda.stream(stream) if stream is not None else nullcontext()):
            while not self._stop.is_set():
                ready = []
                try:
                    self._take(idle, stream)
                    ready = [u for u in self._ready() if not u.turn.emit.full()]
                    spoken = self._decode(ready) if ready else []
                    if stream is not None:
                        stream.synchronize()
                    for t in spoken:
                        self.on_spoken(t)
                    self._take_in()
                except Exception as e:  # the replies in this batch fail; the worker and the others go on
                    log.exception("speech decoder failed")
                    for u in ready:  # (one already reported spoken keeps its end: the engine takes the first word)
                        self._utts.pop(u.turn, None)
                        self.on_failed(u.turn, f"{type(e).__name__}: {e}")
                # nothing to do: wait for the engine (briefly while a consumer is behind: it reads on its own)
                idle = None if ready else (0.002 if self._ready() else 0.1)
