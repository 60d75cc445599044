"""talker/qwen3_omni_code2wav.py against transformers 5.23's Qwen3OmniMoeCode2Wav, one-shot and streamed.

The reference is built alone from each config of tests/reference_qwen3.py, with code2wav_config varied
here so the three differ (layers, heads incl. GQA, sliding window, upsampling rates), re-initialised by
`_reinit`, saved under `code2wav.` as model.safetensors and loaded strictly into ours.

Re-init: transformers' init (SnakeBeta alpha = beta = 0, ConvNeXt gamma 1e-6, layer scale 0.01) gives a
near-silent wave that barely depends on the ConvNeXt blocks or the attention, and a naive N(0, 1/fan_in)
grows the activations to ~600 by the last block, where fp32 rounding is amplified to 1e-2 (the reference
itself then is not prefix-stable). So: SnakeBeta parameters N(0, 0.3), layer scales and gammas N(0.7, 0.2),
q/k x3 (attention that depends on positions), then every conv is rescaled in forward order so its output
RMS on random codes is 1 (0.4 for the residual branches, 0.3 for the last conv: wave RMS ~0.2, almost
never clamped).

Planted bugs, each red: the conv window one frame short (4e-5: only the receptive field's far edge is
lost; a window one frame longer than needed measures exactly 0) or two short (8e-3), the KV window three
frames short (0.7), streamed vs our exact stream; the codebook order reversed (1.1), ours vs reference.
"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file

from omni.weights import CheckpointError, empty_params, load_module
from talker.qwen3_omni_code2wav import Code2Wav, Code2WavConfig
from tests.reference_qwen3 import CONFIG_NAMES, config, hf_config
from tests.reference_qwen3_speech import audible_code2wav

torch.set_num_threads(1)

PREFIX = "code2wav."
# fp32 on CPU; wave RMS ~0.2. One-shot uses the reference's ops in its order: measured max abs diff 0.
ONE_SHOT_TOL = dict(atol=1e-5, rtol=1e-5)
# Streamed (one frame per forward, 11-frame conv windows) vs one-shot: rounding of differently shaped
# attention products, amplified by the sharpened network; measured max abs diff 0.9-2.7e-5 (37-720 frames).
STREAM_TOL = dict(atol=1e-4, rtol=1e-4)
PLANTED_MIN = 1e-2
CONTEXT_MIN = 2e-5  # a window one frame longer than needed measures 0 (control in the test)

VARIANTS = {  # code2wav_config changes per config name, on top of the tiny config's
    "tiny": {},
    "deep": dict(num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2, sliding_window=16,
                 upsample_rates=[4, 5, 3], upsampling_ratios=[2]),
    "wide": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=2, sliding_window=24, decoder_dim=64, upsample_rates=[6, 5, 4, 2],
                 upsampling_ratios=[2, 3]),
}


def c2w_config(name: str) -> dict:
    d = config(name)
    d["code2wav_config"].update(VARIANTS[name])
    return d


def _load(name: str, out_dir) -> Code2Wav:
    with empty_params():
        ours = Code2Wav(Code2WavConfig.from_dict(c2w_config(name)["code2wav_config"]))
    return load_module(ours, out_dir, PREFIX)


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """name -> (reference, ours, checkpoint dir), built once per config."""
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeCode2Wav

    cache = {}

    def get(name: str):
        if name not in cache:
            torch.manual_seed(0)
            ref = Qwen3OmniMoeCode2Wav._from_config(hf_config(c2w_config(name)).code2wav_config).eval()
            audible_code2wav(ref)
            out = tmp_path_factory.mktemp(f"c2w_{name}")
            save_file({PREFIX + k: v.contiguous() for k, v in ref.state_dict().items()},
                      str(out / "model.safetensors"))
            cache[name] = ref, _load(name, out), out
        return cache[name]

    return get


@pytest.fixture(params=CONFIG_NAMES)
def models(request, build):
    return build(request.param)[:2]


def _codes(m, frames: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    c = m.cfg
    return torch.randint(0, c.codebook_size, (batch, c.num_quantizers, frames),
                         generator=torch.Generator().manual_seed(seed))


def _stream(m, codes, sizes=None, seed: int = 0, max_chunk: int = 16) -> list[torch.Tensor]:
    """codes (Q, T) pushed in groups (`sizes`, or random 1..12 frames); the pieces, `finish`'s last."""
    st, out, i, g = m.start(max_chunk), [], 0, torch.Generator().manual_seed(seed)
    while i < codes.shape[1]:
        k = sizes[len(out)] if sizes else int(torch.randint(1, 13, (1,), generator=g))
        out.append(m.push(st, codes[:, i:i + k]))
        i += k
    out.append(m.finish(st))
    assert st.emitted == m.out_len(codes.shape[1])
    return out


def _grid(T: int, max_chunk: int = 16) -> list[int]:
    """The chunk ends of a T-frame stream below T: 1, 3, 7, 15, 31, 47, ..."""
    ends, e, i = [], 0, 0
    while e + min(2 ** i, max_chunk) < T:
        e += min(2 ** i, max_chunk)
        ends.append(e)
        i += 1
    return ends


def _maxdiff(a, b) -> float:
    return (a - b).abs().max().item()


def test_keys_equal_reference(build):
    ref, ours, _ = build("tiny")
    assert sorted(ours.state_dict()) == sorted(ref.state_dict())


@torch.no_grad()
def test_one_shot_parity(models):
    ref, ours = models
    codes = _codes(ours, 90, batch=2)
    want, got = ref(codes), ours(codes)
    assert got.shape == want.shape == (2, 1, ours.out_len(90))
    print(f"one-shot {ours.cfg.upsample_rates}: max abs diff {_maxdiff(got, want):.2e}, wave rms "
          f"{want.pow(2).mean().sqrt():.3f}, clamped {(want.abs() >= 1).float().mean():.1e}")
    torch.testing.assert_close(got, want, **ONE_SHOT_TOL)
    other = codes.clone()
    other[:, 3, 40] = (other[:, 3, 40] + 1) % ours.cfg.codebook_size  # one code of the 4th codebook
    assert _maxdiff(ours(other), got) > PLANTED_MIN  # the wave depends on every codebook


@torch.no_grad()
def test_reference_is_prefix_stable(models):
    """What makes out_len(T) samples final after T frames: more frames leave them unchanged."""
    ref, ours = models
    codes = _codes(ours, 60)
    full = ref(codes)
    for t in (1, 2, 13, 40):
        torch.testing.assert_close(ref(codes[..., :t]), full[..., :ours.out_len(t)], **ONE_SHOT_TOL)


@torch.no_grad()
def test_stream_equals_one_shot_for_any_chunking(models):
    _, ours = models
    T = 2 * ours.cfg.sliding_window + 5 if ours.cfg.sliding_window < 72 else 100  # past the KV and conv windows
    assert T > ours.kv_frames + 1 and T > ours.context_frames + 1
    codes = _codes(ours, T, seed=1)[0]
    singles = _stream(ours, codes, sizes=[1] * T)
    assert singles[0].numel() == ours.out_len(1)  # the first chunk is one frame: audio after the first frame
    assert [t + 1 for t, p in enumerate(singles[:-1]) if p.numel()] == _grid(T)  # then chunks of 2, 4, 8, 16
    assert all(singles[e - 1].numel() == ours.out_len(e) - ours.out_len(b) for b, e in zip([0] + _grid(T), _grid(T)))
    one = torch.cat(singles)
    assert torch.equal(torch.cat(_stream(ours, codes, seed=0)), one)  # bit for bit
    assert torch.equal(torch.cat(_stream(ours, codes, sizes=[T])), one)
    want = ours(codes[None])[0, 0]
    print(f"stream {ours.cfg.upsample_rates}: {T} frames, max abs diff vs one-shot {_maxdiff(one, want):.2e}")
    torch.testing.assert_close(one, want, **STREAM_TOL)


@pytest.fixture(scope="module")
def long_tiny(build):
    """(reference, ours, codes (1, Q, 720), one-shot wave (720 frames, 57.6 s))."""
    ref, ours, _ = build("tiny")
    codes = _codes(ours, 720, seed=2)
    with torch.no_grad():
        return ref, ours, codes, ours(codes)[0, 0]


@torch.no_grad()
def test_long_utterance_streams_exactly(long_tiny):
    ref, ours, codes, want = long_tiny
    got = torch.cat(_stream(ours, codes[0], seed=3))
    print(f"stream 720 frames: max abs diff vs one-shot {_maxdiff(got, want):.2e}")
    torch.testing.assert_close(got, want, **STREAM_TOL)


@torch.no_grad()
def test_transformers_chunked_decode_is_one_shot_only_up_to_300_codes(long_tiny):
    ref, ours, codes, want = long_tiny
    torch.testing.assert_close(ref.chunked_decode(codes[..., :300])[0, 0], want[:ours.out_len(300)],
                               **ONE_SHOT_TOL)
    chunked = ref.chunked_decode(codes)[0, 0]  # chunks [0, 300), [300, 600), [600, 720), 25 frames of context
    lost = ours.out_len(720) - chunked.numel()
    assert lost == 2 * (ours.samples_per_frame * 300 - ours.out_len(300)) == 2 * 555  # per boundary
    head = ours.out_len(300)
    torch.testing.assert_close(chunked[:head], want[:head], **ONE_SHOT_TOL)
    shifted = _maxdiff(chunked[head:head + 1920 * 100], want[head:head + 1920 * 100])  # as a caller sees it
    aligned = _maxdiff(chunked[head:head + 1920 * 100], want[1920 * 300:1920 * 400])  # 25 frames of context
    print(f"chunked_decode at 720 frames: {lost} samples dropped; after 300 codes max abs diff "
          f"{shifted:.2e} as returned, {aligned:.2e} realigned by 555 samples")
    assert shifted > PLANTED_MIN and aligned > PLANTED_MIN


@torch.no_grad()
def test_batched_advance_equals_each_alone(build):
    """Three streams at 0, 20 and 74 frames (the last past the sliding window of 72 on the way), advanced
    together by different numbers of frames (0 included), equal each stream advanced alone (copies of the
    same states, pushed the same groups)."""
    _, ours, _ = build("tiny")
    lengths, primed = (9, 40, 90), (0, 20, 74)
    plan = [(1, 5, 3), (4, 0, 1), (4, 15, 12)]
    codes = [_codes(ours, n, seed=10 + i)[0] for i, n in enumerate(lengths)]
    streams = [ours.start() for _ in codes]
    for c, p, st in zip(codes, primed, streams):
        ours.push(st, c[:, :p])
    alone_states = copy.deepcopy(streams)
    primed_samples = [st.emitted for st in streams]  # up to the last chunk boundary the priming crossed
    got, alone, pos = [[] for _ in codes], [[] for _ in codes], list(primed)
    for step in plan:
        chunks = [c[:, q:q + k] for c, q, k in zip(codes, pos, step)]
        for i, o in enumerate(ours.advance(streams, chunks)):
            got[i].append(o)
            alone[i].append(ours.push(alone_states[i], chunks[i]))
            pos[i] += step[i]
    assert pos == list(lengths)
    for i, o in enumerate(ours.advance(streams, [c[:, :0] for c in codes], final=[True] * 3)):  # one batched finish
        got[i].append(o)
        alone[i].append(ours.finish(alone_states[i]))
    assert all(s.finished and s.emitted == ours.out_len(n) for s, n in zip(streams, lengths))
    got, alone = [torch.cat(g) for g in got], [torch.cat(a) for a in alone]
    print(f"batched advance of 3 streams vs alone: max abs diff {max(map(_maxdiff, got, alone)):.2e}, "
          f"bit-equal {[torch.equal(g, a) for g, a in zip(got, alone)]}")
    for g, a in zip(got, alone):
        torch.testing.assert_close(g, a, atol=1e-5, rtol=1e-5)
    want = ours(codes[2][None])[0, 0, primed_samples[2]:]
    torch.testing.assert_close(got[2], want, **STREAM_TOL)


def test_strict_loading_names_the_key(build, tmp_path):
    from safetensors.torch import load_file

    _, _, out = build("tiny")
    state = load_file(str(out / "model.safetensors"))
    key = "code2wav.decoder.2.block.3.conv1.conv.weight"
    missing = {k: v for k, v in state.items() if k != key}
    save_file(missing, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        _load("tiny", tmp_path)
    bad = dict(state)
    bad["code2wav.pre_transformer.layers.1.mlp.up_proj.weight"] = torch.zeros(3, 3)
    save_file(bad, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"layers\.1\.mlp\.up_proj\.weight has shape \(3, 3\)"):
        _load("tiny", tmp_path)
    extra = dict(state)
    extra["code2wav.decoder.9.conv.weight"] = torch.zeros(1)
    save_file(extra, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"unexpected tensor code2wav\.decoder\.9\.conv\.weight"):
        _load("tiny", tmp_path)


@pytest.mark.parametrize("bug", ["conv_context_minus_1", "conv_context_minus_2", "kv_window_minus_3",
                                 "codebooks_reversed"])
@torch.no_grad()
def test_planted_bug_is_caught(build, bug, monkeypatch):
    """Streaming bugs are measured against our exact stream: its transformer numbers are then the same bit for
    bit, and conv windows of another length round the same (the control, one frame longer: 0 difference), so
    what is left is the bug alone. Chunks of one frame: every frame's window then starts at its context's
    edge, where a window that is too short shows (in longer chunks only a chunk's first frames reach it)."""
    ref, ours, _ = build("tiny")
    ours = copy.deepcopy(ours)
    codes = _codes(ours, 80 if bug.startswith("kv") else 30, seed=4)
    if bug == "codebooks_reversed":
        ours.code_offset = ours.code_offset.flip(1)
        d, least = _maxdiff(ours(codes), ref(codes)), PLANTED_MIN
    else:
        exact = torch.cat(_stream(ours, codes[0], seed=5, max_chunk=1))
        if bug.startswith("conv_context"):  # the window starts `cut` frames late once it has context
            cut, start = int(bug[-1]), ours.window_start
            with monkeypatch.context() as m:  # control: one frame more than needed is still exact
                m.setattr(ours, "context_frames", ours.context_frames + 1)
                m.setattr(ours, "window_start", lambda t: max(0, start(t) - 1))
                floor = _maxdiff(torch.cat(_stream(ours, codes[0], seed=5, max_chunk=1)), exact)
            print(f"code2wav conv window one frame longer (exact): max abs diff {floor:.2e}")
            assert floor < CONTEXT_MIN / 4
            monkeypatch.setattr(ours, "window_start", lambda t: start(t) + cut if start(t) else 0)
        else:
            monkeypatch.setattr(ours, "kv_frames", ours.kv_frames - 3)
        d = _maxdiff(torch.cat(_stream(ours, codes[0], seed=5, max_chunk=1)), exact)
        # one frame short only loses the receptive field's far edge (a product of edge taps): ~6e-5
        least = CONTEXT_MIN if bug == "conv_context_minus_1" else PLANTED_MIN / 10
    print(f"code2wav planted {bug}: max abs diff {d:.2e}")
    assert d > least, f"planted bug {bug} moved the output only {d:.2e}"


def test_config_defaults_sizes_and_receptive_field():
    from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeCode2WavConfig

    cfg, hf = Code2WavConfig.from_dict({"model_type": "", "not_a_key": 1}), Qwen3OmniMoeCode2WavConfig()
    for f in cfg.__dataclass_fields__:
        if f not in ("extra", "rope_theta", "rope_scaling", "rope_parameters", "head_dim"):
            assert getattr(cfg, f) == (list(v) if isinstance(v := getattr(hf, f), tuple) else v), f
    assert cfg.get_rope_theta() == hf.rope_parameters["rope_theta"] and cfg.extra["not_a_key"] == 1
    assert Code2WavConfig.from_dict({"rope_theta": 5000}).get_rope_theta() == 5000  # the real config's spelling
    with empty_params():
        real = Code2Wav(cfg)  # the real sizes, on the meta device
    assert real.samples_per_frame == 1920 and real.context_frames == 10 and real.kv_frames == 71
    assert [real.out_len(t) for t in (0, 1, 2, 300)] == [0, 1365, 3285, 1920 * 300 - 555]
    assert real.window_start(10) == 0 and real.window_start(11) == 1 and real.window_start(100) == 90
    for name in CONFIG_NAMES:
        with empty_params():
            m = Code2Wav(Code2WavConfig.from_dict(c2w_config(name)["code2wav_config"]))
        print(f"{name}: rates {m.cfg.upsampling_ratios}+{m.cfg.upsample_rates}, {m.samples_per_frame} samples/frame, "
              f"first packet {m.out_len(1)}, conv context {m.context_frames} frames, KV {m.kv_frames} frames")
