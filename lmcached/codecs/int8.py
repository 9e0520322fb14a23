"""Lossy int8 quantisation of KV tensors with one scale per channel (KIVI-style).

This is the QUANTIZATION plugin type. It runs in the client's tensor helpers, which know each
tensor's dtype and shape; the daemon stores the result as opaque bytes. Keys have outlier
channels (KIVI, Liu et al. 2024), so a scale per channel, computed over the token axis, keeps
the error of the quiet channels small where one scale per tensor would not.

Symmetric quantisation: for each channel ``c``, ``scale_c = max|x[..., c]| / 127`` and
``q = round(x / scale_c)`` clipped to [-127, 127]. Stated error bound, per element::

    |x - x'| <= scale_c / 2 + |x'| * u

where ``u`` is the unit roundoff of the output dtype (2**-8 for bfloat16, 2**-11 for float16,
2**-24 for float32): half a quantisation step, plus rounding the dequantised value back to the
tensor's dtype. Size: one byte per element plus four bytes per channel, about half of bf16.

The arithmetic uses numpy on raw bytes (bfloat16 is handled bit-wise, since numpy has no
bfloat16); torch is imported only by :func:`quantize_tensor` / :func:`dequantize_tensor`.

Encoded layout (little-endian)::

    magic b"Q8", version u8, dtype code u8, ndim u8, token_dim u8, shape u64 * ndim,
    scales float32 * (elements / shape[token_dim]), values int8 * elements
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from lmcached.codecs.base import Buffer, Codec, CodecError

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch

MAGIC = b"Q8"
VERSION = 1
_HEAD = struct.Struct("<2sBBBB")
DTYPES = ("bfloat16", "float16", "float32")
ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4}
UNIT_ROUNDOFF = {"bfloat16": 2.0**-8, "float16": 2.0**-11, "float32": 2.0**-24}
QMAX = 127


def _np() -> Any:
    try:
        import numpy
    except ImportError:
        raise CodecError("codec 'int8' needs numpy: pip install 'lmcached[codecs]'") from None
    return numpy


def _to_float32(data: Buffer, dtype: str, shape: Sequence[int]) -> np.ndarray:
    np = _np()
    if dtype == "bfloat16":
        # bfloat16 is the top half of a float32: widen the bits, shift into place.
        bits = np.frombuffer(data, dtype="<u2").astype(np.uint32) << 16
        x = bits.view(np.float32)
    elif dtype == "float16":
        x = np.frombuffer(data, dtype="<f2").astype(np.float32)
    else:
        x = np.frombuffer(data, dtype="<f4")
    return x.reshape(tuple(shape))


def _from_float32(x: np.ndarray, dtype: str) -> bytes:
    np = _np()
    if dtype == "bfloat16":
        # Round to nearest even on the 16 bits we drop (what torch's .to(bfloat16) does).
        u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
        rounded = (u + (((u >> 16) & 1) + 0x7FFF)) >> 16
        return rounded.astype("<u2").tobytes()
    if dtype == "float16":
        return x.astype("<f2").tobytes()
    return x.astype("<f4").tobytes()


def _parse_meta(meta: Mapping[str, Any] | None, nbytes: int) -> tuple[str, tuple[int, ...], int]:
    if not meta or "dtype" not in meta or "shape" not in meta:
        raise CodecError("codec 'int8' needs meta with 'dtype' and 'shape' (the tensor's)")
    dtype = str(meta["dtype"]).removeprefix("torch.")
    if dtype not in DTYPES:
        raise CodecError(f"codec 'int8' handles {', '.join(DTYPES)}, not {meta['dtype']!r}")
    shape = tuple(int(d) for d in meta["shape"])
    if not shape or any(d <= 0 for d in shape):
        raise CodecError(f"codec 'int8' needs a non-empty shape of positive sizes, got {shape}")
    token_dim = int(meta.get("token_dim", 0))
    if token_dim < 0:
        token_dim += len(shape)
    if not 0 <= token_dim < len(shape):
        raise CodecError(f"token_dim {meta.get('token_dim')} is outside shape {shape}")
    elements = 1
    for d in shape:
        elements *= d
    if elements * ITEMSIZE[dtype] != nbytes:
        raise CodecError(
            f"payload is {nbytes} bytes, but {dtype}{list(shape)} needs "
            f"{elements * ITEMSIZE[dtype]}"
        )
    return dtype, shape, token_dim


class Int8Codec(Codec):
    """Quantise a float tensor payload to int8 with per-channel float32 scales."""

    name = "int8"
    lossless = False

    def __init__(self) -> None:
        _np()  # fail at start, not on the first block, when numpy is missing

    def encode(self, data: Buffer, meta: Mapping[str, Any] | None = None) -> bytes:
        np = _np()
        dtype, shape, token_dim = _parse_meta(meta, memoryview(data).nbytes)
        x = _to_float32(data, dtype, shape)
        amax = np.max(np.abs(x), axis=token_dim, keepdims=True)
        if not np.isfinite(amax).all():
            raise CodecError("codec 'int8' cannot encode a tensor holding inf or nan")
        scale = (amax / QMAX).astype(np.float32)
        # An all-zero channel gets scale 1 so the division is defined; its values stay 0.
        scale[scale == 0] = 1.0
        q = np.clip(np.rint(x / scale), -QMAX, QMAX).astype(np.int8)
        head = _HEAD.pack(MAGIC, VERSION, DTYPES.index(dtype), len(shape), token_dim)
        dims = struct.pack(f"<{len(shape)}Q", *shape)
        return b"".join((head, dims, scale.astype("<f4").tobytes(), q.tobytes()))

    def decode(self, data: Buffer, meta: Mapping[str, Any] | None = None) -> bytes:
        np = _np()
        dtype, _, _, scale, q = _unpack(data)
        x = q.astype(np.float32) * scale
        return _from_float32(x, dtype)

    @staticmethod
    def describe(data: Buffer) -> dict[str, Any]:
        """Return the dtype, shape and token_dim recorded in an encoded payload."""
        dtype, shape, token_dim, _, _ = _unpack(data)
        return {"dtype": dtype, "shape": list(shape), "token_dim": token_dim}


def _unpack(data: Buffer) -> tuple[str, tuple[int, ...], int, np.ndarray, np.ndarray]:
    np = _np()
    mv = memoryview(data).cast("B")
    if mv.nbytes < _HEAD.size:
        raise CodecError("int8 payload is truncated (no header)")
    magic, version, code, ndim, token_dim = _HEAD.unpack_from(mv)
    if magic != MAGIC or version != VERSION or code >= len(DTYPES) or token_dim >= max(ndim, 1):
        raise CodecError("int8 payload header is corrupt")
    off = _HEAD.size
    if mv.nbytes < off + 8 * ndim:
        raise CodecError("int8 payload is truncated (shape)")
    shape = struct.unpack_from(f"<{ndim}Q", mv, off)
    off += 8 * ndim
    elements = 1
    for d in shape:
        elements *= d
    channels = elements // shape[token_dim]
    if mv.nbytes != off + 4 * channels + elements:
        raise CodecError(
            f"int8 payload is {mv.nbytes} bytes; shape {list(shape)} needs "
            f"{off + 4 * channels + elements}"
        )
    scale_shape = tuple(1 if i == token_dim else d for i, d in enumerate(shape))
    scale = np.frombuffer(mv, dtype="<f4", count=channels, offset=off).reshape(scale_shape)
    q = np.frombuffer(mv, dtype=np.int8, offset=off + 4 * channels).reshape(shape)
    return DTYPES[code], tuple(shape), token_dim, scale, q


# ------------------------------------------------------------------------------------------
# Tensor helpers for clients (torch imported here only).
# ------------------------------------------------------------------------------------------

_TORCH_TO_NAME = {
    "torch.bfloat16": "bfloat16",
    "torch.float16": "float16",
    "torch.float32": "float32",
}


def quantize_tensor(tensor: torch.Tensor, token_dim: int = 0) -> bytes:
    """Return the int8 encoding of a CPU or GPU tensor (moved to CPU for the arithmetic)."""
    import torch

    dtype = _TORCH_TO_NAME.get(str(tensor.dtype))
    if dtype is None:
        raise CodecError(f"int8 handles bfloat16, float16 and float32 tensors, not {tensor.dtype}")
    t = tensor.detach().to("cpu").contiguous()
    # numpy has no bfloat16: hand over the raw 16-bit patterns instead (a view, no copy).
    raw = t.view(torch.int16).numpy() if t.element_size() == 2 else t.numpy()
    meta = {"dtype": dtype, "shape": list(t.shape), "token_dim": token_dim}
    # ``.data`` is the array's buffer: numpy declares ``__buffer__`` only from Python 3.12.
    return Int8Codec().encode(raw.data.cast("B"), meta)


def dequantize_tensor(data: Buffer, device: str | torch.device | None = None) -> torch.Tensor:
    """Return the tensor an int8 payload approximates, in its original dtype and shape."""
    import torch

    info = Int8Codec.describe(data)
    raw = bytearray(Int8Codec().decode(data))
    out = torch.frombuffer(raw, dtype=getattr(torch, info["dtype"])).reshape(info["shape"])
    return out.to(device) if device is not None else out


def error_bound(decoded: np.ndarray, original_amax: np.ndarray, dtype: str) -> np.ndarray:
    """Return the per-element bound stated in the module docstring (for tests and reports)."""
    np = _np()
    return original_amax / (2 * QMAX) + np.abs(decoded) * UNIT_ROUNDOFF[dtype]


def error_report(
    shape: Sequence[int] = (256, 8, 128), token_dim: int = 0, seed: int = 0
) -> dict[str, Any]:
    """Quantise random bf16 KV (normal, with a few outlier channels) and measure the error.

    Returns max abs error, max error relative to the tensor's max magnitude, the RMS error
    relative to the RMS value, whether every element is within the stated bound, and the
    size ratio (encoded bytes / bf16 bytes).
    """
    np = _np()
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(tuple(shape), dtype=np.float32)
    # Keys have outlier channels (KIVI): scale a few channels up by 10-20x.
    flat = x.reshape(-1, shape[-1])
    for c in rng.choice(shape[-1], size=max(1, shape[-1] // 32), replace=False):
        flat[:, c] *= rng.uniform(10, 20)
    raw = _from_float32(x, "bfloat16")
    exact = _to_float32(raw, "bfloat16", shape)  # the bf16 values actually encoded
    meta = {"dtype": "bfloat16", "shape": list(shape), "token_dim": token_dim}
    codec = Int8Codec()
    encoded = codec.encode(raw, meta)
    decoded = _to_float32(codec.decode(encoded), "bfloat16", shape)
    err = np.abs(decoded - exact)
    amax = np.max(np.abs(exact), axis=token_dim, keepdims=True)
    bound = error_bound(decoded, amax, "bfloat16")
    return {
        "shape": list(shape),
        "max_abs_error": float(err.max()),
        "max_relative_error": float(err.max() / np.abs(exact).max()),
        "rms_relative_error": float(np.sqrt((err**2).mean() / (exact**2).mean())),
        "within_bound": bool((err <= bound * (1 + 1e-6)).all()),
        "size_ratio": len(encoded) / len(raw),
    }


if __name__ == "__main__":
    import json

    print(json.dumps(error_report(), indent=2))
