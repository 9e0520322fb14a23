"""How close a direct same-host put comes to what the kernel allows, in rounds.

A direct put is copied by the worker with ``process_vm_readv`` from the client's memory
(docs/same-host.md). Each round measures, one after another and in alternating order:

- ``memcpy``: the bench's single-thread memcpy (lmcached.bench.common.memcpy_gbps);
- ``kernel``: ``process_vm_readv`` from another process on two threads, 2 MiB pieces, no hash:
  the ceiling of any worker that copies this way;
- ``worker copy``: the worker's own copy code in this process (piece_copy.copy_hashing, two
  threads, each piece hashed in order), with no sockets. Only a block of
  piece_copy.PARALLEL_MIN or more is split so; smaller blocks are copied here one after
  another on one thread, where a worker copies a put's blocks side by side, so the figure is
  meant for large blocks;
- ``daemon``: ``Client.put`` of the same block through a daemon (a private one unless
  ``--endpoint`` names one).

On a host whose speed moves within minutes, the ratios within a round say more than the
absolute figures.

    python scripts/direct_put_ceiling.py --size 32MiB --rounds 6
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import itertools
import mmap
import os
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import xxhash

from lmcached.bench.common import memcpy_gbps
from lmcached.client import Client
from lmcached.config import byte_size
from lmcached.storage import piece_copy
from lmcached.storage.peer_memory import PeerMemory, PeerRange
from lmcached.testing import DaemonProcess

CALL_BYTES = 32 << 20
PIECE = piece_copy.PARALLEL_PIECE


@contextlib.contextmanager
def peer_block(nbytes: int) -> Iterator[tuple[int, int]]:
    """A child process holding ``nbytes`` of random bytes: yields (pid, address)."""
    addr_r, addr_w = os.pipe()
    quit_r, quit_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: hold the block until told to quit
        try:
            block = bytearray(os.urandom(nbytes))
            os.write(
                addr_w, str(ctypes.addressof((ctypes.c_char * nbytes).from_buffer(block))).encode()
            )
            os.read(quit_r, 1)
        finally:
            os._exit(0)
    os.close(addr_w)
    os.close(quit_r)
    try:
        yield pid, int(os.read(addr_r, 64))
    finally:
        os.write(quit_w, b"q")
        os.waitpid(pid, 0)
        for fd in (addr_r, quit_w):
            os.close(fd)


def gbps(nbytes: int, call: Callable[[], object], calls: int) -> float:
    """GB/s of the median call."""
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return nbytes / statistics.median(times) / 1e9


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--endpoint", help="a running daemon (default: start a private one)")
    ap.add_argument("--size", default="32MiB", help="block size; a call puts 32 MiB")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--calls", type=int, default=16, help="timed calls per figure")
    args = ap.parse_args()
    size = byte_size(args.size)
    per_call = max(1, CALL_BYTES // size)
    total = size * per_call

    dst_fd = os.memfd_create("lmcached-ceiling-dst")
    os.ftruncate(dst_fd, total)
    dst_map = mmap.mmap(dst_fd, total)
    dst = memoryview(dst_map)
    dst_buf = (ctypes.c_char * total).from_buffer(dst_map)
    dst_addr = ctypes.addressof(dst_buf)
    ctypes.memset(dst_addr, 1, total)  # the destination's pages exist, as an arena's do
    pool = ThreadPoolExecutor(1, thread_name_prefix="ceiling-copy")
    names = ("memcpy", "kernel", "worker copy", "daemon")
    figures: dict[str, list[float]] = {name: [] for name in names}

    with contextlib.ExitStack() as stack, peer_block(total) as (pid, src):
        peer = PeerMemory(os.getuid(), pid)
        stack.callback(peer.close)
        stack.callback(pool.shutdown)
        endpoint = args.endpoint
        if endpoint is None:
            daemon = stack.enter_context(
                DaemonProcess(max_local_cpu_size="2GiB", log_level="warning")
            )
            endpoint = daemon.endpoint
        client = stack.enter_context(Client(endpoint, timeout=60))
        value = os.urandom(size)
        key_sets = [[f"ceiling/{j}/{i}".encode() for i in range(per_call)] for j in range(4)]
        values = [value] * per_call
        for keys in key_sets:  # touch every slot once
            client.put(keys, values)
        turn = itertools.count()

        def kernel() -> None:
            def half(first: int) -> None:
                for at in range(first * PIECE, total, 2 * PIECE):
                    peer.copy(dst_addr + at, src + at, min(PIECE, total - at))

            other = threading.Thread(target=half, args=(1,))
            other.start()
            half(0)
            other.join()

        def worker_copy() -> None:
            for at in range(0, total, size):
                block = PeerRange(peer, src + at, size, time.monotonic_ns() + 10**10, pool)
                for _ in piece_copy.copy_hashing(
                    block, dst[at : at + size], xxhash.xxh3_64(), pool
                ):
                    pass

        def daemon_put() -> None:
            client.put(key_sets[next(turn) % len(key_sets)], values)

        steps: list[tuple[str, Callable[[], object]]] = [
            ("kernel", kernel),
            ("worker copy", worker_copy),
            ("daemon", daemon_put),
        ]
        for r in range(args.rounds):
            figures["memcpy"].append(memcpy_gbps(total, 16 * total))
            for name, step in steps if r % 2 == 0 else steps[::-1]:
                figures[name].append(gbps(total, step, args.calls))
            print(
                f"round {r}: " + ", ".join(f"{n} {figures[n][-1]:.2f}" for n in names) + " GB/s",
                flush=True,
            )
        del dst_buf
    memcpy = statistics.median(figures["memcpy"])
    print(
        f"{args.size} blocks, {per_call} a call; medians x memcpy: "
        + ", ".join(f"{n} {statistics.median(figures[n]) / memcpy:.2f}" for n in names[1:])
    )
    for a, b in (("worker copy", "kernel"), ("daemon", "worker copy")):
        ratios = [y / x for x, y in zip(figures[b], figures[a], strict=True)]
        print(f"{a} / {b} per round: " + " ".join(f"{x:.2f}" for x in ratios))
    dst.release()
    dst_map.close()
    os.close(dst_fd)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
