"""DaemonLink against a real daemon: answers degrade to misses while it is down, never raise."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from lmcached.client import Client
from lmcached.integrations.daemon_link import DaemonLink, RateLimitedLog
from lmcached.testing import DaemonProcess, wait_until

KEYS = [b"vllm/m@0/l/" + bytes(f"{i:032x}", "ascii") for i in range(3)]


def link_for(daemon: DaemonProcess, retry_interval: float = 0.2) -> DaemonLink:
    return DaemonLink(
        lambda: Client.from_config(daemon.config_path, timeout=0.5),
        logging.getLogger("test.daemon_link"),
        timeout=0.5,
        retry_interval=retry_interval,
    )


def test_calls_pass_through_while_the_daemon_is_up(tmp_path: Path) -> None:
    with DaemonProcess(tmp_path / "d", chunk_size=512) as daemon:
        link = link_for(daemon)
        assert link.chunk_size() == 512
        assert link.put(KEYS[:2], [b"a" * 10, b"b" * 20])
        assert link.lookup(KEYS) == 2
        assert link.exists(KEYS) == [True, True, False]
        values = link.get(KEYS)
        assert bytes(values[1]) == b"b" * 20 and values[2] is None
        # Mapped shared-memory arenas (for CUDA registration): none without that data plane.
        assert all(memoryview(arena).nbytes > 0 for arena in link.arenas())
        link.close()
        link.close()  # idempotent


def test_a_down_daemon_gives_misses_then_calls_resume(
    daemon: DaemonProcess, caplog: pytest.LogCaptureFixture
) -> None:
    keys = [b"vllm/m@0/down/" + bytes(f"{i:032x}", "ascii") for i in range(3)]
    link = link_for(daemon, retry_interval=60)
    assert link.put(keys[:1], [b"x"])
    daemon.stop()
    try:
        with caplog.at_level(logging.WARNING, logger="test.daemon_link"):
            assert link.lookup(keys) == 0  # fails within the timeout, never raises
            assert link.is_down
            # While down, calls are answered without trying the daemon (no second wait).
            assert link.get(keys) == [None, None, None]
            assert link.put(keys, [b"1", b"2", b"3"]) is False
            assert link.failures == 1
        assert sum("unreachable" in r.getMessage() for r in caplog.records) == 1
    finally:
        daemon.start()  # maybe new ports: the link re-resolves them

    link._down_until = 0.0  # as if the 60 s retry interval had passed
    wait_until(lambda: link.put(keys[1:2], [b"y"]), timeout=20, what="the link to reconnect")
    # keys[0] was stored before the restart (it may survive it on the disk tier); keys[2]
    # was only offered while the daemon was down.
    assert link.exists(keys)[1:] == [True, False]
    link.close()


def test_rate_limited_log_counts_what_it_suppressed(caplog: pytest.LogCaptureFixture) -> None:
    log = RateLimitedLog(logging.getLogger("test.rate"), interval=60)
    with caplog.at_level(logging.WARNING, logger="test.rate"):
        for i in range(5):
            log.warning("down", "down %d", i)
        log.warning("other", "another kind")
    assert [r.getMessage() for r in caplog.records] == ["down 0", "another kind"]
    assert log.suppressed == {"down": 4}


def test_lost_names_the_views_whose_slot_was_reused_past_their_lease(tmp_path: Path) -> None:
    """A load that stalls past lease_timeout may have read another block's bytes: the
    connector asks ``lost`` after its copies and recomputes what it names."""
    import os

    mib = 1 << 20
    with DaemonProcess(
        tmp_path / "d", num_workers=1, max_local_cpu_size="8MiB", lease_timeout=0.5
    ) as daemon:
        link = link_for(daemon)
        link.timeout = 30.0
        kept, late = [b"kept", b"late"], os.urandom(mib)
        assert link.put(kept, [b"k" * 4096, late])
        values = link.get(kept)
        assert link.lost(values) == []  # fresh views: nothing lost
        with Client.from_config(daemon.config_path, timeout=30) as c:

            def pinned() -> int:
                return int(c.stats()["workers"][0]["stats"]["store"]["cpu"]["arena_pinned"])

            wait_until(lambda: pinned() == 0, 20, what="lease expiry")
            for i in range(40):  # the worker reuses the freed slots for these
                c.put([f"flood/{i}".encode()], [os.urandom(mib)])
        assert link.lost(values) == [0, 1]
        assert link.lost([b"bytes", None]) == []  # not from shared memory: nothing to lose
        link.close()
