"""lmcached.testing's DaemonProcess and RedisServer leave nothing behind that they made (bench
runs and scripts start them without a folder of their own), and keep what their caller gave."""

from __future__ import annotations

from pathlib import Path

from lmcached.client import Client
from lmcached.testing import DaemonProcess, RedisServer


def test_a_daemon_without_a_workdir_removes_its_folders_and_arenas_at_close(tmp_path):
    d = DaemonProcess(num_workers=1).start()
    try:
        with Client(d.endpoint, timeout=30) as c:
            c.put([b"cleanup/a"], [b"x" * 4096])
        made = [d.workdir, Path(d.cfg.runtime_dir)]
        arenas = [Path(p) for p in d.arena_paths()]
        assert all(p.exists() for p in made) and arenas
    finally:
        d.close()
    assert not any(p.exists() for p in made + arenas)
    d.close()  # idempotent

    kept = tmp_path / "mine"
    with DaemonProcess(kept, num_workers=1):
        pass
    assert (kept / "daemon.log").exists()  # the caller's folder is the caller's


def test_a_redis_server_without_a_workdir_removes_its_folder_at_close(tmp_path):
    server = RedisServer().start()
    made = server.workdir
    assert made.exists()
    server.stop()
    server.start()  # stop() alone keeps the folder: the server can come back
    server.close()
    assert not made.exists()
    server.close()  # idempotent

    with RedisServer(tmp_path / "mine"):
        pass
    assert (tmp_path / "mine").is_dir()  # the caller's folder is the caller's
