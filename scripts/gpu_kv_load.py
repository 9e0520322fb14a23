"""Load a 2,048-token KV into vLLM-shaped paged KV tensors on a GPU: pageable vs pinned vs
registered host memory, on a side stream ordered by CUDA events. Needs only torch.

    python scripts/gpu_kv_load.py [--arena /dev/shm/FILE] [--repeats 20]

The KV is the benchmark model's (lmcached.testing.tiny_llama.BENCH_25M: 8 layers, 4 KV heads,
head size 64, float32, block size 32): 16 KiB per token, 32 MiB for 2,048 tokens, stored as
lmcached's connector stores it (per 256-token chunk: every layer's 8 blocks, layer after layer).
The destination is one tensor per layer shaped like vLLM's CUDA paged KV cache,
``[2, num_blocks, block_size, kv_heads, head_size]``, and the chunk's blocks go to scattered
block ids, as in a real engine.

Sources compared (each copies the same bytes with ``index_copy_`` from a host view):

* ``pageable``: ordinary host memory (a synchronous, staged copy);
* ``pinned``: ``torch.empty(..., pin_memory=True)``;
* ``registered``: ordinary memory page-locked in place with ``cudaHostRegister``, as the
  connector does with the daemon's shared-memory arena (``--arena FILE`` maps that file, e.g.
  a running daemon's arena in /dev/shm, instead of an anonymous buffer).

For pinned and registered sources the copies run on a side stream, one CUDA event per layer,
and the "forward" stream waits on each layer's event (the host never blocks): the figure is
the time until the last layer is usable on the forward stream. On a host without CUDA it
prints "no CUDA device" and exits 0.
"""

from __future__ import annotations

import argparse
import mmap
import statistics
import sys
import time
from typing import Any

LAYERS = 8
KV_HEADS = 4
HEAD_SIZE = 64
BLOCK_SIZE = 32
CHUNK_TOKENS = 256
TOKENS = 2048
NUM_BLOCKS = 1024  # the engine's pool; the prompt's blocks are scattered over it


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--arena", help="a file to map and register (e.g. a daemon's arena)")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("no CUDA device")
        return 0
    device = torch.device("cuda", 0)
    dtype = torch.float32
    element = torch.tensor([], dtype=dtype).element_size()
    block_nbytes_layer = 2 * BLOCK_SIZE * KV_HEADS * HEAD_SIZE * element
    blocks_per_chunk = CHUNK_TOKENS // BLOCK_SIZE
    chunks = TOKENS // CHUNK_TOKENS
    chunk_nbytes = block_nbytes_layer * blocks_per_chunk * LAYERS
    total = chunk_nbytes * chunks
    print(f"KV: {TOKENS} tokens, {total / 2**20:.1f} MiB, {chunks} chunks of {CHUNK_TOKENS}")

    kv = [
        torch.zeros(2, NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_SIZE, dtype=dtype, device=device)
        for _ in range(LAYERS)
    ]
    gen = torch.Generator().manual_seed(0)
    block_ids = torch.randperm(NUM_BLOCKS, generator=gen)[: chunks * blocks_per_chunk]
    payload = torch.randint(0, 256, (total,), dtype=torch.uint8, generator=gen)

    sources: dict[str, Any] = {}
    sources["pageable"] = payload.clone()
    sources["pinned"] = torch.empty(total, dtype=torch.uint8, pin_memory=True)
    sources["pinned"].copy_(payload)
    keep: list[Any] = []
    if args.arena:
        with open(args.arena, "r+b") as f:
            mapping = mmap.mmap(f.fileno(), 0)
        if len(mapping) < total:
            raise SystemExit(f"{args.arena} has {len(mapping)} bytes, fewer than {total}")
        keep.append(mapping)
        registered = torch.frombuffer(mapping, dtype=torch.uint8, count=total)
    else:
        registered = torch.empty(total, dtype=torch.uint8)  # ordinary (pageable) memory
    registered.copy_(payload)
    cudart = torch.cuda.cudart()
    code = cudart.cudaHostRegister(registered.data_ptr(), total, 0)
    if int(code) != 0:
        raise SystemExit(f"cudaHostRegister failed: {code}")
    sources["registered"] = registered

    def views(buffer: Any, chunk: int) -> list[Any]:
        """One view per layer of chunk ``chunk``: [2, blocks, block_size, heads, head]."""
        base = chunk * chunk_nbytes
        per_layer = block_nbytes_layer * blocks_per_chunk
        out = []
        for layer in range(LAYERS):
            start = base + layer * per_layer
            flat = buffer[start : start + per_layer].view(dtype)
            out.append(flat.view(2, blocks_per_chunk, BLOCK_SIZE, KV_HEADS, HEAD_SIZE))
        return out

    chunk_views = {name: [views(buf, c) for c in range(chunks)] for name, buf in sources.items()}
    targets = [
        block_ids[c * blocks_per_chunk : (c + 1) * blocks_per_chunk].to(device)
        for c in range(chunks)
    ]
    side = torch.cuda.Stream(device)
    forward = torch.cuda.current_stream(device)

    def load(name: str, on_side_stream: bool) -> float:
        torch.cuda.synchronize(device)
        started = time.perf_counter()
        events = []
        stream = side if on_side_stream else forward
        with torch.cuda.stream(stream):
            for layer in range(LAYERS):
                for c in range(chunks):
                    source = chunk_views[name][c][layer].to(device, non_blocking=True)
                    kv[layer].index_copy_(1, targets[c], source)
                event = torch.cuda.Event()
                event.record(stream)
                events.append(event)
        for event in events:  # the forward pass's stream waits per layer; the host does not
            forward.wait_event(event)
        forward.synchronize()
        return time.perf_counter() - started

    def check(name: str) -> None:
        for c in range(chunks):
            for layer in range(LAYERS):
                got = kv[layer].index_select(1, targets[c]).cpu()
                # As bytes: the random payload holds NaN patterns, and NaN never equals NaN.
                want = chunk_views[name][c][layer].cpu()
                if not torch.equal(got.view(torch.uint8), want.view(torch.uint8)):
                    raise SystemExit(f"{name}: layer {layer} chunk {c} differs after the load")

    results = {}
    for name, on_side in (("pageable", False), ("pinned", True), ("registered", True)):
        load(name, on_side)  # warm-up
        check(name)
        times = [load(name, on_side) for _ in range(args.repeats)]
        results[name] = statistics.median(times)
    cudart.cudaHostUnregister(registered.data_ptr())
    print(f"{'source':12} {'ms (median)':>12} {'GB/s':>8} {'x pageable':>11}")
    for name, seconds in results.items():
        print(
            f"{name:12} {seconds * 1e3:12.2f} {total / seconds / 1e9:8.1f} "
            f"{seconds / results['pageable']:11.2f}"
        )
    print(f"device: {torch.cuda.get_device_name(device)}; every load checked byte for byte")
    del keep
    return 0


if __name__ == "__main__":
    sys.exit(main())
