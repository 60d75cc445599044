"""The model families omni serves, chosen by `config.json`'s `model_type`.

Each family's model object offers the interface the engine drives (`vocab_size`, `allocate_cache`,
`prefill`, `decode`, its processor, stop ids, sampling defaults, and its speech part or None); servers,
the web demo, jobs and the CLI load a model only through `load_model` and never name a family.
"""

from __future__ import annotations

from pathlib import Path

from omni.config import ConfigError, read_config

FAMILIES = {
    "qwen2_5_omni": "Qwen2.5-Omni",
    "qwen3_omni_moe": "Qwen3-Omni",
}


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
