"""Codec round trips: lossless codecs are bit-exact, int8 stays within its stated bound."""

from __future__ import annotations

import os

import numpy as np
import pytest

from lmcached.codecs import int8
from lmcached.codecs.base import CodecError, codec_of, decode_payload, encode_payload, make_codec

PAYLOADS = {
    "empty": b"",
    "one byte": b"x",
    "random 1MiB": os.urandom(1 << 20),
    "compressible 3MiB": (b"kv-block " * 40_000 + bytes(1 << 20))[: 3 << 20],
}


@pytest.mark.parametrize("codec", ["none", "zstd", "lz4"])
@pytest.mark.parametrize("payload", list(PAYLOADS), ids=list(PAYLOADS))
def test_lossless_codecs_round_trip_bit_exact(codec, payload):
    data = PAYLOADS[payload]
    enveloped = encode_payload(codec, data)
    assert codec_of(enveloped) == codec
    assert decode_payload(enveloped) == data
    # Also from a memoryview slice, as tiers hand buffers around.
    assert decode_payload(memoryview(bytearray(enveloped))) == data


@pytest.mark.parametrize("codec", ["zstd", "lz4"])
def test_compressors_shrink_compressible_data(codec):
    data = PAYLOADS["compressible 3MiB"]
    assert len(encode_payload(codec, data)) < len(data) // 4


def test_codec_from_a_package_round_trips(example_installed):
    data = PAYLOADS["compressible 3MiB"]
    enveloped = encode_payload("zlib", data)
    assert codec_of(enveloped) == "zlib" and decode_payload(enveloped) == data


def test_corrupt_or_hostile_payloads_raise_codec_error():
    good = encode_payload("zstd", PAYLOADS["compressible 3MiB"])
    with pytest.raises(CodecError, match="too short"):
        decode_payload(b"LM")
    with pytest.raises(CodecError, match="magic"):
        decode_payload(b"XXXX" + good[4:])
    with pytest.raises(CodecError, match="cannot decode"):
        decode_payload(good[:40] + bytes(100))
    with pytest.raises(CodecError, match="more than the limit"):
        decode_payload(good, max_size=1024)
    unknown = bytearray(encode_payload("lz4", b"abc"))
    unknown[len(unknown) - 3 - 3 - 19 :] = b""  # keep the header, drop the body
    renamed = bytes(unknown).replace(b"lz4", b"lzz")
    with pytest.raises(CodecError, match="codec 'lzz'"):
        decode_payload(renamed)


def test_make_codec_shares_instances_and_names_unknown_codecs(registry):
    assert make_codec("zstd") is make_codec("zstd")
    with pytest.raises(Exception, match="codec:brotli: not registered"):
        make_codec("brotli")


def bf16_kv(shape, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape, dtype=np.float32) * 3
    return int8._from_float32(x, "bfloat16")


@pytest.mark.parametrize(
    ("shape", "token_dim"), [((256, 8, 128), 0), ((2, 64, 4, 32), 1), ((17, 3), -2)]
)
def test_int8_is_within_its_stated_error_bound(shape, token_dim):
    raw = bf16_kv(shape)
    meta = {"dtype": "bfloat16", "shape": list(shape), "token_dim": token_dim}
    codec = make_codec("int8")
    encoded = codec.encode(raw, meta)
    assert int8.Int8Codec.describe(encoded)["shape"] == list(shape)
    decoded = int8._to_float32(codec.decode(encoded), "bfloat16", shape)
    exact = int8._to_float32(raw, "bfloat16", shape)
    amax = np.max(np.abs(exact), axis=token_dim, keepdims=True)
    bound = int8.error_bound(decoded, amax, "bfloat16")
    assert (np.abs(decoded - exact) <= bound * (1 + 1e-6)).all()
    assert np.abs(decoded - exact).max() > 0  # it is lossy: the test can fail
    if len(raw) > 4096:  # the header and scales dominate tiny tensors
        assert len(encoded) < 0.6 * len(raw)


def test_int8_error_report_on_random_bf16_kv():
    report = int8.error_report()
    assert report["within_bound"]
    assert report["max_relative_error"] <= 1 / 254 + 2**-8
    assert 0.5 < report["size_ratio"] < 0.52


def test_int8_keeps_zero_channels_and_float32_and_float16():
    x = np.zeros((4, 3), dtype=np.float32)
    x[:, 1] = [1.0, -2.0, 0.5, 4.0]
    codec = int8.Int8Codec()
    for dtype in ("float32", "float16"):
        raw = int8._from_float32(x, dtype)
        out = int8._to_float32(
            codec.decode(codec.encode(raw, {"dtype": dtype, "shape": [4, 3]})), dtype, (4, 3)
        )
        assert (out[:, 0] == 0).all() and (out[:, 2] == 0).all()
        assert np.abs(out - x).max() <= 4.0 / 254 + 4.0 * int8.UNIT_ROUNDOFF[dtype]


def test_int8_refuses_what_it_cannot_encode():
    codec = int8.Int8Codec()
    with pytest.raises(CodecError, match="needs meta"):
        codec.encode(b"\0" * 8)
    with pytest.raises(CodecError, match="needs 16"):
        codec.encode(b"\0" * 8, {"dtype": "bfloat16", "shape": [2, 4]})
    with pytest.raises(CodecError, match="not 'int4'"):
        codec.encode(b"\0" * 8, {"dtype": "int4", "shape": [2, 4]})
    nan = np.full((2, 2), np.nan, dtype=np.float32).tobytes()
    with pytest.raises(CodecError, match="inf or nan"):
        codec.encode(nan, {"dtype": "float32", "shape": [2, 2]})
    with pytest.raises(CodecError, match=r"needs 54"):
        codec.decode(codec.encode(bf16_kv((4, 4)), {"dtype": "bfloat16", "shape": [4, 4]})[:-1])


def test_int8_tensor_helpers_match_the_bytes_codec():
    torch = pytest.importorskip("torch")
    t = torch.randn(64, 4, 16, dtype=torch.bfloat16)
    payload = int8.quantize_tensor(t, token_dim=0)
    back = int8.dequantize_tensor(payload)
    assert back.dtype == torch.bfloat16 and tuple(back.shape) == (64, 4, 16)
    amax = t.float().abs().amax(dim=0, keepdim=True)
    bound = amax / 254 + back.float().abs() * 2**-8
    assert ((back.float() - t.float()).abs() <= bound * (1 + 1e-6)).all()


def test_bf16_rounding_matches_torch():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(3).standard_normal(10_000, dtype=np.float32) * 100
    ours = np.frombuffer(int8._from_float32(x, "bfloat16"), dtype="<u2")
    theirs = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert (ours == theirs).all()
