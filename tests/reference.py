"""The oracle: transformers' Qwen2.5-Omni built from tiny configs with seeded, sharpened weights.

Tests build a reference model here, `save_pretrained` it into a directory in the official
layout (config.json, model.safetensors, tokenizer files, spk_dict.pt) and load the same
directory into our code. transformers is imported only by tests.

Three configs, so nothing is tuned to one shape:
- "tiny": ../shared/reference/tiny_qwen2_5_omni_config.json as is;
- "deep": more layers, more heads, another mrope_section, a smaller vision window;
- "wide": one text layer with big heads, a larger window, other full-attention indexes.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

# The shared tiny config lives in ../shared/reference/; a copy is committed so the tests also run
# where shared/ is not beside the clone (test_shared_config_copy_is_current keeps them equal).
SHARED_CONFIG = Path(__file__).resolve().parents[2] / "shared" / "reference" / "tiny_qwen2_5_omni_config.json"
TINY_CONFIG = SHARED_CONFIG if SHARED_CONFIG.exists() else Path(__file__).with_name("data") / "tiny_qwen2_5_omni_config.json"

# Special tokens of the tiny vocabulary, in the real order (see ../shared/FACTS.md).
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_bos|>", "<|vision_eos|>", "<|vision_pad|>",
    "<|IMAGE|>", "<|VIDEO|>", "<tts_pad>", "<tts_text_bos>", "<tts_text_eod>",
]
FIRST_SPECIAL = 384


def tiny_config() -> dict:
    return json.loads(TINY_CONFIG.read_text())


def config(name: str) -> dict:
    d = tiny_config()
    if name == "tiny":
        return d
    th, ta, dit, voc = d["thinker_config"], d["talker_config"], d["token2wav_config"]["dit_config"], d["token2wav_config"]["bigvgan_config"]
    if name == "deep":
        th["text_config"].update(num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=4)
        th["text_config"]["rope_parameters"]["mrope_section"] = [2, 3, 3]  # head_dim 16
        th["vision_config"].update(depth=5, num_heads=2, window_size=56, fullatt_block_indexes=[0, 4])
        th["audio_config"].update(encoder_layers=3, encoder_attention_heads=2, d_model=32, encoder_ffn_dim=64)
        ta.update(num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1, hidden_size=32, head_dim=16)
        ta["rope_parameters"]["mrope_section"] = [4, 2, 2]
        dit.update(num_hidden_layers=5, look_ahead_layers=[1, 3], look_backward_layers=[2], block_size=16)
        voc.update(upsample_initial_channel=64)
        return d
    if name == "wide":
        th["text_config"].update(num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, hidden_size=128)
        th["text_config"]["rope_parameters"]["mrope_section"] = [8, 12, 12]  # head_dim 64
        th["vision_config"].update(depth=3, num_heads=8, window_size=224, fullatt_block_indexes=[2], hidden_size=64)
        th["audio_config"].update(encoder_layers=1, encoder_attention_heads=8, d_model=96, encoder_ffn_dim=96)
        ta.update(num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4, head_dim=32, hidden_size=96)
        ta["rope_parameters"]["mrope_section"] = [4, 6, 6]
        dit.update(num_hidden_layers=3, look_ahead_layers=[0], look_backward_layers=[1], num_attention_heads=2, head_dim=32)
        return d
    raise KeyError(name)


CONFIG_NAMES = ("tiny", "deep", "wide")


def hf_config(d: dict, cls=None):
    """The transformers config of a config.json dict (Qwen2.5-Omni's class unless `cls` is given)."""
    if cls is None:
        from transformers import Qwen2_5OmniConfig as cls

    d = copy.deepcopy(d)
    d.pop("model_type", None)
    d.pop("architectures", None)
    return cls(**d)


@torch.no_grad()
def sharpen(model, seed: int = 0) -> None:
    """Make random weights sharp enough that planted bugs change outputs.

    transformers' default init is so smooth that wrong positions or a shuffled audio clip
    change no greedy token (FACTS.md). Scaling q/k makes attention depend on positions and
    content; scaling the audio convolutions makes audio features matter; pulling the
    special-token rows of lm_head down keeps greedy text from stopping at once.
    """
    g = torch.Generator().manual_seed(seed)
    th = model.thinker
    inner = th.model  # transformers 5.x: thinker.model.{language_model, visual, audio_tower}
    text = getattr(inner, "language_model", inner)
    visual = getattr(inner, "visual", None) or th.visual
    audio = getattr(inner, "audio_tower", None) or th.audio_tower
    for layer in text.layers:
        layer.self_attn.q_proj.weight.mul_(8)
        layer.self_attn.k_proj.weight.mul_(8)
        layer.self_attn.q_proj.bias.normal_(0, 0.5, generator=g)
        layer.self_attn.k_proj.bias.normal_(0, 0.5, generator=g)
    for blk in visual.blocks:  # q/k x18 and v/proj x5: position bugs must move the vision output
        blk.attn.q.weight.mul_(18)
        blk.attn.k.weight.mul_(18)
        blk.attn.v.weight.mul_(5)
        blk.attn.proj.weight.mul_(5)
    visual.patch_embed.proj.weight.mul_(4)
    at = audio
    at.conv1.weight.mul_(6)
    at.conv2.weight.mul_(3)
    for layer in at.layers:
        layer.self_attn.q_proj.weight.mul_(6)
        layer.self_attn.k_proj.weight.mul_(6)
    lm = th.lm_head.weight
    lm.normal_(0, 1.0, generator=g)
    lm[FIRST_SPECIAL:] *= 0.05
    for norm in [text.norm] + [l.input_layernorm for l in text.layers]:
        norm.weight.normal_(1.0, 0.3, generator=g)


def build_tokenizer(out_dir: Path, vocab_size: int) -> None:
    """A small byte-level BPE in the Qwen2 format (tokenizer.json, vocab.json, merges.txt).

    Trained deterministically on a fixed text, so ids are stable across runs.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    n_regular = FIRST_SPECIAL
    tok = Tokenizer(models.BPE(byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(
            pattern=__import__("tokenizers").Regex(
                r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
            ),
            behavior="isolated",
        ),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    corpus = [
        "system\nYou are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of "
        "perceiving auditory and visual inputs, as well as generating text and speech.",
        "user\nWhat is happening? Describe the image. What do you hear in the audio?",
        "assistant\nThe cat sits on the mat. A person is talking about the weather.",
    ] * 20
    trainer = trainers.BpeTrainer(
        vocab_size=n_regular, min_frequency=1, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    assert tok.get_vocab_size() <= n_regular, tok.get_vocab_size()
    # pad to exactly n_regular ids so the specials land at FIRST_SPECIAL
    # (BPE ids are dense; add filler tokens made of unused byte pairs).
    from tokenizers import AddedToken

    specials = [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS]
    n_now = tok.get_vocab_size()
    if n_now < n_regular:
        fillers = [AddedToken(f"<|filler_{i}|>", special=True, normalized=False) for i in range(n_regular - n_now)]
        tok.add_special_tokens(fillers)
    tok.add_special_tokens(specials)
    assert tok.token_to_id("<|endoftext|>") == FIRST_SPECIAL, tok.token_to_id("<|endoftext|>")
    assert tok.get_vocab_size() <= vocab_size
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    tok.model.save(str(out_dir))  # vocab.json + merges.txt
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer",
        "model_max_length": 32768,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "bos_token": None,
        "errors": "replace",
        "split_special_tokens": False,
        "clean_up_tokenization_spaces": False,
    }, indent=2))


def build_spk_dict(out_dir: Path, cfg: dict, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed + 7)
    dit = cfg["token2wav_config"]["dit_config"]
    talker = cfg["talker_config"]
    voices = {}
    for i, name in enumerate(["Chelsie", "Ethan"]):
        voices[name] = {
            "cond": torch.randn(1, dit.get("enc_emb_dim", 192), generator=g),
            "ref_mel": torch.randn(1, 60 + 10 * i, dit.get("mel_dim", 80), generator=g),
            "bos_token": talker["tts_codec_start_token_id"] + 0,  # any codec id below the vocab
        }
    torch.save(voices, out_dir / "spk_dict.pt")


def build_reference(name: str, out_dir: Path, seed: int = 0, max_shard_size: str | None = None):
    """Build, sharpen and save the reference model; return (model, out_dir)."""
    from transformers import Qwen2_5OmniForConditionalGeneration

    cfg = config(name)
    torch.manual_seed(seed)
    model = Qwen2_5OmniForConditionalGeneration(hf_config(cfg)).eval()
    sharpen(model, seed)
    out_dir = Path(out_dir)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, **kwargs)
    build_tokenizer(out_dir, cfg["thinker_config"]["text_config"]["vocab_size"])
    build_spk_dict(out_dir, cfg, seed)
    return model, out_dir
