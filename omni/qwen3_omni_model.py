"""Qwen3-Omni as the engine drives it: the Thinker behind omni.models' interface (text out).

`Qwen3OmniModel.load(dir)` reads `config.json` (model_type `qwen3_omni_moe`), builds the Thinker with its
vision and AuT audio encoders on the meta device and loads `thinker.*` strictly (sharded or not, experts
stacked at load). A prompt is prefilled with its encoders' outputs and the deepstack levels; decode steps
many conversations at once at their float TMRoPE positions (`omni.qwen3_omni_rope.NextPosition`).

Speech (the Talker, code predictor and Code2Wav) is not in this release: every checkpoint answers in
text, and a request for audio gets an error that says why (Thinking and Captioner checkpoints have no
talker at all: `enable_audio_output` false).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from omni.cache import KVCache
from omni.models import ThinkerModel, is_captioner
from omni.processor import MediaOptions, Prompt
from omni.qwen3_omni_config import Qwen3OmniConfig
from omni.qwen3_omni_processor import Qwen3OmniProcessor
from omni.qwen3_omni_rope import decode_positions
from omni.qwen3_omni_thinker import Thinker
from omni.sampling import SamplingParams
from omni.weights import Checkpoint, empty_params, load_module

FAMILY = "Qwen3-Omni"


class Qwen3OmniModel(ThinkerModel):
    family = FAMILY
    default_system_prompt = None  # the chat template adds none
    speech_system_prompt = None  # any system prompt may go with speech
    speech = None  # the speech part (omni.models): not in this release
    voices: dict = {}

    def __init__(self, path: Path, cfg: Qwen3OmniConfig, thinker: Thinker, processor: Qwen3OmniProcessor,
                 device: torch.device, dtype: torch.dtype, generation: dict):
        self.path, self.cfg, self.thinker, self.processor = path, cfg, thinker, processor
        self.device, self.dtype, self.generation = device, dtype, generation
        tok = processor.tok
        eos = generation.get("eos_token_id")
        eos = eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else []
        self.stop_ids = {tok.token_id("<|im_end|>"), tok.token_id("<|endoftext|>"), *eos}
        self.think_ids = processor.think_ids
        self.captioner = is_captioner(path)  # describes audio from an audio-only user turn
        self.speech_error = self._no_speech(path, cfg)

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", dtype: torch.dtype | None = None,
             options: MediaOptions = MediaOptions(), speech: bool | None = None, **_speech_options) -> "Qwen3OmniModel":
        """speech: True fails (no speech for Qwen3-Omni in this release); None and False load the Thinker only."""
        from omni.pipeline import SpeechError, default_dtype

        path = Path(path)
        cfg = Qwen3OmniConfig.from_file(path)
        if speech:
            raise SpeechError(cls._no_speech(path, cfg))
        device_t = torch.device(device)
        dtype = dtype or default_dtype(device_t)
        with empty_params():
            thinker = Thinker(cfg.thinker_config)
        load_module(thinker, Checkpoint(path), "thinker.", dtype=dtype, device=device_t)
        processor = Qwen3OmniProcessor.from_dir(path, cfg.thinker_config, options)
        gen_file = path / "generation_config.json"
        generation = json.loads(gen_file.read_text()) if gen_file.exists() else {}
        return cls(path, cfg, thinker, processor, device_t, dtype, generation)

    @staticmethod
    def _no_speech(path: Path, cfg: Qwen3OmniConfig) -> str:
        if not cfg.enable_audio_output:
            return (f"{path}: this Qwen3-Omni checkpoint cannot speak (enable_audio_output is false: it holds no "
                    "talker, as the Thinking and Captioner models do not); it answers in text only")
        return f"{path}: Qwen3-Omni speech output (talker, Code2Wav) is not in this release of omni; text only"

    def voice(self, name: str | None):
        from omni.pipeline import SpeechError

        raise SpeechError(self.speech_error)

    def talker_sampling(self, greedy: bool = False) -> SamplingParams:
        return self.default_sampling(greedy)

    # The engine's interface (omni.models; vocab_size, allocate_cache, decode, default_sampling are ThinkerModel's).

    @staticmethod
    def decode_positions(next_positions: list) -> torch.Tensor:
        """(3, B, 1) float32 positions for one decode step of B conversations at their NextPositions."""
        return torch.stack([decode_positions(p, 1) for p in next_positions], 1)

    @torch.inference_mode()
    def prefill(self, prompt: Prompt, cache: KVCache, slot: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A turn's prompt into `slot` after what it holds: (embeds (1, L, D), hidden (1, L, D), last logits (1, V))."""
        th, dev = self.thinker, self.device
        image = video = audio = None
        if prompt.pixel_values is not None:
            image = th.visual(prompt.pixel_values.to(dev, self.dtype), prompt.image_grid_thw.tolist())
        if prompt.pixel_values_videos is not None:
            video = th.visual(prompt.pixel_values_videos.to(dev, self.dtype), prompt.video_grid_thw.tolist())
        if prompt.audio_features is not None:
            audio = th.audio_tower(prompt.audio_features.to(dev, self.dtype), prompt.audio_feature_lens.tolist())
        embeds, deepstack = th.embed(prompt.input_ids[None].to(dev), image, video, audio)
        hidden = th(embeds, prompt.positions[:, None].to(dev), cache, torch.tensor([slot]), deepstack=deepstack)
        return embeds, hidden, th.lm_head(hidden[:, -1])
