"""The engine: a worker thread owns the model and the device; asyncio callers talk to it.

    engine = Engine.load(model_dir, device="cpu", config=EngineConfig(max_sessions=8))
    conv = engine.open_conversation(voice="Chelsie")
    async for event in conv.respond([Text("Hi")], modalities=("text",)):
        ...  # TextDelta | AudioDelta | Done | Error
    conv.cancel(); conv.close()

Every conversation owns one KV-cache slot for its whole life, so a new turn prefills only its
new tokens. Each worker iteration admits at most one new prompt (prefill) and then runs one
batched decode step for every active response, each at its own position and slot, so a
conversation joining or leaving does not stall the others. Media decoding and featurising run
on a small thread pool before a turn reaches the worker. Events flow back through one bounded
queue per response; a response whose consumer falls behind is paused, never dropped.

The text side runs one step ahead of the host: a sampled token stays on the device and feeds the
next decode step from there, while its value is copied to the host without waiting (pinned
memory, an event) and read one step later, when the device is busy with the next step. So a
decode step never waits for the device on CUDA. A stop token is fed one step too early and is
taken out of the cache again when it is read. The speech part's Talker does the same with its codes
(`speech.step` returns the codes of the step before); its codec end is seen a step late, and the code
drawn after it is never spoken.

Stages and placement: the Thinker and the Talker run on the engine's worker; the speech decoder (the
speech part's vocoder: Token2Wav, Code2Wav) runs on a speech worker of its own by default, fed the codes
as the Talker's are read and putting the audio on each reply's outbox itself (streaming/speech_stage.py:
back-pressure, cancel, errors). On the CPU the two split the thread budget (`threads`, `speech_threads`);
on CUDA the speech worker has its own stream, or its own device (`speech_device`). With
`speech_worker=False` (the CPU's default) the engine's worker runs every stage in turn: on a CPU the
decoder of a small model is mostly Python dispatch under the GIL, so beside a busy Thinker/Talker thread
it runs ~1.5x slower (measured on the embedded default), more than the second core gives back.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Sequence

import torch

from omni.cache import KVCache
from omni.layers import to_device
from omni.media import MediaError
from omni.pipeline import OmniModel, SpeechError, Voice, _Detokenizer, generators
from omni.processor import Prompt
from omni.sampling import SamplingParams, sample
from omni.types import Done, Error, Event, Message, Part, Text, TextDelta, ThinkerStep
from streaming.speech_stage import Inline, SpeechWorker

log = logging.getLogger("omni.engine")


class EngineBusy(RuntimeError):
    """No free conversation slot, or the engine's inbox is full."""


@dataclass(frozen=True)
class EngineConfig:
    max_sessions: int = 8  # conversations at once (KV-cache slots)
    max_context: int = 8192  # tokens per conversation, history included
    max_new_tokens: int = 512  # default reply length limit
    max_codes: int = 1500  # speech length limit per reply in codec tokens (the speech part's codec_hz per second) ...
    max_audio_s: float | None = None  # ... or in seconds of speech, when set (then max_codes is ignored)
    greedy: bool = False  # the default for turns that ask for no sampling: every stage takes its most likely token
    events_buffered: int = 64  # per response: the worker pauses a response whose consumer is this far behind
    inbox_size: int = 256  # pending commands (turns, cancels, closes)
    preprocess_threads: int = 2  # media decoding / featurising, off the worker and off the event loop
    speech_worker: bool | None = None  # the speech decoder on a worker of its own; None: on CUDA yes, on the CPU
    # no (measured there: the two workers contend for Python's GIL and lose more than the second core brings)
    threads: int | None = None  # CPU threads of the engine's workers together (None: torch's count, i.e. the cores)
    speech_threads: int | None = None  # of those, the speech worker's (None: half, at least 1)
    speech_device: str | None = None  # the speech decoder's device (None: the model's; on CUDA its own stream)
    speech_ahead_s: float = 2.0  # back-pressure: a reply's Talker waits while this much of its speech waits for the
    # speech worker


@dataclass(eq=False)  # identity: turns and conversations are looked up in lists
class _Conv:
    """Worker-side state of one conversation: its slot and what its cache holds."""

    slot: int
    system: str | None
    voice: str | None
    next_position: object = 0  # rotary position of the next token to enter the cache (the model's kind: an int,
    # or the model's own position object)
    pending: list[int] = field(default_factory=list)  # produced but not yet in the cache
    closed_reply: bool = True  # whether the last reply ended with <|im_end|>
    seen: torch.Tensor | None = None  # (V,) bool: tokens in the history (repetition penalty)
    turns: int = 0
    media_held: dict = field(default_factory=lambda: {"audio": 0, "image": 0})  # such tokens in the cache
    # (ids, embeds, hidden, positions) of everything in the cache, for the Talker's prefill, which
    # covers the whole conversation (as a fresh run's would); None when the model cannot speak
    speech_memory: object = None  # what the speech part keeps of the conversation (its `remember_*`), or None


@dataclass(eq=False)
class _Turn:
    conv: _Conv
    prompt: Prompt
    sampling: SamplingParams
    generator: torch.Generator | None
    max_new_tokens: int
    emit: "_Outbox"
    max_output_tokens: int | None = None  # text and codec tokens together (the protocols' output limit)
    t_submit: float = 0.0
    cancelled: str | None = None  # reason once cancelled
    # The text side runs one step ahead of the host: a sampled token stays on the device, is fed to
    # the next decode step from there, and its value reaches the host (to emit, to stop) one step later.
    sampled: torch.Tensor | None = None  # (1,) sampled, not yet fed
    sampled_value: int | None = None  # its value, once read on the host
    sampled_iter: int = -1  # the worker iteration that sampled it
    sampled_count: int = 0  # tokens sampled so far
    seen_before: torch.Tensor | None = None  # (1,) bool: whether the repetition penalty knew it before
    # (embeds, hidden, positions, token, seen_before) of the step that fed the last sampled token, until its
    # value is read
    fed: tuple | None = None
    prefilled: bool = False
    pos: object = 0  # as _Conv.next_position
    generated: int = 0
    detok: _Detokenizer | None = None
    reasoning: bool = False  # inside the model's reasoning block (its think_ids): deltas are marked, not the answer
    reasoning_detok: _Detokenizer | None = None
    reasoning_tokens: int = 0
    first_token_at: float | None = None
    t_prefill: float = 0.0
    cached: int = 0  # history tokens reused from the cache
    kinds: dict | None = None  # {"text", "audio", "image"} tokens of the new prompt
    cached_kinds: dict | None = None  # the same for the history reused from the cache
    text_done: bool = False
    status: str = "completed"
    speech: bool = False
    voice: Voice | None = None
    talker_sampling: SamplingParams | None = None
    talker_generator: torch.Generator | None = None
    noise_generator: torch.Generator | None = None
    talker_prompt: object = None  # the speech part's prompt of this reply (its `talker_prompt`)
    talker: object = None  # the speech part's codec state once the first reply token is fed (finished, codes,
    # unread); its vocoder state goes to the speech stage
    min_new_tokens: int = 0
    min_codes: int = 0
    audio_index: int = 0  # these three are the speech stage's (streaming/speech_stage.py)
    audio_samples: int = 0
    t_first_audio: float | None = None
    codes_sent: int = 0  # codes given to the speech stage, and those it has taken in (its back-pressure)
    codes_taken: int = 0
    speech_ended: bool = False  # the speech stage was told the speech ends
    spoken: bool = False  # the speech stage has sent all of it
    speech_cut: bool = False  # the speech was stopped by a limit (max_codes or max_output_tokens)
    done: asyncio.Event = field(default_factory=asyncio.Event)  # set (on the loop) after the last event


def _inside(ids: list[int], open_id: int, close_id: int) -> bool:
    """Whether `ids` end inside an open block (the last `open_id` after the last `close_id`)."""
    last = {open_id: -1, close_id: -1}
    for i, x in enumerate(ids):
        if x in last:
            last[x] = i
    return last[open_id] > last[close_id]


class _Outbox:
    """Workers -> asyncio: a bounded event queue plus a count the workers read for back-pressure.

    The response's final event seals it: what the speech worker decodes after a cancel is not sent."""

    def __init__(self, loop: asyncio.AbstractEventLoop, limit: int):
        self.loop, self.limit = loop, limit
        self.q: asyncio.Queue = asyncio.Queue()
        self.outstanding = 0
        self.sealed = False
        self.lock = threading.Lock()

    def put(self, ev: Event, final: bool = False) -> bool:
        """Queue `ev` (False, and nothing queued, once the final event is in)."""
        with self.lock:
            if self.sealed:
                return False
            self.outstanding += 1
            self.sealed = final
            self.call(self.q.put_nowait, ev)  # under the lock: the final event goes after every other
        return True

    def call(self, fn, *args) -> None:
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the caller's event loop is gone: nobody is left to deliver to
            pass

    def full(self) -> bool:
        return self.outstanding >= self.limit

    async def get(self) -> Event:
        ev = await self.q.get()
        with self.lock:
            self.outstanding -= 1
        return ev


@dataclass
class _Unread:
    """Tokens sampled in one worker iteration, copied to the host without waiting; read a step later."""

    turns: list[_Turn]
    host: torch.Tensor
    ready: object = None  # torch.cuda.Event on CUDA

    @classmethod
    def start(cls, sampled: list[tuple[_Turn, torch.Tensor]]) -> "_Unread":
        turns = [t for t, _ in sampled]
        tokens = torch.cat([tok for _, tok in sampled])
        if tokens.device.type != "cuda":
            return cls(turns, tokens)
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return cls(turns, host, ready)

    def values(self) -> list[int]:
        if self.ready is not None:
            self.ready.synchronize()  # the copy was queued a whole step ago
        return self.host.tolist()


def _codes(t: _Turn) -> int:
    """Codes the turn's Talker has drawn: those read, and those still on their way to the host."""
    return len(t.talker.codes) + len(t.talker.unread) if t.talker is not None else 0


def _room(t: _Turn) -> int:
    """Output tokens (text and codes) the turn may still make under its max_output_tokens.

    Codes not read yet count: one may prove to be the codec's end, which gives its place back (`_spent`)."""
    if t.max_output_tokens is None:
        return 1 << 30
    return t.max_output_tokens - t.sampled_count - _codes(t)


def _spent(t: _Turn) -> bool:
    """Whether the output budget is spent for certain: not while a code in flight may still be the codec's end."""
    return _room(t) <= 0 and not (t.talker is not None and t.talker.unread)


def continuation_text(closed_reply: bool) -> str:
    """What goes between the last reply's tokens and the next turn in the chat template.

    A reply that ended by itself left its <|im_end|> pending (sampled, not fed); one cut short
    (length limit, cancel) needs the <|im_end|> written out. Either way a newline follows.
    """
    return "\n" if closed_reply else "<|im_end|>\n"


class Conversation:
    """The caller's handle. Turns are sequential: one response at a time per conversation."""

    def __init__(self, engine: "Engine", state: _Conv):
        self._engine, self._state = engine, state
        self._turn: _Turn | None = None  # the latest response, possibly still winding down
        self._consuming = False
        self.closed = False

    @property
    def id(self) -> int:
        return self._state.slot

    async def respond(self, parts: Sequence[Part | str], modalities: Sequence[str] = ("text",),
                      sampling: SamplingParams | None = None, max_new_tokens: int | None = None,
                      seed: int | None = None, role: str = "user", voice: str | None = None,
                      talker_sampling: SamplingParams | None = None, min_new_tokens: int = 0,
                      min_codes: int = 0, max_output_tokens: int | None = None) -> AsyncIterator[Event]:
        """Add one user turn and stream the reply as events, ending with Done or Error.

        modalities ("text",) or ("text", "audio"): with audio, AudioDelta chunks (PCM16, 24 kHz)
        arrive interleaved with the text while the Thinker is still writing. min_new_tokens /
        min_codes hold off the end of the text / speech (benchmarks force equal lengths with them).
        max_output_tokens bounds text and codec tokens together (as the OpenAI protocols count output):
        reaching it stops both, and the reply ends "incomplete".

        Sampling: `sampling` (default: the checkpoint's, or greedy with EngineConfig.greedy) drives the
        Thinker; the Talker follows it (greedy text -> greedy codes) unless `talker_sampling` says
        otherwise. When nothing is sampled and no seed is given, the seed is fixed, so the Token2Wav
        noise, and with it the whole reply, is the same on every run.

        Leaving the loop early cancels the response (what was emitted stays in the history).
        """
        eng = self._engine
        if self.closed:
            yield Error("invalid_request", "conversation is closed")
            return
        if self._consuming:
            yield Error("busy", "this conversation is already responding; cancel it or wait for Done")
            return
        speech = "audio" in modalities
        voice_obj = None
        if speech:
            try:
                voice_obj = eng.model.voice(voice or self._state.voice)
            except SpeechError as e:
                yield Error("invalid_request", str(e))
                return
            trained = eng.model.speech_system_prompt
            if trained is not None and self._state.system not in (None, trained) and self._state.turns == 0:
                log.warning("warning: a custom system prompt with audio output may degrade the voice (%s's speech "
                            "was trained with its own system prompt); put persona text in a user turn instead",
                            eng.model.family)
        self._consuming = True
        turn = None
        try:
            if self._turn is not None:  # an abandoned response still winding down on the worker
                await self._turn.done.wait()
            loop = asyncio.get_running_loop()
            try:
                prompt = await loop.run_in_executor(eng._pool, self._prepare, list(parts), role)
            except (MediaError, ValueError) as e:
                yield Error("invalid_media" if isinstance(e, MediaError) else "invalid_request", str(e))
                return
            limit = max_new_tokens or eng.config.max_new_tokens
            if max_output_tokens is not None:
                limit = min(limit, max_output_tokens)
            held = int(eng._cache.lengths[self._state.slot])
            if held + len(prompt) + limit > eng.config.max_context:
                yield Error("context_length_exceeded",
                            f"conversation would reach {held + len(prompt) + limit} tokens ({held} held, "
                            f"{len(prompt)} new, {limit} to generate); the limit is {eng.config.max_context}")
                return
            sampling = sampling or eng.model.default_sampling(greedy=eng.config.greedy)
            talker_sampling = talker_sampling or eng.model.talker_sampling(greedy=sampling.is_greedy)
            if seed is None and sampling.is_greedy and talker_sampling.is_greedy:
                seed = 0  # nothing is sampled: the noise too is the same every time
            g_text, g_talk, g_noise = generators(seed, eng.model.device)
            turn = _Turn(self._state, prompt, sampling, g_text, limit, _Outbox(loop, eng.config.events_buffered),
                         max_output_tokens if speech else None, time.perf_counter(), speech=speech,
                         voice=voice_obj, talker_sampling=talker_sampling, talker_generator=g_talk,
                         noise_generator=g_noise, min_new_tokens=min_new_tokens, min_codes=min_codes)
            try:
                eng._inbox.put_nowait(("turn", turn))
            except queue.Full:
                yield Error("busy", "the engine is overloaded; try again shortly")
                return
            self._turn = turn
            while True:
                ev = await turn.emit.get()
                yield ev
                if isinstance(ev, (Done, Error)):
                    return
        finally:
            self._consuming = False
            if turn is not None and not turn.done.is_set():
                self.cancel("client_gone")

    def _prepare(self, parts: list, role: str) -> Prompt:
        """Runs on the preprocessing pool: decode media, tokenise, positions after the history."""
        s, proc = self._state, self._engine.model.processor
        content = [Text(p) if isinstance(p, str) else p for p in parts]
        msgs = [Message(role, content)]
        if s.turns == 0:
            if s.system is not None:
                msgs.insert(0, Message("system", [Text(s.system)]))
            return proc(msgs)
        return proc(msgs, start=s.next_position, prefix_ids=s.pending, prefix_text=continuation_text(s.closed_reply),
                    default_system=False)

    @property
    def turns(self) -> int:
        return self._state.turns

    @property
    def default_system(self) -> str:
        """The system prompt a conversation that sets none runs with ("" where the model's template has none)."""
        return self._engine.model.default_system_prompt or ""

    def set_system(self, system: str | None) -> bool:
        """Set the system prompt; only before the first turn (after it, the prompt is in the cache).

        Returns whether it took effect.
        """
        if self._state.turns or self._consuming:
            return False
        self._state.system = system
        return True

    def cancel(self, reason: str = "client_cancelled") -> None:
        """Stop the current response within one decode step; what was emitted stays in the history."""
        if self._turn is not None and not self._turn.done.is_set():
            self._engine._command(("cancel", (self._turn, reason)))

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.cancel("closed")
            self._engine._command(("close", self._state))


class Engine:
    def __init__(self, model: OmniModel, config: EngineConfig = EngineConfig()):
        self.model, self.config = model, config
        self._cache: KVCache = model.allocate_cache(config.max_sessions, config.max_context)
        self.speech = model.speech  # the model's speech part, or None: it cannot speak
        self._talker_cache = None
        self.max_codes = (config.max_codes if config.max_audio_s is None or self.speech is None
                          else max(1, round(config.max_audio_s * self.speech.codec_hz)))
        if self.speech is not None:
            self._talker_cache = self.speech.allocate_cache(config.max_sessions, config.max_context, self.max_codes)
        self._free = list(range(config.max_sessions))
        self._stop_ids = torch.tensor(sorted(model.stop_ids), device=model.device)
        self._slots_lock = threading.Lock()
        self._inbox: queue.Queue = queue.Queue(config.inbox_size)
        self._pool = concurrent.futures.ThreadPoolExecutor(config.preprocess_threads, thread_name_prefix="omni-prep")
        self._waiting: list[_Turn] = []
        self._active: list[_Turn] = []
        self._stop = threading.Event()
        self.busy_s = 0.0  # seconds the engine's worker spent in model steps (prefill, decode, talker, inline vocoder)
        self.stage_busy_s = {"thinker": 0.0, "talker": 0.0}  # the engine's worker, by stage (the vocoder's: stats())
        threads = config.threads or torch.get_num_threads()
        split = self.speech is not None and (config.speech_worker if config.speech_worker is not None
                                             else model.device.type == "cuda")
        speech_threads = (config.speech_threads or max(1, threads // 2)) if split else 0
        self.threads = max(1, threads - speech_threads)  # the engine's worker's
        self._voc: Inline | SpeechWorker | None = None
        if self.speech is not None:
            ahead = max(1, round(config.speech_ahead_s * self.speech.codec_hz))
            if not split:
                self._voc = Inline(self.speech, ahead)
            else:
                device = torch.device(config.speech_device) if config.speech_device else model.device
                if device != model.device:
                    self.speech.move_vocoder(device)
                self._voc = SpeechWorker(self.speech, ahead, self._spoken, self._speech_failed, speech_threads,
                                         model.device, device)
        self._worker = threading.Thread(target=self._run, name="omni-engine", daemon=True)
        self._worker.start()

    @classmethod
    def load(cls, model_dir: str | Path, device: str = "cpu", config: EngineConfig = EngineConfig(),
             **load_kwargs) -> "Engine":
        from omni.models import load_model

        return cls(load_model(model_dir, device=device, **load_kwargs), config)

    def open_conversation(self, voice: str | None = None, system: str | None = None) -> Conversation:
        with self._slots_lock:
            if not self._free:
                raise EngineBusy(f"all {self.config.max_sessions} conversation slots are in use")
            slot = self._free.pop(0)
        self._cache.reset(slot)
        vocab = self.model.vocab_size
        state = _Conv(slot, system, voice, seen=torch.zeros(vocab, dtype=torch.bool, device=self.model.device),
                      speech_memory=self.speech.new_memory() if self.speech is not None else None)
        return Conversation(self, state)

    @property
    def active_conversations(self) -> int:
        return self.config.max_sessions - len(self._free)

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._command(("wake", None))
        self._worker.join(timeout)
        if self._voc is not None:
            self._voc.close(timeout)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def stats(self) -> dict:
        """Placement and busy seconds per stage (for /metrics): which stage saturates, on which worker."""
        workers = [{"worker": "engine", "device": str(self.model.device), "threads": self.threads,
                    "stages": ["thinker", "talker"] + (["vocoder"] if isinstance(self._voc, Inline) else [])}]
        busy = [{"stage": k, "worker": "engine", "s": v} for k, v in self.stage_busy_s.items()]
        if self._voc is not None:
            v = self._voc
            where = "speech" if isinstance(v, SpeechWorker) else "engine"
            if where == "speech":
                workers.append({"worker": "speech", "device": str(v.device), "threads": v.threads, "stages": ["vocoder"]})
            busy.append({"stage": "vocoder", "worker": where, "s": v.busy_s})
        active = list(self._active)
        return {"workers": workers, "busy": busy,
                "speech_queue_codes": sum(t.codes_sent - t.codes_taken for t in active if t.talker is not None),
                "speaking": sum(1 for t in active if t.talker is not None and not t.spoken),
                "decoding": self._voc.stats()["utterances"] if self._voc is not None else 0}

    def _spoken(self, turn: _Turn) -> None:  # the speech worker's: a reply's audio is all out
        self._command(("spoken", turn))

    def _speech_failed(self, turn: _Turn, message: str) -> None:
        self._command(("speech_failed", (turn, message)))

    def _sync(self) -> None:
        if self.model.device.type == "cuda":  # so busy_s counts device time, not launch time
            torch.cuda.synchronize(self.model.device)

    def _command(self, cmd) -> None:
        try:
            self._inbox.put_nowait(cmd)
        except queue.Full:  # cancels and closes must not be lost: wait for room
            self._inbox.put(cmd)

    def _run(self) -> None:
        torch.set_num_threads(self.threads)  # this thread's budget (the speech worker sets its own)
        it = 0
        unread: _Unread | None = None  # tokens sampled in the previous iteration, on their way to the host
        idle = 0.1
        while not self._stop.is_set():
            try:
                self._drain(idle)
                t0 = time.perf_counter()
                it += 1
                sampled: list[tuple[_Turn, torch.Tensor]] = []
                if self._waiting:
                    self._prefill(self._waiting.pop(0), it, sampled)
                for t in [t for t in self._active if t.cancelled]:
                    self._active.remove(t)
                    self._finish(t)
                texting = [t for t in self._active if t.sampled is not None and t.sampled_iter < it
                           and t.sampled_count < t.max_new_tokens and _room(t) > 0 and not t.text_done
                           and not t.emit.full()]
                if texting:
                    self._decode(texting, it, sampled)
                if unread is not None:  # the device works on this step meanwhile
                    self._resolve(unread)
                unread = _Unread.start(sampled) if sampled else None
                for t in [t for t in self._active if t.sampled_value is not None and not t.text_done
                          and (t.sampled_count >= t.max_new_tokens or _spent(t))]:
                    self._limit(t)
                t1 = time.perf_counter()
                self.stage_busy_s["thinker"] += t1 - t0
                speaking = [t for t in self._active if t.talker is not None and not t.emit.full()
                            and ((self.speech.ready(t.talker) and not self._voc.behind(t)) or t.talker.unread)]
                if speaking:
                    self._speak(speaking)
                if self._active or texting or speaking:
                    self._sync()
                    now = time.perf_counter()
                    self.stage_busy_s["talker"] += now - t1
                    self.busy_s += now - t0
                # nothing to do: every consumer is behind, or the speech worker is: wait for them (its word wakes us)
                idle = 0.002 if self._active and not texting and not speaking and unread is None else (
                    None if self._active or self._waiting else 0.1)
            except Exception as e:  # never let one bad step kill the worker
                log.exception("engine step failed")
                unread = None
                for t in self._active + self._waiting:
                    self._finish(t, error=Error("internal", f"engine error: {e}"))
                self._active, self._waiting = [], []
        self._drain(None)
        for t in self._active + self._waiting:  # shut down: no response waits forever for its end
            t.cancelled = t.cancelled or "engine_shutdown"
            self._finish(t)
        self._active, self._waiting = [], []

    def _drain(self, timeout: float | None) -> None:
        """Take the inbox's commands: waiting up to `timeout` for the first (None: not waiting)."""
        try:
            cmd = self._inbox.get(timeout=timeout) if timeout else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, arg = cmd
            if kind == "turn":
                self._waiting.append(arg)
            elif kind == "cancel":
                turn, reason = arg
                if turn in self._waiting:
                    self._waiting.remove(turn)
                    turn.cancelled = reason
                    self._finish(turn)
                elif turn in self._active:
                    turn.cancelled = reason
            elif kind == "close":
                self._release(arg)
            elif kind == "spoken":
                if arg in self._active:
                    arg.spoken = True
                    self._maybe_done(arg)
            elif kind == "speech_failed":
                turn, message = arg
                if turn in self._active and not turn.spoken:
                    self._active.remove(turn)
                    self._finish(turn, error=Error("internal", f"speech decoder error: {message}"))
            try:
                cmd = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _release(self, conv: _Conv) -> None:
        for t in [t for t in self._active + self._waiting if t.conv is conv]:
            t.cancelled = t.cancelled or "closed"
            if t in self._waiting:
                self._waiting.remove(t)
            else:
                self._active.remove(t)
            self._finish(t)
        self._cache.reset(conv.slot)
        with self._slots_lock:
            self._free.append(conv.slot)

    @torch.inference_mode()
    def _prefill(self, turn: _Turn, it: int, sampled: list) -> None:
        m, conv = self.model, turn.conv
        if turn.cancelled:
            return self._finish(turn)
        t0 = time.perf_counter()
        p = turn.prompt
        turn.cached = int(self._cache.lengths[conv.slot])
        turn.kinds = m.processor.token_kinds(p.input_ids)
        held = conv.media_held
        turn.cached_kinds = {"text": turn.cached - held["audio"] - held["image"], **held}
        conv.media_held = {k: held[k] + turn.kinds[k] for k in held}
        embeds, hidden, logits = m.prefill(p, self._cache, conv.slot)
        conv.pending, conv.turns = [], conv.turns + 1
        conv.seen[p.input_ids.to(m.device)] = True
        if conv.speech_memory is not None:
            conv.speech_memory = self.speech.remember_prompt(conv.speech_memory, p, embeds[0], hidden[0])
            if turn.speech:
                turn.talker_prompt = self.speech.talker_prompt(conv.speech_memory)
        turn.pos = conv.next_position = p.next_position
        turn.prefilled = True
        turn.detok = _Detokenizer(m.processor.tok)
        if m.think_ids is not None:  # a template may open the block itself: the reply then starts inside it
            turn.reasoning_detok = _Detokenizer(m.processor.tok)
            turn.reasoning = _inside(p.input_ids.tolist(), *m.think_ids)
        turn.t_prefill = time.perf_counter() - t0
        self._active.append(turn)
        self._sample([turn], logits, it, sampled)
        if turn.speech and not self.speech.reads_thinker_states:
            # A Talker that needs only ids starts on token 0 in this iteration: read it now (one wait, right
            # after the prefill) instead of one decode step later, so first audio comes a step sooner.
            self._resolve(_Unread.start([sampled.pop()]))

    @torch.inference_mode()
    def _decode(self, turns: list[_Turn], it: int, sampled: list) -> None:
        """One batched Thinker step: feed each turn's sampled token from the device, sample the next.

        No value is read back here: the host learns the fed tokens in `_resolve`, one step behind.
        """
        m = self.model
        tokens = torch.cat([t.sampled for t in turns])[:, None]  # (B, 1) on the device
        positions_host = m.decode_positions([t.pos for t in turns])
        positions = to_device(positions_host, m.device)
        slots = torch.tensor([t.conv.slot for t in turns])
        embeds, hidden, logits = m.decode(tokens, positions, self._cache, slots)  # logits (B, V)
        for i, t in enumerate(turns):
            t.fed = (embeds[i], hidden[i], positions_host[:, i], t.sampled, t.seen_before)
            t.pos += 1
            t.conv.next_position = t.pos
            if t.sampled_value is not None:  # read already (the turn was paused): confirm it now
                self._confirm(t, t.sampled_value)
            t.sampled = None
        self._sample(turns, logits, it, sampled)

    def _sample(self, turns: list[_Turn], logits: torch.Tensor, it: int, sampled: list) -> None:
        """Sample each turn's next token from its logits row, on the device; adds (turn, token) to `sampled`."""
        for i, t in enumerate(turns):
            row = logits[i:i + 1]
            if t.sampled_count < t.min_new_tokens:
                row = row.clone()
                row[:, self._stop_ids] = float("-inf")
            seen = t.conv.seen
            tok = sample(row, t.sampling, t.generator, seen[None])  # (1,)
            t.seen_before = seen[tok]
            seen[tok] = True  # the next step's repetition penalty needs it before the host does
            t.sampled, t.sampled_value, t.sampled_iter = tok, None, it
            t.sampled_count += 1
            sampled.append((t, tok))

    def _resolve(self, unread: "_Unread") -> None:
        """The previous step's tokens have reached the host: emit them, or end the text at a stop token."""
        m = self.model
        for t, tok in zip(unread.turns, unread.values()):
            if t not in self._active or t.text_done:
                continue
            if t.first_token_at is None:
                t.first_token_at = time.perf_counter()
            if tok in m.stop_ids:
                self._drop_sampled(t)  # sampled after the stop token, if that was fed
                if t.fed is not None:  # the stop token went into the cache a step early: take it out
                    self._cache.truncate(t.conv.slot, int(self._cache.lengths[t.conv.slot]) - 1)
                    t.pos -= 1
                    *_, stop, seen_before = t.fed
                    t.conv.seen[stop] = seen_before
                    t.fed = None
                t.conv.next_position = t.pos
                t.conv.pending, t.conv.closed_reply = [m.processor.tok.token_id("<|im_end|>")], True
                self._text_end(t, "completed")
                continue
            t.generated += 1
            t.emit.put(self._delta(t, tok))
            if t.speech and not self.speech.reads_thinker_states:  # its Talker needs the id only: it goes now
                self._feed_talker(t, ThinkerStep(tok, None, None))
            if t.fed is not None:
                self._confirm(t, tok)
            else:
                t.sampled_value = tok

    def _delta(self, t: _Turn, tok: int) -> TextDelta:
        """The text a reply token adds, marked when it belongs to the reasoning block (the markers' own text is
        left out: `<think>` opens the block, `</think>` closes it)."""
        think = self.model.think_ids
        if think is not None and tok in think:
            t.reasoning_tokens += 1
            t.reasoning = tok == think[0]
            return TextDelta("", tok, reasoning=True)
        if t.reasoning:
            t.reasoning_tokens += 1
            return TextDelta(t.reasoning_detok.push(tok), tok, reasoning=True)
        return TextDelta(t.detok.push(tok), tok)

    def _confirm(self, t: _Turn, tok: int) -> None:
        """The token `t.fed` fed is known and not a stop: its step joins the history and the Talker."""
        embed, hidden, position, *_ = t.fed
        t.fed = None
        if t.conv.speech_memory is not None:
            t.conv.speech_memory = self.speech.remember_token(t.conv.speech_memory, tok, embed, hidden, position)
        if t.speech and self.speech.reads_thinker_states:
            self._feed_talker(t, ThinkerStep(tok, embed[0], hidden[0]))

    def _drop_sampled(self, t: _Turn) -> None:
        """Forget a sampled token that will not be fed (and that the repetition penalty must not keep)."""
        if t.sampled is not None:
            t.conv.seen[t.sampled] = t.seen_before
        t.sampled = t.sampled_value = None

    def _limit(self, t: _Turn) -> None:
        """The last token the length limit allows is out: it stays pending, unfed."""
        t.conv.pending, t.conv.closed_reply = [t.sampled_value], False
        t.sampled = t.sampled_value = None
        self._text_end(t, "incomplete")

    def _feed_talker(self, t: _Turn, step: ThinkerStep) -> None:
        if t.talker is None:
            t.talker, vstate = self.speech.start(self._talker_cache, t.conv.slot, t.talker_prompt, t.voice, step,
                                                 t.noise_generator)
            self._voc.start(t, vstate)
        else:
            self.speech.push(t.talker, step)

    @torch.inference_mode()
    def _speak(self, turns: list[_Turn]) -> None:
        """One batched Talker step for every turn that can make its next code; the codes go to the speech stage.

        The step leaves its codes on the device and returns those of the step before; a turn that does not
        step now has its codes in flight read instead (drawn an iteration ago, so neither waits for the
        device). A limit (max_codes, the output budget) stops the steps at once and cuts the speech once
        every code drawn is read: the last of them may be the codec's end, and then the speech ended by itself.
        A turn the speech stage is `behind` on does not step (its back-pressure).
        """
        sp, voc = self.speech, self._voc
        go = [t for t in turns if sp.ready(t.talker) and _room(t) > 0 and _codes(t) < self.max_codes
              and not voc.behind(t)]
        rest = [t for t in turns if t not in go and t.talker.unread]
        learned = sp.step([t.talker for t in go], [t.talker_sampling for t in go], [t.talker_generator for t in go],
                          [t.min_codes for t in go]) if go else []
        learned += sp.read([t.talker for t in rest]) if rest else []
        for t, codes in zip(go + rest, learned):
            if codes:
                voc.codes(t, codes)
        for t in turns:
            if not t.talker.finished and not t.talker.unread and (_codes(t) >= self.max_codes or _room(t) <= 0):
                t.talker.finished = t.speech_cut = True  # a limit stops the speech here; what is made is spoken
            if t.talker.finished and not t.speech_ended:
                t.speech_ended = True
                voc.finish(t)
        if isinstance(voc, Inline):
            busy = voc.busy_s
            for t in voc.run():
                t.spoken = True
                self._maybe_done(t)
            self.stage_busy_s["talker"] -= voc.busy_s - busy  # counted as the vocoder's

    def _text_end(self, turn: _Turn, status: str) -> None:
        turn.text_done, turn.status = True, status
        if turn.talker is not None:
            self.speech.push(turn.talker, None)  # the reply's text ended (the Talker winds its speech down)
        self._maybe_done(turn)

    def _maybe_done(self, turn: _Turn) -> None:
        if turn.text_done and (turn.talker is None or turn.spoken):
            if turn in self._active:
                self._active.remove(turn)
            self._finish(turn, status="incomplete" if turn.speech_cut else turn.status)

    def _finish(self, turn: _Turn, status: str | None = None, error: Error | None = None) -> None:
        conv = turn.conv
        if turn.prefilled and not turn.text_done:  # cut short: what was emitted stays; a token not read is dropped
            if turn.sampled_value is not None:  # emitted, not fed
                conv.pending, turn.sampled, turn.sampled_value = [turn.sampled_value], None, None
            else:
                conv.pending = []
                self._drop_sampled(turn)
            conv.closed_reply = False
        if turn.talker is not None and not turn.spoken:
            self._voc.drop(turn)  # its queued codes are not decoded; a chunk decoded meanwhile is not sent
        turn.emit.call(turn.done.set)  # before the final event, so a caller that saw it sees the turn done
        if error is not None:
            turn.emit.put(error, final=True)
        else:
            now = time.perf_counter()
            usage = {"prompt_tokens": len(turn.prompt), "cached_tokens": turn.cached,
                     "completion_tokens": turn.generated, "reasoning_tokens": turn.reasoning_tokens,
                     "prompt_token_kinds": turn.kinds or self.model.processor.token_kinds(turn.prompt.input_ids),
                     "cached_token_kinds": turn.cached_kinds or {"text": 0, "audio": 0, "image": 0}}
            if turn.speech:
                usage["codec_tokens"] = len(turn.talker.codes) if turn.talker else 0
                usage["audio_seconds"] = round(turn.audio_samples / self.speech.sample_rate, 3) if self.speech else 0.0
            first = turn.first_token_at
            timings = {"prefill_s": round(turn.t_prefill, 4),
                       "time_to_first_token_s": round(first - turn.t_submit, 4) if first else None,
                       "decode_tokens_per_s": round((turn.generated - 1) / (now - first), 2)
                       if first and turn.generated > 1 and now > first else None,
                       "total_s": round(now - turn.t_submit, 4)}
            if turn.speech:
                timings["time_to_first_audio_s"] = (round(turn.t_first_audio - turn.t_submit, 4)
                                                    if turn.t_first_audio else None)
            codes = self.speech.codec_ids(turn.talker) if turn.talker is not None else ([] if turn.speech else None)
            if turn.cancelled:
                turn.emit.put(Done("cancelled", usage, timings, reason=turn.cancelled, codec_ids=codes), final=True)
            else:
                turn.emit.put(Done(status or "completed", usage, timings, codec_ids=codes), final=True)
        if turn.talker is not None:
            turn.talker.reset()  # frees the Talker's KV rows; the Token2Wav state goes with the turn
