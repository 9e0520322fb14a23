"""scripts/gpu_connector_path.py, the connector's GPU path through a real daemon, stays runnable.

On a host without CUDA it runs the same sequence on CPU tensors (``--device cpu``) against a
private daemon, and its own byte-for-byte check of every loaded block must pass.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_connector_path.py"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=170,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.timeout(180)
@pytest.mark.parametrize("batched", ["on", "off"])
def test_the_connector_path_saves_and_loads_every_block_back_through_a_daemon_on_cpu(
    batched: str,
) -> None:
    # "on": the GPU's batched copies (staging tensor, one kernel per layer), run on CPU tensors.
    run = _run(
        *("--model", "bench", "--tokens", "768", "--repeats", "1", "--device", "cpu"),
        *("--batched", batched),
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "bench KV, 768 tokens: 3 chunks of 4 MiB (12 MiB), 8 layers, on cpu" in run.stdout
    assert "load: get until last layer usable" in run.stdout
    expected = f"every load checked block for block (2 rounds, batched: {batched == 'on'})"
    assert expected in run.stdout


@pytest.mark.timeout(180)
def test_the_connector_path_on_cuda_runs_or_says_there_is_no_cuda_device() -> None:
    run = _run("--model", "bench", "--tokens", "512", "--repeats", "1")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    if torch.cuda.is_available():
        assert "every load checked block for block" in run.stdout
    else:
        assert run.stdout.strip() == "no CUDA device"


def test_a_token_count_off_the_chunk_size_is_refused_in_one_line() -> None:
    run = _run("--tokens", "300", "--device", "cpu")
    assert run.returncode == 2
    assert "--tokens must be a positive multiple of 256" in run.stderr


@pytest.mark.timeout(180)
def test_the_connector_path_goes_on_with_new_arenas_after_every_worker_is_killed() -> None:
    run = _run(
        *("--model", "bench", "--tokens", "512", "--repeats", "2", "--device", "cpu"),
        "--kill-workers",
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "killed 2 workers with SIGKILL after round 1; all restarted" in run.stdout
    assert "every load checked block for block (3 rounds, batched: False)" in run.stdout


def test_killing_workers_is_refused_for_a_daemon_the_script_did_not_start() -> None:
    run = _run("--kill-workers", "--endpoint", "ipc:///nonexistent", "--device", "cpu")
    assert run.returncode == 2
    assert "--kill-workers needs the private daemon" in run.stderr
