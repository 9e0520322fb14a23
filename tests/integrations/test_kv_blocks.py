"""Block gather/scatter between paged KV tensors and chunk payloads, on CPU tensors."""

from __future__ import annotations

import pytest
import torch

from lmcached.client.shared import PutBuffers
from lmcached.integrations.kv_blocks import SLAB_BUFFERS, HostBufferPool, PagedKV, find_block_dim

NUM_BLOCKS = 12


def make_layers(shape_of_layer, dtype=torch.float32, layers=3):
    gen = torch.Generator().manual_seed(0)
    return {
        f"model.layers.{i}.attn": torch.randn(shape_of_layer, generator=gen).to(dtype)
        for i in range(layers)
    }


@pytest.mark.parametrize(
    ("shape", "block_dim"),
    [
        ((NUM_BLOCKS, 2, 4, 16), 0),  # vLLM CPU: [blocks, kv_heads, block_size, 2*head_dim]
        ((2, NUM_BLOCKS, 4, 2, 8), 1),  # flash-attn style: [K/V, blocks, block_size, heads, dim]
    ],
)
def test_gather_then_scatter_moves_exactly_the_chosen_blocks(shape, block_dim):
    source = make_layers(shape)
    target = {name: torch.zeros_like(t) for name, t in source.items()}
    paged_src, paged_dst = PagedKV(source, NUM_BLOCKS), PagedKV(target, NUM_BLOCKS)
    assert paged_src.layouts[0].block_dim == block_dim

    pool = HostBufferPool(paged_src.block_nbytes * 3, pin=False)
    (buffer,) = pool.acquire(1)
    paged_src.gather([7, 2, 9], buffer)
    paged_dst.scatter(buffer, [1, 5, 11])

    for name in source:
        src, dst = source[name], target[name]
        for s, d in [(7, 1), (2, 5), (9, 11)]:
            assert torch.equal(src.select(block_dim, s), dst.select(block_dim, d))
        untouched = [b for b in range(NUM_BLOCKS) if b not in (1, 5, 11)]
        for b in untouched:
            assert not dst.select(block_dim, b).any()


def test_scatter_positions_writes_only_the_needed_part_of_a_chunk():
    source = make_layers((NUM_BLOCKS, 2, 4, 16), dtype=torch.bfloat16)
    target = {name: torch.zeros_like(t) for name, t in source.items()}
    paged_src, paged_dst = PagedKV(source, NUM_BLOCKS), PagedKV(target, NUM_BLOCKS)
    (buffer,) = HostBufferPool(paged_src.block_nbytes * 4, pin=False).acquire(1)
    paged_src.gather([0, 1, 2, 3], buffer)
    paged_dst.scatter(buffer, [4, 5, 6, 7], positions=[2, 3])
    for name in source:
        assert torch.equal(target[name][6], source[name][2])
        assert torch.equal(target[name][7], source[name][3])
        assert not target[name][4].any() and not target[name][5].any()


def test_payload_is_layer_after_layer_in_sorted_name_order():
    layers = {"b": torch.full((NUM_BLOCKS, 2), 2.0), "a": torch.full((NUM_BLOCKS, 2), 1.0)}
    paged = PagedKV(layers, NUM_BLOCKS)
    (buffer,) = HostBufferPool(paged.block_nbytes, pin=False).acquire(1)
    paged.gather([3], buffer)
    assert buffer.view(torch.float32).tolist() == [1.0, 1.0, 2.0, 2.0]
    assert paged.describe() == "torch.float32[-1, 2];torch.float32[-1, 2]"


def test_pool_reuses_released_buffers_and_gives_a_save_one_client_buffer():
    pool = HostBufferPool(64, pin=False)
    first = pool.acquire(2)
    pool.release([first[0], first[1][:10]])  # a view of a buffer's start gives the buffer back
    again = pool.acquire(3)
    assert {b.data_ptr() for b in first} <= {b.data_ptr() for b in again}
    assert all(b.numel() == 64 for b in again)
    assert pool.allocated == SLAB_BUFFERS  # one slab so far
    # The buffers lie in one Client.buffer memfd: a put from them names it (a buffer put).
    held = PutBuffers().holding([memoryview(b.numpy()) for b in again])
    assert held is not None and held[0].memfd


def test_a_save_larger_than_a_slab_gets_a_slab_of_its_own():
    pool = HostBufferPool(4096, pin=False, slab_bytes=4 * 4096)
    small = pool.acquire(3)
    big = pool.acquire(6)  # no slab has six free: a new one, of six
    assert pool.allocated == 4 + 6
    assert PutBuffers().holding([memoryview(b.numpy()) for b in big]) is not None
    pool.release(small + big)
    assert {b.data_ptr() for b in pool.acquire(6)} == {b.data_ptr() for b in big}


def test_pinned_slabs_are_registered_once_and_writable():
    calls: list[tuple[int, int]] = []

    def register(address: int, size: int) -> bool:  # cudaHostRegister's bookkeeping
        calls.append((address, size))
        return True

    pool = HostBufferPool(1000, pin=True, register=register, slab_bytes=8 * 1024)
    buffers = pool.acquire(2)
    pool.acquire(2)
    (start, size), *_ = calls
    assert len(calls) == 1 and size == 8 * 1024  # the whole slab, once
    assert all(start <= b.data_ptr() <= start + size - 1000 for b in buffers)
    buffers[1].fill_(7)  # a device-to-host copy writes here
    assert int(buffers[1].sum()) == 7 * 1000


def test_a_tensor_without_a_block_dimension_is_a_clear_error():
    with pytest.raises(ValueError, match="no dimension of size num_blocks=12"):
        find_block_dim((3, 4, 5), NUM_BLOCKS, "model.layers.0.attn")
    with pytest.raises(ValueError, match="no KV cache tensors"):
        PagedKV({}, NUM_BLOCKS)
