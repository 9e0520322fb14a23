"""Copy whole KV-cache blocks between an engine's paged KV tensors and flat host buffers.

A stored chunk is ``chunk_size / block_size`` consecutive blocks of one request. Its payload is
the concatenation, layer after layer (in the order given at construction), of that layer's
blocks as ``tensor.index_select(block_dim, block_ids)`` lays them out. So a payload is the
engine's own physical block layout; the layout tag in every key says which layout that is,
so that engines with different layouts never read each other's bytes.

CPU tensors (vLLM's CPU backend) are gathered straight into a reused host buffer with one
copy (``index_select(out=...)``) and scattered with one copy (``index_copy_``) from the
received payload. CUDA tensors are gathered on the device, then copied into pinned host
buffers that are reused from a pool, never allocated per block. Loads run layer by layer
(lmcached.integrations.layer_loads): on CUDA each layer's host-to-device copy is issued on a
side stream from registered (page-locked) host memory and ordered against the forward pass
with CUDA events. The CUDA path did not run in our CI (no GPU); it uses only the documented
``copy_``/``index_copy_``/stream/event semantics, its bookkeeping is tested on CPU, and
``scripts/gpu_kv_load.py`` measures the same copies on a GPU host.

A block is copied whole, never in part: a backend may lay a block's token slots out in its
own way (vLLM's CPU backend does), so only whole blocks are known to be right.
"""

from __future__ import annotations

import os
import re
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class LayerLayout:
    """Where the blocks are in one layer's KV tensor, and how many bytes one block holds."""

    name: str
    block_dim: int
    block_nbytes: int


def find_block_dim(shape: Sequence[int], num_blocks: int, name: str) -> int:
    """Return the dimension of ``shape`` that indexes blocks (the first of size ``num_blocks``)."""
    for dim, size in enumerate(shape):
        if size == num_blocks:
            return dim
    raise ValueError(
        f"KV cache tensor {name!r} has shape {tuple(shape)}, with no dimension of size "
        f"num_blocks={num_blocks}; LMCachedConnector cannot find its blocks"
    )


def payload_tensor(payload: Any) -> torch.Tensor:
    """View a received payload (any bytes-like object, read-only included) as a uint8 tensor.

    No copy: the tensor shares the payload's memory and keeps it alive. It is only read.
    """
    import torch

    with warnings.catch_warnings():
        # torch warns that a read-only buffer could be written through the tensor; we never do.
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(payload, dtype=torch.uint8)


# Host buffers are carved out of slabs of about this many bytes (at most SLAB_BUFFERS
# buffers, at least the buffers of one save). A save's chunks taken from one slab lie in one
# Client.buffer, which the daemon's workers copy with memcpy (docs/same-host.md).
SLAB_BYTES = 128 << 20
SLAB_BUFFERS = 64


class _Slab:
    __slots__ = ("free", "memory")

    def __init__(self, memory: Any, buffers: list[torch.Tensor]) -> None:
        self.memory = memory  # keeps the slab's memory (and its memfd) alive
        self.free = buffers


class HostBufferPool:
    """Reusable host buffers of one size, in slabs of memory from ``Client.buffer``.

    A save's buffers (:meth:`acquire` of its chunk count) come from one slab, so that its put
    names one memfd and the workers copy it with memcpy, instead of reading this process's
    memory page by page. With ``pin`` (the KV lives on a GPU) each slab is page-locked for CUDA
    through ``register`` (``cudaHostRegister``), so the gather's device-to-host copy is DMA;
    where that fails, or off Linux, the buffers are pinned torch tensors made one by one as
    before, and puts from them are direct puts. Buffers come back through :meth:`release`, from
    any thread. The pool grows to the largest number of buffers ever in use at once; that
    number is bounded by the connector, which keeps at most one engine step of saves in flight.
    """

    def __init__(
        self,
        nbytes: int,
        pin: bool,
        register: Callable[[int, int], bool] | None = None,
        slab_bytes: int = SLAB_BYTES,
    ) -> None:
        self.nbytes = nbytes
        self.pin = pin
        self._register = register
        self._slab_bytes = slab_bytes
        # Slabs of Client.buffer memory; the last is the free list of torch tensors, if any.
        self._slabs: list[_Slab] = []
        self._loose = _Slab(None, [])
        # A buffer's address -> where it goes back, and the whole buffer (a caller may return
        # a shorter view of it: the part a save of fewer blocks filled).
        self._slab_of: dict[int, tuple[_Slab, torch.Tensor]] = {}
        self._lock = threading.Lock()
        self.allocated = 0  # buffers made
        # Slabs from Client.buffer (memfds); False once CUDA would not page-lock one, or off Linux.
        self.shared = hasattr(os, "memfd_create") and not (pin and register is None)

    def acquire(self, count: int) -> list[torch.Tensor]:
        """Return ``count`` buffers of :attr:`nbytes` uint8 each, from one slab if it can."""
        with self._lock:
            for slab in (*self._slabs, self._loose):
                if len(slab.free) >= count:
                    return [slab.free.pop() for _ in range(count)]
            if not self.shared:
                taken = [self._loose.free.pop() for _ in range(len(self._loose.free))]
                return taken + self._loose_tensors(count - len(taken))
        fresh = self._new_slab(count)
        with self._lock:
            if fresh is None:  # fell back to torch tensors
                return self._loose_tensors(count)
            self._slabs.append(fresh)
            for buffer in fresh.free:
                self._slab_of[buffer.data_ptr()] = (fresh, buffer)
            return [fresh.free.pop() for _ in range(count)]

    def release(self, buffers: Sequence[torch.Tensor]) -> None:
        """Give buffers back for reuse (each, or a view that starts where it starts)."""
        with self._lock:
            for buffer in buffers:
                slab, whole = self._slab_of[buffer.data_ptr()]
                slab.free.append(whole)

    def _loose_tensors(self, count: int) -> list[torch.Tensor]:
        # Called with the lock held. Made as needed, one by one: pinned memory is scarce.
        import torch

        made = [
            torch.empty(self.nbytes, dtype=torch.uint8, pin_memory=self.pin) for _ in range(count)
        ]
        for buffer in made:
            self._slab_of[buffer.data_ptr()] = (self._loose, buffer)
        self.allocated += count
        return made

    def _new_slab(self, needed: int) -> _Slab | None:
        """A slab of Client.buffer memory with room for ``needed`` buffers or more; None if
        CUDA would not page-lock it (the pool then makes torch tensors from now on)."""
        import torch

        from lmcached.client.shared import put_buffer

        stride = -(-self.nbytes // 64) * 64  # each buffer on a cache line of its own
        count = max(needed, min(SLAB_BUFFERS, self._slab_bytes // max(1, stride)))
        memory = put_buffer(max(1, stride * count))
        whole = torch.frombuffer(memory, dtype=torch.uint8)
        if self.pin and not (
            self._register is not None and self._register(whole.data_ptr(), whole.numel())
        ):
            self.shared = False
            return None
        self.allocated += count
        return _Slab(memory, [whole[i * stride : i * stride + self.nbytes] for i in range(count)])


def layer_order(names: Sequence[str]) -> list[str]:
    """Sort layer names as a model runs them: by the numbers in them (layers.10 after layers.9)."""

    def natural(name: str) -> list[tuple[int, int | str]]:
        return [
            (0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", name)
        ]

    return sorted(names, key=natural)


class PagedKV:
    """The engine's per-layer paged KV tensors, as blocks to gather and scatter."""

    def __init__(self, layers: dict[str, torch.Tensor], num_blocks: int) -> None:
        if not layers:
            raise ValueError("no KV cache tensors were registered")
        self.names = sorted(layers)  # one fixed order in every process of every engine
        self.tensors = [layers[name] for name in self.names]
        self.device = self.tensors[0].device
        self.layouts: list[LayerLayout] = []
        for name, tensor in zip(self.names, self.tensors, strict=True):
            if tensor.device != self.device:
                raise ValueError(
                    f"KV cache tensors live on different devices ({self.device} and "
                    f"{tensor.device} for {name!r}); LMCachedConnector needs one device per worker"
                )
            dim = find_block_dim(tensor.shape, num_blocks, name)
            nbytes = tensor.numel() * tensor.element_size() // num_blocks
            self.layouts.append(LayerLayout(name, dim, nbytes))
        self.block_nbytes = sum(layout.block_nbytes for layout in self.layouts)
        self.on_gpu = self.device.type == "cuda"

    def describe(self) -> str:
        """Return the per-layer shapes without the block count, to fold into the layout tag."""
        parts = []
        for tensor, layout in zip(self.tensors, self.layouts, strict=True):
            shape = list(tensor.shape)
            shape[layout.block_dim] = -1
            parts.append(f"{tensor.dtype}{shape}")
        return ";".join(parts)

    def views(self, buffer: torch.Tensor, count: int) -> list[torch.Tensor]:
        """Return one view per layer into ``buffer``, shaped as ``count`` gathered blocks."""
        views = []
        offset = 0
        for tensor, layout in zip(self.tensors, self.layouts, strict=True):
            nbytes = layout.block_nbytes * count
            shape = list(tensor.shape)
            shape[layout.block_dim] = count
            views.append(buffer[offset : offset + nbytes].view(tensor.dtype).view(shape))
            offset += nbytes
        return views

    def gather(self, block_ids: Sequence[int], buffer: torch.Tensor) -> None:
        """Copy the blocks ``block_ids`` of every layer into ``buffer`` (the chunk payload)."""
        import torch

        index = torch.tensor(list(block_ids), dtype=torch.long, device=self.device)
        for tensor, layout, view in zip(
            self.tensors, self.layouts, self.views(buffer, len(block_ids)), strict=True
        ):
            if self.on_gpu:
                # Gather on the device (one kernel), then one DMA into the pinned host buffer.
                view.copy_(tensor.index_select(layout.block_dim, index), non_blocking=True)
            else:
                # The one copy of a CPU save: paged blocks -> contiguous payload.
                torch.index_select(tensor, layout.block_dim, index, out=view)
        if self.on_gpu:
            torch.cuda.current_stream(self.device).synchronize()

    def scatter(
        self, buffer: torch.Tensor, block_ids: Sequence[int], positions: Sequence[int] | None = None
    ) -> None:
        """Copy a chunk payload from ``buffer`` into the blocks ``block_ids`` of every layer.

        ``block_ids`` are the chunk's blocks in order; ``positions`` (indexes into them) picks
        which ones to write, for a chunk that is only partly needed. Default: all.
        """
        views = self.views(buffer, len(block_ids))
        for layer, view in enumerate(views):
            self.scatter_layer(layer, view, block_ids, positions)

    def scatter_layer(
        self,
        layer: int,
        view: torch.Tensor,
        block_ids: Sequence[int],
        positions: Sequence[int] | None = None,
    ) -> None:
        """Copy one layer's part of a chunk payload (``view``, from :meth:`views`) into blocks.

        The one copy of a load: payload -> paged blocks (on CUDA, host -> device, issued on the
        current stream, which a loader sets to its side stream).
        """
        import torch

        tensor, layout = self.tensors[layer], self.layouts[layer]
        picked = list(range(len(block_ids)) if positions is None else positions)
        if not picked:
            return
        targets = torch.tensor([block_ids[p] for p in picked], dtype=torch.long)
        source = view
        if len(picked) != len(block_ids):
            source = view.index_select(layout.block_dim, torch.tensor(picked, dtype=torch.long))
        if self.on_gpu:
            source = source.to(self.device, non_blocking=True)
        tensor.index_copy_(layout.block_dim, targets.to(self.device), source)


CUDA_HOST_REGISTER_READ_ONLY = 0x08  # cudaHostRegisterReadOnly


class HostRegistrations:
    """Page-lock long-lived host memory in place for CUDA (``cudaHostRegister``), once each.

    For the daemon's shared-memory arenas, which a same-host client maps: registered, the
    host-to-device copies of a load read them by DMA, asynchronously, on the loader's side
    stream (pageable memory would make every copy a synchronous, staged one). Registering is
    slow (it pins every page), so each (address, size) is registered once, and only memory
    that lives as long as the engine is given here, never a per-request buffer.

    ``cudart`` is ``torch.cuda.cudart()`` (a parameter, so that the bookkeeping can be checked
    on a host without a GPU).
    """

    def __init__(self, cudart: Any) -> None:
        self._cudart = cudart
        self._registered: dict[int, int] = {}  # address -> size
        self.failures = 0

    def register(self, address: int, size: int, read_only: bool = True) -> bool:
        """Register ``size`` bytes at ``address``; True if they are (now or already) registered.

        ``read_only``: memory the device only reads (the arenas); the connector's host buffers,
        which device-to-host copies write, are registered with ``read_only=False``.
        """
        if size <= 0:
            return False
        if self._registered.get(address) == size:
            return True
        # The arenas are mapped read-only, which CUDA accepts only with cudaHostRegisterReadOnly;
        # drivers older than that flag take the default registration.
        code = 1
        if read_only:
            code = self._cudart.cudaHostRegister(address, size, CUDA_HOST_REGISTER_READ_ONLY)
        if int(code) != 0:
            code = self._cudart.cudaHostRegister(address, size, 0)
        if int(code) != 0:
            # Not fatal: copies from this memory are synchronous, as from any pageable memory.
            self.failures += 1
            return False
        self._registered[address] = size
        return True

    def __contains__(self, address: int) -> bool:
        return address in self._registered

    def close(self) -> None:
        """Unregister everything. Idempotent."""
        registered, self._registered = self._registered, {}
        for address in registered:
            self._cudart.cudaHostUnregister(address)
