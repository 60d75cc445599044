"""Parity of talker/qwen3_omni_talker.py with transformers 5.23's Qwen3-Omni `generate` with audio out (fp32, CPU).

The reference (tests/reference_qwen3_speech.py: the three configs of tests/reference_qwen3.py, the talker
sharpened too) runs greedy Thinker + Talker; its talker's raw logits per step and every frame's codes (all
codebooks) are recorded. Ours is fed the reference's reply ids (the Thinker's own parity is tested
elsewhere) and, for media, our encoders and Thinker end to end. Planted twins: the code predictor's
codebook embeddings in the wrong order, the trailing text one token late, the Thinker layer one off.
"""

from __future__ import annotations

import inspect
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import talker.qwen3_omni_talker as T
from omni.qwen3_omni_config import Qwen3OmniConfig
from omni.qwen3_omni_rope import RopeTokens, rope_index
from omni.qwen3_omni_thinker import Thinker
from omni.weights import CheckpointError, empty_params, load_module
from tests.reference_qwen3 import CONFIG_NAMES, config
from tests.reference_qwen3_speech import build_speech_reference, reference_speech

torch.set_num_threads(1)
FRAMES, REPLY = 9, 7  # frames asked for; Thinker tokens (the last is never fed): trailing text runs out mid-speech


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            model, d = build_speech_reference(name, tmp_path_factory.mktemp(f"q3s_{name}"))
            talker = T.Talker.load(d)
            cfg = Qwen3OmniConfig.from_file(d)
            with empty_params():
                th = Thinker(cfg.thinker_config)
            for part in ("model", "lm_head", "visual", "audio_tower"):
                load_module(getattr(th, part), d, f"thinker.{part}.")
            cache[name] = (model, d, talker, th)
        return cache[name]

    return get


def conversation(name: str, seed: int = 0, user_text: int = 5) -> list[int]:
    """system, user, an earlier assistant reply, user again, the generation prompt."""
    c = config(name)
    g = torch.Generator().manual_seed(seed)
    text = lambda n: torch.randint(0, 400, (n,), generator=g).tolist()
    s, e, nl = c["im_start_token_id"], c["im_end_token_id"], 13
    return ([s, c["system_token_id"], nl] + text(4) + [e, nl]
            + [s, c["user_token_id"], nl] + text(user_text) + [e, nl]
            + [s, c["assistant_token_id"], nl] + text(3) + [e, nl]
            + [s, c["user_token_id"], nl] + text(4) + [e, nl]
            + [s, c["assistant_token_id"], nl])


def text_prompt(talker, th, ids: list[int], after: T.TalkerPrompt | None = None) -> T.TalkerPrompt:
    x = torch.tensor(ids)
    emb = th.model.embed_tokens(x)
    return T.prefill_rows(talker, x, emb, emb, after=after)  # no media: the hidden is never read


@torch.no_grad()
def ours(talker, th, prompt, reply, frames=FRAMES, min_frames=0, sampling=T.TALKER_GREEDY):
    """Codes (T, G) and the raw logits of each frame's code 0 (T', V), stepping one state."""
    st = T.start(talker, prompt, th.model.embed_tokens, "ethan", max_frames=frames, min_frames=min_frames)
    for t in reply:
        T.push(st, t)
    T.push(st, None)
    logits = []
    while not st.finished:
        T.step_batch(talker, [st], [sampling], [None])
        logits.append(st.last_logits[0])
    return torch.stack(st.frames) if st.frames else torch.zeros(0, talker.cfg.num_code_groups, dtype=torch.long), torch.stack(logits)


def assert_logits_close(got, want):
    n = min(len(got), len(want))
    scale = float(want[:n].abs().max())
    torch.testing.assert_close(got[:n], want[:n], atol=2e-5 * scale, rtol=1e-4)


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_text_conversation_codes_and_logits_equal_the_reference(built, name):
    ref, d, talker, th = built(name)
    ids = conversation(name)
    reply, want_codes, want_logits = reference_speech(ref, torch.tensor([ids]), REPLY, FRAMES)
    codes, logits = ours(talker, th, text_prompt(talker, th, ids), reply[:-1])
    assert want_codes.shape == (FRAMES, talker.cfg.num_code_groups)
    assert torch.equal(codes, want_codes)
    assert_logits_close(logits, want_logits)
    assert len(set(want_codes[:, 0].tolist())) > 3 and len(set(want_codes[:, -1].tolist())) > 3  # not degenerate


def media_inputs(name: str, seed: int = 3):
    c = config(name)
    tc = c["thinker_config"]
    from encoders.qwen3_omni_audio import audio_token_count
    from encoders.qwen3_omni_vision import Qwen3OmniVisionConfig

    g = torch.Generator().manual_seed(seed)
    frames = 170
    feats = torch.randn(128, frames, generator=g)
    vc = Qwen3OmniVisionConfig.from_dict(tc["vision_config"])
    grid = torch.tensor([[1, 4, 4]])
    px = torch.randn(16, 3 * vc.temporal_patch_size * vc.patch_size ** 2, generator=g)
    text = lambda n: torch.randint(0, 400, (n,), generator=g).tolist()
    s, e, nl = c["im_start_token_id"], c["im_end_token_id"], 13
    ids = ([s, c["system_token_id"], nl] + text(3) + [e, nl, s, c["user_token_id"], nl] + text(2)
           + [tc["audio_start_token_id"]] + [tc["audio_token_id"]] * audio_token_count(frames) + [tc["audio_end_token_id"]]
           + text(2) + [tc["vision_start_token_id"]] + [tc["image_token_id"]] * 4 + [tc["vision_end_token_id"]]
           + text(3) + [e, nl, s, c["assistant_token_id"], nl])
    return ids, feats, frames, grid, px


@torch.no_grad()
def media_prompt(talker, th, name, capture=None):
    """Our encoders and Thinker prefill, capturing the layer the Talker reads."""
    ids, feats, frames, grid, px = media_inputs(name)
    x = torch.tensor(ids)
    pos, _ = rope_index(x, image_grid_thw=grid, audio_lengths=[frames], tokens=RopeTokens.from_config(th.cfg))
    embeds, deepstack = th.embed(x[None], image=th.visual(px, grid.tolist()), audio=th.audio_tower(feats, [frames]))
    _, hidden = th(embeds, pos[:, None], th.model.allocate_cache(1, len(ids)), torch.tensor([0]), deepstack=deepstack,
                   capture_layer=capture or talker.cfg.accept_hidden_layer)
    return T.prefill_rows(talker, x, embeds[0], hidden[0], image_grid_thw=grid, audio_lengths=[frames])


def media_reference(ref, name):
    ids, feats, frames, grid, px = media_inputs(name)
    return reference_speech(ref, torch.tensor([ids]), REPLY, FRAMES, input_features=feats[None],
                            feature_attention_mask=torch.ones(1, frames, dtype=torch.long),
                            pixel_values=px, image_grid_thw=grid)


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_image_audio_text_through_our_encoders_and_thinker_equal_the_reference(built, name):
    ref, d, talker, th = built(name)
    reply, want_codes, want_logits = media_reference(ref, name)
    codes, logits = ours(talker, th, media_prompt(talker, th, name), reply[:-1])
    assert torch.equal(codes, want_codes)
    assert_logits_close(logits, want_logits)


def test_planted_wrong_accept_layer_is_caught(built):
    ref, d, talker, th = built("deep")  # 5 layers, accept 2: layers 1 and 3 are both there
    reply, want_codes, want_logits = media_reference(ref, "deep")
    k = talker.cfg.accept_hidden_layer
    codes, logits = ours(talker, th, media_prompt(talker, th, "deep", capture=k + 1), reply[:-1])
    assert not torch.equal(codes, want_codes)
    # one layer earlier the media rows move less: codes may stay, the logits go ~700x past the tolerance
    _, logits = ours(talker, th, media_prompt(talker, th, "deep", capture=k - 1), reply[:-1])
    n = min(len(logits), len(want_logits))
    assert (logits[:n] - want_logits[:n]).abs().max() > 100 * 2e-5 * float(want_logits.abs().max())


def test_planted_codebooks_swapped_is_caught(built):
    ref, d, talker, th = built("tiny")
    ids = conversation("tiny")
    reply, want_codes, _ = reference_speech(ref, torch.tensor([ids]), REPLY, FRAMES)
    cp = talker.code_predictor.model
    embs = cp.codec_embedding
    cp.codec_embedding = torch.nn.ModuleList([embs[1], embs[0], *embs[2:]])  # codebooks 1 and 2 swapped
    try:
        codes, _ = ours(talker, th, text_prompt(talker, th, ids), reply[:-1])
    finally:
        cp.codec_embedding = embs
    assert not torch.equal(codes, want_codes)


def test_planted_trailing_text_off_by_one_is_caught(built, monkeypatch):
    ref, d, talker, th = built("tiny")
    ids = conversation("tiny")
    reply, want_codes, _ = reference_speech(ref, torch.tensor([ids]), REPLY, FRAMES)
    right = T._next_text

    def late(state):  # reply token t with frame t instead of t + 1: token 0 is fed twice
        if len(state.frames) == 1 and not getattr(state, "_again", False):
            state._again = True
            state.text.appendleft(reply[0])
        return right(state)

    monkeypatch.setattr(T, "_next_text", late)
    codes, _ = ours(talker, th, text_prompt(talker, th, ids), reply[:-1])
    assert not torch.equal(codes, want_codes)


def test_codec_eos_and_min_frames_as_the_reference(built):
    """The codec eos made likely: the reference stops where eos first wins after min_frames; so must we."""
    ref, d, talker, th = built("wide")
    eos = talker.cfg.codec_eos_token_id
    ids = conversation("wide")
    _, plain, _ = reference_speech(ref, torch.tensor([ids]), REPLY, FRAMES)
    likely = int(plain[5, 0])  # eos made to beat this code wherever it wins: at frame 5 at the latest
    with torch.no_grad():
        for head in (ref.talker.codec_head.weight, talker.codec_head.weight):
            head[eos] = head[likely] * 1.5
    try:
        reply, want_codes, want_logits = reference_speech(ref, torch.tensor([ids]), REPLY, FRAMES, min_frames=3)
        codes, logits = ours(talker, th, text_prompt(talker, th, ids), reply[:-1], min_frames=3)
        assert 3 <= len(want_codes) < FRAMES  # stopped by eos, not by the limit
        assert torch.equal(codes, want_codes)
        assert_logits_close(logits, want_logits)
    finally:
        with torch.no_grad():
            w = load_file(str(d / "model.safetensors"))["talker.codec_head.weight"]
            ref.talker.codec_head.weight.copy_(w)
            talker.codec_head.weight.copy_(w)


@pytest.mark.parametrize("greedy", [True, False])
def test_three_states_batched_equal_each_alone(built, greedy):
    """One batched forward per step and per code predictor sub-step; states in different phases."""
    _, d, talker, th = built("deep")
    sampling = T.TALKER_GREEDY if greedy else T.TALKER_SAMPLING
    prompts = [text_prompt(talker, th, conversation("deep", seed=s, user_text=n)) for s, n in ((1, 3), (2, 9), (3, 6))]
    replies = [[20, 30, 40, 50], [60, 70], [80, 90, 100, 110, 120, 130]]
    alone = []
    for p, r, seed in zip(prompts, replies, (5, 6, 7)):
        g = torch.Generator().manual_seed(seed)
        alone.append(T.generate_codes(talker, p, r, th.model.embed_tokens, sampling=sampling, generator=g, max_frames=8))
    cache = talker.model.allocate_cache(3, 128)
    gens = [torch.Generator().manual_seed(s) for s in (5, 6, 7)]
    states = [T.start(talker, p, th.model.embed_tokens, cache=cache, slot=i, max_frames=8) for i, p in enumerate(prompts)]
    for st, r in zip(states, replies):
        T.push(st, r[0])
    fed = [1, 1, 1]
    with torch.no_grad():
        while not all(st.finished for st in states):
            for i, (st, r) in enumerate(zip(states, replies)):  # one reply token per step, as a Thinker would
                if not st.reply_ended and not st.finished:
                    T.push(st, r[fed[i]] if fed[i] < len(r) else None)
                    fed[i] += 1
            live = [i for i, st in enumerate(states) if not st.finished]
            T.step_batch(talker, [states[i] for i in live], [sampling] * len(live), [gens[i] for i in live])
    for st, want in zip(states, alone):
        assert torch.equal(torch.stack(st.frames), want)


def test_turns_add_up_to_the_whole_conversation(built):
    _, d, talker, th = built("tiny")
    ids = conversation("tiny")
    whole = text_prompt(talker, th, ids)
    cut = [i for i, t in enumerate(ids) if t == config("tiny")["im_start_token_id"]][3]  # the second user turn
    parts = text_prompt(talker, th, ids[cut:], after=text_prompt(talker, th, ids[:cut]))
    torch.testing.assert_close(parts.rows, whole.rows)
    assert torch.equal(parts.ids, whole.ids) and torch.equal(parts.assistant_rows, whole.assistant_rows)
    assert torch.equal(parts.positions, whole.positions) and float(parts.next_position) == float(whole.next_position)
    c = config("tiny")
    assert c["system_token_id"] not in whole.ids.tolist() and c["assistant_token_id"] not in whole.ids.tolist()


def test_voices_and_defaults(built):
    _, d, talker, th = built("tiny")
    assert talker.voice_id("Ethan") == config("tiny")["talker_config"]["speaker_id"]["ethan"]
    with pytest.raises(ValueError, match="aiden, chelsie, ethan"):
        T.start(talker, text_prompt(talker, th, conversation("tiny")), th.model.embed_tokens, voice="serena")
    from transformers import Qwen3OmniMoeForConditionalGeneration

    sig = inspect.signature(Qwen3OmniMoeForConditionalGeneration.generate).parameters
    codec = T.TALKER_SAMPLING.codec
    assert (codec.temperature, codec.top_k, codec.top_p, codec.repetition_penalty) == tuple(
        sig[f"talker_{k}"].default for k in ("temperature", "top_k", "top_p", "repetition_penalty"))
    assert sig["talker_do_sample"].default is True and sig["speaker"].default.lower() == "ethan"
    assert T.TALKER_GREEDY.codec.repetition_penalty == codec.repetition_penalty


@pytest.mark.parametrize("what", ["missing_shared_gate", "missing_expert", "extra_codebook", "wrong_shape"])
def test_loading_names_the_bad_key(built, tmp_path, what):
    _, d, _, _ = built("tiny")
    bad = tmp_path / "bad"
    shutil.copytree(d, bad)
    sd = load_file(str(bad / "model.safetensors"))
    key = {"missing_shared_gate": "talker.model.layers.1.mlp.shared_expert_gate.weight",
           "missing_expert": "talker.model.layers.0.mlp.experts.2.down_proj.weight",
           "extra_codebook": "talker.code_predictor.lm_head.7.weight",
           "wrong_shape": "talker.text_projection.linear_fc1.weight"}[what]
    if what.startswith("missing"):
        del sd[key]
    elif what == "extra_codebook":
        sd[key] = sd["talker.code_predictor.lm_head.0.weight"].clone()
    else:
        sd[key] = sd[key][:, :-1].contiguous()
    save_file(sd, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        T.Talker.load(bad)
