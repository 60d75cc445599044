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
    assert set(shape_names()) >= {"qwen2.5-omni-3b", "qwen2.5-omni-7b", "qwen3-omni-30b-a3b"}
    assert all(p.suffix == ".json" for p in SHAPES_DIR.iterdir())


def test_device_check_dry(tmp_path):
    """scripts/device-check --dry: the CUDA tests on the CPU, then both shape benches at their tiny shapes."""
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
    assert set(q3["not_available"]) == {"talker", "code2wav", "ttfa"}
