"""Time to first token in vLLM with and without lmcached, measured in one run.

Run inside the vLLM environment:

    PY=$(bash scripts/vllm_env.sh) && "$PY" scripts/bench_vllm.py [--prompts 5] [--repeats 3]

On the ~110M-parameter random Llama (bf16, built offline), with 2048-token prompts and vLLM's
compute pinned to one core (VLLM_CPU_OMP_THREADS_BIND=0, so that every engine gets the same
core count), it measures:

* ``no connector, miss``   - a full prefill in an engine without a connector (the baseline);
* ``lmcached miss``        - a full prefill with the connector, including handing the store off;
* ``lmcached hit``         - after ``reset_prefix_cache()``: KV loaded from the daemon;
* ``vLLM prefix-cache hit`` - the same prompt again, served from vLLM's own memory.

TTFT is the wall time of ``generate(max_tokens=1)``. Each figure is the median over
prompts x repeats; every prompt of every repeat is new, so a miss is a real miss.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

PROMPT_LEN = 2048
BLOCK_SIZE = 32
CHUNK_SIZE = 256


def make_prompt(seed: int, vocab: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, vocab) for _ in range(PROMPT_LEN)]


def start_engine(model: Path, kv_transfer_config: dict[str, Any] | None) -> Any:
    from vllm import LLM
    from vllm.config import KVTransferConfig

    return LLM(
        model=str(model),
        dtype="bfloat16",
        block_size=BLOCK_SIZE,
        max_model_len=4096,
        enable_prefix_caching=True,
        enforce_eager=True,
        kv_transfer_config=KVTransferConfig(**kv_transfer_config) if kv_transfer_config else None,
    )


def ttft(llm: Any, tokens: list[int]) -> tuple[float, int]:
    """Return (seconds, num_cached_tokens) of one generate(max_tokens=1)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=1)
    started = time.perf_counter()
    (out,) = llm.generate([TokensPrompt(prompt_token_ids=tokens)], params, use_tqdm=False)
    return time.perf_counter() - started, int(out.num_cached_tokens or 0)


def wait_stored(llm: Any, client: Any, tokens: list[int], timeout: float = 60.0) -> None:
    """Wait (untimed) until the daemon holds the prompt's chunks; saves are asynchronous."""
    from lmcached.integrations.vllm import key_builder

    keys = key_builder(llm.llm_engine.vllm_config, CHUNK_SIZE).chunk_keys(tokens)
    deadline = time.monotonic() + timeout
    while client.lookup(keys) < len(keys):
        if time.monotonic() > deadline:
            raise RuntimeError("the connector did not store the prompt")
        time.sleep(0.02)


def median_ms(values: list[float]) -> float:
    return statistics.median(values) * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--transport", choices=["auto", "tcp", "ipc"], default="auto")
    args = parser.parse_args(argv)

    from lmcached.testing import DaemonProcess
    from lmcached.testing.tiny_llama import BENCH_100M, ensure_model

    model = ensure_model(BENCH_100M)
    os.environ["LMCACHED_TRANSPORT"] = args.transport
    rounds = [
        [make_prompt(1000 * r + p, BENCH_100M.vocab_size) for p in range(args.prompts)]
        for r in range(args.repeats)
    ]
    warmup = make_prompt(999_999, BENCH_100M.vocab_size)
    results: dict[str, list[float]] = {}
    cached: dict[str, list[int]] = {}

    def record(name: str, sample: tuple[float, int]) -> None:
        results.setdefault(name, []).append(sample[0])
        cached.setdefault(name, []).append(sample[1])

    with tempfile.TemporaryDirectory(prefix="bench-vllm-") as tmp:
        with DaemonProcess(
            Path(tmp) / "d", chunk_size=CHUNK_SIZE, max_local_cpu_size="2GiB"
        ) as daemon:
            kv = {
                "kv_connector": "LMCachedConnector",
                "kv_connector_module_path": "lmcached.integrations.vllm",
                "kv_role": "kv_both",
                "kv_load_failure_policy": "recompute",
                "kv_connector_extra_config": {
                    "lmcached.config": str(daemon.config_path),
                    "lmcached.chunk_size": CHUNK_SIZE,
                },
            }
            llm = start_engine(model, kv)
            try:
                with daemon.client(timeout=10) as client:
                    # Warm up the miss, store and hit paths (connections, first allocations).
                    ttft(llm, warmup)
                    wait_stored(llm, client, warmup)
                    llm.reset_prefix_cache()
                    ttft(llm, warmup)
                    for prompts in rounds:
                        for tokens in prompts:
                            record("lmcached miss", ttft(llm, tokens))
                            wait_stored(llm, client, tokens)
                            llm.reset_prefix_cache()
                            record("lmcached hit", ttft(llm, tokens))
                            record("vLLM prefix-cache hit (with connector)", ttft(llm, tokens))
            finally:
                llm.llm_engine.engine_core.shutdown()

        llm = start_engine(model, None)
        try:
            ttft(llm, warmup)
            for r, prompts in enumerate(rounds):
                for p in range(len(prompts)):
                    tokens = make_prompt(5_000_000 + 1000 * r + p, BENCH_100M.vocab_size)
                    record("no connector, miss", ttft(llm, tokens))
                    record("vLLM prefix-cache hit (no connector)", ttft(llm, tokens))
        finally:
            llm.llm_engine.engine_core.shutdown()

    base = median_ms(results["no connector, miss"])
    hit = median_ms(results["lmcached hit"])
    vllm_hit = median_ms(results["vLLM prefix-cache hit (no connector)"])
    n = len(results["lmcached hit"])
    print(
        f"\nTTFT, {BENCH_100M.name} bf16, {PROMPT_LEN}-token prompts, one core, "
        f"median of {n}, transport={args.transport}"
    )
    print(f"{'case':42} {'ms':>9} {'x no-connector miss':>20} {'cached tokens':>14}")
    for name, values in results.items():
        ms = median_ms(values)
        print(f"{name:42} {ms:9.1f} {ms / base:20.3f} {int(statistics.median(cached[name])):14d}")
    print(
        f"\nlmcached hit / lmcached miss:            {hit / median_ms(results['lmcached miss']):.3f}"
    )
    print(f"lmcached hit / vLLM prefix-cache hit:    {hit / vllm_hit:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
