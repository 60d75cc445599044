"""Qwen3-Omni as the engine drives it: the Thinker behind omni.models' interface (text out).

`Qwen3OmniModel.load(dir)` reads `config.json` (model_type `qwen3_omni_moe`), builds the Thinker with its
vision and AuT audio encoders on the meta device and loads `thinker.*` strictly (sharded or not, experts
stacked at load). A prompt is prefilled with its encoders' outputs and the deepstack levels; decode steps
many conversations at once at their float TMRoPE positions (`omni.qwen3_omni_rope.NextPosition`).

Speech (`speech`, omni.qwen3_omni_speech): the Talker with its code predictor and Code2Wav, loaded when the
checkpoint has them (Instruct). Thinking and Captioner checkpoints have no talker at all
(`enable_audio_output` false): they answer in text, and a request for audio gets an error that says why.
A prefill then returns the Thinker's hidden after the Talker's `accept_hidden_layer` (what the Talker
reads of media rows), not its final hidden.
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
from omni.qwen3_omni_speech import Qwen3Speech
from omni.weights import Checkpoint, empty_params, load_module
from talker.qwen3_omni_code2wav import Code2Wav, Code2WavConfig
from talker.qwen3_omni_talker import TALKER_GREEDY, TALKER_SAMPLING, Talker, TalkerSampling

FAMILY = "Qwen3-Omni"


class Qwen3OmniModel(ThinkerModel):
    family = FAMILY
    default_system_prompt = None  # the chat template adds none
    speech_system_prompt = None  # any system prompt may go with speech
    default_voice = "Ethan"

    def __init__(self, path: Path, cfg: Qwen3OmniConfig, thinker: Thinker, processor: Qwen3OmniProcessor,
                 device: torch.device, dtype: torch.dtype, generation: dict, speech: Qwen3Speech | None = None):
        self.path, self.cfg, self.thinker, self.processor = path, cfg, thinker, processor
        self.device, self.dtype, self.generation = device, dtype, generation
        self.speech = speech  # the speech part (omni.models), or None
        # The voices as users name them ("Ethan"), each the Talker's speaker name ("ethan").
        self.voices = {v.capitalize(): v for v in speech.talker.voices} if speech is not None else {}
        self._capture = speech.talker.cfg.accept_hidden_layer if speech is not None else None
        tok = processor.tok
        eos = generation.get("eos_token_id")
        eos = eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else []
        self.stop_ids = {tok.token_id("<|im_end|>"), tok.token_id("<|endoftext|>"), *eos}
        self.think_ids = processor.think_ids
        self.captioner = is_captioner(path)  # describes audio from an audio-only user turn
        self.speech_error = None if speech is not None else self._no_speech(path, cfg)

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", dtype: torch.dtype | None = None,
             options: MediaOptions = MediaOptions(), speech: bool | None = None, **_speech_options) -> "Qwen3OmniModel":
        """speech: True loads the Talker and Code2Wav or fails; None loads them if present; False skips them."""
        from omni.pipeline import SpeechError, default_dtype

        path = Path(path)
        cfg = Qwen3OmniConfig.from_file(path)
        ckpt = Checkpoint(path)
        has_speech = cfg.enable_audio_output and ckpt.has_prefix("talker.") and ckpt.has_prefix("code2wav.")
        if speech and not has_speech:
            raise SpeechError(cls._no_speech(path, cfg))
        device_t = torch.device(device)
        dtype = dtype or default_dtype(device_t)
        with empty_params():
            thinker = Thinker(cfg.thinker_config)
        load_module(thinker, ckpt, "thinker.", dtype=dtype, device=device_t)
        processor = Qwen3OmniProcessor.from_dir(path, cfg.thinker_config, options)
        gen_file = path / "generation_config.json"
        generation = json.loads(gen_file.read_text()) if gen_file.exists() else {}
        part = None
        if has_speech and speech is not False:
            talker = Talker.load(ckpt, dtype=dtype, device=device_t)
            with empty_params():
                code2wav = Code2Wav(Code2WavConfig.from_dict(cfg.code2wav_config))
            load_module(code2wav, ckpt, "code2wav.", dtype=torch.float32, device=device_t)  # fp32, as Token2Wav
            part = Qwen3Speech(talker, code2wav, thinker.model.embed_tokens)
        return cls(path, cfg, thinker, processor, device_t, dtype, generation, part)

    @staticmethod
    def _no_speech(path: Path, cfg: Qwen3OmniConfig) -> str:
        if not cfg.enable_audio_output:
            return (f"{path}: this Qwen3-Omni checkpoint cannot speak (enable_audio_output is false: it holds no "
                    "talker, as the Thinking and Captioner models do not); it answers in text only")
        return f"{path}: speech output was not loaded (the checkpoint has no talker/code2wav weights, or speech=False)"

    def voice(self, name: str | None) -> str:
        """The Talker's speaker for a voice name (case-insensitive; default Ethan)."""
        from omni.pipeline import SpeechError

        if self.speech is None:
            raise SpeechError(self.speech_error)
        name = name or self.default_voice
        for user_name, speaker in self.voices.items():
            if name.lower() == speaker:
                return speaker
        raise SpeechError(f"unknown voice {name!r}; this checkpoint has: {', '.join(sorted(self.voices))}")

    def talker_sampling(self, greedy: bool = False) -> TalkerSampling:
        """The Talker's and code predictor's sampling as the reference's generate (greedy: talker_do_sample=False)."""
        return TALKER_GREEDY if greedy else TALKER_SAMPLING

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
        out = th(embeds, prompt.positions[:, None].to(dev), cache, torch.tensor([slot]), deepstack=deepstack,
                 capture_layer=self._capture)
        hidden, talker_hidden = out if self._capture is not None else (out, out)
        return embeds, talker_hidden, th.lm_head(hidden[:, -1])
