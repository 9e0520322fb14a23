"""A real daemon started from LMCache's disk-offload example, with LMCache-only keys in it."""

from __future__ import annotations

from pathlib import Path

import yaml

from lmcached.testing import DaemonProcess

EXAMPLE = (
    Path(__file__).resolve().parents[1] / "fixtures" / "lmcache_examples" / "disk-offload.yaml"
)


def test_daemon_runs_an_lmcache_config_and_logs_each_ignored_key_once(tmp_path: Path) -> None:
    values = yaml.safe_load(EXAMPLE.read_text())
    # Only what this host needs changed: a writable folder and budgets that fit a test run.
    values.update(
        local_disk=f"file://{tmp_path / 'disk'}/",
        max_local_cpu_size=0.125,
        max_local_disk_size=0.0625,
        # LMCache keys lmcached accepts without acting on them.
        enable_blending=True,
        save_decode_cache=True,
        save_unfull_chunk=True,  # the vLLM connector's key: the daemon says nothing
        cache_policy="LRU",
        extra_config={"save_chunk_meta": False},
    )
    daemon = DaemonProcess(tmp_path / "d", num_workers=1, **values)
    with daemon, daemon.client(timeout=10) as c:
        c.put([b"lmcache/k"], [b"v" * 4096])
        c.flush()
        assert [bytes(v) for v in c.get([b"lmcache/k"])] == [b"v" * 4096]
        log = daemon.log()
    ignored = [line for line in log.splitlines() if "config_key_ignored" in line]
    assert len(ignored) == 3, log
    assert any("enable_blending: ignored" in line for line in ignored)
    assert any("save_decode_cache: ignored" in line for line in ignored)
    assert "save_unfull_chunk" not in log
    assert any("extra_config.save_chunk_meta: ignored" in line for line in ignored)
    assert list((tmp_path / "disk").rglob("*")), "the disk tier got nothing"
