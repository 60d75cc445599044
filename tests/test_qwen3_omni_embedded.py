"""The embedded Qwen3-Omni speaks: its talker and code2wav load strictly in ours and in transformers 5.23, and
ours equal transformers' `generate` with audio out on it (fp32 on CPU, from the bf16 checkpoint).

What the seeded weights promise (omni/qwen3_omni_embedded.py) is checked here too: greedy codes that vary,
the codec eos exactly on the step the text ends (so speech lasts as long as the reply, greedy or sampled),
and an audible, unclipped wave.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import talker.qwen3_omni_talker as T
from omni import embedded
from encoders.qwen3_omni_audio import audio_token_count
from omni.qwen3_omni_config import Qwen3OmniConfig
from omni.qwen3_omni_rope import RopeTokens, rope_index
from omni.qwen3_omni_thinker import Thinker
from omni.tokenizer import TextTokenizer
from omni.weights import empty_params, load_module
from talker.qwen3_omni_code2wav import Code2Wav, Code2WavConfig

torch.set_num_threads(1)
REPLY, MAX_FRAMES = 12, 40  # thinker tokens (the last is never fed); a frame limit the eos comes well before
WAVE_TOL = dict(atol=1e-5, rtol=1e-5)  # fp32, the reference's ops in its order: measured max abs diff 0


@pytest.fixture(scope="module")
def built(embedded_dir):  # embedded_dir sets $OMNI_CACHE to the session's private cache
    return embedded.ensure(size=embedded.size_of("embedded:qwen3-omni"))


@pytest.fixture(scope="module")
def reference(built):
    from transformers import Qwen3OmniMoeForConditionalGeneration

    model, info = Qwen3OmniMoeForConditionalGeneration.from_pretrained(built, dtype=torch.float32,
                                                                       output_loading_info=True)
    model.eval().set_experts_implementation("eager")  # the readable per-expert loop is the oracle (FACTS.md)
    model.config.talker_config.audio_config = model.config.thinker_config.audio_config  # FACTS: 5.23 pitfall
    return model, info


@pytest.fixture(scope="module")
def ours(built):
    cfg = Qwen3OmniConfig.from_file(built)
    talker = T.Talker.load(built, dtype=torch.float32)
    with empty_params():
        c2w = Code2Wav(Code2WavConfig.from_dict(cfg.code2wav_config))
    c2w = load_module(c2w, built, "code2wav.", dtype=torch.float32)
    with empty_params():
        th = Thinker(cfg.thinker_config)
    for part in ("model", "lm_head", "visual", "audio_tower"):
        load_module(getattr(th, part), built, f"thinker.{part}.", dtype=torch.float32)
    return talker, c2w, th


def conversation(built) -> list[int]:
    """A system turn, a user turn, the generation prompt, in the real vocabulary."""
    c = json.loads((built / "config.json").read_text())
    tok = TextTokenizer.from_dir(built)
    s, e = c["im_start_token_id"], c["im_end_token_id"]
    nl = tok.encode("\n")
    return ([s, c["system_token_id"]] + tok.encode("\nYou are Qwen.") + [e] + nl
            + [s, c["user_token_id"]] + tok.encode("\nHello, how are you today?") + [e] + nl
            + [s, c["assistant_token_id"]] + nl)


@pytest.fixture(scope="module")
def spoken(built, reference):
    """transformers' greedy generate with audio out: (reply ids, codes (T, 16), wave (L,))."""
    model = reference[0]
    ids = torch.tensor([conversation(built)])
    codes = []

    def hook(mod, args, kwargs, out):
        if out.hidden_states[1] is not None:
            codes.append(out.hidden_states[1][0])

    h = model.talker.register_forward_hook(hook, with_kwargs=True)
    try:
        seq, wave = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), return_audio=True,
                                   thinker_do_sample=False, talker_do_sample=False, thinker_max_new_tokens=REPLY,
                                   talker_max_new_tokens=MAX_FRAMES + 1, speaker="ethan")
    finally:
        h.remove()
    return seq[0, ids.shape[1]:].tolist(), torch.stack(codes), wave.reshape(-1)


def _reference_codes(model, ids: list[int], **media) -> tuple[list[int], torch.Tensor]:
    from tests.reference_qwen3_speech import reference_speech

    reply, codes, _ = reference_speech(model, torch.tensor([ids]), REPLY, MAX_FRAMES, **media)
    return reply, codes


def test_the_config_has_a_talker_and_code2wav_with_the_real_codec_numbers(built):
    d = json.loads((built / "config.json").read_text())
    assert d["enable_audio_output"] is True and embedded.is_embedded(built)
    tc, cw = d["talker_config"], d["code2wav_config"]
    assert tc["text_config"]["vocab_size"] == 3072 and tc["num_code_groups"] == 16
    assert (tc["codec_pad_id"], tc["codec_bos_id"], tc["codec_eos_token_id"]) == (2148, 2149, 2150)
    assert (tc["codec_nothink_id"], tc["codec_think_bos_id"], tc["codec_think_eos_id"]) == (2155, 2156, 2157)
    assert tc["speaker_id"] == {"chelsie": 2301, "ethan": 2302, "aiden": 2303}
    assert 1 <= tc["accept_hidden_layer"] <= d["thinker_config"]["text_config"]["num_hidden_layers"]
    assert tc["thinker_hidden_size"] == d["thinker_config"]["text_config"]["hidden_size"]
    assert (cw["codebook_size"], cw["num_quantizers"]) == (2048, 16)
    with empty_params():
        c2w = Code2Wav(Code2WavConfig.from_dict(cw))
    assert c2w.samples_per_frame == 1920 and c2w.out_len(10) == 1920 * 10 - 555  # 12.5 frames/s at 24 kHz
    with safe_open(built / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert {f.get_slice(k).get_dtype() for k in keys} == {"BF16"}
    assert {k.split(".")[0] for k in keys} == {"thinker", "talker", "code2wav"}
    assert "talker.model.layers.1.mlp.experts.7.down_proj.weight" in keys  # one tensor per expert, as published
    assert "talker.code_predictor.lm_head.14.weight" in keys and "talker.code_predictor.lm_head.15.weight" not in keys


def test_transformers_loads_every_key(reference):
    _, info = reference
    assert not any(info.values()), {k: v for k, v in info.items() if v}


def test_greedy_codes_equal_transformers_and_speech_ends_with_the_text(built, ours, spoken):
    talker, _, th = ours
    reply, want, _ = spoken
    assert len(reply) == REPLY
    x = torch.tensor(conversation(built))
    emb = th.model.embed_tokens(x)
    prompt = T.prefill_rows(talker, x, emb, emb)  # no media: the hidden is never read
    got = T.generate_codes(talker, prompt, reply[:-1], th.model.embed_tokens, sampling=T.TALKER_GREEDY,
                           max_frames=MAX_FRAMES)
    assert torch.equal(got, want)
    # one frame per fed reply token, then the codec eos on <tts_text_eod>: well before the frame limit
    assert got.shape == (REPLY - 1, 16)
    assert len(set(got[:, 0].tolist())) > 6 and len(set(got[:, -1].tolist())) > 6  # varied, not one code
    sampled = T.generate_codes(talker, prompt, reply[:-1], th.model.embed_tokens,
                               generator=torch.Generator().manual_seed(0), max_frames=MAX_FRAMES)
    assert sampled.shape == got.shape and not torch.equal(sampled, got)
    assert int(sampled.max()) < 2048


@torch.no_grad()
def test_code2wav_equals_transformers_and_the_wave_is_audible(reference, ours, spoken):
    model = reference[0]
    _, c2w, _ = ours
    _, codes, wave = spoken
    got = c2w(codes.T[None])[0, 0]  # (Q, T) -> (L,)
    assert got.shape == wave.shape == (1920 * len(codes) - 555,)
    torch.testing.assert_close(got, wave, **WAVE_TOL)  # generate's own wave (chunked_decode: < 300 codes)
    torch.testing.assert_close(got, model.code2wav(codes.T[None])[0, 0], **WAVE_TOL)
    rms, peak = float(got.pow(2).mean().sqrt()), float(got.abs().max())
    print(f"wave rms {rms:.3f}, peak {peak:.3f}")
    assert 0.03 < rms < 0.3 and peak < 0.9  # audible, never at the clamp
    frames = got[: 1920 * (len(codes) - 1)].view(-1, 1920)
    assert bool((frames.pow(2).mean(1).sqrt() > 0.01).all())  # no silent frame


@torch.no_grad()
def test_speech_about_an_image_and_audio_equals_transformers(built, reference, ours):
    """Media rows come from the thinker's layer `accept_hidden_layer` (through our encoders and thinker);
    capturing a layer off by one changes the codes."""
    talker, _, th = ours
    c = json.loads((built / "config.json").read_text())
    tc = c["thinker_config"]
    g = torch.Generator().manual_seed(3)
    frames, grid = 170, torch.tensor([[1, 4, 4]])
    feats = torch.randn(128, frames, generator=g)
    px = torch.randn(16, 3 * 2 * 16 ** 2, generator=g)
    tok = TextTokenizer.from_dir(built)
    s, e, nl = c["im_start_token_id"], c["im_end_token_id"], tok.encode("\n")
    ids = ([s, c["user_token_id"]] + tok.encode("\nListen:") + [tc["audio_start_token_id"]]
           + [tc["audio_token_id"]] * audio_token_count(frames) + [tc["audio_end_token_id"]] + tok.encode(" and look:")
           + [tc["vision_start_token_id"]] + [tc["image_token_id"]] * 4 + [tc["vision_end_token_id"]]
           + tok.encode(" What is it?") + [e] + nl + [s, c["assistant_token_id"]] + nl)
    reply, want = _reference_codes(reference[0], ids, input_features=feats[None], pixel_values=px, image_grid_thw=grid,
                                   feature_attention_mask=torch.ones(1, frames, dtype=torch.long))
    x = torch.tensor(ids)
    pos, _ = rope_index(x, image_grid_thw=grid, audio_lengths=[frames], tokens=RopeTokens.from_config(th.cfg))
    embeds, deepstack = th.embed(x[None], image=th.visual(px, grid.tolist()), audio=th.audio_tower(feats, [frames]))

    def codes(layer):
        _, hidden = th(embeds, pos[:, None], th.model.allocate_cache(1, len(ids)), torch.tensor([0]),
                       deepstack=deepstack, capture_layer=layer)
        prompt = T.prefill_rows(talker, x, embeds[0], hidden[0], image_grid_thw=grid, audio_lengths=[frames])
        return T.generate_codes(talker, prompt, reply[:-1], th.model.embed_tokens, sampling=T.TALKER_GREEDY,
                                max_frames=MAX_FRAMES)

    k = talker.cfg.accept_hidden_layer
    assert want.shape == (REPLY - 1, 16) and torch.equal(codes(k), want)
    assert not torch.equal(codes(k + 1), want)  # planted: the layer after (here the final norm's output)
