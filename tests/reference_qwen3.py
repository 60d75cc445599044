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


def build_reference(name: str, out_dir: Path, seed: int = 0, max_shard_size: str | None = None):
    """Build, sharpen and save the whole reference model (thinker, talker, code2wav); return (model, dir)."""
    from transformers import Qwen3OmniMoeForConditionalGeneration

    cfg = config(name)
    torch.manual_seed(seed)
    model = Qwen3OmniMoeForConditionalGeneration(hf_config(cfg)).eval()
    model.set_experts_implementation("eager")  # the readable per-expert loop is the oracle (FACTS.md)
    sharpen(model, seed)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    return model, out_dir
