"""Keys are prefix-chained, deterministic and independent of PYTHONHASHSEED (docs/keys.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lmcached.keys import KeyBuilder, chain_hashes

# Test vectors: docs/keys.md carries the same values.
VECTORS = [
    (
        list(range(8)),
        4,
        b"",
        ["a0cef5fd75e548d796c3007c8df88277", "197d8073d9fab505644aaae7f2130e3c"],
    ),
]


@pytest.mark.parametrize("tokens,chunk,extra,expected", VECTORS)
def test_chain_hashes_match_the_documented_vectors(tokens, chunk, extra, expected):
    assert [h.hex() for h in chain_hashes(tokens, chunk, extra)] == expected


def test_prefix_chaining_and_partial_chunks():
    kb = KeyBuilder(chunk_size=4)
    a = kb.chunk_keys([1, 2, 3, 4, 5, 6, 7, 8, 9])
    b = kb.chunk_keys([1, 2, 3, 4, 5, 6, 7, 99])
    c = kb.chunk_keys([0, 2, 3, 4, 5, 6, 7, 8])
    assert len(a) == 2  # the trailing partial chunk has no key
    assert a[0] == b[0] and a[1] != b[1]
    assert a[0] != c[0] and a[1] != c[1]  # a change early on changes every later key


def test_extra_namespace_model_and_layout_change_keys():
    tokens = list(range(512))
    base = KeyBuilder(chunk_size=256)
    assert base.chunk_keys(tokens) != base.chunk_keys(tokens, extra=b"salt")
    for other in (
        KeyBuilder(namespace="tenant2", chunk_size=256),
        KeyBuilder(model="llama", chunk_size=256),
        KeyBuilder(revision="rev2", chunk_size=256),
        KeyBuilder(layout="bf16-x", chunk_size=256),
    ):
        assert set(other.chunk_keys(tokens)).isdisjoint(base.chunk_keys(tokens))
    assert all(k.startswith(base.prefix) for k in base.chunk_keys(tokens))
    assert KeyBuilder(model="meta-llama/Llama-3-8B").prefix.startswith(
        b"default/meta-llama--Llama-3-8B@"
    )


def test_bad_parts_and_tokens_are_rejected():
    with pytest.raises(ValueError):
        KeyBuilder(namespace="a/b")
    with pytest.raises(ValueError):
        KeyBuilder(chunk_size=0)
    with pytest.raises(ValueError):
        KeyBuilder(chunk_size=2).chunk_keys([1, -1])
    with pytest.raises(ValueError):
        KeyBuilder(chunk_size=2).chunk_keys([1, 2**32])


def test_keys_are_identical_across_interpreters_with_different_hash_seeds():
    code = (
        "import json; from lmcached.keys import KeyBuilder; "
        "kb = KeyBuilder(namespace='n', model='m', revision='r', layout='l', chunk_size=16); "
        "print(json.dumps([k.decode() for k in kb.chunk_keys(list(range(100)), extra=b'salt')]))"
    )
    outs = []
    for seed in ("0", "12345", "random"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        outs.append(
            json.loads(
                subprocess.run(
                    [sys.executable, "-c", code],
                    env=env,
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout
            )
        )
    assert outs[0] == outs[1] == outs[2]
    assert len(outs[0]) == 6
