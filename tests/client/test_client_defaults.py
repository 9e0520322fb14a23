"""`Client()` with no arguments finds the daemon ($LMCACHED_CONTROL_ENDPOINT, then
$LMCACHED_CONFIG, then the default config), and `str` keys are sent as their UTF-8 bytes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from lmcached.client import Client
from lmcached.client import settings as settings_mod
from lmcached.testing import wait_until

ENVS = (
    "LMCACHED_CONTROL_ENDPOINT",
    "LMCACHED_CONFIG",
    "LMCACHE_CONFIG_FILE",
    "LMCACHED_RUNTIME_DIR",
    "LMCACHED_PORT",
)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ENVS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def roundtrip(client: Client, key: str) -> None:
    client.put([key], [b"v" * 64])
    assert client.lookup([key]) == 1
    assert client.exists([key.encode()]) == [True]  # the same key as bytes
    assert bytes(client.get([key])[0]) == b"v" * 64


def test_client_without_arguments_uses_the_control_endpoint_env(
    daemon_factory, clean_env: pytest.MonkeyPatch
) -> None:
    d = daemon_factory()
    clean_env.setenv("LMCACHED_CONTROL_ENDPOINT", d.ipc_endpoint)
    with Client() as client:
        roundtrip(client, "env/endpoint")


def test_client_without_arguments_uses_the_config_env(
    daemon_factory, clean_env: pytest.MonkeyPatch
) -> None:
    d = daemon_factory()
    clean_env.setenv("LMCACHED_CONFIG", str(d.config_path))
    with Client() as client:
        roundtrip(client, "env/config")


@pytest.fixture
def default_daemon(tmp_path: Path) -> Iterator[Path]:
    """A daemon started without --config (the default config), on ephemeral ports; yields its
    runtime folder."""
    run_dir = Path(tempfile.mkdtemp(prefix="lmrt-", dir="/tmp"))
    env = {
        **{k: v for k, v in os.environ.items() if k not in ENVS},
        "LMCACHED_PORT": "0",
        "LMCACHED_RUNTIME_DIR": str(run_dir),
        "LMCACHED_MAX_LOCAL_CPU_SIZE": "64MiB",
    }
    log = (tmp_path / "daemon.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmcached", "start"],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
    )
    try:
        endpoints = run_dir / settings_mod.DEFAULT_INSTANCE_NAME / "endpoints.json"
        wait_until(lambda: endpoints.exists() or proc.poll() is not None, 60, what="the daemon")
        assert proc.poll() is None, (tmp_path / "daemon.log").read_text()
        yield run_dir
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(run_dir, ignore_errors=True)  # the daemon leaves its lock file there


def test_client_without_arguments_finds_the_default_config_daemon(
    default_daemon: Path, clean_env: pytest.MonkeyPatch
) -> None:
    clean_env.setenv("LMCACHED_RUNTIME_DIR", str(default_daemon))
    with Client() as client:
        roundtrip(client, "default/config")


def test_str_keys_are_sent_as_utf8(daemon_factory) -> None:
    d = daemon_factory()
    with d.client() as client:
        key = "prompt/é/0"
        client.put([key], [b"payload"])
        assert bytes(client.get([key.encode("utf-8")])[0]) == b"payload"
        buf = bytearray(7)
        assert client.get_into([key], [buf]) == [True] and bytes(buf) == b"payload"
        assert client.delete([key]) == 1
        client.put(["s/1", b"s/2"], [b"a", b"b"])  # str and bytes mixed in one batch
        assert client.purge("s/") == 2
