"""The published shapes as data, the shape bench end to end at a tiny shape, and scripts/device-check --dry."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from omni.bench_shapes import SHAPES_DIR, TINY, parse, read_shape, shape_names

ROOT = Path(__file__).resolve().parents[1]


def _keys(d: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in d.items():
        if k.startswith("_"):
            continue
        out.add(prefix + k)
        if isinstance(v, dict) and not k.startswith("rope"):
            out |= _keys(v, f"{prefix}{k}.")
    return out


@pytest.mark.parametrize("name", ["qwen2.5-omni-3b", "qwen2.5-omni-7b", "qwen3-omni-30b-a3b"])
def test_shape_tables_follow_the_config_schema(name):
    raw = read_shape(name)
    assert raw["_source"].startswith("https://huggingface.co/Qwen/") and "_unverified" in raw
    cfg = parse(raw)  # the config classes take every key: none is unknown to them
    for part in ("thinker_config", "talker_config", "token2wav_config"):
        sub = getattr(cfg, part, None)
        if hasattr(sub, "extra"):
            assert sub.extra == {}, (part, sub.extra)
    # the Thinker's keys are the shared tiny config's (same schema), none invented
    tiny = _keys(json.loads(TINY[raw["model_type"]].read_text()))
    legacy = {"rope_theta", "rope_scaling"}  # the official files' spelling of the tiny configs' rope_parameters
    ours = {k for k in _keys(raw) if k.startswith("thinker_config.text_config.") and k.split(".")[-1] not in legacy}
    fields = {f"thinker_config.text_config.{f.name}" for f in dataclasses.fields(cfg.thinker_config.text_config)}
    assert ours <= tiny | fields, ours - tiny - fields  # a key the tiny config omits is still one the class reads


def test_published_values():
    s3, s7, q3 = (parse(read_shape(n)) for n in ("qwen2.5-omni-3b", "qwen2.5-omni-7b", "qwen3-omni-30b-a3b"))
    t3, t7, tq = (c.thinker_config.text_config for c in (s3, s7, q3))
    assert (t3.hidden_size, t3.num_hidden_layers, t3.num_attention_heads, t3.num_key_value_heads, t3.vocab_size) \
        == (2048, 36, 16, 2, 151936)
    assert (t7.hidden_size, t7.num_hidden_layers, t7.intermediate_size, t7.vocab_size) == (3584, 28, 18944, 152064)
    for c, d in ((s3, 2048), (s7, 3584)):
        assert c.talker_config.embedding_size == c.thinker_config.vision_config.out_hidden_size == d
        assert c.thinker_config.audio_config.output_dim == d and c.talker_config.vocab_size == 8448
    assert (tq.num_hidden_layers, tq.num_experts, tq.num_experts_per_tok, tq.moe_intermediate_size) == (48, 128, 8, 768)
    assert tq.get_mrope_section() == [24, 20, 20] and tq.rope_params()["interleaved"] is True
    # FACTS.md: the Qwen3 thinker's KV is 96 KiB per token in bf16
    assert tq.num_hidden_layers * 2 * tq.num_key_value_heads * tq.get_head_dim() * 2 == 96 * 1024
    # FACTS.md's Qwen3 speech part: the Talker and Code2Wav configs parse with no key left over
    from talker.qwen3_omni_code2wav import Code2Wav, Code2WavConfig
    from talker.qwen3_omni_talker import Qwen3OmniTalkerConfig
    from omni.weights import empty_params

    tk, c2 = Qwen3OmniTalkerConfig.from_dict(q3.talker_config), Code2WavConfig.from_dict(q3.code2wav_config)
    assert tk.extra == {} and c2.extra == {}
    text, cp = tk.text_config, tk.code_predictor_config
    assert (text.num_hidden_layers, text.hidden_size, text.num_experts, text.num_experts_per_tok) == (20, 1024, 128, 6)
    assert text.shared_expert_intermediate_size == 768 and text.vocab_size == 3072 and cp.num_hidden_layers == 5
    assert tk.num_code_groups == cp.num_code_groups == c2.num_quantizers == 16 and tk.accept_hidden_layer == 24
    assert (tk.codec_pad_id, tk.codec_bos_id, tk.codec_eos_token_id) == (2148, 2149, 2150)
    assert tk.speaker_id == {"chelsie": 2301, "ethan": 2302, "aiden": 2303}
    # the Talker's KV is 20 KiB per token in bf16
    assert text.num_hidden_layers * 2 * text.num_key_value_heads * text.get_head_dim() * 2 == 20 * 1024
    assert (c2.num_hidden_layers, c2.decoder_dim, c2.sliding_window) == (8, 1536, 72)
    with empty_params():
        c2w = Code2Wav(c2)
    assert c2w.out_len(1) == 1365 and c2w.out_len(10) == 1920 * 10 - 555 and c2w.context_frames == 10
    assert set(shape_names()) >= {"qwen2.5-omni-3b", "qwen2.5-omni-7b", "qwen3-omni-30b-a3b"}
    assert all(p.suffix == ".json" for p in SHAPES_DIR.iterdir())


def test_device_check_dry(tmp_path):
    """scripts/device-check --dry: the CUDA tests on the CPU, then both shape benches at their tiny shapes
    (Qwen3's with its Talker, Code2Wav and first-audio stages)."""
    out = tmp_path / "dc.json"
    env = {**os.environ, "PYTHON": sys.executable}
    p = subprocess.run([str(ROOT / "scripts" / "device-check"), "--dry", str(out)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stderr[-4000:]
    res = json.loads(out.read_text())
    assert res["device"] == "cpu" and res["dry"] and all(s["passed"] for s in res["steps"].values())
    assert res["tests"] and all(v == "passed" for v in res["tests"].values()), res["tests"]
    q25, q3 = res["qwen2.5-omni-7b"], res["qwen3-omni-30b-a3b"]
    assert q25["dry"] and [d["conversations"] for d in q25["thinker"]["decode"]] == [1, 4]
    assert all(d["step_ms"] > 0 and d["floor_ms"] > 0 for d in q25["thinker"]["decode"] + q25["talker"]["step"])
    assert q25["token2wav"]["first_window_s"] > 0 and q25["token2wav"]["rtf"]
    assert all(d["ttfa_p50_s"] > 0 for d in q25["ttfa"])
    assert q3["thinker"]["decode"][0]["weights_read_gb"] > 0
    _check_qwen3_speech(q3, [1, 4])


def _check_qwen3_speech(q3: dict, levels: list[int]) -> None:
    """The Qwen3 speech stages' figures: every level there, positive times, the streamed samples exactly
    out_len(frames) and one-shot's count, the first chunk one frame (1365 samples at the real rates and the
    tiny ones), first audio before the end, conversation 0's parts adding up to no more than its first audio."""
    assert "not_available" not in q3 and q3["weights_gb"]["talker"] > 0 and q3["weights_gb"]["code2wav"] > 0
    t = q3["talker"]
    assert t["prefill_s"] > 0 and t["prefill_rows"] > 0 and [d["conversations"] for d in t["step"]] == levels
    assert all(d["step_ms"] > 0 and 0 < d["floor_ms"] < d["step_ms"] and d["weights_read_gb"] > 0 for d in t["step"])
    c = q3["code2wav"]
    assert c["first_chunk_samples"] == 1365 and c["first_chunk_s"] > 0
    assert [d["conversations"] for d in c["rtf"]] == levels
    for d in c["rtf"]:
        assert d["samples_each"] == d["samples_min"] == d["expected_samples"] == d["oneshot_samples"] == 1920 * c["frames"] - 555
        assert d["rtf"] > 0 and d["oneshot_rtf"] > 0
    assert [d["conversations"] for d in q3["ttfa"]] == levels
    for d in q3["ttfa"]:
        assert 0 < d["ttfa_p50_s"] <= d["ttfa_max_s"] < d["total_s"] and d["first_chunk_samples"] == 1365
        parts = d["first_prefill_s"] + d["first_talker_prefill_s"] + d["first_frame_s"] + d["first_chunk_s"]
        assert 0 < parts <= d["ttfa_max_s"] and d["frames_each"] >= 2


def test_qwen3_speech_stages_dry(tmp_path):
    """`omni bench --shape qwen3-omni-30b-a3b --dry` with the speech stages only, in process: the Talker,
    Code2Wav and first-audio figures at the tiny shape, and the report's rows for them."""
    import argparse

    import torch

    from omni.bench_shapes import report, run_shape

    torch.set_num_threads(1)
    o = argparse.Namespace(device="cpu", dtype=torch.bfloat16, stages=["talker", "code2wav", "ttfa"], levels=[1, 2],
                           prompt_tokens=48, steps=2, speech_seconds=0.4, dry=True)
    r = run_shape("qwen3-omni-30b-a3b", o)
    _check_qwen3_speech(r, [1, 2])
    assert r["code2wav"]["frames"] == 5 and all(d["frames_each"] == 5 for d in r["ttfa"])
    text = report(r)
    for row in ("talker step", "code2wav", "first audio", "Talker prefill"):
        assert row in text, text


def test_shape_tables_ship_in_a_wheel(tmp_path):
    """A non-editable install carries omni/shapes/*.json (setuptools package data): the project built as a
    wheel and installed into a bare directory finds every shape there, through importlib.resources and
    through bench_shapes' own reading."""
    import shutil
    import zipfile

    import tomllib

    src = tmp_path / "src"  # built from a copy: an in-tree build would leave build/ and *.egg-info behind
    src.mkdir()
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / f, src / f)
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    for top in sorted({p.split(".")[0] for p in packages}):
        shutil.copytree(ROOT / top, src / top, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp_path / "dist"),
                    str(src)], check=True, timeout=300, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("omni-*.whl")
    want = sorted(p.name for p in SHAPES_DIR.glob("*.json"))
    assert len(want) == 3
    assert sorted(Path(n).name for n in zipfile.ZipFile(wheel).namelist() if n.startswith("omni/shapes/")) == want
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)], check=True,
                   timeout=300, capture_output=True)
    probe = ("import importlib.resources as r, json, omni, omni.bench_shapes as b\n"
             "print(json.dumps({'file': omni.__file__, 'names': b.shape_names(),\n"
             "  'resources': sorted(p.name for p in r.files('omni').joinpath('shapes').iterdir()),\n"
             "  'types': [b.read_shape(n)['model_type'] for n in b.shape_names()]}))")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": str(site)})
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert Path(got["file"]).is_relative_to(site)  # the installed copy, not this checkout
    assert got["resources"] == want and got["names"] == [Path(n).stem for n in want]
    assert got["types"] == ["qwen2_5_omni", "qwen2_5_omni", "qwen3_omni_moe"]
