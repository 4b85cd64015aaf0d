"""The local channel between a silo master and rank 0 of its trainer group.

A Unix stream socket (a filesystem path, so it also reaches rank 0 inside a network namespace on
the master node) carrying frames: ``b"OCTF"`` + u32 header length + u64 blob length + a msgpack
header map + an optional blob (a tensor-codec payload). Nothing here is pickled.

Ops: trainer → master ``hello`` {world_size, num_samples, pid}; master → trainer ``train``
{round} + global model blob; trainer → master ``result`` {round, num_samples, train_loss,
train_seconds} + model blob, or ``error`` {round, message}; master → trainer ``stop``.

Blobs of ``SHARE_MIN`` bytes and more do not go through the socket: they travel in a memfd (an
anonymous in-memory file) whose descriptor is passed with the header (``SCM_RIGHTS``), and the
receiver maps it. The header then says ``"shm": <size>`` and the frame's blob length is 0. A
40 MB model costs the sender one copy into the memfd (none when the silo master downloaded the
global straight into one, see :meth:`SharedMemory.alloc`) and the receiver none, where the socket cost
two copies and a few dozen wake-ups of both processes. The descriptor dies with the last
mapping, so nothing is left behind however a process ends.
"""
from __future__ import annotations

import asyncio
import mmap
import os
import socket
import struct
from typing import Any, Callable

import msgpack

from octopusd.errors import WireError

MAGIC = b"OCTF"
_HEAD = struct.Struct("<4sIQ")
MAX_HEADER = 1 << 20
MAX_BLOB = 1 << 36


Blob = "bytes | bytearray | memoryview | list[memoryview]"


def _share_min() -> int:
    """OCTOPUSD_SHM_MIN_BYTES, or 1 MiB (octopusd.config refuses a bad value with exit 78)."""
    raw = os.environ.get("OCTOPUSD_SHM_MIN_BYTES", "")
    return int(raw) if raw.isdigit() and int(raw) >= 1 else 1 << 20


#: Blobs of at least this many bytes go by shared memory (env OCTOPUSD_SHM_MIN_BYTES; 1 MiB).
SHARE_MIN = _share_min()
_CMSG_FD = socket.CMSG_SPACE(4 * struct.calcsize("i"))  # room to see (and refuse) extras


def shared_memory_available() -> bool:
    return hasattr(os, "memfd_create") and hasattr(socket, "SCM_RIGHTS")


class SharedBlob(mmap.mmap):
    """A payload in a memfd, mapped into this process; sent over the channel by descriptor."""

    fd = -1  # the memfd while this process may still send it; -1 for a received blob

    @classmethod
    def create(cls, size: int) -> SharedBlob:
        fd = os.memfd_create("octopusd-payload", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            blob = cls(fd, size)
        except BaseException:
            os.close(fd)
            raise
        blob.fd = fd
        return blob

    def __del__(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    @classmethod
    def receive(cls, fd: int, size: int, *, private: bool = True) -> SharedBlob:
        """Map a received memfd (and close the descriptor): copy-on-write by default, writable
        either way, as zero-copy decoding needs."""
        try:
            actual = os.fstat(fd).st_size
            if actual != size:
                raise WireError(f"local channel: shared payload is {actual} bytes, header says {size}")
            return cls(fd, size, flags=mmap.MAP_PRIVATE if private else mmap.MAP_SHARED,
                       prot=mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)


class SharedMemory:
    """One end's shared buffers, reused round after round.

    Fresh memory costs a page fault per 4 KiB page on first touch: for a 40 MB model that is
    ~10,000 faults, more time than the copy itself. So each end keeps the memfd it sends from
    (``outgoing``: the silo master downloads the global model into it; rank 0 writes its result
    into it) and the mapping of the one it last received (``incoming``, keyed by the memfd's
    inode). Reuse is safe by the protocol: a buffer is only written for round r + 1 after the
    other end has replied for round r, and neither end reads the previous round's buffer after
    its reply (the silo master uploads its update before it fetches the next global model).
    Received mappings are shared (not copy-on-write): a receiver must treat them as read-only.
    """

    def __init__(self) -> None:
        self._out: SharedBlob | None = None
        self._in: dict[tuple[int, int], SharedBlob] = {}

    def outgoing(self, size: int) -> SharedBlob:
        if self._out is None or len(self._out) != size:
            self._out = None  # drop the old buffer before making its successor
            self._out = SharedBlob.create(size)
        return self._out

    def alloc(self, size: int) -> bytearray | SharedBlob:
        """A writable buffer for a payload this end will send: the reused shared one when large."""
        if size >= SHARE_MIN and shared_memory_available():
            return self.outgoing(size)
        return bytearray(size)

    def incoming(self, fd: int, size: int) -> SharedBlob:
        try:
            st = os.fstat(fd)
        except OSError:
            os.close(fd)
            raise
        key = (st.st_dev, st.st_ino)
        blob = self._in.get(key)
        if blob is not None and len(blob) == size == st.st_size:
            os.close(fd)
            return blob
        self._in.clear()
        blob = SharedBlob.receive(fd, size, private=False)
        self._in[key] = blob
        return blob

    def forget_incoming(self) -> None:
        """The other end is gone (a relaunched group): its buffers are no longer ours to map."""
        self._in.clear()


def _nbytes(p: Any) -> int:
    return len(p) if isinstance(p, mmap.mmap) else memoryview(p).nbytes


def _pwrite_all(fd: int, parts: list[Any]) -> None:
    """Write ``parts`` back to back from offset 0 (through the page cache: no page faults here)."""
    pos = 0
    for p in parts:
        view = memoryview(p).cast("B")
        done = 0
        while done < len(view):
            done += os.pwrite(fd, view[done:done + (1 << 30)], pos + done)
        pos += len(view)


def _shared(blob: Any, shm: SharedMemory | None) -> SharedBlob | None:
    """The blob as a SharedBlob (copied into one when large), or None: it goes inline."""
    if isinstance(blob, SharedBlob) and blob.fd >= 0:
        return blob
    parts = list(blob) if isinstance(blob, list) else [blob]
    size = sum(_nbytes(p) for p in parts)
    if size < SHARE_MIN or not shared_memory_available():
        return None
    out = shm.outgoing(size) if shm is not None else SharedBlob.create(size)
    _pwrite_all(out.fd, parts)
    return out


def _pack(header: dict[str, Any], blob: Any = b"",
          shm: SharedMemory | None = None) -> tuple[list[Any], SharedBlob | None]:
    """The frame's buffers (a list blob, ``codec.encode_segments``, segment by segment), or the
    head and header plus the shared blob whose descriptor goes with them."""
    shared = _shared(blob, shm)
    if shared is not None:
        header = {**header, "shm": len(shared)}
        parts: list[Any] = []
    else:
        parts = list(blob) if isinstance(blob, list) else [blob]
    h = msgpack.packb(header, use_bin_type=True)
    return [_HEAD.pack(MAGIC, len(h), sum(_nbytes(p) for p in parts)) + h, *parts], shared


def _take_fds(ancdata: list[tuple[int, int, bytes]], into: list[int]) -> None:
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            n = len(data) // struct.calcsize("i")
            into.extend(struct.unpack(f"{n}i", data[:n * struct.calcsize("i")]))


def _blob_of(header: dict[str, Any], fds: list[int], inline: bytearray, shm: SharedMemory | None) -> Any:
    """The frame's blob: a received shared one when the header says so; stray descriptors closed."""
    want = header.get("shm")
    try:
        if want is None:
            return inline
        if not isinstance(want, int) or not 0 < want <= MAX_BLOB or len(fds) != 1:
            raise WireError("local channel: bad shared payload")
        fd = fds.pop()
        return shm.incoming(fd, want) if shm is not None else SharedBlob.receive(fd, want)
    finally:
        for fd in fds:
            os.close(fd)


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


async def _wait(sock: socket.socket, add: Callable[..., Any], remove: Callable[[int], Any]) -> None:
    fut = asyncio.get_running_loop().create_future()
    add(sock.fileno(), lambda: fut.done() or fut.set_result(None))
    try:
        await fut
    finally:
        remove(sock.fileno())


async def send_frame(sock: socket.socket, header: dict[str, Any], blob: Any = b"",
                     shm: SharedMemory | None = None) -> None:
    loop = asyncio.get_running_loop()
    parts, shared = _pack(header, blob, shm)
    first = memoryview(parts[0])
    if shared is not None:  # the descriptor rides with the first byte of the frame
        while True:
            try:
                sent = sock.sendmsg([first], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                               struct.pack("i", shared.fd))])
                break
            except (BlockingIOError, InterruptedError):
                await _wait(sock, loop.add_writer, loop.remove_writer)
        first = first[sent:]
    for part in [first, *parts[1:]]:
        if _nbytes(part):
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


async def _recvmsg_exact_async(sock: socket.socket, n: int, fds: list[int]) -> bytes:
    """``n`` bytes, collecting any descriptors that come with them."""
    loop = asyncio.get_running_loop()
    out = bytearray()
    while len(out) < n:
        try:
            data, anc, _, _ = sock.recvmsg(n - len(out), _CMSG_FD)
        except (BlockingIOError, InterruptedError):
            await _wait(sock, loop.add_reader, loop.remove_reader)
            continue
        _take_fds(anc, fds)
        if not data:
            raise ConnectionError("local channel closed by the trainer")
        out += data
    return bytes(out)


async def read_frame(sock: socket.socket, shm: SharedMemory | None = None) -> tuple[dict[str, Any], Any]:
    """The next frame's header and blob (a bytearray, or a :class:`SharedBlob`)."""
    fds: list[int] = []
    try:
        hlen, blen = _unpack_head(await _recvmsg_exact_async(sock, _HEAD.size, fds))
        header = _decode_header(await _recvmsg_exact_async(sock, hlen, fds))
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    blob = await _recv_exact_async(sock, blen) if blen else bytearray()
    return header, _blob_of(header, fds, blob, shm)


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


def send_frame_sync(sock: socket.socket, header: dict[str, Any], blob: Any = b"",
                    shm: SharedMemory | None = None) -> None:
    parts, shared = _pack(header, blob, shm)
    first = memoryview(parts[0])
    if shared is not None:
        sent = sock.sendmsg([first], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", shared.fd))])
        first = first[sent:]
    for part in [first, *parts[1:]]:
        if _nbytes(part):
            sock.sendall(part)


def _recvmsg_exact(sock: socket.socket, n: int, fds: list[int]) -> bytes:
    out = bytearray()
    while len(out) < n:
        data, anc, _, _ = sock.recvmsg(n - len(out), _CMSG_FD)
        _take_fds(anc, fds)
        if not data:
            raise ConnectionError("local channel closed by the silo master")
        out += data
    return bytes(out)


def read_frame_sync(sock: socket.socket, shm: SharedMemory | None = None) -> tuple[dict[str, Any], Any]:
    fds: list[int] = []
    try:
        hlen, blen = _unpack_head(_recvmsg_exact(sock, _HEAD.size, fds))
        header = _decode_header(_recvmsg_exact(sock, hlen, fds))
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    blob = _recv_exact(sock, blen) if blen else bytearray()
    return header, _blob_of(header, fds, blob, shm)
