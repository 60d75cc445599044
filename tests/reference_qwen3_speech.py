"""The Qwen3-Omni Talker's oracle: tests/reference_qwen3.py's models with the talker sharpened too, and a run of
transformers 5.23's full `generate` with audio out that records what the talker did.

Random talker weights are too smooth (FACTS.md): text rows vanish next to the codec rows, attention is flat
and the residual codebooks barely move the next frame. `sharpen_talker` makes each of those matter, so a
swapped codebook, a trailing text shifted by one or a wrong Thinker layer changes greedy codes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from omni.qwen3_omni_embedded import audible_code2wav_params
from tests.reference_qwen3 import build_reference


@torch.no_grad()
def sharpen_talker(model, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    talker = model.talker
    tc = model.config.talker_config
    V = tc.text_config.vocab_size

    def qk(layers):  # sharp attention whose output weighs as much as the residual stream
        for layer in layers:
            layer.self_attn.q_norm.weight.normal_(3.0, 0.5, generator=g)
            layer.self_attn.k_norm.weight.normal_(3.0, 0.5, generator=g)
            layer.self_attn.v_proj.weight.mul_(9)
            layer.self_attn.o_proj.weight.mul_(9)
            layer.input_layernorm.weight.normal_(1.0, 0.3, generator=g)

    qk(talker.model.layers)
    for layer in talker.model.layers:
        layer.mlp.gate.weight.mul_(20)  # routing by content, uneven top-k weights
        layer.mlp.experts.gate_up_proj.mul_(10)  # the experts' outputs matter too
        layer.mlp.experts.down_proj.mul_(10)
        layer.mlp.shared_expert_gate.weight.normal_(0, 1.0, generator=g)
    talker.model.codec_embedding.weight.normal_(0, 1.0, generator=g)
    head = talker.codec_head.weight
    head.normal_(0, 1.0, generator=g)
    head[V - 1024:] *= 0.05  # the suppressed specials and the codec eos: speech goes on unless told
    cp = talker.code_predictor
    qk(cp.model.layers)
    for emb in cp.model.codec_embedding:
        emb.weight.normal_(0, 1.0, generator=g)
    for lm in cp.lm_head:
        lm.weight.normal_(0, 1.0, generator=g)
    for layer in cp.model.layers:
        layer.mlp.up_proj.weight.mul_(10)
        layer.mlp.down_proj.weight.mul_(10)
    # The projections' outputs at the scale of a frame's summed code embeddings (~sqrt(G)), so text and media
    # rows weigh as much as codes do.
    thinker_embed = model.thinker.get_input_embeddings().weight
    G = tc.num_code_groups
    for proj, scale in ((talker.text_projection, 1 / float(thinker_embed.std())), (talker.hidden_projection, 1.0)):
        fan_in = proj.linear_fc1.weight.shape[1]
        proj.linear_fc1.weight.normal_(0, scale / fan_in ** 0.5, generator=g)
        proj.linear_fc1.bias.normal_(0, 0.5, generator=g)
        proj.linear_fc2.weight.normal_(0, 1 / proj.linear_fc2.weight.shape[1] ** 0.5, generator=g)
    y = talker.text_projection(thinker_embed)  # centred: a part common to every token would say nothing
    talker.text_projection.linear_fc2.bias.sub_(y.mean(0))
    talker.text_projection.linear_fc2.weight.mul_(G ** 0.5 / float((y - y.mean(0)).std()))
    talker.text_projection.linear_fc2.bias.mul_(G ** 0.5 / float((y - y.mean(0)).std()))
    talker.hidden_projection.linear_fc2.weight.mul_(G ** 0.5)


@torch.no_grad()
def audible_code2wav(m, seed: int = 0, frames: int = 24) -> None:
    """Re-initialise a reference Code2Wav so its wave is audible (RMS ~0.2) and every stage shapes it: random
    init gives a near-silent wave that hides bugs. Each conv is rescaled to unit output RMS on random codes
    (the residual branches and the last conv less)."""
    g = torch.Generator().manual_seed(seed)
    audible_code2wav_params(m, g)
    codes = torch.randint(0, m.config.codebook_size, (1, m.config.num_quantizers, frames), generator=g)
    convs = [c for c in list(m.upsample.modules()) + list(m.decoder.modules())
             if isinstance(c, (nn.Conv1d, nn.ConvTranspose1d))]
    residual = {id(u.conv2.conv) for u in m.modules() if type(u).__name__.endswith("ResidualUnit")}
    for conv in convs:
        seen = {}
        hook = conv.register_forward_hook(lambda mod, i, o: seen.setdefault("out", o))
        m(codes)
        hook.remove()
        k = (0.3 if conv is convs[-1] else 0.4 if id(conv) in residual else 1.0) / seen["out"].pow(2).mean().sqrt()
        conv.weight.mul_(k)
        conv.bias.mul_(k)



def build_speech_reference(name: str, out_dir: Path, seed: int = 0):
    """tests/reference_qwen3.build_reference with the talker sharpened and Code2Wav audible; returns (model, dir)."""
    model, d = build_reference(name, out_dir, seed)
    sharpen_talker(model, seed + 1)
    audible_code2wav(model.code2wav, seed + 2)
    model.save_pretrained(d)
    model.config.talker_config.audio_config = model.config.thinker_config.audio_config  # FACTS: 5.23 pitfall
    return model, d


@torch.no_grad()
def reference_speech(model, input_ids: torch.Tensor, thinker_tokens: int, frames: int, min_frames: int = 0,
                     voice: str = "ethan", **media):
    """transformers' greedy generate with audio out: (all generated text ids, codes (T, G), talker logits (n, V)).

    talker_max_new_tokens = frames + 1: the last code 0 drawn gets no residual codes, so at most `frames`
    frames come out. logits[j] are the raw logits code 0 of frame j was drawn from.
    """
    rec = {"codes": [], "logits": []}

    def hook(mod, args, kwargs, out):
        if out.hidden_states[1] is not None:
            rec["codes"].append(out.hidden_states[1][0])
        rec["logits"].append(out.logits[0, -1])

    h = model.talker.register_forward_hook(hook, with_kwargs=True)
    try:
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), return_audio=True,
                             thinker_do_sample=False, talker_do_sample=False, thinker_max_new_tokens=thinker_tokens,
                             talker_max_new_tokens=frames + 1, talker_min_new_tokens=min_frames, speaker=voice, **media)
    finally:
        h.remove()
    reply = out[0][0, input_ids.shape[1]:].tolist()
    return reply, torch.stack(rec["codes"]), torch.stack(rec["logits"])
