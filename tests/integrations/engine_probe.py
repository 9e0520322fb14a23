"""Run greedy generations in a fresh vLLM engine process that loads layer by layer; print JSON.

Used by the tests to prove, with one engine start, that KV stored by one engine process is
found by another one with PYTHONHASHSEED unset in both, and that a hit loaded layer-wise
(``lmcached.load_mode: layerwise``) gives the output of a full prefill. The engine runs inside
this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, the ``uni`` executor), so that the worker
connector's counters can be read here; it also saves the second vLLM import an engine-core
subprocess would cost. Usage:
    python engine_probe.py MODEL_DIR DAEMON_CONFIG PROMPT_SEED:LENGTH...
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from vllm_harness import Engine, connector_config, engine_kwargs, make_prompt

STATS = ("layers_waited", "layers_overlapped", "loaded_chunks", "failed_chunks")


def worker_stats() -> dict[str, int]:
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    stats = get_kv_transfer_group().stats
    return {name: stats[name] for name in STATS}


if __name__ == "__main__":
    model, config = Path(sys.argv[1]), Path(sys.argv[2])
    prompts = [tuple(int(part) for part in spec.split(":")) for spec in sys.argv[3:]]
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM
    from vllm.config import KVTransferConfig

    kv = connector_config(config, **{"lmcached.load_mode": "layerwise"})
    llm = LLM(
        **engine_kwargs(model),
        kv_transfer_config=KVTransferConfig(**kv),
        distributed_executor_backend="uni",
    )
    engine = Engine(llm, None)
    results = []
    try:
        for seed, length in prompts:
            before = worker_stats()
            out = engine.fresh(make_prompt(seed, length))
            after = worker_stats()
            results.append(
                {
                    "token_ids": list(out.outputs[0].token_ids),
                    "num_cached_tokens": out.num_cached_tokens,
                    **{name: after[name] - before[name] for name in STATS},
                }
            )
    finally:
        llm.llm_engine.engine_core.shutdown()
    print("PROBE " + json.dumps(results), flush=True)
