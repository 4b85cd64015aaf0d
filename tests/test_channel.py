"""The silo master <-> rank 0 channel: small blobs inline, large ones by memfd descriptor, in
both directions and between the blocking and asyncio ends; no descriptor leaks; bad frames refused."""
from __future__ import annotations

import asyncio
import os
import socket
import struct

import pytest
import torch

from octopusd import codec
from octopusd.errors import WireError
from octopusd.trainer import channel

pytestmark = pytest.mark.skipif(not channel.shared_memory_available(), reason="needs memfd and SCM_RIGHTS")


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _state(n: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(n)
    return {"w": torch.randn(n, generator=g), "b": torch.randn(7, generator=g)}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("n", [1000, 600_000], ids=["inline", "shared"])
def test_frames_round_trip_between_the_async_and_blocking_ends(n):
    """Master (asyncio) sends a global, rank 0 (blocking) decodes it without a copy and answers
    with segments; large blobs arrive as SharedBlobs, small ones as bytearrays; no fd leaks."""
    state = _state(n)
    payload = codec.encode_state(state)
    shared = len(payload) >= channel.SHARE_MIN
    before = _open_fds()

    async def go() -> None:
        a, b = socket.socketpair()
        channel.tune(a)
        with a, b:
            loop = asyncio.get_running_loop()
            await channel.send_frame(a, {"op": "train", "round": 2}, payload)
            header, blob = await loop.run_in_executor(None, channel.read_frame_sync, b)
            assert header == ({"op": "train", "round": 2, "shm": len(payload)} if shared
                              else {"op": "train", "round": 2})
            assert isinstance(blob, channel.SharedBlob) == shared and bytes(blob) == bytes(payload)
            got = codec.decode_state(blob, expected=codec.layout(state), copy=False)
            base = torch.frombuffer(blob, dtype=torch.uint8).data_ptr()
            assert base <= got["w"].data_ptr() < base + len(blob)  # a view of the mapping
            got["w"].add_(1.0)  # copy-on-write: the sender's memfd is untouched
            del got, base
            _, segments = codec.encode_segments(state)
            await loop.run_in_executor(None, channel.send_frame_sync, b, {"op": "result", "round": 2}, segments)
            header, back = await channel.read_frame(a)
            assert header["op"] == "result" and bytes(back) == bytes(payload)
            assert isinstance(back, channel.SharedBlob) == shared
            del blob, back
    asyncio.run(go())
    assert _open_fds() == before


@pytest.mark.timeout(30)
def test_a_download_buffer_from_alloc_is_sent_without_a_copy():
    """SharedMemory.alloc gives a SharedBlob for large payloads; sending it passes its own memfd."""
    buf = channel.SharedMemory().alloc(channel.SHARE_MIN)
    assert isinstance(buf, channel.SharedBlob)
    buf[:5] = b"hello"
    assert isinstance(channel.SharedMemory().alloc(100), bytearray)
    a, b = socket.socketpair()
    with a, b:
        channel.send_frame_sync(a, {"op": "train", "round": 0}, buf)
        _, got = channel.read_frame_sync(b)
    assert got[:5] == b"hello" and len(got) == len(buf)
    buf[:5] = b"HELLO"  # the same memory: a shared mapping of one memfd
    assert got[:5] == b"HELLO"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("case", ["no-descriptor", "wrong-size", "two-descriptors", "bad-size-field"])
def test_bad_shared_frames_are_refused_and_their_descriptors_closed(case):
    before = _open_fds()
    import msgpack
    size = 4096
    header = {"op": "train", "round": 0, "shm": size if case != "bad-size-field" else "big"}
    h = msgpack.packb(header, use_bin_type=True)
    frame = struct.pack("<4sIQ", b"OCTF", len(h), 0) + h
    fds = []
    for _ in range(2 if case == "two-descriptors" else 0 if case == "no-descriptor" else 1):
        fd = os.memfd_create("t")
        os.ftruncate(fd, size + (1 if case == "wrong-size" else 0))
        fds.append(fd)
    a, b = socket.socketpair()
    with a, b:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))] if fds else []
        a.sendmsg([frame], anc)
        for fd in fds:
            os.close(fd)
        with pytest.raises(WireError):
            channel.read_frame_sync(b)
    assert _open_fds() == before


@pytest.mark.timeout(30)
def test_buffers_are_reused_round_after_round():
    """With SharedMemory on both ends, round after round goes through the same two memfds: the
    sender's outgoing buffer is rewritten in place and the receiver maps it once."""
    a, b = socket.socketpair()
    master, trainer = channel.SharedMemory(), channel.SharedMemory()
    seen_master, seen_trainer = set(), set()
    fds = []
    with a, b:
        for r in range(4):
            state = {"w": torch.full((300_000,), float(r))}
            buf = master.alloc(codec.encoded_size(state))  # the master "downloads" into it
            buf[:] = bytes(codec.encode_state(state))
            channel.send_frame_sync(a, {"op": "train", "round": r}, buf, master)
            _, got = channel.read_frame_sync(b, trainer)
            assert torch.equal(codec.decode_state(got)["w"], state["w"])
            seen_trainer.add(id(got))
            _, segments = codec.encode_segments({"w": state["w"] + 1})
            channel.send_frame_sync(b, {"op": "result", "round": r}, segments, trainer)
            _, back = channel.read_frame_sync(a, master)
            assert torch.equal(codec.decode_state(back)["w"], state["w"] + 1)
            seen_master.add(id(back))
            del got, back
            fds.append(_open_fds())
    assert len(seen_master) == len(seen_trainer) == 1
    assert fds[1:] == fds[:-1]  # no new descriptors after the first round
