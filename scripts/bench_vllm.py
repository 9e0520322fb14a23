"""Time to first token in vLLM side by side: no connector, LMCache's multi-process server, lmcached.

Run inside the vLLM environment, with LMCache installed as /work/shared/recipes/lmcache-mp.md
describes (the server in its own venv, its connector code in a --no-deps --target folder):

    PY=$(bash scripts/vllm_env.sh) && "$PY" scripts/bench_vllm.py \\
        [--lmcache-env ~/.cache/lmcached/lmcache-0.5.6] \\
        [--lmcache-connector ~/.cache/lmcached/lmcache-0.5.6-connector] [--prompts 3]

The three engines (same settings: float32 25M random Llama, block size 32, enforce_eager,
prefix caching on, compute pinned to one core with VLLM_CPU_OMP_THREADS_BIND=0) are up at once,
each in its own process, and every prompt is sent to them in turn, so that the noise of a
shared host falls on all three alike. For each prompt length (2,048 tokens, and 2,000 and
1,337, which are multiples of neither 32 nor 256), each prompt is new (a miss is a miss):

* ``miss``: a full prefill (for the connectors, it also stores the prompt);
* ``hit``: after ``reset_prefix_cache()``, the KV is loaded from LMCache / lmcached;
* ``vLLM prefix-cache hit``: the no-connector engine, the same prompt again.

TTFT is the wall time of ``generate(max_tokens=1)`` (vLLM-cpu leaves request metrics empty).
The figures are medians over the prompts; the cached-token counts and whether the hit's greedy
token equals the miss's are printed alongside. Without --lmcache-env the LMCache column is
skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("LMCACHE_DISABLE_BANNER", "1")

BLOCK_SIZE = 32
CHUNK_SIZE = 256
LENGTHS = (2048, 2000, 1337)
CACHE = Path(os.path.expanduser("~/.cache/lmcached"))


def make_prompt(seed: int, length: int, vocab: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, vocab) for _ in range(length)]


# ------------------------------------------------------------------ one engine per process


def serve_engine(model: str, kv: dict[str, Any] | None, extra_path: str | None, conn: Any) -> None:
    """Child process: build one LLM, then answer ("ttft", tokens) / ("reset",) / ("stop",)."""
    if extra_path:
        sys.path.insert(0, extra_path)
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt

    llm = LLM(
        model=model,
        dtype="float32",
        block_size=BLOCK_SIZE,
        max_model_len=4096,
        enable_prefix_caching=True,
        enforce_eager=True,
        seed=0,
        kv_transfer_config=KVTransferConfig(**kv) if kv else None,
    )
    params = SamplingParams(temperature=0.0, max_tokens=1)
    conn.send(("ready",))
    try:
        while True:
            message = conn.recv()
            if message[0] == "stop":
                break
            if message[0] == "reset":
                conn.send((bool(llm.reset_prefix_cache()),))
                continue
            started = time.perf_counter()
            (out,) = llm.generate(
                [TokensPrompt(prompt_token_ids=message[1])], params, use_tqdm=False
            )
            elapsed = time.perf_counter() - started
            conn.send((elapsed, int(out.num_cached_tokens or 0), list(out.outputs[0].token_ids)))
    finally:
        llm.llm_engine.engine_core.shutdown()


class EngineProcess:
    """An engine in a child process, driven over a pipe."""

    def __init__(
        self, name: str, model: Path, kv: dict[str, Any] | None, extra_path: str | None = None
    ) -> None:
        self.name = name
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        saved = os.environ.get("PYTHONPATH")
        if extra_path:  # the engine's own subprocesses import the connector too
            os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (extra_path, saved) if p)
        try:
            self.proc = ctx.Process(
                target=serve_engine, args=(str(model), kv, extra_path, child), name=name
            )
            self.proc.start()
        finally:
            if saved is None:
                os.environ.pop("PYTHONPATH", None)
            else:
                os.environ["PYTHONPATH"] = saved

    def wait_ready(self, timeout: float = 600) -> None:
        if not self.conn.poll(timeout):
            raise RuntimeError(f"engine {self.name} did not start in {timeout:.0f}s")
        self.conn.recv()

    def ttft(self, tokens: list[int]) -> tuple[float, int, list[int]]:
        self.conn.send(("ttft", tokens))
        result: tuple[float, int, list[int]] = self.conn.recv()
        return result

    def reset(self) -> None:
        self.conn.send(("reset",))
        (ok,) = self.conn.recv()
        if not ok:
            raise RuntimeError(f"engine {self.name}: reset_prefix_cache failed")

    def stop(self) -> None:
        """Stop the engine and its process. Idempotent."""
        if self.proc.is_alive():
            with contextlib.suppress(OSError):
                self.conn.send(("stop",))
            self.proc.join(60)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()


# ------------------------------------------------------------------ LMCache's server


class LMCacheServer:
    """LMCache 0.5.6's multi-process server (shared-memory mode), in its own venv."""

    def __init__(self, env: Path, workdir: Path) -> None:
        from lmcached.testing import free_port

        self.port = free_port()
        self.shm = f"lmcached-bench-{uuid.uuid4().hex[:8]}"
        self.log_path = workdir / "lmcache-server.log"
        self.log = open(self.log_path, "w")  # noqa: SIM115 (closed by stop())
        self.proc = subprocess.Popen(
            [
                str(env / "bin" / "lmcache"),
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--l1-size-gb",
                "2",
                "--eviction-policy",
                "LRU",
                "--chunk-size",
                str(CHUNK_SIZE),
                "--http-port",
                str(free_port()),
                # Without it a CPU vLLM worker hangs for ever in register_kv_caches.
                "--supported-transfer-mode",
                "auto",
                "--shm-name",
                self.shm,
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "LMCACHE_DISABLE_BANNER": "1"},
        )

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while "Application startup complete" not in self.log_path.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("LMCache server did not start:\n" + self.log_path.read_text())
            time.sleep(0.5)

    def kv_transfer(self) -> dict[str, Any]:
        return {
            "kv_connector": "LMCacheMPConnector",
            "kv_role": "kv_both",
            "kv_connector_extra_config": {
                "lmcache.mp.host": "tcp://127.0.0.1",
                "lmcache.mp.port": self.port,
            },
        }

    def stop(self) -> None:
        """Stop the server. Idempotent."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        shm = Path("/dev/shm") / self.shm
        if shm.exists():
            shm.unlink()


# ------------------------------------------------------------------ the run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=3, help="prompts per length")
    parser.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    parser.add_argument("--lmcache-env", type=Path, default=CACHE / "lmcache-0.5.6")
    parser.add_argument("--lmcache-connector", type=Path, default=CACHE / "lmcache-0.5.6-connector")
    parser.add_argument("--no-lmcache", action="store_true", help="skip the LMCache column")
    parser.add_argument(
        "--load-mode",
        choices=["auto", "layerwise", "sync"],
        default="auto",
        help="the lmcached engine's lmcached.load_mode (auto: sync on a CPU, layerwise on a GPU)",
    )
    parser.add_argument(
        "--compare-sync",
        action="store_true",
        help="add a second lmcached engine with load_mode=sync (its own namespace)",
    )
    args = parser.parse_args(argv)

    from lmcached.testing import DaemonProcess
    from lmcached.testing.tiny_llama import BENCH_25M, ensure_model

    model = ensure_model(BENCH_25M)
    use_lmcache = not args.no_lmcache and (args.lmcache_env / "bin" / "lmcache").exists()
    if not use_lmcache and not args.no_lmcache:
        print(f"LMCache not found at {args.lmcache_env}: skipping its column", file=sys.stderr)

    workdir = Path(tempfile.mkdtemp(prefix="bench-vllm-"))
    engines: dict[str, EngineProcess] = {}
    server: LMCacheServer | None = None
    try:
        with DaemonProcess(
            workdir / "d", chunk_size=CHUNK_SIZE, max_local_cpu_size="2GiB"
        ) as daemon:
            if use_lmcache:
                server = LMCacheServer(args.lmcache_env, workdir)
            lmcached_kv = {
                "kv_connector": "LMCachedConnector",
                "kv_connector_module_path": "lmcached.integrations.vllm",
                "kv_role": "kv_both",
                "kv_load_failure_policy": "recompute",
                "kv_connector_extra_config": {
                    "lmcached.config": str(daemon.config_path),
                    "lmcached.chunk_size": CHUNK_SIZE,
                    "lmcached.load_mode": args.load_mode,
                },
            }
            engines["vLLM"] = EngineProcess("vLLM", model, None)
            engines["vLLM"].wait_ready()
            engines["lmcached"] = EngineProcess("lmcached", model, lmcached_kv)
            engines["lmcached"].wait_ready()
            if args.compare_sync:
                sync_kv = json.loads(json.dumps(lmcached_kv))
                sync_kv["kv_connector_extra_config"].update(
                    {"lmcached.load_mode": "sync", "lmcached.namespace": "vllm-sync"}
                )
                engines["lmcached-sync"] = EngineProcess("lmcached-sync", model, sync_kv)
                engines["lmcached-sync"].wait_ready()
            if server is not None:
                server.wait_ready()
                engines["LMCache"] = EngineProcess(
                    "LMCache", model, server.kv_transfer(), str(args.lmcache_connector)
                )
                engines["LMCache"].wait_ready()
            connectors = [
                name for name in ("LMCache", "lmcached", "lmcached-sync") if name in engines
            ]
            results = run(engines, connectors, args)
            reads = daemon_reads(daemon)
    finally:
        for engine in engines.values():
            engine.stop()
        if server is not None:
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    report(results, connectors, args)
    sent, shared = reads
    # Whether the hits were read from the workers' arenas (same host) or came over the socket.
    print(
        f"\nlmcached daemon: {sent / 2**20:.1f} MiB read, "
        f"{shared / 2**20:.1f} MiB of it as shared-memory slots (no ZMQ payload)"
    )
    return 0


def daemon_reads(daemon: Any) -> tuple[int, int]:
    """Return (bytes read, bytes read as arena slots) summed over the daemon's workers."""
    with daemon.client(timeout=10) as client:
        workers = client.stats()["workers"]
    ops = [w["stats"]["ops"] for w in workers]
    return sum(o["bytes_out"] for o in ops), sum(o.get("bytes_out_shared", 0) for o in ops)


Sample = tuple[float, int, list[int]]


def run(
    engines: dict[str, EngineProcess], connectors: list[str], args: argparse.Namespace
) -> dict[int, dict[str, list[Sample]]]:
    from lmcached.testing.tiny_llama import BENCH_25M

    results: dict[int, dict[str, list[Sample]]] = {}
    warm = make_prompt(int(time.time()), 2048, BENCH_25M.vocab_size)
    for engine in engines.values():  # warm up every path: miss, store, hit
        engine.ttft(warm)
    time.sleep(2)
    for engine in engines.values():
        engine.reset()
        engine.ttft(warm)
    # New prompts on every run: LMCache's server may outlive a run, and a miss must be a miss.
    seed = int(time.time()) * 1000
    for length in args.lengths:
        samples: dict[str, list[Sample]] = {}
        results[length] = samples
        for p in range(args.prompts):
            tokens = make_prompt(seed + 10_000 * length + p, length, BENCH_25M.vocab_size)
            for name in ["vLLM", *connectors]:  # the misses, in turn
                samples.setdefault(f"{name} miss", []).append(engines[name].ttft(tokens))
            samples.setdefault("vLLM prefix-cache hit", []).append(engines["vLLM"].ttft(tokens))
            wait_until_hit(engines, connectors, tokens, samples)
    return results


def wait_until_hit(
    engines: dict[str, EngineProcess],
    connectors: list[str],
    tokens: list[int],
    samples: dict[str, list[Sample]],
    timeout: float = 60,
) -> None:
    """Give the connectors' asynchronous saves time (untimed), then time one hit each, in turn.

    lmcached's hit is retried (after a pause) until it covers every prompt token but the last
    (its saves are asynchronous), or the timeout passes; only the final attempt is recorded.
    """
    time.sleep(1.5)
    deadline = time.monotonic() + timeout
    for name in connectors:
        while True:
            engines[name].reset()
            sample = engines[name].ttft(tokens)
            done = not name.startswith("lmcached") or sample[1] >= len(tokens) - 1
            if done or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        samples.setdefault(f"{name} hit", []).append(sample)


def median_ms(values: list[Sample]) -> float:
    return statistics.median(v[0] for v in values) * 1000


def report(
    results: dict[int, dict[str, list[Sample]]], connectors: list[str], args: argparse.Namespace
) -> None:
    print(
        f"\nTTFT, llama-25m float32, block 32, one core per engine, medians of {args.prompts} "
        f"prompts per length, all engines up at once (lmcached load_mode={args.load_mode})"
    )
    header = f"{'prompt':>7} {'case':24} {'ms':>9} {'cached tokens':>14} {'same token as miss':>19}"
    print(header)
    for length, samples in results.items():
        for name, values in samples.items():
            cached = int(statistics.median(v[1] for v in values))
            same = ""
            if name.endswith(" hit"):
                miss = samples[name.replace("prefix-cache hit", "miss").replace(" hit", " miss")]
                same = (
                    "yes" if all(h[2] == m[2] for h, m in zip(values, miss, strict=True)) else "NO"
                )
            print(f"{length:>7} {name:24} {median_ms(values):9.1f} {cached:14d} {same:>19}")
    print("\nratios (medians, same run)")
    for length, samples in results.items():
        ours = median_ms(samples["lmcached hit"])
        line = f"{length:>7}: lmcached hit / vLLM prefix-cache hit {ours / median_ms(samples['vLLM prefix-cache hit']):.2f}"
        if "LMCache hit" in samples:
            line += (
                f", lmcached hit / LMCache MP hit {ours / median_ms(samples['LMCache hit']):.2f}"
            )
        line += f", lmcached hit / miss {ours / median_ms(samples['lmcached miss']):.3f}"
        if "lmcached-sync hit" in samples:
            sync = median_ms(samples["lmcached-sync hit"])
            line += f", layerwise hit / sync hit {ours / sync:.2f}"
        print(line)


if __name__ == "__main__":
    sys.exit(main())
