"""Parity of encoders/vision.py and encoders/audio.py with transformers' Qwen2.5-Omni encoders.

The reference encoders are built alone from each test config (much faster than the whole model),
seeded and sharpened like tests/reference.py's sharpen(), saved under the checkpoint prefixes
`thinker.visual.` / `thinker.audio_tower.` and loaded strictly into ours.

Planted bugs (test_*_planted_bug_is_caught) each must move the output far past the parity
tolerance: a mirrored image, w positions mirrored, rotary h/w swapped, window order not restored,
window attention replaced by full attention, two 2 s audio windows swapped, audio not cut into
windows.
"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file

import encoders.audio as audio_mod
import encoders.vision as vision_mod
from encoders.audio import AudioEncoder, audio_token_count
from encoders.vision import VisionEncoder
from omni.config import OmniConfig
from omni.weights import empty_params, load_module
from tests.reference import CONFIG_NAMES, config, hf_config

torch.set_num_threads(1)

# fp32 on CPU. Outputs are O(1); measured max abs diffs are ~1e-6 (see the report in the PR).
TOL = dict(atol=2e-5, rtol=1e-5)
# A planted bug must move some output by at least this much (x1000 the tolerance).
PLANTED_MIN = 2e-2

IMAGE = [[1, 12, 20]]  # 6 x 10 merged patches: several (ragged) windows at every config
TWO_IMAGES = [[1, 12, 20], [1, 8, 12]]
VIDEO = [[3, 8, 12]]
MIXED = [[1, 8, 12], [3, 8, 12], [1, 4, 4]]
AUDIO_LENS = [500, 130, 30]  # 5 s (2.5 windows), 1.3 s, 0.3 s
AUDIO_LENS_EDGE = [201, 399, 1, 2, 3]  # 1-frame tail window, odd lengths, tiny clips


@torch.no_grad()
def _build(name: str, out_dir):
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import (
        Qwen2_5OmniAudioEncoder,
        Qwen2_5OmniVisionEncoder,
    )

    d = config(name)
    hf = hf_config(d).thinker_config
    torch.manual_seed(0)
    ref_v = Qwen2_5OmniVisionEncoder(hf.vision_config).eval()
    ref_a = Qwen2_5OmniAudioEncoder(hf.audio_config).eval()
    # Like tests/reference.py sharpen(), with vision attention sharpened further: with its q/k x6
    # alone, mirrored w positions or swapped h/w rotary move the vision output by only ~5e-4
    # (output ~0.23) because attention adds little to the residual stream. With q/k x18 and
    # v/proj x5 they move it by ~0.07-0.1.
    for blk in ref_v.blocks:
        blk.attn.q.weight.mul_(18)
        blk.attn.k.weight.mul_(18)
        blk.attn.v.weight.mul_(5)
        blk.attn.proj.weight.mul_(5)
    ref_v.patch_embed.proj.weight.mul_(4)
    ref_a.conv1.weight.mul_(6)
    ref_a.conv2.weight.mul_(3)
    for layer in ref_a.layers:
        layer.self_attn.q_proj.weight.mul_(6)
        layer.self_attn.k_proj.weight.mul_(6)
    sd = {f"thinker.visual.{k}": v.contiguous() for k, v in ref_v.state_dict().items()}
    sd |= {f"thinker.audio_tower.{k}": v.contiguous() for k, v in ref_a.state_dict().items()}
    save_file(sd, str(out_dir / "model.safetensors"))

    cfg = OmniConfig.from_dict(d).thinker_config
    with empty_params():
        ours_v, ours_a = VisionEncoder(cfg.vision_config), AudioEncoder(cfg.audio_config)
    load_module(ours_v, out_dir, "thinker.visual.")
    load_module(ours_a, out_dir, "thinker.audio_tower.")
    return ref_v, ref_a, ours_v, ours_a


@pytest.fixture(scope="module", params=CONFIG_NAMES)
def models(request, tmp_path_factory):
    return _build(request.param, tmp_path_factory.mktemp(f"enc_{request.param}"))


def _pixels(grid, cfg, seed=0):
    n = sum(t * h * w for t, h, w in grid)
    dim = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size**2
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


def _mels(lens, n_mels, seed=0):
    return torch.randn(n_mels, sum(lens), generator=torch.Generator().manual_seed(seed)) * 0.8


@torch.no_grad()
def _ref_vision(ref, px, grid):
    return ref(px, grid_thw=torch.tensor(grid)).pooler_output


@torch.no_grad()
def _ref_audio(ref, mel, lens):
    return ref(mel, feature_lens=torch.tensor(lens)).last_hidden_state


def _maxdiff(a, b):
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("grid", [IMAGE, TWO_IMAGES, VIDEO, MIXED], ids=["image", "two_images", "video", "mixed"])
@torch.no_grad()
def test_vision_parity(models, grid):
    ref_v, _, ours, _ = models
    px = _pixels(grid, ours.cfg)
    want = _ref_vision(ref_v, px, grid)
    got = ours(px, torch.tensor(grid))
    m = ours.merge**2
    assert got.shape == (px.shape[0] // m, ours.cfg.out_hidden_size)
    print(f"vision {grid}: max abs diff {_maxdiff(got, want):.2e}, max |out| {want.abs().max():.2f}")
    torch.testing.assert_close(got, want, **TOL)
    # packing is invisible: each item alone gives its rows of the packed call
    rows, start = [], 0
    for g in grid:
        n = g[0] * g[1] * g[2]
        rows.append(ours(px[start:start + n], torch.tensor([g])))
        start += n
    torch.testing.assert_close(torch.cat(rows), got, **TOL)


def _mirror_w(x, grid, merge, per_patch):
    """Mirror each item left-right. per_patch: rows are (C, Tp, P, P) pixel patches, else merged tokens."""
    out, start = [], 0
    for t, h, w in grid:
        n = t * h * w if per_patch else t * h * w // merge**2
        y = x[start:start + n]
        if per_patch:
            P = int(round((y.shape[1] // 6) ** 0.5))  # C=3, Tp=2
            y = y.view(t, h // merge, w // merge, merge, merge, 3, 2, P, P).flip(2, 4, 8)
        else:
            y = y.view(t, h // merge, w // merge, -1).flip(2)
        out.append(y.reshape(n, -1))
        start += n
    return torch.cat(out)


def _hw_swapped(orig):
    return lambda grid, merge: orig(grid, merge).flip(-1)


def _w_mirrored(orig):
    def f(grid, merge):
        pos = orig(grid, merge).clone()
        W = torch.cat([torch.full((t * h * w,), w) for t, h, w in grid])
        pos[:, 1] = W - 1 - pos[:, 1]
        return pos
    return f


def _no_windows(orig):
    return lambda grid, merge, win: (orig(grid, merge, win)[0], vision_mod.frame_seqlens(grid))


@pytest.mark.parametrize("bug", ["mirrored_image", "w_positions_mirrored", "rotary_hw_swapped",
                                 "window_order_not_restored", "no_window_attention"])
@torch.no_grad()
def test_vision_planted_bug_is_caught(models, bug, monkeypatch):
    ref_v, _, ours, _ = models
    grid = TWO_IMAGES
    px = _pixels(grid, ours.cfg)
    want = _ref_vision(ref_v, px, grid)
    if bug == "mirrored_image":
        # the output of a mirrored image, mirrored back, must not equal the original's
        got = _mirror_w(ours(_mirror_w(px, grid, ours.merge, True), torch.tensor(grid)), grid, ours.merge, False)
    else:
        if bug == "w_positions_mirrored":
            monkeypatch.setattr(vision_mod, "vision_position_ids", _w_mirrored(vision_mod.vision_position_ids))
        elif bug == "rotary_hw_swapped":
            monkeypatch.setattr(vision_mod, "vision_position_ids", _hw_swapped(vision_mod.vision_position_ids))
        elif bug == "window_order_not_restored":
            monkeypatch.setattr(vision_mod, "unwindow", lambda x, index: x)
        elif bug == "no_window_attention":
            monkeypatch.setattr(vision_mod, "window_index", _no_windows(vision_mod.window_index))
        got = ours(px, torch.tensor(grid))
    d = _maxdiff(got, want)
    print(f"vision planted {bug}: max abs diff {d:.2e}")
    assert d > PLANTED_MIN, f"planted bug {bug} moved the output only {d:.2e}"


@pytest.mark.parametrize("lens", [AUDIO_LENS, AUDIO_LENS_EDGE, [500]], ids=["5s+1.3s+0.3s", "edges", "5s"])
@torch.no_grad()
def test_audio_parity(models, lens):
    _, ref_a, _, ours = models
    mel = _mels(lens, ref_a.num_mel_bins)
    want = _ref_audio(ref_a, mel, lens)
    got = ours(mel, torch.tensor(lens))
    assert got.shape[0] == sum(audio_token_count(n) for n in lens) == want.shape[0]
    print(f"audio {lens}: max abs diff {_maxdiff(got, want):.2e}, max |out| {want.abs().max():.2f}")
    torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("bug", ["windows_swapped", "no_windowing"])
@torch.no_grad()
def test_audio_planted_bug_is_caught(models, bug, monkeypatch):
    _, ref_a, _, ours = models
    lens = AUDIO_LENS
    mel = _mels(lens, ref_a.num_mel_bins)
    want = _ref_audio(ref_a, mel, lens)
    if bug == "windows_swapped":  # seconds 0-2 and 2-4 of the 5 s clip change places
        mel = torch.cat([mel[:, 200:400], mel[:, :200], mel[:, 400:]], 1)
    elif bug == "no_windowing":  # each clip as one window: conv edges, positions, attention span
        monkeypatch.setattr(audio_mod, "audio_windows", lambda n, window: [n] if n else [])
    got = ours(mel, torch.tensor(lens))
    d = _maxdiff(got, want)
    print(f"audio planted {bug}: max abs diff {d:.2e}")
    assert d > PLANTED_MIN, f"planted bug {bug} moved the output only {d:.2e}"


def test_audio_token_count():
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniAudioEncoder

    n = torch.arange(1, 3001)
    _, want = Qwen2_5OmniAudioEncoder._get_feat_extract_output_lengths(None, n)
    assert [audio_token_count(int(i)) for i in n] == want.tolist()
    assert audio_token_count(100) == 25  # 1 s of mel frames -> 25 tokens


@torch.no_grad()
def test_bf16_runs_close(models):
    ref_v, ref_a, ours_v, ours_a = models
    px, grid = _pixels(TWO_IMAGES, ours_v.cfg), TWO_IMAGES
    mel = _mels(AUDIO_LENS, ref_a.num_mel_bins)
    want_v, want_a = _ref_vision(ref_v, px, grid), _ref_audio(ref_a, mel, AUDIO_LENS)
    ours_v, ours_a = copy.deepcopy(ours_v).bfloat16(), copy.deepcopy(ours_a).bfloat16()  # fixture stays fp32
    got_v = ours_v(px.bfloat16(), torch.tensor(grid))
    got_a = ours_a(mel.bfloat16(), torch.tensor(AUDIO_LENS))
    assert got_v.dtype == got_a.dtype == torch.bfloat16
    for got, want, what in [(got_v, want_v, "vision"), (got_a, want_a, "audio")]:
        rel = ((got.float() - want).norm() / want.norm()).item()
        print(f"{what} bf16 vs fp32 reference: relative error {rel:.2e}")
        assert rel < 0.1, f"{what} bf16 relative error {rel:.2e}"


def test_window_smaller_than_merged_patch_is_refused():
    # transformers divides by zero here (window_size // merge // patch == 0); we say why
    from omni.config import VisionConfig

    with pytest.raises(ValueError, match="window_size 14"):
        VisionEncoder(VisionConfig(depth=1, hidden_size=32, num_heads=2, window_size=14))


def test_keys_match_saved_checkpoint(tmp_path):
    """Our state dict keys equal the keys of a full save_pretrained checkpoint under each prefix."""
    from safetensors import safe_open

    from tests.reference import build_reference

    _, out = build_reference("tiny", tmp_path)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    cfg = OmniConfig.from_file(out).thinker_config
    for prefix, module in [("thinker.visual.", VisionEncoder(cfg.vision_config)),
                           ("thinker.audio_tower.", AudioEncoder(cfg.audio_config))]:
        on_disk = sorted(k[len(prefix):] for k in keys if k.startswith(prefix))
        assert on_disk == sorted(module.state_dict()), prefix
