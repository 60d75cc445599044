"""Parity of omni/qwen3_omni_thinker.py's MoE decoder with transformers' Qwen3-Omni thinker (fp32, CPU).

The reference is built from tests/reference_qwen3.py's three configs, sharpened, saved in the official
layout (experts one tensor each) and loaded strictly into ours, experts stacked at load. Planted bugs:
the router without renormalisation, and deepstack added after the wrong layers, must move the logits far
past the tolerance.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import omni.qwen3_omni_thinker as thinker_mod
from omni.qwen3_omni_config import Qwen3OmniConfig
from omni.qwen3_omni_thinker import Thinker
from omni.weights import CheckpointError, empty_params, load_module
from tests.reference_qwen3 import CONFIG_NAMES, build_reference

torch.set_num_threads(1)
TOL = dict(atol=1e-4, rtol=1e-4)
PLANTED_MIN = 1e-2


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = {}
    for name in CONFIG_NAMES:
        model, d = build_reference(name, tmp_path_factory.mktemp(f"q3_{name}"))
        out[name] = (model, d)
    return out


def load_text(d) -> Thinker:
    cfg = Qwen3OmniConfig.from_file(d).thinker_config
    with empty_params():
        th = Thinker(cfg, encoders=False)
    load_module(th.model, d, "thinker.model.")
    load_module(th.lm_head, d, "thinker.lm_head.")
    return th.eval()


def prompt(vocab: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab - 16, (1, n), generator=g)


def text_positions(start: int, n: int, batch: int = 1) -> torch.Tensor:
    return (torch.arange(start, start + n).view(1, 1, n).expand(3, batch, n)).clone()


@torch.no_grad()
def ours_logits(th: Thinker, ids: torch.Tensor) -> torch.Tensor:
    cache = th.model.allocate_cache(1, 256)
    hidden = th(th.model.embed_tokens(ids), text_positions(0, ids.shape[1]), cache, torch.tensor([0]))
    return th.lm_head(hidden)[0]


@torch.no_grad()
def greedy(th: Thinker, ids: torch.Tensor, n: int, cache=None, slot: int = 0, start: int = 0) -> list[int]:
    cache = cache or th.model.allocate_cache(1, 256)
    slots = torch.tensor([slot])
    x = th(th.model.embed_tokens(ids), text_positions(start, ids.shape[1]), cache, slots)
    pos, out = start + ids.shape[1], []
    for _ in range(n):
        tok = int(th.lm_head(x[:, -1]).argmax(-1))
        out.append(tok)
        x = th(th.model.embed_tokens(torch.tensor([[tok]])), text_positions(pos, 1), cache, slots)
        pos += 1
    return out


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_logits_equal_the_reference(built, name):
    ref, d = built[name]
    th = load_text(d)
    ids = prompt(th.cfg.text_config.vocab_size, 40, 1)
    with torch.no_grad():
        want = ref.thinker(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]
    got = ours_logits(th, ids)
    torch.testing.assert_close(got, want, **TOL)
    assert want.std() > 0.5  # sharp enough to mean something


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_32_greedy_tokens_equal_the_reference(built, name):
    ref, d = built[name]
    th = load_text(d)
    ids = prompt(th.cfg.text_config.vocab_size, 12, 2)
    with torch.no_grad():
        want = ref.thinker.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=32,
                                    min_new_tokens=32, do_sample=False)[0, ids.shape[1]:].tolist()
    assert greedy(th, ids, 32) == want
    assert len(set(want)) > 4


def test_cached_decode_batches_and_turns_equal_full_recompute(built):
    _, d = built["deep"]
    th = load_text(d)
    V = th.cfg.text_config.vocab_size
    ids = [prompt(V, n, 10 + i) for i, n in enumerate((9, 14, 5, 11))]
    alone = [greedy(th, p, 6) for p in ids]
    # a full recompute of prompt + generated equals the cached decode's last logits
    full = torch.cat([ids[0], torch.tensor([alone[0][:-1]])], 1)
    assert int(ours_logits(th, full)[-1].argmax()) == alone[0][-1]
    # four conversations in one batch, each step one batched forward
    cache = th.model.allocate_cache(4, 256)
    last, pos = [], []
    with torch.no_grad():
        for i, p in enumerate(ids):
            x = th(th.model.embed_tokens(p), text_positions(0, p.shape[1]), cache, torch.tensor([i]))
            last.append(int(th.lm_head(x[:, -1]).argmax(-1)))
            pos.append(p.shape[1])
        got = [[t] for t in last]
        for _ in range(5):
            toks = torch.tensor([[g[-1]] for g in got])
            positions = torch.tensor(pos).view(1, 4, 1).expand(3, 4, 1)
            x = th(th.model.embed_tokens(toks), positions, cache, torch.arange(4))
            for i, t in enumerate(th.lm_head(x[:, -1]).argmax(-1).tolist()):
                got[i].append(t)
            pos = [p + 1 for p in pos]
    assert got == alone
    # a second turn on the kept cache equals a fresh run of both turns
    cache = th.model.allocate_cache(1, 256)
    first = greedy(th, ids[1], 4, cache)
    turn2 = ids[2]
    held = ids[1].shape[1] + 4  # `greedy` feeds each token it picks: the cache holds the prompt and all 4
    assert int(cache.lengths[0]) == held
    kept = greedy(th, turn2, 5, cache, start=held)
    fresh = greedy(th, torch.cat([ids[1], torch.tensor([first]), turn2], 1), 5)
    assert kept == fresh


def test_grouped_experts_equal_the_per_expert_loop(built, monkeypatch):
    _, d = built["wide"]
    th = load_text(d)
    moe = th.model.layers[0].mlp
    x = torch.randn(37, th.cfg.text_config.hidden_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = moe(x[None])[0]
        experts, weights = moe.gate(x)
        want = torch.zeros_like(x)
        for n in range(x.shape[0]):
            for e, w in zip(experts[n].tolist(), weights[n]):
                gate, up = (moe.experts.gate_up_proj[e] @ x[n]).chunk(2)
                want[n] += w * (moe.experts.down_proj[e] @ (torch.nn.functional.silu(gate) * up))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        monkeypatch.setattr(thinker_mod, "_grouped_mm", None)  # the fallback for a torch without it
        torch.testing.assert_close(moe(x[None])[0], want, atol=1e-5, rtol=1e-5)


def test_planted_router_without_renormalisation_is_caught(built, monkeypatch):
    ref, d = built["tiny"]
    th = load_text(d)
    ids = prompt(th.cfg.text_config.vocab_size, 30, 4)
    good = ours_logits(th, ids)
    for layer in th.model.layers:
        monkeypatch.setattr(layer.mlp.gate, "renormalise", False)
    assert (ours_logits(th, ids) - good).abs().max() > PLANTED_MIN


def _edit(d, tmp_path, change):
    bad = tmp_path / "bad"
    shutil.copytree(d, bad)
    sd = load_file(str(bad / "model.safetensors"))
    change(sd)
    save_file(sd, str(bad / "model.safetensors"))
    return bad


@pytest.mark.parametrize("what", ["missing_expert", "extra_key", "wrong_shape"])
def test_loading_names_the_bad_key(built, tmp_path, what):
    _, d = built["tiny"]
    key = "thinker.model.layers.1.mlp.experts.3.up_proj.weight"

    def change(sd):
        if what == "missing_expert":
            del sd[key]
        elif what == "extra_key":
            sd["thinker.model.layers.1.mlp.experts.8.up_proj.weight"] = sd[key].clone()
        else:
            sd[key] = sd[key][:, :-1].contiguous()

    bad = _edit(d, tmp_path, change)
    name = key if what != "extra_key" else "experts.8.up_proj"
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        load_text(bad)


def spatial_positions(n: int, seed: int) -> torch.Tensor:
    """(3, 1, n) positions whose axes differ, as an image's or a video's do (t fractional, h and w a grid)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.cumsum(torch.rand(n, generator=g) * 0.8, 0)
    h = torch.randint(0, 12, (n,), generator=g).float() + t.floor()
    w = torch.randint(0, 12, (n,), generator=g).float() + t.floor()
    return torch.stack([t, h, w])[:, None]


@torch.no_grad()
def both_with_deepstack(ref, th: Thinker, n: int = 36, seed: int = 5, rows_every: int = 3):
    """Our and the reference's logits for random embeddings at multimodal positions, with deepstack
    features on every third row."""
    g = torch.Generator().manual_seed(seed)
    D = th.cfg.text_config.hidden_size
    embeds = torch.randn(1, n, D, generator=g)
    pos = spatial_positions(n, seed)
    rows = torch.zeros(1, n, dtype=torch.bool)
    rows[:, ::rows_every] = True
    levels = [torch.randn(int(rows.sum()), D, generator=g) for _ in range(len(th.cfg.vision_config["deepstack_visual_indexes"]))]
    lm = ref.thinker.model.language_model
    want = ref.thinker.lm_head(lm(inputs_embeds=embeds, position_ids=pos, attention_mask=torch.ones(1, n, dtype=torch.long),
                                  visual_pos_masks=rows, deepstack_visual_embeds=levels).last_hidden_state)[0]
    cache = th.model.allocate_cache(1, 128)
    got = th.lm_head(th(embeds, pos, cache, torch.tensor([0]), deepstack=(rows, levels)))[0]
    return got, want


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_multimodal_positions_and_deepstack_equal_the_reference(built, name):
    ref, d = built[name]
    th = load_text(d)
    got, want = both_with_deepstack(ref, th)
    torch.testing.assert_close(got, want, **TOL)


def test_planted_contiguous_mrope_is_caught(built, monkeypatch):
    from omni.thinker import MRotary

    ref, d = built["tiny"]
    th = load_text(d)
    c = th.cfg.text_config
    th.model.rotary = MRotary(c.get_head_dim(), c.get_rope_theta(), c.get_mrope_section())  # Qwen2.5's layout
    got, want = both_with_deepstack(ref, th)
    assert (got - want).abs().max() > PLANTED_MIN


def test_planted_deepstack_after_the_wrong_layers_is_caught(built, monkeypatch):
    ref, d = built["deep"]
    th = load_text(d)
    forward = th.model.forward

    def shifted(x, positions, cache, slots, n_valid=None, add_after=None):
        return forward(x, positions, cache, slots, n_valid, {i + 1: v for i, v in (add_after or {}).items()})

    monkeypatch.setattr(th.model, "forward", shifted)
    got, want = both_with_deepstack(ref, th)
    assert (got - want).abs().max() > PLANTED_MIN


@pytest.mark.parametrize("name", ["tiny", "wide"])
def test_an_image_and_a_video_through_our_vision_encoder_and_thinker_equal_the_reference(built, name):
    """The vision encoder's merged tokens in their placeholders and its deepstack levels on the visual rows
    (images and videos joint, in row order), at the reference's own positions."""
    from encoders.qwen3_omni_vision import Qwen3OmniVisionConfig

    ref, d = built[name]
    c = Qwen3OmniConfig.from_file(d).thinker_config
    with empty_params():
        th = Thinker(c)  # with its vision encoder
    for part in ("model", "lm_head", "visual"):
        load_module(getattr(th, part), d, f"thinker.{part}.")
    g = torch.Generator().manual_seed(9)
    vc = Qwen3OmniVisionConfig.from_dict(c.vision_config)
    patch = 3 * vc.temporal_patch_size * vc.patch_size ** 2
    img_grid, vid_grid = torch.tensor([[1, 4, 6]]), torch.tensor([[2, 4, 4]])
    img_px = torch.randn(int(img_grid.prod()), patch, generator=g)
    vid_px = torch.randn(int(vid_grid.prod()), patch, generator=g)
    V = c.text_config.vocab_size
    text = lambda n: torch.randint(0, V - 16, (n,), generator=g).tolist()
    ids = (text(5) + [c.vision_start_token_id] + [c.image_token_id] * 6 + [c.vision_end_token_id] + text(3)
           + [c.vision_start_token_id] + [c.video_token_id] * 8 + [c.vision_end_token_id] + text(4))
    ids = torch.tensor([ids])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        pos, _ = ref.thinker.get_rope_index(ids, img_grid, vid_grid, mask, False, None, torch.tensor([1.0]))
        want = ref.thinker(input_ids=ids, attention_mask=mask, pixel_values=img_px, image_grid_thw=img_grid,
                           pixel_values_videos=vid_px, video_grid_thw=vid_grid, position_ids=pos).logits[0]
        embeds, deepstack = th.embed(ids, image=th.visual(img_px, img_grid.tolist()),
                                     video=th.visual(vid_px, vid_grid.tolist()))
        got = th.lm_head(th(embeds, pos, th.model.allocate_cache(1, 64), torch.tensor([0]), deepstack=deepstack))[0]
        lm = ref.thinker.model.language_model
        same_inputs = ref.thinker.lm_head(lm(inputs_embeds=embeds, position_ids=pos, attention_mask=mask,
                                             visual_pos_masks=deepstack[0],
                                             deepstack_visual_embeds=deepstack[1]).last_hidden_state)[0]
    # Given the same embeddings and deepstack levels, our decoder equals the reference's to 1e-4.
    torch.testing.assert_close(got, same_inputs, **TOL)
    # End to end, our vision encoder's ~1e-7 from the reference's is amplified by the sharpened decoder to
    # up to ~7e-4 on logits of ~35: a tolerance relative to the logits' scale, and every argmax the same.
    torch.testing.assert_close(got, want, atol=5e-5 * float(want.abs().max()), rtol=1e-4)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.parametrize("name", ["tiny", "deep"])
def test_audio_and_an_image_through_our_encoders_and_thinker_equal_the_reference(built, name):
    """Two audio clips (one past a 1 s chunk) and an image through our AuT and vision encoders into the
    thinker at our rope_index positions, which equal the reference's get_rope_index."""
    from encoders.qwen3_omni_audio import audio_token_count
    from encoders.qwen3_omni_vision import Qwen3OmniVisionConfig
    from omni.qwen3_omni_rope import RopeTokens, rope_index

    ref, d = built[name]
    c = Qwen3OmniConfig.from_file(d).thinker_config
    with empty_params():
        th = Thinker(c)
    for part in ("model", "lm_head", "visual", "audio_tower"):
        load_module(getattr(th, part), d, f"thinker.{part}.")
    g = torch.Generator().manual_seed(11)
    frames = [170, 60]
    n_mels = c.audio_config["num_mel_bins"]
    feats = torch.randn(n_mels, sum(frames), generator=g)
    vc = Qwen3OmniVisionConfig.from_dict(c.vision_config)
    img_grid = torch.tensor([[1, 4, 4]])
    img_px = torch.randn(16, 3 * vc.temporal_patch_size * vc.patch_size ** 2, generator=g)
    V = c.text_config.vocab_size
    text = lambda n: torch.randint(0, V - 16, (n,), generator=g).tolist()
    audio = lambda n: [c.audio_start_token_id] + [c.audio_token_id] * audio_token_count(n) + [c.audio_end_token_id]
    ids = (text(4) + audio(frames[0]) + text(2) + [c.vision_start_token_id] + [c.image_token_id] * 4
           + [c.vision_end_token_id] + audio(frames[1]) + text(3))
    ids = torch.tensor([ids])
    mask = torch.ones_like(ids)
    pos, _ = rope_index(ids[0], image_grid_thw=img_grid, audio_lengths=frames, tokens=RopeTokens.from_config(c))
    with torch.no_grad():
        want_pos, _ = ref.thinker.get_rope_index(ids, img_grid, None, mask, False, torch.tensor(frames), None)
        assert torch.equal(pos, want_pos[:, 0])
        padded = torch.zeros(2, n_mels, max(frames))
        fmask = torch.zeros(2, max(frames), dtype=torch.long)
        for i, clip in enumerate(feats.split(frames, dim=1)):
            padded[i, :, :clip.shape[1]], fmask[i, :clip.shape[1]] = clip, 1
        want = ref.thinker(input_ids=ids, attention_mask=mask, input_features=padded, feature_attention_mask=fmask,
                           pixel_values=img_px, image_grid_thw=img_grid, position_ids=want_pos).logits[0]
        embeds, deepstack = th.embed(ids, image=th.visual(img_px, img_grid.tolist()),
                                     audio=th.audio_tower(feats, frames))
        got = th.lm_head(th(embeds, pos[:, None], th.model.allocate_cache(1, 64), torch.tensor([0]),
                            deepstack=deepstack))[0]
    torch.testing.assert_close(got, want, atol=5e-5 * float(want.abs().max()), rtol=1e-4)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    # planted: the two clips' features swapped must move the logits far past the tolerance
    with torch.no_grad():
        swapped = torch.cat([feats[:, frames[0]:frames[0] + 60], feats[:, :60], feats[:, 60:frames[0]]], 1)
        bad_embeds, _ = th.embed(ids, image=th.visual(img_px, img_grid.tolist()),
                                 audio=th.audio_tower(swapped, frames))
        bad = th.lm_head(th(bad_embeds, pos[:, None], th.model.allocate_cache(1, 64), torch.tensor([0]),
                            deepstack=deepstack))[0]
    assert (bad - want).abs().max() > PLANTED_MIN
