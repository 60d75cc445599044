"""The model families omni serves, chosen by `config.json`'s `model_type`.

Each family's model object offers the interface the engine drives (`vocab_size`, `allocate_cache`,
`prefill`, `decode`, its processor, stop ids, sampling defaults, and its speech part or None); servers,
the web demo, jobs and the CLI load a model only through `load_model` and never name a family.
"""

from __future__ import annotations

import json
from pathlib import Path

from omni.config import ConfigError

FAMILIES = {
    "qwen2_5_omni": "Qwen2.5-Omni",
    "qwen3_omni_moe": "Qwen3-Omni",
}


def model_type(path: str | Path) -> str:
    cfg = Path(path) / "config.json"
    try:
        kind = json.loads(cfg.read_text()).get("model_type")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no config.json (is this a Qwen-Omni checkpoint directory?)") from None
    except (json.JSONDecodeError, AttributeError) as e:
        raise ConfigError(f"{cfg}: not a JSON object ({e})") from None
    if kind not in FAMILIES:
        raise ConfigError(f"{cfg}: model_type {kind!r} is not one omni serves "
                          f"({', '.join(f'{k} ({v})' for k, v in FAMILIES.items())})")
    return kind


def load_model(path: str | Path, device: str = "cpu", **kwargs):
    """The checkpoint at `path` loaded on `device` as its family's model (keyword options as the family's `load`)."""
    kind = model_type(path)
    if kind == "qwen2_5_omni":
        from omni.pipeline import OmniModel

        return OmniModel.load(path, device=device, **kwargs)
    raise ConfigError(f"{path}: {FAMILIES[kind]} checkpoints load their Thinker (omni/qwen3_omni_thinker.py) but "
                      "cannot be served yet: its processor and chat template are not in this release")
