"""benchmarks/gpu_smoke.py: the CUDA path's one command, its logic run here on CPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SMOKE = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_smoke.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SMOKE), *args], capture_output=True, text=True, timeout=600
    )


@pytest.mark.integration
def test_smoke_logic_on_cpu_resumes_exactly_in_a_new_process():
    done = _run("--device", "cpu", "--preset", "cpu_quickstart", "--timing-steps", "0")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "difference 0.00e+00" in done.stdout
    assert "evaluation of 2 images" in done.stdout
    assert done.stdout.rstrip().endswith("gpu_smoke: all checks passed")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
def test_without_cuda_it_says_so_and_exits_0():
    done = _run()
    assert done.returncode == 0
    assert (
        done.stdout.strip()
        == "gpu_smoke: no CUDA device on this machine, nothing to check (exit 0)"
    )
