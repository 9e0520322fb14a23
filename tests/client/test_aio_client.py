"""The asyncio client keeps the blocking client's contract against a real daemon, never blocks
the event loop, and survives several loops and a fork."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from lmcached import LMCachedRequestError, LMCachedTimeout, aio


def run(coro):
    """Run one coroutine on a fresh event loop (pytest-asyncio is not a test dependency)."""
    return asyncio.run(coro)


def test_every_call_of_the_contract_round_trips(shared_daemon):
    async def scenario() -> None:
        async with aio.Client.from_config(shared_daemon.config_path, timeout=30) as c:
            keys = [f"aio/rt/{i}".encode() for i in range(6)]
            values = [os.urandom(1000 + i) for i in range(6)]
            await c.put(keys, values, metas=[{"i": i} for i in range(6)])
            assert [bytes(v) for v in await c.get(keys)] == values
            with_meta = await c.get_with_meta(keys[:2])
            assert [(bytes(v), m) for v, m in with_meta] == [
                (values[0], {"i": 0}),
                (values[1], {"i": 1}),
            ]
            buffers = [bytearray(2000) for _ in keys]
            assert await c.get_into(keys, buffers) == [True] * 6
            assert bytes(buffers[3][: len(values[3])]) == values[3]
            assert await c.lookup([*keys[:3], b"aio/rt/missing", keys[4]]) == 3
            assert await c.exists([keys[0], b"aio/rt/missing"]) == [True, False]
            assert await c.delete([keys[0], b"aio/rt/missing"]) == 1
            assert await c.purge(b"aio/rt/") == 5
            assert await c.get(keys) == [None] * 6
            await c.flush()
            assert (await c.ping())["pid"] == shared_daemon.pid
            assert len((await c.stats())["workers"]) == 2
            assert (await c.cluster_map())["num_workers"] == 2
            assert await c.chunk_size() > 0
            assert (await c.control("status"))["workers"]

    run(scenario())


def test_errors_are_the_blocking_clients(shared_daemon):
    async def scenario() -> None:
        c = aio.Client.from_config(shared_daemon.config_path)
        with pytest.raises(LMCachedRequestError, match="non-empty bytes"):
            await c.get([b""])
        with pytest.raises(LMCachedRequestError, match="timeout must be > 0"):
            await c.ping(timeout=0)
        await c.close()
        await c.close()  # idempotent
        with pytest.raises(LMCachedRequestError, match="client is closed"):
            await c.get([b"k"])

    run(scenario())
    with pytest.raises(ValueError, match="max_concurrency"):
        aio.Client.from_config(shared_daemon.config_path, max_concurrency=0)


def test_one_client_serves_successive_event_loops(shared_daemon):
    c = aio.Client.from_config(shared_daemon.config_path, timeout=30)
    run(c.put([b"aio/loops"], [b"first loop"]))
    assert bytes(run(c.get([b"aio/loops"]))[0]) == b"first loop"
    run(c.close())


def test_many_concurrent_calls_share_the_bounded_pool(shared_daemon):
    async def scenario() -> None:
        async with aio.Client.from_config(
            shared_daemon.config_path, timeout=60, max_concurrency=3
        ) as c:
            keys = [f"aio/conc/{i}".encode() for i in range(40)]
            await asyncio.gather(*(c.put([k], [k * 100]) for k in keys))
            got = await asyncio.gather(*(c.get([k]) for k in keys))
            assert [bytes(g[0]) for g in got] == [k * 100 for k in keys]
            assert len(c._clients) <= 3

    run(scenario())


def test_a_waiting_call_does_not_block_the_event_loop(daemon_factory):
    d = daemon_factory(num_workers=1)
    workers = d.worker_pids()

    async def scenario() -> None:
        async with aio.Client.from_config(d.config_path, timeout=60) as c:
            await c.put([b"aio/stalled"], [b"answered after SIGCONT"])
            for pid in workers:
                os.kill(pid, signal.SIGSTOP)
            try:
                stalled = asyncio.create_task(c.get([b"aio/stalled"]))
                other = asyncio.Event()
                asyncio.get_running_loop().call_soon(other.set)
                # Had the get blocked the loop, it would have run to its end before this.
                await asyncio.wait_for(other.wait(), 30)
                assert not stalled.done()
                with pytest.raises(LMCachedTimeout):
                    await c.get([b"aio/stalled"], timeout=0.5)
            finally:
                for pid in workers:
                    os.kill(pid, signal.SIGCONT)
            assert bytes((await stalled)[0]) == b"answered after SIGCONT"

    run(scenario())


def test_a_forked_child_uses_an_inherited_client(shared_daemon):
    c = aio.Client.from_config(shared_daemon.config_path, timeout=30)
    run(c.put([b"aio/fork/parent"], [b"p"]))  # the parent's pool threads now exist
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: fresh pool, fresh sockets; the parent's are left alone

        async def child() -> bool:
            await c.put([b"aio/fork/child"], [b"c"])
            ok = bytes((await c.get([b"aio/fork/parent"]))[0]) == b"p"
            await c.close()
            return ok

        ok = False
        try:
            ok = run(child())
        finally:
            os.write(w, b"1" if ok else b"0")
            os._exit(0)
    os.close(w)
    assert os.read(r, 1) == b"1"
    os.waitpid(pid, 0)
    assert bytes(run(c.get([b"aio/fork/child"]))[0]) == b"c"
    run(c.close())
