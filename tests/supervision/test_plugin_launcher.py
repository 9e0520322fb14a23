"""PluginLauncher with real plugin subprocesses: selection, env, output, supervision, reload."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import psutil
import pytest
from plugin_helpers import PluginDir, plugin_status, processes_with_marker, states, wait_for

from lmcached.supervision.launcher import PluginLauncher

# A bash plugin body that records which process launched it: one file per (plugin, process).
RECORD = (
    'who="$LMCACHE_PLUGIN_ROLE$LMCACHE_PLUGIN_WORKER_ID"\n'
    'echo "$LMCACHE_PLUGIN_ROLE $LMCACHE_PLUGIN_WORKER_ID" > "$PLUGIN_OUT/$(basename "$0")@$who"\n'
)


def recorded(tmp_path: Path) -> set[str]:
    return {p.name for p in (tmp_path / "out").iterdir()}


def test_role_and_worker_id_matrix_with_three_workers(
    launcher: Any, plugin_dir: PluginDir, tmp_path: Path
) -> None:
    for name in [
        "scheduler_a.sh",
        "SCHEDULER_b.sh",
        "worker_c.sh",
        "worker_1_d.sh",
        "Worker_2.sh",
        "worker_7_ghost.sh",
        "all_e.sh",
        "monitor.sh",
    ]:
        plugin_dir.write(name, RECORD)
    plugin_dir.write("noext", "#!/bin/bash\n" + RECORD)
    plugin_dir.write("notes.txt", RECORD)
    plugin_dir.write(".hidden.sh", RECORD)
    (plugin_dir.path / "helpers").mkdir()
    (plugin_dir.path / "helpers" / "all_nested.sh").write_text(RECORD)

    launchers = [launcher("scheduler")[0]] + [launcher("worker", i)[0] for i in range(3)]
    for pl in launchers:
        pl.start()
    expected = {
        "scheduler_a.sh@SCHEDULER-1",
        "SCHEDULER_b.sh@SCHEDULER-1",
        "all_e.sh@SCHEDULER-1",
        "monitor.sh@SCHEDULER-1",
        "noext@SCHEDULER-1",
        "Worker_2.sh@WORKER2",
        "worker_1_d.sh@WORKER1",
    }
    for i in range(3):
        expected |= {f"{n}@WORKER{i}" for n in ("worker_c.sh", "all_e.sh", "monitor.sh", "noext")}
    wait_for(
        lambda: all(s["state"] == "EXITED" for pl in launchers for s in pl.status()),
        what="every plugin to exit",
    )
    assert recorded(tmp_path) == expected
    assert sorted(states(launchers[2])) == [
        "all_e.sh",
        "monitor.sh",
        "noext",
        "worker_1_d.sh",
        "worker_c.sh",
    ]


def test_missing_worker_id_is_a_warning_on_the_scheduler(
    launcher: Any, plugin_dir: PluginDir
) -> None:
    plugin_dir.write("worker_7_ghost.sh", "echo ghost\n")
    pl, logs = launcher("scheduler")
    pl.start()
    warnings = [kw for level, kw in logs.events("worker_7_ghost.sh") if level == "warning"]
    assert warnings and warnings[0]["worker_id"] == 7 and warnings[0]["num_workers"] == 3
    assert pl.status() == []


def test_interpreters_shebangs_and_a_missing_one(
    launcher: Any, plugin_dir: PluginDir, tmp_path: Path
) -> None:
    body = textwrap.dedent(
        """
        import os, sys
        path = os.path.join(os.environ["PLUGIN_OUT"], os.path.basename(__file__))
        with open(path, "w") as f:
            f.write(f"{sys.executable} optimize={sys.flags.optimize}")
        """
    )
    plugin_dir.write("env_o.py", "#!/usr/bin/env python3 -O\n" + body)
    plugin_dir.write("abs.py", f"#!{sys.executable}\n" + body, executable=True)
    plugin_dir.write("noshebang.py", body)
    plugin_dir.write("noshebang.sh", 'echo "$BASH_VERSION" > "$PLUGIN_OUT/noshebang.sh"\n')
    plugin_dir.write("noexec.sh", '#!/bin/sh\necho sh > "$PLUGIN_OUT/noexec.sh"\n')
    plugin_dir.write("missing.py", "#!/nonexistent/bin/python9\nprint(1)\n")
    pl, logs = launcher("worker", 0)
    pl.start()
    wait_for(
        lambda: len([s for s in pl.status() if s["state"] in ("EXITED", "FATAL")]) == 6,
        what="all plugins to finish",
    )
    out = tmp_path / "out"
    # The shebang's argument (-O) reached the interpreter found through env.
    assert (out / "env_o.py").read_text().endswith(" optimize=1")
    assert (out / "abs.py").read_text() == f"{sys.executable} optimize=0"
    assert (out / "noshebang.py").read_text() == f"{sys.executable} optimize=0"
    assert (out / "noshebang.sh").read_text().strip()
    assert (out / "noexec.sh").read_text() == "sh\n"
    missing = plugin_status(pl, "missing.py")
    assert missing["state"] == "FATAL"
    assert "/nonexistent/bin/python9" in missing["last_error"]
    errors = [kw for level, kw in logs.events("missing.py") if level == "error"]
    assert any("/nonexistent/bin/python9" in kw.get("error", "") for kw in errors)
    assert all(s["exit_code"] == 0 for s in pl.status() if s["name"] != "missing.py")


def test_environment_and_redacted_config(
    launcher: Any, plugin_dir: PluginDir, tmp_path: Path, marker: str
) -> None:
    plugin_dir.write(
        "worker_1_env.py",
        """
        import json, os
        env = {k: v for k, v in os.environ.items() if k.startswith(("LMCACHE", "PYTHONUNBUF"))}
        with open(os.path.join(os.environ["PLUGIN_OUT"], "env.json"), "w") as f:
            json.dump({"env": env, "marker": os.environ["PLUGIN_TEST_MARKER"]}, f)
        """,
    )
    pl, _ = launcher(
        "worker",
        1,
        extra_config={"remote_url": "redis://user:hunter2@10.0.0.1:6379", "api_token": "tok-1"},
        plugin_config={"worker_1_env.py": {"settings": {"interval": 5, "token": "mine"}}},
    )
    pl.start()
    envfile = tmp_path / "out" / "env.json"
    wait_for(envfile.exists, what="the plugin to write its env")
    wait_for(lambda: plugin_status(pl, "worker_1_env.py")["state"] == "EXITED")
    data = json.loads(envfile.read_text())
    env = data["env"]
    assert data["marker"] == marker  # the daemon's environment is inherited
    assert env["LMCACHE_PLUGIN_ROLE"] == "WORKER"
    assert env["LMCACHE_PLUGIN_WORKER_ID"] == "1"
    assert env["LMCACHE_PLUGIN_WORKER_COUNT"] == "3"
    assert env["LMCACHED_CONTROL_ENDPOINT"] == "tcp://127.0.0.1:7470"
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["LMCACHE_PLUGIN_SETTING_INTERVAL"] == "5"
    assert env["LMCACHE_PLUGIN_SETTING_TOKEN"] == "mine"
    for key in ("ROLE", "WORKER_ID", "WORKER_COUNT", "CONFIG"):
        assert env[f"LMCACHE_RUNTIME_PLUGIN_{key}"] == env[f"LMCACHE_PLUGIN_{key}"]
    raw = env["LMCACHE_PLUGIN_CONFIG"]
    assert "hunter2" not in raw and "tok-1" not in raw
    config = json.loads(raw)
    assert config["num_workers"] == 3
    assert config["extra_config"]["remote_url"] == "redis://user:***@10.0.0.1:6379"
    assert config["extra_config"]["api_token"] == "***"
    assert config["plugin"] == {
        "name": "worker_1_env.py",
        "settings": {"interval": 5, "token": "mine"},
    }
    assert "plugin_config" not in config


def test_scheduler_env_has_worker_id_minus_one(
    launcher: Any, plugin_dir: PluginDir, tmp_path: Path
) -> None:
    plugin_dir.write("scheduler_env.sh", RECORD)
    pl, _ = launcher("scheduler")
    pl.start()
    wait_for(lambda: plugin_status(pl, "scheduler_env.sh")["state"] == "EXITED")
    assert (tmp_path / "out" / "scheduler_env.sh@SCHEDULER-1").read_text() == "SCHEDULER -1\n"


def test_output_is_logged_by_line_with_prefix_and_stream(
    launcher: Any, plugin_dir: PluginDir
) -> None:
    plugin_dir.write(
        "talk.sh",
        r"""
        echo "first line"
        echo "to stderr" >&2
        printf 'split '; sleep 0.1; printf 'line\n'
        printf 'bad \xff\xfe bytes \033[31m\r\n'
        head -c 20000 /dev/zero | tr '\0' 'x'; echo
        echo "after long"
        printf 'no newline at end'
        """,
    )
    pl, logs = launcher("worker", 0)
    pl.start()
    wait_for(lambda: plugin_status(pl, "talk.sh")["state"] == "EXITED")
    out = logs.output("talk.sh")
    assert ("info", "[talk.sh] first line") in out
    assert ("warning", "[talk.sh] to stderr") in out
    assert ("info", "[talk.sh] split line") in out
    assert ("info", "[talk.sh] bad \\xff\\xfe bytes \\x1b[31m") in out
    long = [e for _, e in out if e.startswith("[talk.sh] xxx")]
    assert len(long) == 1 and long[0].endswith("[line truncated]") and len(long[0]) < 8300
    assert ("info", "[talk.sh] after long") in out
    assert out[-1] == ("info", "[talk.sh] no newline at end")
    assert all(
        kw["stream"] in ("stdout", "stderr") for _, kw in logs.events("talk.sh") if "stream" in kw
    )


def test_flooding_plugin_is_rate_limited_and_counted(launcher: Any, plugin_dir: PluginDir) -> None:
    plugin_dir.write("flood.sh", "exec yes flooding\n")
    plugin_dir.write("quiet.sh", "while true; do echo tick; sleep 0.2; done\n")
    pl, logs = launcher("worker", 0, plugin_log_rate_limit=20)
    pl.start()
    wait_for(lambda: plugin_status(pl, "flood.sh")["dropped_lines"] > 10000, what="drops")
    reports = lambda: [kw for lvl, kw in logs.events("flood.sh") if "dropped" in kw]  # noqa: E731
    drops = wait_for(reports, what="a dropped-lines report")
    assert drops[0]["limit_per_second"] == 20 and drops[0]["dropped"] > 0
    logged = len(logs.output("flood.sh"))
    # At most the burst (10 s worth) plus what the elapsed seconds allow, far below the flood.
    assert logged < plugin_status(pl, "flood.sh")["dropped_lines"]
    wait_for(lambda: len(logs.output("quiet.sh")) >= 3, what="the quiet plugin's lines")
    wait_for(lambda: states(pl) == {"flood.sh": "RUNNING", "quiet.sh": "RUNNING"})


def test_crash_loop_with_on_failure_reaches_fatal(launcher: Any, plugin_dir: PluginDir) -> None:
    plugin_dir.write("crash.sh", "echo crashing; exit 3\n")
    pl, logs = launcher(
        "worker",
        0,
        plugin_config={"crash.sh": {"restart": "on-failure", "max_retries": 2, "backoff": 0.05}},
    )
    pl.start()
    wait_for(lambda: plugin_status(pl, "crash.sh")["state"] == "FATAL", what="FATAL")
    st = plugin_status(pl, "crash.sh")
    assert st["restarts"] == 2 and st["exit_code"] == 3
    assert "max_retries 2" in st["last_error"]
    seen = [kw["new"] for _, kw in logs.events("crash.sh") if kw.get("event") == "plugin state"]
    assert seen == ["STARTING", "BACKOFF", "STARTING", "BACKOFF", "STARTING", "FATAL"]


def test_always_retries_up_to_max_and_on_failure_keeps_a_clean_exit(
    launcher: Any, plugin_dir: PluginDir
) -> None:
    plugin_dir.write("clean.sh", "exit 0\n")
    plugin_dir.write("always.sh", "exit 0\n")
    plugin_dir.write("never.sh", "exit 1\n")
    pl, _ = launcher(
        "worker",
        0,
        plugin_config={
            "clean.sh": {"restart": "on-failure"},
            # A long grace period: the launcher learns of an exit through the shim, and on a
            # loaded host that report can come after a 1 s grace, turning a fast failure into
            # a successful start and resetting the retry count.
            "always.sh": {
                "restart": "always",
                "max_retries": 1,
                "backoff": 0.05,
                "start_seconds": 60,
            },
        },
    )
    pl.start()
    wait_for(
        lambda: states(pl) == {"clean.sh": "EXITED", "always.sh": "FATAL", "never.sh": "EXITED"}
    )
    assert plugin_status(pl, "always.sh")["restarts"] == 1
    assert plugin_status(pl, "never.sh")["exit_code"] == 1
    assert plugin_status(pl, "clean.sh")["restarts"] == 0


def test_stop_kills_sigterm_ignorers_and_grandchildren(
    launcher: Any, plugin_dir: PluginDir, marker: str
) -> None:
    plugin_dir.write(
        "stubborn.sh",
        """
        trap '' TERM
        sleep 1000 &
        setsid sleep 1001 &
        (trap '' TERM; while true; do sleep 1; done) &
        echo started
        while true; do sleep 1; done
        """,
    )
    plugin_dir.write("polite.py", "import time\nprint('up')\ntime.sleep(1000)\n")
    pl, logs = launcher("worker", 0, plugin_stop_timeout=1.0)
    pl.start()
    wait_for(lambda: states(pl) == {"polite.py": "RUNNING", "stubborn.sh": "RUNNING"})
    wait_for(lambda: ("info", "[stubborn.sh] started") in logs.output("stubborn.sh"))
    procs = processes_with_marker(marker)
    names = {p.name() for p in procs}
    assert {"sleep", "bash"} <= names, names
    pl.stop()
    pl.stop()  # idempotent
    assert processes_with_marker(marker) == []
    assert states(pl) == {"polite.py": "STOPPED", "stubborn.sh": "STOPPED"}
    assert plugin_status(pl, "stubborn.sh")["exit_code"] == -signal.SIGKILL


def test_leftovers_of_an_exited_plugin_are_stopped(
    launcher: Any, plugin_dir: PluginDir, marker: str
) -> None:
    plugin_dir.write("leaves_child.sh", "sleep 1000 &\necho bye\n")
    pl, _ = launcher("worker", 0)
    pl.start()
    wait_for(lambda: plugin_status(pl, "leaves_child.sh")["state"] == "EXITED")
    assert processes_with_marker(marker) == []


OWNER = textwrap.dedent(
    """
    import sys
    from lmcached.config import from_mapping
    from lmcached.supervision.launcher import PluginLauncher
    cfg = from_mapping(
        {"plugin_locations": [sys.argv[1]], "num_workers": 1, "plugin_stop_timeout": 1},
        environ={},
    )
    launcher = PluginLauncher(cfg, "worker", 0)
    launcher.start()
    print("started", flush=True)
    sys.stdin.read()
    """
)


def test_kill_9_of_the_owner_leaves_no_plugin_process(
    launcher: Any, plugin_dir: PluginDir, marker: str, tmp_path: Path
) -> None:
    plugin_dir.write(
        "tree.sh",
        f"""
        trap '' TERM
        sleep 1000 &
        setsid sleep 1002 &
        bash -c 'sleep 1003 & wait' &
        python3 -c 'import os, time; os.fork() or os.setsid(); time.sleep(1000)' &
        echo started > "$PLUGIN_OUT/tree-started"
        while true; do sleep 1; done  # {marker}
        """,
    )
    plugin_dir.write("worker_py.py", f"import time\ntime.sleep(1000)  # {marker}\n")
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER, str(plugin_dir.path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert owner.stdout is not None
        while owner.stdout.readline() not in (b"started\n", b""):
            pass  # structlog's default output goes to stdout too
        wait_for((tmp_path / "out" / "tree-started").exists, what="the plugin tree")
        wait_for(
            lambda: len([p for p in processes_with_marker(marker) if _name(p) == "sleep"]) >= 3
        )
        plugin_pids = {p.pid for p in processes_with_marker(marker)}
        # The plugins' own groups (the shims stay in the owner's group, which is the test's).
        pgids = {_pgid(pid) for pid in plugin_pids} - {None, os.getpgrp()}
        assert pgids
        assert len(plugin_pids) >= 8
        owner.send_signal(signal.SIGKILL)
        owner.wait()
        # The tree ignores SIGTERM, so this also waits through the shim's SIGKILL escalation.
        wait_for(lambda: not processes_with_marker(marker), 20, "every plugin process to die")
        in_groups = [
            p for p in psutil.process_iter() if _pgid(p.pid) in pgids and _status(p) != "zombie"
        ]
        assert in_groups == []
        by_cmdline = [
            p
            for p in psutil.process_iter(["cmdline"])
            if marker in " ".join(p.info["cmdline"] or [])
        ]
        assert by_cmdline == []
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()


# The plugin's `while true; do sleep 1` loop starts and ends short-lived processes all the time:
# one listed a moment ago may be gone by the time it is asked for its name or status.
def _name(p: psutil.Process) -> str | None:
    try:
        return p.name()
    except psutil.NoSuchProcess:
        return None


def _status(p: psutil.Process) -> str | None:
    try:
        return p.status()
    except psutil.NoSuchProcess:
        return None


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def test_reload_adds_removes_and_restarts_changed(launcher: Any, plugin_dir: PluginDir) -> None:
    plugin_dir.write("keep.py", "import time\ntime.sleep(1000)\n")
    plugin_dir.write("change.py", "import time\nprint('v1')\ntime.sleep(1000)\n")
    plugin_dir.write("remove.py", "import time\ntime.sleep(1000)\n")
    pl, logs = launcher("worker", 0)
    pl.start()
    wait_for(lambda: set(states(pl).values()) == {"RUNNING"})
    keep_pid = plugin_status(pl, "keep.py")["pid"]
    change_pid = plugin_status(pl, "change.py")["pid"]

    (plugin_dir.path / "remove.py").unlink()
    plugin_dir.write("change.py", "import time\nprint('v2')\ntime.sleep(1000)\n")
    plugin_dir.write("new.sh", "echo new\nsleep 1000\n")
    changes = pl.reload()

    assert changes["added"] == ["new.sh"]
    assert changes["removed"] == ["remove.py"]
    assert changes["changed"] == ["change.py"]
    wait_for(
        lambda: states(pl) == {"keep.py": "RUNNING", "change.py": "RUNNING", "new.sh": "RUNNING"},
        what="the reloaded set",
    )
    assert plugin_status(pl, "keep.py")["pid"] == keep_pid
    assert plugin_status(pl, "change.py")["pid"] != change_pid
    assert not psutil.pid_exists(change_pid) or psutil.Process(change_pid).status() == "zombie"
    wait_for(lambda: ("info", "[change.py] v2") in logs.output("change.py"))
    assert pl.reload() == {"added": [], "removed": [], "changed": [], "retried": []}


def test_reload_retries_fatal_and_applies_new_plugin_config(
    launcher: Any, plugin_dir: PluginDir, make_config: Any
) -> None:
    plugin_dir.write("fails.sh", "exit 1\n")
    plugin_dir.write("nointerp.sh", "#!/nonexistent/sh\n")
    pl, _ = launcher("worker", 0)
    pl.start()
    wait_for(lambda: plugin_status(pl, "fails.sh")["state"] == "EXITED")
    assert plugin_status(pl, "nointerp.sh")["state"] == "FATAL"
    # Unchanged FATAL plugins are tried again on every reload; still missing: still FATAL.
    assert pl.reload()["retried"] == ["nointerp.sh"]
    assert plugin_status(pl, "nointerp.sh")["state"] == "FATAL"
    cfg = make_config(plugin_config={"fails.sh": {"restart": "on-failure", "max_retries": 0}})
    assert pl.reload(cfg)["changed"] == ["fails.sh"]
    wait_for(lambda: plugin_status(pl, "fails.sh")["state"] == "FATAL")
    plugin_dir.write("fails.sh", "sleep 1000\n")
    pl.reload()
    wait_for(lambda: plugin_status(pl, "fails.sh")["state"] == "RUNNING")
    disabled = make_config(
        plugin_config={"fails.sh": {"enabled": False}, "nointerp.sh": {"enabled": False}}
    )
    assert pl.reload(disabled)["removed"] == ["fails.sh", "nointerp.sh"]
    wait_for(lambda: pl.status() == [])


def test_rlimits_apply_to_the_plugin(launcher: Any, plugin_dir: PluginDir, tmp_path: Path) -> None:
    plugin_dir.write(
        "limited.sh", 'echo "$(ulimit -n) $(ulimit -v) $(ulimit -t)" > "$PLUGIN_OUT/limits"\n'
    )
    pl, _ = launcher(
        "worker",
        0,
        plugin_config={
            "limited.sh": {"rlimits": {"open_files": 64, "memory": "512MiB", "cpu_seconds": 30}}
        },
    )
    pl.start()
    wait_for(lambda: plugin_status(pl, "limited.sh")["state"] == "EXITED")
    assert (tmp_path / "out" / "limits").read_text().split() == ["64", str(512 * 1024), "30"]


def test_bad_role_and_out_of_order_calls_are_refused(make_config: Any) -> None:
    with pytest.raises(ValueError, match="role must be"):
        PluginLauncher(make_config(), "controller")
    pl = PluginLauncher(make_config(), "worker", 0)
    with pytest.raises(RuntimeError, match="before start"):
        pl.reload()
    pl.stop()
    pl.stop()
    with pytest.raises(RuntimeError, match="stopped"):
        pl.start()


def test_stop_is_idempotent_and_later_calls_fail_fast(launcher: Any, plugin_dir: PluginDir):
    plugin_dir.write("p.sh", "sleep 1000\n")
    pl, _ = launcher("worker", 0)
    pl.start()
    wait_for(lambda: states(pl) == {"p.sh": "RUNNING"})
    pl.request_stop()
    pl.request_stop()
    pl.stop()
    pl.stop()
    assert states(pl) == {"p.sh": "STOPPED"}
    with pytest.raises(RuntimeError, match="stopped"):
        pl.reload()
    pl.request_reload()  # a late SIGHUP: ignored, no error


EXAMPLES = Path(__file__).resolve().parents[2] / "plugin_examples"


def test_shell_examples_beat_and_exit_cleanly_on_stop(
    launcher: Any, plugin_dir: PluginDir, tmp_path: Path
) -> None:
    for name in ("worker_health.sh", "all_heartbeat.sh"):
        plugin_dir.write(name, (EXAMPLES / name).read_text())
    beats = tmp_path / "beats"
    beats.mkdir()
    pl, logs = launcher(
        "worker",
        2,
        plugin_config={
            "worker_health.sh": {"settings": {"interval": 0.1, "heartbeat_dir": str(beats)}},
            "all_heartbeat.sh": {"settings": {"interval": 0.1}},
        },
    )
    pl.start()
    alive = beats / "worker-2.alive"
    wait_for(alive.exists, what="the heartbeat file")
    wait_for(lambda: len(logs.output("worker_health.sh")) >= 3, what="heartbeats")
    lines = wait_for(lambda: logs.output("all_heartbeat.sh"), what="the all_ heartbeat")
    assert lines[0][1].startswith(
        f"[all_heartbeat.sh] heartbeat role=WORKER worker=2 pid={os.getpid()}"
    )
    pl.stop()
    # The trap ran: clean exit (not a signal), file removed, goodbye logged.
    assert plugin_status(pl, "worker_health.sh")["exit_code"] == 0
    assert plugin_status(pl, "all_heartbeat.sh")["exit_code"] == 0
    assert not alive.exists()
    assert ("info", "[worker_health.sh] worker 2 health: stopping") in logs.output(
        "worker_health.sh"
    )


def test_plugin_gets_default_signals_and_one_sigterm(
    launcher: Any, plugin_dir: PluginDir, tmp_path: Path
) -> None:
    # Stopping sends SIGTERM once per process: a second one could arrive while a Python plugin
    # exits (handlers are reset during interpreter shutdown) and kill it uncleanly.
    plugin_dir.write(
        "polite.py",
        """
        import os, signal, sys, time
        out = os.environ["PLUGIN_OUT"]
        dispositions = [signal.getsignal(s) for s in (signal.SIGHUP, signal.SIGTERM)]
        with open(os.path.join(out, "signals"), "w") as f:
            f.write(repr([d == signal.SIG_DFL for d in dispositions]))
            f.write(repr(signal.pthread_sigmask(signal.SIG_BLOCK, [])))
        got = []
        def count(*_):
            got.append(1)
            with open(os.path.join(out, "sigterms"), "w") as f:
                f.write(str(len(got)))
        signal.signal(signal.SIGTERM, count)
        print("ready", flush=True)
        while not got:
            time.sleep(0.05)
        time.sleep(0.3)  # a duplicate SIGTERM would arrive while we wind down
        """,
    )
    pl, logs = launcher("worker", 0)
    pl.start()
    wait_for(lambda: ("info", "[polite.py] ready") in logs.output("polite.py"))
    assert (tmp_path / "out" / "signals").read_text() == "[True, True]set()"
    pl.stop()
    assert (tmp_path / "out" / "sigterms").read_text() == "1"
    assert plugin_status(pl, "polite.py")["exit_code"] == 0


def test_plugin_whose_exec_fails_is_fatal(
    launcher: Any, plugin_dir: PluginDir, tmp_path: Path
) -> None:
    # An "interpreter" that exists and is executable but is no program: exec fails in the shim.
    bogus = tmp_path / "bogus-interpreter"
    bogus.write_bytes(b"\x00not a program\n")
    bogus.chmod(0o755)
    plugin_dir.write("bad.sh", f"#!{bogus}\necho never\n")
    plugin_dir.write("fine.sh", "echo fine\n")
    pl, logs = launcher("worker", 0)
    pl.start()
    wait_for(lambda: states(pl) == {"bad.sh": "FATAL", "fine.sh": "EXITED"})
    error = plugin_status(pl, "bad.sh")["last_error"]
    assert "cannot start" in error and "format error" in error.lower(), error
    assert not logs.output("bad.sh")


def test_memory_rlimit_is_enforced(launcher: Any, plugin_dir: PluginDir) -> None:
    plugin_dir.write("hog.py", "x = bytearray(256 << 20)\nprint('allocated')\n")
    pl, logs = launcher("worker", 0, plugin_config={"hog.py": {"rlimits": {"memory": "128MiB"}}})
    pl.start()
    wait_for(lambda: plugin_status(pl, "hog.py")["state"] == "EXITED")
    assert plugin_status(pl, "hog.py")["exit_code"] == 1
    assert any("MemoryError" in line for _, line in logs.output("hog.py", "stderr"))


def test_kill_9_of_a_shim_takes_its_plugin_group_down(
    launcher: Any, plugin_dir: PluginDir, marker: str
) -> None:
    plugin_dir.write("tree.sh", "sleep 1000 &\nsleep 1001 &\nwait\n")
    pl, _ = launcher("worker", 0, plugin_config={"tree.sh": {"restart": "on-failure"}})
    pl.start()
    first = wait_for(lambda: plugin_status(pl, "tree.sh")["pid"] and plugin_status(pl, "tree.sh"))
    wait_for(lambda: len(processes_with_marker(marker)) == 4, what="shim, bash and 2 sleeps")
    old = {p.pid for p in processes_with_marker(marker)}
    os.kill(first["shim_pid"], signal.SIGKILL)
    # The plugin dies with its shim (death signal), its sleeps through the group kill, and the
    # failure is restarted like any other.
    wait_for(lambda: not old & {p.pid for p in processes_with_marker(marker)}, what="old tree gone")
    wait_for(lambda: plugin_status(pl, "tree.sh")["restarts"] == 1, what="the restart")
