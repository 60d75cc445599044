"""`--greedy` means greedy speech too: `omni generate --greedy --speak` on the sharpened shared tiny checkpoint
gives the same codes whatever the seed, equal to transformers' generate with talker_do_sample=False (on the
talker's intended TMRoPE path, test_talker's "tmrope" reference), and the same waveform."""

from __future__ import annotations

import json
import wave

import numpy as np
import pytest

from omni.types import Message
from tests.test_cli import omni
from tests.test_talker import Setup

N_TEXT, N_CODES = 8, 60


@pytest.fixture(scope="module")
def setup(references, tmp_path_factory):
    ref, path = references("tiny")
    return Setup("tiny", ref, path, tmp_path_factory.mktemp("greedy_tiny"))


def generate(s: Setup, tmp_path, seed: int, greedy: bool = True):
    out = tmp_path / f"seed{seed}{'g' * greedy}.wav"
    args = ["generate", "Tell me a story.", "--model", str(s.path), "--speak", str(out), "--json", "--voice", "Chelsie",
            "--max-new-tokens", str(N_TEXT), "--max-audio-seconds", str(N_CODES / 50), "--seed", str(seed)]
    d = json.loads(omni(tmp_path, *args, *(["--greedy"] if greedy else [])).stdout)
    with wave.open(str(out)) as w:
        pcm = np.frombuffer(w.readframes(w.getnframes()), "<i2")
    return d, pcm


def test_greedy_speech_ignores_the_seed_and_equals_the_reference(setup, tmp_path):
    a, wave_a = generate(setup, tmp_path, seed=1)
    b, wave_b = generate(setup, tmp_path, seed=7)
    assert a["codec_ids"] and a["token_ids"] == b["token_ids"] and a["codec_ids"] == b["codec_ids"]
    assert np.array_equal(wave_a, wave_b)  # the vocoder's noise too: nothing depends on --seed

    prompt = setup.model.processor([Message.of("user", "Tell me a story.")])  # what the CLI sends
    want = setup._reference(restore_mask=True, prompt=prompt, n_text=N_TEXT, n_codes=N_CODES, min_codes=0,
                            voice="Chelsie")
    eos = set(setup.eos)
    codes = [c for c in want["codes"] if c not in eos]
    assert a["token_ids"] == [t for t in want["text"] if t not in setup.model.stop_ids]
    assert a["codec_ids"] == codes[:len(a["codec_ids"])] and len(a["codec_ids"]) == len(codes)


def test_sampled_speech_follows_the_seed(setup, tmp_path):
    """The twin: without --greedy the Talker samples, so another seed gives other codes."""
    a, _ = generate(setup, tmp_path, seed=1, greedy=False)
    b, _ = generate(setup, tmp_path, seed=7, greedy=False)
    assert a["codec_ids"] != b["codec_ids"]
