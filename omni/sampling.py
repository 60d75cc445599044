"""Token sampling: repetition penalty, temperature, top-k, top-p, with an explicit generator.

The order and the arithmetic follow transformers' logits processors (repetition penalty,
then temperature, top-k, top-p), so a seeded run is comparable with the reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # <= 0 or greedy=True: argmax
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    repetition_penalty: float = 1.0  # 1.0: off; applied to tokens already in the sequence
    greedy: bool = False

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature <= 0


GREEDY = SamplingParams(greedy=True)


def from_generation_config(g: dict, greedy: bool = False) -> SamplingParams:
    """A checkpoint's generation_config.json settings (Qwen's usual chat ones where it is silent), or greedy."""
    if greedy:
        return GREEDY
    return SamplingParams(temperature=float(g.get("temperature", 0.7)), top_k=int(g.get("top_k", 20)),
                          top_p=float(g.get("top_p", 0.8)), repetition_penalty=float(g.get("repetition_penalty", 1.05)))


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits (B, V); seen (B, V) bool: tokens present in each sequence."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def candidates(logits: torch.Tensor, p: SamplingParams, seen: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The sampling distribution: (probs (B, k), token ids (B, k)), most likely first.

    Top-k runs first and top-p then looks only at the k survivors (as transformers' warpers
    do, since top-k leaves the rest at -inf), so a step costs a top-k, not a full-vocabulary sort.
    """
    logits = logits.float()
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, p.repetition_penalty)
    logits = logits / p.temperature
    k = p.top_k if 0 < p.top_k < logits.shape[-1] else logits.shape[-1]
    vals, idx = torch.topk(logits, k, dim=-1)  # (B, k) descending
    if p.top_p < 1.0:
        probs = vals.softmax(-1)
        above = probs.cumsum(-1) - probs  # mass strictly more likely than each candidate
        drop = above >= p.top_p
        drop[..., 0] = False  # keep at least one
        vals = vals.masked_fill(drop, float("-inf"))
    return vals.softmax(-1), idx


def sample(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None = None,
           seen: torch.Tensor | None = None) -> torch.Tensor:
    """logits (B, V) -> token ids (B,); `seen` (B, V) bool marks tokens for the repetition penalty."""
    if p.is_greedy:
        logits = logits.float()
        if seen is not None:
            logits = apply_repetition_penalty(logits, seen, p.repetition_penalty)
        return logits.argmax(-1)
    probs, idx = candidates(logits, p, seen)
    choice = torch.multinomial(probs, 1, generator=generator)  # (B, 1)
    return idx.gather(-1, choice).squeeze(-1)
