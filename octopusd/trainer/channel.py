"""The local channel between a silo master and rank 0 of its trainer group.

A Unix stream socket (a filesystem path, so it also reaches rank 0 inside a network namespace on
the master node) carrying frames: ``b"OCTF"`` + u32 header length + u64 blob length + a msgpack
header map + an optional blob (a tensor-codec payload). Nothing here is pickled.

Ops: trainer → master ``hello`` {world_size, num_samples, pid}; master → trainer ``train``
{round} + global model blob; trainer → master ``result`` {round, num_samples, train_loss,
train_seconds} + model blob, or ``error`` {round, message}; master → trainer ``stop``.
"""
from __future__ import annotations

import asyncio
import socket
import struct
from typing import Any

import msgpack

from octopusd.errors import WireError

MAGIC = b"OCTF"
_HEAD = struct.Struct("<4sIQ")
MAX_HEADER = 1 << 20
MAX_BLOB = 1 << 36


def _pack(header: dict[str, Any], blob: bytes | bytearray | memoryview = b"") -> list[bytes | bytearray | memoryview]:
    h = msgpack.packb(header, use_bin_type=True)
    return [_HEAD.pack(MAGIC, len(h), len(blob)), h, blob]


def _unpack_head(raw: bytes) -> tuple[int, int]:
    magic, hlen, blen = _HEAD.unpack(raw)
    if magic != MAGIC or hlen > MAX_HEADER or blen > MAX_BLOB:
        raise WireError("local channel: bad frame header")
    return hlen, blen


def _decode_header(raw: bytes) -> dict[str, Any]:
    try:
        header = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as exc:
        raise WireError(f"local channel: bad frame: {exc}") from exc
    if not isinstance(header, dict) or not isinstance(header.get("op"), str):
        raise WireError("local channel: frame without op")
    return header


# -- asyncio side (silo master) ----------------------------------------------------------------
async def send_frame(writer: asyncio.StreamWriter, header: dict[str, Any],
                     blob: bytes | bytearray | memoryview = b"") -> None:
    writer.writelines(_pack(header, blob))
    await writer.drain()


async def read_frame(reader: asyncio.StreamReader) -> tuple[dict[str, Any], bytes]:
    hlen, blen = _unpack_head(await reader.readexactly(_HEAD.size))
    header = _decode_header(await reader.readexactly(hlen))
    blob = await reader.readexactly(blen) if blen else b""
    return header, blob


# -- blocking side (trainer rank 0) ------------------------------------------------------------
def _recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionError("local channel closed by the silo master")
        got += k
    return buf


def send_frame_sync(sock: socket.socket, header: dict[str, Any],
                    blob: bytes | bytearray | memoryview = b"") -> None:
    for part in _pack(header, blob):
        sock.sendall(part)


def read_frame_sync(sock: socket.socket) -> tuple[dict[str, Any], bytearray]:
    hlen, blen = _unpack_head(bytes(_recv_exact(sock, _HEAD.size)))
    header = _decode_header(bytes(_recv_exact(sock, hlen)))
    blob = _recv_exact(sock, blen) if blen else bytearray()
    return header, blob
