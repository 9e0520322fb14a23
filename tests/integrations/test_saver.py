"""The connector's saver thread against a real daemon: a stale down mark does not lose a save."""

from __future__ import annotations

import logging
import time

import torch

from lmcached.client import Client
from lmcached.integrations.daemon_link import DaemonLink
from lmcached.integrations.kv_blocks import HostBufferPool
from lmcached.integrations.vllm import _Saver
from lmcached.testing import DaemonProcess, wait_until

# Keys of their own: the session's daemon (conftest.py) serves other tests too.
KEYS = [b"vllm/m@0/saver/" + bytes(f"{i:032x}", "ascii") for i in range(3)]
NBYTES = 4096


def gathered(
    saver: _Saver, pool: HostBufferPool, fill: int
) -> list[tuple[torch.Tensor, HostBufferPool]]:
    """Host buffers as wait_for_save hands them to the saver (admitted), one per key."""
    assert saver.admit(len(KEYS) * NBYTES)
    buffers = pool.acquire(len(KEYS))
    for buffer in buffers:
        buffer.fill_(fill)
    return [(buffer, pool) for buffer in buffers]


def test_a_save_made_while_the_link_is_still_marked_down_is_stored(
    daemon: DaemonProcess,
) -> None:
    link = DaemonLink(
        lambda: Client.from_config(daemon.config_path, timeout=2),
        logging.getLogger("test.saver"),
        timeout=2,
        retry_interval=1,
    )
    saver = _Saver(link)
    try:
        daemon.stop()
        try:
            saver.submit(KEYS, gathered(saver, HostBufferPool(NBYTES, pin=False), 1), 3 * NBYTES)
            wait_until(lambda: saver.backlog == 0, timeout=30, what="the failed save to end")
            assert saver.dropped == 3  # the daemon was down: nothing stored, and it says so
        finally:
            daemon.start()
        # The daemon is back, but a call that failed a moment ago (one in flight across the
        # restart fails at its deadline) still marks the link down.
        link._down_until = time.monotonic() + 1.5

        saver.submit(KEYS, gathered(saver, HostBufferPool(NBYTES, pin=False), 2), 3 * NBYTES)

        with daemon.client(timeout=10) as client:
            wait_until(lambda: client.lookup(KEYS) == 3, timeout=30, what="the save")
            assert all(bytes(v) == bytes([2]) * NBYTES for v in client.get(KEYS))  # type: ignore[arg-type]
        assert saver.dropped == 3
    finally:
        saver.close()
        saver.close()  # idempotent
