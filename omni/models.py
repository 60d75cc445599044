"""The model families omni serves, chosen by `config.json`'s `model_type`.

Each family's model object offers the interface the engine drives, and nothing above the engine reaches
further in:
- the Thinker: `vocab_size`, `allocate_cache(n_slots, max_len)`, `prefill(prompt, cache, slot)` (a turn into a
  conversation's slot after what it holds), `decode(tokens, positions, cache, slots)` (one batched step over
  many conversations), `decode_positions(next_positions)`, its `processor`, `stop_ids`, `think_ids` (a
  reasoning block's markers, or None), `default_sampling(greedy)`;
- the speech part, `speech` (None when the checkpoint cannot speak, `speech_error` then says why):
  `codec_hz`, `sample_rate`, `reads_thinker_states` (whether `start`/`push` need a token's Thinker states,
  known once it is fed back, or just its id, known once sampled), `allocate_cache`, `start` (a reply's
  speech from its first token), `push`, `ready`, `step` (one batched codec step, a step ahead of the host:
  it returns each state's codes the host learns now, the step before's), `read` (the codes still in flight
  of states that did not step), `codec_ids`, `add_codes`, `codes_until_ready`, `vocode` (batched vocoder
  windows; the engine may run them on a worker of their own), `move_vocoder(device)`, and what a conversation keeps for later replies: `new_memory`, `remember_prompt` (a prefilled
  turn), `remember_token` (a reply token), `talker_prompt` (what `start` reads); a codec state has
  `finished`, `codes` (read) and `unread` (drawn, in flight: `len` of it); with `voice(name)`, `voices`,
  `default_voice` and `talker_sampling(greedy)` on the model;
- and what the servers show: `family`, `path`, `default_system_prompt`, `speech_system_prompt`, `captioner`.
Servers, the web demo, jobs and the CLI load a model only through `load_model` and never name a family.
"""

from __future__ import annotations

from pathlib import Path

import torch

from omni.config import ConfigError, read_config
from omni.sampling import SamplingParams, from_generation_config

FAMILIES = {
    "qwen2_5_omni": "Qwen2.5-Omni",
    "qwen3_omni_moe": "Qwen3-Omni",
}


class ThinkerModel:
    """What every family's model shares: a Thinker at `thinker` (its decoder `thinker.model`, `thinker.lm_head`),
    `cfg.thinker_config`, `generation` (generation_config.json). A conversation is a slot of a KV cache the
    model allocates; a turn is prefilled into its slot (the family's `prefill`); one decode step runs many."""

    def default_sampling(self, greedy: bool = False) -> SamplingParams:
        """The checkpoint's generation_config.json, else Qwen's usual chat settings; or greedy."""
        return from_generation_config(self.generation, greedy)

    @property
    def vocab_size(self) -> int:
        return self.cfg.thinker_config.text_config.vocab_size

    def allocate_cache(self, n_slots: int, max_len: int):
        return self.thinker.model.allocate_cache(n_slots, max_len)

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, cache, slots: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One step of B conversations: tokens (B, 1) at positions (3, B, 1) -> (embeds, hidden, logits (B, V))."""
        th = self.thinker
        embeds = th.model.embed_tokens(tokens)
        hidden = th(embeds, positions, cache, slots)
        return embeds, hidden, th.lm_head(hidden[:, -1])


def model_type(path: str | Path) -> str:
    d = read_config(path)
    if not isinstance(d, dict):
        raise ConfigError(f"{path}/config.json: not a JSON object")
    kind = d.get("model_type")
    if kind not in FAMILIES:
        raise ConfigError(f"{path}/config.json: model_type {kind!r} is not one omni serves "
                          f"({', '.join(f'{k} ({v})' for k, v in FAMILIES.items())})")
    return kind


def is_captioner(path: str | Path) -> bool:
    """Whether the checkpoint is a captioning-only model, which takes an audio-only user turn (no instruction).

    Nothing in config.json marks Qwen3-Omni-30B-A3B-Captioner (model_type and architecture as the others'):
    its repository's name does."""
    return model_type(path) == "qwen3_omni_moe" and "captioner" in Path(path).absolute().name.lower()


def load_model(path: str | Path, device: str = "cpu", **kwargs):
    """The checkpoint at `path` loaded on `device` as its family's model (keyword options as the family's `load`)."""
    kind = model_type(path)
    if kind == "qwen2_5_omni":
        from omni.pipeline import OmniModel

        return OmniModel.load(path, device=device, **kwargs)
    from omni.qwen3_omni_model import Qwen3OmniModel

    return Qwen3OmniModel.load(path, device=device, **kwargs)
