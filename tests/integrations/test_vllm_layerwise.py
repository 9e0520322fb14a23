"""Layer-wise loads inside a real vLLM engine: the load runs beside the forward pass.

The engine here runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, the ``uni``
executor), so that the test can read the worker connector's counters: each attention layer of
a hit's forward pass either waited for its loaded KV or found it already in place, and the
output is the one of a full prefill.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from vllm_harness import Engine, connector_config, engine_kwargs, make_prompt

pytestmark = pytest.mark.timeout(300)

LAYERS = 4  # the tiny Llama's


@pytest.fixture(scope="module")
def inproc_engine(tiny_model: Path, daemon: Any) -> Iterator[Engine]:
    from vllm import LLM
    from vllm.config import KVTransferConfig

    saved = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    try:
        kv = connector_config(daemon.config_path, **{"lmcached.namespace": "layerwise", "lmcached.load_mode": "layerwise"})
        llm = LLM(
            **engine_kwargs(tiny_model),
            kv_transfer_config=KVTransferConfig(**kv),
            distributed_executor_backend="uni",
        )
    finally:
        if saved is None:
            os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        else:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = saved
    try:
        yield Engine(llm, daemon)
    finally:
        llm.llm_engine.engine_core.shutdown()


def worker_stats() -> dict[str, int]:
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    return dict(get_kv_transfer_group().stats)


def hit_after_store(engine: Engine, tokens: list[int], timeout: float = 30.0) -> Any:
    """Generate until lmcached supplies every token but the last (saves are asynchronous)."""
    deadline = time.monotonic() + timeout
    while True:
        out = engine.fresh(tokens)
        if out.num_cached_tokens == len(tokens) - 1:
            return out
        assert time.monotonic() < deadline, "the connector did not store the prompt"
        time.sleep(0.2)


@pytest.mark.parametrize("length", [2048, 2000])
def test_a_hit_is_loaded_layer_by_layer_beside_the_forward_pass(
    inproc_engine: Engine, length: int
) -> None:
    prompt = make_prompt(40 + length, length)
    miss = inproc_engine.fresh(prompt)
    before = worker_stats()

    hit = hit_after_store(inproc_engine, prompt)

    after = worker_stats()
    layers = (after["layers_waited"] - before["layers_waited"]) + (
        after["layers_overlapped"] - before["layers_overlapped"]
    )
    # Every layer of every loading forward pass went through the layer-wise gate (a forward
    # pass that read a layer before its load would have given another output).
    assert layers > 0 and layers % LAYERS == 0
    assert after["failed_chunks"] == before["failed_chunks"]
    assert list(hit.outputs[0].token_ids) == list(miss.outputs[0].token_ids)
