"""scripts/gpu_kv_load.py, the GPU proof of the load path, stays runnable as one command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_kv_load.py"


@pytest.mark.timeout(300)
def test_the_gpu_load_script_runs_or_says_there_is_no_cuda_device() -> None:
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--repeats", "2"],
        capture_output=True,
        text=True,
        timeout=280,
        stdin=subprocess.DEVNULL,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    if torch.cuda.is_available():
        assert "every load checked byte for byte" in run.stdout
    else:
        assert run.stdout.strip() == "no CUDA device"
