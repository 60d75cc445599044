"""Parity of encoders/qwen3_omni_audio.py with transformers 5.23's Qwen3OmniMoeAudioEncoder.

The reference encoder is built alone from each config of tests/reference_qwen3.py (much faster than the
whole model), seeded, sharpened, saved under `thinker.audio_tower.` and loaded strictly into ours.

Sharpening: besides the conv and q/k scaling of reference_qwen3.sharpen(), v/out_proj, conv_out and
proj1/proj2 are scaled. With the convs and q/k alone the output is ~0.02 and nearly the same for every
chunk (the sinusoids dominate the residual stream), so two swapped chunks move it by ~1e-3 and full
attention instead of windows by ~1e-4; sharpened, outputs are O(1) and each planted bug moves them by
0.1 or more.

Planted bugs (test_planted_bug_is_caught), each must move the output far past the parity tolerance:
positions not restarted per chunk, full attention instead of n_window_infer windows, two 1 s chunks
swapped.
"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file

import encoders.qwen3_omni_audio as audio_mod
from encoders.qwen3_omni_audio import Qwen3OmniAudioConfig, Qwen3OmniAudioEncoder, audio_token_count
from omni.weights import CheckpointError, empty_params, load_module
from tests.reference_qwen3 import CONFIG_NAMES, config, hf_config

torch.set_num_threads(1)

PREFIX = "thinker.audio_tower."
# fp32 on CPU. Outputs are O(1) (max |out| 2-7); measured max abs diffs are 0 (same ops in the same order).
TOL = dict(atol=2e-5, rtol=1e-5)
# A planted bug must move some output by at least this much (x1000 the tolerance).
PLANTED_MIN = 2e-2

LENS = {
    "5s+1.3s+0.3s": [500, 130, 30],
    "edges": [201, 99, 100, 101, 1, 7],  # 1-frame tail, just under/at/over 1 s, tiny clips
    "17s": [1700],  # past n_window_infer at every config: several attention windows
    "all_under_1s": [30, 7, 61],  # the longest chunk is short: padding and windows follow it
    "0.3s_alone": [30],
}


@torch.no_grad()
def _sharpen(ref) -> None:
    for conv, k in ((ref.conv2d1, 6), (ref.conv2d2, 3), (ref.conv2d3, 3)):
        conv.weight.mul_(k)
    for layer in ref.layers:
        attn = layer.self_attn
        attn.q_proj.weight.mul_(12)
        attn.k_proj.weight.mul_(12)
        attn.v_proj.weight.mul_(8)
        attn.out_proj.weight.mul_(8)
    ref.conv_out.weight.mul_(10)
    ref.proj1.weight.mul_(10)
    ref.proj2.weight.mul_(10)


def _save(state: dict, out_dir) -> None:
    save_file({PREFIX + k: v.contiguous() for k, v in state.items()}, str(out_dir / "model.safetensors"))


def _load(name: str, out_dir) -> Qwen3OmniAudioEncoder:
    cfg = Qwen3OmniAudioConfig.from_dict(config(name)["thinker_config"]["audio_config"])
    with empty_params():
        ours = Qwen3OmniAudioEncoder(cfg)
    return load_module(ours, out_dir, PREFIX)


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """name -> (reference encoder, our encoder, its state dict), built once per config."""
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeAudioEncoder

    cache = {}

    def get(name: str):
        if name not in cache:
            torch.manual_seed(0)
            ref = Qwen3OmniMoeAudioEncoder(hf_config(config(name)).thinker_config.audio_config).eval()
            _sharpen(ref)
            out = tmp_path_factory.mktemp(f"aut_{name}")
            _save(ref.state_dict(), out)
            cache[name] = ref, _load(name, out), ref.state_dict()
        return cache[name]

    return get


@pytest.fixture(params=CONFIG_NAMES)
def models(request, build):
    return build(request.param)[:2]


def _mels(lens, n_mels=128, seed=0):
    return torch.randn(n_mels, sum(lens), generator=torch.Generator().manual_seed(seed)) * 0.8


@torch.no_grad()
def _ref(ref, mel, lens):
    return ref(mel, feature_lens=torch.tensor(lens)).last_hidden_state


def _maxdiff(a, b):
    return (a.float() - b.float()).abs().max().item()


def test_keys_equal_reference(build):
    ref, ours, _ = build("tiny")
    assert sorted(ours.state_dict()) == sorted(ref.state_dict())
    assert not any("positional_embedding" in k for k in ours.state_dict())  # computed, as in the reference


@pytest.mark.parametrize("lens", list(LENS.values()), ids=list(LENS))
@torch.no_grad()
def test_parity(models, lens):
    ref, ours = models
    mel = _mels(lens)
    want = _ref(ref, mel, lens)
    got = ours(mel, lens)
    assert got.shape == (sum(audio_token_count(n) for n in lens), ours.cfg.output_dim) == want.shape
    print(f"audio {lens}: max abs diff {_maxdiff(got, want):.2e}, max |out| {want.abs().max():.2f}")
    torch.testing.assert_close(got, want, **TOL)


@torch.no_grad()
def test_conv_chunksize_changes_nothing(models, monkeypatch):
    ref, ours = models
    lens = LENS["5s+1.3s+0.3s"]  # 8 chunks
    mel = _mels(lens)
    want = _ref(ref, mel, lens)
    for size in (1, 3):
        monkeypatch.setattr(ours, "conv_chunksize", size)
        torch.testing.assert_close(ours(mel, lens), want, **TOL)
    monkeypatch.setattr(ref, "conv_chunksize", 3)
    torch.testing.assert_close(_ref(ref, mel, lens), want, **TOL)


@torch.no_grad()
def test_tail_chunks_depend_on_the_call_like_the_reference(models):
    """Clips of whole seconds give the same tokens alone or together; a clip under 1 s does not: the
    reference pads it to the call's longest chunk before the convolutions (we match it per call)."""
    ref, ours = models
    mel = _mels([300, 200])
    torch.testing.assert_close(torch.cat([ours(mel[:, :300], [300]), ours(mel[:, 300:], [200])]),
                               ours(mel, [300, 200]), **TOL)
    mel = _mels([100, 30])
    alone, together = _ref(ref, mel[:, 100:], [30]), _ref(ref, mel, [100, 30])[13:]
    assert _maxdiff(alone, together) > PLANTED_MIN
    torch.testing.assert_close(ours(mel, [100, 30])[13:], together, **TOL)


def _swap_first_chunks(orig):
    def f(features, lengths, chunk):
        chunks = orig(features, lengths, chunk)
        chunks[0], chunks[1] = chunks[1], chunks[0]
        return chunks
    return f


@pytest.mark.parametrize("bug", ["positions_not_restarted", "full_attention", "chunks_swapped"])
@torch.no_grad()
def test_planted_bug_is_caught(models, bug, monkeypatch):
    ref, ours = models
    lens = LENS["17s"] if bug == "full_attention" else LENS["5s+1.3s+0.3s"]
    mel = _mels(lens)
    want = _ref(ref, mel, lens)
    if bug == "positions_not_restarted":  # positions run on across chunks
        monkeypatch.setattr(audio_mod, "chunk_positions", lambda n, t: torch.arange(n * t).view(n, t))
    elif bug == "full_attention":  # one window per clip
        monkeypatch.setattr(audio_mod, "attention_windows",
                            lambda counts, window: [0] + torch.tensor(counts).cumsum(0).tolist())
    elif bug == "chunks_swapped":  # seconds 0-1 and 1-2 of the first clip change places
        monkeypatch.setattr(audio_mod, "chunk_features", _swap_first_chunks(audio_mod.chunk_features))
    got = ours(mel, lens)
    assert got.shape == want.shape
    d = _maxdiff(got, want)
    print(f"audio planted {bug}: max abs diff {d:.2e}")
    assert d > PLANTED_MIN, f"planted bug {bug} moved the output only {d:.2e}"


def test_audio_token_count():
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import _get_feat_extract_output_lengths

    n = torch.arange(1, 2000)
    assert [audio_token_count(int(i)) for i in n] == _get_feat_extract_output_lengths(n).tolist()
    assert [audio_token_count(f) for f in (1, 99, 100, 101, 800)] == [1, 13, 13, 14, 104]


def test_config_from_dict_defaults_and_checks():
    from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeAudioEncoderConfig

    cfg, hf = Qwen3OmniAudioConfig.from_dict({"dropout": 0.1, "not_a_key": 1}), Qwen3OmniMoeAudioEncoderConfig()
    for f in cfg.__dataclass_fields__:
        assert getattr(cfg, f) == getattr(hf, f), f
    d = config("wide")["thinker_config"]["audio_config"]
    assert Qwen3OmniAudioConfig.from_dict(d).d_model == 64
    with pytest.raises(ValueError, match="n_window_infer 50"):
        Qwen3OmniAudioConfig.from_dict({**d, "n_window_infer": 50})
    with pytest.raises(ValueError, match="n_window must be 50"):
        Qwen3OmniAudioConfig.from_dict({**d, "n_window": 25})


def test_bad_inputs_are_refused(build):
    _, ours, _ = build("tiny")
    mel = _mels([100])
    with pytest.raises(ValueError, match="sum to 90 frames but features has 100"):
        ours(mel, [90])
    with pytest.raises(ValueError, match="must be positive"):
        ours(mel, [100, 0])
    with pytest.raises(ValueError, match="n_mels=128"):
        ours(mel[:80], [100])
    assert ours(mel[:, :0], []).shape == (0, ours.cfg.output_dim)


@pytest.mark.parametrize("case", ["missing", "extra", "wrong_shape"])
def test_strict_loading_errors(build, tmp_path, case):
    _, _, state = build("tiny")
    state = dict(state)
    if case == "missing":
        key = "layers.1.fc2.bias"
        del state[key]
        match = f"missing tensor {PREFIX}{key}"
    elif case == "extra":
        key = "layers.1.fc3.weight"
        state[key] = torch.zeros(3)
        match = f"unexpected tensor {PREFIX}{key}"
    else:
        key = "conv_out.weight"
        state[key] = state[key][:, :-1]
        match = rf"{PREFIX}{key} has shape \(32, 255\), expected \(32, 256\)"
    _save(state, tmp_path)
    with pytest.raises(CheckpointError, match=match):
        _load("tiny", tmp_path)


@torch.no_grad()
def test_stored_position_table_is_ignored(build, tmp_path):
    ref, ours, state = build("tiny")
    _save({**state, "positional_embedding.positional_embedding": torch.zeros(1500, 32)}, tmp_path)
    loaded = _load("tiny", tmp_path)
    lens = LENS["5s+1.3s+0.3s"]
    torch.testing.assert_close(loaded(_mels(lens), lens), _ref(ref, _mels(lens), lens), **TOL)


@torch.no_grad()
def test_bf16_runs_close(models):
    ref, ours = models
    lens = LENS["5s+1.3s+0.3s"]
    mel = _mels(lens)
    want = _ref(ref, mel, lens)
    got = copy.deepcopy(ours).bfloat16()(mel.bfloat16(), lens)  # the fixture stays fp32
    assert got.dtype == torch.bfloat16
    rel = ((got.float() - want).norm() / want.norm()).item()
    print(f"audio bf16 vs fp32 reference: relative error {rel:.2e}")
    assert rel < 0.1, f"bf16 relative error {rel:.2e}"
