"""Sampling against transformers' logits processors (the same distribution), and seeding."""

import pytest
import torch

from omni.sampling import SamplingParams, candidates, sample


def reference_probs(logits, seen_ids, p: SamplingParams):
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

    x = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(seen_ids, logits.clone())
    x = TemperatureLogitsWarper(p.temperature)(seen_ids, x)
    if p.top_k:
        x = TopKLogitsWarper(p.top_k)(seen_ids, x)
    if p.top_p < 1:
        x = TopPLogitsWarper(p.top_p)(seen_ids, x)
    return x.softmax(-1)


@pytest.mark.parametrize("p", [
    SamplingParams(temperature=0.9, top_k=40, top_p=0.8, repetition_penalty=1.05),  # the talker's defaults
    SamplingParams(temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.05),
    SamplingParams(temperature=1.3, top_k=0, top_p=0.5, repetition_penalty=1.2),
    SamplingParams(temperature=1.0, top_k=5, top_p=1.0),
])
def test_distribution_matches_transformers(p):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 500, generator=g) * 4
    seen_ids = torch.randint(0, 500, (3, 30), generator=g)
    seen = torch.zeros(3, 500, dtype=torch.bool).scatter_(1, seen_ids, True)
    want = reference_probs(logits, seen_ids, p)
    probs, idx = candidates(logits, p, seen)
    got = torch.zeros_like(want).scatter_(1, idx, probs)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_seeded_sampling_is_reproducible_and_greedy_is_argmax():
    logits = torch.randn(2, 1000, generator=torch.Generator().manual_seed(1))
    p = SamplingParams(temperature=1.0, top_k=50, top_p=0.9)
    a = [sample(logits, p, torch.Generator().manual_seed(5)).tolist() for _ in range(2)]
    assert a[0] == a[1]
    draws = {tuple(sample(logits, p, torch.Generator().manual_seed(s)).tolist()) for s in range(20)}
    assert len(draws) > 1
    assert sample(logits, SamplingParams(greedy=True)).tolist() == logits.argmax(-1).tolist()
