#!/usr/bin/env python3
"""Host-to-device copies of 32 MiB: from a registered lmcached arena, a pinned torch buffer and
pageable memory, each on a side stream timed with CUDA events.

The arena is a worker's shared-memory file (docs/same-host.md), mapped read-only as a client
maps it and page-locked with cudaHostRegister, as the vLLM connector may do. Needs only torch:

    python scripts/gpu_arena_h2d.py                      # a plain /dev/shm file as the arena
    python scripts/gpu_arena_h2d.py --arena /dev/shm/lmcached-arena-...   # a live worker's

Prints one line per source with GB/s (median of --repeats copies) and its ratio to pinned.
Exits 0 with "no CUDA device" where there is none.
"""

from __future__ import annotations

import argparse
import contextlib
import mmap
import os
import statistics
import sys
import tempfile

MIB = 1 << 20
# cudaHostRegisterReadOnly: the device only reads the range (the client maps it read-only).
CUDA_HOST_REGISTER_READ_ONLY = 0x08
CUDA_HOST_REGISTER_DEFAULT = 0x00


def _time_copies(torch, dst, src, repeats: int) -> float:
    """Median GB/s of ``dst.copy_(src, non_blocking=True)`` on a side stream."""
    stream = torch.cuda.Stream()
    samples = []
    with torch.cuda.stream(stream):
        for _ in range(repeats + 2):  # two warm-ups
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record(stream)
            dst.copy_(src, non_blocking=True)
            end.record(stream)
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
    return src.numel() * src.element_size() / statistics.median(samples[2:]) / 1e9


def _arena_file(path: str | None, size: int) -> tuple[str, bool]:
    if path is not None:
        return path, False
    folder = "/dev/shm" if os.path.isdir("/dev/shm") else None
    fd, tmp = tempfile.mkstemp(prefix="lmcached-h2d-", dir=folder)
    os.ftruncate(fd, size)
    with mmap.mmap(fd, size) as m:
        m[:] = os.urandom(size)
    os.close(fd)
    return tmp, True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arena", help="an arena file to map (default: a fresh /dev/shm file)")
    parser.add_argument("--size", type=int, default=32 * MIB, help="bytes per copy")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    try:
        import torch
    except ImportError:
        print("torch is not installed")
        return 0
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 0
    size = args.size
    path, made = _arena_file(args.arena, size + 4096)
    fd = os.open(path, os.O_RDONLY)
    try:
        file_size = os.fstat(fd).st_size
        if file_size < size + 4096:
            print(f"{path} is smaller than {size + 4096} bytes")
            return 1
        # Read-only, as a client maps it; the first page is the arena header, skip it.
        arena = mmap.mmap(fd, file_size, mmap.MAP_SHARED, mmap.PROT_READ)
    finally:
        os.close(fd)
    # The mapping's address: numpy exposes it without copying (torch.frombuffer needs writable).
    import numpy as np

    array = np.frombuffer(arena, dtype=np.uint8, count=size, offset=4096)
    address = array.__array_interface__["data"][0]
    cudart = torch.cuda.cudart()
    flags = CUDA_HOST_REGISTER_READ_ONLY
    err = cudart.cudaHostRegister(address, size, flags)
    if int(err) != 0:  # older drivers lack the read-only flag
        flags = CUDA_HOST_REGISTER_DEFAULT
        err = cudart.cudaHostRegister(address, size, flags)
    results: dict[str, float] = {}
    device = torch.empty(size, dtype=torch.uint8, device="cuda")
    try:
        if int(err) != 0:
            print(f"cudaHostRegister of the arena failed: error {int(err)}")
        else:
            # A tensor over the registered range: torch sees it as pinned host memory.
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "non-writable buffer": we only read it
                src = torch.from_numpy(array)
            results["registered arena"] = _time_copies(torch, device, src, args.repeats)
        pinned = torch.empty(size, dtype=torch.uint8, pin_memory=True)
        pinned.copy_(torch.from_numpy(np.frombuffer(os.urandom(size), dtype=np.uint8).copy()))
        results["pinned torch buffer"] = _time_copies(torch, device, pinned, args.repeats)
        pageable = torch.from_numpy(np.frombuffer(bytearray(os.urandom(size)), dtype=np.uint8))
        results["pageable memory"] = _time_copies(torch, device, pageable, args.repeats)
        if "registered arena" in results:
            # The device got the arena's bytes, not a stale or bounced copy.
            device.copy_(src)
            if not torch.equal(device.cpu(), torch.from_numpy(array.copy())):
                print("the copy from the registered arena differs from the arena's bytes")
                return 1
    finally:
        torch.cuda.synchronize()
        if int(err) == 0:
            cudart.cudaHostUnregister(address)
        src = None  # the tensor over the mapping must go before the mapping
        del array
        with contextlib.suppress(BufferError):  # a view still alive: it goes with the process
            arena.close()
        if made:
            os.unlink(path)
    base = results.get("pinned torch buffer") or 0.0
    print(f"host-to-device copies of {size // MIB} MiB on {torch.cuda.get_device_name()}:")
    for name, gbps in results.items():
        ratio = f"  x{gbps / base:.2f} pinned" if base else ""
        print(f"  {name:<22} {gbps:7.2f} GB/s{ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
