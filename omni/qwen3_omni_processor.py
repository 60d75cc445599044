"""Qwen3-Omni chat messages -> token ids with expanded placeholders, encoder inputs and TMRoPE positions.

The Qwen3 twin of omni/processor.py (same interface, so the engine takes either). What transformers 5.23's
`Qwen3OmniMoeProcessor` does, rebuilt from its parts; tests/test_qwen3_omni_processor.py holds the proofs.

Chat layout (ChatML, rendered here rather than through Jinja):

    [<|im_start|>system\\n{system}<|im_end|>\\n]<|im_start|>user\\n{parts}<|im_end|>\\n<|im_start|>assistant\\n

with an image as `<|vision_start|><|image_pad|><|vision_end|>`, audio as `<|audio_start|><|audio_pad|><|audio_end|>`
and a video as `<|vision_start|><|video_pad|><|vision_end|>`, parts in message order with nothing between them.
What the checkpoints' chat_template.json give (Instruct, Thinking and Captioner share the layout):
- no default system prompt: a system turn only when the messages start with one (Qwen2.5-Omni's template
  added "You are Qwen, a virtual human ..."; Qwen3-Omni's does not; vLLM's Qwen3-Omni examples pass that text
  as an explicit system message). `default_system` is accepted for interface compatibility and does nothing.
- the generation prompt is `<|im_start|>assistant\\n` and nothing more, for Instruct (vLLM's
  examples/offline_inference/qwen3_omni/only_thinker.py writes exactly that prompt for the Instruct model) and
  for Thinking: its template is Qwen3-2507's (a `last_query_index` scan, `reasoning_content` re-wrapped as
  `<think>\\n...\\n</think>\\n\\n` only for assistant turns after the last user query), and it does not open the
  think block: the model writes `<think>` itself (a public bug report on
  Qwen/Qwen3-Omni-30B-A3B-Thinking/chat_template.json shows `apply_chat_template(..., add_generation_prompt=True)`
  ending in `<|im_start|>assistant\\n`, and the model's replies starting with `<think>`). Earlier assistant turns
  are rendered with their text as given here; strip a reasoning block before handing a reply back.
- `<think>` / `</think>` are added tokens with `"special": false` (decoding keeps them): `think_ids` gives
  their ids so the engine can split a Thinking reply into reasoning and answer.

Media (the checkpoints' preprocessor_config.json: Qwen2VLImageProcessor + WhisperFeatureExtractor, identical in
the three repos): patch 16, merge 2, temporal 2 (checked against the thinker's vision_config), image mean/std
0.5/0.5 (not CLIP's), min_pixels 3136, max_pixels 12845056; resized to multiples of 32 px. Audio: 128-bin Whisper
log-mel; transformers pads every clip of one call to the call's longest (`padding=True`), so a clip's last frames
see the reflection of the longest clip's end or zeros, as here (`log_mel(max_samples=longest)`).
Video: frames sampled as qwen-omni-utils does (`options.video_fps`, even count, at least 4), sized per frame
to multiples of 32 within 128*32*32..768*32*32 pixels (transformers' Qwen3 video processor sizes), and
second_per_grid = temporal_patch_size / fps with the fps we sampled at, as transformers computes it when told
the fps (it assumes 1 fps, i.e. 2.0 s per grid, only when none is passed).
Audio in video: `<|vision_start|><|audio_start|>` + video and audio pads merged by time (a grid's tokens at
k * second_per_grid * position_id_per_seconds, audio token j at j; video first on ties) + `<|audio_end|><|vision_end|>`,
transformers' `replace_video_with_audio_token`; its audio features come after the clips before it, in prompt order.

Positions are omni.qwen3_omni_rope.rope_index's: (3, L) float32 and a NextPosition (not an int).
Model code: imports torch, numpy and ours only.
"""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import torch

from encoders import features
from encoders.qwen3_omni_audio import audio_token_count
from omni import media
from omni.processor import MediaOptions, Prompt, expand_placeholders
from omni.qwen3_omni_rope import NextPosition, RopeTokens, rope_index
from omni.rope import MediaSpec
from omni.tokenizer import TextTokenizer, TokenizerError
from omni.types import Audio, Image, Message, Text, Video

IMAGE_MEAN = (0.5, 0.5, 0.5)  # preprocessor_config.json image_mean / image_std
IMAGE_STD = (0.5, 0.5, 0.5)
# transformers' Qwen3OmniMoeProcessor video sizes (shortest_edge / longest_edge), qwen-omni-utils' frame budget
VIDEO_MIN_PIXELS = 128 * 32 * 32
VIDEO_MAX_PIXELS = 768 * 32 * 32
VIDEO_TOTAL_PIXELS = int(128000 * 32 * 32 * 0.9)

IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
AUDIO = "<|audio_start|><|audio_pad|><|audio_end|>"
VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"


def _get(cfg, key, default=None):
    return cfg.get(key, default) if isinstance(cfg, dict) else getattr(cfg, key, default)


def av_interleave(n_video_per_grid: int, grid_t: int, n_audio: int, second_per_grid: float,
                  per_second: float) -> list[bool]:
    """The order transformers' replace_video_with_audio_token lays out audio-in-video: True for a video
    token, False for an audio token. Times in float64 numpy as it computes them; video first on ties."""
    video_t = np.broadcast_to(np.arange(grid_t).reshape(-1, 1), (grid_t, n_video_per_grid)).reshape(-1)
    video_t = video_t * second_per_grid * per_second
    out, i, j = [], 0, 0
    while i < len(video_t) and j < n_audio:
        if video_t[i] <= j:
            out.append(True)
            i += 1
        else:
            out.append(False)
            j += 1
    return out + [True] * (len(video_t) - i) + [False] * (n_audio - j)


class Qwen3OmniProcessor:
    def __init__(self, tokenizer: TextTokenizer, cfg, options: MediaOptions = MediaOptions(),
                 preprocessor: dict | None = None):
        """cfg: omni.qwen3_omni_config.Qwen3OmniThinkerConfig (or its config.json dict); preprocessor: the
        checkpoint's preprocessor_config.json (image mean/std and pixel limits; Qwen3-Omni's values if None)."""
        self.tok = tokenizer
        self.cfg = cfg
        self.options = options
        self.rope = RopeTokens.from_config(cfg)
        vc, ac = _get(cfg, "vision_config") or {}, _get(cfg, "audio_config") or {}
        self.patch_size = vc.get("patch_size", 16)
        self.merge = vc.get("spatial_merge_size", 2)
        self.temporal_patch_size = vc.get("temporal_patch_size", 2)
        self.n_mels = ac.get("num_mel_bins", 128)
        pre = preprocessor or {}
        for key, want in (("patch_size", self.patch_size), ("merge_size", self.merge),
                          ("temporal_patch_size", self.temporal_patch_size), ("feature_size", self.n_mels)):
            if key in pre and pre[key] != want:
                raise ValueError(f"preprocessor_config.json {key} is {pre[key]} but the thinker config says {want}")
        self.image_mean = tuple(pre.get("image_mean", IMAGE_MEAN))
        self.image_std = tuple(pre.get("image_std", IMAGE_STD))
        # the checkpoint's limits, unless options set others (MediaOptions' defaults are Qwen2.5's, the same numbers)
        default = MediaOptions()
        self.image_min_pixels = (options.image_min_pixels if options.image_min_pixels != default.image_min_pixels
                                 else pre.get("min_pixels", features.IMAGE_MIN_PIXELS))
        self.image_max_pixels = (options.image_max_pixels if options.image_max_pixels != default.image_max_pixels
                                 else pre.get("max_pixels", features.IMAGE_MAX_PIXELS))
        t = tokenizer.token_id
        self.ids = {name: t(name) for name in (
            "<|im_start|>", "<|im_end|>", "<|audio_pad|>", "<|audio_start|>", "<|audio_end|>",
            "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")}
        for name, key in (("<|image_pad|>", "image_token_id"), ("<|video_pad|>", "video_token_id"),
                          ("<|audio_pad|>", "audio_token_id"), ("<|audio_start|>", "audio_start_token_id"),
                          ("<|audio_end|>", "audio_end_token_id"), ("<|vision_start|>", "vision_start_token_id"),
                          ("<|vision_end|>", "vision_end_token_id")):
            want = _get(cfg, key)
            if want is not None and self.ids[name] != want:
                raise ValueError(f"tokenizer id of {name} is {self.ids[name]} but config.json says {want}")
        try:
            self.think_ids: tuple[int, int] | None = (t("<think>"), t("</think>"))
        except TokenizerError:
            self.think_ids = None

    @classmethod
    def from_dir(cls, path: str | Path, thinker_cfg, options: MediaOptions = MediaOptions()) -> "Qwen3OmniProcessor":
        pre = Path(path) / "preprocessor_config.json"
        return cls(TextTokenizer.from_dir(path), thinker_cfg, options,
                   json.loads(pre.read_text()) if pre.exists() else None)

    def render(self, messages: list[Message], add_generation_prompt: bool = True, default_system: bool = True) -> str:
        """The chat template, one placeholder per media part. No default system prompt (default_system is ignored)."""
        out = []
        for m in messages:
            out.append(f"<|im_start|>{m.role}\n")
            for p in m.content:
                if isinstance(p, Text):
                    out.append(p.text)
                elif isinstance(p, Image):
                    out.append(IMAGE)
                elif isinstance(p, Audio):
                    out.append(AUDIO)
                elif isinstance(p, Video):
                    out.append(VIDEO)
                else:
                    raise TypeError(f"unknown message part {type(p).__name__}")
            out.append("<|im_end|>\n")
        if add_generation_prompt:
            out.append("<|im_start|>assistant\n")
        return "".join(out)

    def __call__(self, messages: list[Message], add_generation_prompt: bool = True,
                 start: float | NextPosition = 0, prefix_ids: list[int] | None = None, prefix_text: str = "",
                 default_system: bool = True) -> Prompt:
        """Tokenise, decode and featurise media, expand placeholders, compute positions from `start`.

        For a new turn on a kept KV cache: `prefix_ids` are tokens produced but never fed, `prefix_text`
        closes a reply cut short (`"<|im_end|>\\n"`), `start` is the last NextPosition plus the tokens
        decoded since (`nxt + n`). Returns omni.processor.Prompt with float32 positions and a NextPosition.
        """
        parts = [p for m in messages for p in m.content if not isinstance(p, Text)]
        decoded = [self._decode(p) for p in parts]
        waves = [w for kind, item in decoded for w in ((item,) if kind == "audio" else
                                                       (item[1].audio,) if kind == "video" and item[0] else ())]
        longest = max((len(w) for w in waves), default=0)  # transformers pads the call's clips to the longest
        images, videos, audios, specs = [], [], [], []
        for p, (kind, item) in zip(parts, decoded):
            try:
                specs.append(self._featurise(kind, item, longest, images, videos, audios))
            except ValueError as e:  # featurisation limits (too small, bad shape): name the file
                if isinstance(e, media.MediaError):
                    raise
                raise media.MediaError(f"{self._name(p)}: {e}") from None
        text = prefix_text + self.render(messages, add_generation_prompt, default_system)
        ids = list(prefix_ids or []) + self._expand(self.tok.encode(text), specs)
        input_ids = torch.tensor(ids, dtype=torch.long)
        aiv = [s.with_audio for s in specs if s.kind == "video"]
        if any(aiv) and not all(aiv):
            raise media.MediaError("videos with and without their audio in one prompt: transformers takes one "
                                   "use_audio_in_video flag per prompt; set Video.use_audio the same for all")
        positions, next_position = rope_index(
            input_ids, image_grid_thw=[g for _, g in images] or None,
            video_grid_thw=[g for _, g, _ in videos] or None,
            audio_lengths=[a.shape[-1] for a in audios] or None,
            second_per_grids=[s for _, _, s in videos] or None,
            use_audio_in_video=any(aiv), tokens=self.rope, start=start)
        return Prompt.of(input_ids, positions, next_position, specs, images, videos, audios)

    @staticmethod
    def _name(p) -> str:
        return str(p.source) if isinstance(p.source, (str, Path)) else type(p).__name__.lower()

    def _decode(self, p):
        """One media part -> ("image", uint8 HWC) | ("audio", float32 16 kHz) | ("video", (use_audio, media.Video))."""
        if isinstance(p, Image):
            return "image", p.source if isinstance(p.source, np.ndarray) else media.load_image(p.source)
        if isinstance(p, Audio):
            return "audio", p.source if isinstance(p.source, np.ndarray) else media.load_audio(p.source)
        if not isinstance(p, Video):
            raise TypeError(f"unknown message part {type(p).__name__}")
        if isinstance(p.source, np.ndarray):  # live frames (a camera), sampled by the caller at p.fps
            v = media.Video(frames=p.source, fps=p.fps, second_per_grid=self.temporal_patch_size / p.fps,
                            audio=p.audio, duration=len(p.source) / p.fps)
        else:
            v = self._load_video(p.source)
        has_audio = v.audio is not None and len(v.audio) > 0
        use_audio = p.use_audio if p.use_audio is not None else self.options.use_audio_in_video
        if use_audio is None:
            use_audio = has_audio
        if use_audio and not has_audio:
            raise media.MediaError(f"{self._name(p)}: use_audio_in_video is on but the video has no audio track")
        return "video", (bool(use_audio), v)

    def _load_video(self, src) -> media.Video:
        """media.load_video's sampling (qwen-omni-utils' frame rules), frames sized to multiples of 32 from the
        decoded size (load_video sizes to Qwen2.5's 28; resizing its frames again would blur and can change
        the grid)."""
        o = self.options
        fps = o.video_fps
        max_frames = o.video_max_frames or features.VIDEO_MAX_FRAMES
        max_pixels = o.video_max_pixels or VIDEO_MAX_PIXELS
        name = media._name(src)
        with media.open_container(src, name) as c:
            if not c.streams.video:
                raise media.MediaError(f"{name}: no video stream")
            stream = c.streams.video[0]
            media._check_decoder(stream, name, "video")
            try:  # count frames by demuxing (cheap); a codec where packets != frames is fixed by the retry
                total = sum(1 for pk in c.demux(stream) if pk.size)
            except av.error.FFmpegError as e:
                raise media.MediaError(f"{name}: corrupt or truncated video ({e.strerror or e})") from None
            rate = stream.average_rate or stream.guessed_rate
            video_fps = float(rate) if rate else 0.0
            if total and not video_fps and stream.duration and stream.time_base:
                video_fps = total / float(stream.duration * stream.time_base)
            for _ in range(2):
                if total == 0:
                    raise media.MediaError(f"{name}: video stream has no frames")
                if not video_fps:
                    raise media.MediaError(f"{name}: video stream has no frame rate")
                if total < features.FRAME_FACTOR:
                    raise media.MediaError(f"{name}: video has {total} frame; need at least {features.FRAME_FACTOR}")
                idx = features.sample_frame_indices(total, video_fps, fps, features.VIDEO_MIN_FRAMES, max_frames)
                kept, decoded = self._decode_frames(c, stream, name, set(idx))
                if decoded == total:
                    break
                total = decoded
            else:
                raise media.MediaError(f"{name}: frame count changes between decodes; file is corrupt")
            audio = None
            if c.streams.audio:
                c.seek(0)
                audio = media._decode_audio(c, c.streams.audio[0], name, media.SAMPLE_RATE)
        frames = torch.from_numpy(np.stack([kept[i] for i in idx]))
        size = features.video_frame_size(frames.shape[1], frames.shape[2], len(idx), VIDEO_MIN_PIXELS, max_pixels,
                                         VIDEO_TOTAL_PIXELS, self.patch_size * self.merge)
        frames = features.resize_frames(frames, *size).numpy()
        return media.Video(frames=frames, fps=len(idx) / total * video_fps,
                           second_per_grid=self.temporal_patch_size / fps, audio=audio, duration=total / video_fps)

    @staticmethod
    def _decode_frames(c, stream, name, want: set[int]) -> tuple[dict[int, np.ndarray], int]:
        """Decode from the start, keeping frames `want` at their decoded size -> (index -> frame, frames decoded)."""
        kept, n = {}, 0
        c.seek(0)
        try:
            for frame in c.decode(stream):
                if n in want:
                    kept[n] = frame.to_ndarray(format="rgb24")
                n += 1
        except av.error.FFmpegError as e:
            raise media.MediaError(f"{name}: corrupt or truncated video ({e.strerror or e})") from None
        return kept, n

    def _mel(self, wav, longest: int) -> torch.Tensor:
        return features.log_mel(wav, self.n_mels, max_samples=max(longest, 1))

    def _featurise(self, kind, item, longest, images, videos, audios) -> MediaSpec:
        if kind == "image":
            pv, grid = features.patchify_image(
                item, min_pixels=self.image_min_pixels, max_pixels=self.image_max_pixels, patch_size=self.patch_size,
                temporal_patch_size=self.temporal_patch_size, merge_size=self.merge, mean=self.image_mean,
                std=self.image_std)
            images.append((pv, tuple(grid[0].tolist())))
            return MediaSpec("image", grid_thw=images[-1][1])
        if kind == "audio":
            mel = self._mel(item, longest)
            audios.append(mel)
            return MediaSpec("audio", audio_tokens=audio_token_count(mel.shape[-1]))
        use_audio, v = item
        max_pixels = self.options.video_max_pixels or VIDEO_MAX_PIXELS
        pv, grid = features.patchify_video(
            v.frames, min_pixels=VIDEO_MIN_PIXELS, max_pixels=max_pixels, total_pixels=VIDEO_TOTAL_PIXELS,
            patch_size=self.patch_size, temporal_patch_size=self.temporal_patch_size, merge_size=self.merge,
            mean=self.image_mean, std=self.image_std, factor=self.patch_size * self.merge)
        n_audio = None
        if use_audio:
            mel = self._mel(v.audio, longest)
            audios.append(mel)
            n_audio = audio_token_count(mel.shape[-1])
        videos.append((pv, tuple(grid[0].tolist()), float(v.second_per_grid)))
        return MediaSpec("video", grid_thw=videos[-1][1], audio_tokens=n_audio,
                         second_per_grid=float(v.second_per_grid), with_audio=use_audio)

    def token_kinds(self, input_ids: torch.Tensor) -> dict[str, int]:
        """How many of the ids are audio, image (video frames included) and text tokens, as usage counts them."""
        audio = int((input_ids == self.ids["<|audio_pad|>"]).sum())
        image = int(((input_ids == self.ids["<|image_pad|>"]) | (input_ids == self.ids["<|video_pad|>"])).sum())
        return {"text": len(input_ids) - audio - image, "audio": audio, "image": image}

    def placeholder_ids(self, spec: MediaSpec) -> list[int]:
        """The full run of ids one media item takes, from its opening token to its closing one."""
        i = self.ids
        if spec.kind == "audio":
            return [i["<|audio_start|>"], *[i["<|audio_pad|>"]] * spec.audio_tokens, i["<|audio_end|>"]]
        t, h, w = spec.grid_thw
        per_grid = (h // self.merge) * (w // self.merge)
        if spec.kind == "image":
            return [i["<|vision_start|>"], *[i["<|image_pad|>"]] * (t * per_grid), i["<|vision_end|>"]]
        if not spec.with_audio:
            return [i["<|vision_start|>"], *[i["<|video_pad|>"]] * (t * per_grid), i["<|vision_end|>"]]
        order = av_interleave(per_grid, t, spec.audio_tokens, spec.second_per_grid, self.rope.position_id_per_seconds)
        pads = [i["<|video_pad|>"] if is_video else i["<|audio_pad|>"] for is_video in order]
        return [i["<|vision_start|>"], i["<|audio_start|>"], *pads, i["<|audio_end|>"], i["<|vision_end|>"]]

    def _expand(self, ids: list[int], specs: list[MediaSpec]) -> list[int]:
        pads = {self.ids["<|image_pad|>"], self.ids["<|video_pad|>"], self.ids["<|audio_pad|>"]}
        return expand_placeholders(ids, specs, pads, self.placeholder_ids)
