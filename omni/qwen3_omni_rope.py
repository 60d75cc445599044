"""Qwen3-Omni's TMRoPE: (t, h, w) positions of a prompt, and the interleaved multimodal rotary embedding.

`rope_index` equals transformers 5.23's `get_rope_index` (modeling_qwen3_omni_moe.py) bit for bit, but for
one unpadded sequence that may start anywhere, so a turn can be prefilled on top of a reused KV cache:

    pos1, nxt = rope_index(turn1_ids, image_grid_thw=..., tokens=rt)          # (3, L1) float32, NextPosition
    ... decode n tokens at decode_positions(nxt, n) ...                       # (3, n) float32
    pos2, nxt = rope_index(turn2_ids, audio_lengths=..., tokens=rt, start=nxt + n)

The rules (`st` is the running start; every position is float32, as in transformers):
- text (and every bos/eos token): one position each, equal on all three axes;
- image: t = k * position_id_per_seconds for temporal grid k (0 for a one-grid image), h / w the merged
  grid row / column; the token after it starts at max + 1 over all three axes;
- video: t = k * float32(second_per_grid) * position_id_per_seconds, NOT truncated (0.5 s/grid at 13/s
  gives 0, 6.5, 13, ...): fractional positions carry on into all later text;
- audio: one position per encoder token (13 tokens per second, so an audio token is one position);
- video with its own audio (`use_audio_in_video`): <vision_start><audio_start> take two consecutive
  positions; video and audio both start right after them and are merged token by token by t (video
  first on a tie); <audio_end><vision_end> take two positions after max(last run of one kind) + 1,
  which is the last stretch laid out, not the global max (transformers' rule, kept for parity).
  The merge order is computed from the times, as transformers does, not read from the ids' interleave.

The next position is max(all positions) + 1: where transformers' decode puts the first generated token
(`mrope_position_deltas` + L) and, except in one corner (audio-in-video whose last run is audio while an
earlier video token reaches higher and fewer text tokens follow than the overshoot), where its recompute of
the whole conversation continues a later turn. There the two disagree with each other; we follow decode.
It is returned as a `NextPosition` (float32 anchor + token offset), so that a continuation equals the
recompute bit for bit also with fractional positions: transformers rounds anchor + k once per token,
and continuing from the rounded sum would round twice (off by one float32 ulp, e.g. 6e-5 at 1000).

Model code: imports torch, numpy and ours only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from omni.layers import apply_rotary as rotate
from omni.thinker import MRotary as Qwen2MRotary


def audio_output_length(n_frames, n_window: int = 50):
    """Audio encoder tokens for n_frames log-mel frames (transformers' `_get_feat_extract_output_lengths`).

    Each full 2*n_window-frame chunk (1 s at the default) gives 13 tokens, the remainder three stride-2
    convolutions' worth: 100 frames -> 13, 230 -> 30, 7 -> 1. Works on ints and integer tensors alike.
    """
    chunk = n_window * 2
    rest = n_frames % chunk
    feat = (rest - 1) // 2 + 1
    return ((feat - 1) // 2 + 1 - 1) // 2 + 1 + (n_frames // chunk) * 13


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    if isinstance(cfg, dict):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


@dataclass(frozen=True)
class RopeTokens:
    """Token ids and timing constants TMRoPE needs, from the thinker config (config.json's ids, not the classes')."""

    image_token_id: int  # <|image_pad|>
    video_token_id: int  # <|video_pad|>
    audio_token_id: int  # <|audio_pad|>
    vision_start_token_id: int  # <|vision_start|>
    vision_end_token_id: int  # <|vision_end|>
    audio_start_token_id: int  # <|audio_start|>
    audio_end_token_id: int  # <|audio_end|>
    position_id_per_seconds: int | float  # 13 in the checkpoints; transformers' class default is 25
    spatial_merge_size: int = 2  # vision_config.spatial_merge_size: grid h/w are divided by it
    n_window: int = 50  # audio_config.n_window: the encoder's chunk is 2 * n_window mel frames

    @classmethod
    def from_config(cls, thinker_config) -> "RopeTokens":
        """From `thinker_config` as a config.json dict or omni.qwen3_omni_config.Qwen3OmniThinkerConfig."""
        pps = _get(thinker_config, "position_id_per_seconds")
        if pps is None:
            raise ValueError("thinker_config has no position_id_per_seconds (13 in Qwen3-Omni checkpoints); "
                             "pass the thinker_config of a qwen3_omni_moe config.json")
        vision, audio = _get(thinker_config, "vision_config") or {}, _get(thinker_config, "audio_config") or {}
        return cls(
            image_token_id=_get(thinker_config, "image_token_id"),
            video_token_id=_get(thinker_config, "video_token_id"),
            audio_token_id=_get(thinker_config, "audio_token_id"),
            vision_start_token_id=_get(thinker_config, "vision_start_token_id"),
            vision_end_token_id=_get(thinker_config, "vision_end_token_id"),
            audio_start_token_id=_get(thinker_config, "audio_start_token_id"),
            audio_end_token_id=_get(thinker_config, "audio_end_token_id"),
            position_id_per_seconds=pps, spatial_merge_size=_get(vision, "spatial_merge_size", 2),
            n_window=_get(audio, "n_window", 50),
        )


@dataclass(frozen=True)
class NextPosition:
    """Where a sequence continues: the float32 `anchor` its last text run counts from, plus `offset` tokens.

    transformers computes a text run as anchor + k in float32, one rounding per token. Carrying the pair
    (not the rounded sum) keeps a continuation (the decoded reply, the next turn) bit-equal to transformers'
    run over the whole conversation even when positions are fractional (a 3 fps video gives 8.666...).
    `float(nxt)` is the position itself; `nxt + n` moves n tokens on (`nxt - n` back).
    """

    anchor: float  # a float32 value
    offset: int = 0

    def __add__(self, n: int) -> "NextPosition":
        return NextPosition(self.anchor, self.offset + int(n))

    def __sub__(self, n: int) -> "NextPosition":  # a token taken back out of the cache
        return NextPosition(self.anchor, self.offset - int(n))

    def __float__(self) -> float:
        return float(_f32(self.anchor) + self.offset)

    @classmethod
    def of(cls, start: "float | NextPosition") -> "NextPosition":
        return start if isinstance(start, NextPosition) else cls(float(_f32(start)))


def _f32(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64).float()


def decode_positions(next_position: "float | NextPosition", n: int = 1) -> torch.Tensor:
    """(3, n) float32 positions of n generated tokens starting at next_position."""
    nxt = NextPosition.of(next_position)
    return _text(n, _f32(nxt.anchor), nxt.offset)


def _rows(x, name: str) -> list[tuple[int, int, int]]:
    if x is None:
        return []
    rows = [tuple(int(v) for v in r) for r in (x.tolist() if isinstance(x, (torch.Tensor, np.ndarray)) else x)]
    for r in rows:
        if len(r) != 3 or min(r) < 1:
            raise ValueError(f"{name} rows must be (t, h, w) of positive ints; got {r}")
    return rows


def _flat(x) -> list:
    if x is None:
        return []
    return x.tolist() if isinstance(x, (torch.Tensor, np.ndarray)) else list(x)


def _vision_block(t_index: torch.Tensor, h: int, w: int, st: torch.Tensor) -> torch.Tensor:
    """(3, T*h*w) positions (transformers' get_llm_pos_ids_for_vision): t per grid, merged row, column."""
    T = len(t_index)
    hh = torch.arange(h).view(1, -1, 1).expand(T, -1, w).flatten().float()
    ww = torch.arange(w).view(1, 1, -1).expand(T, h, -1).flatten().float()
    tt = t_index.float().view(-1, 1).expand(-1, h * w).flatten()
    return torch.stack([tt, hh, ww]) + st


def _image_t(grid_t: int, per_second: int | float) -> torch.Tensor:
    return (torch.arange(grid_t) * 1 * per_second).float()


def _video_t(grid_t: int, second_per_grid: float, per_second: int | float) -> torch.Tensor:
    # float32 product, kept fractional (Qwen2.5 truncated it with .long(); Qwen3 does not)
    return (torch.arange(grid_t) * torch.tensor(second_per_grid, dtype=torch.float64).float() * per_second).float()


def _text(n: int, st: torch.Tensor, offset: int = 0) -> torch.Tensor:
    return (torch.arange(offset, offset + n, dtype=torch.float32) + st).expand(3, n)


def _merge_av(video: torch.Tensor, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Video (3, Nv) and audio (3, Na) merged token by token by t, video first on a tie.

    Returns the merged (3, Nv+Na) and the last run of one kind (what transformers appends last, and
    whose max places the eos pair). Both inputs are non-decreasing in t, so a stable sort of
    [video, audio] by t is exactly transformers' two-pointer merge.
    """
    nv = video.shape[1]
    order = torch.sort(torch.cat([video[0], audio[0]]), stable=True).indices
    merged = torch.cat([video, audio], 1)[:, order]
    is_video = order < nv
    other = (is_video != is_video[-1]).nonzero()
    tail_from = int(other[-1]) + 1 if len(other) else 0
    return merged, merged[:, tail_from:]


def rope_index(input_ids, image_grid_thw=None, video_grid_thw=None, audio_lengths=None, second_per_grids=None,
               use_audio_in_video: bool = False, *, tokens: RopeTokens,
               start: float | NextPosition = 0) -> tuple[torch.Tensor, NextPosition]:
    """Positions of one unpadded token sequence (a whole prompt, or the new part of a turn).

    input_ids: (L,) ints (list, numpy or LongTensor) laid out as by transformers' processor;
    image_grid_thw / video_grid_thw: (n, 3) patch grids (before the spatial merge) of the images / videos
    in prompt order; audio_lengths: mel frames of each audio clip in prompt order, the audio of
    audio-in-video included (`feature_attention_mask.sum(-1)`); second_per_grids: per video, seconds one
    temporal grid spans = temporal_patch_size / fps (transformers' processor assumes 1 fps when none is
    passed: 2.0); use_audio_in_video: videos carry their audio interleaved (one flag per prompt, as in
    transformers); tokens: RopeTokens.from_config(thinker_config); start: position of the first token,
    a number or the previous turn's NextPosition plus the tokens decoded since (`nxt + n`).

    Returns positions (3, L) float32 and the NextPosition after them (`float()` of it is max + 1, up to
    one float32 rounding where positions are fractional; `start` itself if L == 0).
    """
    rt = tokens
    ids = np.asarray(input_ids.tolist() if isinstance(input_ids, torch.Tensor) else input_ids, dtype=np.int64)
    if ids.ndim != 1:
        raise ValueError(f"input_ids must be one unpadded sequence (L,); got shape {ids.shape}")
    images, videos = _rows(image_grid_thw, "image_grid_thw"), _rows(video_grid_thw, "video_grid_thw")
    audios, spgs = [int(a) for a in _flat(audio_lengths)], [float(s) for s in _flat(second_per_grids)]
    L, merge = len(ids), rt.spatial_merge_size
    n_img = n_vid = n_aud = 0
    pieces: list[torch.Tensor] = []
    starts = np.flatnonzero((ids == rt.vision_start_token_id) | (ids == rt.audio_start_token_id))
    first = NextPosition.of(start)
    i = 0

    def grid(rows, k, what):
        if k >= len(rows):
            raise ValueError(f"input_ids holds more {what}s than the {len(rows)} {what}_grid_thw rows given")
        t, h, w = rows[k]
        if h % merge or w % merge:
            raise ValueError(f"{what} grid {rows[k]}: h and w must be multiples of spatial_merge_size {merge}")
        return t, h // merge, w // merge

    def audio_tokens(k):
        if k >= len(audios):
            raise ValueError(f"input_ids holds more audio clips than the {len(audios)} audio_lengths given")
        return int(audio_output_length(audios[k], rt.n_window))

    def expect(at, want, n, what):
        if ids[at:at + n].tolist() != [want] * n:
            raise ValueError(f"{what} at {at} needs {n} pad tokens (id {want}); the prompt does not match the "
                             "grids / audio_lengths given, or media are not in prompt order")

    def close(at, want, what):
        if ids[at:at + len(want)].tolist() != want:
            raise ValueError(f"{what} must end with ids {want} at {at}; got {ids[at:at + len(want)].tolist()}")

    while True:
        later = starts[np.searchsorted(starts, i):]
        j = int(later[0]) if len(later) else L
        anchor, offset = (pieces[-1].max() + 1, 0) if pieces else (_f32(first.anchor), first.offset)
        st = anchor + offset  # transformers' st_idx: anchor += text_len, one float32 rounding
        if j > i:
            pieces.append(_text(j - i, anchor, offset))
            st = anchor + (offset + j - i)
        if j == L:
            break
        if ids[j] == rt.audio_start_token_id:
            n = audio_tokens(n_aud)
            expect(j + 1, rt.audio_token_id, n, f"audio {n_aud}")
            close(j + 1 + n, [rt.audio_end_token_id], f"audio {n_aud}")
            pieces.append(_text(1, st))
            tail = _text(n, st + 1)
            pieces.append(tail)
            n_aud, i, eos = n_aud + 1, j + n + 2, 1
        elif j + 1 < L and ids[j + 1] == rt.image_token_id:
            t, h, w = grid(images, n_img, "image")
            expect(j + 1, rt.image_token_id, t * h * w, f"image {n_img}")
            close(j + 1 + t * h * w, [rt.vision_end_token_id], f"image {n_img}")
            pieces.append(_text(1, st))
            tail = _vision_block(_image_t(t, rt.position_id_per_seconds), h, w, st + 1)
            pieces.append(tail)
            n_img, i, eos = n_img + 1, j + t * h * w + 2, 1
        elif j + 1 < L and ids[j + 1] in (rt.video_token_id, rt.audio_start_token_id):
            with_audio = ids[j + 1] == rt.audio_start_token_id
            if with_audio != bool(use_audio_in_video):
                raise ValueError(f"video {n_vid} at {j} is laid out {'with' if with_audio else 'without'} its audio "
                                 f"but use_audio_in_video={use_audio_in_video}; transformers takes one flag per "
                                 "prompt and these must agree")
            t, h, w = grid(videos, n_vid, "video")
            if n_vid >= len(spgs):
                raise ValueError(f"video {n_vid} needs second_per_grids (temporal_patch_size / fps; transformers' "
                                 "processor uses 2.0, i.e. 1 fps, when no fps is given)")
            nv = t * h * w
            bos = 2 if with_audio else 1
            pieces.append(_text(bos, st))
            st = st + bos
            video = _vision_block(_video_t(t, spgs[n_vid], rt.position_id_per_seconds), h, w, st)
            if with_audio:
                na = audio_tokens(n_aud)
                run = ids[j + 2:j + 2 + nv + na]
                if (len(run) != nv + na or (run == rt.video_token_id).sum() != nv
                        or (run == rt.audio_token_id).sum() != na):
                    raise ValueError(f"video {n_vid} with audio at {j} needs {nv} video and {na} audio pad tokens "
                                     "after <vision_start><audio_start>; the prompt does not match the grids / "
                                     "audio_lengths given")
                close(j + 2 + nv + na, [rt.audio_end_token_id, rt.vision_end_token_id], f"video {n_vid} with audio")
                merged, tail = _merge_av(video, _text(na, st))
                pieces.append(merged)
                n_aud, i, eos = n_aud + 1, j + nv + na + 4, 2
            else:
                expect(j + 1, rt.video_token_id, nv, f"video {n_vid}")
                close(j + 1 + nv, [rt.vision_end_token_id], f"video {n_vid}")
                pieces.append(video)
                tail, i, eos = video, j + nv + 2, 1
            n_vid += 1
        else:
            raise ValueError(f"<vision_start> at {j} is followed by id {ids[j + 1] if j + 1 < L else None}, not an "
                             "image, video or audio start token")
        pieces.append(_text(eos, tail.max() + 1))
    for what, used, given in (("image_grid_thw rows", n_img, len(images)), ("video_grid_thw rows", n_vid, len(videos)),
                              ("audio_lengths", n_aud, len(audios))):
        if used != given:
            raise ValueError(f"{given} {what} given but input_ids holds only {used} of those media")
    if not L:
        return torch.empty(3, 0), first
    pos = torch.cat(pieces, 1)
    if j > i and pieces[-1][0, -1] == pos.max():  # ends in text at the max: continue that run exactly
        return pos, NextPosition(float(anchor), offset + j - i)
    return pos, NextPosition(float(pos.max() + 1))  # decode's rule (max + 1) where the run sits below the max


def _interleaved_axes(half: int, section: Sequence[int]) -> torch.Tensor:
    """(half,) the axis (0=t, 1=h, 2=w) that drives each rotary frequency."""
    axis = torch.zeros(half, dtype=torch.long)
    for a in (1, 2):
        axis[a:3 * section[a]:3] = a
    return axis


class MRotary(Qwen2MRotary):
    """Rotary cos/sin for (t, h, w) positions with Qwen3's interleaved M-RoPE.

    Frequency j follows h where j % 3 == 1 and j < 3 * mrope_section[1], w where j % 3 == 2 and
    j < 3 * mrope_section[2], else t (transformers' `recomposition_frequencies`): the axes alternate across the
    spectrum instead of taking contiguous blocks as in Qwen2.5 (`omni.thinker.MRotary`, whose forward this
    shares). Only sections 1 and 2 matter; slices past head_dim / 2 are cut ([2, 3, 3] at head_dim 16 gives w
    two frequencies). transformers applies it whatever rope_parameters' `interleaved` says. Positions may be
    fractional.
    """

    def __init__(self, head_dim: int, theta: float, mrope_section: Sequence[int] | None = None):
        half = head_dim // 2
        section = list(mrope_section) if mrope_section is not None else [24, 20, 20]  # transformers' default
        if len(section) != 3 or sum(section) != half:
            raise ValueError(f"mrope_section {section} must be three ints summing to head_dim/2 = {half}")
        super().__init__(head_dim, theta, section)
        self.axis = _interleaved_axes(half, section)

    @classmethod
    def from_config(cls, text_config) -> "MRotary":
        """From omni.qwen3_omni_config.Qwen3OmniTextConfig."""
        return cls(text_config.get_head_dim(), text_config.get_rope_theta(), text_config.get_mrope_section())

    def forward(self, positions: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (3, B, T) -> cos, sin (B, 1, T, head_dim), broadcastable over heads."""
        return super().forward(positions, dtype)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, nh, T, hd), k (B, nkv, T, hd), cos/sin (B, 1, T, hd) -> rotated q, k (rotate-half convention)."""
    return rotate(q, cos, sin), rotate(k, cos, sin)
