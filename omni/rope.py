"""TMRoPE: the (t, h, w) rotary positions of a Qwen2.5-Omni prompt, as pure functions.

Equal to transformers' `get_rope_index` (modeling_qwen2_5_omni.py) token for token, but
computed for one unpadded sequence at a time and able to start anywhere, so the engine can
prefill only the new tokens of a turn on top of a reused KV cache:

    pos1, nxt = rope_positions(turn1_ids, turn1_media, rt)          # (3, L1)
    ... decode n tokens at decode_positions(nxt, n) ...
    pos2, nxt = rope_positions(turn2_ids, turn2_media, rt, start=nxt + n)

The rules (positions are relative to the running start `cur`):
- text (and every bos/eos token): one position each, equal on all three axes, `cur, cur+1, ...`;
- image: t = 0, h / w = the merged grid row / column; the token after it starts at max + 1
  (max over all three axes, so a wide image pushes the text far out);
- video: t of grid k = int(float32(k * float32(second_per_grid)) * position_id_per_seconds);
- audio: one position per encoder token (40 ms), like text;
- video with its own audio (`with_audio`): <vision_bos><audio_bos> share one position; video and
  audio both start right after it and are interleaved in `seconds_per_chunk` chunks, video
  first; <audio_eos><vision_eos> share max(last chunk) + 1, where "last chunk" is the last one
  laid out, not the global max (transformers' rule, kept for parity).

`next_start` is what transformers' `mrope_position_deltas` encodes: the first generated token
sits at max(all positions) + 1 (delta = that - L). It is also where the next turn continues,
except in one corner: audio-in-video whose last chunk is audio while an earlier video chunk
reaches higher (short audio, tall frames) and fewer text tokens follow than the overshoot.
There transformers' decode (max + 1) and its full recompute of a later turn (last + 1)
disagree with each other; we follow decode, so turn-1 generation matches `generate`.

Audio-only and text-only prompts take transformers' plain 1-D branch; the walk below yields
the same numbers, since audio positions are consecutive.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import torch


@dataclass(frozen=True)
class RopeTokens:
    """Token ids and timing constants TMRoPE needs (thinker and talker carry the same fields)."""

    image_token_id: int  # <|IMAGE|> pad
    video_token_id: int  # <|VIDEO|> pad
    audio_token_id: int  # <|AUDIO|> pad
    vision_start_token_id: int  # <|vision_bos|>
    vision_end_token_id: int  # <|vision_eos|>
    audio_start_token_id: int  # <|audio_bos|>
    audio_end_token_id: int  # <|audio_eos|>
    spatial_merge_size: int = 2  # vision grid h/w are divided by this before positions
    position_id_per_seconds: int | float = 25  # t positions per second (one audio token = 1/25 s)
    seconds_per_chunk: int | float = 2  # audio-in-video interleave granularity

    @classmethod
    def from_config(cls, cfg) -> "RopeTokens":
        """From omni.config.ThinkerConfig or TalkerConfig (same key names, merge size differs in place)."""
        merge = getattr(cfg, "spatial_merge_size", None)
        if merge is None:
            merge = cfg.vision_config.spatial_merge_size
        return cls(
            image_token_id=cfg.image_token_index, video_token_id=cfg.video_token_index,
            audio_token_id=cfg.audio_token_index, vision_start_token_id=cfg.vision_start_token_id,
            vision_end_token_id=cfg.vision_end_token_id, audio_start_token_id=cfg.audio_start_token_id,
            audio_end_token_id=cfg.audio_end_token_id, spatial_merge_size=merge,
            position_id_per_seconds=cfg.position_id_per_seconds, seconds_per_chunk=cfg.seconds_per_chunk,
        )

    @property
    def tokens_per_chunk(self) -> int:
        return int(self.position_id_per_seconds * self.seconds_per_chunk)


@dataclass(frozen=True)
class MediaSpec:
    """One multimodal item, in prompt order."""

    kind: Literal["image", "video", "audio"]
    grid_thw: tuple[int, int, int] | None = None  # image/video patch grid, before the spatial merge
    audio_tokens: int | None = None  # audio encoder tokens (encoders.audio.audio_token_count); audio and audio-in-video
    second_per_grid: float | None = None  # video: seconds per temporal grid (temporal_patch_size / fps; 1.0 at 2 fps)
    with_audio: bool = False  # video whose audio track is interleaved with it (use_audio_in_video)

    def __post_init__(self):
        if self.kind not in ("image", "video", "audio"):
            raise ValueError(f"media kind must be image, video or audio; got {self.kind!r}")
        if self.kind in ("image", "video"):
            if self.grid_thw is None or len(self.grid_thw) != 3 or min(self.grid_thw) < 1:
                raise ValueError(f"{self.kind} needs grid_thw=(t, h, w) of positive ints; got {self.grid_thw}")
        if self.kind == "video" and self.second_per_grid is None:
            raise ValueError("video needs second_per_grid (temporal_patch_size / fps, 1.0 at the default 2 fps)")
        if self.kind == "audio" or self.with_audio:
            if self.audio_tokens is None or self.audio_tokens < 1:
                raise ValueError(f"{self.kind} with audio needs audio_tokens >= 1; got {self.audio_tokens}")
        if self.with_audio and self.kind != "video":
            raise ValueError("with_audio applies to video only")

    def vision_tokens(self, merge: int) -> int:
        t, h, w = self.grid_thw
        if h % merge or w % merge:
            raise ValueError(f"grid h, w {h}x{w} must be multiples of spatial_merge_size {merge}")
        return t * (h // merge) * (w // merge)

    def n_tokens(self, merge: int) -> int:
        """Pad tokens the item occupies in the prompt (bos/eos not counted)."""
        if self.kind == "audio":
            return self.audio_tokens
        return self.vision_tokens(merge) + (self.audio_tokens if self.with_audio else 0)


def decode_positions(next_start: int, n: int = 1) -> torch.Tensor:
    """(3, n) positions of n generated tokens starting at next_start."""
    return torch.arange(next_start, next_start + n, dtype=torch.long).expand(3, n)


def _video_t(grid_t: int, second_per_grid: float, per_second: int | float) -> torch.Tensor:
    # transformers: (arange(grid_t) * second_per_grids[i].float() * position_id_per_seconds).long(),
    # i.e. float32 products truncated toward zero (0.7 s/grid -> 0, 17, 35, 52).
    return (torch.arange(grid_t) * torch.tensor(second_per_grid, dtype=torch.float32) * per_second).long()


def _vision_block(grid_thw, t_index: torch.Tensor, merge: int) -> torch.Tensor:
    """(3, T*h*w) relative positions: t per temporal grid, h/w the merged grid row/column."""
    _, h, w = grid_thw
    h, w = h // merge, w // merge
    T = len(t_index)
    t = t_index.view(-1, 1).expand(T, h * w).flatten()
    hh = torch.arange(h).view(1, -1, 1).expand(T, h, w).flatten()
    ww = torch.arange(w).view(1, 1, -1).expand(T, h, w).flatten()
    return torch.stack([t, hh, ww])


def _chunks(t: Sequence[float], per_chunk: int) -> list[tuple[int, int]]:
    # transformers' get_chunked_index, kept literally: the chunk counter moves by one per token,
    # so a jump of more than one chunk in t splits the next frame's first token off on its own.
    out, start, chunk = [], 0, 1
    for i, v in enumerate(t):
        if v >= chunk * per_chunk:
            out.append((start, i))
            start, chunk = i, chunk + 1
    out.append((start, len(t)))
    return out


def _av_block(spec: MediaSpec, rt: RopeTokens) -> tuple[torch.Tensor, int]:
    """Interleaved video+audio relative positions (3, Nv+Na), and the shared eos position."""
    video = _vision_block(spec.grid_thw, _video_t(spec.grid_thw[0], spec.second_per_grid, rt.position_id_per_seconds),
                          rt.spatial_merge_size)
    audio = torch.arange(spec.audio_tokens).expand(3, -1)
    vc = _chunks(video[0].tolist(), rt.tokens_per_chunk)
    ac = _chunks(range(spec.audio_tokens), rt.tokens_per_chunk)
    parts = []
    for j in range(max(len(vc), len(ac))):
        if j < len(vc):
            parts.append(video[:, vc[j][0]:vc[j][1]])
        if j < len(ac):
            parts.append(audio[:, ac[j][0]:ac[j][1]])
    return torch.cat(parts, 1), int(parts[-1].max()) + 1


def placeholder_ids(spec: MediaSpec, rt: RopeTokens) -> list[int]:
    """The prompt tokens of one media item, bos and eos included, as transformers' processor lays them out.

    Audio-in-video: <vision_bos><audio_bos> (video chunk, audio chunk)* <audio_eos><vision_eos>; the
    processor chunks on float64 t values (not truncated), which we follow here.
    """
    if spec.kind == "audio":
        return [rt.audio_start_token_id] + [rt.audio_token_id] * spec.audio_tokens + [rt.audio_end_token_id]
    n = spec.vision_tokens(rt.spatial_merge_size)
    pad = rt.image_token_id if spec.kind == "image" else rt.video_token_id
    if not spec.with_audio:
        return [rt.vision_start_token_id] + [pad] * n + [rt.vision_end_token_id]
    t, h, w = spec.grid_thw
    hw = (h // rt.spatial_merge_size) * (w // rt.spatial_merge_size)
    vt = np.repeat(np.arange(t) * spec.second_per_grid * rt.position_id_per_seconds, hw)
    vc = _chunks(vt.tolist(), rt.tokens_per_chunk)
    ac = _chunks(range(spec.audio_tokens), rt.tokens_per_chunk)
    ids = [rt.vision_start_token_id, rt.audio_start_token_id]
    for j in range(max(len(vc), len(ac))):
        if j < len(vc):
            ids += [rt.video_token_id] * (vc[j][1] - vc[j][0])
        if j < len(ac):
            ids += [rt.audio_token_id] * (ac[j][1] - ac[j][0])
    return ids + [rt.audio_end_token_id, rt.vision_end_token_id]


def rope_positions(input_ids, media: Sequence[MediaSpec], rt: RopeTokens, start: int = 0) -> tuple[torch.Tensor, int]:
    """Positions of one unpadded token sequence (a whole prompt or the new part of a turn).

    input_ids: (L,) ints (list, numpy or LongTensor), media placeholders laid out as by
    `placeholder_ids`; media: the items whose pad tokens appear in input_ids, in order; start: the
    position of the first token (`next_start` of what precedes it in the KV cache, plus any
    tokens decoded since). Returns positions (3, L) long and next_start = max + 1 (start if L == 0).
    """
    ids = np.asarray(input_ids.tolist() if isinstance(input_ids, torch.Tensor) else input_ids, dtype=np.int64)
    if ids.ndim != 1:
        raise ValueError(f"input_ids must be one unpadded sequence (L,); got shape {ids.shape}")
    L = len(ids)
    pos = torch.empty(3, L, dtype=torch.long)
    pads = {"image": rt.image_token_id, "video": rt.video_token_id, "audio": rt.audio_token_id}
    pad_at = np.flatnonzero(np.isin(ids, list(pads.values())))
    cur, i, m = start, 0, 0
    while i < L:
        later = pad_at[np.searchsorted(pad_at, i):]
        j = int(later[0]) if len(later) else L
        pos[:, i:j] = torch.arange(cur, cur + j - i)  # text, bos and eos tokens
        cur += j - i
        i = j
        if i == L:
            break
        if m >= len(media):
            raise ValueError(f"input_ids has a media pad token (id {ids[i]}) at {i} but only {len(media)} media items were given")
        spec = media[m]
        m += 1
        if ids[i] != pads[spec.kind] and not (spec.with_audio and ids[i] == rt.audio_token_id):
            raise ValueError(f"media item {m - 1} is {spec.kind} but the pad token at {i} is id {ids[i]}; "
                             "media must be listed in prompt order")
        n = spec.n_tokens(rt.spatial_merge_size)
        run = ids[i:i + n]
        if spec.with_audio:
            if i < 2 or ids[i - 2] != rt.vision_start_token_id or ids[i - 1] != rt.audio_start_token_id:
                raise ValueError(f"video with audio at {i} must follow <vision_bos><audio_bos> (see placeholder_ids)")
            ok = len(run) == n and np.isin(run, [rt.video_token_id, rt.audio_token_id]).all()
            ok = ok and ids[i + n:i + n + 2].tolist() == [rt.audio_end_token_id, rt.vision_end_token_id]
            if not ok:
                raise ValueError(f"media item {m - 1} (video with audio) needs {n} video/audio pad tokens "
                                 f"then <audio_eos><vision_eos> at {i}; the prompt does not match its grid/audio_tokens")
            cur -= 1  # <audio_bos> shares <vision_bos>'s position
            pos[:, i - 1] = cur - 1
            block, eos = _av_block(spec, rt)
            pos[:, i:i + n] = block + cur
            pos[:, i + n:i + n + 2] = eos + cur  # <audio_eos> and <vision_eos> share one position
            cur, i = cur + eos + 1, i + n + 2
            continue
        if len(run) != n or (run != pads[spec.kind]).any():
            raise ValueError(f"media item {m - 1} ({spec.kind}) needs {n} consecutive pad tokens at {i}; "
                             "the prompt does not match its grid_thw/audio_tokens")
        if spec.kind == "audio":
            block = torch.arange(n).expand(3, n)
        else:
            t_index = (_video_t(spec.grid_thw[0], spec.second_per_grid, rt.position_id_per_seconds) if spec.kind == "video"
                       else (torch.arange(spec.grid_thw[0]) * rt.position_id_per_seconds).long())
            block = _vision_block(spec.grid_thw, t_index, rt.spatial_merge_size)
        pos[:, i:i + n] = block + cur
        cur, i = cur + int(block.max()) + 1, i + n
    if m != len(media):
        raise ValueError(f"{len(media)} media items given but input_ids holds pad tokens for only {m}")
    return pos, (int(pos.max()) + 1 if L else start)
