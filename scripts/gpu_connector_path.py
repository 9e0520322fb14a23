#!/usr/bin/env python3
"""The vLLM connector's worker-side GPU path through a real daemon, without vLLM.

vLLM drives LMCachedConnector through ``wait_for_save`` (gather the step's chunks out of the
paged KV into host buffers, then put them) and ``start_load_kv`` / ``wait_for_layer_load``
(get the chunks, then copy them in layer by layer on a side stream). This script runs that
same sequence with the connector's own classes (``PagedKV``, ``HostBufferPool``,
``HostRegistrations``, ``LayerLoads``, ``CudaOrder``, ``DaemonLink``) on vLLM-shaped paged KV
tensors, against a private ``lmcached start`` (or ``--endpoint``):

* save: gather each chunk on the device into a registered slab of ``Client.buffer`` memory,
  then put the chunks in one call;
* load: one batched ``get`` (zero-copy views of the worker's shared-memory arena), the arenas
  registered with CUDA once, each layer's host-to-device copies on the side stream, and the
  "forward" stream waiting on each layer's event;
* every loaded block is compared with the saved one, on the device.

Figures (median of ``--repeats``): save and load times, their GB/s, and the same bytes copied
between the device and one pinned torch buffer (the PCIe ceiling of each direction). With
``--device cpu`` it runs the CPU path instead (HostOrder, no registration), which the test
suite uses to keep the script working on hosts without a GPU.

    python scripts/gpu_connector_path.py                 # Llama-3-8B-shaped KV, 4,096 tokens
    python scripts/gpu_connector_path.py --model bench --tokens 2048 --device cpu
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any

CHUNK_TOKENS = 256
BLOCK_SIZE = 16


@dataclass(frozen=True)
class KVShape:
    layers: int
    kv_heads: int
    head_size: int
    dtype: str


MODELS = {
    # Llama-3-8B: 32 layers, 8 KV heads of 128, bf16 -> 128 KiB per token, 32 MiB per chunk.
    "llama8b": KVShape(32, 8, 128, "bfloat16"),
    # lmcached.testing.tiny_llama.BENCH_25M: 16 KiB per token, 4 MiB per chunk.
    "bench": KVShape(8, 4, 64, "float32"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="llama8b")
    parser.add_argument("--tokens", type=int, default=4096, help="a multiple of 256")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--endpoint", help="a running daemon (default: start a private one)")
    parser.add_argument("--workers", type=int, default=2, help="workers of the private daemon")
    parser.add_argument(
        "--kill-workers",
        action="store_true",
        help="kill -9 every worker after the first measured round (private daemon only): the "
        "rounds after it run on the restarted workers' new arenas",
    )
    parser.add_argument(
        "--batched",
        choices=["auto", "on", "off"],
        default="auto",
        help="copy many chunks per layer at once (auto: on a GPU, as the connector does)",
    )
    args = parser.parse_args(argv)
    if args.tokens <= 0 or args.tokens % CHUNK_TOKENS:
        parser.error(f"--tokens must be a positive multiple of {CHUNK_TOKENS}")
    if args.kill_workers and args.endpoint:
        parser.error("--kill-workers needs the private daemon (no --endpoint)")

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device")
        return 0
    shape = MODELS[args.model]
    device = torch.device(args.device)
    dtype = getattr(torch, shape.dtype)
    element = torch.tensor([], dtype=dtype).element_size()
    chunks = args.tokens // CHUNK_TOKENS
    blocks_per_chunk = CHUNK_TOKENS // BLOCK_SIZE
    # The engine's pool: room for the saved prompt and for a second copy loaded elsewhere.
    num_blocks = 2 * chunks * blocks_per_chunk + 64
    layers = {
        f"model.layers.{i}.self_attn.attn": torch.zeros(
            2, num_blocks, BLOCK_SIZE, shape.kv_heads, shape.head_size, dtype=dtype, device=device
        )
        for i in range(shape.layers)
    }
    chunk_nbytes = 2 * BLOCK_SIZE * shape.kv_heads * shape.head_size * element * shape.layers
    chunk_nbytes *= blocks_per_chunk
    total = chunk_nbytes * chunks
    max_block = max(64 << 20, chunk_nbytes)
    # A prompt's chunks all go to one worker (docs/same-host.md, routing): room for three.
    per_worker = max(256 << 20, 3 * total)

    daemon: Any = None
    if args.endpoint is None:
        from lmcached.testing.daemon_process import DaemonProcess

        daemon = DaemonProcess(
            num_workers=args.workers,
            max_local_cpu_size=f"{per_worker * args.workers // 2**20}MiB",
            max_block_size=f"{max_block // 2**20}MiB",
            max_inflight_bytes=f"{4 * max_block // 2**20}MiB",
            metrics_port=None,
        ).start(timeout=60)
    endpoint = args.endpoint or daemon.endpoint
    try:
        return _run(args, torch, device, layers, num_blocks, chunks, blocks_per_chunk, endpoint)
    finally:
        if daemon is not None:
            daemon.close()


def _run(
    args: argparse.Namespace,
    torch: Any,
    device: Any,
    layers: dict[str, Any],
    num_blocks: int,
    chunks: int,
    blocks_per_chunk: int,
    endpoint: str,
) -> int:
    from lmcached.client import Client
    from lmcached.integrations.daemon_link import DaemonLink
    from lmcached.integrations.kv_blocks import (
        HostBufferPool,
        HostRegistrations,
        PagedKV,
        layer_order,
        payload_tensor,
    )
    from lmcached.integrations.layer_loads import CudaOrder, DeviceOrder, HostOrder, LayerLoads

    on_gpu = device.type == "cuda"
    batch = {"auto": None, "on": True, "off": False}[args.batched]
    paged = PagedKV(layers, num_blocks)
    forward_layers = layer_order(paged.names)
    index = {name: i for i, name in enumerate(paged.names)}
    total = paged.block_nbytes * blocks_per_chunk * chunks
    gen = torch.Generator(device=device).manual_seed(0)
    for tensor in paged.tensors:  # random KV (bit patterns, so NaNs and all are covered)
        raw = tensor.view(torch.uint8)
        raw.copy_(torch.randint(0, 256, raw.shape, dtype=torch.uint8, generator=gen, device=device))
    # A request's blocks are scattered over the pool; the load goes to other scattered blocks.
    order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(1)).tolist()
    saved = [order[c * blocks_per_chunk : (c + 1) * blocks_per_chunk] for c in range(chunks)]
    rest = order[chunks * blocks_per_chunk :]
    loaded = [rest[c * blocks_per_chunk : (c + 1) * blocks_per_chunk] for c in range(chunks)]

    registrations = HostRegistrations(torch.cuda.cudart()) if on_gpu else None
    arenas_seen: set[int] = set()  # addresses of every arena mapping registered

    def register_buffers(address: int, size: int) -> bool:
        assert registrations is not None
        return registrations.register(address, size, read_only=False)

    pool = HostBufferPool(
        paged.block_nbytes * blocks_per_chunk,
        pin=on_gpu,
        register=register_buffers if on_gpu else None,
    )
    link = DaemonLink(
        lambda: Client(endpoint, timeout=60.0),
        logging.getLogger("gpu_connector_path"),
        60.0,
        retry_interval=0.5,
    )
    device_order: DeviceOrder = CudaOrder(torch.cuda, device) if on_gpu else HostOrder()

    def sync() -> None:
        if on_gpu:
            torch.cuda.synchronize(device)

    turn = iter(range(1 << 30))

    def save() -> tuple[list[bytes], float, float]:
        """wait_for_save's gather, then _Saver's put; returns keys, gather s, put s."""
        keys = [f"gpu-path/{next(turn)}/{c}".encode() for c in range(chunks)]
        buffers = pool.acquire(chunks)
        sync()
        started = time.perf_counter()
        paged.gather_chunks(list(zip(saved, buffers, strict=True)), batch)  # wait_for_save
        gathered = time.perf_counter()
        ok = link.put(keys, [buffer.numpy() for buffer in buffers])
        deadline = time.monotonic() + 30
        while not ok and args.kill_workers and time.monotonic() < deadline:
            time.sleep(link.down_for() + 0.05)  # a call that met the restart marks it down
            ok = link.put(keys, [buffer.numpy() for buffer in buffers])
        put_done = time.perf_counter()
        pool.release(buffers)
        if not ok:
            raise SystemExit(f"the daemon did not take the save (link failures: {link.failures})")
        return keys, gathered - started, put_done - gathered

    def load(keys: list[bytes]) -> tuple[float, float]:
        """start_load_kv + wait_for_layer_load per layer; returns get s, get-to-usable s."""
        sync()
        started = time.perf_counter()
        values = link.get(keys)
        got = time.perf_counter()
        if registrations is not None:  # LMCachedConnector._register_arenas, after the get
            registrations.register_arenas(link.arenas())
            arenas_seen.update(registrations.arenas)
        if any(v is None for v in values):
            missing = [i for i, v in enumerate(values) if v is None]
            raise SystemExit(f"saved chunks {missing} of {len(keys)} were not found")
        pieces = [payload_tensor(v) for v in values]
        views = [paged.views(piece, blocks_per_chunk) for piece in pieces]
        # As start_load_kv does when a load ends inside a block (the usual case): that block is
        # copied first, whole, on the forward stream; the loader copies the others.
        last, edge = len(pieces) - 1, blocks_per_chunk - 1
        paged.scatter(pieces[last], loaded[last], [edge])
        rest = [None if c != last else list(range(edge)) for c in range(len(pieces))]

        def work(done: Any) -> None:  # LMCachedConnector._load_layers
            plan = paged.load_plan(list(zip(loaded, rest, strict=True)), batch)
            for position, name in enumerate(forward_layers):
                layer = index[name]
                paged.load_layer(layer, [piece_views[layer] for piece_views in views], plan)
                done(position)

        loads = LayerLoads(forward_layers, device_order)
        loads.sources = pieces
        loads.start(work)
        for name in forward_layers:  # the forward pass asks for each layer before its attention
            loads.wait(name)
        if on_gpu:
            torch.cuda.current_stream(device).synchronize()
        usable = time.perf_counter()
        loads.join()
        if loads.error is not None:
            raise SystemExit(f"the layer-wise load failed: {loads.error!r}")
        lost = link.lost(values)  # LMCachedConnector._report_lost
        if lost:
            raise SystemExit(f"chunks {lost} outlived their lease during the load")
        return got - started, usable - started

    def check() -> None:
        for c in range(chunks):
            src = torch.tensor(saved[c], device=device)
            dst = torch.tensor(loaded[c], device=device)
            for tensor, layout in zip(paged.tensors, paged.layouts, strict=True):
                # Compared as bytes: random bit patterns include NaNs, which never equal.
                if not torch.equal(
                    tensor.index_select(layout.block_dim, src).view(torch.uint8),
                    tensor.index_select(layout.block_dim, dst).view(torch.uint8),
                ):
                    raise SystemExit(f"chunk {c} of {layout.name} differs after the load")
        targets = torch.tensor([b for blocks in loaded for b in blocks], device=device)
        for tensor, layout in zip(paged.tensors, paged.layouts, strict=True):
            # The next round must not pass on this round's bytes.
            tensor.index_fill_(layout.block_dim, targets, 0)

    def ceiling() -> tuple[float, float]:
        """Seconds to copy ``total`` bytes host->device and device->host with a pinned buffer."""
        if not on_gpu:
            return 0.0, 0.0
        host = torch.empty(total, dtype=torch.uint8, pin_memory=True)
        dev = torch.empty(total, dtype=torch.uint8, device=device)
        h2d, d2h = [], []
        for _ in range(args.repeats + 1):
            sync()
            t = time.perf_counter()
            dev.copy_(host, non_blocking=True)
            sync()
            h2d.append(time.perf_counter() - t)
            t = time.perf_counter()
            host.copy_(dev, non_blocking=True)
            sync()
            d2h.append(time.perf_counter() - t)
        return statistics.median(h2d[1:]), statistics.median(d2h[1:])

    rows: dict[str, list[float]] = {"gather": [], "put": [], "get": [], "load": []}
    try:
        for round_ in range(args.repeats + 1):  # the first round warms up (and registers)
            keys, gather_s, put_s = save()
            get_s, load_s = load(keys)
            check()
            if round_:
                for name, value in zip(rows, (gather_s, put_s, get_s, load_s), strict=True):
                    rows[name].append(value)
            if round_ == 1 and args.kill_workers:
                _kill_workers(Client, endpoint)
        h2d, d2h = ceiling()
    finally:
        link.close()
        failures = registrations.failures if registrations is not None else 0
        if registrations is not None:
            registrations.close()
    med = {name: statistics.median(values) for name, values in rows.items()}
    where = torch.cuda.get_device_name(device) if on_gpu else "cpu"
    print(
        f"{args.model} KV, {args.tokens} tokens: {chunks} chunks of "
        f"{total / chunks / 2**20:g} MiB "
        f"({total / 2**20:.0f} MiB), {len(paged.names)} layers, on {where}"
    )
    if on_gpu:
        print(
            f"save slabs registered with CUDA: {pool.shared}; arena mappings registered: "
            f"{len(arenas_seen)}; registration failures: {failures}"
        )
    save_s = med["gather"] + med["put"]
    print(f"{'step':34} {'ms':>9} {'GB/s':>7} {'x pinned copy':>14}")
    lines = [
        ("save: gather into host buffers", med["gather"], d2h),
        ("save: put", med["put"], 0.0),
        ("save: total", save_s, d2h),
        ("load: get (views)", med["get"], 0.0),
        ("load: get until last layer usable", med["load"], h2d),
    ]
    if on_gpu:
        lines += [("pinned buffer -> device", h2d, h2d), ("device -> pinned buffer", d2h, d2h)]
    for label, seconds, base in lines:
        ratio = f"{base / seconds:14.2f}" if base else f"{'':14}"
        print(f"{label:34} {seconds * 1e3:9.2f} {total / seconds / 1e9:7.2f} {ratio}")
    batched = paged.batched if batch is None else batch
    print(f"every load checked block for block ({args.repeats + 1} rounds, batched: {batched})")
    return 0


def _kill_workers(client_class: Any, endpoint: str) -> None:
    """kill -9 every worker of the daemon and wait until each is back (a new arena each)."""
    import os
    import signal

    from lmcached.testing import wait_until

    with client_class(endpoint, timeout=30.0) as client:
        before = {w["id"]: w["pid"] for w in client.control("map")["map"]["workers"]}
        for pid in before.values():
            os.kill(pid, signal.SIGKILL)

        def restarted() -> bool:
            workers = client.control("map")["map"]["workers"]
            return all(w["state"] == "up" and w["pid"] != before[w["id"]] for w in workers)

        wait_until(restarted, 60, interval=0.1, what="the workers' restart")
    print(f"killed {len(before)} workers with SIGKILL after round 1; all restarted")


if __name__ == "__main__":
    sys.exit(main())
