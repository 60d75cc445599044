"""The Talker: a Qwen2 decoder over codec tokens, driven by the Thinker's states.

Keys: `talker.thinker_to_talker_proj`, `talker.model.*` (embed_tokens over the codec vocab
with the Thinker's width, layers at the Talker's width), `talker.codec_head`.

Inputs, as transformers' `Qwen2_5OmniForConditionalGeneration.generate` builds them (every row
is `text side + codec side`, then `thinker_to_talker_proj`):

    row             text side (Thinker width D)                        codec side          position
    prompt i < L    embed_i (0 at image/video/audio pads) + hidden_i   -                   TMRoPE of the prompt
    L               thinker_embed(voice bos_token)                     codec_embed(pad)    p = max(prompt) + 1
    L + 1           embed + hidden of reply token 0                    codec_embed(bos)    p + 1
    L + 1 + k, k>0  embed + hidden of reply token k, then              codec_embed(code    p + 1 + k
                    thinker_embed(<tts_text_eod>) once, then             k - 1)
                    thinker_embed(<tts_pad>) for ever

The logits at row L + 1 + k give code k. Reply tokens reach the Talker as `ThinkerStep`s, one
Thinker decode step after they were sampled; the token that ends the reply is never fed, so
the reply's end is signalled with `None`. Codes stop at the codec end or pad id; the codec bos
id is never sampled; the repetition penalty counts mask (one per prompt row), pad, bos and
every code so far.

A drawn code stays on the device: it is fed to the next step (its codec embedding) and marked for
the repetition penalty there, while its value is copied to the host without waiting (`draw_batch`).
The host reads it when it asks (`read_codes`); a driver that reads each step's codes only after
launching the next step (the engine) never waits for the device. A codec end is then seen one step
late: the code drawn after it is dropped, never returned.

HF5_NOTE: the table is what the reference talker's forward does whenever it is given an
attention mask (Qwen's intended path: `get_rope_index` over prompt + voice bos + first reply
token, then `past_length + rope_deltas`; codec pad/bos added to the last two prefill rows).
transformers 5.x's `generate` drops an all-ones attention mask before the forward
(generation/utils.py), and both steps sit under `if attention_mask is not None`, so for an
unpadded prompt 5.x runs the talker on plain positions 0, 1, 2, ... (all three axes) and
without the codec pad/bos embeddings in the prefill. `hf5=True` reproduces that, for parity
with transformers 5.x; the default follows the intended path.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from types import EllipsisType

import torch
from torch import nn

from omni.cache import KVCache
from omni.config import TalkerConfig
from omni.layers import column_major, to_device
from omni.sampling import SamplingParams, sample
from omni.thinker import Decoder
from omni.types import PromptStates, ThinkerStep

# transformers' generate defaults for the codec (talker_top_k, talker_top_p, ...)
TALKER_SAMPLING = SamplingParams(temperature=0.9, top_k=40, top_p=0.8, repetition_penalty=1.05)
TALKER_GREEDY = SamplingParams(greedy=True, repetition_penalty=1.05)  # talker_do_sample=False


class Talker(nn.Module):
    def __init__(self, cfg: TalkerConfig):
        super().__init__()
        self.cfg = cfg
        self.thinker_to_talker_proj = nn.Linear(cfg.embedding_size, cfg.hidden_size)
        self.model = Decoder(cfg, embed_dim=cfg.embedding_size)  # inputs arrive projected to its width
        self.codec_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def fuse(self, cpu: bool = False) -> None:
        """Serving layout (see `omni.thinker.Thinker.fuse`)."""
        self.model.fuse(cpu)
        if cpu:
            column_major(self.codec_head)

    def forward(self, inputs: torch.Tensor, positions: torch.Tensor, cache: KVCache, slots: torch.Tensor,
                n_valid: torch.Tensor | None = None, last_only: bool = False) -> torch.Tensor:
        """inputs (B, T, embedding_size): text side + codec embedding; positions (3, B, T).

        Returns codec logits (B, T, V), or (B, V) for the last row with `last_only`.
        """
        hidden = self.model(self.thinker_to_talker_proj(inputs), positions, cache, slots, n_valid)
        return self.codec_head(hidden[:, -1] if last_only else hidden)

    @property
    def eos_ids(self) -> tuple[int, int]:
        """Codes that end the speech: transformers' default `talker_eos_token_id` = [pad, end]."""
        return (self.cfg.tts_codec_pad_token_id, self.cfg.tts_codec_end_token_id)

    def codec_embed(self, code: int) -> torch.Tensor:  # (D,)
        w = self.model.embed_tokens.weight
        return w[code]


class _Drawn:
    """The codes of one batched step, (B,) on the device, on their way to the host (pinned memory and an
    event on CUDA): read once, for the whole batch, when first asked."""

    def __init__(self, codes: torch.Tensor):
        self.ready, self._values = None, None
        if codes.device.type != "cuda":
            self.host = codes
            return
        self.host = torch.empty(codes.shape, dtype=codes.dtype, pin_memory=True)
        self.host.copy_(codes, non_blocking=True)
        self.ready = torch.cuda.Event()
        self.ready.record()

    def values(self) -> list[int]:
        if self._values is None:
            if self.ready is not None:
                self.ready.synchronize()
            self._values = self.host.tolist()
        return self._values


def prompt_text(cfg: TalkerConfig, prompt: PromptStates) -> torch.Tensor:
    """Text side of the prompt rows (L, D): input embedding with multimodal pads zeroed, plus hidden."""
    media = torch.tensor([cfg.image_token_index, cfg.video_token_index, cfg.audio_token_index])
    is_media = torch.isin(prompt.input_ids.cpu(), media).to(prompt.embeds.device)
    return prompt.embeds.masked_fill(is_media[:, None], 0) + prompt.hidden


@dataclass
class TalkerState:
    """One utterance's Talker decode. Holds no module; its KV rows live in `cache[slot]`."""

    cache: KVCache
    slot: int
    position: int  # rotary position of the next row fed
    eod: torch.Tensor  # (D,) thinker embedding of <tts_text_eod>
    pad: torch.Tensor  # (D,) thinker embedding of <tts_pad>
    seen: torch.Tensor  # (1, V) bool: codes under the repetition penalty
    logits: torch.Tensor | None = None  # (1, V) for the next code; None while the last code awaits its text
    last_logits: torch.Tensor | None = None  # (1, V) raw logits the latest code was drawn from
    codes: list[int] = field(default_factory=list)  # the codes read so far (the codec end not among them)
    code: torch.Tensor | None = None  # (1,) the latest code drawn, on the device: the next row's codec side
    unread: deque = field(default_factory=deque)  # (_Drawn, row) of the codes drawn, not read yet, oldest first
    queue: deque = field(default_factory=deque)  # (D,) text sides of reply tokens not yet consumed
    reply_ended: bool = False  # the Thinker's reply is complete (no more ThinkerSteps)
    eod_fed: bool = False
    finished: bool = False  # a codec eos was sampled (or reset)

    def reset(self) -> None:
        """Forget the utterance and free the KV slot's rows; the state is finished."""
        with torch.inference_mode():  # the cache and `seen` may have been made under inference mode
            self.cache.reset(self.slot)
            self.seen.zero_()
        self.logits = self.last_logits = self.code = None
        self.codes.clear()
        self.unread.clear()
        self.queue.clear()
        self.reply_ended, self.eod_fed, self.finished = False, False, True


def prefill_inputs(talker: Talker, thinker_embed: nn.Embedding, prompt: PromptStates, voice_bos: int,
                   first: ThinkerStep, hf5: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows and positions of the prefill: (L + 2, D) inputs before the projection, (3, L + 2) positions.

    hf5: transformers 5.x's generate (HF5_NOTE): positions 0, 1, 2, ... and no codec embeddings.
    """
    cfg = talker.cfg
    w = talker.thinker_to_talker_proj.weight
    dev, dtype = w.device, w.dtype
    bos_text = thinker_embed(torch.tensor([voice_bos], device=thinker_embed.weight.device))[0].to(dev, dtype)
    rows = torch.cat([
        prompt_text(cfg, prompt).to(dev, dtype),
        bos_text[None],
        (first.embed.to(dev, dtype) + first.hidden.to(dev, dtype))[None],
    ])
    L = rows.shape[0] - 2
    if hf5:
        return rows, torch.arange(L + 2, device=dev).expand(3, L + 2)
    rows[L] += talker.codec_embed(cfg.tts_codec_pad_token_id)
    rows[L + 1] += talker.codec_embed(cfg.tts_codec_start_token_id)
    p = int(prompt.positions.max()) + 1  # where the Thinker's reply starts
    tail = torch.tensor([p, p + 1], device=dev).expand(3, 2)
    return rows, torch.cat([prompt.positions.to(dev), tail], 1)


@torch.inference_mode()
def start(talker: Talker, thinker_embed: nn.Embedding, prompt: PromptStates, voice_bos: int, first: ThinkerStep,
          max_codes: int = 4096, cache: KVCache | None = None, slot: int = 0,
          hf5: bool = False) -> TalkerState:
    """Prefill the Talker with the prompt, the voice's bos and the first reply token.

    thinker_embed: the Thinker's `model.embed_tokens` (voice bos and the tts text tokens are
    Thinker ids). voice_bos: `spk_dict[voice]["bos_token"]`. cache/slot: a KV slot from a pool
    with room for len(prompt) + 1 + max_codes rows; by default one is allocated.
    hf5: reproduce transformers 5.x's generate instead of the intended inputs (HF5_NOTE).
    """
    cfg = talker.cfg
    L = prompt.input_ids.shape[0]
    if cache is None:
        cache = talker.model.allocate_cache(1, L + 1 + max_codes)
        slot = 0
    cache.reset(slot)
    rows, positions = prefill_inputs(talker, thinker_embed, prompt, voice_bos, first, hf5)
    logits = talker(rows[None], positions[:, None], cache, torch.tensor([slot]), last_only=True)  # (1, V)
    w = talker.thinker_to_talker_proj.weight
    eod, pad = thinker_embed(torch.tensor([cfg.tts_text_end_token_id, cfg.tts_text_pad_token_id],
                                          device=thinker_embed.weight.device)).to(w.device, w.dtype)
    seen = torch.zeros(1, cfg.vocab_size, dtype=torch.bool, device=w.device)
    seen[0, [cfg.tts_codec_mask_token_id, cfg.tts_codec_pad_token_id, cfg.tts_codec_start_token_id]] = True
    return TalkerState(cache=cache, slot=slot, position=int(positions[0, -1]) + 1, eod=eod, pad=pad, seen=seen,
                       logits=logits)


def push(state: TalkerState, next_step: ThinkerStep | None) -> None:
    """Queue the next reply token's states; None: the reply has ended."""
    if state.reply_ended:
        raise ValueError("the reply already ended: push None once, after the last ThinkerStep")
    if next_step is None:
        state.reply_ended = True
    else:
        state.queue.append(next_step.embed + next_step.hidden)


def ready(state: TalkerState) -> bool:
    """Whether `step` can produce the next code without another ThinkerStep."""
    return not state.finished and (state.logits is not None or bool(state.queue) or state.reply_ended)


def _next_text(state: TalkerState) -> torch.Tensor | None:
    """The text side of the row that yields the next code's logits, or None if they are already there.

    Consumes the next reply token's states (or <tts_text_eod> once the reply ended, then <tts_pad>)
    and advances the position.
    """
    if state.finished:
        raise RuntimeError("the Talker already finished this utterance")
    if state.logits is not None:
        return None
    if state.queue:
        text = state.queue.popleft()
    elif state.reply_ended:
        text, state.eod_fed = (state.pad if state.eod_fed else state.eod), True
    else:
        raise RuntimeError("the Talker needs the next ThinkerStep (or None when the reply ended) first")
    state.position += 1
    return text


def _draw(talker: Talker, state: TalkerState, sampling: SamplingParams, generator: torch.Generator | None,
          min_codes: int) -> torch.Tensor:
    """Sample the next code from `state.logits` and mark it for the repetition penalty, on the device: (1,).

    The codes drawn so far are the codes read plus those unread: exact for min_codes unless one of them
    is the codec end, and then this code is dropped anyway."""
    state.last_logits, state.logits = state.logits, None
    logits = state.last_logits.float().clone()
    logits[:, talker.cfg.tts_codec_start_token_id] = float("-inf")
    if len(state.codes) + len(state.unread) < min_codes:
        for eos in talker.eos_ids:  # python indices: no index tensor to copy to the device
            logits[:, eos] = float("-inf")
    code = sample(logits, sampling, generator, state.seen)
    state.seen[0, code] = True  # only a codec end is marked that the host would not mark, and nothing follows it
    return code


@torch.inference_mode()
def step(talker: Talker, state: TalkerState, next_step: ThinkerStep | None | EllipsisType = ...,
         sampling: SamplingParams = TALKER_SAMPLING, generator: torch.Generator | None = None,
         min_codes: int = 0) -> int | None:
    """Push `next_step` (if given; None = reply ended) and return the next code, or None at codec eos.

    Code k needs reply token k's states, so a driver may call this once per arriving
    ThinkerStep (running one step behind the Thinker), or call it with no step whenever
    `ready(state)`. min_codes: eos is blocked until that many codes exist (talker_min_new_tokens).
    """
    if next_step is not ...:
        push(state, next_step)
    return step_batch(talker, [state], [sampling], [generator], min_codes)[0]


@torch.inference_mode()
def step_batch(talker: Talker, states: list[TalkerState], samplings: list[SamplingParams],
               generators: list[torch.Generator | None], min_codes: int | list[int] = 0) -> list[int | None]:
    """One code for each of several utterances (each `ready`), with one batched forward, read at once.

    All states must share one KV cache (their own slots in it). Equal, row by row, to calling
    `step` on each. min_codes: one for all, or one per state. (`draw_batch` then `read_codes`: this waits
    for the device; the engine reads a step later instead.)
    """
    draw_batch(talker, states, samplings, generators, min_codes)
    return [new[0] if new else None for new in read_codes(talker, states)]


@torch.inference_mode()
def draw_batch(talker: Talker, states: list[TalkerState], samplings: list[SamplingParams],
               generators: list[torch.Generator | None], min_codes: int | list[int] = 0) -> None:
    """Draw the next code of each state (each `ready`) with one batched forward, reading nothing back.

    Each state's row feeds its latest code from the device; the new codes are copied to the host without
    waiting and join each state's `unread`, for `read_codes`.
    """
    if not states:
        return
    mins = min_codes if isinstance(min_codes, list) else [min_codes] * len(states)
    texts, need = [], []
    for st in states:
        text = _next_text(st)
        if text is not None:
            texts.append(text)
            need.append(st)
    if need:
        w = talker.thinker_to_talker_proj.weight
        dev = w.device
        codec = talker.model.embed_tokens(torch.cat([st.code for st in need]))  # (B, D): the codes still on the device
        rows = torch.stack([t.to(dev, w.dtype) for t in texts]) + codec
        positions = to_device(torch.tensor([st.position - 1 for st in need]).view(1, -1, 1).expand(3, -1, -1), dev)
        slots = torch.tensor([st.slot for st in need])
        logits = talker(rows[:, None], positions, need[0].cache, slots, last_only=True)  # (B, V)
        for i, st in enumerate(need):
            st.logits = logits[i:i + 1]
    codes = [_draw(talker, st, sp, g, m) for st, sp, g, m in zip(states, samplings, generators, mins)]
    drawn = _Drawn(torch.cat(codes))
    for i, (st, code) in enumerate(zip(states, codes)):
        st.code = code
        st.unread.append((drawn, i))


def read_codes(talker: Talker, states: list[TalkerState], keep: int = 0) -> list[list[int]]:
    """Read each state's unread codes but its newest `keep`: the new codes of each, in order.

    A codec end finishes the state and is not returned; codes drawn after it are dropped. With keep=1
    after a `draw_batch`, only codes drawn by earlier steps are read: their copies were queued a step ago.
    """
    out = []
    for st in states:
        new = []
        while len(st.unread) > keep:
            drawn, i = st.unread.popleft()
            code = drawn.values()[i]
            if code in talker.eos_ids:
                st.finished = True
                st.unread.clear()
                break
            st.codes.append(code)
            new.append(code)
        out.append(new)
    return out


def generate_codes(talker: Talker, thinker_embed: nn.Embedding, prompt: PromptStates, steps: list[ThinkerStep],
                   voice_bos: int, max_codes: int = 4096, sampling: SamplingParams = TALKER_SAMPLING,
                   generator: torch.Generator | None = None, min_codes: int = 0, hf5: bool = False) -> list[int]:
    """All codes for a finished reply (steps: one ThinkerStep per reply token, in order).

    Drives the stepper one step behind, as a streaming engine would: code k is asked for
    when reply token k + 1 arrives.
    """
    if not steps:
        raise ValueError("the reply has no tokens: there is nothing for the Talker to say")
    state = start(talker, thinker_embed, prompt, voice_bos, steps[0], max_codes, hf5=hf5)
    arriving = [*steps[1:], None]  # None: the reply ended
    for k in range(max_codes):
        if step(talker, state, arriving[k] if k < len(arriving) else ..., sampling, generator, min_codes) is None:
            break
    return state.codes
