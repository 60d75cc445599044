"""The Thinker against transformers: logits for a mixed prompt, greedy generation, KV-cached decoding.

Inputs are built directly (random pixels and mel features, placeholder layout from
omni.rope.placeholder_ids) so this file isolates the decoder + encoders + positions; the
processor has its own parity file. Tolerance fp32: logits atol 1e-4, rtol 1e-4.
"""

from __future__ import annotations

import pytest
import torch

from omni.pipeline import GenerationResult, OmniModel
from omni.processor import DEFAULT_SYSTEM_PROMPT, Prompt
from omni.rope import MediaSpec, RopeTokens, placeholder_ids, rope_positions
from omni.sampling import GREEDY
from encoders.audio import audio_token_count

TOL = dict(atol=1e-4, rtol=1e-4)


def mixed_inputs(model: OmniModel, seed: int = 0, audio_in_video: bool = True):
    """system + user(image, audio, video[with its audio], text) + assistant prompt, with random media."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.cfg.thinker_config
    vc = cfg.vision_config
    rt = RopeTokens.from_config(cfg)
    tok = model.processor.tok
    patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
    image_grid = (1, 8, 12)
    video_grid = (3, 4, 6)
    audio_frames = [500, 310]  # 5 s spoken question; 3.1 s of sound in the video
    specs = [
        MediaSpec("image", grid_thw=image_grid),
        MediaSpec("audio", audio_tokens=audio_token_count(audio_frames[0])),
        MediaSpec("video", grid_thw=video_grid, second_per_grid=1.0, with_audio=audio_in_video,
                  audio_tokens=audio_token_count(audio_frames[1]) if audio_in_video else None),
    ]
    ids = tok.encode(f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n")
    for s in specs:
        ids += placeholder_ids(s, rt)
    ids += tok.encode("What is happening?<|im_end|>\n<|im_start|>assistant\n")
    input_ids = torch.tensor(ids)
    positions, nxt = rope_positions(input_ids, specs, rt)
    frames = audio_frames if audio_in_video else audio_frames[:1]
    prompt = Prompt(
        input_ids=input_ids, positions=positions, next_position=nxt, media=specs,
        pixel_values=torch.randn(image_grid[0] * image_grid[1] * image_grid[2], patch_dim, generator=g),
        image_grid_thw=torch.tensor([image_grid]),
        pixel_values_videos=torch.randn(video_grid[0] * video_grid[1] * video_grid[2], patch_dim, generator=g),
        video_grid_thw=torch.tensor([video_grid]), video_second_per_grid=[1.0],
        audio_features=torch.randn(cfg.audio_config.num_mel_bins, sum(frames), generator=g),
        audio_feature_lens=torch.tensor(frames),
    )
    return prompt


def reference_kwargs(prompt: Prompt, audio_in_video: bool = True):
    kw = dict(
        input_ids=prompt.input_ids[None], attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        pixel_values=prompt.pixel_values, image_grid_thw=prompt.image_grid_thw,
        pixel_values_videos=prompt.pixel_values_videos, video_grid_thw=prompt.video_grid_thw,
        video_second_per_grid=torch.tensor(prompt.video_second_per_grid), use_audio_in_video=audio_in_video,
    )
    if prompt.audio_features is not None:
        kw["input_features"], kw["feature_attention_mask"] = prompt.padded_audio()
    return {k: v for k, v in kw.items() if v is not None}  # (generate cannot take None for absent media)


def our_logits(model: OmniModel, prompt: Prompt, positions: torch.Tensor | None = None) -> torch.Tensor:
    th = model.thinker
    cache = th.model.allocate_cache(1, len(prompt))
    with torch.inference_mode():
        hidden = th(model.embed_prompt(prompt), (prompt.positions if positions is None else positions)[:, None],
                    cache, torch.zeros(1, dtype=torch.long))
        return th.lm_head(hidden)[0]


@pytest.fixture
def pair(references, config_name):
    ref, path = references(config_name)
    return ref, OmniModel.load(path)


@pytest.mark.parametrize("audio_in_video", [True, False])
def test_logits_match_reference(pair, audio_in_video):
    ref, model = pair
    prompt = mixed_inputs(model, audio_in_video=audio_in_video)
    with torch.no_grad():
        want = ref.thinker(**reference_kwargs(prompt, audio_in_video)).logits[0]
    got = our_logits(model, prompt)
    torch.testing.assert_close(got, want, **TOL)


def test_greedy_generation_matches_reference(pair):
    ref, model = pair
    prompt = mixed_inputs(model, seed=1)
    stop = sorted(model.stop_ids)
    with torch.no_grad():
        out = ref.thinker.generate(**reference_kwargs(prompt), max_new_tokens=32, do_sample=False,
                                   eos_token_id=stop, pad_token_id=stop[0])
    want = out[0, len(prompt):].tolist()
    want = [t for t in want if t not in stop][: len(want)]
    result = GenerationResult()
    list(model.generate_text(prompt, max_new_tokens=32, sampling=GREEDY, result=result))
    assert result.token_ids == want
    assert len(want) >= 16, "reference stopped too early for the comparison to mean much"


def test_kv_cached_decoding_equals_full_recompute(pair):
    _, model = pair
    prompt = mixed_inputs(model, seed=2)
    result = GenerationResult()
    list(model.generate_text(prompt, max_new_tokens=12, sampling=GREEDY, result=result))
    gen = result.token_ids
    n = len(gen)
    assert n >= 4
    full_ids = torch.cat([prompt.input_ids, torch.tensor(gen)])
    full_pos = torch.cat([prompt.positions, torch.arange(prompt.next_position, prompt.next_position + n).expand(3, n)], 1)
    full = Prompt(**{**prompt.__dict__, "input_ids": full_ids, "positions": full_pos})
    logits = our_logits(model, full)
    # logits at position L-1+i predict generated token i
    assert logits[len(prompt) - 1: len(prompt) - 1 + n].argmax(-1).tolist() == gen


def test_planted_bugs_change_tokens(references):
    """Wrong positions, a mirrored image, swapped audio seconds: each must flip greedy tokens."""
    ref, path = references("tiny")
    model = OmniModel.load(path)
    prompt = mixed_inputs(model, seed=3)
    base = our_logits(model, prompt)

    def flips(logits):
        return int((logits.argmax(-1) != base.argmax(-1)).sum())

    L = len(prompt)
    plain = torch.arange(L).expand(3, L)
    assert flips(our_logits(model, prompt, positions=plain)) > L // 10

    vc = model.cfg.thinker_config.vision_config
    t, h, w = prompt.image_grid_thw[0].tolist()
    m = vc.spatial_merge_size
    # mirror the image: reverse the order of merged blocks along w and the patches inside each block
    pv = prompt.pixel_values.view(t, h // m, w // m, m, m, -1).flip(2).flip(4).reshape(t * h * w, -1)
    pv = pv.view(pv.shape[0], vc.in_channels, vc.temporal_patch_size, vc.patch_size, vc.patch_size).flip(-1).reshape(pv.shape[0], -1)
    mirrored = Prompt(**{**prompt.__dict__, "pixel_values": pv})
    assert flips(our_logits(model, mirrored)) > 0
    assert (our_logits(model, mirrored) - base).abs().max() > 1e3 * TOL["atol"]

    a = prompt.audio_features.clone()
    a[:, 0:200], a[:, 200:400] = prompt.audio_features[:, 200:400], prompt.audio_features[:, 0:200]
    swapped = Prompt(**{**prompt.__dict__, "audio_features": a})
    assert flips(our_logits(model, swapped)) > 0
