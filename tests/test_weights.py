"""Strict checkpoint loading: every tensor accounted for, errors that name the key, shards, config spellings."""

import json
from pathlib import Path
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from omni.config import ConfigError, OmniConfig
from omni.pipeline import OmniModel
from omni.thinker import Thinker
from omni.weights import Checkpoint, CheckpointError, empty_params, load_module
from tests.reference import build_reference, config


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    _, path = build_reference("tiny", tmp_path_factory.mktemp("tiny"))
    return path


def _edited(tmp_path, src, edit):
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    sd = load_file(dst / "model.safetensors")
    edit(sd)
    save_file(sd, dst / "model.safetensors")
    return dst


def _load_thinker(path):
    cfg = OmniConfig.from_file(path)
    with empty_params():
        th = Thinker(cfg.thinker_config)
    return load_module(th, path, "thinker.")


def test_missing_tensor_is_named(tmp_path, tiny_dir):
    key = "thinker.model.layers.1.self_attn.k_proj.bias"
    path = _edited(tmp_path, tiny_dir, lambda sd: sd.pop(key))
    with pytest.raises(CheckpointError, match=f"missing tensor {key}"):
        _load_thinker(path)


def test_unexpected_tensor_is_named(tmp_path, tiny_dir):
    key = "thinker.visual.blocks.0.attn.extra.weight"
    path = _edited(tmp_path, tiny_dir, lambda sd: sd.__setitem__(key, torch.zeros(2)))
    with pytest.raises(CheckpointError, match=f"unexpected tensor {key}"):
        _load_thinker(path)


def test_misshaped_tensor_is_named(tmp_path, tiny_dir):
    key = "thinker.audio_tower.conv1.weight"

    def edit(sd):
        sd[key] = sd[key][:, :, :2].contiguous()

    path = _edited(tmp_path, tiny_dir, edit)
    with pytest.raises(CheckpointError, match=rf"{key} has shape \(64, 128, 2\), expected \(64, 128, 3\)"):
        _load_thinker(path)


def test_every_checkpoint_tensor_is_loaded_exactly(tiny_dir):
    th = _load_thinker(tiny_dir)
    sd = load_file(tiny_dir / "model.safetensors")
    ours = th.state_dict()
    assert set("thinker." + k for k in ours) == {k for k in sd if k.startswith("thinker.")}
    for k, v in ours.items():
        assert torch.equal(v, sd["thinker." + k]), k
    assert not any(p.is_meta for p in th.parameters())


def test_sharded_checkpoint_loads_and_equals_single_file(tmp_path, tiny_dir):
    _, sharded = build_reference("tiny", tmp_path / "sharded", max_shard_size="300KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert len(Checkpoint(sharded).keys()) == len(Checkpoint(tiny_dir).keys())
    a, b = _load_thinker(sharded), _load_thinker(tiny_dir)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_missing_shard_is_named(tmp_path):
    _, sharded = build_reference("tiny", tmp_path / "sharded", max_shard_size="300KB")
    victim = sorted(sharded.glob("model-*.safetensors"))[0]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        Checkpoint(sharded)


def test_bf16_load_casts_floats(tiny_dir):
    model = OmniModel.load(tiny_dir, dtype=torch.bfloat16)
    assert model.thinker.lm_head.weight.dtype == torch.bfloat16
    assert model.thinker.model.rotary.inv_freq.dtype == torch.float32  # computed buffers stay fp32


def test_other_model_type_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_vl"}))
    with pytest.raises(ConfigError, match="model_type is 'qwen2_vl'"):
        OmniConfig.from_file(tmp_path)


def test_legacy_and_new_rope_spellings_agree():
    d = config("tiny")
    new = OmniConfig.from_dict(d).thinker_config.text_config
    tc = d["thinker_config"]["text_config"]
    rp = tc.pop("rope_parameters")
    tc["rope_theta"] = rp["rope_theta"]
    tc["rope_scaling"] = {"type": "default", "rope_type": "default", "mrope_section": rp["mrope_section"]}
    legacy = OmniConfig.from_dict(d).thinker_config.text_config
    assert legacy.get_rope_theta() == new.get_rope_theta() == 1e6
    assert legacy.get_mrope_section() == new.get_mrope_section() == [4, 6, 6]


def test_stored_copies_of_computed_buffers_are_ignored(tmp_path, tiny_dir):
    """Some exports also store rotary inv_freq; it is computed, so a stored copy is accepted and unused."""
    key = "thinker.model.rotary.inv_freq"
    path = _edited(tmp_path, tiny_dir, lambda sd: sd.__setitem__(key, torch.zeros(8)))
    th = _load_thinker(path)
    assert th.model.rotary.inv_freq.abs().min() > 0


@pytest.mark.parametrize("name", ["tiny_qwen2_5_omni_config.json", "tiny_qwen3_omni_config.json"])
def test_shared_config_copy_is_current(name):
    shared = Path(__file__).resolve().parents[2] / "shared" / "reference" / name
    copy = Path(__file__).with_name("data") / name
    if not shared.exists():
        pytest.skip("../shared is not beside this clone")
    assert json.loads(copy.read_text()) == json.loads(shared.read_text())
