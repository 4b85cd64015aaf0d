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


Blob = "bytes | bytearray | memoryview | list[memoryview]"


def _pack(header: dict[str, Any], blob: Any = b"") -> list[bytes | bytearray | memoryview]:
    """The frame's buffers; a list blob (``codec.encode_segments``) is sent segment by segment."""
    h = msgpack.packb(header, use_bin_type=True)
    parts = list(blob) if isinstance(blob, list) else [blob]
    return [_HEAD.pack(MAGIC, len(h), sum(len(memoryview(p).cast("B")) for p in parts)), h, *parts]


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
# Raw non-blocking socket calls, not asyncio streams: a 40 MB model through a StreamReader is
# ~160 wake-ups and three copies each way; sock_sendall sends straight from the caller's buffer
# and sock_recv_into fills one preallocated buffer.
SOCKET_BUFFER = 4 << 20


def set_buffers(sock: socket.socket) -> None:
    """Large kernel buffers: fewer system calls and wake-ups per model, on both ends."""
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
        except OSError:
            pass


def tune(sock: socket.socket) -> None:
    """The silo master's end: non-blocking, large buffers."""
    sock.setblocking(False)
    set_buffers(sock)


async def send_frame(sock: socket.socket, header: dict[str, Any], blob: Any = b"") -> None:
    loop = asyncio.get_running_loop()
    for part in _pack(header, blob):
        if len(part):
            await loop.sock_sendall(sock, part)


async def _recv_exact_async(sock: socket.socket, n: int) -> bytearray:
    loop = asyncio.get_running_loop()
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = await loop.sock_recv_into(sock, view[got:])
        if k == 0:
            raise ConnectionError("local channel closed by the trainer")
        got += k
    return buf


async def read_frame(sock: socket.socket) -> tuple[dict[str, Any], bytearray]:
    hlen, blen = _unpack_head(bytes(await _recv_exact_async(sock, _HEAD.size)))
    header = _decode_header(bytes(await _recv_exact_async(sock, hlen)))
    blob = await _recv_exact_async(sock, blen) if blen else bytearray()
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


def send_frame_sync(sock: socket.socket, header: dict[str, Any], blob: Any = b"") -> None:
    for part in _pack(header, blob):
        sock.sendall(part)


def read_frame_sync(sock: socket.socket) -> tuple[dict[str, Any], bytearray]:
    hlen, blen = _unpack_head(bytes(_recv_exact(sock, _HEAD.size)))
    header = _decode_header(bytes(_recv_exact(sock, hlen)))
    blob = _recv_exact(sock, blen) if blen else bytearray()
    return header, blob
