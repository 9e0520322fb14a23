"""scripts/direct_put_ceiling.py, which compares a direct put with the kernel's ceiling, stays
runnable as one command against a real private daemon."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "direct_put_ceiling.py"


@pytest.mark.timeout(240)
def test_the_ceiling_script_reports_every_figure_of_a_round() -> None:
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--size", "8MiB", "--rounds", "1", "--calls", "2"],
        capture_output=True,
        text=True,
        timeout=220,
        stdin=subprocess.DEVNULL,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    figure = r"\d+\.\d\d"
    assert re.search(
        rf"round 0: memcpy {figure}, kernel {figure}, worker copy {figure}, daemon {figure} GB/s",
        run.stdout,
    ), run.stdout
    assert re.search(
        rf"8MiB blocks, 4 a call; medians x memcpy: kernel {figure}, worker copy {figure}, "
        rf"daemon {figure}",
        run.stdout,
    ), run.stdout
