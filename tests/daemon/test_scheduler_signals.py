"""The scheduler's signal handlers must never wait for a lock the main thread may hold."""

from __future__ import annotations

import subprocess
import sys
import textwrap

# The scheduler process, reduced to its signal handling: SIGTERM arrives while the main thread
# is inside a log line's write, where structlog's PrintLogger holds a plain Lock. A handler that
# logged would wait for that lock for ever (seen in CI: a daemon that ignored SIGTERM after
# `daemon_ready`, until the test's SIGKILL).
SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    from lmcached import config, logs
    from lmcached.daemon.scheduler import Scheduler

    class SignalOnWrite:
        def __init__(self, out):
            self.out, self.sent = out, False
        def write(self, text):
            if not self.sent:
                self.sent = True
                os.kill(os.getpid(), signal.SIGTERM)  # handled before this write returns
            return self.out.write(text)
        def flush(self):
            self.out.flush()
        def isatty(self):
            return False

    sys.stderr = SignalOnWrite(sys.stderr)
    logs.configure("scheduler", -1, "info", "json")
    s = Scheduler(config.from_mapping({"runtime_dir": sys.argv[1]}))
    s.install_signal_handlers()
    s.log.info("daemon_ready")
    print("stopping" if s._stopping else "running", flush=True)
    """
)


def test_sigterm_during_a_log_write_stops_the_scheduler_without_a_deadlock(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "stopping"
