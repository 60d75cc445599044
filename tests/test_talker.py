"""The Talker stepper against transformers' Qwen2_5OmniForConditionalGeneration.generate (audio out).

Each config's shared reference is deep-copied and its talker, token2wav and the thinker's
<tts_text_eod>/<tts_pad> embedding rows are sharpened (`_sharpen_talker`, test_token2wav's
`_sharpen_token2wav`): with the default init the greedy talker ignores positions, the prefill and
eod-vs-pad, and the waveform is near silence, so planted bugs could not show. The copy is saved
to its own directory; our side loads it strictly.

Two references per config (talker.py, HF5_NOTE): "tmrope" = generate with the attention mask
handed back to the talker's forward, so it runs its own TMRoPE + codec bos/pad prefill (our
default); "hf5" = transformers 5.23's generate untouched (our `hf5=True`).

Thinker states come from our Thinker (OmniModel.generate_text(states=True)), which is
parity-tested on its own; the talker is driven one step behind it, as the engine will.
Tolerances (fp32 CPU): talker logits atol 1e-4 rtol 1e-4 (the Thinker's state tolerance;
measured max |diff| 2e-6..1e-4 on logits of magnitude 20-40); waveform atol 1e-5 rtol 1e-5
(measured max |diff| ~1.4e-6 on waves of std 0.3-0.4).
"""

from __future__ import annotations

import copy
import functools
import shutil

import pytest
import torch

from omni.pipeline import OmniModel
from omni.sampling import GREEDY, apply_repetition_penalty
from omni.types import PromptStates, ThinkerStep
from omni.weights import load_module
from talker.bigvgan import BigVGAN
from talker.dit import DiT, sample_mel
from talker.talker import (TALKER_GREEDY, TALKER_SAMPLING, Talker, generate_codes, prefill_inputs, push, ready,
                           start, step)
from tests.test_thinker import mixed_inputs, reference_kwargs
from tests.test_token2wav import _sharpen_token2wav

torch.set_num_threads(1)

# Talker logits of magnitude 0.1-40, fed by our Thinker's states: its CPU layout (gate/up and head
# weights stored transposed) sums in another order than transformers, which the sharpened weights
# carry here as up to ~3e-4 (1e-4 with the reference's layout). Greedy codes must still be identical.
TOL = dict(atol=5e-4, rtol=5e-4)
WAVE_TOL = dict(atol=1e-5, rtol=1e-5)
N_TEXT = 10  # thinker tokens: 9 ThinkerSteps reach the talker (the last is never fed)
N_CODES = 24  # runs well past the reply's end: eod, then pads
VOICE = "Chelsie"


@torch.no_grad()
def _sharpen_talker(talker, g: torch.Generator) -> None:
    """Make codes depend on positions, the prompt and their own history, not only on the current row.

    With the default init the projected thinker state swamps the attention output, so wrong
    positions or missing codec embeddings in the prefill flip no code; q/k x20 and v/o x10 with a
    unit-scale projection make attention matter (measured: 1-D prompt positions flip 24/24 codes
    at tiny instead of 0/24).
    """
    for layer in talker.model.layers:
        att = layer.self_attn
        att.q_proj.weight.mul_(20)
        att.k_proj.weight.mul_(20)
        att.v_proj.weight.mul_(10)
        att.o_proj.weight.mul_(10)
        att.q_proj.bias.normal_(0, 0.5, generator=g)
        att.k_proj.bias.normal_(0, 0.5, generator=g)
        layer.input_layernorm.weight.normal_(1.0, 0.3, generator=g)
    talker.model.embed_tokens.weight.normal_(0, 0.3, generator=g)
    talker.thinker_to_talker_proj.weight.normal_(0, 1 / talker.thinker_to_talker_proj.in_features**0.5, generator=g)
    talker.codec_head.weight.normal_(0, 1.0, generator=g)
    talker.model.norm.weight.normal_(1.0, 0.3, generator=g)


class Setup:
    """A sharpened copy of the reference and our parts loaded from its directory."""

    def __init__(self, name, ref, path, out):
        ref = copy.deepcopy(ref)
        _sharpen_talker(ref.talker, torch.Generator().manual_seed(11))
        with torch.no_grad():  # <tts_text_eod> and <tts_pad> as distinct as trained ones (never in our prompts)
            tc = ref.config.talker_config
            emb = ref.thinker.get_input_embeddings().weight
            emb[[tc.tts_text_end_token_id, tc.tts_text_pad_token_id]] = torch.randn(
                2, emb.shape[1], generator=torch.Generator().manual_seed(13))
        mel_dim = ref.config.token2wav_config.dit_config.mel_dim
        _sharpen_token2wav(ref.token2wav, torch.Generator().manual_seed(12), mel_dim)
        ref.save_pretrained(out)
        for f in path.iterdir():
            if not (out / f.name).exists():
                shutil.copy(f, out / f.name)
        ref.load_speakers(out / "spk_dict.pt")
        self.name, self.ref, self.path = name, ref, out
        self.model = OmniModel.load(out)
        cfg = self.model.cfg
        self.talker = load_module(Talker(cfg.talker_config), out, "talker.")
        self.dit = load_module(DiT(cfg.token2wav_config.dit_config), out, "token2wav.code2wav_dit_model.")
        self.voc = load_module(BigVGAN(cfg.token2wav_config.bigvgan_config), out, "token2wav.code2wav_bigvgan_model.")
        self.voices = torch.load(out / "spk_dict.pt", weights_only=True)
        self.embed = self.model.thinker.model.embed_tokens
        self.prompt = mixed_inputs(self.model, seed=1)
        events = list(self.model.generate_text(self.prompt, max_new_tokens=N_TEXT, sampling=GREEDY, states=True))
        self.states: PromptStates = events[0]
        self.steps: list[ThinkerStep] = [e for e in events if isinstance(e, ThinkerStep)]
        # "tmrope": the talker's own TMRoPE path (mask handed back to its forward); "hf5": 5.x generate as is
        self.want = {"tmrope": self._reference(restore_mask=True), "hf5": self._reference(restore_mask=False)}

    @property
    def eos(self):
        return list(self.talker.eos_ids)

    def _reference(self, restore_mask: bool, seed: int = 5, prompt=None, n_text: int = N_TEXT,
                   n_codes: int = N_CODES, min_codes: int = N_CODES, voice: str = VOICE) -> dict:
        """transformers' generate with audio out, greedy; captures talker logits and codes.

        transformers 5.x drops the all-ones attention mask inside generate, and without one the
        talker skips get_rope_index (talker.py, HF5_NOTE). restore_mask hands an all-ones
        mask back to the talker's forward, so the reference runs its own TMRoPE code.
        """
        ref, talker = self.ref, self.ref.talker
        logits, codes = [], {}
        hook = talker.codec_head.register_forward_hook(lambda m, i, o: logits.append(o[0].detach().clone()))
        orig_generate, orig_forward = talker.generate, talker.forward

        def capture(*a, **k):
            codes["out"] = orig_generate(*a, **k)
            return codes["out"]

        @functools.wraps(orig_forward)
        def forward(*a, attention_mask=None, past_key_values=None, **k):
            if attention_mask is None:
                x = k["inputs_embeds"] if k.get("inputs_embeds") is not None else k["input_ids"]
                past = past_key_values.get_seq_length() if past_key_values is not None else 0
                attention_mask = torch.ones(x.shape[0], past + x.shape[1], dtype=torch.long)
            return orig_forward(*a, attention_mask=attention_mask, past_key_values=past_key_values, **k)

        talker.generate = capture
        if restore_mask:
            talker.forward = forward
        talker.rope_deltas = None
        prompt = prompt or self.prompt
        kw = reference_kwargs(prompt)
        for key in ("pixel_values", "pixel_values_videos"):
            if key in kw:
                kw[f"thinker_{key}"] = kw.pop(key)
        stop = sorted(self.model.stop_ids)
        try:
            torch.manual_seed(seed)  # token2wav draws its initial noise from the global RNG
            with torch.no_grad():
                seq, wav = ref.generate(
                    **kw, generation_mode="audio", speaker=voice, thinker_max_new_tokens=n_text,
                    thinker_do_sample=False, thinker_eos_token_id=stop, talker_do_sample=False,
                    talker_max_new_tokens=n_codes, talker_min_new_tokens=min_codes, talker_eos_token_id=self.eos)
        finally:
            hook.remove()
            del talker.generate
            if restore_mask:
                del talker.forward
        L = len(prompt)
        return dict(text=seq[0, L:].tolist(), codes=codes["out"][0, L + 2:].tolist(), wave=wav,
                    prefill=logits[0], step_logits=torch.cat([logits[0][-1:]] + logits[1:]), seed=seed)

    def codes(self, states=None, steps=None, **kw):
        kw = dict(max_codes=N_CODES, sampling=TALKER_GREEDY, min_codes=N_CODES) | kw
        return generate_codes(self.talker, self.embed, states or self.states, self.steps if steps is None else steps,
                              self.voices[VOICE]["bos_token"], **kw)


@pytest.fixture(scope="module")
def setups(tmp_path_factory, request):
    references = request.getfixturevalue("references")
    cache = {}

    def get(name):
        if name not in cache:
            ref, path = references(name)
            cache[name] = Setup(name, ref, path, tmp_path_factory.mktemp(f"talker_{name}"))
        return cache[name]

    return get


@pytest.fixture
def s(setups, config_name) -> Setup:
    return setups(config_name)


MODES = pytest.mark.parametrize("mode", ["tmrope", "hf5"])


def _run_logged(s: Setup, states=None, steps=None, tamper=None, hf5=False):
    """Drive the stepper greedily one step behind; returns (codes, logits (n, V) each code was drawn from)."""
    steps = s.steps if steps is None else steps
    st = start(s.talker, s.embed, states or s.states, s.voices[VOICE]["bos_token"], steps[0], N_CODES, hf5=hf5)
    if tamper:
        tamper(st)
    logits, arriving = [], [*steps[1:], None]
    for k in range(N_CODES):
        nxt = arriving[k] if k < len(arriving) else ...
        assert step(s.talker, st, nxt, TALKER_GREEDY, min_codes=N_CODES) is not None
        logits.append(st.last_logits[0])
    return st.codes, torch.stack(logits)


def _greedy_margin(s: Setup, logits: torch.Tensor, codes: list[int]) -> float:
    """Smallest top-2 gap of the logits greedy decoding actually compares (penalised, bos suppressed)."""
    cfg = s.talker.cfg
    seen = torch.zeros(logits.shape, dtype=torch.bool)
    seen[:, [cfg.tts_codec_mask_token_id, cfg.tts_codec_pad_token_id, cfg.tts_codec_start_token_id]] = True
    for k, c in enumerate(codes):
        seen[k + 1:, c] = True
    x = apply_repetition_penalty(logits.float(), seen, TALKER_GREEDY.repetition_penalty)
    x[:, cfg.tts_codec_start_token_id] = float("-inf")
    top2 = x.topk(2, -1).values
    return (top2[:, 0] - top2[:, 1]).min().item()


def test_thinker_reply_matches_reference(s):
    """Precondition for the rest: same greedy text, and a reply short enough that eod and pads are reached."""
    for want in s.want.values():
        # every sampled token but the last (the stop token, or the one that hit the limit) is fed back
        assert [x.token_id for x in s.steps] == want["text"][:-1]
    assert 3 <= len(s.steps) < N_CODES - 3


@MODES
def test_logits_match_reference(s, mode):
    """(a) prefill logits at every row, then the logits of every code, for the same thinker states."""
    want, seq = s.want[mode], mode == "hf5"
    rows, positions = prefill_inputs(s.talker, s.embed, s.states, s.voices[VOICE]["bos_token"], s.steps[0], seq)
    cache = s.talker.model.allocate_cache(1, rows.shape[0])
    with torch.inference_mode():
        prefill = s.talker(rows[None], positions[:, None], cache, torch.zeros(1, dtype=torch.long))[0]
    torch.testing.assert_close(prefill, want["prefill"], **TOL)
    codes, logits = _run_logged(s, hf5=seq)
    assert codes == want["codes"]
    torch.testing.assert_close(logits, want["step_logits"], **TOL)
    assert _greedy_margin(s, logits, codes) > 10 * TOL["atol"], "greedy codes too close to a tie to compare"


@MODES
def test_greedy_codes_match_reference(s, mode):
    """(b) greedy codes equal transformers', whether the thinker steps arrive one behind or all at once."""
    seq = mode == "hf5"
    codes = s.codes(hf5=seq)
    assert codes == s.want[mode]["codes"]
    assert len(set(codes[len(s.steps):])) > 2, "talker repeats itself after the reply: sharpen it more"
    st = start(s.talker, s.embed, s.states, s.voices[VOICE]["bos_token"], s.steps[0], N_CODES, hf5=seq)
    assert step(s.talker, st, sampling=TALKER_GREEDY, min_codes=N_CODES) == codes[0]  # code 0 needs no later step
    for x in s.steps[1:]:
        push(st, x)
    push(st, None)
    while len(st.codes) < N_CODES and ready(st):
        step(s.talker, st, sampling=TALKER_GREEDY, min_codes=N_CODES)
    assert st.codes == codes
    with pytest.raises(ValueError, match="already ended"):
        push(st, None)
    st.reset()
    assert st.finished and not st.codes and int(st.cache.lengths[st.slot]) == 0
    # a slot of a shared pool (slot 1 of 2, slot 0 busy with another utterance) gives the same codes
    pool = s.talker.model.allocate_cache(2, len(s.prompt) + 1 + N_CODES)
    other = start(s.talker, s.embed, s.states, s.voices[VOICE]["bos_token"], s.steps[1], N_CODES, pool, 0, hf5=not seq)
    for x in [*s.steps[2:], None]:
        push(other, x)
    st = start(s.talker, s.embed, s.states, s.voices[VOICE]["bos_token"], s.steps[0], N_CODES, pool, 1, hf5=seq)
    for x in [*s.steps[1:], None]:
        step(s.talker, other, sampling=TALKER_GREEDY, min_codes=N_CODES)
        step(s.talker, st, x, sampling=TALKER_GREEDY, min_codes=N_CODES)
    while len(st.codes) < N_CODES:
        step(s.talker, st, sampling=TALKER_GREEDY, min_codes=N_CODES)
    assert st.codes == codes


@MODES
def test_end_to_end_text_codes_wave(s, mode):
    """(c) image + audio + video prompt: greedy text, greedy codes and the waveform equal generate's."""
    want = s.want[mode]
    assert [x.token_id for x in s.steps] == want["text"][: len(s.steps)]
    codes = s.codes(hf5=mode == "hf5")
    assert codes == want["codes"]
    v = s.voices[VOICE]
    torch.manual_seed(want["seed"])  # same global-RNG noise as the reference
    mel = sample_mel(s.dit, torch.tensor([codes]), v["ref_mel"].float(), v["cond"].float())
    with torch.no_grad():
        wave = s.voc(mel)[0]
    assert wave.shape == want["wave"].shape == (len(codes) * 2 * 240,)
    torch.testing.assert_close(wave, want["wave"], **WAVE_TOL)
    assert want["wave"].std() > 0.05, "reference waveform too quiet for the comparison to mean much"
    g = torch.Generator().manual_seed(want["seed"])  # the explicit generator draws the same noise
    with torch.no_grad():
        mel_g = sample_mel(s.dit, torch.tensor([codes]), v["ref_mel"].float(), v["cond"].float(), generator=g)
        wave_g = s.voc(mel_g)[0]
    torch.testing.assert_close(wave_g, want["wave"], **WAVE_TOL)


def test_modes_differ(s):
    """The intended inputs and 5.x's (HF5_NOTE) give different codes: the parity tests above can tell them apart."""
    assert s.want["tmrope"]["codes"] != s.want["hf5"]["codes"]


def test_planted_bugs_change_codes(s):
    """(d) each planted bug flips greedy codes and moves logits far beyond the tolerance."""
    base_codes, base = _run_logged(s)
    assert base_codes == s.want["tmrope"]["codes"]

    def far(codes, logits, first_code=0, must_flip=True):
        flips = sum(a != b for a, b in zip(codes, base_codes))
        d = (logits[first_code:] - base[first_code:]).abs().max().item()
        print(f"{s.name}: {flips}/{len(codes)} codes flipped, max |dlogit| {d:.3g}")
        assert d > 1e3 * TOL["atol"] and (flips > 0 or not must_flip)

    # thinker states shifted by one step: token k's embedding with token k-1's hidden state
    shifted = [ThinkerStep(x.token_id, x.embed, prev.hidden) for prev, x in zip(s.steps, s.steps[1:])]
    far(*_run_logged(s, steps=[ThinkerStep(s.steps[0].token_id, s.steps[0].embed, s.states.hidden[-1])] + shifted))
    # the reply's states one token late (as if the first ThinkerStep were dropped)
    far(*_run_logged(s, steps=s.steps[1:]))
    # plain 1-D positions for the prompt instead of TMRoPE (the reply then starts at L, not max + 1)
    L = len(s.prompt)
    plain = PromptStates(s.states.input_ids, s.states.embeds, s.states.hidden, torch.arange(L).expand(3, L))
    far(*_run_logged(s, states=plain))
    # decode positions off by one after the prefill
    far(*_run_logged(s, tamper=lambda st: setattr(st, "position", st.position + 1)), first_code=1)
    # no <tts_text_eod>: straight to <tts_pad> when the reply ends; codes before that are untouched
    codes, logits = _run_logged(s, tamper=lambda st: setattr(st, "eod", st.pad))
    n = len(s.steps)
    assert codes[:n] == base_codes[:n]
    far(codes, logits, first_code=n)
    # multimodal placeholders not zeroed in the prompt's text side (the hidden states dominate those rows,
    # so this one moves logits by 2-10 but may flip no greedy code)
    unmasked = PromptStates(torch.zeros(L, dtype=torch.long), s.states.embeds, s.states.hidden, s.states.positions)
    far(*_run_logged(s, states=unmasked), must_flip=False)


def test_sampling_is_seeded_and_stops_at_eos(s):
    """Default sampling with an explicit generator is reproducible; a sampled eos ends the utterance."""
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    a = s.codes(sampling=TALKER_SAMPLING, min_codes=0, generator=g())
    assert a == s.codes(sampling=TALKER_SAMPLING, min_codes=0, generator=g())
    assert a != s.codes(sampling=TALKER_SAMPLING, min_codes=0, generator=torch.Generator().manual_seed(4))
    # a talker whose end code outscores the greedy code at row 8 (and maybe earlier): with eos blocked for 5
    # codes it must stop between 5 and 8 codes, the codes before unchanged
    base = s.want["tmrope"]["codes"]
    talker = copy.deepcopy(s.talker)
    with torch.no_grad():
        w = talker.codec_head.weight
        w[talker.cfg.tts_codec_end_token_id] = 3 * w[base[8]]
    codes = generate_codes(talker, s.embed, s.states, s.steps, s.voices[VOICE]["bos_token"], N_CODES, TALKER_GREEDY,
                           min_codes=5)
    assert 5 <= len(codes) <= 8 and codes == base[: len(codes)]
    assert generate_codes(talker, s.embed, s.states, s.steps, s.voices[VOICE]["bos_token"], N_CODES, TALKER_GREEDY,
                          min_codes=N_CODES) == base  # eos blocked: the same codes up to the limit
