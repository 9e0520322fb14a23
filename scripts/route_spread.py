"""How blocks and bytes spread over workers: the route rule against the old whole-key rule.

Under key format v2 every chunk key of a prompt carries the route of the prompt's first chunk,
and ``lmcached.routing`` sends the whole chain to one worker (a lookup is one round trip).
Prompts that share their first chunk (a system prompt) then share a worker, so the spread is by
distinct first chunks, not by chunks. This script builds a synthetic but realistic prompt set
(system prompts of 1-8 chunks shared by a Zipf-popular fraction of the prompts, log-normal
prompt lengths up to 32k tokens, a trailing partial chunk) and prints, for 2 and 4 workers, each
worker's share of the distinct blocks and of their bytes under both rules, with max/mean.

    python scripts/route_spread.py [--prompts 2000] [--shared 0.6] [--systems 8]
"""

from __future__ import annotations

import argparse
import math
import random

import xxhash

from lmcached.routing import jump_hash, owner

PREFIX = b"prod/meta-llama--Llama-3.1-8B@main/bfloat16-l32h8d128-tp0of1/"
# Llama-3.1-8B in bf16: 32 layers x (K, V) x 8 KV heads x 128 dims x 2 bytes per token.
KV_BYTES_PER_TOKEN = 32 * 2 * 8 * 128 * 2


def _h(*parts: object) -> bytes:
    return xxhash.xxh3_128_digest(repr(parts).encode())


def prompt_chunks(
    rng: random.Random, system: tuple[int, int] | None, chunk: int, uid: int
) -> list[tuple[bytes, int]]:
    """(chunk hash, tokens) of one prompt; a shared system prompt gives its leading chunks."""
    tokens = min(32768, max(64, int(rng.lognormvariate(math.log(2048), 1.0))))
    hashes: list[tuple[bytes, int]] = []
    prev = b""
    if system is not None:
        sid, sys_chunks = system
        for i in range(sys_chunks):
            prev = _h("sys", sid, i, prev)
            hashes.append((prev, chunk))
        tokens += sys_chunks * chunk
    full, partial = divmod(tokens, chunk)
    for i in range(len(hashes), full):
        prev = _h("user", uid, i, prev)
        hashes.append((prev, chunk))
    if partial:
        hashes.append((_h("partial", uid, prev), partial))
    return hashes


def v2_keys(chunks: list[tuple[bytes, int]], chunk: int) -> list[tuple[bytes, int]]:
    """Key format v2: ``<route>-<chunk hash>[-p<n>]``, route = first 8 hex of h_1."""
    route = chunks[0][0].hex()[:8]
    out = []
    for h, n in chunks:
        tail = "" if n == chunk else f"-p{n}"
        out.append((PREFIX + f"{route}-{h.hex()}{tail}".encode(), n * KV_BYTES_PER_TOKEN))
    return out


def spread(keys: dict[bytes, int], workers: int, rule: str) -> tuple[list[int], list[int]]:
    blocks, nbytes = [0] * workers, [0] * workers
    for key, size in keys.items():
        if rule == "route":
            w = owner(key, workers)
        else:  # the old rule: the whole key
            w = jump_hash(xxhash.xxh3_64_intdigest(key), workers)
        blocks[w] += 1
        nbytes[w] += size
    return blocks, nbytes


def _shares(values: list[int]) -> str:
    total = sum(values) or 1
    mean = total / len(values)
    cells = " ".join(f"{100 * v / total:5.1f}%" for v in values)
    return f"{cells}  max/mean {max(values) / mean:.2f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=2000)
    ap.add_argument("--shared", type=float, default=0.6, help="fraction using a system prompt")
    ap.add_argument("--systems", type=int, default=8, help="distinct system prompts")
    ap.add_argument("--chunk-size", type=int, default=256)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    systems = [(s, rng.randint(1, 8)) for s in range(args.systems)]
    weights = [1 / (i + 1) ** 1.1 for i in range(args.systems)]  # Zipf popularity
    keys: dict[bytes, int] = {}
    for uid in range(args.prompts):
        system = rng.choices(systems, weights)[0] if rng.random() < args.shared else None
        keys.update(v2_keys(prompt_chunks(rng, system, args.chunk_size, uid), args.chunk_size))
    total = sum(keys.values())
    print(
        f"{args.prompts} prompts, {args.shared:.0%} behind one of {args.systems} system prompts "
        f"(Zipf): {len(keys)} distinct blocks, {total / 2**30:.1f} GiB"
    )
    for workers in (2, 4):
        for rule in ("whole-key", "route"):
            blocks, nbytes = spread(keys, workers, rule)
            print(f"{workers} workers, {rule:9s} blocks: {_shares(blocks)}")
            print(f"{workers} workers, {rule:9s} bytes:  {_shares(nbytes)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
