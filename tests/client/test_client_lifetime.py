"""A Client that its owner forgets to close must still go away cleanly.

Regression: the client's parts referred back to the Client (bound methods), so a dropped Client
was cyclic garbage. The cycle collector clears weak references before it runs finalizers, so
the ZMQ context's own finalizer saw no open sockets, called ``term()`` and blocked for ever
on the sockets it no longer knew about: the vLLM engine test stalled until pytest-timeout
fired (300 s). The same happens to any Client that a user's own reference cycle holds.
"""

from __future__ import annotations

import subprocess
import sys

DROP_SCRIPT = """
import gc, sys, time
from lmcached.client import Client

def use(endpoint, cyclic):
    c = Client(endpoint, timeout=10)
    c.put([b"lifetime-k"], [b"v" * 1000])
    assert c.get([b"lifetime-k"])[0] is not None
    c.stats()  # opens the control socket too
    if cyclic:
        holder = {"client": c}
        holder["self"] = holder  # the user's own cycle around the client

for cyclic in (False, True):
    use(sys.argv[1], cyclic)
t = time.monotonic()
gc.collect()
print(f"collected in {time.monotonic() - t:.3f}s")
"""


def test_a_dropped_unclosed_client_is_collected_without_hanging(shared_daemon):
    out = subprocess.run(
        [sys.executable, "-c", DROP_SCRIPT, shared_daemon.endpoint],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "collected in" in out.stdout
