"""The routing rule: keys of key format v2 go by their 8-hex route, other keys by the whole key."""

from __future__ import annotations

import xxhash

from lmcached.routing import jump_hash, owner, route_of, route_owner, shared_route


def _v2_key(route: str, chunk: int, partial: int | None = None) -> bytes:
    digest = xxhash.xxh3_128_hexdigest(chunk.to_bytes(8, "little"))
    tail = "" if partial is None else f"-p{partial}"
    return f"ns/model@main/bf16-x-tp0of1/{route}-{digest}{tail}".encode()


def test_chunks_of_one_prompt_share_one_owner_whatever_the_worker_count() -> None:
    keys = [_v2_key("0badf00d", i) for i in range(128)] + [_v2_key("0badf00d", 999, partial=7)]
    for workers in (1, 2, 3, 4, 8, 16):
        owners = {owner(k, workers) for k in keys}
        assert len(owners) == 1
        assert owners == {jump_hash(xxhash.xxh3_64_intdigest(b"0badf00d"), workers)}


def test_route_is_the_first_eight_hex_digits_of_the_last_segment() -> None:
    assert route_of(b"a/b/deadbeef-00ff") == b"deadbeef"
    assert route_of(b"deadbeef-") == b"deadbeef"


def test_keys_without_a_route_are_routed_by_the_whole_key() -> None:
    for key in (
        b"plain-key",
        b"a/DEADBEEF-00ff",  # upper case is not a route
        b"a/deadbee-00ff",  # 7 digits
        b"a/deadbeef0-00ff",  # 9 digits, no '-' after the eighth
        b"deadbeef-0/x",  # the route must be in the LAST segment
        b"a/deadbeef",  # no '-'
        b"a/deadbeeg-1",
    ):
        assert route_of(key) == key
        assert owner(key, 7) == jump_hash(xxhash.xxh3_64_intdigest(key), 7)


def test_different_routes_spread_over_workers() -> None:
    owners = {owner(_v2_key(f"{r:08x}", 0), 4) for r in range(64)}
    assert owners == {0, 1, 2, 3}


def test_a_shared_route_is_found_only_when_every_key_carries_it() -> None:
    chain = [_v2_key("0badf00d", i) for i in range(128)] + [_v2_key("0badf00d", 9, partial=7)]
    assert shared_route(chain) == b"0badf00d"
    for workers in (1, 2, 3, 8):
        assert {owner(k, workers) for k in chain} == {route_owner(b"0badf00d", workers)}
    # Each of these has at least one key whose route differs, or has none: ask per key.
    other_route = [*chain[:5], _v2_key("0badf00e", 5), *chain[5:]]
    longer_dir = [*chain, b"ns/model@main/bf16-x-tp0of1/0badf00d-abc/0badf00d-x"]
    shorter_dir = [*chain, b"ns/model@main/0badf00d-x"]
    no_dash = [*chain, b"ns/model@main/bf16-x-tp0of1/0badf00dx"]
    plain = [b"plain-key", b"plain-key-2"]
    upper = [k.replace(b"0badf00d", b"0BADF00D") for k in chain]
    for keys in (other_route, longer_dir, shorter_dir, no_dash, plain, upper, []):
        assert shared_route(keys) is None
    # Whenever it answers, it agrees with route_of on every key.
    prefix_only = [b"ns/m/0badf00d-", b"ns/m/0badf00d-tail"]
    assert shared_route(prefix_only) == b"0badf00d"
    assert {route_of(k) for k in prefix_only} == {b"0badf00d"}
