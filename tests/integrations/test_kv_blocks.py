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


@pytest.mark.parametrize(
    "shape",
    [
        (NUM_BLOCKS, 2, 4, 16),  # blocks first: one row a block
        (2, NUM_BLOCKS, 4, 2, 8),  # K/V first: two rows a block, NUM_BLOCKS apart
    ],
)
@pytest.mark.parametrize("staging_chunks", [1, 2, 8])
def test_batched_copies_place_every_block_as_one_by_one_copies_do(shape, staging_chunks):
    """The GPU's batched path (a staging tensor per layer and group, one kernel), on CPU."""
    source = make_layers(shape)
    target = {name: torch.zeros_like(t) for name, t in source.items()}
    paged_src, paged_dst = PagedKV(source, NUM_BLOCKS), PagedKV(target, NUM_BLOCKS)
    chunk_ids = [[7, 2], [9, 0], [4, 10], [1, 3]]
    pool = HostBufferPool(paged_src.block_nbytes * 2, pin=False)
    buffers = pool.acquire(len(chunk_ids))
    staging = staging_chunks * 2 * max(lay.block_nbytes for lay in paged_src.layouts)
    paged_src.gather_chunks(
        list(zip(chunk_ids, buffers, strict=True)), batch=True, staging_bytes=staging
    )
    expected = [b.clone() for b in buffers]
    for b in buffers:
        b.zero_()
    paged_src.gather_chunks(list(zip(chunk_ids, buffers, strict=True)), batch=False)
    assert all(
        torch.equal(a, b) for a, b in zip(expected, buffers, strict=True)
    )  # same payload bytes

    dest = [[5, 11], [6, 8], [0, 2], [3, 9]]
    positions = [None, [0, 1], [1], None]  # the third chunk is only partly needed
    plan = paged_dst.load_plan(
        list(zip(dest, positions, strict=True)), batch=True, staging_bytes=staging
    )
    assert [i for i, _ in plan.alone] == [2]
    assert sum(len(members) for members, _ in plan.groups) == 3
    assert len(plan.groups) == -(-3 // staging_chunks)
    views = [paged_dst.views(b, 2) for b in buffers]
    for layer in range(len(paged_dst.names)):
        paged_dst.load_layer(layer, [v[layer] for v in views], plan)

    block_dim = paged_src.layouts[0].block_dim
    moved = {5: 7, 11: 2, 6: 9, 8: 0, 2: 10, 3: 1, 9: 3}  # not block 0 of the third chunk
    for name in source:
        src, dst = source[name], target[name]
        for d in range(NUM_BLOCKS):
            if d in moved:
                assert torch.equal(dst.select(block_dim, d), src.select(block_dim, moved[d]))
            else:
                assert not dst.select(block_dim, d).any()


def test_a_layout_that_cannot_be_viewed_as_rows_is_copied_chunk_by_chunk():
    # K/V first but the block dimension's stride is not contiguous with the K/V one.
    layers = {"a": torch.randn(NUM_BLOCKS, 2, 4, 8).transpose(0, 1)}
    paged = PagedKV(layers, NUM_BLOCKS)
    assert paged.rows == [None] and not paged.batched
    plan = paged.load_plan([([1, 2], None)], batch=True)
    assert plan.groups == [] and [i for i, _ in plan.alone] == [0]
    (buffer,) = HostBufferPool(paged.block_nbytes * 2, pin=False).acquire(1)
    paged.gather_chunks([([1, 2], buffer)], batch=True)  # falls back, still right
    assert torch.equal(paged.views(buffer, 2)[0], layers["a"].index_select(1, torch.tensor([1, 2])))
