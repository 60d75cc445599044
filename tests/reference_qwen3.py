"""The oracle for Qwen3-Omni: transformers 5.23's `qwen3_omni_moe` built from tiny configs with seeded,
sharpened weights, saved in the official layout (per-expert tensors, `thinker.*`, `talker.*`, `code2wav.*`).

Three configs, so nothing is tuned to one shape:
- "tiny": ../shared/reference/tiny_qwen3_omni_config.json as is (a committed copy in tests/data);
- "deep": more layers, heads and experts, top-3, deepstack after other vision blocks, a shorter
  `n_window_infer`, another `mrope_section`;
- "wide": few wide layers (head_dim 64), 16 experts top-4, one deepstack level, audio attention windows of
  two 1 s chunks.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests import reference

SHARED_CONFIG = Path(__file__).resolve().parents[2] / "shared" / "reference" / "tiny_qwen3_omni_config.json"
TINY_CONFIG = SHARED_CONFIG if SHARED_CONFIG.exists() else Path(__file__).with_name("data") / "tiny_qwen3_omni_config.json"
CONFIG_NAMES = ("tiny", "deep", "wide")


def tiny_config() -> dict:
    return json.loads(TINY_CONFIG.read_text())


def config(name: str) -> dict:
    d = tiny_config()
    if name == "tiny":
        return d
    th, ta = d["thinker_config"], d["talker_config"]
    text, vision, audio = th["text_config"], th["vision_config"], th["audio_config"]
    if name == "deep":
        text.update(num_hidden_layers=5, num_attention_heads=8, num_key_value_heads=4, head_dim=16,
                    num_experts=6, num_experts_per_tok=3, moe_intermediate_size=24)
        text["rope_parameters"]["mrope_section"] = [4, 2, 2]
        vision.update(depth=5, num_heads=2, deepstack_visual_indexes=[1, 2, 4])
        audio.update(encoder_layers=3, encoder_attention_heads=2, n_window_infer=400)
        return d
    if name == "wide":
        text.update(num_hidden_layers=2, hidden_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                    num_experts=16, num_experts_per_tok=4, moe_intermediate_size=48)
        text["rope_parameters"]["mrope_section"] = [8, 12, 12]
        vision.update(depth=2, num_heads=8, hidden_size=64, deepstack_visual_indexes=[1], out_hidden_size=128)
        audio.update(encoder_layers=1, encoder_attention_heads=8, d_model=64, output_dim=128, n_window_infer=200)
        ta.update(thinker_hidden_size=128, accept_hidden_layer=1)
        return d
    raise KeyError(name)


def hf_config(d: dict):
    from transformers import Qwen3OmniMoeConfig

    return reference.hf_config(d, Qwen3OmniMoeConfig)


@torch.no_grad()
def sharpen(model, seed: int = 0, n_special: int = 16) -> None:
    """Make random weights sharp enough that planted bugs change outputs (see tests/reference.py).

    Qwen3's q/k are RMS-normed before RoPE, so scaling q_proj/k_proj does nothing: the q_norm/k_norm
    weights are scaled instead. The routers are scaled so routing depends on content and top-k weights
    differ (renormalisation matters); lm_head rows of the specials are pulled down so greedy text goes on.
    """
    g = torch.Generator().manual_seed(seed)
    th = model.thinker
    inner = th.model
    text = getattr(inner, "language_model", inner)
    visual = getattr(inner, "visual", None) or th.visual
    audio = getattr(inner, "audio_tower", None) or th.audio_tower
    for layer in text.layers:
        layer.self_attn.q_norm.weight.normal_(3.0, 0.5, generator=g)
        layer.self_attn.k_norm.weight.normal_(3.0, 0.5, generator=g)
        layer.mlp.gate.weight.mul_(20)
    for blk in visual.blocks:
        blk.attn.qkv.weight[: 2 * blk.attn.qkv.weight.shape[1]].mul_(12)
        blk.attn.proj.weight.mul_(4)
    visual.patch_embed.proj.weight.mul_(4)
    visual.pos_embed.weight.mul_(4)
    for conv, k in ((audio.conv2d1, 6), (audio.conv2d2, 3), (audio.conv2d3, 3)):
        conv.weight.mul_(k)
    for layer in audio.layers:
        layer.self_attn.q_proj.weight.mul_(6)
        layer.self_attn.k_proj.weight.mul_(6)
    lm = th.lm_head.weight
    lm.normal_(0, 1.0, generator=g)
    lm[-n_special:] *= 0.05
    for norm in [text.norm] + [l.input_layernorm for l in text.layers]:
        norm.weight.normal_(1.0, 0.3, generator=g)


@torch.no_grad()
def init_talker_experts(model, seed: int) -> None:
    """transformers 5.23 leaves the talker's stacked experts as torch.empty (its _init_weights skips them):
    uninitialised memory, ~0 in a fresh process and huge or NaN once earlier tests ran. Seeded here."""
    g = torch.Generator().manual_seed(seed + 7)
    std = model.config.talker_config.text_config.initializer_range
    for layer in model.talker.model.layers:
        layer.mlp.experts.gate_up_proj.normal_(0, std, generator=g)
        layer.mlp.experts.down_proj.normal_(0, std, generator=g)


def build_reference(name: str, out_dir: Path, seed: int = 0, max_shard_size: str | None = None):
    """Build, sharpen and save the whole reference model (thinker, talker, code2wav); return (model, dir)."""
    from transformers import Qwen3OmniMoeForConditionalGeneration

    cfg = config(name)
    torch.manual_seed(seed)
    model = Qwen3OmniMoeForConditionalGeneration(hf_config(cfg)).eval()
    model.set_experts_implementation("eager")  # the readable per-expert loop is the oracle (FACTS.md)
    init_talker_experts(model, seed)
    sharpen(model, seed)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    build_tokenizer(out_dir, cfg)
    return model, out_dir


def special_tokens(cfg: dict) -> dict[str, int]:
    """The tiny vocabulary's specials at the ids the config gives them; "system", "user" and "assistant" are
    whole words there (system/user/assistant_token_id: the Talker finds turns by them), as in the real vocab."""
    th = cfg["thinker_config"]
    out = {
        "<|im_start|>": cfg["im_start_token_id"], "<|im_end|>": cfg["im_end_token_id"],
        "<tts_pad>": cfg["tts_pad_token_id"], "<tts_text_bos>": cfg["tts_bos_token_id"],
        "<tts_text_eod>": cfg["tts_eos_token_id"], "<|audio_pad|>": th["audio_token_id"],
        "<|image_pad|>": th["image_token_id"], "<|video_pad|>": th["video_token_id"],
        "<|vision_start|>": th["vision_start_token_id"], "<|vision_end|>": th["vision_end_token_id"],
        "<|audio_start|>": th["audio_start_token_id"], "<|audio_end|>": th["audio_end_token_id"],
        "system": cfg["system_token_id"], "user": cfg["user_token_id"], "assistant": cfg["assistant_token_id"],
    }
    if len(set(out.values())) != len(out):
        raise ValueError(f"special ids collide: {out}")
    return out


def build_tokenizer(out_dir: Path, cfg: dict) -> None:
    """A small byte-level BPE in the Qwen2 format whose specials sit at the config's ids (see special_tokens).

    `<|endoftext|>` takes the first free id among them; `<think>` / `</think>` the two ids below the lowest
    special, as added tokens with "special": false like Qwen3's. The regular vocabulary is trained on a fixed
    text below those, so ids are stable across runs.
    """
    import tempfile

    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    from omni.tokenizer import QWEN2_PATTERN, save_qwen2_files

    vocab_size = cfg["thinker_config"]["text_config"]["vocab_size"]
    fixed = special_tokens(cfg)
    lowest = min(fixed.values())
    free = [i for i in range(lowest, vocab_size) if i not in fixed.values()]
    if not free:
        raise ValueError("no free id for <|endoftext|> among the specials")
    specials = {t: i for t, i in fixed.items() if not t.isalpha()}
    specials["<|endoftext|>"] = free[0]
    think = {"<think>": lowest - 2, "</think>": lowest - 1}
    n_regular = lowest - 2

    def fresh() -> Tokenizer:
        t = Tokenizer(models.BPE(byte_fallback=False))
        t.normalizer = normalizers.NFC()
        t.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(__import__("tokenizers").Regex(QWEN2_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        t.decoder = decoders.ByteLevel()
        return t

    corpus = [
        "system\nYou are a helpful assistant that perceives auditory and visual inputs.",
        "user\nWhat is happening? Describe the image. What do you hear in the audio? Compare them.",
        "assistant\nThe cat sits on the mat. A person is talking about the weather.",
    ] * 20
    tok = fresh()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=n_regular, min_frequency=1, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    with tempfile.TemporaryDirectory() as d:
        tok.model.save(d)
        trained = json.loads((Path(d) / "vocab.json").read_text())
        merges = [tuple(line.split(" ")) for line in (Path(d) / "merges.txt").read_text().splitlines()
                  if line and not line.startswith("#version")]
    by_id = {i: t for t, i in trained.items()}
    for word in ("system", "user", "assistant"):
        if word not in trained:
            raise AssertionError(f"the tiny BPE did not learn {word!r} as one token")
        del by_id[trained[word]]
        by_id[fixed[word]] = word
    for t, i in list(specials.items()) + list(think.items()):
        by_id[i] = t
    vocab = {by_id.get(i, f"<|unused_{i}|>"): i for i in range(vocab_size)}
    tok = fresh()
    tok.model = models.BPE(vocab=vocab, merges=merges, byte_fallback=False, ignore_merges=False)
    for t, i in sorted({**specials, **think}.items(), key=lambda kv: kv[1]):
        if t in think:
            tok.add_tokens([AddedToken(t, special=False, normalized=False)])
        else:
            tok.add_special_tokens([AddedToken(t, special=True, normalized=False)])
    for t, i in {**fixed, **specials, **think}.items():
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t), i)
        assert tok.encode(t, add_special_tokens=False).ids == [i], (t, tok.encode(t).ids)
    save_qwen2_files(tok, Path(out_dir), model_max_length=cfg["thinker_config"]["text_config"]["max_position_embeddings"])


def generate_inputs(prompt) -> dict:
    """transformers' generate keyword arguments for one of our processor's prompts: ids, mask and media."""
    ids = prompt.input_ids[None]
    kw = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if prompt.pixel_values is not None:
        kw.update(pixel_values=prompt.pixel_values, image_grid_thw=prompt.image_grid_thw)
    if prompt.pixel_values_videos is not None:
        kw.update(pixel_values_videos=prompt.pixel_values_videos, video_grid_thw=prompt.video_grid_thw,
                  video_second_per_grid=torch.tensor(prompt.video_second_per_grid))
    if prompt.audio_features is not None:
        feats, mask = prompt.padded_audio()
        kw.update(input_features=feats, feature_attention_mask=mask)
    return kw
