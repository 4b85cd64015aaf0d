"""Tensor codec: the only format in which model states and updates cross the wire.

This module owns the byte layout of tensor payloads (S3 objects and inline payloads) and their
validation. There is no pickle, no ``torch.load`` and no ``allow_pickle`` here: a payload that is
not exactly this format is refused with :class:`~octopusd.errors.CodecError`, never "tried".

Layout (all integers little-endian)::

    MAGIC b"OCTT" (4) | version (1) | header length H (uint32, 4) | msgpack header (H bytes)
    | zero padding to a multiple of 64 | data section

The header is the msgpack map ``{"tensors": [[name, dtype, [shape...], offset, nbytes], ...]}``
in the state's insertion order. ``offset`` is relative to the start of the data section (itself
64-byte aligned); each buffer starts at the first 64-byte aligned offset after the previous one
(the first at 0), holds the tensor's raw little-endian elements (C order, ``bool`` as one byte
0/1), and is followed by zero padding to a multiple of 64. The payload ends right after the last
buffer's padding. The decoder accepts only this canonical layout: gaps, overlaps, unaligned or
out-of-order offsets, non-zero padding and trailing bytes are all rejected before any tensor
memory is allocated, so a decoded state never costs more memory than the payload itself.
"""
from __future__ import annotations

import math
import mmap
import struct
import sys
from collections.abc import Mapping
from typing import Any, NamedTuple

import msgpack
import numpy as np
import torch

from octopusd.errors import CodecError

MAGIC = b"OCTT"
VERSION = 1
ALIGN = 64
DEFAULT_MAX_BYTES = 2**34
MAX_NAME_CHARS = 512
MAX_DIMS = 8
MAX_DIM = 2**31  # inclusive upper bound of one dimension
MAX_TENSORS = 2**20

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int8": torch.int8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
_ITEMSIZE: dict[str, int] = {k: torch.empty((), dtype=v).element_size() for k, v in DTYPES.items()}
_PREFIX = struct.Struct("<4sBI")  # magic, version, header length
_NATIVE_LE = sys.byteorder == "little"

#: ``{name: (dtype_str, shape)}`` — what :func:`layout` returns and ``expected`` takes.
Layout = dict[str, tuple[str, tuple[int, ...]]]


class _Entry(NamedTuple):
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int  # relative to the start of the data section
    nbytes: int


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# --------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------


def _check_tensor(name: object, t: object) -> str:
    """Validate one state entry for encoding; return its dtype string."""
    if not isinstance(name, str):
        raise CodecError(f"tensor names must be str, got {type(name).__name__}: {name!r}")
    if len(name) > MAX_NAME_CHARS:
        raise CodecError(f"tensor name {name[:40]!r}... is longer than {MAX_NAME_CHARS} characters")
    if not isinstance(t, torch.Tensor):
        raise CodecError(f"tensor {name!r}: expected a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise CodecError(f"tensor {name!r}: only dense (strided) tensors are supported: {t.layout}")
    dtype = _DTYPE_NAMES.get(t.dtype)
    if dtype is None:
        raise CodecError(
            f"tensor {name!r}: unsupported dtype {t.dtype}; supported: {', '.join(DTYPES)}"
        )
    if t.dim() > MAX_DIMS or any(d > MAX_DIM for d in t.shape):
        raise CodecError(f"tensor {name!r}: shape {tuple(t.shape)} exceeds the codec's limits")
    return dtype


def _plan(state: Mapping[str, torch.Tensor]) -> tuple[list[_Entry], bytes, int, int]:
    """Lay a state out without touching tensor data: (entries, header, data_start, total)."""
    if not isinstance(state, Mapping):
        raise CodecError(f"state must be a mapping of name -> tensor, got {type(state).__name__}")
    if len(state) > MAX_TENSORS:
        raise CodecError(f"state has {len(state)} tensors, over the limit of {MAX_TENSORS}")
    entries: list[_Entry] = []
    end = 0
    for name, t in state.items():
        dtype = _check_tensor(name, t)
        offset = _align(end)
        nbytes = t.numel() * _ITEMSIZE[dtype]
        entries.append(_Entry(name, dtype, tuple(t.shape), offset, nbytes))
        end = offset + nbytes
    header = msgpack.packb(
        {"tensors": [[e.name, e.dtype, list(e.shape), e.offset, e.nbytes] for e in entries]},
        use_bin_type=True,
    )
    data_start = _align(_PREFIX.size + len(header))
    return entries, header, data_start, data_start + _align(end)


def _byteswap_(u8: torch.Tensor, itemsize: int) -> None:
    """Reverse the byte order of each ``itemsize``-byte element of a flat uint8 tensor, in place."""
    if itemsize > 1 and u8.numel():
        rows = u8.view(-1, itemsize)
        rows.copy_(rows.flip(1))


def encoded_size(state: Mapping[str, torch.Tensor]) -> int:
    """Exact length of ``encode_state(state)``, computed without copying any tensor data."""
    return _plan(state)[3]


def layout(state: Mapping[str, torch.Tensor]) -> Layout:
    """``{name: (dtype_str, shape)}`` of a state, in its order; usable as ``expected``."""
    if not isinstance(state, Mapping):
        raise CodecError(f"state must be a mapping of name -> tensor, got {type(state).__name__}")
    return {name: (_check_tensor(name, t), tuple(t.shape)) for name, t in state.items()}


def _copy_in(buf: bytearray, entries: list[_Entry], tensors: Any, data_start: int) -> None:
    """Copy each tensor's bytes once into its slot of ``buf`` (the view dies with this frame)."""
    dst = torch.frombuffer(buf, dtype=torch.uint8)
    for entry, t in zip(entries, tensors):
        if not entry.nbytes:
            continue
        src = t.detach().to("cpu").resolve_conj().resolve_neg().contiguous()
        start = data_start + entry.offset
        chunk = dst[start : start + entry.nbytes]
        chunk.copy_(src.reshape(-1).view(torch.uint8))
        if not _NATIVE_LE:
            _byteswap_(chunk, _ITEMSIZE[entry.dtype])


def encode_state(state: Mapping[str, torch.Tensor]) -> bytearray:
    """Encode a ``{name: tensor}`` state; returns a freshly allocated ``bytearray``.

    Tensors are detached, moved to CPU and made contiguous; each one's bytes are copied exactly
    once, straight into the final buffer. Raises :class:`CodecError` for unsupported input.
    """
    entries, header, data_start, total = _plan(state)
    buf = bytearray(total)  # zero-filled: all padding is already in place
    buf[: _PREFIX.size] = _PREFIX.pack(MAGIC, VERSION, len(header))
    buf[_PREFIX.size : _PREFIX.size + len(header)] = header
    _copy_in(buf, entries, state.values(), data_start)
    return buf


def encode_segments(state: Mapping[str, torch.Tensor]) -> tuple[int, list[memoryview]]:
    """The encoding of ``state`` as buffers whose concatenation equals ``encode_state(state)``.

    A streamed encode: the prefix, header and padding are small new buffers, and each tensor's
    bytes are a view of the tensor's own memory (CPU, contiguous, little-endian hosts; anything
    else is converted once), so a model is uploaded and hashed without ever being copied into a
    payload. The views keep their tensors alive; the caller must not modify the tensors while
    the segments are in use. Returns ``(total length, segments)``.
    """
    entries, header, data_start, total = _plan(state)
    head = bytearray(data_start)
    head[: _PREFIX.size] = _PREFIX.pack(MAGIC, VERSION, len(header))
    head[_PREFIX.size : _PREFIX.size + len(header)] = header
    segments = [memoryview(head)]
    end = 0
    for entry, t in zip(entries, state.values()):
        if entry.offset > end:
            segments.append(memoryview(bytes(entry.offset - end)))
        if entry.nbytes:
            src = t.detach().to("cpu").resolve_conj().resolve_neg().contiguous().reshape(-1).view(torch.uint8)
            if not _NATIVE_LE:
                src = src.clone()
                _byteswap_(src, _ITEMSIZE[entry.dtype])
            segments.append(memoryview(src.numpy()))  # the array keeps the tensor alive
        end = entry.offset + entry.nbytes
    if data_start + end < total:
        segments.append(memoryview(bytes(total - data_start - end)))
    return total, segments


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


def _reject_ext(code: int, data: bytes) -> Any:
    raise CodecError(f"msgpack extension type {code} is not allowed in a tensor header")


def _as_view(data: object) -> memoryview:
    if not isinstance(data, (bytes, bytearray, memoryview, mmap.mmap)):
        raise CodecError(f"expected bytes, bytearray, memoryview or mmap, got {type(data).__name__}")
    mv = memoryview(data)
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")  # raises TypeError for non-contiguous views
    return mv


def _check_magic(mv: memoryview) -> None:
    head = bytes(mv[: len(MAGIC)])
    if head == MAGIC:
        return
    if not head:
        raise CodecError("empty payload")
    if len(head) < len(MAGIC) and MAGIC.startswith(head):
        raise CodecError(f"truncated payload: {len(head)} bytes")
    if head[:1] == b"\x80":
        kind = "looks like a Python pickle, which is never loaded"
    elif head == b"PK\x03\x04":
        kind = "looks like a zip archive such as torch.save output; torch.load is never used"
    else:
        kind = f"starts with {head!r}"
    raise CodecError(f"unknown payload format ({kind}); expected magic {MAGIC!r}")


def _unpack_header(raw: memoryview) -> list[Any]:
    try:
        header = msgpack.unpackb(
            raw, raw=False, strict_map_key=True, use_list=True, ext_hook=_reject_ext,
            max_str_len=4 * MAX_NAME_CHARS, max_bin_len=0, max_ext_len=0,
            max_array_len=MAX_TENSORS, max_map_len=4,
        )
    except CodecError:
        raise
    except Exception as exc:
        raise CodecError(f"header is not valid msgpack: {type(exc).__name__}: {exc}") from exc
    if not isinstance(header, dict):
        raise CodecError(f"header must be a msgpack map, got {type(header).__name__}")
    if list(header) != ["tensors"]:
        keys = sorted(map(repr, header))
        raise CodecError(f"header keys must be exactly ['tensors'], got {keys}")
    tensors = header["tensors"]
    if not isinstance(tensors, list):
        raise CodecError(f"header 'tensors' must be a list, got {type(tensors).__name__}")
    return tensors


def _parse_entry(i: int, item: object) -> _Entry:
    """Type-check one header entry (its place in the layout is checked by ``_check_layout``)."""
    if not isinstance(item, list) or len(item) != 5:
        raise CodecError(f"header entry #{i}: expected [name, dtype, shape, offset, nbytes]")
    name, dtype, shape, offset, nbytes = item
    if not isinstance(name, str) or len(name) > MAX_NAME_CHARS:
        raise CodecError(f"header entry #{i}: name must be a str of at most {MAX_NAME_CHARS} chars")
    where = f"tensor {name!r}"
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise CodecError(f"{where}: unknown dtype {dtype!r}; supported: {', '.join(DTYPES)}")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS:
        raise CodecError(f"{where}: shape must be a list of at most {MAX_DIMS} dims, got {shape!r}")
    if not all(_is_int(d) and 0 <= d <= MAX_DIM for d in shape):
        raise CodecError(f"{where}: shape dims must be ints in [0, {MAX_DIM}], got {shape!r}")
    if math.prod(max(d, 1) for d in shape) >= 2**63:  # torch computes strides in int64
        raise CodecError(f"{where}: shape {shape!r} is too large to allocate")
    if not _is_int(offset) or offset < 0 or offset % ALIGN:
        raise CodecError(f"{where}: offset {offset!r} is not a {ALIGN}-byte aligned int >= 0")
    want = math.prod(shape) * _ITEMSIZE[dtype]
    if not _is_int(nbytes) or nbytes != want:
        raise CodecError(f"{where}: nbytes {nbytes!r} != {want} (shape {shape} of {dtype})")
    return _Entry(name, dtype, tuple(shape), offset, nbytes)


def _check_layout(entries: list[_Entry]) -> int:
    """Check names are unique and buffers canonically placed; return the data section's end."""
    seen: set[str] = set()
    end = 0
    for e in entries:
        if e.name in seen:
            raise CodecError(f"duplicate tensor name {e.name!r}")
        seen.add(e.name)
        if e.offset < end:
            raise CodecError(
                f"tensor {e.name!r}: offset {e.offset} overlaps the previous buffer (ends at {end})"
            )
        if e.offset != _align(end):
            raise CodecError(
                f"tensor {e.name!r}: offset {e.offset} leaves a gap; expected {_align(end)}"
            )
        end = e.offset + e.nbytes
    return _align(end)


def _check_padding(mv: memoryview, entries: list[_Entry], header_end: int, data_start: int) -> None:
    gaps = [(header_end, data_start)]
    end = data_start
    for e in entries:
        gaps.append((end, data_start + e.offset))
        end = data_start + e.offset + e.nbytes
    gaps.append((end, len(mv)))
    for a, b in gaps:
        if b > a and any(mv[a:b]):
            raise CodecError(f"non-zero padding bytes in [{a}, {b})")


def _parse(mv: memoryview, max_bytes: int) -> tuple[list[_Entry], int]:
    """Validate everything but the tensor values; return (entries, data_start)."""
    n = len(mv)
    if n > max_bytes:
        raise CodecError(f"payload is {n} bytes, over the limit of {max_bytes}")
    _check_magic(mv)
    if n < _PREFIX.size:
        raise CodecError(f"truncated payload: {n} bytes, the fixed prefix alone is {_PREFIX.size}")
    _, version, header_len = _PREFIX.unpack_from(mv)
    if version != VERSION:
        raise CodecError(f"unsupported codec version {version} (this build reads {VERSION})")
    header_end = _PREFIX.size + header_len
    if header_end > n:
        raise CodecError(f"truncated payload: header of {header_len} bytes runs past its {n} bytes")
    items = _unpack_header(mv[_PREFIX.size : header_end])
    entries = [_parse_entry(i, item) for i, item in enumerate(items)]
    data_start = _align(header_end)
    total = data_start + _check_layout(entries)
    if n < total:
        raise CodecError(f"truncated payload: {n} bytes, its header describes {total}")
    if n > total:
        raise CodecError(f"{n - total} bytes of trailing garbage after the last tensor")
    _check_padding(mv, entries, header_end, data_start)
    return entries, data_start


def _check_expected(entries: list[_Entry], expected: Mapping[str, tuple[Any, Any]]) -> None:
    got = {e.name: e for e in entries}
    want = {}
    for name, (dtype, shape) in expected.items():
        dtype = _DTYPE_NAMES.get(dtype, dtype) if isinstance(dtype, torch.dtype) else dtype
        want[name] = (dtype, tuple(int(d) for d in shape))
    missing = [n for n in want if n not in got]
    if missing:
        first, count = missing[0], len(missing)
        raise CodecError(f"layout mismatch: tensor {first!r} is missing ({count} in all)")
    extra = [n for n in got if n not in want]
    if extra:
        raise CodecError(f"layout mismatch: unexpected tensor {extra[0]!r} ({len(extra)} in all)")
    for e in entries:
        dtype, shape = want[e.name]
        where = f"layout mismatch: tensor {e.name!r} has"
        if e.dtype != dtype:
            raise CodecError(f"{where} dtype {e.dtype}, expected {dtype}")
        if e.shape != shape:
            raise CodecError(f"{where} shape {list(e.shape)}, expected {list(shape)}")


def _materialize(mv: memoryview, entries: list[_Entry], data_start: int) -> dict[str, torch.Tensor]:
    """Copy each validated buffer once into a freshly allocated tensor."""
    src = np.frombuffer(mv, dtype=np.uint8)
    out: dict[str, torch.Tensor] = {}
    for e in entries:
        t = torch.empty(e.shape, dtype=DTYPES[e.dtype])
        if e.nbytes:
            start = data_start + e.offset
            chunk = src[start : start + e.nbytes]
            if e.dtype == "bool" and chunk.max() > 1:
                raise CodecError(f"tensor {e.name!r}: bool bytes must be 0 or 1")
            flat = t.reshape(-1).view(torch.uint8)
            flat.numpy()[:] = chunk
            if not _NATIVE_LE:
                _byteswap_(flat, _ITEMSIZE[e.dtype])
        out[e.name] = t
    return out


def _views(mv: memoryview, entries: list[_Entry], data_start: int) -> dict[str, torch.Tensor]:
    """Tensors that share the (writable, little-endian) payload's memory: no copy at all."""
    out: dict[str, torch.Tensor] = {}
    for e in entries:
        dtype = DTYPES[e.dtype]
        if not e.nbytes:
            out[e.name] = torch.empty(e.shape, dtype=dtype)
            continue
        start = data_start + e.offset
        if e.dtype == "bool" and np.frombuffer(mv, np.uint8, e.nbytes, start).max() > 1:
            raise CodecError(f"tensor {e.name!r}: bool bytes must be 0 or 1")
        flat = torch.frombuffer(mv, dtype=torch.uint8, count=e.nbytes, offset=start)
        out[e.name] = flat.view(dtype).view(e.shape)
    return out


def _check_finite(state: Mapping[str, torch.Tensor]) -> None:
    for name, t in state.items():
        if t.is_floating_point() and t.numel():
            # A NaN or infinity makes the sum non-finite, so a finite sum proves the tensor
            # finite in one fast pass; only a non-finite sum (or an overflow) needs the count.
            if bool(torch.isfinite(t.sum())):
                continue
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                raise CodecError(f"tensor {name!r} has {bad} non-finite value(s)")


def decode_state(
    data: bytes | bytearray | memoryview,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    expected: Mapping[str, tuple[str, tuple[int, ...]]] | None = None,
    check_finite: bool = False,
    copy: bool = True,
) -> dict[str, torch.Tensor]:
    """Decode a payload made by :func:`encode_state` into a new ``{name: tensor}`` dict.

    Everything (size limit, magic, version, header, layout, and ``expected`` when given) is
    validated before any tensor memory is allocated. The returned tensors are writable, own
    their memory (the input may be reused or freed) and keep the encoded order. With
    ``check_finite`` a NaN or infinity in a floating-point tensor is rejected. Every failure
    raises :class:`CodecError`, whatever the input.

    With ``copy=False`` and a writable input (a ``bytearray``, say) on a little-endian host, the
    tensors are views into ``data`` instead: no copy and no extra memory, but they alias the
    buffer, which must then stay alive and unmodified while they are in use. A read-only input
    (``bytes``) is copied as with ``copy=True``.
    """
    try:
        mv = _as_view(data)
        entries, data_start = _parse(mv, max_bytes)
        if expected is not None:
            _check_expected(entries, expected)
        if copy or mv.readonly or not _NATIVE_LE:
            state = _materialize(mv, entries, data_start)
        else:
            state = _views(mv, entries, data_start)
        if check_finite:
            _check_finite(state)
        return state
    except CodecError:
        raise
    except Exception as exc:  # defence in depth: nothing else may escape a decoder
        raise CodecError(f"malformed tensor payload: {type(exc).__name__}: {exc}") from exc
