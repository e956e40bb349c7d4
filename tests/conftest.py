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


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {fam: build_tiny(fam, root / fam) for fam in FAMILIES}


@pytest.fixture(scope="session")
def tiny_engines(tiny_dirs):
    return {fam: Engine.load(d) for fam, d in tiny_dirs.items()}


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
