"""Parity of encoders/qwen3_omni_vision.py with transformers 5.23's Qwen3OmniMoeVisionEncoder.

The reference encoder is built alone from each of tests/reference_qwen3.py's configs, seeded and
sharpened, saved as `thinker.visual.*` safetensors and loaded into ours strictly. Grids are chosen so
the 8 x 8 position table is really resampled (sides 2..20, none square with the table). Each planted
bug twin breaks one thing the parity test guards and must move an output far past its tolerance.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import encoders.qwen3_omni_vision as qv
from encoders.qwen3_omni_vision import Qwen3OmniVisionConfig, Qwen3OmniVisionEncoder
from omni.weights import CheckpointError, empty_params, load_module
from tests.reference_qwen3 import CONFIG_NAMES, config, hf_config

PREFIX = "thinker.visual."
ATOL, RTOL = 2e-5, 1e-5
BUG_MIN = 2e-2
GRIDS = {
    "one_image": [[1, 12, 20]],
    "two_images": [[1, 12, 20], [1, 8, 12]],
    "video": [[3, 8, 12]],
    "mix": [[1, 8, 12], [2, 6, 10], [1, 2, 4], [1, 12, 20]],
}

torch.set_num_threads(1)


@torch.no_grad()
def sharpen(ref, seed: int = 0) -> None:
    """Random init (std 0.02, LayerNorms at 1/0, zero biases) is too smooth for planted bugs to show.
    q/k rows of qkv and attn.proj are scaled so attention is peaked and the rotary phases matter; the
    position table is raised to the size of the patch embedding so its resampling matters; norms and
    biases are randomised so a dropped bias or a wrong norm shows; the mergers are scaled to O(1) outputs."""
    g = torch.Generator().manual_seed(seed)
    for blk in ref.blocks:
        blk.attn.qkv.weight[: 2 * blk.attn.qkv.weight.shape[1]].mul_(20)
        blk.attn.proj.weight.mul_(6)
    ref.patch_embed.proj.weight.mul_(2)
    ref.pos_embed.weight.mul_(25)
    for name, p in ref.named_parameters():
        if name.endswith("bias"):
            p.normal_(0, 0.1, generator=g)
        elif "norm" in name or "ln_q" in name:
            p.normal_(1, 0.3, generator=g)
        elif name.startswith("merger") and ".mlp." in name:
            p.mul_(1 / (0.02 * p.shape[1] ** 0.5))


@pytest.fixture(scope="module", params=CONFIG_NAMES)
def built(request, tmp_path_factory):
    """(name, reference encoder, our encoder loaded from its saved weights, checkpoint state dict)."""
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeVisionEncoder

    name = request.param
    d = config(name)
    torch.manual_seed(0)
    ref = Qwen3OmniMoeVisionEncoder(hf_config(d).thinker_config.vision_config).eval()
    sharpen(ref)
    state = {PREFIX + k: v.contiguous() for k, v in ref.state_dict().items()}
    ckpt = tmp_path_factory.mktemp(f"qwen3_vision_{name}")
    save_file(state, str(ckpt / "model.safetensors"))
    cfg = Qwen3OmniVisionConfig.from_dict(d["thinker_config"]["vision_config"])
    with empty_params():
        ours = Qwen3OmniVisionEncoder(cfg)
    load_module(ours, ckpt, PREFIX)
    return name, ref, ours, state


def pixels_for(grid: list[list[int]], cfg: Qwen3OmniVisionConfig, seed: int = 1) -> torch.Tensor:
    n = sum(t * h * w for t, h, w in grid)
    dim = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size**2
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def run_both(ref, ours, grid):
    x = pixels_for(grid, ours.cfg)
    r = ref(x, torch.tensor(grid))
    out, deepstack = ours(x, grid)
    return [r.pooler_output, *r.deepstack_features], [out, *deepstack]


def test_keys_and_rotary_buffer(built):
    _, ref, ours, _ = built
    assert set(ours.state_dict()) == set(ref.state_dict())
    for k, v in ref.state_dict().items():
        assert ours.state_dict()[k].shape == v.shape, k
    assert "inv_freq" not in ours.state_dict()
    torch.testing.assert_close(ours.inv_freq, ref.rotary_pos_emb.inv_freq)


@pytest.mark.parametrize("case", list(GRIDS))
def test_parity(built, case):
    name, ref, ours, _ = built
    want, got = run_both(ref, ours, GRIDS[case])
    assert len(got) == 1 + len(ours.cfg.deepstack_visual_indexes)
    assert got[0].shape == (sum(t * h * w for t, h, w in GRIDS[case]) // 4, ours.cfg.out_hidden_size)
    for i, (w, g) in enumerate(zip(want, got)):
        torch.testing.assert_close(g, w, atol=ATOL, rtol=RTOL, msg=lambda m: f"{name}/{case} output {i}: {m}")


def nearest_positions(table, grid_thw, merge):
    side = math.isqrt(table.shape[0])
    grid = table.float().view(side, side, -1).permute(2, 0, 1)[None]
    out = []
    for t, h, w in grid_thw:
        x = F.interpolate(grid, size=(h, w), mode="nearest")[0]
        x = x.permute(1, 2, 0).reshape(h // merge, merge, w // merge, merge, -1).transpose(1, 2)
        out.append(x.reshape(h * w, -1).repeat(t, 1))
    return torch.cat(out)


def plant(bug: str, monkeypatch, ours) -> None:
    if bug == "nearest_positions":
        monkeypatch.setattr(qv, "interpolate_positions", nearest_positions)
    elif bug == "rotary_hw_swapped":
        pos_ids = qv.vision_position_ids
        monkeypatch.setattr(qv, "vision_position_ids", lambda grid, merge: pos_ids(grid, merge).flip(-1))
    elif bug == "deepstack_blocks_shifted":
        depth = len(ours.blocks)
        monkeypatch.setattr(ours, "deepstack_visual_indexes", [(i + 1) % depth for i in ours.deepstack_visual_indexes])
    elif bug == "attention_across_frames":
        monkeypatch.setattr(qv, "frame_seqlens", lambda grid: [0] + torch.tensor(
            [t * h * w for t, h, w in grid]).cumsum(0).tolist())
    else:
        raise KeyError(bug)


@pytest.mark.parametrize("bug", ["nearest_positions", "rotary_hw_swapped", "deepstack_blocks_shifted",
                                 "attention_across_frames"])
def test_planted_bug_goes_red(built, bug, monkeypatch):
    name, ref, ours, _ = built
    plant(bug, monkeypatch, ours)
    want, got = run_both(ref, ours, GRIDS["mix"])
    moved = max(float((w - g).abs().max()) for w, g in zip(want, got))
    assert moved > BUG_MIN, f"{name}: planted bug {bug} moved the outputs by only {moved:.2e}"


@pytest.mark.parametrize("built", ["tiny"], indirect=True)
@pytest.mark.parametrize("fault", ["missing", "extra", "shape"])
def test_checkpoint_errors_name_the_key(built, fault, tmp_path):
    state = dict(built[3])
    if fault == "missing":
        key = PREFIX + "merger_list.1.mlp.2.bias"
        del state[key]
    elif fault == "extra":
        key = PREFIX + "blocks.7.attn.qkv.weight"
        state[key] = torch.zeros(3)
    else:
        key = PREFIX + "pos_embed.weight"
        state[key] = torch.zeros(81, state[key].shape[1])
    save_file(state, str(tmp_path / "model.safetensors"))
    with empty_params():
        m = Qwen3OmniVisionEncoder(Qwen3OmniVisionConfig.from_dict(config("tiny")["thinker_config"]["vision_config"]))
    with pytest.raises(CheckpointError, match=re.escape(key)):
        load_module(m, tmp_path, PREFIX)


def test_config_from_dict():
    from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeVisionEncoderConfig

    def same(ours: Qwen3OmniVisionConfig, hf) -> None:
        for f in ("depth", "hidden_size", "hidden_act", "intermediate_size", "num_heads", "in_channels", "patch_size",
                  "spatial_merge_size", "temporal_patch_size", "out_hidden_size", "num_position_embeddings"):
            assert getattr(ours, f) == getattr(hf, f), f
        assert list(ours.deepstack_visual_indexes) == list(hf.deepstack_visual_indexes)
        assert ours.rope_theta == hf.rope_parameters["rope_theta"]

    same(Qwen3OmniVisionConfig.from_dict({}), Qwen3OmniMoeVisionEncoderConfig())
    for name in CONFIG_NAMES:
        d = config(name)["thinker_config"]["vision_config"]
        same(Qwen3OmniVisionConfig.from_dict({**d, "not_a_field": 1, "initializer_range": 0.02}),
             hf_config(config(name)).thinker_config.vision_config)
    rope = {"rope_parameters": {"rope_theta": 500.0, "rope_type": "axial"}}
    assert Qwen3OmniVisionConfig.from_dict(rope).rope_theta == 500.0


@pytest.mark.parametrize("built", ["tiny"], indirect=True)
def test_bad_inputs_say_what_is_wrong(built):
    ours = built[2]
    with pytest.raises(ValueError, match="patches"):
        ours(pixels_for([[1, 4, 4]], ours.cfg), [[1, 4, 6]])
    with pytest.raises(ValueError, match="multiples"):
        ours(pixels_for([[1, 3, 4]], ours.cfg), [[1, 3, 4]])
