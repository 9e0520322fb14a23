"""The sd_notify protocol spoken by lmcached.daemon.sdnotify, against a real datagram socket."""

from __future__ import annotations

import os
import time

import pytest

from lmcached.daemon.sdnotify import Notifier

from .notify_socket import FakeNotifySocket


@pytest.fixture
def fake_socket(tmp_path):
    sock = FakeNotifySocket(str(tmp_path / "notify.sock"))
    yield sock
    sock.close()


def test_ready_status_watchdog_stopping_arrive_as_key_value_lines(fake_socket):
    n = Notifier(fake_socket.address)
    assert n.ready(status="2 workers serving")
    assert n.status("line one\nline two")
    assert n.watchdog()
    assert n.stopping()
    fake_socket.wait_for("STOPPING")
    assert fake_socket.messages == [
        {"READY": "1", "STATUS": "2 workers serving"},
        {"STATUS": "line one line two"},  # a newline would start a bogus assignment
        {"WATCHDOG": "1"},
        {"STOPPING": "1"},
    ]
    n.close()
    n.close()


def test_reloading_carries_a_current_monotonic_timestamp(fake_socket):
    n = Notifier(fake_socket.address)
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    n.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    msg = fake_socket.wait_for("RELOADING")
    assert msg["RELOADING"] == "1"
    assert before <= int(msg["MONOTONIC_USEC"]) <= after
    n.close()


def test_ready_reaches_an_abstract_namespace_socket():
    name = f"@lmcached-test-{os.getpid()}-{time.monotonic_ns()}"
    sock = FakeNotifySocket(name)
    try:
        n = Notifier(name)
        assert n.ready()
        assert sock.wait_for("READY") == {"READY": "1"}
        n.close()
    finally:
        sock.close()


def test_no_op_without_notify_socket():
    n = Notifier.from_environment({})
    assert not n.enabled
    assert n.ready() is False
    assert n.watchdog() is False
    assert n.watchdog_interval is None
    n.close()


def test_a_missing_listener_is_not_fatal(tmp_path):
    n = Notifier(str(tmp_path / "nobody-listens.sock"))
    assert n.ready() is False
    assert n.status("still fine") is False
    n.close()


def test_from_environment_reads_watchdog_and_unsets_the_variables(monkeypatch, fake_socket):
    monkeypatch.setenv("NOTIFY_SOCKET", fake_socket.address)
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    n = Notifier.from_environment()
    assert n.enabled
    assert n.watchdog_interval == pytest.approx(2.0)
    # Children (workers, plugins) must not inherit the right to speak for the daemon.
    assert "NOTIFY_SOCKET" not in os.environ
    assert "WATCHDOG_USEC" not in os.environ
    n.close()


def test_watchdog_meant_for_another_pid_is_ignored():
    n = Notifier.from_environment(
        {"NOTIFY_SOCKET": "/nonexistent", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}
    )
    assert n.watchdog_interval is None
