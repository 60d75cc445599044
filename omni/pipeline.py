"""One model, one turn: processor -> encoders -> Thinker (-> Talker -> Token2Wav), as events.

`OmniModel.load(dir)` builds every part on the meta device and loads the checkpoint
strictly. `generate_text` streams the Thinker's tokens for one prompt; it holds no state
between calls (the KV cache it allocates is its own).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from omni.cache import KVCache
from omni.config import OmniConfig, Token2WavConfig
from omni.models import ThinkerModel
from omni.processor import DEFAULT_SYSTEM_PROMPT, MediaOptions, Processor, Prompt
from omni.sampling import SamplingParams, sample
from omni.thinker import Thinker
from omni.types import PromptStates, ThinkerStep
from omni.weights import Checkpoint, empty_params, load_module
from talker.bigvgan import BigVGAN
from talker.dit import DiT, sample_mel
from talker import talker as talker_lib
from talker.talker import TALKER_GREEDY, TALKER_SAMPLING, Talker, generate_codes
from talker.token2wav import StreamOptions, Token2Wav, draw_stream_noise

SAMPLE_RATE = 24000  # Token2Wav output
# The system prompt speech output was trained with; another one may degrade the voice.
SPEECH_SYSTEM_PROMPT = (
    "You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of perceiving "
    "auditory and visual inputs, as well as generating text and speech."
)


def generators(seed: int | None, device: torch.device) -> tuple:
    """Independent seeded generators for the Thinker, the Talker and the Token2Wav noise.

    Separate streams make a streamed turn draw exactly what a one-shot turn draws, whatever
    order the stages interleave in. The noise generator lives on the CPU (drawn there, moved).
    """
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()).item())
    make = lambda dev, k: torch.Generator(device=dev).manual_seed(seed + k)  # noqa: E731
    return make(device, 0), make(device, 1), make("cpu", 2)


class SpeechError(ValueError):
    """Speech was asked for but cannot be made (no talker, no voices, unknown voice)."""


@dataclass(frozen=True)
class Voice:
    name: str
    cond: torch.Tensor  # (1, enc_emb_dim) speaker vector
    ref_mel: torch.Tensor  # (1, T, 80) reference mel
    bos_token: int  # the Talker's first codec token for this voice


def load_voices(path: Path) -> dict[str, Voice]:
    f = path / "spk_dict.pt"
    if not f.exists():
        raise SpeechError(f"{path}: no spk_dict.pt, so there are no voices to speak with")
    try:
        raw = torch.load(f, weights_only=True, map_location="cpu")
        return {name: Voice(name, v["cond"].float(), v["ref_mel"].float(), int(v["bos_token"]))
                for name, v in raw.items()}
    except Exception as e:  # a voice file we cannot read is a one-line error, whatever torch raised
        raise SpeechError(f"{f}: not a Qwen2.5-Omni voice file ({e})") from None


def load_token2wav(ckpt: Checkpoint, cfg: Token2WavConfig, device: torch.device,
                   options: StreamOptions = StreamOptions()) -> Token2Wav:
    """DiT and BigVGAN, always fp32 (the vocoder is sensitive to precision)."""
    with empty_params():
        dit, voc = DiT(cfg.dit_config), BigVGAN(cfg.bigvgan_config)
    load_module(dit, ckpt, "token2wav.code2wav_dit_model.", dtype=torch.float32, device=device)
    load_module(voc, ckpt, "token2wav.code2wav_bigvgan_model.", dtype=torch.float32, device=device)
    dit.fuse()
    return Token2Wav(dit, voc, options)


def default_dtype(device: str | torch.device) -> torch.dtype:
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


@dataclass
class TokenEvent:
    token_id: int
    text: str  # the new text this token completes (may be "" inside a multi-byte character)


@dataclass
class SpeechResult:
    codes: list[int]
    wave: torch.Tensor  # (samples,) float32 at 24 kHz
    sample_rate: int = SAMPLE_RATE


@dataclass
class GenerationResult:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    prompt_tokens: int = 0
    finish_reason: str = "length"  # stop | length
    timings: dict[str, float] = field(default_factory=dict)


class Speech:
    """Qwen2.5-Omni's speech part as the engine drives it (omni.models: "the speech part"): the Talker makes
    codec codes from the conversation's Thinker states, Token2Wav turns them into 24 kHz waves in windows.

    A conversation's speech is two states: the Talker's (`finished`, `codes` read so far, `unread` codes drawn
    and not read yet, `reset()`) and the vocoder's (`finished`); nothing per request lives here.
    """

    codec_hz = 50  # Talker codes per second of speech
    reads_thinker_states = True  # the Talker reads each reply token's Thinker embedding and hidden (once fed)
    sample_rate = SAMPLE_RATE

    def __init__(self, talker: Talker, token2wav: Token2Wav, thinker_embed: torch.nn.Embedding):
        self.talker, self.token2wav, self.thinker_embed = talker, token2wav, thinker_embed

    def allocate_cache(self, n_slots: int, max_context: int, max_codes: int) -> KVCache:
        """The Talker's KV rows: its prefill spans the conversation, then its codes."""
        return self.talker.model.allocate_cache(n_slots, max_context + 2 + max_codes)

    # What a conversation keeps for its later replies: every Thinker state (prompts and reply tokens), in order.

    @staticmethod
    def new_memory() -> list:
        return []

    @staticmethod
    def remember_prompt(memory: list, prompt: Prompt, embeds: torch.Tensor, hidden: torch.Tensor) -> list:
        memory.append((prompt.input_ids, embeds, hidden, prompt.positions))
        return memory

    @staticmethod
    def remember_token(memory: list, token: int, embed: torch.Tensor, hidden: torch.Tensor, position) -> list:
        memory.append((torch.tensor([token]), embed, hidden, position))
        return memory

    @staticmethod
    def talker_prompt(memory: list) -> PromptStates:
        return PromptStates(*(torch.cat(x, -1 if i == 3 else 0) for i, x in enumerate(zip(*memory))))

    def start(self, cache: KVCache, slot: int, history: PromptStates, voice: Voice, first: ThinkerStep,
              noise_generator: torch.Generator | None) -> tuple:
        """A reply's speech from its first token: (Talker state, vocoder state)."""
        state = talker_lib.start(self.talker, self.thinker_embed, history, voice.bos_token, first, cache=cache,
                                 slot=slot)
        return state, self.token2wav.start(voice.cond, voice.ref_mel, noise_generator)

    @staticmethod
    def push(state, step: ThinkerStep | None) -> None:
        """The next reply token's states (None: the reply's text has ended)."""
        talker_lib.push(state, step)

    @staticmethod
    def ready(state) -> bool:
        return talker_lib.ready(state)

    def step(self, states: list, samplings: list[SamplingParams], generators: list, min_codes: list[int]
             ) -> list[list[int]]:
        """One batched Talker step for every `ready` state, a step ahead of the host: each state's next code is
        drawn and fed to its next step on the device. Returns, per state, the codes the host learns now: those
        of the step before (read while the device works on this one). A codec end read finishes its state (and
        is not returned; the code drawn after it is dropped)."""
        talker_lib.draw_batch(self.talker, states, samplings, generators, min_codes)
        return talker_lib.read_codes(self.talker, states, keep=1)

    def read(self, states: list) -> list[list[int]]:
        """Per state, the codes drawn and not read yet (for states that did not step this time), as `step`."""
        return talker_lib.read_codes(self.talker, states)

    @staticmethod
    def codec_ids(state) -> list[int]:
        return list(state.codes)

    def add_codes(self, vstate, codes: list[int]) -> None:
        self.token2wav.add(vstate, codes)

    def codes_until_ready(self, vstate) -> int:
        """How many more codes the vocoder's next window needs (0: it can run now)."""
        return self.token2wav.codes_until_ready(vstate)

    def vocode(self, vstates: list) -> list[list[torch.Tensor]]:
        """Every ready window of several utterances, batched: each one's new final wave chunks."""
        return self.token2wav.advance(vstates)

    def move_vocoder(self, device: torch.device) -> None:
        """Token2Wav onto `device` (an engine's speech worker's); a voice goes there at each `start`."""
        self.token2wav.dit.to(device)
        self.token2wav.vocoder.to(device)


class OmniModel(ThinkerModel):
    family = "Qwen2.5-Omni"
    default_system_prompt = DEFAULT_SYSTEM_PROMPT  # the chat template's, when a conversation sets none
    speech_system_prompt = SPEECH_SYSTEM_PROMPT  # the one its voice was trained with
    think_ids = None  # no reasoning block
    default_voice = "Chelsie"
    captioner = False  # no captioning-only variant

    def __init__(self, path: Path, cfg: OmniConfig, thinker: Thinker, processor: Processor, device: torch.device,
                 dtype: torch.dtype, generation: dict, talker: Talker | None = None,
                 token2wav: Token2Wav | None = None, voices: dict[str, Voice] | None = None):
        self.path, self.cfg, self.thinker, self.processor = path, cfg, thinker, processor
        self.device, self.dtype = device, dtype
        self.generation = generation
        self.talker, self.token2wav, self.voices = talker, token2wav, voices or {}
        self.speech = Speech(talker, token2wav, thinker.model.embed_tokens) if talker is not None else None
        self.speech_error = None if talker is not None else f"{path}: this model cannot speak (speech output is not loaded)"
        tok = processor.tok
        self.stop_ids = {tok.token_id("<|im_end|>"), tok.token_id("<|endoftext|>")}

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", dtype: torch.dtype | None = None,
             options: MediaOptions = MediaOptions(), speech: bool | None = None,
             stream_options: StreamOptions = StreamOptions()) -> "OmniModel":
        """speech: True loads the Talker, Token2Wav and voices or fails; None loads them if present; False skips."""
        path = Path(path)
        cfg = OmniConfig.from_file(path)
        device_t = torch.device(device)
        dtype = dtype or default_dtype(device_t)
        ckpt = Checkpoint(path)
        with empty_params():
            thinker = Thinker(cfg.thinker_config)
        load_module(thinker, ckpt, "thinker.", dtype=dtype, device=device_t)
        thinker.fuse(cpu=device_t.type == "cpu")
        processor = Processor.from_dir(path, cfg.thinker_config, options)
        gen_file = path / "generation_config.json"
        generation = json.loads(gen_file.read_text()) if gen_file.exists() else {}
        talker = token2wav = voices = None
        has_speech = cfg.enable_audio_output and ckpt.has_prefix("talker.") and ckpt.has_prefix("token2wav.")
        if speech and not has_speech:
            raise SpeechError(f"{path}: this checkpoint has no talker/token2wav weights (or enable_audio_output "
                              "is false), so it cannot speak")
        if speech or (speech is None and has_speech and (path / "spk_dict.pt").exists()):
            voices = load_voices(path)
            with empty_params():
                talker = Talker(cfg.talker_config)
            load_module(talker, ckpt, "talker.", dtype=dtype, device=device_t)
            talker.fuse(cpu=device_t.type == "cpu")
            token2wav = load_token2wav(ckpt, cfg.token2wav_config, device_t, stream_options)
        return cls(path, cfg, thinker, processor, device_t, dtype, generation, talker, token2wav, voices)

    def voice(self, name: str | None) -> Voice:
        if self.speech is None:
            raise SpeechError(self.speech_error)
        name = name or (self.default_voice if self.default_voice in self.voices else next(iter(self.voices)))
        if name not in self.voices:
            raise SpeechError(f"unknown voice {name!r}; this checkpoint has: {', '.join(sorted(self.voices))}")
        return self.voices[name]

    def talker_sampling(self, greedy: bool = False) -> SamplingParams:
        """The Talker's sampling as the reference's generate does it (greedy: talker_do_sample=False)."""
        return TALKER_GREEDY if greedy else TALKER_SAMPLING

    # The interface the engine drives (omni.models; vocab_size, allocate_cache, decode, default_sampling are
    # ThinkerModel's).

    @staticmethod
    def decode_positions(next_positions: list[int]) -> torch.Tensor:
        """(3, B, 1) positions for one decode step of B conversations: each one's next position on all axes."""
        return torch.tensor(next_positions).view(1, -1, 1).expand(3, -1, -1)

    @torch.inference_mode()
    def prefill(self, prompt: Prompt, cache: KVCache, slot: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A turn's prompt into `slot` after what it holds: (embeds (1, L, D), hidden (1, L, D), last logits (1, V))."""
        embeds = self.embed_prompt(prompt)
        hidden = self.thinker(embeds, prompt.positions[:, None].to(self.device), cache, torch.tensor([slot]))
        return embeds, hidden, self.thinker.lm_head(hidden[:, -1])

    @torch.inference_mode()
    def embed_prompt(self, prompt: Prompt) -> torch.Tensor:
        """Token embeddings with encoder outputs in place: (1, L, D)."""
        th, dev = self.thinker, self.device
        image = video = audio = None
        if prompt.pixel_values is not None:
            image = th.encode_images(prompt.pixel_values.to(dev), prompt.image_grid_thw.to(dev))
        if prompt.pixel_values_videos is not None:
            video = th.encode_images(prompt.pixel_values_videos.to(dev), prompt.video_grid_thw.to(dev))
        if prompt.audio_features is not None:
            audio = th.encode_audio(prompt.audio_features.to(dev), prompt.audio_feature_lens.to(dev))
        return th.embed(prompt.input_ids[None].to(dev), image, video, audio)

    @torch.inference_mode()
    def generate_text(self, prompt: Prompt, max_new_tokens: int = 256, sampling: SamplingParams | None = None,
                      generator: torch.Generator | None = None, result: GenerationResult | None = None,
                      states: bool = False) -> Iterator[TokenEvent | PromptStates | ThinkerStep]:
        """Stream the Thinker's reply to `prompt`; fills `result` (if given) as it goes.

        With `states`, also yields PromptStates first and a ThinkerStep for every reply token
        once it has been fed back: what the Talker consumes.
        """
        sampling = sampling or self.default_sampling()
        result = result if result is not None else GenerationResult()
        result.prompt_tokens = len(prompt)
        th, dev = self.thinker, self.device
        t0 = time.perf_counter()
        cache = th.model.allocate_cache(1, len(prompt) + max_new_tokens)
        slots = torch.zeros(1, dtype=torch.long)
        embeds = self.embed_prompt(prompt)
        t_enc = time.perf_counter()
        hidden = th(embeds, prompt.positions[:, None].to(dev), cache, slots)
        if states:
            yield PromptStates(prompt.input_ids, embeds[0], hidden[0], prompt.positions)
        logits = th.lm_head(hidden[:, -1])
        seen = torch.zeros(1, logits.shape[-1], dtype=torch.bool, device=dev)
        seen[0, prompt.input_ids.to(dev)] = True
        decoder = _Detokenizer(self.processor.tok)
        pos = prompt.next_position
        t_first = None
        for step in range(max_new_tokens):
            token = sample(logits, sampling, generator, seen)
            tid = int(token)
            if t_first is None:
                t_first = time.perf_counter()
            if tid in self.stop_ids:
                result.finish_reason = "stop"
                break
            seen[0, tid] = True
            result.token_ids.append(tid)
            piece = decoder.push(tid)
            result.text += piece
            yield TokenEvent(tid, piece)
            if step == max_new_tokens - 1:
                break
            positions = torch.full((3, 1, 1), pos, dtype=torch.long, device=dev)
            pos += 1
            embed = th.model.embed_tokens(token.view(1, 1))
            hidden = th(embed, positions, cache, slots)
            if states:
                yield ThinkerStep(tid, embed[0, 0], hidden[0, 0])
            logits = th.lm_head(hidden[:, -1])
        t_end = time.perf_counter()
        n = len(result.token_ids)
        result.timings = {
            "encode_s": round(t_enc - t0, 4),
            "time_to_first_token_s": round((t_first or t_end) - t0, 4),
            "total_s": round(t_end - t0, 4),
            "decode_tokens_per_s": round((n - 1) / (t_end - t_first), 2) if t_first and n > 1 and t_end > t_first else 0.0,
        }


    @torch.inference_mode()
    def speak(self, prompt: Prompt, voice: str | None = None, max_new_tokens: int = 256,
              sampling: SamplingParams | None = None, talker_sampling: SamplingParams = TALKER_SAMPLING,
              seed: int | None = None, max_codes: int = 4096, min_codes: int = 0,
              result: GenerationResult | None = None) -> SpeechResult:
        """Text and speech for one prompt, one stage after the other (no streaming): the reference path.

        Draws exactly what the streaming engine draws for the same seed (same generators, same
        noise pieces), so the two can be compared.
        """
        v = self.voice(voice)
        g_text, g_talk, g_noise = generators(seed, self.device)
        prompt_states, steps = None, []
        for ev in self.generate_text(prompt, max_new_tokens, sampling, g_text, result, states=True):
            if isinstance(ev, PromptStates):
                prompt_states = ev
            elif isinstance(ev, ThinkerStep):
                steps.append(ev)
        if not steps:
            return SpeechResult([], torch.zeros(0))
        codes = generate_codes(self.talker, self.thinker.model.embed_tokens, prompt_states, steps, v.bos_token,
                               max_codes, talker_sampling, g_talk, min_codes)
        if not codes:
            return SpeechResult([], torch.zeros(0))
        t2w = self.token2wav
        o, dit = t2w.opt, t2w.dit
        frames = dit.cfg.repeats * len(codes)
        noise = draw_stream_noise(g_noise, frames, dit.cfg.mel_dim, dit.cfg.repeats * o.chunk_codes)
        dev = dit.proj_out.weight.device
        mel = sample_mel(dit, torch.tensor([codes], device=dev), v.ref_mel.to(dev), v.cond.to(dev), steps=o.steps,
                         guidance_scale=o.guidance_scale, sway=o.sway, noise=noise.to(dev))
        return SpeechResult(codes, t2w.vocoder(mel)[0].cpu())


class _Detokenizer:
    """Incremental decoding that never splits a multi-byte character."""

    def __init__(self, tok):
        self.tok, self.ids, self.emitted = tok, [], ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        piece, self.emitted = text[len(self.emitted):], text
        return piece
