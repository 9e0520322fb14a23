"""`lmcached bench`: store/retrieve throughput and latency next to baselines from the same run.

Baselines, measured in the same run on the same machine:
- ``memcpy``: one thread copying a block into a preallocated buffer (ctypes.memmove);
- ``zmq``: a bare DEALER/ROUTER round trip between two processes over the same transport,
  copy=False, with the same 16 MiB sub-frames and malloc tuning lmcached uses; ``store`` sends
  the block and gets a tiny ack, ``retrieve`` sends a tiny request and gets the block back.

lmcached ops: ``store`` (put), ``retrieve`` (get: a buffer the caller owns; blocks above 16 MiB
are joined from sub-frames, one copy; from shared memory, zero-copy views),
``retrieve_into`` (get_into: copied into memory the caller reuses, as an engine loads into its
KV cache) and, over shm only, ``store_buffer`` (put of blocks that lie in a
``Client.buffer``). Each call moves a prompt's worth of blocks (at least 32 MiB: 16 blocks of
2 MiB, 128 of 256 KiB) under keys shaped like a prompt's, so that its blocks all live on one
worker, as an engine's do (lmcached.routing), and ``retrieve`` reads every byte it got (xxh3) before it counts, so a view
never read does not count as fast. Transports: ``shm`` (the same-host shared-memory path),
``ipc`` and ``tcp`` (ZMQ only). Every figure is printed with its ratio to the ZMQ baseline of
the same transport and direction (ipc for shm) and to memcpy of the same size.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from typing import Any

import yaml

from lmcached import protocol
from lmcached.bench.common import (
    MiB,
    ProgressBar,
    Report,
    Row,
    memcpy_gbps,
    progress,
    set_progress_bar,
)
from lmcached.config import byte_size
from lmcached.malloc import tune_for_large_messages

FRAME = 16 * MiB
CALL_BYTES = 32 * MiB


# ------------------------------------------------------------------------------ baselines
def _zmq_echo_server(endpoint_q: Any, transport: str, ipc_dir: str) -> None:
    import zmq

    tune_for_large_messages()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    if transport == "ipc":
        ep = f"ipc://{ipc_dir}/raw.sock"
        sock.bind(ep)
    else:
        ep = f"tcp://127.0.0.1:{sock.bind_to_random_port('tcp://127.0.0.1')}"
    endpoint_q.put(ep)
    kept: list[Any] = []
    while True:
        msg = sock.recv_multipart(copy=False)
        op = msg[1].bytes
        if op == b"quit":
            break
        if op == b"store":
            kept = msg[2:]  # hold the frames like a cache would
            sock.send_multipart([msg[0], b"ok"])
        elif op == b"load":
            sock.send_multipart([msg[0], b"ok", *kept], copy=False)
        else:  # lookup-sized header round trip
            sock.send_multipart([msg[0], b"x" * 16])
    sock.close(linger=0)
    ctx.term()


class RawZmq:
    """A bare ZMQ peer process, to measure the transport lmcached rides on."""

    def __init__(self, transport: str) -> None:
        import zmq

        self._dir = tempfile.mkdtemp(prefix="lmb-", dir="/tmp")
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        self.proc = ctx.Process(
            target=_zmq_echo_server, args=(q, transport, self._dir), daemon=True
        )
        self.proc.start()
        self.endpoint = q.get(timeout=30)
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.connect(self.endpoint)

    def store_gbps(self, size: int, total: int) -> float:
        block = memoryview(os.urandom(size))
        frames = [block[i : i + FRAME] for i in range(0, size, FRAME)]
        n = max(4, total // size)
        self.sock.send_multipart([b"store", *frames], copy=False)
        self.sock.recv()
        t = time.perf_counter()
        for _ in range(n):
            self.sock.send_multipart([b"store", *frames], copy=False)
            self.sock.recv()
        return n * size / (time.perf_counter() - t) / 1e9

    def retrieve_gbps(self, size: int, total: int) -> float:
        self.store_gbps(size, size * 4)
        n = max(4, total // size)
        t = time.perf_counter()
        for _ in range(n):
            self.sock.send(b"load")
            self.sock.recv_multipart(copy=False)
        return n * size / (time.perf_counter() - t) / 1e9

    def header_roundtrip_samples(self, header: bytes, n: int) -> list[float]:
        """Seconds of each of ``n`` back-to-back round trips of ``header`` (a tiny reply)."""
        samples = []
        for _ in range(n):
            t = time.perf_counter()
            self.sock.send_multipart([b"hdr", header])
            self.sock.recv()
            samples.append(time.perf_counter() - t)
        return samples

    def close(self) -> None:
        if self.sock.closed:
            return
        self.sock.send(b"quit")
        self.proc.join(10)
        self.sock.close(linger=0)
        self.ctx.term()
        # The ipc socket's folder: every bench run left one behind in /tmp.
        shutil.rmtree(self._dir, ignore_errors=True)


# ------------------------------------------------------------------------------ lmcached
def _client_loop(
    endpoint: str,
    transport: str,
    op: str,
    size: int,
    count: int,
    tag: str,
    start_at: float,
    out: Any,
    per_call: int,
) -> None:
    import xxhash

    from lmcached.client import Client

    value = os.urandom(size)
    calls = [
        # Shaped like a prompt's chunk keys (lmcached.keys): one route per call, so that, as
        # an engine's, a call's blocks all live on one worker.
        [
            f"bench/{tag}/{xxhash.xxh32_hexdigest(f'{tag}/{j}'.encode())}-{i:x}".encode()
            for i in range(per_call)
        ]
        for j in range(max(1, min(count, (256 * MiB) // (size * per_call))))
    ]
    values: list[Any] = [value] * per_call
    # retrieve_into: the caller's own, reused memory (an engine's KV cache)
    sinks = [bytearray(size) for _ in range(per_call)]
    with Client(
        endpoint,
        timeout=60,
        transport="tcp" if transport == "tcp" else "ipc",
        shared_memory=transport == "shm",
    ) as c:
        if op == "store_buffer":
            # An engine's host-side KV staging, allocated from the client: one block after
            # another in one buffer (distinct memory per block, unlike `store`'s one value).
            buf = c.buffer(size * per_call)
            for i in range(per_call):
                buf[i * size : (i + 1) * size] = value
            values = [buf[i * size : (i + 1) * size] for i in range(per_call)]
        # One warm-up pass over every key: the steady state of an engine whose client stays
        # open (pages of the staging file, the arena slots and the client's mappings touched
        # once; over ZMQ, the heap's buffers). First touches of tmpfs pages are slow here.
        for keys in calls:
            c.put(keys, values)
        for i in range(-len(calls), count):
            if i == 0:
                while time.time() < start_at:
                    time.sleep(0.001)
                lat = []
                t0 = time.perf_counter()
            keys = calls[i % len(calls)]
            t = time.perf_counter()
            if op in ("store", "store_buffer"):
                c.put(keys, values)
            elif op == "retrieve_into":
                if c.get_into(keys, sinks) != [True] * per_call:
                    raise RuntimeError(f"bench: a block of {keys[0]!r}... is missing")
            else:
                got = c.get(keys)
                for g in got:
                    if g is None or len(g) != size:
                        raise RuntimeError(f"bench: a block of {keys[0]!r}... is missing")
                    xxhash.xxh3_64_intdigest(g)  # read every byte before counting it
                del got, g  # views end their lease
            if i >= 0:
                lat.append(time.perf_counter() - t)
        out.put((time.perf_counter() - t0, lat))


def blocks_per_call(size: int, total: int) -> int:
    """Blocks per call: a prompt's worth, 32 MiB per call (less only when the point is smaller)."""
    return max(1, -(-min(CALL_BYTES, total) // size))


def workers_uss_without_arena(endpoint: str) -> list[float] | None:
    """Each worker's unique memory (MB), less its arena's pages; None off the daemon's host.

    The arena is the CPU tier's budget, counted on its own: what is left is the worker's own
    cost (heap, libzmq, threads), which the idle-USS target bounds.
    """
    try:
        import psutil

        from lmcached.client import Client

        with Client(endpoint, timeout=30) as c:
            workers = [(w.get("pid"), w.get("arena")) for w in c.cluster_map["workers"]]
        out = []
        for pid, arena in workers:
            private = 0
            for m in psutil.Process(pid).memory_maps(grouped=True):
                if arena and m.path == arena:
                    continue
                private += m.private_clean + m.private_dirty
            out.append(round(private / 1e6, 1))
        return out
    except Exception:  # another host, another user, a worker gone: nothing to report
        return None


def run_point(endpoint: str, transport: str, op: str, size: int, clients: int, total: int) -> Row:
    per_call = blocks_per_call(size, total)
    call_bytes = size * per_call
    count = max(4, total // call_bytes // clients)
    if clients == 1:
        q: Any = _ListQueue()
        _client_loop(endpoint, transport, op, size, count, f"{op}{size}", 0.0, q, per_call)
        results = q.items
    else:
        ctx = mp.get_context("spawn")
        mq = ctx.Queue()
        start_at = time.time() + 1.5
        procs = [
            ctx.Process(
                target=_client_loop,
                args=(
                    endpoint,
                    transport,
                    op,
                    size,
                    count,
                    f"{op}{size}c{i}",
                    start_at,
                    mq,
                    per_call,
                ),
            )
            for i in range(clients)
        ]
        for p in procs:
            p.start()
        results = [mq.get(timeout=300) for _ in procs]
        for p in procs:
            p.join(30)
    wall = max(r[0] for r in results)
    lat = sorted(x for r in results for x in r[1])
    return Row(
        op=op,
        size=size,
        transport=transport,
        clients=clients,
        gbps=count * clients * call_bytes / wall / 1e9,
        p50_ms=lat[len(lat) // 2] * 1e3,
        p99_ms=lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3,
    )


class _ListQueue:
    def __init__(self) -> None:
        self.items: list[Any] = []

    def put(self, item: Any) -> None:
        self.items.append(item)


def lookup_latency(endpoint: str, transport: str, raw: RawZmq, n: int) -> dict[str, Any]:
    from lmcached.client import Client
    from lmcached.keys import KeyBuilder

    kb = KeyBuilder(namespace="bench", model="lookup", chunk_size=256)
    keys = kb.chunk_keys(list(range(128 * 256)))
    shm = transport == "shm"
    wire = "ipc" if shm else transport
    with (
        Client(endpoint, timeout=30, transport=wire, shared_memory=shm) as c,
        Client(endpoint, timeout=30, transport=wire, shared_memory=False) as zc,
    ):
        c.put(keys, [b"x"] * len(keys))
        # The same header the client sends for this lookup, encoded by the wire module.
        header = protocol.encode_request(protocol.LookupRequest(keys=keys, id=1 << 20))
        samples: list[float] = []
        bare_samples: list[float] = []
        # Over shm the lookup is answered from the worker's presence index; the same lookup as
        # a ZMQ round trip is timed too. Each is timed back to back, as the bare round trip
        # is, in rounds that take turns so that every figure sees the same load.
        zmq_samples: list[float] = []
        rounds = 3
        for _ in range(rounds):
            for client, into in ((c, samples), (zc, zmq_samples)) if shm else ((c, samples),):
                for _ in range(n // rounds):
                    t = time.perf_counter()
                    hit = client.lookup(keys)
                    into.append(time.perf_counter() - t)
                if hit != len(keys):
                    raise RuntimeError(f"bench: lookup found {hit} of {len(keys)} keys")
            bare_samples.extend(raw.header_roundtrip_samples(header, n // rounds))
        c.delete(keys)
        # An engine mostly looks up prompts its process has not seen: keys this client has
        # never routed (stored by another client), each prompt looked up once.
        prompts = [
            KeyBuilder(namespace="bench", model=f"fresh{i}", chunk_size=256).chunk_keys(
                list(range(128 * 256))
            )
            for i in range(n)
        ]
        with Client(endpoint, timeout=30, transport="ipc") as writer:
            for pk in prompts:
                writer.put(pk, [b"x"] * len(pk))
        fresh = []
        for pk in prompts:
            t = time.perf_counter()
            hit = c.lookup(pk)
            fresh.append(time.perf_counter() - t)
            if hit != len(pk):
                raise RuntimeError(f"bench: fresh lookup found {hit} of {len(pk)} keys")
        for pk in prompts:
            c.delete(pk)
    bare = statistics.median(bare_samples)
    p50 = statistics.median(samples)
    out: dict[str, Any] = {
        "keys": 128,
        "path": "shm index" if shm else transport,
        "p50_us": p50 * 1e6,
        "bare_zmq_p50_us": bare * 1e6,
        "ratio": p50 / bare,
    }
    if zmq_samples:
        out["zmq_p50_us"] = statistics.median(zmq_samples) * 1e6
        out["zmq_ratio"] = out["zmq_p50_us"] / out["bare_zmq_p50_us"]
    out["fresh_p50_us"] = statistics.median(fresh) * 1e6
    out["fresh_ratio"] = out["fresh_p50_us"] / out["bare_zmq_p50_us"]
    from lmcached.bench.workloads import redis_exists_p50_us, redis_server

    with redis_server() as r:
        if r is not None:
            out["redis_exists_p50_us"] = redis_exists_p50_us(r, keys, n)
            out["redis_ratio"] = p50 * 1e6 / out["redis_exists_p50_us"]
    out["tokens"] = 128 * 256
    return out


# ----------------------------------------------------------------------------------- main
def _parse_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def run(args: argparse.Namespace) -> Report:
    from lmcached.bench import workloads as wl
    from lmcached.testing import DaemonProcess

    workloads = _parse_list(args.workload)
    if workloads == ["all"]:
        workloads = ["throughput", "lookup", "mixed", "tiers"]
    unknown = set(workloads) - {"throughput", "lookup", "mixed", "tiers"}
    if unknown:
        raise SystemExit(f"lmcached bench: unknown workload(s) {', '.join(sorted(unknown))}")
    sizes = [byte_size(s) for s in _parse_list(args.sizes)]
    clients = [int(c) for c in _parse_list(args.clients)]
    transports = _parse_list(args.transports)
    total = byte_size(args.bytes_per_point)
    repeats = args.repeats
    mixed = {
        "prompts": args.prompts,
        "chunks_per_prompt": args.chunks,
        "requests": args.requests,
        "zipf_s": args.zipf,
        "block_size": byte_size(args.mixed_block),
        "budget_fraction": args.budget_fraction,
    }
    tier_block, tier_blocks = byte_size(args.tier_block), args.tier_blocks
    if args.quick:
        sizes = [64 * 1024, 1 * MiB]
        clients = [1]
        total = 8 * MiB
        repeats = 1
        mixed.update(prompts=12, chunks_per_prompt=4, requests=60, block_size=64 * 1024)
        tier_block, tier_blocks = 64 * 1024, 8
    tune_for_large_messages()
    report = Report(workloads=workloads)
    steps = 0
    if "throughput" in workloads:
        steps += len(sizes) * (1 + len(transports) * (1 + 3 * len(clients))) + len(sizes)
        steps += len(sizes) * len(clients) * ("shm" in transports)  # store_buffer
    steps += ("lookup" in workloads) + 2 * ("mixed" in workloads)
    steps += (1 + len(wl.available_tiers())) * ("tiers" in workloads)  # upper bound
    bar = ProgressBar(steps)
    set_progress_bar(bar)
    daemon = None
    endpoint = args.endpoint
    if endpoint is None:
        overrides: dict[str, Any] = {}
        if args.config:
            with open(args.config) as f:
                overrides = yaml.safe_load(f) or {}
        overrides["port"] = 0
        overrides.pop("runtime_dir", None)  # the private daemon gets its own runtime folder
        if "tcp" in transports:
            # TCP is off by default and always CURVE when on (every endpoint, ipc included).
            overrides["enable_tcp"] = True
        overrides.setdefault("max_local_cpu_size", "2GiB")
        overrides.setdefault("log_level", "warning")
        progress("starting a private daemon")
        daemon = DaemonProcess(**overrides).start()
        endpoint = daemon.endpoint
    try:
        from lmcached.client import Client

        with Client(endpoint, timeout=30) as c:
            status = c.stats()
            has_tcp = all(w.get("tcp") for w in c.cluster_map["workers"])
        if "tcp" in transports and not has_tcp:
            # Never measure ipc under the name tcp: a daemon without enable_tcp has no TCP.
            progress("skipping tcp: the daemon serves no TCP endpoint (enable_tcp is off)")
            transports = [t for t in transports if t != "tcp"]
        report.memory["idle_worker_uss_mb"] = [
            round((w.get("memory") or {}).get("uss", 0) / 1e6, 1) for w in status["workers"]
        ]
        for size in sizes if "throughput" in workloads else []:
            progress(f"memcpy {size // 1024} KiB")
            report.memcpy[str(size)] = max(memcpy_gbps(size, total) for _ in range(repeats))
        if "throughput" in workloads:
            with wl.redis_server() as r:
                for size in sizes if r is not None else []:
                    progress(f"redis-py {size // 1024} KiB")
                    best = max(
                        (wl.redis_set_get_gbps(r, size, total) for _ in range(repeats)),
                        key=lambda sg: sg[0] + sg[1],
                    )
                    report.redis[f"set/{size}"], report.redis[f"get/{size}"] = best
        for transport in transports if {"throughput", "lookup"} & set(workloads) else []:
            if transport not in ("shm", "ipc", "tcp"):
                raise SystemExit(f"lmcached bench: unknown transport {transport!r}")
            # The shm path is compared with bare ZMQ over ipc, what it replaces.
            raw_transport = "ipc" if transport == "shm" else transport
            raw = RawZmq(raw_transport)
            try:
                for size in sizes if "throughput" in workloads else []:
                    if f"store/{raw_transport}/{size}" in report.zmq:
                        continue
                    progress(f"raw zmq {raw_transport} {size // 1024} KiB")
                    report.zmq[f"store/{raw_transport}/{size}"] = max(
                        raw.store_gbps(size, total) for _ in range(repeats)
                    )
                    report.zmq[f"retrieve/{raw_transport}/{size}"] = max(
                        raw.retrieve_gbps(size, total) for _ in range(repeats)
                    )
                if transport == transports[0] and "lookup" in workloads:
                    progress("lookup of 128 keys (a 32k-token prompt)")
                    report.lookup = lookup_latency(
                        endpoint, transport, raw, 50 if args.quick else 300
                    )
            finally:
                raw.close()
            ops = ["store", "retrieve", "retrieve_into"]
            if transport == "shm":
                ops.append("store_buffer")  # a put from Client.buffer: same host only
            for size in sizes if "throughput" in workloads else []:
                for op in ops:
                    for n in clients:
                        progress(f"lmcached {op} {transport} {size // 1024} KiB x{n} clients")
                        best_row = max(
                            (
                                run_point(endpoint, transport, op, size, n, total)
                                for _ in range(repeats)
                            ),
                            key=lambda r: r.gbps,
                        )
                        base_op = "store" if op == "store_buffer" else op.replace("_into", "")
                        base = report.zmq.get(f"{base_op}/{raw_transport}/{size}")
                        best_row.baseline_gbps = base
                        best_row.ratio = best_row.gbps / base if base else None
                        copy = report.memcpy.get(str(size))
                        best_row.memcpy_ratio = best_row.gbps / copy if copy else None
                        redis_op = "set" if base_op == "store" else "get"
                        redis_base = report.redis.get(f"{redis_op}/{size}")
                        best_row.redis_gbps = redis_base
                        best_row.redis_ratio = best_row.gbps / redis_base if redis_base else None
                        report.rows.append(best_row)
        if "throughput" in workloads:
            after = workers_uss_without_arena(endpoint)
            if after is not None:
                report.memory["worker_uss_after_mb"] = after
        by = {(r.op, r.transport, r.clients, r.size): r.gbps for r in report.rows}
        if 2 * MiB in sizes and 32 * MiB in sizes:
            for (op, tr, n, size), g in by.items():
                if size == 32 * MiB and (op, tr, n, 2 * MiB) in by:
                    report.checks[f"32MiB_vs_2MiB/{op}/{tr}/x{n}"] = round(
                        g / by[(op, tr, n, 2 * MiB)], 3
                    )
        daemon_overrides = {"log_level": "warning"}
        if "mixed" in workloads:
            report.mixed = wl.run_mixed(mixed, bar, daemon_overrides)
        if "tiers" in workloads:

            def zmq_retrieve(size: int) -> float:
                raw = RawZmq("ipc")
                try:
                    return raw.retrieve_gbps(size, tier_block * tier_blocks)
                finally:
                    raw.close()

            report.tiers = wl.run_tiers(
                tier_block, tier_blocks, bar, daemon_overrides, zmq_retrieve
            )
    finally:
        if daemon is not None:
            daemon.close()
        bar.finish()
        set_progress_bar(None)
    return report


def _fmt_block(size: int) -> str:
    return f"{size // MiB}MiB" if size >= MiB and size % MiB == 0 else f"{size // 1024}KiB"


def render(report: Report) -> str:
    lines = []
    if report.memcpy or report.zmq or report.redis:
        lines += ["", "baselines (same run):"]
    for size, g in report.memcpy.items():
        lines.append(f"  memcpy            {_fmt_block(int(size)):>8}  {g:6.2f} GB/s")
    for k, g in report.zmq.items():
        op, tr, size = k.split("/")
        lines.append(f"  raw zmq {op:<8} {tr} {_fmt_block(int(size)):>8}  {g:6.2f} GB/s")
    for k, g in report.redis.items():
        op, _, size = k.partition("/")
        lines.append(f"  redis-py {op:<12} {_fmt_block(int(size)):>8}  {g:6.2f} GB/s")
    if report.rows:
        lines.append("")
        lines.append(
            f"{'op':<14}{'transport':<10}{'clients':>7}{'block':>9}{'GB/s':>8}{'p50 ms':>9}"
            f"{'p99 ms':>9}{'zmq GB/s':>10}{'x zmq':>7}{'x memcpy':>9}{'redis GB/s':>11}"
            f"{'x redis':>8}"
        )
        for r in report.rows:
            lines.append(
                f"{r.op:<14}{r.transport:<10}{r.clients:>7}{_fmt_block(r.size):>9}{r.gbps:>8.2f}"
                f"{r.p50_ms or 0:>9.2f}{r.p99_ms or 0:>9.2f}{r.baseline_gbps or 0:>10.2f}"
                f"{r.ratio or 0:>7.2f}{r.memcpy_ratio or 0:>9.2f}{r.redis_gbps or 0:>11.2f}"
                f"{r.redis_ratio or 0:>8.2f}"
            )
    if report.lookup:
        lk = report.lookup
        lines.append("")
        line = (
            f"lookup of {lk['keys']} keys ({lk.get('tokens', 0)} tokens, {lk.get('path', '?')}): "
            f"p50 {lk['p50_us']:.0f} us; "
            f"bare zmq round trip, same payload {lk['bare_zmq_p50_us']:.0f} us (x{lk['ratio']:.2f})"
        )
        if "redis_exists_p50_us" in lk:
            line += (
                f"; redis-py EXISTS {lk['redis_exists_p50_us']:.0f} us (x{lk['redis_ratio']:.2f})"
            )
        lines.append(line)
        if "zmq_p50_us" in lk:
            lines.append(
                f"  the same lookup as a zmq round trip (shared memory off): p50 "
                f"{lk['zmq_p50_us']:.0f} us (x{lk['zmq_ratio']:.2f} the bare round trip)"
            )
        if "fresh_p50_us" in lk:
            lines.append(
                f"  each prompt new to the client: p50 {lk['fresh_p50_us']:.0f} us "
                f"(x{lk['fresh_ratio']:.2f} the bare round trip)"
            )
    if report.mixed:
        m = report.mixed
        lines += [
            "",
            f"mixed: {m['requests']} requests over {m['prompts']} prompts x {m['chunks_per_prompt']} "
            f"chunks of {_fmt_block(m['block_size'])}, Zipf s={m['zipf_s']}, budget "
            f"{m['budget_bytes'] / MiB:.0f} MiB = {m['budget_fraction']:.0%} of the working set; "
            f"memcpy {m['memcpy_gbps']:.2f} GB/s",
            f"  {'':<10}{'req/s':>9}{'hit rate':>10}{'hit GB/s':>10}",
        ]
        for name in ("lmcached", "redis"):
            res = m.get(name)
            if res:
                lines.append(
                    f"  {name:<10}{res['requests_per_s']:>9.0f}{res['hit_rate']:>10.1%}"
                    f"{res['retrieved_gbps']:>10.2f}"
                )
        if m.get("ratio_requests_per_s"):
            lines.append(
                f"  lmcached / redis-py requests per second: x{m['ratio_requests_per_s']:.2f}"
            )
    if report.tiers:
        t = report.tiers
        redis_get = t.get("redis_get_gbps") or 0
        lines += [
            "",
            f"tiers: retrieve of {t['blocks']} blocks of {_fmt_block(t['block_size'])}; baselines "
            f"memcpy {t['memcpy_gbps']:.2f}, raw zmq {t['zmq_retrieve_gbps']:.2f}, "
            f"redis-py GET {redis_get:.2f} GB/s",
            f"  {'tier':<8}{'GB/s':>7}{'hits':>9}{'p50 ms':>9}{'p99 ms':>9}{'x memcpy':>10}"
            f"{'x zmq':>7}{'x redis':>9}",
        ]
        for row in t["rows"]:
            lines.append(
                f"  {row['tier']:<8}{row['gbps']:>7.2f}{row['hits']:>5}/{row['asked']:<3}"
                f"{row['p50_ms']:>9.2f}{row['p99_ms']:>9.2f}{row['ratio_to_memcpy']:>10.2f}"
                f"{row['ratio_to_zmq']:>7.2f}{row.get('ratio_to_redis') or 0:>9.2f}"
            )
    if report.tiers.get("detail"):
        from lmcached.bench.tiers import render_tiers

        lines.append(render_tiers(report.tiers["detail"]))
    if report.checks:
        lines.append("")
        for k, v in report.checks.items():
            lines.append(f"{k}: {v}")
    if report.memory:
        lines.append(f"idle worker USS (MB): {report.memory.get('idle_worker_uss_mb')}")
        if "worker_uss_after_mb" in report.memory:
            lines.append(
                "worker USS after the throughput runs, arena pages not counted (MB): "
                f"{report.memory['worker_uss_after_mb']}"
            )
    # Imported here: every `lmcached` command imports this module to build its parser, and the
    # scheduler (`lmcached start`) loads no storage code.
    from lmcached.storage import eviction_trace

    lines.extend(["", *eviction_trace.summary_lines()])  # deterministic hit counts, no timing
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    report = run(args)
    # With --json - the JSON owns stdout, so the table goes to stderr.
    print(render(report), file=sys.stderr if args.json == "-" else sys.stdout)
    if args.json:
        doc = asdict(report)
        text = json.dumps(doc, indent=2)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text)
    if args.plot:
        from lmcached.bench.workloads import plot

        plot(report, args.plot)
        print(f"plot written to {args.plot}", file=sys.stderr)
    return 0
