"""Measure the keyed integrity MAC against the unkeyed checksum, in one run (docs/benchmarks.md).

    python scripts/bench_integrity.py [--size-mib 16] [--seconds 2]

Prints GB/s of: xxh3-64 over a payload (what every block pays), HMAC-SHA256 over it (what a
block pays on top with ``integrity_key_file``; keyed BLAKE2b, the alternative, for comparison),
and a whole verified read of a stored remote
value (``decode_block``) without and with the secret. Ratios are against the same run.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import os
import time
from collections.abc import Callable

import xxhash

from lmcached.storage.base import Block
from lmcached.storage.blockformat import decode_block, encode_block


def _rate(fn: Callable[[], object], nbytes: int, seconds: float) -> float:
    fn()  # warm
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        fn()
        n += 1
    return n * nbytes / elapsed / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=2.0)
    args = ap.parse_args()
    size = args.size_mib << 20
    payload = os.urandom(size)
    secret = hashlib.blake2b(b"bench secret material", digest_size=32).digest()
    key = b"lmcached:ns/m@0/any/0123abcd-" + b"0" * 32
    block = Block.from_bytes(payload, {"dtype": "float16", "shape": [2, 16, 8]})
    plain = b"".join(bytes(p) for p in encode_block(key, block))
    keyed = b"".join(bytes(p) for p in encode_block(key, block, secret))
    rows = [
        ("xxh3-64 checksum", _rate(lambda: xxhash.xxh3_64_intdigest(payload), size, args.seconds)),
        (
            "HMAC-SHA256 (the MAC used)",
            _rate(lambda: hmac.new(secret, payload, "sha256").digest(), size, args.seconds),
        ),
        (
            "keyed BLAKE2b-256",
            _rate(
                lambda: hashlib.blake2b(payload, key=secret, digest_size=32).digest(),
                size,
                args.seconds,
            ),
        ),
        ("verified read, no secret", _rate(lambda: decode_block(plain, key), size, args.seconds)),
        (
            "verified read, with secret",
            _rate(lambda: decode_block(keyed, key, secret), size, args.seconds),
        ),
    ]
    base = rows[0][1]
    print(f"payload {args.size_mib} MiB, {args.seconds} s per row")
    for name, gbs in rows:
        print(f"{name:28s} {gbs:8.2f} GB/s   {gbs / base:6.3f}x of xxh3")


if __name__ == "__main__":
    main()
