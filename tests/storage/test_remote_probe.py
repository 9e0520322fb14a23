"""A down remote lets one probe through at a time, not every waiting caller."""

from __future__ import annotations

import threading

from lmcached.storage.remote.backend import RemoteHealth


def test_down_remote_lets_only_one_concurrent_probe_through() -> None:
    health = RemoteHealth(backoff_initial=0.0, backoff_max=0.0)
    health.failed("connection refused")  # down, and its backoff has already passed
    start = threading.Barrier(16)
    granted: list[bool] = []
    lock = threading.Lock()

    def caller() -> None:
        start.wait()
        allowed = health.may_try()
        with lock:
            granted.append(allowed)

    threads = [threading.Thread(target=caller) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert granted.count(True) == 1
    assert not health.may_try()  # still probing: the others keep failing fast
    health.failed("still refused")  # the probe's verdict ends it
    assert health.may_try()
    health.succeeded()
    assert all(health.may_try() for _ in range(3))  # up again: no gate


def test_a_probe_ended_by_an_unexpected_error_lets_the_next_caller_probe() -> None:
    health = RemoteHealth(backoff_initial=0.0, backoff_max=0.0)
    health.failed("refused")
    assert health.may_try()
    assert not health.may_try()
    health.probe_abandoned()
    assert health.may_try()


def test_an_idle_probe_does_not_take_the_probe_from_itself_and_wedge_the_remote(
    redis_server,
) -> None:
    """The write thread's idle upkeep claimed the one probe, then its own call found it taken:
    the probe flag stayed set, every later call was skipped, and the remote stayed down for ever
    after Redis came back."""
    from lmcached.storage.remote.backend import RemoteBackend
    from lmcached.storage.remote.connector import make_connector
    from lmcached.testing import wait_until

    remote = RemoteBackend(
        make_connector(redis_server.url, timeout=0.5), backoff_initial=0.05, backoff_max=0.2
    )
    try:
        redis_server.stop()
        assert remote.get(b"absent") is None
        assert remote.stats()["health"] == "down"
        redis_server.start()
        wait_until(lambda: remote.health.retry_due(), 10, what="retry due")
        remote.upkeep()
        assert remote.stats()["health"] == "ok"
        assert remote.health.may_try()  # calls go through again
    finally:
        remote.close()
