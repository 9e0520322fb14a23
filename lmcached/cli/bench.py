"""`lmcached bench`: the benchmark workloads of :mod:`lmcached.bench`."""

from __future__ import annotations

import argparse

from lmcached.cli.commands import CommandTable


def register(commands: CommandTable) -> None:
    """Add `bench` with the benchmark's own arguments."""
    p = commands.add(
        "bench",
        cmd_bench,
        "measure store/retrieve GB/s next to memcpy and raw ZMQ",
        endpoint=True,
    )
    add_arguments(p)


def cmd_bench(args: argparse.Namespace) -> int:
    from lmcached.bench import throughput

    return throughput.main(args)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes", default="256KiB,2MiB,32MiB", help="block sizes (comma-separated)")
    p.add_argument("--clients", default="1,4", help="concurrent client processes (comma-separated)")
    p.add_argument(
        "--transports",
        default="shm,ipc,tcp",
        help="shm (same-host shared memory), ipc and tcp (ZMQ), comma-separated",
    )
    p.add_argument("--bytes-per-point", default="512MiB", help="payload moved per measurement")
    p.add_argument(
        "--repeats", type=int, default=3, help="measurements per point; the best is kept"
    )
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON ('-' for stdout)")
    p.add_argument("--quick", action="store_true", help="tiny sizes and volumes (for smoke tests)")
    p.add_argument(
        "--workload",
        default="throughput,lookup",
        help="comma-separated: throughput, lookup, mixed, tiers, or all",
    )
    p.add_argument("--plot", metavar="PNG", help="draw GB/s against block size (needs matplotlib)")
    p.add_argument("--prompts", type=int, default=200, help="mixed: distinct prompts")
    p.add_argument("--chunks", type=int, default=8, help="mixed: 256-token chunks per prompt")
    p.add_argument("--requests", type=int, default=2000, help="mixed: requests in the trace")
    p.add_argument("--zipf", type=float, default=1.1, help="mixed: Zipf exponent of reuse")
    p.add_argument("--mixed-block", default="512KiB", help="mixed: bytes per chunk")
    p.add_argument(
        "--budget-fraction",
        type=float,
        default=0.25,
        help="mixed: CPU budget as a fraction of the trace's working set",
    )
    p.add_argument("--tier-block", default="2MiB", help="tiers: block size")
    p.add_argument("--tier-blocks", type=int, default=64, help="tiers: blocks per tier")
