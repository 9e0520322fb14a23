"""Packaging: the wheel carries the license, the systemd unit and the /etc config, and
`lmcached service install` turns an installed wheel into a service without a clone; the
quickstart installs no torch, and the user-facing torch extra is a range."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Building a wheel runs setuptools in an isolated environment: minutes on two loaded cores.
BUILD_TIMEOUT_S = 600


def service_install(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None):
    return subprocess.run(
        [sys.executable, "-m", "lmcached", "service", "install", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env=env,
    )


def test_service_install_writes_the_unit_and_config_under_a_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    result = service_install("--root", str(root), "--bin", "/opt/lmcached/bin/lmcached", "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    unit = root / "etc/systemd/system/lmcached.service"
    config = root / "etc/lmcached/lmcached.yaml"
    assert doc["unit"] == str(unit) and doc["config"] == str(config) and doc["config_written"]
    assert (
        "ExecStart=/opt/lmcached/bin/lmcached start --config /etc/lmcached/lmcached.yaml"
        in unit.read_text()
    )
    assert config.read_text() == (ROOT / "config/lmcached.etc.yaml").read_text()
    assert config.stat().st_mode & 0o777 == 0o640
    # An operator's edits survive a second install; --force replaces them.
    config.write_text("num_workers: 8\n")
    again = json.loads(service_install("--root", str(root), "--json").stdout)
    assert again["config_written"] is False and config.read_text() == "num_workers: 8\n"
    service_install("--root", str(root), "--force")
    assert config.read_text() == (ROOT / "config/lmcached.etc.yaml").read_text()


def test_wheel_carries_license_and_service_files_and_installs_a_service(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = dist.glob("lmcached-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        assert {
            "lmcached/cli/data/lmcached.service",
            "lmcached/cli/data/lmcached.etc.yaml",
        } <= names
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        meta = zf.read(metadata).decode()
        assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "License-Expression: Apache-2.0" in meta
    assert "Requires-Dist: torch>=2.4; extra == " in meta
    assert not re.search(r"Requires-Dist: torch==", meta)

    # Installed from the wheel alone (no source tree on the path), it writes a service.
    site = tmp_path / "site"
    install = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--target",
            str(site),
            str(wheel),
        ],
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    env = {**os.environ, "PYTHONPATH": str(site)}
    where = subprocess.run(
        [sys.executable, "-c", "import lmcached; print(lmcached.__file__)"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert where.stdout.startswith(str(site)), where.stdout + where.stderr
    root = tmp_path / "root"
    result = service_install("--root", str(root), "--json", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    unit = (root / "etc/systemd/system/lmcached.service").read_text()
    assert unit.startswith("# lmcached: KV-cache daemon") and "Type=notify" in unit
    assert (root / "etc/lmcached/lmcached.yaml").read_text() == (
        ROOT / "config/lmcached.etc.yaml"
    ).read_text()


def test_quickstart_installs_no_torch_and_the_torch_extra_is_a_range() -> None:
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not [d for d in project["dependencies"] if d.startswith("torch")]
    extras = project["optional-dependencies"]
    assert extras["torch"] == ["torch>=2.4"]
    assert not [d for reqs in extras.values() for d in reqs if re.match(r"torch\s*==", d)]
    assert project["license"] == "Apache-2.0" and (ROOT / "LICENSE").is_file()
    # start.sh installs the package alone; the tests' setup pins the cached CPU build.
    assert "scripts/setup.sh daemon" in (ROOT / "scripts/start.sh").read_text()
    assert "-c scripts/constraints.txt" in (ROOT / "scripts/setup.sh").read_text()
    pins = (ROOT / "scripts/constraints.txt").read_text().split()
    assert "torch==2.13.0" in pins
