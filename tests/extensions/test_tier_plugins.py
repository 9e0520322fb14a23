"""Extensions inside the disk and remote tiers of a real daemon: a codec per tier, and an
external connector serving remote_url's scheme through the remote tier."""

from __future__ import annotations

import os
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from lmcached import runtime
from lmcached.testing import DaemonProcess

KiB = 1 << 10


def _value(i: int) -> bytes:
    # Compressible like KV with repeated structure, and distinct per key.
    return (b"kv-%d-" % i) * (64 * KiB // 8)


def scrape(daemon: DaemonProcess, name: str) -> list[tuple[dict[str, str], float]]:
    """Return the samples of metric ``name`` from the daemon's /metrics endpoint."""
    url = runtime.read_endpoints(daemon.cfg)["metrics"] + "/metrics"
    with urllib.request.urlopen(url, timeout=10) as resp:
        body = resp.read().decode()
    return [
        (s.labels, s.value)
        for fam in text_string_to_metric_families(body)
        for s in fam.samples
        if s.name == name
    ]


def _env(example_target) -> dict[str, str]:
    return {"PYTHONPATH": os.pathsep.join([str(example_target), os.getcwd()])}


def test_disk_codec_stores_compressed_blocks_that_survive_a_restart(tmp_path):
    keys = [b"ns/m@0/any/%08x" % i for i in range(12)]
    values = [_value(i) for i in range(len(keys))]
    daemon = DaemonProcess(
        tmp_path / "d",
        local_disk=str(tmp_path / "disk"),
        max_local_disk_size="64MiB",
        disk_codec="zstd",
    )
    with daemon:
        with daemon.client() as c:
            c.put(keys, values)
            c.flush()
            disk = [w["stats"]["store"]["disk"] for w in c.stats()["workers"]]
        assert sum(d["codec_raw_bytes"] for d in disk) == sum(len(v) for v in values)
        assert sum(d["codec_encoded_bytes"] for d in disk) < sum(len(v) for v in values) // 10
        daemon.stop()
        daemon.start()  # the CPU tier is empty now: every read comes from disk, decoded
        with daemon.client() as c:
            assert [bytes(v) for v in c.get(keys)] == values


def test_remote_url_with_an_external_connector_scheme(example_installed, tmp_path):
    remote = tmp_path / "remote-folder"
    keys = [b"ns/m@0/any/%08x" % i for i in range(6)]
    values = [_value(i) for i in range(len(keys))]
    daemon = DaemonProcess(
        tmp_path / "d",
        env=_env(example_installed),
        remote_url=f"folder://{remote}",
        remote_codec="zstd",
        extra_config={
            "external_connector.folder.module_path": "lmcached_example_plugins.folder_connector",
            "external_connector.folder.class_name": "FolderConnector",
        },
    )
    with daemon:
        with daemon.client() as c:
            c.put(keys, values)
            c.flush()
            status = c.stats()
        assert all(
            w["stats"]["extensions"]["folder"]["state"] == "running" for w in status["workers"]
        )
        files = sorted(remote.iterdir())
        assert len(files) == len(keys)
        # The connector's get_metrics() numbers are on the metrics endpoint, under its name.
        puts = {
            labels["worker"]: value
            for labels, value in scrape(daemon, "lmcached_extension_value")
            if labels["extension"] == "folder" and labels["metric"] == "puts"
        }
        assert set(puts) == {str(w["id"]) for w in status["workers"]}
        assert sum(puts.values()) == len(keys)
        daemon.stop()
        daemon.start()
        with daemon.client() as c:
            assert [bytes(v) for v in c.get(keys)] == values
