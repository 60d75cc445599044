import os

import pytest
import torch

from omni import embedded

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


@pytest.fixture(scope="session")
def embedded_dir(tmp_path_factory):
    """The embedded default checkpoint, built once per session in a private cache ($OMNI_CACHE points there,
    so `omni` subprocesses given this environment find it: the cache is embedded_dir.parent)."""
    os.environ["OMNI_CACHE"] = str(tmp_path_factory.mktemp("omni_cache"))
    return embedded.ensure()
