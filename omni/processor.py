"""Chat messages -> token ids with expanded placeholders, encoder inputs and TMRoPE positions.

The chat layout is Qwen2.5-Omni's template, rendered here rather than through Jinja:

    <|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{parts}<|im_end|>\n<|im_start|>assistant\n

with an image as `<|vision_bos|><|IMAGE|><|vision_eos|>`, audio as `<|audio_bos|><|AUDIO|><|audio_eos|>`,
a video as `<|vision_bos|><|VIDEO|><|vision_eos|>`; each single placeholder is then expanded
to one token per encoder output, and a video with its audio becomes
`<|vision_bos|><|audio_bos|>` + 2 s chunks of video tokens then audio tokens + `<|audio_eos|><|vision_eos|>`
(`omni.rope.placeholder_ids`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from encoders import features
from encoders.audio import audio_token_count
from omni import media
from omni.config import ThinkerConfig
from omni.rope import MediaSpec, RopeTokens, placeholder_ids, rope_positions
from omni.tokenizer import TextTokenizer
from omni.types import Audio, Image, Message, Text, Video

DEFAULT_SYSTEM_PROMPT = (
    "You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of perceiving "
    "auditory and visual inputs, as well as generating text and speech."
)


@dataclass
class Prompt:
    """Everything the Thinker needs for one prefill."""

    input_ids: torch.Tensor  # (L,) int64
    positions: torch.Tensor  # (3, L) TMRoPE positions: int64 (Qwen2.5), float32 (Qwen3-Omni)
    next_position: object  # rotary position of the first generated token: an int, or Qwen3's NextPosition
    media: list[MediaSpec] = field(default_factory=list)  # in prompt order
    pixel_values: torch.Tensor | None = None  # (N_patches, C*2*14*14) images
    image_grid_thw: torch.Tensor | None = None  # (n_images, 3)
    pixel_values_videos: torch.Tensor | None = None
    video_grid_thw: torch.Tensor | None = None  # (n_videos, 3)
    video_second_per_grid: list[float] = field(default_factory=list)
    audio_features: torch.Tensor | None = None  # (n_mels, total_frames) clips concatenated
    audio_feature_lens: torch.Tensor | None = None  # (n_clips,)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @classmethod
    def of(cls, input_ids: torch.Tensor, positions: torch.Tensor, next_position, specs: list[MediaSpec],
           images: list, videos: list, audios: list) -> "Prompt":
        """A prompt with its featurised media, in prompt order: images [(pixels, grid_thw)], videos
        [(pixels, grid_thw, second_per_grid)], audios [log-mel (n_mels, frames)]; a grid is 3 ints or (k, 3)."""
        grids = lambda items: torch.cat([torch.as_tensor(x[1]).reshape(-1, 3) for x in items])  # noqa: E731
        prompt = cls(input_ids=input_ids, positions=positions, next_position=next_position, media=specs)
        if images:
            prompt.pixel_values = torch.cat([pv for pv, _ in images])
            prompt.image_grid_thw = grids(images)
        if videos:
            prompt.pixel_values_videos = torch.cat([pv for pv, _, _ in videos])
            prompt.video_grid_thw = grids(videos)
            prompt.video_second_per_grid = [s for _, _, s in videos]
        if audios:
            prompt.audio_features = torch.cat(audios, dim=-1)
            prompt.audio_feature_lens = torch.tensor([a.shape[-1] for a in audios], dtype=torch.long)
        return prompt

    def padded_audio(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Audio features as the Whisper-style batch transformers takes: (n_clips, n_mels, max_frames)
        right-padded with zeros, and the (n_clips, max_frames) mask of real frames."""
        lens = self.audio_feature_lens.tolist()
        feats = self.audio_features.new_zeros(len(lens), self.audio_features.shape[0], max(lens))
        mask = torch.zeros(len(lens), max(lens), dtype=torch.long)
        for i, (clip, n) in enumerate(zip(self.audio_features.split(lens, dim=-1), lens)):
            feats[i, :, :n] = clip
            mask[i, :n] = 1
        return feats, mask


@dataclass(frozen=True)
class MediaOptions:
    image_min_pixels: int = features.IMAGE_MIN_PIXELS
    image_max_pixels: int = features.IMAGE_MAX_PIXELS
    video_fps: float = 2.0
    video_max_frames: int | None = None
    video_max_pixels: int | None = None
    use_audio_in_video: bool | None = None  # None: on for videos with sound


class Processor:
    def __init__(self, tokenizer: TextTokenizer, cfg: ThinkerConfig, options: MediaOptions = MediaOptions()):
        self.tok = tokenizer
        self.cfg = cfg
        self.options = options
        self.rope = RopeTokens.from_config(cfg)
        vc = cfg.vision_config
        self.merge = vc.spatial_merge_size
        self.patch_size = vc.patch_size
        self.temporal_patch_size = vc.temporal_patch_size
        t = tokenizer.token_id
        self.ids = {name: t(name) for name in (
            "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>",
            "<|vision_bos|>", "<|vision_eos|>", "<|IMAGE|>", "<|VIDEO|>")}
        for name, want in (("<|IMAGE|>", cfg.image_token_index), ("<|VIDEO|>", cfg.video_token_index),
                           ("<|AUDIO|>", cfg.audio_token_index)):
            if self.ids[name] != want:
                raise ValueError(f"tokenizer id of {name} is {self.ids[name]} but config.json says {want}")

    @classmethod
    def from_dir(cls, path: str | Path, cfg: ThinkerConfig, options: MediaOptions = MediaOptions()) -> "Processor":
        return cls(TextTokenizer.from_dir(path), cfg, options)

    def render(self, messages: list[Message], add_generation_prompt: bool = True, default_system: bool = True) -> str:
        """The chat template, with one placeholder token per media part.

        default_system=False renders a continuation (turns appended to a conversation that
        already has its system prompt).
        """
        out = []
        if default_system and (not messages or messages[0].role != "system"):
            out.append(f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n")
        for m in messages:
            out.append(f"<|im_start|>{m.role}\n")
            for p in m.content:
                if isinstance(p, Text):
                    out.append(p.text)
                elif isinstance(p, Image):
                    out.append("<|vision_bos|><|IMAGE|><|vision_eos|>")
                elif isinstance(p, Audio):
                    out.append("<|audio_bos|><|AUDIO|><|audio_eos|>")
                elif isinstance(p, Video):
                    out.append("<|vision_bos|><|VIDEO|><|vision_eos|>")
                else:
                    raise TypeError(f"unknown message part {type(p).__name__}")
            out.append("<|im_end|>\n")
        if add_generation_prompt:
            out.append("<|im_start|>assistant\n")
        return "".join(out)

    def __call__(self, messages: list[Message], add_generation_prompt: bool = True, start: int = 0,
                 prefix_ids: list[int] | None = None, prefix_text: str = "", default_system: bool = True) -> Prompt:
        """Tokenise, decode and featurise media, expand placeholders, compute positions from `start`.

        For a new turn on a kept KV cache: `prefix_ids` are tokens the model produced but never
        fed (the token that ended the last reply), `prefix_text` closes that reply if it was cut
        short (`"<|im_end|>\\n"`), and default_system=False; positions continue from `start`.
        """
        images, videos, audios = [], [], []  # featurised, in prompt order
        specs: list[MediaSpec] = []
        for m in messages:
            for p in m.content:
                if isinstance(p, Text):
                    continue
                try:
                    specs.append(self._featurise(p, images, videos, audios))
                except ValueError as e:  # featurisation limits (too small, bad shape): name the file
                    if isinstance(e, media.MediaError):
                        raise
                    name = p.source if isinstance(p.source, (str, Path)) else type(p).__name__.lower()
                    raise media.MediaError(f"{name}: {e}") from None
        text = prefix_text + self.render(messages, add_generation_prompt, default_system)
        ids = list(prefix_ids or []) + self._expand(self.tok.encode(text), specs)
        input_ids = torch.tensor(ids, dtype=torch.long)
        positions, next_position = rope_positions(input_ids, specs, self.rope, start=start)
        return Prompt.of(input_ids, positions, next_position, specs, images, videos, audios)

    def _featurise(self, p: Image | Audio | Video, images: list, videos: list, audios: list) -> MediaSpec:
        """Decode and featurise one media part, appending to the lists; returns its position spec."""
        if isinstance(p, Image):
            img = p.source if isinstance(p.source, np.ndarray) else media.load_image(p.source)
            pv, grid = features.patchify_image(
                img, min_pixels=self.options.image_min_pixels, max_pixels=self.options.image_max_pixels,
                patch_size=self.patch_size, temporal_patch_size=self.temporal_patch_size, merge_size=self.merge)
            images.append((pv, grid))
            return MediaSpec("image", grid_thw=tuple(grid[0].tolist()))
        if isinstance(p, Audio):
            wav = p.source if isinstance(p.source, np.ndarray) else media.load_audio(p.source)
            mel = features.log_mel(wav)
            audios.append(mel)
            return MediaSpec("audio", audio_tokens=audio_token_count(mel.shape[-1]))
        if not isinstance(p, Video):
            raise TypeError(f"unknown message part {type(p).__name__}")
        if isinstance(p.source, np.ndarray):  # live frames (a camera), sampled by the caller at p.fps
            v = media.Video(frames=p.source, fps=p.fps, second_per_grid=self.temporal_patch_size / p.fps,
                            audio=p.audio, duration=len(p.source) / p.fps)
        else:
            limits = {k: v for k, v in (("max_frames", self.options.video_max_frames),
                                        ("max_pixels", self.options.video_max_pixels)) if v}
            v = media.load_video(p.source, fps=self.options.video_fps, **limits)
        pv, grid = features.patchify_video(v.frames, patch_size=self.patch_size,
                                           temporal_patch_size=self.temporal_patch_size, merge_size=self.merge)
        has_audio = v.audio is not None and len(v.audio) > 0
        use_audio = p.use_audio if p.use_audio is not None else self.options.use_audio_in_video
        if use_audio is None:
            use_audio = has_audio
        if use_audio and not has_audio:
            name = p.source if isinstance(p.source, (str, Path)) else "video"
            raise media.MediaError(f"{name}: use_audio_in_video is on but the video has no audio track")
        n_audio = None
        if use_audio:
            mel = features.log_mel(v.audio)
            audios.append(mel)
            n_audio = audio_token_count(mel.shape[-1])
        videos.append((pv, grid, v.second_per_grid))
        return MediaSpec("video", grid_thw=tuple(grid[0].tolist()), audio_tokens=n_audio,
                         second_per_grid=v.second_per_grid, with_audio=use_audio)

    def token_kinds(self, input_ids: torch.Tensor) -> dict[str, int]:
        """How many of the ids are audio, image (video frames included) and text tokens, as usage counts them."""
        audio = int((input_ids == self.ids["<|AUDIO|>"]).sum())
        image = int(((input_ids == self.ids["<|IMAGE|>"]) | (input_ids == self.ids["<|VIDEO|>"])).sum())
        return {"text": len(input_ids) - audio - image, "audio": audio, "image": image}

    def _expand(self, ids: list[int], specs: list[MediaSpec]) -> list[int]:
        pads = {self.ids["<|IMAGE|>"], self.ids["<|VIDEO|>"], self.ids["<|AUDIO|>"]}
        return expand_placeholders(ids, specs, pads, lambda spec: placeholder_ids(spec, self.rope))


def expand_placeholders(ids: list[int], specs: list[MediaSpec], pads: set[int], layout) -> list[int]:
    """Replace each `open, placeholder, close` triple by `layout(spec)`, the item's full run of ids from its
    opening token to its closing one, in prompt order."""
    out: list[int] = []
    it = iter(specs)
    i = 0
    while i < len(ids):
        if ids[i] in pads:
            spec = next(it, None)
            if spec is None:
                raise ValueError("the text holds more media placeholders than the messages have media parts")
            out.pop()  # the opening token, which the layout lays out again
            out += layout(spec)
            i += 2  # past the closing token
        else:
            out.append(ids[i])
            i += 1
    return out
