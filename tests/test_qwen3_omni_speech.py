"""Qwen3-Omni speech through the engine, against transformers 5.23's `generate` with audio out (fp32, CPU).

The reference is tests/reference_qwen3_speech.py's (thinker and talker sharpened, Code2Wav audible). Our engine
speaks greedily through `load_model` (Talker fed each reply id as soon as the host knows it, frames batched,
Code2Wav streamed in chunks of 1, 2, 4, 8 frames); the reference decodes the whole utterance at the end. Text,
every codebook's codes and the wave (PCM16: within one step of rounding) must agree. Then what serving needs:
four conversations speaking at once equal each alone, cancel mid-speech, a second turn on the kept Talker
prefix equal to the reference on the whole conversation (and only the new user rows prefilled), voices, and
a planted wrong accept layer caught at the engine.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from omni.models import load_model
from omni.sampling import GREEDY
from omni.types import AudioDelta, Done, Error, Image, Audio, Message, TextDelta
from streaming.engine import Engine, EngineConfig, continuation_text
from tests import media as make
from tests.reference_qwen3 import generate_inputs
from tests.reference_qwen3_speech import build_speech_reference

torch.set_num_threads(1)
REPLY, FRAMES = 6, 10  # the reference's thinker tokens (its last is never spoken); frames at most
SPEAK = ("text", "audio")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_speech_reference("tiny", tmp_path_factory.mktemp("q3_speech"))


@pytest.fixture(scope="module")
def model(built):
    return load_model(built[1])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("q3_speech_media")
    (d / "cat.png").write_bytes(make.encode_image(make.pattern_image(64, 96, seed=1)))
    make.write_audio(d / "q.wav", make.tone(1.7, freq=300, chirp_to=2000), 16000)
    return d


def engine_for(model, sessions: int = 4, **kw) -> Engine:
    cfg = dict(max_sessions=sessions, max_context=1024, max_new_tokens=REPLY - 1, max_codes=FRAMES)
    return Engine(model, EngineConfig(**{**cfg, **kw}))


@pytest.fixture
def engine(model):
    eng = engine_for(model)
    yield eng
    eng.shutdown()


async def speak(conv, parts, **kw):
    """(text ids, codes (T, G), wave (n,) int16, the first audio chunk's samples, Done)."""
    kw.setdefault("sampling", GREEDY)
    events = [ev async for ev in conv.respond(parts, modalities=SPEAK, **kw)]
    done = events[-1]
    assert isinstance(done, Done), done
    audio = [e for e in events if isinstance(e, AudioDelta)]
    wave = np.frombuffer(b"".join(a.pcm for a in audio), dtype="<i2")
    codes = torch.tensor(done.codec_ids, dtype=torch.long)  # (frames, codebooks)
    return ([e.token_id for e in events if isinstance(e, TextDelta)], codes, wave,
            len(audio[0].pcm) // 2 if audio else 0, done)


@torch.no_grad()
def reference(ref, prompt, voice: str = "ethan"):
    """(reply ids the Talker was given, codes (T, G), wave (n,) float) from transformers' greedy generate."""
    rec = []
    hook = ref.talker.register_forward_hook(
        lambda mod, a, k, out: rec.append(out.hidden_states[1][0]) if out.hidden_states[1] is not None else None,
        with_kwargs=True)
    try:
        text, wave = ref.generate(**generate_inputs(prompt), return_audio=True, thinker_do_sample=False,
                                  talker_do_sample=False, thinker_max_new_tokens=REPLY,
                                  talker_max_new_tokens=FRAMES + 1, speaker=voice)
    finally:
        hook.remove()
    reply = text[0, prompt.input_ids.shape[0]:].tolist()
    return reply[:-1], torch.stack(rec), wave.reshape(-1)


def assert_wave_equal(got_pcm: np.ndarray, want: torch.Tensor) -> None:
    want_pcm = (want.clamp(-1, 1) * 32767).round().numpy()
    assert len(got_pcm) == len(want_pcm)
    assert np.abs(got_pcm.astype(np.float64) - want_pcm).max() <= 1  # one step of PCM16 rounding
    assert np.abs(want_pcm).max() > 1000  # audible: the comparison means something


PARTS = {"text": lambda f: ["Tell me a story about a cat."],
         "image+audio+text": lambda f: [Image(f / "cat.png"), Audio(f / "q.wav"), "What do you see and hear?"]}


@pytest.mark.parametrize("what", list(PARTS))
def test_text_codes_and_wave_equal_the_reference(engine, model, built, files, what):
    parts = PARTS[what](files)
    prompt = model.processor([Message.of("user", *parts)])
    tokens, codes, wave, first, done = asyncio.run(speak(engine.open_conversation(), parts))
    reply, want_codes, want_wave = reference(built[0], prompt)
    assert tokens == reply  # the reference's last token is its end: the Talker never gets it, nor do we emit it
    assert codes.shape == (FRAMES, model.speech.talker.cfg.num_code_groups) and torch.equal(codes, want_codes)
    assert_wave_equal(wave, want_wave)
    assert first == model.speech.code2wav.out_len(1)  # the first audio goes out after the first frame
    assert done.usage["codec_tokens"] == FRAMES and done.usage["audio_seconds"] == round(len(wave) / 24000, 3)


def test_planted_wrong_accept_layer_is_caught_at_the_engine(model, built, files, monkeypatch):
    parts = PARTS["image+audio+text"](files)
    prompt = model.processor([Message.of("user", *parts)])
    _, want_codes, _ = reference(built[0], prompt)
    monkeypatch.setattr(model, "_capture", model._capture + 1)
    eng = engine_for(model, sessions=1)
    try:
        _, codes, _, _, _ = asyncio.run(speak(eng.open_conversation(), parts))
    finally:
        eng.shutdown()
    assert not torch.equal(codes, want_codes)


@pytest.mark.parametrize("greedy,speech_worker", [(True, False), (False, False), (True, True)],
                         ids=["greedy", "sampled", "greedy-speech-worker"])
def test_four_speaking_conversations_equal_each_alone(model, greedy, speech_worker):
    questions = ["What is happening here?", "Tell me a story about a cat.", "Why is the sky blue?", "Count to ten."]
    eng = engine_for(model, sessions=8, max_new_tokens=7, max_codes=14, speech_worker=speech_worker)
    kw = {} if greedy else {"sampling": model.default_sampling()}

    async def main():
        together = await asyncio.gather(*(speak(eng.open_conversation(), [q], seed=i, **kw)
                                          for i, q in enumerate(questions)))
        alone = [await speak(eng.open_conversation(), [q], seed=i, **kw) for i, q in enumerate(questions)]
        return together, alone

    try:
        together, alone = asyncio.run(main())
    finally:
        eng.shutdown()
    for (t1, c1, w1, *_), (t2, c2, w2, *_) in zip(together, alone):
        assert t1 == t2 and torch.equal(c1, c2)
        # batched convs round differently in fp32: within Code2Wav's streaming tolerance (1e-4 ~ 3.3 PCM16 steps)
        assert len(w1) == len(w2) and np.abs(w1.astype(int) - w2.astype(int)).max() <= 4
    assert len({tuple(c.flatten().tolist()) for _, c, *_ in together}) == len(questions)


@pytest.mark.parametrize("speech_worker", [False, True], ids=["one-worker", "speech-worker"])
def test_cancel_mid_speech_frees_the_talker_and_the_next_turn_speaks(model, speech_worker):
    eng = engine_for(model, sessions=3, max_new_tokens=40, max_codes=40, speech_worker=speech_worker)

    async def main():
        conv = eng.open_conversation()
        other = asyncio.ensure_future(speak(eng.open_conversation(), ["Count to ten."], max_new_tokens=6))
        chunks = 0
        async for ev in conv.respond(["Tell me a long story."], modalities=SPEAK, sampling=GREEDY):
            if isinstance(ev, AudioDelta):
                chunks += 1
                if chunks == 2:
                    conv.cancel()
            if isinstance(ev, (Done, Error)):
                last = ev
        again = await speak(conv, ["And a short one."], max_new_tokens=4)
        return last, chunks, again, await other

    try:
        last, chunks, again, other = asyncio.run(main())
        alone = asyncio.run(speak(eng.open_conversation(), ["Count to ten."], max_new_tokens=6))
    finally:
        eng.shutdown()
    assert isinstance(last, Done) and last.status == "cancelled" and 0 < len(last.codec_ids) < 40
    assert chunks <= 3  # stopped within a step of the cancel
    assert again[-1].status in ("completed", "incomplete") and len(again[1]) > 0
    assert torch.equal(other[1], alone[1])  # the conversation beside it did not notice


def test_a_second_turn_on_the_kept_talker_prefix_equals_the_reference_on_the_whole_conversation(model, built, files):
    """Turn 2's Talker prefill runs over its new user rows only; its codes equal transformers' on the whole
    conversation (whose Talker prompt is both user turns: assistant turns are not fed to the Talker)."""
    proc = model.processor
    eng = engine_for(model, sessions=1)
    first_parts, second_parts = [Image(files / "cat.png"), "Describe it."], ["And now a story."]
    prefills = []
    hook = model.speech.talker.model.register_forward_hook(
        lambda mod, args, out: prefills.append(args[0].shape[1]) if args[0].shape[1] > 1 else None)

    async def main():
        conv = eng.open_conversation()
        a = await speak(conv, first_parts)
        b = await speak(conv, second_parts)
        return a, b

    try:
        (first, *_, d1), (second, codes, wave, _, d2) = asyncio.run(main())
    finally:
        hook.remove()
        eng.shutdown()
    assert d2.usage["cached_tokens"] > 0
    whole = proc([Message.of("user", *first_parts)])
    ended = d1.status == "completed"
    tail = proc.tok.encode(continuation_text(ended) + proc.render([Message.of("user", *second_parts)]))
    ids = whole.input_ids.tolist() + first + ([proc.tok.token_id("<|im_end|>")] if ended else []) + tail
    whole.input_ids = torch.tensor(ids)
    reply, want_codes, want_wave = reference(built[0], whole)
    assert second == reply and torch.equal(codes, want_codes)
    assert_wave_equal(wave, want_wave)
    rows_1 = user_rows(model, proc([Message.of("user", *first_parts)]).input_ids.tolist())
    assert prefills == [rows_1 + 8, user_rows(model, ids) - rows_1 + 8]  # + 8 of the 9 fixed rows each time


def user_rows(model, ids: list[int]) -> int:
    """How many of a conversation's ids sit in user turns (what the Talker's prompt keeps)."""
    cfg, n, role = model.cfg, 0, None
    for i, t in enumerate(ids):
        if t == cfg.im_start_token_id:
            role = ids[i + 1] if i + 1 < len(ids) else None
        n += role == cfg.user_token_id
    return n


def test_voices_are_chosen_per_request_and_an_unknown_one_lists_them(engine, model, built):
    assert sorted(model.voices) == ["Aiden", "Chelsie", "Ethan"] and model.default_voice == "Ethan"
    prompt = model.processor([Message.of("user", "Hello")])
    _, want, _ = reference(built[0], prompt, voice="chelsie")

    async def main():
        conv = engine.open_conversation(voice="Chelsie")
        got = await speak(conv, ["Hello"])
        bad = [ev async for ev in conv.respond(["Hello"], modalities=SPEAK, voice="Alloy")]
        ethan = await speak(conv, ["Hello"], voice="ethan")  # case as the user writes it
        return got, bad, ethan

    got, bad, ethan = asyncio.run(main())
    assert torch.equal(got[1], want) and not torch.equal(ethan[1], want)
    assert isinstance(bad[-1], Error) and "Aiden, Chelsie, Ethan" in bad[-1].message
