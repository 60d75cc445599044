import os

import pytest
import torch

from tests.reference import CONFIG_NAMES, build_reference

torch.set_num_threads(1)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def references(tmp_path_factory):
    """name -> (transformers model, checkpoint dir), built once per test session."""
    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = build_reference(name, tmp_path_factory.mktemp(f"ref_{name}"))
        return cache[name]

    return get


@pytest.fixture(params=CONFIG_NAMES)
def config_name(request):
    return request.param
