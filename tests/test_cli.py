"""`omni generate` as a user runs it, on the embedded default and on bad input."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from omni import embedded
from omni.pipeline import GenerationResult, OmniModel
from omni.sampling import GREEDY
from omni.types import Message
from tests import media as make

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def cache(embedded_dir):
    return embedded_dir.parent


def omni(cache, *args, check=True):
    env = {**os.environ, "OMNI_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "omni", *args], capture_output=True, text=True, env=env, cwd=ROOT,
                       timeout=300)
    if check and r.returncode != 0:
        raise AssertionError(f"omni {' '.join(args)} failed ({r.returncode}):\n{r.stderr}")
    return r


def test_embedded_default_is_deterministic(embedded_dir, tmp_path):
    again = embedded.ensure(tmp_path / "again")
    for name in ("model.safetensors", "config.json", "tokenizer.json", "vocab.json", "merges.txt"):
        a, b = (hashlib.sha256((d / name).read_bytes()).hexdigest() for d in (embedded_dir, again))
        assert a == b, name
    voices_a = torch.load(embedded_dir / "spk_dict.pt", weights_only=True)
    voices_b = torch.load(again / "spk_dict.pt", weights_only=True)
    assert sorted(voices_a) == ["Chelsie", "Ethan"]
    for k in voices_a:
        assert torch.equal(voices_a[k]["cond"], voices_b[k]["cond"])


def test_embedded_default_has_the_official_layout_and_real_vocabulary(embedded_dir):
    for name in ("config.json", "model.safetensors", "spk_dict.pt", "tokenizer.json", "vocab.json", "merges.txt",
                 "tokenizer_config.json", "generation_config.json", "preprocessor_config.json"):
        assert (embedded_dir / name).exists(), name
    model = OmniModel.load(embedded_dir)
    tok = model.processor.tok
    assert tok.encode("user") == [872] and tok.encode("Hello") == [9707]  # Qwen2's own ids
    assert tok.token_id("<|IMAGE|>") == 151655 and tok.token_id("<|AUDIO|>") == 151646
    prefixes = {k.split(".")[0] + "." + k.split(".")[1] for k in
                __import__("safetensors").safe_open(embedded_dir / "model.safetensors", "pt").keys()}
    assert {"thinker.model", "thinker.visual", "thinker.audio_tower", "thinker.lm_head", "talker.model",
            "talker.codec_head", "token2wav.code2wav_dit_model", "token2wav.code2wav_bigvgan_model"} <= prefixes


def test_embedded_default_loads_in_transformers_and_agrees(embedded_dir, tmp_path):
    from transformers import AutoTokenizer, Qwen2_5OmniForConditionalGeneration

    from safetensors.torch import load_file

    ref = Qwen2_5OmniForConditionalGeneration.from_pretrained(embedded_dir, dtype=torch.float32).eval()
    # every tensor was used and none was missing: saving the loaded model gives back the same tensors
    ref.save_pretrained(tmp_path / "resaved")
    ours, theirs = load_file(embedded_dir / "model.safetensors"), load_file(tmp_path / "resaved" / "model.safetensors")
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k].float(), theirs[k].float()) for k in ours)
    model = OmniModel.load(embedded_dir)
    prompt = model.processor([Message.of("user", "Hello, who are you?")])
    assert prompt.input_ids.tolist() == AutoTokenizer.from_pretrained(embedded_dir)(
        model.processor.render([Message.of("user", "Hello, who are you?")]))["input_ids"]
    stop = sorted(model.stop_ids)
    with torch.no_grad():
        out = ref.thinker.generate(input_ids=prompt.input_ids[None], attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                   max_new_tokens=16, do_sample=False, eos_token_id=stop, pad_token_id=stop[0])
    result = GenerationResult()
    list(model.generate_text(prompt, 16, GREEDY, result=result))
    assert result.token_ids == [t for t in out[0, len(prompt):].tolist() if t not in stop]


def test_generate_json_on_embedded_default(cache, embedded_dir, tmp_path):
    img = tmp_path / "cat.png"
    img.write_bytes(make.encode_image(make.pattern_image(64, 96)))
    wav = make.write_audio(tmp_path / "q.wav", make.tone(2.0, chirp_to=2000), 16000)
    r = omni(cache, "generate", "--image", str(img), "--audio", str(wav), "What is happening?", "--json",
             "--max-new-tokens", "12", "--seed", "7")
    out = json.loads(r.stdout)
    assert set(out) >= {"text", "token_ids", "prompt_tokens", "timings"}
    assert len(out["token_ids"]) == 12 and out["finish_reason"] == "length"
    assert out["prompt_tokens"] > 40
    assert "EMBEDDED DEFAULT" in r.stderr and "--model" in r.stderr
    again = json.loads(omni(cache, "generate", "--image", str(img), "--audio", str(wav), "What is happening?",
                            "--json", "--max-new-tokens", "12", "--seed", "7").stdout)
    assert again["token_ids"] == out["token_ids"]


def test_generate_streams_text_to_the_terminal(cache, embedded_dir):
    streamed = omni(cache, "generate", "Hi", "--greedy", "--max-new-tokens", "8").stdout
    as_json = json.loads(omni(cache, "generate", "Hi", "--greedy", "--max-new-tokens", "8", "--json").stdout)
    assert streamed == as_json["text"] + "\n"


@pytest.mark.parametrize("case", ["missing", "not_media", "wrong_kind", "not_a_checkpoint", "other_model"])
def test_bad_input_is_one_line_and_nonzero(cache, embedded_dir, tmp_path, case):
    args = ["generate", "x"]
    if case == "missing":
        args += ["--image", str(tmp_path / "nope.jpg")]
    elif case == "not_media":
        (tmp_path / "clip.mp4").write_text("this is not a video")
        args += ["--video", str(tmp_path / "clip.mp4")]
    elif case == "wrong_kind":
        args += ["--image", str(make.write_audio(tmp_path / "a.wav", make.tone(0.5), 16000))]
    elif case == "not_a_checkpoint":
        args += ["--model", str(tmp_path)]
    else:
        (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
        args += ["--model", str(tmp_path)]
    r = omni(cache, *args, check=False)
    assert r.returncode == 2
    lines = [l for l in r.stderr.splitlines() if l.startswith("omni: error")]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    if case in ("missing", "not_media", "wrong_kind"):
        assert tmp_path.name in lines[0]


def test_debug_shows_the_traceback(cache, embedded_dir, tmp_path):
    r = omni(cache, "generate", "x", "--image", str(tmp_path / "nope.jpg"), "--debug", check=False)
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_speak_writes_a_wav_matching_the_codes(cache, embedded_dir, tmp_path):
    import wave

    out = tmp_path / "answer.wav"
    r = omni(cache, "generate", "Answer briefly.", "--speak", str(out), "--voice", "Ethan", "--json",
             "--max-new-tokens", "6", "--max-audio-seconds", "1.5")
    d = json.loads(r.stdout)
    assert len(d["codec_ids"]) == 75 and d["audio_seconds"] == 1.5 and d["time_to_first_audio"] > 0
    with wave.open(str(out)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (24000, 1, 2)
        assert w.getnframes() == 480 * len(d["codec_ids"])
    assert not list(tmp_path.glob("*.part"))


def test_speak_to_stdout_is_raw_pcm(cache, embedded_dir):
    env = {**os.environ, "OMNI_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "omni", "generate", "Hi", "--speak", "-", "--max-new-tokens", "3",
                        "--max-audio-seconds", "0.5", "--greedy"], capture_output=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout) == 25 * 480 * 2  # 0.5 s: 25 codes of 480 samples, 2 bytes each; text went to stderr


@pytest.mark.parametrize("case", ["unknown_voice", "no_voices", "unwritable", "bad_media"])
def test_speech_errors_are_one_line_and_leave_no_file(cache, embedded_dir, tmp_path, case):
    out = tmp_path / "out.wav"
    args = ["generate", "Hi", "--speak", str(out), "--max-new-tokens", "3", "--max-audio-seconds", "0.5"]
    if case == "unknown_voice":
        args += ["--voice", "Nobody"]
    elif case == "no_voices":
        model = tmp_path / "model"
        model.mkdir()
        for f in embedded_dir.iterdir():
            if f.name != "spk_dict.pt":
                (model / f.name).symlink_to(f)
        args += ["--model", str(model)]
    elif case == "unwritable":
        args[3] = str(tmp_path / "missing_dir" / "out.wav")
    else:
        (tmp_path / "x.mp4").write_text("not a video")
        args += ["--video", str(tmp_path / "x.mp4")]
    r = omni(cache, *args, check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    line = [l for l in r.stderr.splitlines() if l.startswith("omni: error")]
    assert len(line) == 1
    assert {"unknown_voice": "Chelsie, Ethan", "no_voices": "spk_dict.pt", "unwritable": "missing_dir",
            "bad_media": "x.mp4"}[case] in line[0]
    assert not out.exists() and not list(tmp_path.glob(".out.wav*"))


def test_bench_runs_both_sides_and_reports_targets(cache, embedded_dir, tmp_path):
    """`omni bench` end to end at toy lengths: transformers and the engine on the same input, equal lengths."""
    out = tmp_path / "bench.json"
    r = omni(cache, "bench", "--configs", "default", "--text-tokens", "4", "--speech-seconds", "0.5",
             "--concurrency", "1,2", "--repeat", "2", "--placements", "one,split", "--json", str(out))
    d = json.loads(out.read_text())
    rows = {row["run"]: row for row in d["rows"]}
    assert set(rows) == {"transformers", "omni x1", "omni x2", "omni x1 speech worker", "omni x2 speech worker"}
    assert rows["transformers"]["runs"] == rows["omni x1"]["runs"] == rows["omni x1 speech worker"]["runs"] == 2
    assert rows["omni x2"]["runs"] == rows["omni x2 speech worker"]["runs"] == 1
    assert set(rows["omni x2 speech worker"]["busy_s"]) == {"thinker@engine", "talker@engine", "vocoder@speech"}
    assert set(rows["omni x2"]["busy_s"]) == {"thinker@engine", "talker@engine", "vocoder@engine"}
    for row in rows.values():  # forced lengths: half a second of speech on every side
        assert row["audio_s"] == pytest.approx(0.5, abs=0.02) and row["total_s"] > 0
    assert rows["omni x2"]["speech_s_per_wall_s"] > 0 and rows["omni x1"]["ttfa_s"] <= rows["omni x1"]["total_s"]
    assert {t["what"] for t in d["targets"]} >= {"default: total wall, one conversation <= 0.5 x reference",
                                                  "default: time to first audio <= 0.15 x reference total",
                                                  "default: one conversation's time to first audio with the speech "
                                                  "worker <= one worker's"}
    assert "omni x2" in r.stdout and "targets:" in r.stdout
