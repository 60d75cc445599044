"""Qwen2.5-Omni `config.json` as plain dataclasses.

Field names are the JSON keys. Keys we do not use are kept in `extra` so nothing
read from a checkpoint is silently dropped. Rotary settings come in two spellings:
the legacy `rope_theta` + `rope_scaling` keys (the official checkpoints) and the
newer `rope_parameters` dict (transformers 5.x `save_pretrained`); `rope_theta()`
and `mrope_section()` read either.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    pass


def read_config(path: str | Path) -> dict[str, Any]:
    """`config.json` of a checkpoint directory (or the file itself) as a dict, or a ConfigError naming why not."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no config.json (is this a Qwen-Omni checkpoint directory?)") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None


def _build(cls, d: dict[str, Any] | None):
    d = dict(d or {})
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    nested = getattr(cls, "_nested", {})
    for k, v in d.items():
        if k in nested:
            kwargs[k] = _build(nested[k], v)
        elif k in names and k != "extra":
            kwargs[k] = v
    extra = {k: v for k, v in d.items() if k not in names or k == "extra"}
    for k, sub in nested.items():
        if k not in kwargs:
            kwargs[k] = _build(sub, None)
    obj = cls(**kwargs)
    obj.extra = extra
    return obj


def _to_dict(obj) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        if f.name == "extra":
            continue
        v = getattr(obj, f.name)
        out[f.name] = _to_dict(v) if dataclasses.is_dataclass(v) else v
    out.update(obj.extra)
    return out


class _Rope:
    """Mixin for configs carrying rotary settings in either spelling."""

    rope_theta: float | None
    rope_scaling: dict | None
    rope_parameters: dict | None
    _default_theta = 10000.0

    def rope_params(self) -> dict[str, Any]:
        p: dict[str, Any] = {}
        if self.rope_scaling:
            p.update(self.rope_scaling)
        if self.rope_parameters:
            p.update(self.rope_parameters)
        if "rope_theta" not in p:
            p["rope_theta"] = self.rope_theta if self.rope_theta is not None else self._default_theta
        rope_type = p.get("rope_type", p.get("type", "default"))
        if rope_type not in ("default", "mrope"):
            raise ConfigError(f"unsupported rope_type {rope_type!r} (only default/mrope rotary is implemented)")
        return p

    def get_rope_theta(self) -> float:
        return float(self.rope_params()["rope_theta"])

    def get_mrope_section(self) -> list[int] | None:
        s = self.rope_params().get("mrope_section")
        return list(s) if s is not None else None


@dataclass
class VisionConfig:
    depth: int = 32
    hidden_size: int = 1280
    hidden_act: str = "silu"
    intermediate_size: int = 3420
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    window_size: int = 112
    out_hidden_size: int = 3584
    fullatt_block_indexes: list[int] = field(default_factory=lambda: [7, 15, 23, 31])
    initializer_range: float = 0.02
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class AudioConfig:
    num_mel_bins: int = 128
    encoder_layers: int = 32
    encoder_attention_heads: int = 20
    encoder_ffn_dim: int = 5120
    d_model: int = 1280
    dropout: float = 0.0
    attention_dropout: float = 0.0
    activation_function: str = "gelu"
    activation_dropout: float = 0.0
    scale_embedding: bool = False
    initializer_range: float = 0.02
    max_source_positions: int = 1500
    n_window: int = 100
    output_dim: int = 3584
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class TextConfig(_Rope):
    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float | None = None
    rope_scaling: dict | None = None
    rope_parameters: dict | None = None
    use_sliding_window: bool = False
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    extra: dict[str, Any] = field(default_factory=dict)
    _default_theta = 1000000.0

    def get_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads


@dataclass
class ThinkerConfig:
    audio_config: AudioConfig = field(default_factory=AudioConfig)
    vision_config: VisionConfig = field(default_factory=VisionConfig)
    text_config: TextConfig = field(default_factory=TextConfig)
    audio_token_index: int = 151646
    image_token_index: int = 151655
    video_token_index: int = 151656
    audio_start_token_id: int = 151647
    audio_end_token_id: int = 151648
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    user_token_id: int = 872
    position_id_per_seconds: int = 25
    seconds_per_chunk: int = 2
    initializer_range: float = 0.02
    extra: dict[str, Any] = field(default_factory=dict)
    _nested = {"audio_config": AudioConfig, "vision_config": VisionConfig, "text_config": TextConfig}


@dataclass
class TalkerConfig(_Rope):
    audio_token_index: int = 151646
    image_token_index: int = 151655
    video_token_index: int = 151656
    audio_start_token_id: int = 151647
    audio_end_token_id: int = 151648
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    vocab_size: int = 8448
    tts_text_start_token_id: int = 151860
    tts_text_end_token_id: int = 151861
    tts_text_pad_token_id: int = 151859
    tts_codec_start_token_id: int = 8293
    tts_codec_end_token_id: int = 8294
    tts_codec_pad_token_id: int = 8292
    tts_codec_mask_token_id: int = 8296
    embedding_size: int = 3584
    hidden_size: int = 896
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 12
    num_key_value_heads: int = 4
    head_dim: int = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float | None = None
    rope_scaling: dict | None = None
    rope_parameters: dict | None = None
    use_sliding_window: bool = False
    tie_word_embeddings: bool = False
    position_id_per_seconds: int = 25
    seconds_per_chunk: int = 2
    spatial_merge_size: int = 2
    initializer_range: float = 0.02
    extra: dict[str, Any] = field(default_factory=dict)
    _default_theta = 1000000.0

    def get_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads


@dataclass
class DiTConfig(_Rope):
    hidden_size: int = 1024
    num_hidden_layers: int = 22
    num_attention_heads: int = 16
    ff_mult: int = 2
    emb_dim: int = 512
    head_dim: int = 64
    rope_theta: float | None = None
    rope_scaling: dict | None = None
    rope_parameters: dict | None = None
    max_position_embeddings: int = 32768
    block_size: int = 24
    look_ahead_layers: list[int] = field(default_factory=lambda: [10])
    look_backward_layers: list[int] = field(default_factory=lambda: [0, 20])
    repeats: int = 2
    num_embeds: int = 8193
    mel_dim: int = 80
    dropout: float = 0.1
    enc_emb_dim: int = 192
    enc_dim: int = 128
    enc_channels: list[int] = field(default_factory=lambda: [256, 256, 256, 256, 768])
    enc_kernel_sizes: list[int] = field(default_factory=lambda: [5, 3, 3, 3, 1])
    enc_dilations: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 1])
    enc_attention_channels: int = 64
    enc_res2net_scale: int = 2
    enc_se_channels: int = 64
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class BigVGANConfig:
    mel_dim: int = 80
    upsample_initial_channel: int = 1536
    resblock_kernel_sizes: list[int] = field(default_factory=lambda: [3, 7, 11])
    resblock_dilation_sizes: list[list[int]] = field(default_factory=lambda: [[1, 3, 5], [1, 3, 5], [1, 3, 5]])
    upsample_rates: list[int] = field(default_factory=lambda: [5, 3, 2, 2, 2, 2])
    upsample_kernel_sizes: list[int] = field(default_factory=lambda: [11, 7, 4, 4, 4, 4])
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Token2WavConfig:
    dit_config: DiTConfig = field(default_factory=DiTConfig)
    bigvgan_config: BigVGANConfig = field(default_factory=BigVGANConfig)
    extra: dict[str, Any] = field(default_factory=dict)
    _nested = {"dit_config": DiTConfig, "bigvgan_config": BigVGANConfig}


@dataclass
class OmniConfig:
    model_type: str = "qwen2_5_omni"
    thinker_config: ThinkerConfig = field(default_factory=ThinkerConfig)
    talker_config: TalkerConfig = field(default_factory=TalkerConfig)
    token2wav_config: Token2WavConfig = field(default_factory=Token2WavConfig)
    enable_audio_output: bool = True
    extra: dict[str, Any] = field(default_factory=dict)
    _nested = {"thinker_config": ThinkerConfig, "talker_config": TalkerConfig, "token2wav_config": Token2WavConfig}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "OmniConfig":
        if d.get("model_type") != "qwen2_5_omni":
            raise ConfigError(f"model_type is {d.get('model_type')!r}; expected 'qwen2_5_omni' (a Qwen2.5-Omni checkpoint)")
        cfg = _build(cls, d)
        cfg.thinker_config.text_config.rope_params()  # validate early
        cfg.talker_config.rope_params()
        return cfg

    @classmethod
    def from_file(cls, path: str | Path) -> "OmniConfig":
        return cls.from_dict(read_config(path))

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self)
