"""Qwen3-Omni's Talker: a MoE decoder over the first codebook, and a dense code predictor for the other 15.

Keys (`talker.*`): `model.{codec_embedding, layers.N, norm}` (every layer MoE with a sigmoid-gated shared
expert; experts stored one tensor each and stacked at load, as the Thinker's), `codec_head`,
`text_projection` / `hidden_projection` (two-layer MLPs from the Thinker's width), `code_predictor.{model.
{codec_embedding.G, layers.N, norm}, lm_head.G}`. The decoder pieces are the Thinker's (omni/qwen3_omni_thinker.py).

Inputs, as transformers 5.23's `Qwen3OmniMoeForConditionalGeneration.generate` builds them (T(x) =
text_projection(Thinker embedding of id x), E(c) = codec_embedding(c)):

    rows                                      text side                codec side
    every user turn (system and assistant     T(id); media pads:       -
    turns dropped), in order                  hidden_projection(Thinker hidden after accept_hidden_layer)
    <|im_start|> assistant \\n                 T(id)                    0
    4 rows                                    T(<tts_pad>)             E(nothink), E(think_bos), E(think_eos), E(voice)
    1 row                                     T(<tts_bos>)             E(codec_pad)
    1 row                                     T(reply token 0)         E(codec_bos)       -> logits of frame 0's code 0
    step t >= 1                               T(reply token t), then   sum of frame t-1's 16 code embeddings
                                              T(<tts_eos>) once, then T(<tts_pad>)    -> logits of frame t's code 0

Positions: `rope_index` (TMRoPE) over the user turns' ids followed by 9 `<tts_pad>` ids, with the media's
grids; steps continue one position each. The reply's final EOS is never fed (the engine pushes None).
Each frame's codes 1..15 come from the code predictor: a fresh sequence [talker's final hidden, E(code 0)]
then one row per code, 15 forwards, batched across conversations.

Model code: imports torch and ours only. No per-request state on the modules: a `TalkerState` per
conversation holds its KV slot (in a cache passed in), its codes and its pending reply token ids.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from omni.cache import KVCache
from omni.config import ConfigError, _build
from omni.layers import GatedMLP, RMSNorm, activation
from omni.qwen3_omni_config import Qwen3OmniConfig, Qwen3OmniTextConfig
from omni.qwen3_omni_rope import NextPosition, RopeTokens, decode_positions, rope_index
from omni.qwen3_omni_thinker import Attention, DecoderLayer, SparseMoE, TextDecoder
from omni.sampling import SamplingParams, sample
from omni.thinker import MRotary as PlainRotary
from omni.weights import Checkpoint, empty_params, load_module


@dataclass
class Qwen3OmniTalkerTextConfig(Qwen3OmniTextConfig):
    """`talker_config.text_config`, with transformers' Qwen3OmniMoeTalkerTextConfig defaults."""

    vocab_size: int = 3072
    hidden_size: int = 1024
    intermediate_size: int = 2048
    num_hidden_layers: int = 20
    num_attention_heads: int = 16
    num_key_value_heads: int = 2
    head_dim: int | None = None
    moe_intermediate_size: int = 384
    num_experts: int = 128
    num_experts_per_tok: int = 8
    norm_topk_prob: bool = False
    shared_expert_intermediate_size: int | None = None  # not declared by transformers' class, but needed
    _default_theta = 10000.0


@dataclass
class Qwen3OmniCodePredictorConfig(Qwen3OmniTextConfig):
    """`talker_config.code_predictor_config`: a dense decoder (num_experts 0)."""

    vocab_size: int = 2048
    hidden_size: int = 1024
    intermediate_size: int = 3072
    num_hidden_layers: int = 5
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int | None = 128
    num_experts: int = 0
    num_code_groups: int = 32
    sliding_window: int | None = None
    layer_types: list[str] | None = None
    _default_theta = 10000.0


@dataclass
class Qwen3OmniTalkerConfig:
    """`talker_config` (transformers' class defaults; the checkpoints store their own ids)."""

    text_config: Qwen3OmniTalkerTextConfig = field(default_factory=Qwen3OmniTalkerTextConfig)
    code_predictor_config: Qwen3OmniCodePredictorConfig = field(default_factory=Qwen3OmniCodePredictorConfig)
    num_code_groups: int = 32
    thinker_hidden_size: int = 2048
    accept_hidden_layer: int = 18
    codec_eos_token_id: int = 4198
    codec_nothink_id: int = 4203
    codec_think_bos_id: int = 4204
    codec_think_eos_id: int = 4205
    codec_pad_id: int = 4196
    codec_bos_id: int = 4197
    audio_token_id: int = 151646
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    audio_start_token_id: int = 151669
    position_id_per_seconds: int = 25
    spatial_merge_size: int = 2
    speaker_id: dict[str, int] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    _nested = {"text_config": Qwen3OmniTalkerTextConfig, "code_predictor_config": Qwen3OmniCodePredictorConfig}

    @classmethod
    def from_dict(cls, d: dict) -> "Qwen3OmniTalkerConfig":
        d = dict(d)
        text = dict(d.get("text_config") or {})
        if "num_experts" not in text and "num_local_experts" in text:  # transformers' save_pretrained spelling
            text["num_experts"] = text["num_local_experts"]
        d["text_config"] = text
        cfg = _build(cls, d)
        if cfg.text_config.shared_expert_intermediate_size is None:
            raise ConfigError("talker_config.text_config has no shared_expert_intermediate_size (the shared "
                              "expert's width); a Qwen3-Omni config.json with a talker stores it")
        cp = cfg.code_predictor_config
        if cp.sliding_window is not None and "sliding_attention" in (cp.layer_types or ["sliding_attention"]):
            raise ConfigError("talker_config.code_predictor_config: sliding-window attention is not implemented "
                              "(a 16-row sequence never reaches a window; set sliding_window null)")
        if cp.num_code_groups != cfg.num_code_groups:
            raise ConfigError(f"talker num_code_groups {cfg.num_code_groups} != code predictor's {cp.num_code_groups}")
        return cfg


# transformers' generate defaults: talker_do_sample, talker_top_k/top_p/temperature/repetition_penalty for
# the first codebook; the code predictor's own generate (top_k 50, top_p 0.8, its config's temperature 1.0,
# no repetition penalty) for the residual codebooks, greedy whenever the talker is.
@dataclass(frozen=True)
class TalkerSampling:
    codec: SamplingParams  # code 0 of each frame (the Talker's codec_head); the penalty counts earlier codes 0
    residual: SamplingParams  # codes 1..15 (the code predictor)

    @property
    def is_greedy(self) -> bool:
        return self.codec.is_greedy and self.residual.is_greedy


TALKER_SAMPLING = TalkerSampling(SamplingParams(temperature=0.9, top_k=50, top_p=1.0, repetition_penalty=1.05),
                                 SamplingParams(temperature=1.0, top_k=50, top_p=0.8))
TALKER_GREEDY = TalkerSampling(SamplingParams(greedy=True, repetition_penalty=1.05),  # talker_do_sample=False
                               SamplingParams(greedy=True))


class ResizeMLP(nn.Module):
    """`text_projection` / `hidden_projection`: Thinker width -> intermediate -> Talker width, biased."""

    def __init__(self, dim: int, inter: int, out: int, act: str):
        super().__init__()
        self.linear_fc1 = nn.Linear(dim, inter)
        self.linear_fc2 = nn.Linear(inter, out)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class SharedExpertMoE(SparseMoE):
    """The Thinker's routed experts plus one always-on expert scaled by sigmoid(shared_expert_gate(x))."""

    def __init__(self, cfg: Qwen3OmniTalkerTextConfig):
        super().__init__(cfg)
        self.shared_expert = GatedMLP(cfg.hidden_size, cfg.shared_expert_intermediate_size, cfg.hidden_act)
        self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        out = self.experts(flat, *self.gate(flat)) + torch.sigmoid(self.shared_expert_gate(flat)) * self.shared_expert(flat)
        return out.view(shape)


class TalkerLayer(DecoderLayer):
    """Every Talker layer is MoE with a shared expert (transformers ignores mlp_only_layers here)."""

    def __init__(self, cfg: Qwen3OmniTalkerTextConfig, index: int):
        nn.Module.__init__(self)
        self.self_attn = Attention(cfg)
        self.mlp = SharedExpertMoE(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class TalkerDecoder(TextDecoder):
    """`talker.model`: codec_embedding, layers, norm, interleaved M-RoPE (the Thinker's decoder stack)."""

    def __init__(self, cfg: Qwen3OmniTalkerTextConfig):
        super().__init__(cfg)
        self.codec_embedding = self.embed_tokens  # the checkpoint's name
        del self.embed_tokens

    @staticmethod
    def make_layer(cfg, index: int) -> nn.Module:
        return TalkerLayer(cfg, index)


class CodePredictorDecoder(TextDecoder):
    """`talker.code_predictor.model`: one embedding per residual codebook, dense Qwen3 layers, 1-D RoPE."""

    def __init__(self, cfg: Qwen3OmniCodePredictorConfig):
        super().__init__(cfg)
        del self.embed_tokens
        self.codec_embedding = nn.ModuleList(nn.Embedding(cfg.vocab_size, cfg.hidden_size)
                                             for _ in range(cfg.num_code_groups - 1))

    @staticmethod
    def make_rotary(cfg) -> nn.Module:  # plain RoPE: the same position on all three axes
        return PlainRotary(cfg.get_head_dim(), cfg.get_rope_theta(), None)


class CodePredictor(nn.Module):
    def __init__(self, cfg: Qwen3OmniCodePredictorConfig):
        super().__init__()
        self.model = CodePredictorDecoder(cfg)
        self.lm_head = nn.ModuleList(nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
                                     for _ in range(cfg.num_code_groups - 1))


class Talker(nn.Module):
    def __init__(self, cfg: Qwen3OmniConfig):
        super().__init__()
        self.top = cfg
        self.cfg = tc = Qwen3OmniTalkerConfig.from_dict(cfg.talker_config)
        text = tc.text_config
        if text.hidden_size != tc.code_predictor_config.hidden_size:
            raise ConfigError(f"talker hidden_size {text.hidden_size} != code predictor's "
                              f"{tc.code_predictor_config.hidden_size}: the frame's code embeddings are summed")
        self.model = TalkerDecoder(text)
        self.codec_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        self.text_projection = ResizeMLP(tc.thinker_hidden_size, text.intermediate_size, text.hidden_size, text.hidden_act)
        self.hidden_projection = ResizeMLP(tc.thinker_hidden_size, text.intermediate_size, text.hidden_size, text.hidden_act)
        self.code_predictor = CodePredictor(tc.code_predictor_config)
        th = cfg.thinker_config
        # The Talker's TMRoPE reads the talker_config's ids and rate (transformers' get_rope_index on the talker).
        self.rope_tokens = RopeTokens(
            image_token_id=tc.image_token_id, video_token_id=tc.video_token_id, audio_token_id=tc.audio_token_id,
            vision_start_token_id=tc.vision_start_token_id, vision_end_token_id=th.vision_end_token_id,
            audio_start_token_id=tc.audio_start_token_id, audio_end_token_id=th.audio_end_token_id,
            position_id_per_seconds=tc.position_id_per_seconds, spatial_merge_size=tc.spatial_merge_size,
            n_window=th.audio_config.get("n_window", 50))

    @classmethod
    def load(cls, path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> "Talker":
        """Build on the meta device and load `talker.*` strictly (experts stacked)."""
        ckpt = path if isinstance(path, Checkpoint) else Checkpoint(path)
        cfg = Qwen3OmniConfig.from_file(ckpt.dir)
        if not cfg.enable_audio_output or not cfg.talker_config:
            raise ConfigError(f"{ckpt.dir}: this checkpoint has no talker (enable_audio_output is false)")
        with empty_params():
            talker = cls(cfg)
        return load_module(talker, ckpt, "talker.", dtype=dtype, device=device)

    @property
    def voices(self) -> dict[str, int]:
        return dict(self.cfg.speaker_id or {})

    def voice_id(self, voice: str) -> int:
        """The codec token of a voice (`talker_config.speaker_id`, case-insensitive)."""
        voices = self.voices
        if voice.lower() not in voices:
            raise ValueError(f"unknown voice {voice!r}; this checkpoint has {', '.join(sorted(voices)) or 'none'}")
        return voices[voice.lower()]

    @property
    def suppressed(self) -> torch.Tensor:
        """(V,) bool: codec specials never sampled, [V - 1024, V) but the codec eos (as transformers' generate)."""
        V = self.cfg.text_config.vocab_size
        mask = torch.zeros(V, dtype=torch.bool, device=self.codec_head.weight.device)
        mask[max(V - 1024, 0):] = True
        mask[self.cfg.codec_eos_token_id] = False
        return mask


@dataclass
class TalkerPrompt:
    """A conversation's user turns as Talker prefill rows with their TMRoPE positions, and the opening of the
    assistant turn. `prefill_rows` makes one from a prefilled segment, after an earlier one (`after`): user
    rows accumulate turn by turn, positions continue where the last turn's ended, the assistant opening is
    the latest."""

    rows: torch.Tensor  # (N, H) projected user-turn rows
    ids: torch.Tensor  # (N,) their Thinker ids
    positions: torch.Tensor  # (3, N) float32 TMRoPE positions of the rows (the Talker's own rope_index)
    next_position: NextPosition  # where the rows after them continue
    assistant_rows: torch.Tensor  # (k, H) T(id) of `<|im_start|>assistant\n` and any prompt tokens after it


@torch.inference_mode()
def prefill_rows(talker: Talker, input_ids: torch.Tensor, embeds: torch.Tensor, accept_hidden: torch.Tensor,
                 image_grid_thw=None, video_grid_thw=None, audio_lengths=None, second_per_grids=None,
                 use_audio_in_video: bool = False, after: TalkerPrompt | None = None) -> TalkerPrompt:
    """The Talker's view of a conversation once a prefilled segment of it is added (what the Thinker prefill
    hands over): `after` (the conversation's TalkerPrompt so far, or None) with the segment's user rows.

    input_ids (T,): the segment's ids, starting at a turn's `<|im_start|>` (tokens before the first one are
    taken as the end of an earlier, non-user turn and dropped); embeds (T, D): the Thinker's input
    embeddings of the segment (`Thinker.embed`; only text rows are read); accept_hidden (T, D): the Thinker's
    hidden after `talker.cfg.accept_hidden_layer` layers (`Thinker.forward(..., capture_layer=k)`; only
    audio/image/video pad rows are read); the grids / audio mel lengths / seconds per video grid of the
    segment's media, in order, and whether its videos carry their audio (as for rope_index). Media must sit
    in user turns. If the segment holds the generation prompt, its last `<|im_start|>assistant` opens the reply.
    """
    top, tc = talker.top, talker.cfg
    ids = input_ids.reshape(-1).cpu()
    T = ids.shape[0]
    w = talker.codec_head.weight
    starts = (ids == top.im_start_token_id).nonzero().flatten().tolist()
    role = torch.full((T,), -1, dtype=torch.long)
    for i, s in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else T
        role[s:end] = int(ids[s + 1]) if s + 1 < T else -1
    user = role == top.user_token_id
    media = torch.isin(ids, torch.tensor([tc.audio_token_id, tc.image_token_id, tc.video_token_id]))
    if bool((media & ~user).any()):
        raise ValueError("media placeholders outside a user turn: the Talker keeps user turns only, so their "
                         "grids could not be told apart; put images, videos and audio in user turns")
    rows = torch.empty(int(user.sum()), tc.text_config.hidden_size, dtype=w.dtype, device=w.device)
    m = media[user].to(w.device)
    dev_user = user.to(embeds.device)
    if bool(m.any()):
        rows[m] = talker.hidden_projection(accept_hidden.reshape(T, -1)[dev_user & media.to(embeds.device)].to(w.device, w.dtype))
    rows[~m] = talker.text_projection(embeds.reshape(T, -1)[dev_user & ~media.to(embeds.device)].to(w.device, w.dtype))
    opening = [s for s in starts if s + 1 < T and int(ids[s + 1]) == top.assistant_token_id]
    if opening and opening[-1] >= T - 2:
        raise ValueError("the assistant turn's opening must be `<|im_start|>assistant\\n` (3 tokens) at least")
    assistant = (talker.text_projection(embeds.reshape(T, -1)[opening[-1]:].to(w.device, w.dtype)) if opening
                 else rows.new_zeros(0, rows.shape[1]))
    positions, nxt = rope_index(ids[user], image_grid_thw, video_grid_thw, audio_lengths, second_per_grids,
                                use_audio_in_video, tokens=talker.rope_tokens,
                                start=after.next_position if after is not None else 0)
    if after is None:
        return TalkerPrompt(rows, ids[user], positions, nxt, assistant)
    return TalkerPrompt(torch.cat([after.rows, rows]), torch.cat([after.ids, ids[user]]),
                        torch.cat([after.positions, positions], 1), nxt,
                        assistant if opening else after.assistant_rows)


@dataclass
class TalkerState:
    """One utterance's Talker decode. Holds no module state; its KV rows live in `cache[slot]`."""

    cache: KVCache
    slot: int
    embed: nn.Embedding  # the Thinker's embed_tokens (reply ids -> text side)
    specials: torch.Tensor  # (3, H): T(<tts_bos>), T(<tts_eos>), T(<tts_pad>)
    first: torch.Tensor  # (3,) position of the row that yields frame 0's code 0
    next_position: NextPosition  # of the row fed at step 1
    seen: torch.Tensor  # (1, V) bool: codes 0 so far (the repetition penalty)
    min_frames: int = 0  # codec eos blocked before this many frames (talker_min_new_tokens)
    max_frames: int = 4096
    text: deque = field(default_factory=deque)  # pending text: (k, H) rows of the prompt's assistant tail, then ids
    frames: list = field(default_factory=list)  # (G,) LongTensor per frame so far
    prev: torch.Tensor | None = None  # (H,) sum of the last frame's code embeddings
    reply_ended: bool = False  # None was pushed: no more reply tokens
    eos_fed: bool = False  # <tts_eos> went in; <tts_pad> from now on
    finished: bool = False  # codec eos sampled, max_frames reached, or reset
    last_logits: torch.Tensor | None = None  # (1, V) raw logits frame len(frames)-1's code 0 was drawn from
    user_rows: int = 0  # the prompt's user rows at the start of the slot (what `reset` keeps)

    @property
    def codes(self) -> list:
        """The frames so far ((G,) LongTensor each): a frame is one codec step of all codebooks."""
        return self.frames

    def reset(self, keep_user_rows: bool = False) -> None:
        """Forget the utterance and free the KV slot's rows (all, or all after the user rows: a later turn
        of the conversation then starts from them, `start(kept=...)`); the state is finished."""
        with torch.inference_mode():
            self.cache.truncate(self.slot, self.user_rows if keep_user_rows else 0)
            self.seen.zero_()
        self.text.clear()
        self.frames.clear()
        self.prev = self.last_logits = None
        self.reply_ended, self.eos_fed, self.finished = False, False, True


@torch.inference_mode()
def start(talker: Talker, prompt: TalkerPrompt, thinker_embed: nn.Embedding, voice: str = "ethan",
          cache: KVCache | None = None, slot: int = 0, max_frames: int = 4096, min_frames: int = 0,
          kept: int = 0) -> TalkerState:
    """Prefill the user rows and the fixed assistant rows (all but the one that needs reply token 0).

    cache/slot: a slot of `talker.model.allocate_cache(n, max_len)` with room for the prompt's rows + 9 +
    max_frames; by default one is allocated. kept: the slot already holds the KV of the prompt's first
    `kept` user rows (an earlier turn's, left by `reset(keep_user_rows=True)`): only the rest is prefilled.
    The first `step_batch` needs reply token 0 pushed.
    """
    top, tc = talker.top, talker.cfg
    if prompt.assistant_rows.shape[0] < 3:
        raise ValueError("the prompt has no `<|im_start|>assistant\\n` opening: prefill the generation prompt first")
    w = talker.codec_head.weight
    speaker = talker.voice_id(voice)
    n_user = prompt.rows.shape[0]
    if cache is None:
        cache = talker.model.allocate_cache(1, n_user + 9 + max_frames + 1)
        slot = 0
    if kept == 0:
        cache.reset(slot)
    elif not 0 < kept <= n_user or int(cache.lengths[slot]) != kept:
        raise ValueError(f"the slot holds {int(cache.lengths[slot])} rows, not the {kept} kept user rows of "
                         f"this prompt's {n_user}")
    dev = w.device
    specials = talker.text_projection(thinker_embed(torch.tensor(
        [top.tts_bos_token_id, top.tts_eos_token_id, top.tts_pad_token_id], device=thinker_embed.weight.device)
    ).to(dev, w.dtype))
    bos, _, pad = specials
    a = prompt.assistant_rows
    codec = talker.model.codec_embedding(torch.tensor(
        [tc.codec_nothink_id, tc.codec_think_bos_id, tc.codec_think_eos_id, speaker, tc.codec_pad_id], device=dev))
    fixed = torch.cat([a[:3], pad.expand(4, -1) + codec[:4], (bos + codec[4])[None]])  # (8, H)
    rows = torch.cat([prompt.rows.to(dev, w.dtype), fixed])
    positions = torch.cat([prompt.positions, decode_positions(prompt.next_position, 9)], 1)  # 9 text-like rows
    nxt = prompt.next_position + 9
    talker.model(rows[None, kept:], positions[:, None, kept:-1].to(dev), cache, torch.tensor([slot]))
    state = TalkerState(cache=cache, slot=slot, embed=thinker_embed, specials=specials, first=positions[:, -1],
                        next_position=nxt, seen=torch.zeros(1, tc.text_config.vocab_size, dtype=torch.bool, device=dev),
                        min_frames=min_frames, max_frames=max_frames, user_rows=n_user)
    for r in a[3:]:  # prompt tokens after the opening (a prefilled reply start) come first
        state.text.append(r)
    return state


def push(state: TalkerState, token_id: int | None) -> None:
    """Queue the next reply token id (every sampled token but the final EOS); None: the reply has ended."""
    if state.reply_ended:
        raise ValueError("the reply already ended: push None once, after the last reply token")
    if token_id is None:
        state.reply_ended = True
    else:
        state.text.append(int(token_id))


def ready(state: TalkerState) -> bool:
    """Whether `step_batch` can produce this state's next frame without another reply token."""
    return not state.finished and (bool(state.text) or (state.reply_ended and bool(state.frames)))


def _next_text(state: TalkerState):
    """The text side of the next row: a pending row or id, else T(<tts_eos>) once, then T(<tts_pad>)."""
    if state.text:
        return state.text.popleft()
    if not state.frames and state.reply_ended:
        raise ValueError("the reply has no tokens: the Talker needs reply token 0 before its first frame")
    if not state.reply_ended:
        raise RuntimeError("the Talker needs the next reply token (or None when the reply ended) first")
    row, state.eos_fed = state.specials[2 if state.eos_fed else 1], True
    return row


def frame_embedding(talker: Talker, codes: torch.Tensor) -> torch.Tensor:
    """codes (B, G) -> (B, H): the sum of a frame's code embeddings (code 0 the Talker's, g >= 1 the predictor's)."""
    out = talker.model.codec_embedding(codes[:, 0])
    for g, emb in enumerate(talker.code_predictor.model.codec_embedding):
        out = out + emb(codes[:, g + 1])
    return out


def _draw(logits: torch.Tensor, params: list[SamplingParams], generators: list, seen: torch.Tensor | None = None
          ) -> torch.Tensor:
    """logits (B, V) -> (B,) on the device; one argmax for an all-greedy batch, else row by row."""
    if all(p.is_greedy and p.repetition_penalty == 1.0 for p in params):
        return logits.float().argmax(-1)
    return torch.cat([sample(logits[i:i + 1], p, g, None if seen is None else seen[i:i + 1])
                      for i, (p, g) in enumerate(zip(params, generators))])


@torch.inference_mode()
def predict_residuals(talker: Talker, hidden: torch.Tensor, code0: torch.Tensor, params: list[SamplingParams],
                      generators: list) -> torch.Tensor:
    """Codes 1..G-1 of B frames: hidden (B, H) the Talker's final hidden at the row code0 (B,) came from.

    A fresh sequence per frame in a scratch cache: one batched forward over [hidden, E(code 0)], then one
    per further code: G-1 forwards for the batch. Returns (B, G) codes, code 0 first.
    """
    cp = talker.code_predictor
    B = hidden.shape[0]
    G = talker.cfg.num_code_groups
    cache = cp.model.allocate_cache(B, G)
    slots = torch.arange(B)
    x = torch.stack([hidden.to(code0.device), talker.model.codec_embedding(code0)], 1)  # (B, 2, H)
    pos = torch.arange(2, device=x.device).view(1, 1, 2).expand(3, B, 2)
    codes = [code0]
    for g in range(G - 1):
        h = cp.model(x, pos, cache, slots)
        codes.append(_draw(cp.lm_head[g](h[:, -1]), params, generators))
        if g + 1 < G - 1:
            x = cp.model.codec_embedding[g](codes[-1])[:, None]
            pos = torch.full((3, B, 1), g + 2, device=x.device)
    return torch.stack(codes, 1)


@torch.inference_mode()
def step_batch(talker: Talker, states: list[TalkerState], samplings: list[TalkerSampling],
               generators: list[torch.Generator | None]) -> list[torch.Tensor | None]:
    """The next frame of each state (each `ready`): (G,) LongTensor codes, or None when it finished.

    One batched Talker forward (its own row per state), code 0 drawn per state, then the code predictor's
    G-1 forwards batched over the states that go on. All states share one Talker cache (their own slots).
    """
    if not states:
        return []
    w = talker.codec_head.weight
    dev = w.device
    texts = [_next_text(st) for st in states]
    ids = [i for i, t in enumerate(texts) if isinstance(t, int)]
    if ids:
        projected = talker.text_projection(states[0].embed(torch.tensor(
            [texts[i] for i in ids], device=states[0].embed.weight.device)).to(dev, w.dtype))
        for j, i in enumerate(ids):
            texts[i] = projected[j]
    bos = talker.model.codec_embedding.weight[talker.cfg.codec_bos_id]
    rows = torch.stack([t.to(dev, w.dtype) + (bos if st.prev is None else st.prev) for st, t in zip(states, texts)])
    positions = torch.stack([st.first if st.prev is None else decode_positions(st.next_position + (len(st.frames) - 1))[:, 0]
                             for st in states], 1)[:, :, None].to(dev)  # (3, B, 1)
    hidden = talker.model(rows[:, None], positions, states[0].cache, torch.tensor([st.slot for st in states]))[:, -1]
    logits = talker.codec_head(hidden)  # (B, V)
    masked = logits.float().masked_fill(talker.suppressed, float("-inf"))
    eos = talker.cfg.codec_eos_token_id
    for i, st in enumerate(states):
        st.last_logits = logits[i:i + 1]
        if len(st.frames) < st.min_frames:
            masked[i, eos] = float("-inf")
    seen = torch.cat([st.seen for st in states])
    code0 = _draw(masked, [s.codec for s in samplings], generators, seen)
    go = [i for i, c in enumerate(code0.tolist()) if c != eos]  # the one host read of the step
    out: list[torch.Tensor | None] = [None] * len(states)
    for i, st in enumerate(states):
        if i not in go:
            st.finished = True
    if go:
        sel = torch.tensor(go, device=dev)
        frames = predict_residuals(talker, hidden[sel], code0[sel], [samplings[i].residual for i in go],
                                   [generators[i] for i in go])
        summed = frame_embedding(talker, frames)
        for j, i in enumerate(go):
            st = states[i]
            st.seen[0, frames[j, 0]] = True
            st.frames.append(frames[j])
            st.prev = summed[j]
            out[i] = frames[j]
            if len(st.frames) >= st.max_frames:
                st.finished = True
    return out


def generate_codes(talker: Talker, prompt: TalkerPrompt, reply_ids: list[int], thinker_embed: nn.Embedding,
                   voice: str = "ethan", sampling: TalkerSampling = TALKER_SAMPLING,
                   generator: torch.Generator | None = None, max_frames: int = 4096,
                   min_frames: int = 0) -> torch.Tensor:
    """All frames for a finished reply (reply_ids: every reply token but the final EOS): (T, G) LongTensor.

    Streams as an engine would: reply token k + 1 is pushed just before frame k is asked for.
    """
    if not reply_ids:
        raise ValueError("the reply has no tokens: there is nothing for the Talker to say")
    state = start(talker, prompt, thinker_embed, voice, max_frames=max_frames, min_frames=min_frames)
    arriving = [*reply_ids, None]
    k = 0
    while not state.finished:
        while not ready(state) and k < len(arriving):
            push(state, arriving[k])
            k += 1
        if k < len(arriving):  # one token ahead, as a Thinker decoding in step with the Talker
            push(state, arriving[k])
            k += 1
        step_batch(talker, [state], [sampling], [generator])
    G = talker.cfg.num_code_groups
    return torch.stack(state.frames) if state.frames else torch.zeros(0, G, dtype=torch.long)
