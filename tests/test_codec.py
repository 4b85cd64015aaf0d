"""Tensor codec: round trips, layout, and refusal of every malformed or foreign payload.

Tests may use pickle and torch.save, only to produce hostile inputs; the codec never loads them.
"""
from __future__ import annotations

import os

import io
import math
import pickle
import struct
import warnings

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from octopusd import codec
from octopusd.codec import MAGIC, decode_state, encode_state, encoded_size, layout
from octopusd.errors import CodecError

FUZZ = settings(
    derandomize=not os.environ.get("OCTOPUSD_FUZZ_RANDOM"), max_examples=int(os.environ.get("OCTOPUSD_FUZZ_EXAMPLES", 2000)), deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
DTYPES = list(codec.DTYPES.values())
SHAPES = [(), (0,), (3,), (2, 3, 4), (0, 5)]


def sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 100).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, generator=g, dtype=dtype)


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].shape == b[name].shape, name
        assert torch.equal(a[name], b[name]), name


def forge(header: object, data: bytes = b"", *, version: int = 1, raw_header: bytes | None = None,
          pad_data: bool = True) -> bytes:
    """Hand-build a payload around any header object, to tell lies the encoder never would."""
    hdr = raw_header if raw_header is not None else msgpack.packb(header, use_bin_type=True)
    blob = MAGIC + bytes([version]) + struct.pack("<I", len(hdr)) + hdr
    blob += b"\0" * (-len(blob) % 64)
    if pad_data:
        data += b"\0" * (-len(data) % 64)
    return blob + data


def one_tensor_payload() -> bytes:
    return bytes(encode_state({"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}))


# ------------------------------------------------------------------------------------------
# Round trips
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_round_trip_every_dtype_and_shape(dtype, shape):
    state = {"t": sample(dtype, shape)}
    blob = encode_state(state)
    assert isinstance(blob, bytearray)
    assert len(blob) == encoded_size(state) and len(blob) % 64 == 0
    out = decode_state(blob, expected=layout(state))
    assert_same(out, state)


def test_round_trip_mixed_state_keeps_order_and_bfloat16_bits():
    names = ["z.weight", "a.bias", "m.running_mean", "b.num_batches_tracked", "y.mask", "c.half"]
    dtypes = [torch.bfloat16, torch.float32, torch.float64, torch.int64, torch.bool, torch.float16]
    state = {n: sample(d, (4, 5), seed=i) for i, (n, d) in enumerate(zip(names, dtypes))}
    out = decode_state(bytes(encode_state(state)))
    assert list(out) == names
    assert_same(out, state)
    assert torch.equal(out["z.weight"].view(torch.int16), state["z.weight"].view(torch.int16))


def test_round_trip_large_tensor():
    state = {"big": torch.randn(1_000_000), "small": torch.ones(3)}
    blob = encode_state(state)
    assert len(blob) == encoded_size(state) < 4_000_000 + 1024
    assert_same(decode_state(memoryview(blob)), state)


def test_empty_state():
    blob = encode_state({})
    assert len(blob) == encoded_size({}) == 64
    assert decode_state(blob) == {}
    assert layout({}) == {}


def test_special_float_values_round_trip_bit_exact():
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-45, 3.4e38])
    out = decode_state(encode_state({"x": x}))["x"]
    assert torch.equal(out.view(torch.int32), x.view(torch.int32))


def test_non_contiguous_grad_and_view_inputs_are_encoded_by_value():
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    param = torch.nn.Parameter(torch.randn(3, 3))
    state = {"t": base.t(), "slice": base[1:3, ::2], "param": param,
             "expanded": torch.ones(1).expand(5)}
    out = decode_state(encode_state(state))
    for name, t in state.items():
        assert torch.equal(out[name], t.detach()) and out[name].is_contiguous()
        assert not out[name].requires_grad


def test_layout_and_header_offsets_are_64_byte_aligned():
    state = {"a": torch.ones(3, dtype=torch.int8), "b": torch.ones(2, 2), "c": torch.ones(())}
    assert layout(state) == {"a": ("int8", (3,)), "b": ("float32", (2, 2)), "c": ("float32", ())}
    blob = bytes(encode_state(state))
    assert blob[:5] == MAGIC + b"\x01"
    (hlen,) = struct.unpack_from("<I", blob, 5)
    header = msgpack.unpackb(blob[9 : 9 + hlen])
    assert [e[0] for e in header["tensors"]] == ["a", "b", "c"]
    assert [e[3] for e in header["tensors"]] == [0, 64, 128]
    assert [e[4] for e in header["tensors"]] == [3, 16, 4]


def test_decoded_tensors_are_writable_and_own_their_memory():
    state = {"w": torch.arange(8, dtype=torch.float32), "flag": torch.tensor([True, False])}
    blob = encode_state(state)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "non-writable buffer" warnings either
        out_ro = decode_state(bytes(blob))
        out = decode_state(blob)
    blob[:] = b"\xff" * len(blob)  # scribble over the input: decoded tensors must not change
    assert_same(out, state)
    out["w"].add_(1)
    out_ro["w"].mul_(2)
    out["flag"][0] = False
    assert out["w"][0] == 1 and out_ro["w"][1] == 2
    assert out["w"].untyped_storage().data_ptr() != out["flag"].untyped_storage().data_ptr()


def test_encoded_bytearray_can_be_resized_afterwards():
    blob = encode_state({"w": torch.ones(4)})
    blob.extend(b"more")  # no lingering buffer export
    assert len(blob) == encoded_size({"w": torch.ones(4)}) + 4


def test_byteswap_helper_reverses_each_element():
    u8 = torch.tensor([1, 2, 3, 4, 5, 6, 7, 8], dtype=torch.uint8)
    codec._byteswap_(u8, 4)
    assert u8.tolist() == [4, 3, 2, 1, 8, 7, 6, 5]


# ------------------------------------------------------------------------------------------
# Encoder refusals
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "match"),
    [
        ({"c": torch.ones(2, dtype=torch.complex64)}, "unsupported dtype"),
        ({"u": torch.ones(2, dtype=torch.uint16)}, "unsupported dtype"),
        ({"n": [1.0, 2.0]}, "expected a torch.Tensor"),
        ({1: torch.ones(1)}, "names must be str"),
        ({"x" * 513: torch.ones(1)}, "longer than 512"),
        ({"s": torch.eye(3).to_sparse()}, "dense"),
        ({"d": torch.ones([1] * 9)}, "limits"),
    ],
)
def test_encode_rejects_unsupported_input(state, match):
    with pytest.raises(CodecError, match=match):
        encode_state(state)
    with pytest.raises(CodecError, match=match):
        encoded_size(state)


def test_encode_rejects_non_mapping():
    with pytest.raises(CodecError, match="mapping"):
        encode_state([torch.ones(1)])  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------
# Decoder refusals
# ------------------------------------------------------------------------------------------


def test_truncated_at_every_cut_point():
    state = {"a": torch.randn(10), "b": torch.ones(3, dtype=torch.bool), "c": torch.zeros(0)}
    blob = bytes(encode_state(state))
    for cut in range(len(blob)):
        with pytest.raises(CodecError, match="truncated|empty"):
            decode_state(blob[:cut])


def test_over_max_bytes():
    blob = one_tensor_payload()
    assert decode_state(blob, max_bytes=len(blob))
    with pytest.raises(CodecError, match=rf"{len(blob)} bytes, over the limit of {len(blob) - 1}"):
        decode_state(blob, max_bytes=len(blob) - 1)


def test_pickle_is_refused_by_name():
    hostile = pickle.dumps({"w": [1.0, 2.0]}, protocol=pickle.HIGHEST_PROTOCOL)
    with pytest.raises(CodecError, match="unknown payload format.*pickle"):
        decode_state(hostile)


def test_torch_save_zip_is_refused_by_name():
    buf = io.BytesIO()
    torch.save({"w": torch.ones(3)}, buf)
    with pytest.raises(CodecError, match="unknown payload format.*zip.*torch.load is never used"):
        decode_state(buf.getvalue())


@pytest.mark.parametrize("blob", [b"GIF89a....", b"\x00\x00\x00\x00\x01", b"octt\x01" + b"\0" * 60])
def test_wrong_magic(blob):
    with pytest.raises(CodecError, match="unknown payload format"):
        decode_state(blob)


def test_wrong_version():
    blob = bytearray(one_tensor_payload())
    blob[4] = 2
    with pytest.raises(CodecError, match="unsupported codec version 2"):
        decode_state(blob)


@pytest.mark.parametrize("value", ["text", 123, [1, 2], None])
def test_non_bytes_input(value):
    with pytest.raises(CodecError, match="expected bytes"):
        decode_state(value)  # type: ignore[arg-type]


def test_trailing_garbage():
    for extra in (b"\0", b"x" * 64, b"\0" * 128):
        with pytest.raises(CodecError, match="trailing garbage"):
            decode_state(one_tensor_payload() + extra)


def test_header_length_past_end():
    blob = bytearray(one_tensor_payload())
    blob[5:9] = struct.pack("<I", len(blob))
    with pytest.raises(CodecError, match="header of .* runs past"):
        decode_state(blob)


F4 = [0.0] * 4
BUF16 = struct.pack("<4f", *F4)


@pytest.mark.parametrize(
    ("header", "data", "match"),
    [
        ([1, 2], b"", "header must be a msgpack map"),
        ({"tensors": [], "extra": 1}, b"", "header keys must be exactly"),
        ({"tensor": []}, b"", "header keys must be exactly"),
        ({"tensors": {}}, b"", "'tensors' must be a list"),
        ({"tensors": [["w", "float32", [4], 0]]}, BUF16, "expected \\[name, dtype"),
        ({"tensors": ["w"]}, BUF16, "expected \\[name, dtype"),
        ({"tensors": [[5, "float32", [4], 0, 16]]}, BUF16, "name must be a str"),
        ({"tensors": [["x" * 513, "float32", [4], 0, 16]]}, BUF16, "name must be a str"),
        ({"tensors": [["w", "complex64", [4], 0, 16]]}, BUF16, "unknown dtype 'complex64'"),
        ({"tensors": [["w", "object", [4], 0, 16]]}, BUF16, "unknown dtype 'object'"),
        ({"tensors": [["w", 7, [4], 0, 16]]}, BUF16, "unknown dtype 7"),
        ({"tensors": [["w", "float32", 4, 0, 16]]}, BUF16, "shape must be a list"),
        ({"tensors": [["w", "float32", [1] * 9, 0, 4]]}, BUF16, "at most 8 dims"),
        ({"tensors": [["w", "float32", [-4], 0, 16]]}, BUF16, "shape dims must be ints"),
        ({"tensors": [["w", "float32", [True], 0, 4]]}, BUF16, "shape dims must be ints"),
        ({"tensors": [["w", "float32", [2.0], 0, 8]]}, BUF16, "shape dims must be ints"),
        ({"tensors": [["w", "float32", [2**31 + 1], 0, 4 * (2**31 + 1)]]}, BUF16, "shape dims"),
        ({"tensors": [["w", "int8", [0, 2**31, 2**31, 2**31]]]}, BUF16, "expected \\[name"),
        ({"tensors": [["w", "int8", [0, 2**31, 2**31, 2**31], 0, 0]]}, b"", "too large to"),
        ({"tensors": [["w", "float32", [4], 4, 16]]}, BUF16, "not a 64-byte aligned"),
        ({"tensors": [["w", "float32", [4], -64, 16]]}, BUF16, "not a 64-byte aligned"),
        ({"tensors": [["w", "float32", [4], 0.0, 16]]}, BUF16, "not a 64-byte aligned"),
        ({"tensors": [["w", "float32", [4], 0, 12]]}, BUF16, "nbytes 12 != 16"),
        ({"tensors": [["w", "float32", [4], 0, "16"]]}, BUF16, "nbytes '16' != 16"),
        ({"tensors": [["w", "float32", [4], 64, 16]]}, BUF16, "offset 64 leaves a gap; expected 0"),
        ({"tensors": [["w", "float32", [4], 4096, 16]]}, BUF16, "leaves a gap"),
        ({"tensors": [["w", "float32", [64], 0, 256]]}, BUF16, "truncated payload"),
        ({"tensors": [["w", "int8", [2**31, 2**31], 0, 2**62]]}, BUF16, "truncated payload"),
        (
            {"tensors": [["a", "float32", [32], 0, 128], ["b", "float32", [4], 64, 16]]},
            b"\0" * 192, "offset 64 overlaps the previous buffer",
        ),
        (
            {"tensors": [["a", "float32", [4], 64, 16], ["b", "float32", [4], 0, 16]]},
            b"\0" * 128, "leaves a gap",
        ),
        (
            {"tensors": [["w", "float32", [4], 0, 16], ["w", "float32", [4], 64, 16]]},
            b"\0" * 128, "duplicate tensor name 'w'",
        ),
    ],
)
def test_header_lies(header, data, match):
    with pytest.raises(CodecError, match=match):
        decode_state(forge(header, data))


@pytest.mark.parametrize(
    ("raw_header", "match"),
    [
        (b"\xc1", "header is not valid msgpack"),  # never-used byte
        (b"\x81\xa7tensors\x90\x00", "header is not valid msgpack"),  # extra data
        (b"\x81\xa7tensors", "header is not valid msgpack"),  # incomplete
        (b"\x81\xa7tensors\xd4\x01\x00", "header is not valid msgpack.*ext"),  # ext type
        (msgpack.packb(msgpack.Timestamp(1, 0)), "header is not valid msgpack"),
        (msgpack.packb({1: []}), "header is not valid msgpack"),  # non-str key
        (msgpack.packb({"tensors": [b"w"]}, use_bin_type=True), "header is not valid msgpack"),
        (b"\x91" * 5000, "header is not valid msgpack"),  # too deep
    ],
)
def test_header_not_acceptable_msgpack(raw_header, match):
    with pytest.raises(CodecError, match=match):
        decode_state(forge(None, raw_header=raw_header))


def test_non_zero_padding_is_refused():
    blob = bytearray(encode_state({"w": torch.ones(3)}))
    blob[-1] = 1  # padding after the last 12-byte buffer
    with pytest.raises(CodecError, match="non-zero padding"):
        decode_state(blob)
    blob = bytearray(encode_state({"w": torch.ones(3)}))
    (hlen,) = struct.unpack_from("<I", blob, 5)
    blob[9 + hlen] = 7  # padding between header and data
    with pytest.raises(CodecError, match="non-zero padding"):
        decode_state(blob)


def test_bool_bytes_other_than_0_and_1_are_refused():
    blob = forge({"tensors": [["m", "bool", [3], 0, 3]]}, b"\x01\x00\x02")
    with pytest.raises(CodecError, match="bool bytes must be 0 or 1"):
        decode_state(blob)


# ------------------------------------------------------------------------------------------
# expected= and check_finite=
# ------------------------------------------------------------------------------------------


STATE = {"w": torch.ones(2, 3), "b": torch.zeros(3), "n": torch.tensor(5)}


def test_expected_matches_in_any_order():
    want = dict(reversed(list(layout(STATE).items())))
    want["w"] = ("float32", [2, 3])  # lists and torch.Size are fine as shapes
    want["b"] = (torch.float32, torch.Size([3]))
    assert_same(decode_state(encode_state(STATE), expected=want), STATE)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda w: w.pop("b"), "unexpected tensor 'b'"),
        (lambda w: w.update(extra=("float32", (1,))), "tensor 'extra' is missing"),
        (lambda w: w.update(w=("float64", (2, 3))), "'w' has dtype float32, expected float64"),
        (lambda w: w.update(w=("float32", (3, 2))), r"'w' has shape \[2, 3\], expected \[3, 2\]"),
        (lambda w: w.update(n=("int64", (1,))), r"'n' has shape \[\], expected \[1\]"),
    ],
)
def test_expected_mismatch(change, match):
    want = layout(STATE)
    change(want)
    with pytest.raises(CodecError, match="layout mismatch: .*" + match):
        decode_state(encode_state(STATE), expected=want)


def test_expected_checked_before_allocating():
    # The header lies about nothing, but the layout is wrong: refused without touching data.
    blob = forge({"tensors": [["w", "float32", [4], 0, 16]]}, BUF16)
    with pytest.raises(CodecError, match="layout mismatch"):
        decode_state(blob, expected={"w": ("float32", (5,))})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_check_finite(dtype, bad):
    state = {"ok": torch.ones(3, dtype=dtype), "x": torch.tensor([1.0, bad, 2.0], dtype=dtype)}
    blob = encode_state(state)
    assert torch.isnan(decode_state(blob)["x"][1]) == (bad != bad)  # default: accepted
    with pytest.raises(CodecError, match="tensor 'x' has 1 non-finite value"):
        decode_state(blob, check_finite=True)


def test_check_finite_ignores_integer_tensors():
    state = {"i": torch.tensor([1, 2]), "b": torch.tensor([True]), "f": torch.ones(2)}
    assert_same(decode_state(encode_state(state), check_finite=True), state)


# ------------------------------------------------------------------------------------------
# Fuzzing: whatever the bytes, the result is a state dict or a CodecError
# ------------------------------------------------------------------------------------------


BASES = [
    bytes(encode_state({})),
    bytes(encode_state({"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2)})),
    bytes(encode_state({"m": torch.tensor([True, False]), "h": torch.ones(3, dtype=torch.bfloat16),
                        "s": torch.tensor(7, dtype=torch.int64), "e": torch.zeros(0, 4)})),
]


def decode_or_codec_error(blob: bytes) -> None:
    try:
        out = decode_state(blob, max_bytes=1 << 20)
    except CodecError as exc:
        assert str(exc)
        return
    assert isinstance(out, dict)
    assert all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in out.items())
    again = decode_state(encode_state(out))  # anything accepted re-encodes to the same state
    # Compared as bytes, not as Python lists: an accepted empty tensor may be shaped [2**31, 0],
    # whose tolist() is two billion empty lists (it took a test run past 24 GB).
    assert again.keys() == out.keys()
    for k, v in out.items():
        w = again[k]
        assert w.dtype == v.dtype and w.shape == v.shape
        assert torch.equal(w.reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8))


@FUZZ
@given(st.binary(max_size=300) | st.binary(max_size=300).map(lambda b: MAGIC + b"\x01" + b))
def test_fuzz_arbitrary_bytes(blob):
    decode_or_codec_error(blob)


MUTATION = st.tuples(st.sampled_from(["flip", "set", "insert", "delete"]),
                     st.integers(0, 10_000), st.integers(0, 255))


@FUZZ
@given(st.sampled_from(BASES), st.lists(MUTATION, min_size=1, max_size=4))
def test_fuzz_mutated_valid_encodings(base, mutations):
    blob = bytearray(base)
    for kind, pos, byte in mutations:
        pos %= len(blob) + (kind == "insert")
        if kind == "flip" and blob:
            blob[pos % len(blob)] ^= 1 << (byte % 8)
        elif kind == "set" and blob:
            blob[pos % len(blob)] = byte
        elif kind == "insert":
            blob.insert(pos, byte)
        elif blob:
            del blob[pos % len(blob)]
    decode_or_codec_error(bytes(blob))


FORGED_DTYPE = st.sampled_from([*codec.DTYPES, "complex64", "", 1])
FORGED_SHAPE = (st.lists(st.integers(0, 4), max_size=3)
                | st.lists(st.integers(-1, 2**33), max_size=9))
FORGED_NAME = st.sampled_from(["a", "b", ""]) | st.text(max_size=3)
FORGED_LIE = st.none() | st.integers(-64, 4096)  # None: tell the truth


@st.composite
def forged_payloads(draw) -> bytes:
    """Headers that are mostly plausible (canonical offsets, right nbytes) with occasional lies."""
    entries, end = [], 0
    for _ in range(draw(st.integers(0, 3))):
        dtype, shape = draw(FORGED_DTYPE), draw(FORGED_SHAPE)
        offset = (end + 63) // 64 * 64
        nbytes = min(math.prod(shape) * codec._ITEMSIZE.get(dtype, 1), 2**62)
        offset, nbytes = [v if lie is None else lie for v, lie in
                          zip((offset, nbytes), (draw(FORGED_LIE), draw(FORGED_LIE)))]
        entries.append([draw(FORGED_NAME), dtype, shape, min(offset, 2**62), max(nbytes, -(2**62))])
        end = max(offset + nbytes, 0)
    fill = draw(st.sampled_from([b"\0", b"\1", b"\xff"]))
    if draw(st.booleans()):
        data = fill * min((end + 63) // 64 * 64, 4096)
    else:
        data = draw(st.binary(max_size=200))
    return forge({"tensors": entries}, data, pad_data=False)


@FUZZ
@given(forged_payloads())
def test_fuzz_forged_headers(blob):
    decode_or_codec_error(blob)
