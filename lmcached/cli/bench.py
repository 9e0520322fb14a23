"""`lmcached bench`: the benchmark workloads of :mod:`lmcached.bench`."""

from __future__ import annotations

import argparse

from lmcached.cli.commands import CommandTable


def register(commands: CommandTable) -> None:
    """Add `bench` with the benchmark's own arguments."""
    from lmcached.bench import throughput

    p = commands.add(
        "bench",
        cmd_bench,
        "measure store/retrieve GB/s next to memcpy and raw ZMQ",
        endpoint=True,
    )
    throughput.add_arguments(p)


def cmd_bench(args: argparse.Namespace) -> int:
    from lmcached.bench import throughput

    return throughput.main(args)
