"""TMRoPE positions equal transformers' get_rope_index exactly, whole prompts and turn by turn."""

from __future__ import annotations

import copy
import functools
import types

import numpy as np
import pytest
import torch

from omni import rope
from omni.config import OmniConfig
from encoders.audio import audio_token_count as audio_tokens_for_frames
from omni.rope import MediaSpec, RopeTokens, decode_positions, placeholder_ids, rope_positions
from tests.reference import CONFIG_NAMES, config, hf_config

torch.set_num_threads(1)

# The three reference configs share token ids and merge size; "variant" moves every id, merges 3x3
# and changes the clock (10 positions/s, 3 s chunks) so nothing is tuned to the defaults.
NAMES = CONFIG_NAMES + ("variant",)


def cfg_dict(name: str) -> dict:
    if name != "variant":
        return config(name)
    d = copy.deepcopy(config("tiny"))
    th = d["thinker_config"]
    th.update(image_token_index=401, video_token_index=402, audio_token_index=403, audio_start_token_id=404,
              audio_end_token_id=405, vision_start_token_id=406, vision_end_token_id=407,
              position_id_per_seconds=10, seconds_per_chunk=3)
    th["vision_config"]["spatial_merge_size"] = 3
    return d


@functools.cache
def reference(name: str):
    """transformers' thinker on the meta device: get_rope_index needs only its config."""
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniThinkerForConditionalGeneration

    with torch.device("meta"):
        return Qwen2_5OmniThinkerForConditionalGeneration(hf_config(cfg_dict(name)).thinker_config)


@functools.cache
def tokens(name: str) -> RopeTokens:
    return RopeTokens.from_config(OmniConfig.from_dict(cfg_dict(name)).thinker_config)


# Media in merged grid units (scaled by the config's merge size) with audio as mel frames,
# the way the processor produces them (feature_attention_mask.sum() frames -> tokens).
def I(t, h, w):
    return ("image", (t, h, w), None, None)


def V(t, h, w, spg, frames=None):
    return ("video", (t, h, w), spg, frames)


def A(frames):
    return ("audio", None, None, frames)


def build(name: str, parts, seed: int = 0):
    """parts: ints (that many random text tokens) and media -> (ids, specs, audio frames)."""
    rt = tokens(name)
    g = np.random.default_rng(seed)
    ids, specs, frames = [], [], []
    for p in parts:
        if isinstance(p, int):
            ids += g.integers(0, 384, p).tolist()
            continue
        kind, grid, spg, fr = p
        grid = grid and (grid[0], grid[1] * rt.spatial_merge_size, grid[2] * rt.spatial_merge_size)
        spec = MediaSpec(kind, grid_thw=grid, second_per_grid=spg, with_audio=kind == "video" and fr is not None,
                         audio_tokens=None if fr is None else audio_tokens_for_frames(fr))
        if fr is not None:
            frames.append(fr)
        ids += placeholder_ids(spec, rt)
        specs.append(spec)
    return ids, specs, frames


def hf_positions(name: str, ids, specs, frames):
    """transformers' get_rope_index -> positions (3, L), next start (max + 1 = L + delta)."""
    images = [s.grid_thw for s in specs if s.kind == "image"]
    videos = [s for s in specs if s.kind == "video"]
    av = {s.with_audio for s in videos}
    assert len(av) <= 1, "transformers takes one use_audio_in_video flag per prompt"
    x = torch.tensor([ids])
    pos, delta = reference(name).get_rope_index(
        x,
        image_grid_thw=torch.tensor(images) if images else None,
        video_grid_thw=torch.tensor([s.grid_thw for s in videos]) if videos else None,
        attention_mask=torch.ones_like(x),
        use_audio_in_video=av == {True},
        audio_seqlens=torch.tensor(frames) if frames else None,
        second_per_grids=torch.tensor([s.second_per_grid for s in videos]) if videos else None,
    )
    return pos[:, 0], int(delta) + len(ids)


SYS, USER, ASSIST = 9, 4, 3  # text lengths standing in for the chat template's pieces
CASES = {
    "text": [17],
    "image": [SYS, I(1, 3, 5), USER],
    "image_first": [I(1, 2, 2), 3],
    "two_images": [SYS, I(1, 4, 2), 2, I(2, 3, 3), USER],
    "video_1s": [SYS, V(4, 2, 3, 1.0), USER],
    "video_half_s": [SYS, V(5, 3, 2, 0.5), USER],
    "video_0.7s": [SYS, V(7, 2, 2, 0.7), USER],  # 17.5/grid: truncation gives 0, 17, 35, 52, 70 ...
    "video_2/3s": [SYS, V(6, 2, 2, 2 / 3), USER],  # 3 fps: float32 rounding at exact multiples
    "audio": [SYS, A(230), USER],
    "audio_only": [A(101), 2],
    "audio_video_separate": [SYS, A(150), 2, V(3, 2, 2, 1.0), USER],
    "av_equal": [SYS, V(5, 2, 3, 1.0, frames=500), USER],  # 5 s video, 5 s audio, 3 chunks
    "av_audio_longer": [SYS, V(3, 2, 2, 1.0, frames=700), USER],
    "av_audio_shorter": [SYS, V(6, 3, 2, 1.0, frames=180), USER],
    "av_half_s": [SYS, V(9, 2, 2, 0.5, frames=460), USER],
    "av_3s_grid": [SYS, V(4, 2, 3, 3.0, frames=1000), USER],  # t jumps past a chunk: 1-token chunk quirk
    "av_0.7s": [SYS, V(8, 2, 2, 0.7, frames=555), USER],
    "av_twice": [SYS, V(3, 2, 2, 1.0, frames=300), 5, V(2, 2, 2, 1.0, frames=90), USER],
    # the eos pair sits at max(last chunk) + 1 while an earlier video chunk reaches higher
    "av_eos_below_max": [SYS, V(2, 12, 2, 1.0, frames=50), 2],
    "multi_turn": [SYS, USER, I(1, 2, 3), 6, ASSIST + 11, USER, A(210), 3, V(3, 2, 2, 1.0), ASSIST],
    "multi_turn_av": [SYS, USER, I(1, 3, 3), ASSIST + 7, USER, V(4, 2, 2, 1.0, frames=410), A(90), ASSIST],
}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("case", list(CASES))
def test_equals_transformers(name, case):
    ids, specs, frames = build(name, CASES[case])
    want, want_next = hf_positions(name, ids, specs, frames)
    got, nxt = rope_positions(ids, specs, tokens(name))
    assert got.shape == (3, len(ids)) and got.dtype == torch.long
    assert torch.equal(got, want), f"first difference at {(got != want).any(0).nonzero()[0].item()}"
    assert nxt == want_next
    got_t, _ = rope_positions(torch.tensor(ids), specs, tokens(name), start=37)
    assert torch.equal(got_t, want + 37)


def test_eos_below_max_corner():
    """Where the next turn and transformers' decode disagree, next_start follows decode (max + 1)."""
    ids, specs, frames = build("tiny", CASES["av_eos_below_max"])
    pos, nxt = rope_positions(ids, specs, tokens("tiny"))
    assert pos[0, -1] + 1 < nxt == int(pos.max()) + 1


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("case,first_parts", [("multi_turn", 5), ("multi_turn_av", 4)])
def test_turn_by_turn_equals_whole(name, case, first_parts):
    """KV reuse: turn 2 computed alone from turn 1's next_start equals the tail of the whole prompt."""
    parts = CASES[case]
    whole, specs, frames = build(name, parts)
    head, head_specs, _ = build(name, parts[:first_parts])
    n_head = len(head_specs)
    assert whole[:len(head)] == head
    want, want_next = hf_positions(name, whole, specs, frames)

    p1, nxt = rope_positions(head, head_specs, tokens(name))
    # the engine prefilled the prompt up to the assistant reply, then decoded the reply tokens
    reply = ASSIST + 7 if case == "multi_turn_av" else ASSIST + 11
    prompt_len = len(head) - reply
    p1p, nxt_p = rope_positions(head[:prompt_len], head_specs, tokens(name))
    decoded = decode_positions(nxt_p, reply)
    assert torch.equal(torch.cat([p1p, decoded], 1), p1)
    p2, nxt2 = rope_positions(whole[len(head):], specs[n_head:], tokens(name), start=nxt_p + reply)
    assert torch.equal(torch.cat([p1, p2], 1), want)
    assert nxt2 == want_next and nxt == nxt_p + reply


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("t,h,w,spg,frames", [(5, 2, 3, 1.0, 500), (3, 2, 2, 1.0, 700), (6, 3, 2, 1.0, 180),
                                              (9, 2, 2, 0.5, 460), (4, 2, 3, 3.0, 1000), (8, 2, 2, 0.7, 555)])
def test_av_placeholders_equal_processor(name, t, h, w, spg, frames):
    """placeholder_ids lays out audio-in-video like transformers' processor (the oracle for the prompt)."""
    from transformers.models.qwen2_5_omni.processing_qwen2_5_omni import Qwen2_5OmniProcessor

    rt = tokens(name)
    m = rt.spatial_merge_size
    fake = types.SimpleNamespace(audio_bos_token="<", audio_eos_token=">", video_token="V", audio_token="A",
                                 video_processor=types.SimpleNamespace(merge_size=m))
    fake.get_chunked_index = functools.partial(Qwen2_5OmniProcessor.get_chunked_index, fake)
    n_audio = audio_tokens_for_frames(frames)
    s = Qwen2_5OmniProcessor.replace_video_with_audio_token(
        fake, {"video_grid_thw": np.array([[t, h * m, w * m]]), "video_second_per_grid": [spg]}, 0,
        {"num_audio_tokens": np.array([n_audio])}, 0,
        position_id_per_seconds=rt.position_id_per_seconds, seconds_per_chunk=rt.seconds_per_chunk)
    char = {"<": rt.audio_start_token_id, ">": rt.audio_end_token_id, "V": rt.video_token_id, "A": rt.audio_token_id}
    want = [rt.vision_start_token_id] + [char[c] for c in s] + [rt.vision_end_token_id]
    spec = MediaSpec("video", grid_thw=(t, h * m, w * m), second_per_grid=spg, audio_tokens=n_audio, with_audio=True)
    assert placeholder_ids(spec, rt) == want


def test_decode_positions():
    assert torch.equal(decode_positions(7, 3), torch.tensor([[7, 8, 9]] * 3))


def test_errors_name_the_problem():
    rt = tokens("tiny")
    ids, specs, _ = build("tiny", CASES["image"])
    with pytest.raises(ValueError, match="only 0 media items"):
        rope_positions(ids, [], rt)
    with pytest.raises(ValueError, match="pad tokens for only 1"):
        rope_positions(ids, specs * 2, rt)
    with pytest.raises(ValueError, match="needs 18 consecutive pad tokens"):
        rope_positions(ids, [MediaSpec("image", grid_thw=(1, 6, 12))], rt)
    with pytest.raises(ValueError, match="media item 0 is audio"):
        rope_positions(ids, [MediaSpec("audio", audio_tokens=15)], rt)
    with pytest.raises(ValueError, match="second_per_grid"):
        MediaSpec("video", grid_thw=(2, 4, 4))


# Planted bugs: each must break equality with transformers somewhere in CASES.
def _t_from_one(grid_t, spg, per_second):
    return (torch.arange(1, grid_t + 1) * torch.tensor(spg, dtype=torch.float32) * per_second).long()


def _t_rounded(grid_t, spg, per_second):
    return (torch.arange(grid_t) * spg * per_second).round().long()


def _audio_first(spec, rt):
    video_n = spec.vision_tokens(rt.spatial_merge_size)
    video = rope._vision_block(spec.grid_thw, rope._video_t(spec.grid_thw[0], spec.second_per_grid,
                                                            rt.position_id_per_seconds), rt.spatial_merge_size)
    audio = torch.arange(spec.audio_tokens).expand(3, -1)
    vc = rope._chunks(video[0].tolist(), rt.tokens_per_chunk)
    ac = rope._chunks(range(spec.audio_tokens), rt.tokens_per_chunk)
    parts = []
    for j in range(max(len(vc), len(ac))):
        if j < len(ac):
            parts.append(audio[:, ac[j][0]:ac[j][1]])
        if j < len(vc):
            parts.append(video[:, vc[j][0]:vc[j][1]])
    assert sum(p.shape[1] for p in parts) == video_n + spec.audio_tokens
    return torch.cat(parts, 1), int(parts[-1].max()) + 1


def _eos_global_max(spec, rt):
    block, _ = ORIG_AV_BLOCK(spec, rt)
    return block, int(block.max()) + 1


ORIG_AV_BLOCK = rope._av_block
PLANTED = {
    "t_from_one": ("_video_t", _t_from_one, ["video_1s", "video_half_s", "av_equal"]),
    "t_rounded": ("_video_t", _t_rounded, ["video_0.7s", "av_0.7s"]),
    "audio_first": ("_av_block", _audio_first, ["av_equal", "av_audio_longer", "av_audio_shorter", "multi_turn_av"]),
    "eos_global_max": ("_av_block", _eos_global_max, ["av_eos_below_max"]),
}


@pytest.mark.parametrize("bug", list(PLANTED))
def test_planted_bug_breaks_equality(bug, monkeypatch):
    attr, fn, cases = PLANTED[bug]
    monkeypatch.setattr(rope, attr, fn)
    for case in cases:
        ids, specs, frames = build("tiny", CASES[case])
        want, _ = hf_positions("tiny", ids, specs, frames)
        got, _ = rope_positions(ids, specs, tokens("tiny"))
        assert not torch.equal(got, want), f"planted {bug} went unnoticed in {case}"


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_talker_reads_same_tokens(name):
    """The talker takes the thinker's positions; its config must carry the same ids and clock."""
    c = OmniConfig.from_dict(cfg_dict(name))
    assert RopeTokens.from_config(c.talker_config) == RopeTokens.from_config(c.thinker_config)
