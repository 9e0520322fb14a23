"""The connector's scheduler side, driven directly: lookups, hit lengths and load/save plans.

The connector is built from a real VllmConfig (no engine is started) and talks to a real
daemon; vLLM's request and scheduler-output objects are stood in for by plain objects that
carry the fields the connector reads.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from vllm_harness import BLOCK_SIZE, CHUNK_SIZE, FULL_HIT, connector_config, make_prompt

from lmcached.testing import free_port

pytestmark = pytest.mark.timeout(120)

LAYERS = 4
PER_CHUNK = CHUNK_SIZE // BLOCK_SIZE


def build(model: Path, kv_transfer_config: dict[str, Any]) -> Any:
    """Return a scheduler-side LMCachedConnector for the tiny model."""
    import torch
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec

    from lmcached.integrations.vllm import LMCachedConnector

    vllm_config = EngineArgs(
        model=str(model),
        dtype="float32",
        block_size=BLOCK_SIZE,
        max_model_len=4096,
        enforce_eager=True,
        kv_transfer_config=KVTransferConfig(**kv_transfer_config),
    ).create_engine_config()
    spec = FullAttentionSpec(
        block_size=BLOCK_SIZE, num_kv_heads=2, head_size=64, dtype=torch.float32
    )
    kv_cache_config = KVCacheConfig(
        num_blocks=1000,
        kv_cache_tensors=[],
        kv_cache_groups=[
            KVCacheGroupSpec([f"model.layers.{i}.self_attn.attn" for i in range(LAYERS)], spec)
        ],
    )
    return LMCachedConnector(vllm_config, KVConnectorRole.SCHEDULER, kv_cache_config)


def request(req_id: str, tokens: list[int], salt: str | None = None) -> Any:
    return SimpleNamespace(
        request_id=req_id,
        prompt_token_ids=tokens,
        cache_salt=salt,
        lora_request=None,
        mm_features=[],
    )


def exists_requests(daemon: Any) -> int:
    """Count the exists/lookup requests the daemon's workers have served."""
    with daemon.client(timeout=5) as client:
        workers = client.stats()["workers"]
    return sum(w["stats"]["ops"]["requests"].get("exists", 0) for w in workers)


@pytest.fixture(scope="module")
def connector(tiny_model: Path, daemon: Any) -> Any:
    return build(tiny_model, connector_config(daemon.config_path))


def store_chunks(connector: Any, daemon: Any, tokens: list[int], count: int) -> None:
    from lmcached.integrations.vllm import key_builder

    keys = key_builder(connector._vllm_config, CHUNK_SIZE).chunk_keys(tokens)[:count]
    with daemon.client(timeout=5) as client:
        client.put(keys, [b"kv" * 8] * count)


def test_the_hit_is_whole_chunks_looked_up_once_per_request(connector: Any, daemon: Any) -> None:
    tokens = make_prompt(101)
    store_chunks(connector, daemon, tokens, 3)
    req = request("r-partial", tokens)

    assert connector.get_num_new_matched_tokens(req, 0) == (3 * CHUNK_SIZE, False)
    served = exists_requests(daemon)
    assert served > 0  # the first call did ask the daemon
    # Asked again (vLLM does, when it could not schedule the request): no daemon call.
    assert connector.get_num_new_matched_tokens(req, BLOCK_SIZE * 4) == (
        3 * CHUNK_SIZE - BLOCK_SIZE * 4,
        False,
    )
    assert exists_requests(daemon) == served
    connector.request_finished(req, [])


def test_a_fully_cached_prompt_still_computes_its_last_block(connector: Any, daemon: Any) -> None:
    tokens = make_prompt(102)
    store_chunks(connector, daemon, tokens, len(tokens) // CHUNK_SIZE)
    req = request("r-full", tokens)
    assert connector.get_num_new_matched_tokens(req, 0) == (FULL_HIT, False)
    # A salted request with the same tokens is another prefix.
    assert connector.get_num_new_matched_tokens(request("r-salted", tokens, "s"), 0) == (0, False)
    connector.request_finished(req, [])


def test_plans_load_the_hit_and_save_only_what_the_daemon_lacks(
    connector: Any, daemon: Any
) -> None:
    tokens = make_prompt(103)
    store_chunks(connector, daemon, tokens, 3)
    req = request("r-plan", tokens)
    blocks = list(range(500, 500 + len(tokens) // BLOCK_SIZE))
    local = 2 * BLOCK_SIZE  # vLLM's own prefix cache had the first two blocks
    assert connector.get_num_new_matched_tokens(req, local) == (3 * CHUNK_SIZE - local, False)
    connector.update_state_after_alloc(
        req, SimpleNamespace(get_block_ids=lambda: (blocks,)), 3 * CHUNK_SIZE - local
    )
    no_cached = SimpleNamespace(
        req_ids=[], resumed_req_ids=set(), new_block_ids=[], num_computed_tokens=[]
    )
    step1 = SimpleNamespace(
        scheduled_new_reqs=[
            SimpleNamespace(req_id="r-plan", block_ids=(blocks,), num_computed_tokens=768)
        ],
        scheduled_cached_reqs=no_cached,
        num_scheduled_tokens={"r-plan": 1000},  # chunked prefill: tokens 768..1767
    )

    meta = connector.build_connector_meta(step1)

    (load,) = meta.loads
    assert (load.first_chunk, load.start_token, load.end_token) == (0, local, 3 * CHUNK_SIZE)
    assert load.chunk_blocks == [blocks[c * PER_CHUNK : (c + 1) * PER_CHUNK] for c in range(3)]
    (save,) = meta.saves  # chunks 3..5 are complete after this step; 6 is not
    assert save.first_chunk == 3
    assert save.chunk_blocks == [blocks[c * PER_CHUNK : (c + 1) * PER_CHUNK] for c in (3, 4, 5)]

    step2 = SimpleNamespace(
        scheduled_new_reqs=[],
        scheduled_cached_reqs=SimpleNamespace(
            req_ids=["r-plan"],
            resumed_req_ids=set(),
            new_block_ids=[None],
            num_computed_tokens=[1768],
        ),
        num_scheduled_tokens={"r-plan": len(tokens) - 1768},
    )
    meta = connector.build_connector_meta(step2)
    assert meta.loads == []
    (save,) = meta.saves
    assert save.first_chunk == 6 and len(save.chunk_blocks) == 2
    assert connector.build_connector_meta(step2).saves == []  # nothing is saved twice
    connector.request_finished(req, [])


def test_a_daemon_that_is_not_there_is_a_miss_not_an_error(tiny_model: Path) -> None:
    config = connector_config(Path("/unused"))
    extra = config["kv_connector_extra_config"]
    del extra["lmcached.config"]
    extra["lmcached.endpoint"] = f"tcp://127.0.0.1:{free_port()}"  # nothing listens here
    extra["lmcached.lookup_timeout"] = 0.3
    connector = build(tiny_model, config)

    assert connector.get_num_new_matched_tokens(request("r-down", make_prompt(104)), 0) == (
        0,
        False,
    )


def test_a_chunk_size_that_is_not_whole_blocks_stops_the_engine_at_start(
    tiny_model: Path, daemon: Any
) -> None:
    config = connector_config(daemon.config_path)
    config["kv_connector_extra_config"]["lmcached.chunk_size"] = 100
    with pytest.raises(ValueError, match="block_size 32 does not divide"):
        build(tiny_model, config)


def store_prompt(connector: Any, daemon: Any, tokens: list[int], salt: str | None = None) -> None:
    """Store every key of ``tokens`` (whole chunks and the trailing partial chunk)."""
    from lmcached.integrations.vllm import key_builder, request_extra

    extra = request_extra(request("", tokens, salt))
    keys = key_builder(connector._vllm_config, CHUNK_SIZE).prompt_keys(tokens, extra=extra).all()
    with daemon.client(timeout=5) as client:
        client.put(keys, [b"kv" * 8] * len(keys))


@pytest.mark.parametrize("length", [2048, 2000, 1337, 200])
def test_a_stored_prompt_hits_every_token_but_the_last(
    connector: Any, daemon: Any, length: int
) -> None:
    tokens = make_prompt(110 + length, length)
    store_prompt(connector, daemon, tokens)
    req = request(f"r-len-{length}", tokens)

    assert connector.get_num_new_matched_tokens(req, 0) == (length - 1, False)
    # On top of vLLM's own whole-block hit, the connector supplies the rest but the last token.
    local = (length - 1) // BLOCK_SIZE * BLOCK_SIZE
    assert connector.get_num_new_matched_tokens(req, local) == (length - 1 - local, False)
    connector.request_finished(req, [])


def test_a_longer_prompt_loads_the_partial_chunk_a_shorter_one_stored(
    connector: Any, daemon: Any
) -> None:
    longer = make_prompt(120, 2100)
    store_prompt(connector, daemon, longer[:2000])  # 7 whole chunks and 208 tokens
    req = request("r-extends", longer)

    assert connector.get_num_new_matched_tokens(req, 0) == (2000, False)
    blocks = list(range(100, 100 + -(-len(longer) // BLOCK_SIZE)))
    connector.update_state_after_alloc(req, SimpleNamespace(get_block_ids=lambda: (blocks,)), 2000)
    step = SimpleNamespace(
        scheduled_new_reqs=[
            SimpleNamespace(req_id="r-extends", block_ids=(blocks,), num_computed_tokens=2000)
        ],
        scheduled_cached_reqs=SimpleNamespace(
            req_ids=[], resumed_req_ids=set(), new_block_ids=[], num_computed_tokens=[]
        ),
        num_scheduled_tokens={"r-extends": 100},
    )
    meta = connector.build_connector_meta(step)

    (load,) = meta.loads
    assert len(load.tokens) == 2000  # keyed as the shorter prompt stored them: ...-p208
    assert [len(b) for b in load.chunk_blocks] == [PER_CHUNK] * 7 + [7]  # 208 tokens: 7 blocks
    (save,) = meta.saves  # this prompt completes chunk 7 and stores its own partial chunk
    assert save.first_chunk == 7 and len(save.tokens) == 2100
    assert [len(b) for b in save.chunk_blocks] == [PER_CHUNK, 2]  # 52 tokens: 2 blocks
    assert (
        connector.build_connector_meta(
            SimpleNamespace(
                scheduled_new_reqs=[],
                scheduled_cached_reqs=SimpleNamespace(
                    req_ids=["r-extends"],
                    resumed_req_ids=set(),
                    new_block_ids=[None],
                    num_computed_tokens=[2100],
                ),
                num_scheduled_tokens={"r-extends": 1},
            )
        ).saves
        == []
    )  # at most one partial chunk per prompt, saved once
    connector.request_finished(req, [])


def test_a_partial_chunk_is_never_taken_for_a_whole_one(connector: Any, daemon: Any) -> None:
    tokens = make_prompt(121, 2048)
    store_prompt(connector, daemon, tokens[:2000])
    req = request("r-not-whole", tokens)
    # The 2,048-token prompt's chunk 7 is not stored; the 208-token partial chunk is found as
    # what it is (208 tokens), never as chunk 7.
    assert connector.get_num_new_matched_tokens(req, 0) == (2000, False)
    connector.request_finished(req, [])
    salted = request("r-salted-partial", tokens[:2000], salt="other")
    assert connector.get_num_new_matched_tokens(salted, 0) == (0, False)
    connector.request_finished(salted, [])


def test_save_unfull_chunk_false_in_the_lmcache_file_stores_no_partial_chunk(
    tiny_model: Path, daemon: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An LMCache user's file, named as LMCache's connector finds it.
    lmcache_file = tmp_path / "lmcache.yaml"
    lmcache_file.write_text("chunk_size: 256\nsave_unfull_chunk: false\n")
    monkeypatch.setenv("LMCACHE_CONFIG_FILE", str(lmcache_file))
    connector = build(tiny_model, connector_config(daemon.config_path))
    assert connector.settings.save_partial_chunks is False

    tokens = make_prompt(130, 2100)  # 8 whole chunks and 52 tokens
    req = request("r-no-partial", tokens)
    assert connector.get_num_new_matched_tokens(req, 0) == (0, False)
    blocks = list(range(200, 200 + -(-len(tokens) // BLOCK_SIZE)))
    step = SimpleNamespace(
        scheduled_new_reqs=[
            SimpleNamespace(req_id="r-no-partial", block_ids=(blocks,), num_computed_tokens=0)
        ],
        scheduled_cached_reqs=SimpleNamespace(
            req_ids=[], resumed_req_ids=set(), new_block_ids=[], num_computed_tokens=[]
        ),
        num_scheduled_tokens={"r-no-partial": len(tokens)},
    )
    (save,) = connector.build_connector_meta(step).saves
    assert save.first_chunk == 0 and len(save.tokens) == 2048
    assert [len(b) for b in save.chunk_blocks] == [PER_CHUNK] * 8  # no trailing 52 tokens
    connector.request_finished(req, [])


def test_lmcache_key_warnings_are_logged_once_by_the_scheduler(
    tiny_model: Path, daemon: Any, caplog: pytest.LogCaptureFixture
) -> None:
    config = connector_config(daemon.config_path, **{"lmcache.enable_blending": True})
    with caplog.at_level("WARNING", logger="lmcached.integrations.vllm"):
        build(tiny_model, config)
        build(tiny_model, config)  # a second connector in this process adds nothing
    logged = [r.getMessage() for r in caplog.records if "lmcache.enable_blending" in r.getMessage()]
    assert logged == [
        "LMCachedConnector: kv_connector_extra_config: lmcache.enable_blending: ignored: "
        "CacheBlend (reusing non-prefix chunks) is not supported; lmcached serves prefix hits only"
    ]
