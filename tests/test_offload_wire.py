"""The ELT1/ELTS tensor wire format: exact round trips, bfloat16 as torch rounds it, every malformed case refused."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from edgellm.errors import ConfigError
from edgellm.offload.wire import (
    MAX_SET_COUNT,
    PayloadError,
    bfloat16_bits_to_float32,
    decode_tensor,
    decode_tensors,
    encode_tensor,
    encode_tensors,
    float32_to_bfloat16_bits,
)

RNG = np.random.default_rng(0)


@pytest.mark.parametrize("dtype", ["float32", "float16", "int32", "int64"])
@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4), (1, 2, 3, 2)])
def test_round_trip_is_exact(dtype, shape):
    x = (RNG.standard_normal(shape) * 1000).astype(dtype)
    y = decode_tensor(encode_tensor(x))
    assert y.dtype == np.dtype(dtype) and y.shape == shape
    np.testing.assert_array_equal(y, x)
    assert y.flags.writeable  # safe to hand to torch without a read-only warning


def test_payload_layout_is_the_documented_one():
    data = encode_tensor(np.arange(6, dtype=np.int32).reshape(2, 3))
    assert data[:4] == b"ELT1" and data[4:8] == bytes([3, 2, 0, 0])
    assert struct.unpack("<2I", data[8:16]) == (2, 3)
    assert data[16:] == np.arange(6, dtype="<i4").tobytes()


def test_bfloat16_matches_torch_rounding():
    x = np.concatenate([
        (RNG.standard_normal(4096) * 10.0 ** RNG.integers(-30, 30, 4096)).astype(np.float32),
        np.array([0.0, -0.0, 1e-40, -1e-40, 3.3895e38, -3.3895e38, np.inf, -np.inf, 1.00390625, 1.01171875],
                 dtype=np.float32),  # ties to even both ways, overflow to inf, subnormals
    ])
    ours = float32_to_bfloat16_bits(x)
    theirs = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(ours, theirs)
    decoded = decode_tensor(encode_tensor(x.reshape(-1, 2), "bfloat16"))
    assert decoded.dtype == np.float32
    np.testing.assert_array_equal(decoded.ravel(), torch.from_numpy(x).to(torch.bfloat16).float().numpy())


def test_bfloat16_nan_stays_nan():
    bits = float32_to_bfloat16_bits(np.array([np.nan], dtype=np.float32))
    assert np.isnan(bfloat16_bits_to_float32(bits)).all()


def test_tensor_set_round_trip():
    arrays = [RNG.standard_normal((4, 2, 8)).astype(np.float32) for _ in range(6)]
    out = decode_tensors(encode_tensors(arrays), count=6, allowed=("float32",), ndim=3)
    for a, b in zip(arrays, out, strict=True):
        np.testing.assert_array_equal(a, b)


def _header(code=0, ndim=2, reserved=0, dims=(2, 3), magic=b"ELT1") -> bytes:
    return struct.pack("<4sBBH", magic, code, ndim, reserved) + struct.pack(f"<{len(dims)}I", *dims)


GOOD = _header() + bytes(24)
MALFORMED = {
    "short header": (b"ELT1", "truncated"),
    "bad magic": (b"PK\x03\x04" + GOOD[4:], "bad_magic"),
    "pickle": (b"\x80\x04\x95" + bytes(30), "bad_magic"),
    "unknown dtype": (_header(code=9) + bytes(24), "bad_dtype"),
    "ndim 0": (_header(ndim=0, dims=()), "bad_shape"),
    "ndim 5": (_header(ndim=5, dims=(1,) * 5) + bytes(4), "bad_shape"),
    "reserved set": (_header(reserved=1) + bytes(24), "bad_header"),
    "dims cut off": (_header()[:12], "truncated"),
    "zero dim": (_header(dims=(0, 3)), "bad_shape"),
    "data short": (_header() + bytes(23), "length_mismatch"),
    "data long": (_header() + bytes(25), "length_mismatch"),
    "huge dims": (_header(dims=(2**32 - 1, 2**32 - 1)) + bytes(24), "length_mismatch"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_tensor_is_refused_with_its_reason(case):
    data, code = MALFORMED[case]
    with pytest.raises(PayloadError) as info:
        decode_tensor(data)
    assert info.value.code == code
    assert "\n" not in str(info.value)
    assert isinstance(info.value, ConfigError)


def test_the_valid_neighbour_of_the_malformed_cases_decodes():
    assert decode_tensor(GOOD).shape == (2, 3)


def test_constraints_dtype_rank_and_finiteness():
    hidden = encode_tensor(np.array([[1.0, np.nan]], dtype=np.float32))
    with pytest.raises(PayloadError, match="NaN or infinite") as info:
        decode_tensor(hidden, finite=True)
    assert info.value.code == "non_finite"
    decode_tensor(hidden)  # not asked to be finite: a float payload may carry NaN
    with pytest.raises(PayloadError, match="dtype float32 not accepted here"):
        decode_tensor(encode_tensor(np.ones(3, np.float32)), allowed=("int32", "int64"))
    with pytest.raises(PayloadError, match="expected 2 dims, found 1"):
        decode_tensor(encode_tensor(np.ones(3, np.float32)), ndim=2)


@pytest.mark.parametrize("mutate, match", [
    (lambda d: d[:6], "shorter than its 8-byte header"),
    (lambda d: b"ELTX" + d[4:], "bad magic"),
    (lambda d: d[:4] + struct.pack("<I", 3) + d[8:], "ends before tensor 2"),
    (lambda d: d[:4] + struct.pack("<I", 0) + d[8:], "holds 0 tensors"),
    (lambda d: d[:4] + struct.pack("<I", MAX_SET_COUNT + 1) + d[8:], "expected 1..4096"),
    (lambda d: d + b"\0", "1 trailing bytes"),
    (lambda d: d[:8] + struct.pack("<I", 10**6) + d[12:], "claims 1000000 bytes"),
])
def test_malformed_tensor_set_is_refused(mutate, match):
    data = encode_tensors([np.ones((2, 2), np.float32), np.zeros((2, 2), np.float32)])
    with pytest.raises(PayloadError, match=match):
        decode_tensors(mutate(data))


def test_tensor_set_count_is_checked():
    with pytest.raises(PayloadError, match="holds 2 tensors, expected 4"):
        decode_tensors(encode_tensors([np.ones(2, np.float32)] * 2), count=4)


def test_encode_refuses_what_the_format_cannot_carry():
    with pytest.raises(ConfigError, match="unknown wire dtype 'float64'; valid dtypes: float32"):
        encode_tensor(np.ones(3))
    with pytest.raises(PayloadError, match="need 1..4 non-zero dims"):
        encode_tensor(np.ones((0, 3), np.float32))
    with pytest.raises(PayloadError, match="need 1..4 non-zero dims"):
        encode_tensor(np.float32(1.0))
