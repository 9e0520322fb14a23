"""The resend policy is a value passed to the Client; today's behaviour is its default."""

from __future__ import annotations

import pytest

from lmcached import LMCachedUnavailable
from lmcached.client import Retry


def test_without_resends_a_call_interrupted_by_a_daemon_restart_fails(daemon_factory):
    d = daemon_factory(num_workers=2)
    with d.client(timeout=20, retry=Retry(resends=0)) as c:
        c.put([b"before"], [b"1"])
        assert d.stop() == 0
        d.start()
        with pytest.raises(LMCachedUnavailable, match="failed once within one call"):
            c.put([b"after"], [b"2"])
        # The failed call refreshed the map: the next one reaches the new daemon.
        c.put([b"after"], [b"2"])
        assert bytes(c.get([b"after"])[0]) == b"2"
