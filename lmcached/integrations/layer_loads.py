"""Layer-by-layer loads that overlap the forward pass.

A step's loads are fetched and copied into the paged KV on a loader thread, one layer after
another in the order the model runs them, while the engine's forward pass starts. Before a
layer's attention reads its KV, the engine asks for that layer (vLLM's ``wait_for_layer_load``)
and waits only until *that* layer is in place: the copies of later layers overlap the compute
of earlier ones.

Ordering, on CPU: the loader sets a per-layer ``threading.Event`` once the layer's copies are
done; the forward pass waits on it. On CUDA: the loader issues the layer's copies on a side
stream and records a CUDA event after them; the forward pass waits on the event (the device
waits, the host does not), so the copies never block the host and never race the kernels
that read the KV. The host memory the copies read is kept alive until :meth:`LayerLoads.join`
has synchronised the side stream.

Whatever happens on the loader thread (a failed fetch, a bug), every layer is released, so the
forward pass never hangs; failures are reported as load errors by the caller, and vLLM
recomputes those blocks.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol


class DeviceOrder(Protocol):
    """How the loader's copies are ordered against the forward pass on one device."""

    def begin(self) -> None:
        """Order the loader's copies after the work already queued for the forward pass
        (called on the forward pass's thread, before the loader starts)."""

    def copies(self) -> Any:
        """A context manager under which the loader issues its copies."""

    def layer_done(self, layer: int) -> None:
        """Mark, on the device, that the copies of ``layer`` issued so far are its last."""

    def before_use(self, layer: int) -> None:
        """Make the forward pass's later work on ``layer`` wait for that layer's copies."""

    def finish(self) -> None:
        """Wait until every issued copy is complete (their sources may then be freed)."""


class HostOrder:
    """CPU tensors: a copy is complete when the loader thread returns from it."""

    def begin(self) -> None:
        return

    def copies(self) -> Any:
        import contextlib

        return contextlib.nullcontext()

    def layer_done(self, layer: int) -> None:
        return

    def before_use(self, layer: int) -> None:
        return

    def finish(self) -> None:
        return


class CudaOrder:
    """CUDA tensors: copies on a side stream, ordered by one CUDA event per layer.

    ``torch_cuda`` is ``torch.cuda`` (a parameter, so that the bookkeeping can be checked on a
    host without a GPU).
    """

    def __init__(self, torch_cuda: Any, device: Any) -> None:
        self._cuda = torch_cuda
        self._device = device
        self.stream = torch_cuda.Stream(device=device)
        self.events: dict[int, Any] = {}

    def begin(self) -> None:
        # The loader writes blocks that kernels already queued on the forward stream (the edge
        # block's copy, a previous step) may still touch; the device waits, the host does not.
        self.stream.wait_stream(self._cuda.current_stream(self._device))

    def copies(self) -> Any:
        return self._cuda.stream(self.stream)

    def layer_done(self, layer: int) -> None:
        event = self._cuda.Event()
        event.record(self.stream)
        self.events[layer] = event

    def before_use(self, layer: int) -> None:
        event = self.events.get(layer)
        if event is not None:
            self._cuda.current_stream(self._device).wait_event(event)

    def finish(self) -> None:
        self.stream.synchronize()
        self.events.clear()


# The loader's work: given ``done(layer)``, copy every layer in order, calling done after each.
LoadWork = Callable[[Callable[[int], None]], None]


class LayerLoads:
    """One step's layer-by-layer load: a loader thread, and a gate per layer for the forward."""

    def __init__(self, layer_names: Sequence[str], order: DeviceOrder) -> None:
        self.index = {name: i for i, name in enumerate(layer_names)}
        self.order = order
        self._ready = [threading.Event() for _ in layer_names]
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.waits = 0  # layers the forward pass had to wait for
        self.overlapped = 0  # layers already in place when the forward pass asked
        # What the copies read from (received payloads): kept alive until join() has seen
        # every device copy complete.
        self.sources: list[Any] = []

    def start(self, work: LoadWork) -> None:
        """Run ``work`` on the loader thread; return at once."""
        if self._thread is not None:
            raise RuntimeError("LayerLoads.start called twice")
        self.order.begin()
        self._thread = threading.Thread(
            target=self._run, args=(work,), name="lmcached-loader", daemon=True
        )
        self._thread.start()

    def _run(self, work: LoadWork) -> None:
        def done(layer: int) -> None:
            self.order.layer_done(layer)
            self._ready[layer].set()

        try:
            with self.order.copies():
                work(done)
        except BaseException as exc:  # reported by the caller; the engine must go on
            self.error = exc
        finally:
            for ready in self._ready:  # never leave the forward pass waiting
                ready.set()

    def wait(self, layer_name: str) -> None:
        """Return once ``layer_name``'s KV is in place (on CUDA: ordered on the device)."""
        layer = self.index.get(layer_name)
        if layer is None:
            return
        if self._ready[layer].is_set():
            self.overlapped += 1
        else:
            self.waits += 1
            self._ready[layer].wait()
        self.order.before_use(layer)

    def join(self) -> None:
        """Wait for the loader thread and its device copies. Idempotent."""
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()
            self.order.finish()
            self.sources = []
