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
(lmcached.integrations.layer_loads): on CUDA each layer's host-to-device copies are issued on
a side stream from registered (page-locked) host memory and ordered against the forward pass
with CUDA events.

On CUDA the host's cost of issuing copies, not the bus, bounded loads made of one small copy
per chunk and layer (1 MiB for a Llama-3-8B chunk). So nothing here waits for the stream
until a save's last copy (index tensors go through pinned memory), and many chunks of a layer
go through one device staging tensor and one kernel (:meth:`PagedKV.load_plan`,
:meth:`PagedKV.gather_chunks`). CI has no GPU: the bookkeeping and the batched path are tested
on CPU tensors, and ``scripts/gpu_connector_path.py`` runs this module with a real daemon on
a GPU host, checking every block (docs/benchmarks.md has its figures from an H200).

A block is copied whole, never in part: a backend may lay a block's token slots out in its
own way (vLLM's CPU backend does), so only whole blocks are known to be right.
"""

from __future__ import annotations

import math
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

# A batched copy's device staging tensor holds about this much of one layer (the GPU's memory
# belongs to the engine: a long prompt is copied in several groups rather than one big one).
STAGING_BYTES = 64 << 20


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
        self.num_blocks = num_blocks
        # Each layer as rows, [lead * num_blocks, *rest], where ``lead`` is the product of the
        # dimensions before the block dimension (2 for K/V first): row ``l * num_blocks + b``
        # is part ``l`` of block ``b``. None where the tensor's strides allow no such view.
        self.leads = [
            math.prod(t.shape[: lay.block_dim])
            for t, lay in zip(self.tensors, self.layouts, strict=True)
        ]
        self.rows = [
            _as_rows(tensor, layout.block_dim, lead * num_blocks)
            for tensor, layout, lead in zip(self.tensors, self.layouts, self.leads, strict=True)
        ]
        # On a GPU, copy many chunks per layer with one kernel (see load_plan), not one each:
        # the host's cost of issuing copies, not the bus, bounds a load made of small copies.
        self.batched = self._batching(None)

    def _batching(self, batch: bool | None) -> bool:
        """Whether copies go through staging tensors: ``batch``, by default on a GPU, and
        only where every layer can be viewed as rows."""
        return (self.on_gpu if batch is None else batch) and None not in self.rows

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

    def device_index(self, ids: Sequence[int]) -> torch.Tensor:
        """Return ``ids`` as an index tensor on the KV's device, without blocking the host.

        A tensor built from a list on a GPU is a copy from pageable memory, which waits for
        every kernel queued on the stream; through pinned memory it is queued like the rest.
        """
        import torch

        index = torch.tensor(list(ids), dtype=torch.long)
        if not self.on_gpu:
            return index
        return index.pin_memory().to(self.device, non_blocking=True)

    def block_index(
        self, block_ids: Sequence[int], positions: Sequence[int] | None = None
    ) -> BlockIndex:
        """Where a chunk's payload goes: ``block_ids`` are the chunk's blocks in order;
        ``positions`` (indexes into them) picks which ones to write. Default: all.

        Made once per chunk and load, on the stream the copies will run on.
        """
        picked = list(range(len(block_ids)) if positions is None else positions)
        targets = self.device_index([block_ids[p] for p in picked])
        every = _every_block(block_ids, picked)
        return BlockIndex(targets, None if every else self.device_index(picked), len(picked))

    def gather(self, block_ids: Sequence[int], buffer: torch.Tensor) -> None:
        """Copy the blocks ``block_ids`` of every layer into ``buffer`` (the chunk payload)."""
        self.gather_chunks([(block_ids, buffer)])

    def gather_chunks(
        self,
        chunks: Sequence[tuple[Sequence[int], torch.Tensor]],
        batch: bool | None = None,
        staging_bytes: int = STAGING_BYTES,
    ) -> None:
        """Gather several chunks, each ``(block_ids, buffer)``; return once all are in host
        memory (on a GPU: every copy is queued first, then the stream is waited for once).

        ``batch`` (default: :attr:`batched`): per layer, one gather of many chunks' blocks
        into a device staging tensor of at most about ``staging_bytes``, then one copy per
        chunk out of it.
        """
        import torch

        if self._batching(batch):
            for group in _groups([len(ids) for ids, _ in chunks], self._row_bytes, staging_bytes):
                self._gather_group([chunks[i] for i in group])
        else:
            self._gather_each(chunks)
        if self.on_gpu:
            torch.cuda.current_stream(self.device).synchronize()

    def _gather_group(self, chunks: Sequence[tuple[Sequence[int], torch.Tensor]]) -> None:
        rows = self._target_rows([ids for ids, _ in chunks])
        outs = [self.views(buffer, len(ids)) for ids, buffer in chunks]
        for layer, (tensor_rows, lead) in enumerate(zip(self.rows, self.leads, strict=True)):
            assert tensor_rows is not None
            staging = tensor_rows.index_select(0, rows[lead])  # one kernel for the group
            offset = 0
            for out in outs:
                part = out[layer].view(-1, *tensor_rows.shape[1:])
                part.copy_(staging[offset : offset + part.shape[0]], non_blocking=True)
                offset += part.shape[0]

    def _gather_each(self, chunks: Sequence[tuple[Sequence[int], torch.Tensor]]) -> None:
        import torch

        for block_ids, buffer in chunks:
            index = self.device_index(block_ids)
            for tensor, layout, view in zip(
                self.tensors, self.layouts, self.views(buffer, len(block_ids)), strict=True
            ):
                if self.on_gpu:
                    # Gather on the device (one kernel), then one DMA into the pinned buffer.
                    view.copy_(tensor.index_select(layout.block_dim, index), non_blocking=True)
                else:
                    # The one copy of a CPU save: paged blocks -> contiguous payload.
                    torch.index_select(tensor, layout.block_dim, index, out=view)

    def scatter(
        self, buffer: torch.Tensor, block_ids: Sequence[int], positions: Sequence[int] | None = None
    ) -> None:
        """Copy a chunk payload from ``buffer`` into the blocks ``block_ids`` of every layer.

        ``block_ids`` are the chunk's blocks in order; ``positions`` (indexes into them) picks
        which ones to write, for a chunk that is only partly needed. Default: all.
        """
        index = self.block_index(block_ids, positions)
        for layer, view in enumerate(self.views(buffer, len(block_ids))):
            self.scatter_layer(layer, view, index)

    def scatter_layer(self, layer: int, view: torch.Tensor, index: BlockIndex) -> None:
        """Copy one layer's part of a chunk payload (``view``, from :meth:`views`) into the
        blocks ``index`` names (from :meth:`block_index`, made on the same stream).

        The one copy of a load: payload -> paged blocks. On CUDA the whole chunk's layer goes
        to the device in one DMA (asynchronous from registered or pinned memory), and the
        device picks and places the blocks; nothing here waits for the stream.
        """
        if not index.count:
            return
        tensor, layout = self.tensors[layer], self.layouts[layer]
        source = view.to(self.device, non_blocking=True) if self.on_gpu else view
        if index.picked is not None:
            source = source.index_select(layout.block_dim, index.picked)
        tensor.index_copy_(layout.block_dim, index.targets, source)

    def load_plan(
        self,
        chunks: Sequence[tuple[Sequence[int], Sequence[int] | None]],
        batch: bool | None = None,
        staging_bytes: int = STAGING_BYTES,
    ) -> LoadPlan:
        """Plan a load of chunk payloads, each ``(block_ids, positions)`` as for
        :meth:`block_index`; made once, on the stream the copies will run on, for every layer.

        ``batch`` (default: :attr:`batched`): whole chunks are copied together, per layer and
        per group of at most about ``staging_bytes``: one copy per chunk into a staging tensor
        on the device, then one kernel puts all their blocks in place. Chunks that are only
        partly needed are copied one by one.
        """
        batch = self._batching(batch)
        alone: list[tuple[int, BlockIndex]] = []
        whole: list[int] = []
        for i, (ids, positions) in enumerate(chunks):
            if batch and _every_block(ids, positions):
                whole.append(i)
            else:
                alone.append((i, self.block_index(ids, positions)))
        groups = []
        for group in _groups([len(chunks[i][0]) for i in whole], self._row_bytes, staging_bytes):
            members = [whole[g] for g in group]
            groups.append((members, self._target_rows([chunks[m][0] for m in members])))
        return LoadPlan(alone, groups)

    def load_layer(self, layer: int, views: Sequence[torch.Tensor], plan: LoadPlan) -> None:
        """Copy one layer of every planned chunk into place; ``views[i]`` is chunk ``i``'s
        view of this layer (from :meth:`views`)."""
        import torch

        for i, index in plan.alone:
            self.scatter_layer(layer, views[i], index)
        tensor_rows, lead = self.rows[layer], self.leads[layer]
        for members, rows in plan.groups:
            assert tensor_rows is not None
            parts = [views[i].view(-1, *tensor_rows.shape[1:]) for i in members]
            staging = torch.empty(
                (sum(p.shape[0] for p in parts), *tensor_rows.shape[1:]),
                dtype=tensor_rows.dtype,
                device=self.device,
            )
            offset = 0
            for part in parts:  # one DMA per chunk, from registered memory: asynchronous
                staging[offset : offset + part.shape[0]].copy_(part, non_blocking=True)
                offset += part.shape[0]
            tensor_rows.index_copy_(0, rows[lead], staging)

    @property
    def _row_bytes(self) -> int:
        """The most bytes one block takes in one layer (what a staging tensor holds per block)."""
        return max(layout.block_nbytes for layout in self.layouts)

    def _target_rows(self, chunks: Sequence[Sequence[int]]) -> dict[int, torch.Tensor]:
        """For each lead size: the rows that ``chunks``' blocks occupy, in payload order."""
        rows = {}
        for lead in set(self.leads):
            rows[lead] = self.device_index(
                [part * self.num_blocks + b for ids in chunks for part in range(lead) for b in ids]
            )
        return rows


def _every_block(block_ids: Sequence[int], positions: Sequence[int] | None) -> bool:
    """Whether ``positions`` picks every block of a chunk, in order (None: it does)."""
    return positions is None or list(positions) == list(range(len(block_ids)))


def _groups(sizes: Sequence[int], row_bytes: int, limit: int) -> list[list[int]]:
    """Split items of ``sizes`` blocks into consecutive groups of at most ``limit`` bytes
    (``row_bytes`` a block), each with one item at least."""
    groups: list[list[int]] = []
    size = 0
    for i, blocks in enumerate(sizes):
        nbytes = blocks * row_bytes
        if not groups or size + nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += nbytes
    return groups


def _as_rows(tensor: torch.Tensor, block_dim: int, count: int) -> torch.Tensor | None:
    """``tensor`` viewed as ``count`` rows (the dimensions up to ``block_dim`` merged), or None
    where its strides do not allow that view."""
    try:
        return tensor.view(count, *tensor.shape[block_dim + 1 :])
    except RuntimeError:
        return None


@dataclass(frozen=True)
class LoadPlan:
    """How a load's chunk payloads go into the paged KV (from :meth:`PagedKV.load_plan`)."""

    alone: list[tuple[int, BlockIndex]]  # (chunk, where its blocks go): copied one by one
    # Chunks copied together, and for each lead size the rows their blocks go to, in order.
    groups: list[tuple[list[int], dict[int, torch.Tensor]]]


@dataclass(frozen=True)
class BlockIndex:
    """The blocks one chunk payload is written to, as index tensors on the KV's device."""

    targets: torch.Tensor  # block ids written
    picked: torch.Tensor | None  # their positions in the chunk; None: every block, in order
    count: int


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
        # Registered arenas: address -> a numpy array over the client's view. It holds a buffer
        # export of the view, which keeps the mapping alive for as long as CUDA has it
        # page-locked (a tensor from torch.frombuffer would not: it keeps the view object,
        # but not an export, and the client's close() would unmap under it).
        self._arenas: dict[int, Any] = {}
        # Arenas CUDA would not register, held the same way: not tried again while mapped.
        self._refused: dict[int, Any] = {}
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

    def register_arenas(self, arenas: Sequence[Any]) -> None:
        """Keep exactly ``arenas`` (views of the daemon's arenas, as the client maps them now)
        registered, each once.

        A registration holds its arena's view, so the client cannot unmap an arena that CUDA
        has page-locked. After a worker restart the client maps the worker's new arena and lets
        the old one go; unmapped under a live registration, the old range would keep feeding
        the device the dead arena's pages, maybe at the very address where the new arena is
        then mapped (CUDA leaves freeing registered memory undefined). So arenas no longer
        listed are unregistered here first, and only then released.
        """
        import numpy as np

        current = {}
        for arena in arenas:
            held = np.frombuffer(arena, dtype=np.uint8)
            current[int(held.__array_interface__["data"][0])] = held
        for address in [a for a in self._arenas if a not in current]:
            self._unregister(address)
            del self._arenas[address]  # the client may unmap it now
        self._refused = {a: held for a, held in self._refused.items() if a in current}
        for address, held in current.items():
            if address in self._arenas or address in self._refused:
                continue
            if self.register(address, held.nbytes):
                self._arenas[address] = held
            else:  # copies from it stay synchronous; asking again each step would cost a call
                self._refused[address] = held

    @property
    def arenas(self) -> list[int]:
        """The addresses of the arenas registered now."""
        return list(self._arenas)

    def __contains__(self, address: int) -> bool:
        return address in self._registered

    def _unregister(self, address: int) -> None:
        if self._registered.pop(address, None) is not None:
            self._cudart.cudaHostUnregister(address)

    def close(self) -> None:
        """Unregister everything, then let the arenas go. Idempotent."""
        for address in list(self._registered):
            self._unregister(address)
        self._arenas = {}
        self._refused = {}
