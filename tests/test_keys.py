"""Keys are prefix-chained, deterministic and independent of PYTHONHASHSEED (docs/keys.md)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lmcached.keys import KeyBuilder, chain_hashes

KEYS_MD = Path(__file__).resolve().parents[1] / "docs" / "keys.md"

# Test vectors: docs/keys.md carries the same values.
VECTORS = [
    (
        list(range(8)),
        4,
        b"",
        ["a0cef5fd75e548d796c3007c8df88277", "197d8073d9fab505644aaae7f2130e3c"],
    ),
]

# Key format v2: the documented full keys (whole chunks, a partial chunk, a short prompt).
DOC_BUILDER = KeyBuilder(
    namespace="prod",
    model="meta-llama/Llama-3.1-8B",
    revision="0e9e39f",
    layout="bfloat16-l32h8d128-tp0of1",
    chunk_size=4,
)
DOC_PREFIX = "prod/meta-llama--Llama-3.1-8B@0e9e39f/bfloat16-l32h8d128-tp0of1/"
KEY_VECTORS = [
    (
        list(range(10)),
        [
            "a0cef5fd-a0cef5fd75e548d796c3007c8df88277",
            "a0cef5fd-197d8073d9fab505644aaae7f2130e3c",
            "a0cef5fd-46f088646e61d3f52bf6993e84105749-p2",
        ],
    ),
    (
        list(range(8)),
        ["a0cef5fd-a0cef5fd75e548d796c3007c8df88277", "a0cef5fd-197d8073d9fab505644aaae7f2130e3c"],
    ),
    ([0, 1, 2], ["74ffeb51-74ffeb51d23ed7f07af20997271141bd-p3"]),
]


@pytest.mark.parametrize("tokens,chunk,extra,expected", VECTORS)
def test_chain_hashes_match_the_documented_vectors(tokens, chunk, extra, expected):
    assert [h.hex() for h in chain_hashes(tokens, chunk, extra)] == expected


@pytest.mark.parametrize("tokens,expected", KEY_VECTORS)
def test_key_format_v2_matches_the_documented_keys(tokens, expected):
    keys = DOC_BUILDER.prompt_keys(tokens).all()
    assert [k.decode() for k in keys] == [DOC_PREFIX + e for e in expected]


def test_keys_md_lists_the_key_format_v2_vectors():
    documented = set(re.findall(r"^prod/\S+$", KEYS_MD.read_text(), flags=re.MULTILINE))
    for _tokens, expected in KEY_VECTORS:
        assert {DOC_PREFIX + e for e in expected} <= documented
    assert "46f088646e61d3f52bf6993e84105749" in KEYS_MD.read_text()


def test_a_partial_chunk_key_is_never_a_whole_chunk_key():
    kb = KeyBuilder(chunk_size=4)
    short = kb.prompt_keys([5, 6, 7])
    assert short.whole == [] and short.partial is not None and short.partial.endswith(b"-p3")
    assert short.partial_tokens == 3
    # The same tokens as a whole chunk of a smaller chunk size hash alike, but never share a key.
    assert KeyBuilder(chunk_size=3).chunk_keys([5, 6, 7])[0] != short.partial


def test_every_key_of_a_prompt_has_the_route_of_its_first_chunk():
    kb = KeyBuilder(chunk_size=4)
    keys = kb.prompt_keys(list(range(3, 17))).all()
    routes = {k.rsplit(b"/", 1)[1][:9] for k in keys}
    assert len(keys) == 4 and len(routes) == 1
    assert routes.pop() == chain_hashes(list(range(3, 17)), 4)[0].hex()[:8].encode() + b"-"


def test_partial_keys_find_the_partial_chunk_a_shorter_prompt_stored():
    kb = KeyBuilder(chunk_size=4)
    longer = list(range(20, 31))  # 2 whole chunks and 3 tokens
    for cut in (9, 10, 11, 2, 3):
        shorter = kb.prompt_keys(longer[:cut])
        chunk = cut // 4
        assert kb.partial_keys(longer, chunk, [cut % 4])[cut % 4] == shorter.partial
    with pytest.raises(ValueError):
        kb.partial_keys(longer[:10], 2, [3])  # only 2 tokens of chunk 2 exist


def test_prefix_chaining_and_partial_chunks():
    kb = KeyBuilder(chunk_size=4)
    a = kb.chunk_keys([1, 2, 3, 4, 5, 6, 7, 8, 9])
    b = kb.chunk_keys([1, 2, 3, 4, 5, 6, 7, 99])
    c = kb.chunk_keys([0, 2, 3, 4, 5, 6, 7, 8])
    assert len(a) == 2  # chunk_keys gives whole chunks only; prompt_keys adds the partial one
    assert a[0] == b[0] and a[1] != b[1]
    assert a[0].split(b"-")[1] != c[0].split(b"-")[1]  # a change early on changes every
    assert a[1].split(b"-")[1] != c[1].split(b"-")[1]  # later hash


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
