"""Qwen3-Omni through the engine: what a user gets from `load_model` on a Qwen3 checkpoint, against transformers.

The reference checkpoint (tests/reference_qwen3.py, sharpened, experts one tensor each) is loaded by
omni.models.load_model from its config.json's model_type; prompts go through our processor, and our engine's
greedy replies equal transformers' thinker `generate` on the same inputs: text, an image with audio, a video at
a fractional frame rate (fractional decode positions), four conversations at once, and a second turn on the
kept cache. The embedded Qwen3-Omni loads in transformers and agrees with it too.
"""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
import torch

from omni import embedded
from omni.models import load_model
from omni.pipeline import SpeechError
from omni.sampling import GREEDY
from omni.types import Audio, Done, Error, Image, Message, TextDelta, Video
from streaming.engine import Engine, EngineConfig, continuation_text
from tests import media as make
from tests.reference_qwen3 import build_reference, generate_inputs

torch.set_num_threads(1)
N = 24


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_reference("tiny", tmp_path_factory.mktemp("q3_model"))


@pytest.fixture(scope="module")
def model(built):
    return load_model(built[1])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("q3_media")
    (d / "cat.png").write_bytes(make.encode_image(make.pattern_image(64, 96, seed=1)))
    make.write_audio(d / "q.wav", make.tone(1.7, freq=300, chirp_to=2000), 16000)
    make.write_video(d / "clip.mp4", seconds=2.0, height=64, width=64, audio=False)
    return d


@pytest.fixture
def engine(model):
    eng = Engine(model, EngineConfig(max_sessions=4, max_context=2048, max_new_tokens=N))
    yield eng
    eng.shutdown()


async def collect(conv, parts, **kw):
    events = [ev async for ev in conv.respond(parts, sampling=GREEDY, **kw)]
    assert isinstance(events[-1], (Done, Error)), events[-1]
    return [e.token_id for e in events if isinstance(e, TextDelta)], events[-1]


def reference_greedy(ref, prompt, n: int = N, stop=()) -> list[int]:
    """transformers' thinker generate (greedy) on our processor's ids and features; positions its own."""
    kw = generate_inputs(prompt)
    with torch.no_grad():
        out = ref.thinker.generate(**kw, max_new_tokens=n, do_sample=False, eos_token_id=list(stop) or None)
    return out[0, prompt.input_ids.shape[0]:].tolist()


def until_stop(tokens: list[int], stop) -> list[int]:
    for i, t in enumerate(tokens):
        if t in stop:
            return tokens[:i]
    return tokens


def test_load_model_reads_the_family_and_loads_the_whole_thinker(model, built):
    assert type(model).__name__ == "Qwen3OmniModel" and model.family == "Qwen3-Omni"
    assert {n.split(".")[0] for n, _ in model.thinker.named_parameters()} == {"model", "lm_head", "visual",
                                                                              "audio_tower"}
    assert model.default_system_prompt is None  # Qwen3's template adds none


@pytest.mark.parametrize("what", ["text", "image+audio", "video"])
def test_engine_greedy_replies_equal_transformers_generate(engine, model, built, files, what):
    frames = np.stack([make.pattern_image(64, 64, seed=i) for i in range(6)])
    parts = {"text": ["Tell me a story about a cat."],
             "image+audio": [Image(files / "cat.png"), Audio(files / "q.wav"), "What do you see and hear?"],
             "video": [Video(files / "clip.mp4"), Video(frames, fps=3.0), "What happens?"]}[what]
    prompt = model.processor([Message.of("user", *parts)])
    if what == "video":  # 3 fps frames at 13 positions per second: grids at t = 8.67, 17.33, and the text after
        assert float(prompt.next_position) != int(float(prompt.next_position))

    async def main():
        return await collect(engine.open_conversation(), parts)

    tokens, done = asyncio.run(main())
    want = until_stop(reference_greedy(built[0], prompt), model.stop_ids)
    assert tokens == want[:len(tokens)] and len(tokens) == min(N, len(want)) and len(tokens) >= 8
    assert done.usage["prompt_tokens"] == len(prompt)


def test_planted_rounded_decode_positions_are_caught(model, built, files, monkeypatch):
    """Decode positions rounded to integers (what an int position counter does) change the video reply."""
    from omni.qwen3_omni_model import Qwen3OmniModel

    exact = Qwen3OmniModel.decode_positions
    monkeypatch.setattr(Qwen3OmniModel, "decode_positions", staticmethod(lambda nexts: exact(nexts).round()))
    frames = np.stack([make.pattern_image(64, 64, seed=i) for i in range(6)])
    parts = [Video(files / "clip.mp4"), Video(frames, fps=3.0), "What happens?"]
    engine = Engine(model, EngineConfig(max_sessions=1, max_context=2048, max_new_tokens=N))
    try:
        tokens, _ = asyncio.run(collect(engine.open_conversation(), parts))
    finally:
        engine.shutdown()
    want = until_stop(reference_greedy(built[0], model.processor([Message.of("user", *parts)])), model.stop_ids)
    assert tokens != want[:len(tokens)]


def test_four_conversations_batched_equal_each_alone(model):
    questions = ["What is happening here?", "Tell me a story about a cat.", "Why is the sky blue?", "Count to ten."]
    engine = Engine(model, EngineConfig(max_sessions=8, max_context=512, max_new_tokens=N))

    async def main():
        together = await asyncio.gather(*(collect(engine.open_conversation(), [q]) for q in questions))
        alone = [await collect(engine.open_conversation(), [q]) for q in questions]
        return together, alone

    try:
        together, alone = asyncio.run(main())
    finally:
        engine.shutdown()
    assert [t for t, _ in together] == [t for t, _ in alone]
    assert len({tuple(t) for t, _ in together}) == len(questions)


def test_a_second_turn_on_the_kept_cache_equals_the_whole_conversation_at_once(engine, model, built, files):
    proc = model.processor

    async def main():
        conv = engine.open_conversation()
        first, d1 = await collect(conv, [Image(files / "cat.png"), "Describe it."])
        second, d2 = await collect(conv, ["And now a story."])
        return first, d1, second, d2

    first, d1, second, d2 = asyncio.run(main())
    assert d2.usage["cached_tokens"] > 0
    whole = proc([Message.of("user", Image(files / "cat.png"), "Describe it.")])
    ended = d1.status == "completed"
    tail = proc.tok.encode(continuation_text(ended) + proc.render([Message.of("user", "And now a story.")]))
    ids = whole.input_ids.tolist() + first + ([proc.tok.token_id("<|im_end|>")] if ended else []) + tail
    whole.input_ids = torch.tensor(ids)
    want = until_stop(reference_greedy(built[0], whole), model.stop_ids)
    assert second == want[:len(second)] and len(second) == min(N, len(want))


def test_speech_not_loaded_is_a_clear_error_and_the_conversation_goes_on(built):
    text_only = load_model(built[1], speech=False)
    assert text_only.speech is None and text_only.voices == {}
    engine = Engine(text_only, EngineConfig(max_sessions=1, max_context=512, max_new_tokens=4))

    async def main():
        conv = engine.open_conversation()
        bad = [ev async for ev in conv.respond(["Hello"], modalities=("text", "audio"))]
        good = await collect(conv, ["Hello"])
        return bad, good

    try:
        bad, (tokens, done) = asyncio.run(main())
    finally:
        engine.shutdown()
    assert isinstance(bad[-1], Error) and "speech output was not loaded" in bad[-1].message
    assert isinstance(done, Done) and tokens


def test_a_thinker_only_checkpoint_names_why_it_cannot_speak(built, tmp_path):
    d = json.loads((built[1] / "config.json").read_text())
    d["enable_audio_output"] = False
    for f in built[1].iterdir():
        (tmp_path / f.name).symlink_to(f)
    (tmp_path / "config.json").unlink()
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(SpeechError, match="cannot speak .*enable_audio_output is false"):
        load_model(tmp_path, speech=True)
    m = load_model(tmp_path)
    with pytest.raises(SpeechError, match="cannot speak"):
        m.voice("Ethan")


@pytest.fixture(scope="module")
def embedded_qwen3(embedded_dir):  # embedded_dir sets $OMNI_CACHE to the session's private cache
    return embedded.ensure(size=embedded.size_of("embedded:qwen3-omni"))


def test_the_embedded_qwen3_has_the_official_layout_and_real_vocabulary(embedded_qwen3):
    from safetensors import safe_open

    from omni.tokenizer import TextTokenizer

    cfg = json.loads((embedded_qwen3 / "config.json").read_text())
    assert cfg["model_type"] == "qwen3_omni_moe" and embedded.is_embedded(embedded_qwen3)
    with safe_open(embedded_qwen3 / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "thinker.model.layers.0.mlp.experts.7.down_proj.weight" in keys  # one tensor per expert, as published
    assert {k.split(".")[1] for k in keys if k.startswith("thinker.")} == {"model", "lm_head", "visual", "audio_tower"}
    assert {k.split(".")[0] for k in keys} == {"thinker", "talker", "code2wav"}  # it speaks
    tok = TextTokenizer.from_dir(embedded_qwen3)
    assert tok.encode("Hello world") == [9707, 1879]  # the real Qwen vocabulary
    th = cfg["thinker_config"]
    assert [tok.token_id(t) for t in ("<|audio_pad|>", "<|image_pad|>", "<|video_pad|>", "<|audio_start|>")] == [
        th["audio_token_id"], th["image_token_id"], th["video_token_id"], th["audio_start_token_id"]]


def test_the_embedded_qwen3_loads_in_transformers_and_agrees(embedded_qwen3, files):
    from transformers import Qwen3OmniMoeForConditionalGeneration

    ref = Qwen3OmniMoeForConditionalGeneration.from_pretrained(embedded_qwen3, dtype=torch.float32).eval()
    ref.set_experts_implementation("eager")
    model = load_model(embedded_qwen3)
    prompt = model.processor([Message.of("user", Image(files / "cat.png"), Audio(files / "q.wav"), "Hi")])
    eng = Engine(model, EngineConfig(max_sessions=1, max_context=2048, max_new_tokens=16))
    try:
        tokens, _ = asyncio.run(collect(eng.open_conversation(),
                                        [Image(files / "cat.png"), Audio(files / "q.wav"), "Hi"]))
    finally:
        eng.shutdown()
    want = until_stop(reference_greedy(ref, prompt, 16), model.stop_ids)
    assert tokens == want and len(tokens) == 16


def test_omni_generate_answers_on_the_embedded_qwen3(embedded_qwen3, capsys):
    from omni.cli import main

    assert main(["generate", "--model", "embedded:qwen3-omni", "--greedy", "--max-new-tokens", "8", "--json",
                 "Hello there"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["token_ids"]) == 8 and out["text"] and out["model"] == str(embedded_qwen3)
    assert main(["generate", "--model", "embedded:qwen9", "Hi"]) == 2
    assert "embedded:qwen3-omni" in capsys.readouterr().err


def test_omni_generate_and_caption_speak_with_the_embedded_qwen3(embedded_qwen3, files, tmp_path, capsys):
    """`omni generate --speak --voice` and `omni caption --speak` on the embedded Qwen3: WAVs of the frames'
    samples (1920 a frame less the 555 the last one holds back), an unknown voice refused with the list."""
    import wave as wavlib

    from omni.cli import main

    out = tmp_path / "reply.wav"
    assert main(["generate", "--model", "embedded:qwen3-omni", "--greedy", "--max-new-tokens", "6", "--json",
                 "--speak", str(out), "--voice", "Chelsie", "Hello there"]) == 0
    res = json.loads(capsys.readouterr().out)
    frames = res["codec_ids"]
    assert frames and all(len(f) == 16 for f in frames)
    with wavlib.open(str(out)) as w:
        assert w.getframerate() == 24000 and w.getnframes() == 1920 * len(frames) - 555
        assert np.abs(np.frombuffer(w.readframes(w.getnframes()), "<i2")).max() > 1000  # sound, not silence
    assert main(["generate", "--model", "embedded:qwen3-omni", "--speak", str(out), "--voice", "Alloy", "Hi"]) == 2
    assert "unknown voice 'Alloy'; this checkpoint has: Aiden, Chelsie, Ethan" in capsys.readouterr().err
    spoken = tmp_path / "spoken"
    assert main(["caption", "--model", "embedded:qwen3-omni", str(files / "q.wav"), "--out", str(tmp_path / "c.jsonl"),
                 "--speak", str(spoken), "--max-new-tokens", "4"]) == 0
    (rec,) = [json.loads(line) for line in (tmp_path / "c.jsonl").read_text().splitlines()]
    (wav,) = spoken.glob("*.wav")
    assert rec["status"] == "ok" and rec["text"] and wav.stat().st_size > 44 + 2 * 1365


def test_caption_on_a_captioner_sends_an_audio_only_turn_and_refuses_video_with_the_reason(embedded_qwen3,
                                                                                           files, tmp_path):
    from omni.jobs.caption import CaptionOptions, run_caption
    from omni.jobs.inputs import Item
    from omni.jobs.decode import DecodeOptions

    cap = tmp_path / "Qwen3-Omni-30B-A3B-Captioner"  # only the name marks a Captioner
    cap.symlink_to(embedded_qwen3, target_is_directory=True)
    model = load_model(cap)
    assert model.captioner and not load_model(embedded_qwen3).captioner
    eng = Engine(model, EngineConfig(max_sessions=2, max_context=2048, max_new_tokens=6))
    out = tmp_path / "c.jsonl"
    try:
        run_caption(eng, [Item.at(str(files / "q.wav")), Item.at(str(files / "clip.mp4"))], out,
                    CaptionOptions(decode=DecodeOptions(segment_seconds=30.0), max_new_tokens=6), progress=None)
    finally:
        eng.shutdown()
    recs = {json.loads(l)["path"]: json.loads(l) for l in out.read_text().splitlines()}
    audio, video = recs[str(files / "q.wav")], recs[str(files / "clip.mp4")]
    assert audio["status"] == "ok" and audio["prompt"] == "" and audio["text"]
    # the whole prompt: <|im_start|>user\n + the audio's run + <|im_end|>\n<|im_start|>assistant\n, no text
    ids = model.processor([Message.of("user", Audio(files / "q.wav"))]).input_ids
    assert audio["usage"]["prompt_tokens"] == len(ids)
    assert video["status"] == "error" and "describes audio only" in video["error"]


def test_omni_bench_qwen3_runs_transformers_and_our_engine_side_by_side(tmp_path):
    from omni.cli import main

    out = tmp_path / "b.json"
    assert main(["bench", "qwen3", "--configs", "tiny", "--text-tokens", "6", "--concurrency", "1,2",
                       "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert [r["run"] for r in res["rows"]] == ["transformers", "omni engine x1", "omni engine x2"]
    assert all(r["tok_s"] > 0 for r in res["rows"])
    assert res["tiny"]["tokens_equal_reference"] is True and res["tiny"]["moe_step"]["floor_ms"] > 0


def test_a_reasoning_block_is_marked_apart_from_the_answer(model, monkeypatch):
    """Tokens from <think> to </think> come as reasoning deltas (the markers without text), the rest as the
    answer; usage counts them. The markers here are two tokens the greedy reply happens to hold, so the
    block sits inside a real reply."""
    engine = Engine(model, EngineConfig(max_sessions=2, max_context=512, max_new_tokens=N))

    async def run():
        return [ev async for ev in engine.open_conversation().respond(["Tell me a story."], sampling=GREEDY)]

    try:
        plain = asyncio.run(run())
        tokens = [e.token_id for e in plain if isinstance(e, TextDelta)]
        a, b = next((i, j) for i in range(1, len(tokens)) for j in range(i + 2, len(tokens))
                    if tokens.count(tokens[i]) == 1 and tokens.count(tokens[j]) == 1)
        monkeypatch.setattr(model, "think_ids", (tokens[a], tokens[b]))
        events = asyncio.run(run())
    finally:
        engine.shutdown()
    deltas = [e for e in events if isinstance(e, TextDelta)]
    assert [e.token_id for e in deltas] == tokens
    assert [i for i, e in enumerate(deltas) if e.reasoning] == list(range(a, b + 1))
    assert deltas[a].text == deltas[b].text == ""
    tok = model.processor.tok
    assert "".join(e.text for e in deltas if e.reasoning) == tok.decode(tokens[a + 1:b])
    assert "".join(e.text for e in deltas if not e.reasoning) == tok.decode(tokens[:a]) + tok.decode(tokens[b + 1:])
    assert events[-1].usage["reasoning_tokens"] == b - a + 1


def test_chat_completions_and_realtime_serve_the_embedded_qwen3(embedded_qwen3, files, monkeypatch):
    """The server above the engine is unchanged: the openai SDK's chat completions (whole and streamed, with an
    image; a reasoning block as `reasoning_content`) and a Realtime text turn over raw websockets, every event
    validated by the SDK's types. (Speech on both families: tests/test_server.py and tests/test_http_api.py.)"""
    import base64

    from openai import OpenAI
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    from streaming.protocol import SessionConfig
    from streaming.server import ServerConfig
    from tests.realtime import Raw, ServerThread

    model = load_model(embedded_qwen3)
    eng = Engine(model, EngineConfig(max_sessions=2, max_context=4096, max_new_tokens=12))
    srv = ServerThread(eng, ServerConfig(port=0, defaults=SessionConfig(turn_detection=None)))
    try:
        api = OpenAI(api_key="x", base_url=f"http://127.0.0.1:{srv.port}/v1", max_retries=0)
        png = base64.b64encode((files / "cat.png").read_bytes()).decode()
        msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + png}},
                                             {"type": "text", "text": "What is this?"}]}]
        whole = api.chat.completions.create(model="omni", messages=msgs, temperature=0, max_completion_tokens=12)
        ChatCompletion.model_validate(whole.model_dump())
        text = whole.choices[0].message.content
        assert text and whole.usage.prompt_tokens_details.image_tokens > 0
        # a reasoning block: two tokens of this very reply stand in for <think> and </think>
        ids, _ = asyncio.run(collect(eng.open_conversation(), [Image(files / "cat.png"), "What is this?"]))
        assert model.processor.tok.decode(ids) == text  # the very reply the API gave
        monkeypatch.setattr(model, "think_ids", (ids[1], ids[4]))
        chunks = list(api.chat.completions.create(model="omni", messages=msgs, temperature=0,
                                                  max_completion_tokens=12, stream=True))
        for c in chunks:
            ChatCompletionChunk.model_validate(c.model_dump())
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
        answer = "".join(d.content or "" for d in deltas)
        assert reasoning and answer and reasoning not in answer
        monkeypatch.undo()

        async def realtime():
            rt = await Raw.connect(f"ws://127.0.0.1:{srv.port}/v1/realtime")
            created = (await rt.until("session.created"))[-1]
            assert created["session"]["instructions"] == ""  # Qwen3's template has no default system prompt
            await rt.send(type="session.update", session={"type": "realtime", "output_modalities": ["text"]})
            await rt.until("session.updated")
            await rt.send(type="conversation.item.create", item={"type": "message", "role": "user", "content": [
                {"type": "input_text", "text": "Hi there!"}]})
            await rt.send(type="response.create")
            done = (await rt.until("response.done"))[-1]
            await rt.close()
            return done

        done = asyncio.run(realtime())
        assert done["response"]["output"][0]["content"][0]["text"] and done["response"]["usage"]["output_tokens"] == 12
    finally:
        srv.stop()
        eng.shutdown()
