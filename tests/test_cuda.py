"""The CUDA path: same output as the CPU, peak GPU memory under --gpu-mem. Runs where a GPU exists."""

import json

import pytest
import torch

from tests.cli_helpers import run_cli

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")]

PROMPT = ("--raw", "--prompt", "The three primary colours are", "--max-new-tokens", "24", "--ignore-eos")


@pytest.mark.parametrize("gpu_mem", ["200M", "4G"])
def test_cuda_matches_cpu_and_respects_gpu_mem(tmp_path, gpu_mem):
    cpu = run_cli(*PROMPT, "--device", "cpu", "--offload-dir", tmp_path)
    gpu = run_cli(*PROMPT, "--device", "cuda", "--gpu-mem", gpu_mem, "--cpu-mem", "300M", "--stats",
                  "--offload-dir", tmp_path, env={"OFFLOAD_RT_BANDWIDTHS": "disk=1.3e9,mem=2.4e10,matvec=1.5e10,h2d=2e10"})
    assert cpu.returncode == 0 and gpu.returncode == 0, gpu.stderr
    # float32 on both: the same greedy text (kernels differ, so allow a late divergence only)
    assert gpu.stdout[:40] == cpu.stdout[:40]
    stats = json.loads(gpu.stderr.strip().splitlines()[-1])
    from offload_rt.config import parse_size

    assert 0 < stats["peak_gpu_bytes"] <= parse_size(gpu_mem)
    if gpu_mem == "200M":
        assert stats["h2d_bytes"] > 0
