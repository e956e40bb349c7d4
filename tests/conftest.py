import os

import pytest
import torch

from tdb_agent.engine import DEFAULT_MODEL, Engine
from tests.tiny_models import FAMILIES, build_tiny

torch.set_num_threads(int(os.environ.get("TDB_TEST_THREADS", "2")))


@pytest.fixture(autouse=True, scope="session")
def _workspace(tmp_path_factory):
    """Circuits saved by servers under test go to a temporary folder, not ./tdb-workspace."""
    os.environ["TDB_WORKSPACE"] = str(tmp_path_factory.mktemp("workspace"))


class _Lazy(dict):
    """family -> value, made on first use: the five core families every test may read, the
    other families (tests/test_families.py) only when a test asks for them."""

    def __init__(self, make, keys):
        super().__init__()
        self._make, self._keys = make, list(keys)

    def __missing__(self, family):
        self[family] = value = self._make(family)
        return value

    def items(self):
        return [(k, self[k]) for k in self._keys]

    def keys(self):
        return list(self._keys)

    def __iter__(self):
        return iter(self._keys)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return _Lazy(lambda fam: build_tiny(fam, root / fam), FAMILIES)


@pytest.fixture(scope="session")
def tiny_engines(tiny_dirs):
    return _Lazy(lambda fam: Engine.load(tiny_dirs[fam]), FAMILIES)


@pytest.fixture(scope="session")
def gpt2_tiny(tiny_engines):
    return tiny_engines["gpt2"]


@pytest.fixture(scope="session")
def bundled():
    if not (DEFAULT_MODEL / "config.json").exists():
        pytest.skip("the bundled model is not built (python tools/train_default_model.py)")
    return Engine.load()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
