"""Script plugins inside a real daemon: roles, status, reload, shutdown, kill -9 and floods."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from plugin_helpers import PluginDir, wait_for

EXAMPLES = Path(__file__).resolve().parents[2] / "plugin_examples"

RECORD = (
    'who="$LMCACHE_PLUGIN_ROLE$LMCACHE_PLUGIN_WORKER_ID"\n'
    'echo "$LMCACHE_PLUGIN_ROLE $LMCACHE_PLUGIN_WORKER_ID $LMCACHE_PLUGIN_WORKER_COUNT" '
    '> "$PLUGIN_OUT/$(basename "$0")@$who"\n'
)


@pytest.fixture
def pdir(tmp_path: Path, marker: str) -> PluginDir:
    # The marker in the folder name puts it in every plugin's command line.
    tmp_path.chmod(0o755)
    return PluginDir(tmp_path / f"plugins-{marker}")


@pytest.fixture
def out(tmp_path: Path) -> Path:
    path = tmp_path / "out"
    path.mkdir()
    return path


@pytest.fixture
def start(daemon_factory: Any, pdir: PluginDir, out: Path, marker: str) -> Any:
    """Start a daemon whose plugins come from ``pdir`` and see PLUGIN_OUT / the marker."""

    def make(**overrides: Any) -> Any:
        values: dict[str, Any] = {
            "plugin_locations": [str(pdir.path)],
            "plugin_stop_timeout": 1.0,
            "num_workers": 3,
        }
        values.update(overrides)
        env = {"PLUGIN_OUT": str(out), "PLUGIN_TEST_MARKER": marker}
        return daemon_factory(env=env, **values)

    return make


def plugin_processes(marker: str) -> list[psutil.Process]:
    """Live plugin processes (and their shims) of this test: the marker plus a plugin env."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            env = proc.environ()
            cmdline = " ".join(proc.info["cmdline"] or [])
            plugin_env = "LMCACHE_PLUGIN_ROLE" in env
            if plugin_env and (env.get("PLUGIN_TEST_MARKER") == marker or marker in cmdline):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def recorded(out: Path) -> set[str]:
    """Names of the record files that are complete (a plugin may be writing one right now)."""
    return {p.name for p in out.iterdir() if p.read_text().endswith("\n")}


def all_plugin_status(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Return {"<process>/<plugin>": entry} from a status document."""
    rows = {f"scheduler/{p['name']}": p for p in status.get("plugins", [])}
    for w in status["workers"]:
        for p in (w.get("stats") or {}).get("plugins", []):
            rows[f"worker{w['id']}/{p['name']}"] = p
    return rows


def test_role_and_worker_id_matrix_in_a_three_worker_daemon(
    start: Any, pdir: PluginDir, out: Path
) -> None:
    for name in ("scheduler_a.sh", "worker_b.sh", "worker_2_c.sh", "all_d.sh", "misc.sh"):
        pdir.write(name, RECORD)
    pdir.write("Worker_0.sh", RECORD)
    pdir.write("worker_9_ghost.sh", RECORD)
    pdir.write("scheduler_ping.py", (EXAMPLES / "scheduler_metrics.py").read_text())
    pdir.write("missing.sh", "#!/nonexistent/shell\necho never\n")
    d = start(plugin_config={"scheduler_ping.py": {"settings": {"interval": 0.2}}})
    expected = {"scheduler_a.sh@SCHEDULER-1", "worker_2_c.sh@WORKER2", "Worker_0.sh@WORKER0"}
    for who in ("SCHEDULER-1", "WORKER0", "WORKER1", "WORKER2"):
        expected |= {f"all_d.sh@{who}", f"misc.sh@{who}"}
    expected |= {f"worker_b.sh@WORKER{i}" for i in range(3)}
    wait_for(lambda: recorded(out) >= expected, what="every plugin to record")
    assert recorded(out) == expected
    assert (out / "worker_2_c.sh@WORKER2").read_text() == "WORKER 2 3\n"
    assert (out / "all_d.sh@SCHEDULER-1").read_text() == "SCHEDULER -1 3\n"

    with d.client(timeout=10) as c:
        rows = wait_for(
            lambda: (r := all_plugin_status(c.stats())) and r["scheduler/missing.sh"] and r,
            what="plugins in stats",
        )
        assert rows["scheduler/missing.sh"]["state"] == "FATAL"
        assert "/nonexistent/shell" in rows["scheduler/missing.sh"]["last_error"]
        assert rows["worker1/missing.sh"]["state"] == "FATAL"
        assert rows["worker2/worker_2_c.sh"]["exit_code"] == 0
        assert "worker0/worker_2_c.sh" not in rows and "scheduler/worker_b.sh" not in rows
        assert not any("ghost" in key for key in rows)
        c.put([b"still/serving"], [b"yes"])
        assert bytes(c.get([b"still/serving"])[0]) == b"yes"
    # The scheduler plugin reached the daemon through LMCACHED_CONTROL_ENDPOINT.
    wait_for(lambda: "[scheduler_ping.py] epoch=" in full_log(d), what="the metrics line")
    assert "worker_9_ghost.sh" in full_log(d) and "does not exist" in full_log(d)
    status = subprocess.run(
        [sys.executable, "-m", "lmcached", "status", "--config", str(d.config_path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert status.returncode == 0
    assert any(
        line.split()[:3] == ["missing.sh", "worker", "1"] and "FATAL" in line
        for line in status.stdout.splitlines()
    ), status.stdout


STUBBORN_TREE = """
trap '' TERM
sleep 1000 &
setsid sleep 1001 &
bash -c 'trap "" TERM; sleep 1002 & wait' &
python3 -c 'import os, time; os.fork() or os.setsid(); time.sleep(1000)' &
echo up > "$PLUGIN_OUT/$(basename "$0")@$LMCACHE_PLUGIN_ROLE$LMCACHE_PLUGIN_WORKER_ID"
while true; do sleep 1; done
"""


def test_kill_9_of_the_whole_daemon_leaves_no_plugin_process(
    start: Any, pdir: PluginDir, out: Path, marker: str
) -> None:
    pdir.write("all_tree.sh", STUBBORN_TREE)
    pdir.write("worker_1_py.py", "import time\ntime.sleep(1000)\n")
    d = start()
    wait_for(lambda: len(list(out.iterdir())) == 4, what="the plugin trees")
    wait_for(lambda: len(plugin_processes(marker)) >= 4 * 8, what="every plugin process")
    procs = plugin_processes(marker)
    groups = {os.getpgid(p.pid) for p in procs if p.is_running()} - {os.getpgid(d.pid)}
    assert len(groups) >= 5  # one per plugin (4 x all_tree.sh + worker_1_py.py), setsid extra
    daemon = [d.pid, *d.worker_pids()]
    assert len(daemon) == 4
    for pid in daemon:  # the scheduler and the workers, not the shims: a crash, not a stop
        os.kill(pid, signal.SIGKILL)
    # The trees ignore SIGTERM: this waits through the shims' SIGKILL escalation (1 s).
    wait_for(lambda: not plugin_processes(marker), 20, "every plugin process to die")
    leftovers = [
        p
        for p in psutil.process_iter(["cmdline"])
        if marker in " ".join(p.info["cmdline"] or []) or _pgid(p.pid) in groups
    ]
    assert [p for p in leftovers if p.status() != psutil.STATUS_ZOMBIE] == []
    d.kill9()


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            continue
    return out


def full_log(d: Any) -> str:
    return d.log_path.read_text(errors="replace")


def test_kill_9_of_one_worker_replaces_its_plugins(start: Any, pdir: PluginDir) -> None:
    pdir.write("worker_tree.sh", "sleep 1000 &\nsetsid sleep 1001 &\nwait\n")
    d = start(num_workers=2)

    def rows() -> dict[str, dict[str, Any]]:
        with d.client(timeout=10) as c:
            return all_plugin_status(c.stats())

    def plugin_pid(key: str) -> int | None:
        return rows().get(key, {}).get("pid")

    wait_for(lambda: plugin_pid("worker0/worker_tree.sh") and plugin_pid("worker1/worker_tree.sh"))
    before = rows()
    shim = psutil.Process(before["worker1/worker_tree.sh"]["shim_pid"])
    old_tree = [shim, *shim.children(recursive=True)]
    assert len(old_tree) == 4  # shim, bash, sleep, setsid sleep
    os.kill(shim.ppid(), signal.SIGKILL)  # worker 1 crashes
    wait_for(lambda: not alive(old_tree), what="the crashed worker's plugin tree to die")
    old_pid = before["worker1/worker_tree.sh"]["pid"]
    wait_for(lambda: plugin_pid("worker1/worker_tree.sh") not in (None, old_pid), 30)
    assert plugin_pid("worker0/worker_tree.sh") == before["worker0/worker_tree.sh"]["pid"]


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def test_lmcached_stop_stops_sigterm_ignorers_and_grandchildren(
    start: Any, pdir: PluginDir, out: Path, marker: str
) -> None:
    pdir.write("all_tree.sh", STUBBORN_TREE)
    d = start(num_workers=2)
    wait_for(lambda: len(list(out.iterdir())) == 3, what="the plugin trees")
    assert plugin_processes(marker)
    stop = subprocess.run(
        [sys.executable, "-m", "lmcached", "stop", "--config", str(d.config_path)],
        capture_output=True,
        timeout=30,
    )
    assert stop.returncode == 0
    assert d.proc is not None
    assert d.proc.wait(30) == 0
    # The daemon exits only after its plugins are gone: nothing to wait for here.
    assert plugin_processes(marker) == []


def test_flooding_plugin_does_not_stop_client_requests(
    start: Any, pdir: PluginDir, marker: str
) -> None:
    pdir.write("all_flood.sh", "exec yes flooding-the-log\n")
    d = start(num_workers=2, plugin_log_rate_limit=50)
    with d.client(timeout=10) as c:
        wait_for(
            lambda: (
                all(p["dropped_lines"] > 0 for p in all_plugin_status(c.stats()).values())
                and len(all_plugin_status(c.stats())) == 3
            ),
            what="every flood to be rate-limited",
        )
        value = b"v" * 65536
        for i in range(200):
            keys = [f"flood/{i}/{j}".encode() for j in range(4)]
            c.put(keys, [value] * 4)
            assert [bytes(v) for v in c.get(keys)] == [value] * 4
        wait_for(
            lambda: {r["state"] for r in all_plugin_status(c.stats()).values()} == {"RUNNING"},
            what="the floods to stay up",
        )
    assert "rate-limited; lines dropped" in d.log_path.read_text()
    assert d.stop() == 0
    assert plugin_processes(marker) == []


def test_reload_command_and_sighup_rescan_every_process(
    start: Any, pdir: PluginDir, out: Path
) -> None:
    pdir.write("all_keep.sh", "sleep 1000\n")
    pdir.write("worker_gone.sh", "sleep 1000\n")
    pdir.write("all_change.sh", "echo v1; sleep 1000\n")
    d = start(num_workers=2)

    def rows() -> dict[str, dict[str, Any]]:
        with d.client(timeout=10) as c:
            return all_plugin_status(c.stats())

    wait_for(lambda: len(rows()) == 8 and all(r["pid"] for r in rows().values()))
    before = rows()
    (pdir.path / "worker_gone.sh").unlink()
    pdir.write("all_change.sh", "echo v2; sleep 1000\n")
    pdir.write("worker_new.sh", "sleep 1000\n")
    reload = subprocess.run(
        [sys.executable, "-m", "lmcached", "reload", "--config", str(d.config_path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert reload.returncode == 0, reload.stderr
    assert "scheduler plugins: changed all_change.sh" in reload.stdout
    assert "workers asked to rescan: 0, 1" in reload.stdout

    def settled() -> bool:
        r = rows()
        names = {k for k, v in r.items() if v["state"] == "RUNNING"}
        return (
            names
            == {
                f"{p}/{n}"
                for p in ("scheduler", "worker0", "worker1")
                for n in ("all_keep.sh", "all_change.sh")
            }
            | {"worker0/worker_new.sh", "worker1/worker_new.sh"}
            and len(r) == 8
        )

    wait_for(settled, what="the rescan in every process")
    after = rows()
    for key in ("scheduler/all_keep.sh", "worker1/all_keep.sh"):
        assert after[key]["pid"] == before[key]["pid"]
    for key in ("scheduler/all_change.sh", "worker0/all_change.sh"):
        assert after[key]["pid"] != before[key]["pid"]
    assert full_log(d).count("[all_change.sh] v2") == 3

    # SIGHUP does the same, and a config change is picked up: disable one plugin.
    config = yaml.safe_load(d.config_path.read_text())
    config["plugin_config"] = {"all_keep.sh": {"enabled": False}}
    config["chunk_size"] = 128  # not a plugin key: reported, not applied
    d.config_path.write_text(yaml.safe_dump(config))
    os.kill(d.pid, signal.SIGHUP)
    wait_for(lambda: not any(k.endswith("all_keep.sh") for k in rows()), what="the disable")
    with d.client(timeout=10) as c:
        c.put([b"reload/still"], [b"ok"])
        assert bytes(c.get([b"reload/still"])[0]) == b"ok"
        assert c.cluster_map["chunk_size"] == 256
    assert "reload applies plugin keys only" in full_log(d) and "chunk_size" in full_log(d)


def test_warmup_example_preloads_blocks(start: Any, pdir: PluginDir, tmp_path: Path) -> None:
    blocks = tmp_path / "blocks"
    blocks.mkdir()
    lines = ["# key file"]
    for i in range(5):
        (blocks / f"{i}.bin").write_bytes(bytes([i]) * (1000 + i))
        lines.append(f"warm/{i} blocks/{i}.bin")
    manifest = tmp_path / "manifest.txt"
    manifest.write_text("\n".join(lines) + "\n")
    pdir.write("worker_0_warmup.py", (EXAMPLES / "worker_0_warmup.py").read_text())
    d = start(
        num_workers=2,
        plugin_config={"worker_0_warmup.py": {"settings": {"manifest": str(manifest)}}},
    )
    with d.client(timeout=10) as c:
        done = wait_for(
            lambda: (
                (r := all_plugin_status(c.stats()).get("worker0/worker_0_warmup.py"))
                and r["state"] == "EXITED"
                and r
            ),
            what="the warm-up to finish",
        )
        assert done["exit_code"] == 0, full_log(d)
        got = c.get([f"warm/{i}".encode() for i in range(5)])
        assert [bytes(g) for g in got] == [bytes([i]) * (1000 + i) for i in range(5)]
    assert "warm-up: 5 blocks" in full_log(d)


def test_world_writable_plugin_folder_refuses_to_start(
    daemon_factory: Any, pdir: PluginDir
) -> None:
    pdir.path.chmod(0o777)
    d = daemon_factory(start=False, plugin_locations=[str(pdir.path)])
    run = subprocess.run(
        [sys.executable, "-m", "lmcached", "start", "--config", str(d.config_path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode == 2
    assert "world-writable" in run.stderr and "allow_insecure_plugin_locations" in run.stderr
