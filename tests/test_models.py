"""omni.models: the family comes from config.json's model_type; what omni cannot serve says so plainly."""

from __future__ import annotations

import json

import pytest

from omni.config import ConfigError
from omni.models import load_model, model_type
from tests.reference_qwen3 import tiny_config


def test_the_family_is_read_from_model_type(tmp_path, embedded_dir):
    assert model_type(embedded_dir) == "qwen2_5_omni"
    (tmp_path / "config.json").write_text(json.dumps(tiny_config()))
    assert model_type(tmp_path) == "qwen3_omni_moe"


def test_unknown_or_missing_configs_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        model_type(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError, match="'llama' is not one omni serves.*qwen2_5_omni.*qwen3_omni_moe"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="not a JSON object"):
        model_type(tmp_path)


def test_a_qwen3_config_without_weights_is_a_clear_error(tmp_path):
    from omni.weights import CheckpointError

    (tmp_path / "config.json").write_text(json.dumps(tiny_config()))
    with pytest.raises(CheckpointError, match=str(tmp_path)):
        load_model(tmp_path)
