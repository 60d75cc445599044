"""Qwen3-Omni (`model_type` "qwen3_omni_moe") `config.json` as plain dataclasses, like omni/config.py.

The ids come from config.json only: transformers' config classes still default to Qwen2.5's ids, and the
real checkpoints store their own. The encoders' sub-configs are read by the encoders' own dataclasses
(encoders/qwen3_omni_audio.py, encoders/qwen3_omni_vision.py); they are kept here as the dicts they were.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omni.config import ConfigError, _build, _Rope, _to_dict, read_config

MODEL_TYPE = "qwen3_omni_moe"


@dataclass
class Qwen3OmniTextConfig(_Rope):
    """The Thinker's MoE decoder (`thinker_config.text_config`)."""

    vocab_size: int = 152064
    hidden_size: int = 2048
    intermediate_size: int = 768  # the dense MLP of `mlp_only_layers`
    num_hidden_layers: int = 48
    num_attention_heads: int = 32
    num_key_value_heads: int = 4
    head_dim: int | None = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 65536
    rms_norm_eps: float = 1e-6
    rope_theta: float | None = None
    rope_scaling: dict | None = None
    rope_parameters: dict | None = None
    attention_bias: bool = False
    moe_intermediate_size: int = 768
    num_experts: int = 128
    num_experts_per_tok: int = 8
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    tie_word_embeddings: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    _default_theta = 1000000.0

    def get_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def is_moe(self, layer: int) -> bool:
        return (layer not in self.mlp_only_layers and self.num_experts > 0
                and (layer + 1) % self.decoder_sparse_step == 0)


@dataclass
class Qwen3OmniThinkerConfig:
    text_config: Qwen3OmniTextConfig = field(default_factory=Qwen3OmniTextConfig)
    audio_config: dict = field(default_factory=dict)
    vision_config: dict = field(default_factory=dict)
    audio_token_id: int = 151675
    image_token_id: int = 151655
    video_token_id: int = 151656
    audio_start_token_id: int = 151669
    audio_end_token_id: int = 151670
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    user_token_id: int = 872
    position_id_per_seconds: int = 13
    seconds_per_chunk: int = 2
    extra: dict[str, Any] = field(default_factory=dict)
    _nested = {"text_config": Qwen3OmniTextConfig}


@dataclass
class Qwen3OmniConfig:
    model_type: str = MODEL_TYPE
    thinker_config: Qwen3OmniThinkerConfig = field(default_factory=Qwen3OmniThinkerConfig)
    talker_config: dict = field(default_factory=dict)  # the speech stages: read by their own part
    code2wav_config: dict = field(default_factory=dict)
    enable_audio_output: bool = True
    im_start_token_id: int = 151644
    im_end_token_id: int = 151645
    tts_pad_token_id: int = 151671
    tts_bos_token_id: int = 151672
    tts_eos_token_id: int = 151673
    system_token_id: int = 8948
    user_token_id: int = 872
    assistant_token_id: int = 77091
    extra: dict[str, Any] = field(default_factory=dict)
    _nested = {"thinker_config": Qwen3OmniThinkerConfig}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Qwen3OmniConfig":
        if d.get("model_type") != MODEL_TYPE:
            raise ConfigError(f"model_type is {d.get('model_type')!r}; expected {MODEL_TYPE!r} (a Qwen3-Omni checkpoint)")
        cfg = _build(cls, d)
        cfg.thinker_config.text_config.rope_params()  # validate early
        return cfg

    @classmethod
    def from_file(cls, path: str | Path) -> "Qwen3OmniConfig":
        return cls.from_dict(read_config(path))

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self)
