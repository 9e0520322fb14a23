"""The CPU budget counts what an entry really costs: slot bytes, key, meta and a fixed overhead."""

from __future__ import annotations

import psutil

from .helpers import cpu_stats, worker_pid

MIB = 1 << 20


def test_small_blocks_with_large_metas_stay_within_the_cpu_budget(daemon_factory):
    # Before: the budget counted payload bytes only, so 0-byte blocks with 2 MB metas grew a
    # worker without bound and were never evicted. The wire now caps a meta (max_meta_bytes,
    # at most 1 MiB); the budget must hold whatever that cap lets through.
    d = daemon_factory(num_workers=1, max_local_cpu_size="64MiB", max_meta_bytes="1MiB")
    meta = {"pad": "m" * (1000 * 1000)}
    with d.client(timeout=60) as c:
        worker = psutil.Process(worker_pid(c, 0))
        before = worker.memory_info().rss
        for i in range(250):  # 250 MB of metas, about 4x the budget
            c.put([f"meta-flood/{i:04d}".encode()], [b""], metas=[meta])
        grown = worker.memory_info().rss - before
        stats = cpu_stats(c)[0]
        assert stats["evictions"] > 0
        assert stats["used_bytes"] <= 64 * MIB
        assert grown <= 64 * MIB + 64 * MIB, f"worker grew by {grown / MIB:.0f} MiB"
        # The newest entries are still served, metas intact.
        last = c.get_with_meta([b"meta-flood/0249"])[0]
        assert last is not None and last[1] == meta


def test_stream_of_empty_blocks_under_short_keys_stays_within_the_cpu_budget(daemon_factory):
    # Before: an entry's fixed overhead was counted as 512 bytes, but an entry costs the
    # worker's heap about 1.1 KiB besides its key; 0-byte blocks under 24-byte keys grew a
    # worker on a 64 MiB budget by about 120 MiB (to budget + 122 MiB).
    d = daemon_factory(num_workers=1, max_local_cpu_size="64MiB")
    with d.client(timeout=60) as c:
        worker = psutil.Process(worker_pid(c, 0))
        n = 0
        while n == 0 or cpu_stats(c)[0]["evictions"] < 3 * cpu_stats(c)[0]["entries"]:
            keys = [f"empty/{n:06d}/{i:04d}/pad".encode() for i in range(4096)]
            c.put(keys, [b""] * len(keys))
            n += 1
        rss = worker.memory_info().rss  # the target: the budget plus 64 MiB, start-up included
        assert rss <= 64 * MIB + 64 * MIB, f"worker RSS {rss / MIB:.0f} MiB"
        assert c.get([keys[-1]])[0] is not None  # the newest entries are still served
