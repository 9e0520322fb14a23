"""Layer-by-layer loads: the forward pass waits for each layer only, never hangs, and (on CUDA)
orders its use of a layer after that layer's side-stream copies.

The loader runs real threads and real tensor copies; only ``torch.cuda`` is stood in for by a
recorder (there is no GPU here), to check the stream/event bookkeeping, not CUDA itself.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import pytest

from lmcached.integrations.kv_blocks import layer_order
from lmcached.integrations.layer_loads import CudaOrder, HostOrder, LayerLoads

pytestmark = pytest.mark.timeout(60)

LAYERS = [f"model.layers.{i}.self_attn.attn" for i in range(12)]


def test_layer_order_is_the_order_a_model_runs_its_layers() -> None:
    assert layer_order(sorted(LAYERS)) == LAYERS  # layers.10 after layers.9, not after layers.1


def test_the_forward_pass_waits_for_its_layer_only_and_the_load_overlaps_it() -> None:
    gates = [threading.Event() for _ in LAYERS]
    copied: list[int] = []

    def work(done: Any) -> None:
        for layer in range(len(LAYERS)):
            gates[layer].wait(30)
            copied.append(layer)
            done(layer)

    loads = LayerLoads(LAYERS, HostOrder())
    loads.start(work)  # returns while nothing is loaded: the forward pass may start
    assert copied == []
    gates[0].set()
    loads.wait(LAYERS[0])
    assert copied[:1] == [0]  # layer 0 is in place once its wait returns...
    assert len(copied) < len(LAYERS)  # ...while later layers are still loading
    for gate in gates[1:]:
        gate.set()
    for name in LAYERS[1:]:
        loads.wait(name)
    loads.join()
    assert copied == list(range(len(LAYERS)))
    assert loads.waits + loads.overlapped == len(LAYERS)
    loads.join()  # idempotent


def test_a_failing_load_releases_every_layer_and_reports_the_error() -> None:
    def work(done: Any) -> None:
        done(0)
        raise OSError("daemon went away")

    loads = LayerLoads(LAYERS, HostOrder())
    loads.start(work)
    for name in LAYERS:  # would hang if the failure left a layer closed
        loads.wait(name)
    loads.join()
    assert isinstance(loads.error, OSError)
    loads.wait("model.layers.99.not_a_layer")  # unknown layers never wait


class RecordingCuda:
    """Records what CudaOrder asks of torch.cuda, in order."""

    def __init__(self) -> None:
        self.log: list[tuple[str, Any]] = []
        recorder = self

        class Stream:
            def __init__(self, device: Any = None) -> None:
                self.name = "side"

            def synchronize(self) -> None:
                recorder.log.append(("synchronize", self.name))

            def wait_stream(self, other: Any) -> None:
                recorder.log.append(("wait_stream", (self.name, other.name)))

        class Event:
            def record(self, stream: Any) -> None:
                self.index = sum(1 for e in recorder.log if e[0] == "record")
                recorder.log.append(("record", (stream.name, self.index)))

        class Current:
            name = "forward"

            def wait_event(self, event: Any) -> None:
                recorder.log.append(("wait_event", event.index))

        self.Stream = Stream
        self.Event = Event
        self._current = Current()

    def stream(self, stream: Any) -> Any:
        @contextlib.contextmanager
        def ctx() -> Any:
            self.log.append(("enter", stream.name))
            yield
            self.log.append(("exit", stream.name))

        return ctx()

    def current_stream(self, device: Any = None) -> Any:
        return self._current


def test_cuda_copies_run_on_a_side_stream_and_each_layer_is_ordered_by_its_event() -> None:
    cuda = RecordingCuda()
    order = CudaOrder(cuda, device="cuda:0")

    def work(done: Any) -> None:
        for layer in range(3):
            cuda.log.append(("copy", layer))
            done(layer)

    loads = LayerLoads(LAYERS[:3], order)
    loads.start(work)
    for name in LAYERS[:3]:
        loads.wait(name)
    loads.join()

    # The side stream starts after what the forward stream had queued (the edge block's copy).
    assert cuda.log[0] == ("wait_stream", ("side", "forward"))
    copies_and_records = [e for e in cuda.log if e[0] in ("enter", "copy", "record", "exit")]
    assert copies_and_records == [
        ("enter", "side"),
        ("copy", 0),
        ("record", ("side", 0)),
        ("copy", 1),
        ("record", ("side", 1)),
        ("copy", 2),
        ("record", ("side", 2)),
        ("exit", "side"),
    ]
    # The forward pass's stream waits on each layer's event (the host does not block on it),
    # and join() waits for the side stream before the copies' sources may be freed.
    assert [e for e in cuda.log if e[0] == "wait_event"] == [("wait_event", i) for i in range(3)]
    assert cuda.log[-1] == ("synchronize", "side")
    assert order.events == {}


class RecordingCudart:
    """Stands in for torch.cuda.cudart() (no GPU here); fails for one chosen address."""

    def __init__(self, failing: int = -1) -> None:
        self.calls: list[tuple[str, int]] = []
        self.failing = failing

    def cudaHostRegister(self, address: int, size: int, flags: int) -> int:
        self.calls.append(("register", address))
        return 1 if address == self.failing else 0

    def cudaHostUnregister(self, address: int) -> int:
        self.calls.append(("unregister", address))
        return 0


def test_arenas_are_registered_with_cuda_once_and_unregistered_at_close() -> None:
    from lmcached.integrations.kv_blocks import HostRegistrations

    cudart = RecordingCudart(failing=3000)
    registry = HostRegistrations(cudart)
    assert registry.register(1000, 4096) and registry.register(1000, 4096)  # second: no call
    assert registry.register(2000, 8192)
    assert not registry.register(3000, 4096)  # a failure leaves copies synchronous, not broken
    assert not registry.register(4000, 0)
    assert 1000 in registry and 3000 not in registry and registry.failures == 1

    registry.close()
    registry.close()  # idempotent
    assert cudart.calls == [
        ("register", 1000),
        ("register", 2000),
        ("register", 3000),  # read-only registration refused,
        ("register", 3000),  # then the default one too
        ("unregister", 1000),
        ("unregister", 2000),
    ]


def test_a_restarted_workers_arena_is_unregistered_before_the_client_may_unmap_it() -> None:
    """After a worker's kill -9 the client maps its new arena; CUDA's registration of the old
    one must end before that mapping goes, or the device would copy the dead arena's pages."""
    import logging
    import os
    import signal

    from lmcached.client import Client
    from lmcached.integrations.daemon_link import DaemonLink
    from lmcached.integrations.kv_blocks import HostRegistrations
    from lmcached.testing import wait_until
    from lmcached.testing.daemon_process import DaemonProcess

    with DaemonProcess(num_workers=1, max_local_cpu_size="64MiB", metrics_port=None) as d:
        link = DaemonLink(
            lambda: Client(d.endpoint, timeout=30), logging.getLogger("test"), 30.0, 0.1
        )
        cudart = RecordingCudart()
        registry = HostRegistrations(cudart)
        try:
            assert link.put([b"before"], [b"x" * 4096])
            registry.register_arenas(link.arenas())
            registry.register_arenas(link.arenas())  # already registered: no second call
            (old,) = registry.arenas
            assert cudart.calls == [("register", old)]

            with Client(d.endpoint, timeout=30) as control:
                (worker,) = control.control("map")["map"]["workers"]
                os.kill(worker["pid"], signal.SIGKILL)
                wait_until(
                    lambda: (
                        control.control("map")["map"]["workers"][0]["pid"] != worker["pid"]
                        and control.control("map")["map"]["workers"][0]["state"] == "up"
                    ),
                    60,
                    what="the worker's restart",
                )
            wait_until(lambda: link.put([b"after"], [b"y" * 4096]), 30, 0.1, "a put after it")
            # A get from the new worker names its arena: the client maps it, drops the old one.
            assert bytes(link.get([b"after"])[0]) == b"y" * 4096
            (arena,) = link.arenas()
            registry.register_arenas([arena])
            (new,) = registry.arenas
            # The old mapping was still held, so the new one could not take its address.
            assert new != old
            assert cudart.calls == [("register", old), ("unregister", old), ("register", new)]
            assert old not in registry and new in registry

            registry.register_arenas([])  # a client with no arenas left (shared memory off)
            assert registry.arenas == [] and cudart.calls[-1] == ("unregister", new)
        finally:
            registry.close()
            link.close()


def test_an_arena_cuda_refuses_is_not_asked_for_again_while_it_is_mapped() -> None:
    from lmcached.integrations.kv_blocks import HostRegistrations

    class RefusingCudart(RecordingCudart):
        def cudaHostRegister(self, address: int, size: int, flags: int) -> int:
            super().cudaHostRegister(address, size, flags)
            return 1

    cudart = RefusingCudart()
    registry = HostRegistrations(cudart)
    arena, other = bytearray(8192), bytearray(8192)
    for _ in range(3):  # one step after another
        registry.register_arenas([arena])
    assert len(cudart.calls) == 2  # read-only, then default: once, not every step
    assert registry.arenas == [] and registry.failures == 1
    registry.register_arenas([other])  # the first arena is gone: a new one is tried
    assert len(cudart.calls) == 4 and registry.failures == 2
    registry.close()
