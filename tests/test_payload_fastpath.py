"""The payload fast path: zero-copy decode, hashing while streaming from S3, finite-value checks."""
from __future__ import annotations

import asyncio
import hashlib

import pytest
import torch

from octopusd import codec
from octopusd.config import S3Config
from octopusd.envelope import PayloadRef
from octopusd.errors import CodecError, PayloadError
from octopusd.payload import decode_payload, fetch_payload, publish_payload
from octopusd.transport.s3 import PayloadStore


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(300, 200, generator=g), "b": torch.randn(300, generator=g),
            "steps": torch.tensor(7), "mask": torch.tensor([True, False]),
            "h": torch.randn(5, generator=g).half(), "empty": torch.zeros(0, 3)}


def test_views_alias_a_writable_buffer_and_equal_the_copying_decode():
    """copy=False on a bytearray gives tensors that share its memory and equal copy=True's."""
    state = _state()
    buf = codec.encode_state(state)
    views = codec.decode_state(buf, expected=codec.layout(state), check_finite=True, copy=False)
    copies = codec.decode_state(bytes(buf))
    for name in state:
        assert views[name].dtype == state[name].dtype and torch.equal(views[name], copies[name])
    base = torch.frombuffer(buf, dtype=torch.uint8).data_ptr()
    assert base <= views["w"].data_ptr() < base + len(buf)


def test_views_of_read_only_bytes_are_copies():
    """A read-only input is copied even with copy=False, so tensors stay safely writable."""
    data = bytes(codec.encode_state(_state()))
    out = codec.decode_state(data, copy=False)
    out["w"].add_(1.0)  # would corrupt an immutable bytes object if it aliased it
    assert torch.equal(codec.decode_state(data)["w"] + 1.0, out["w"])


@pytest.mark.parametrize("copy", [True, False])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_values_are_rejected(copy, bad):
    state = _state()
    state["w"][17, 3] = bad
    with pytest.raises(CodecError, match="non-finite"):
        codec.decode_state(codec.encode_state(state), check_finite=True, copy=copy)


def test_huge_finite_values_whose_sum_overflows_are_accepted():
    """The one-pass finite check falls back to counting when only the sum overflowed."""
    state = {"w": torch.full((1000,), 3e38)}
    out = codec.decode_state(codec.encode_state(state), check_finite=True, copy=False)
    assert torch.equal(out["w"], state["w"])


def test_bad_bool_bytes_are_rejected_without_copying():
    buf = codec.encode_state({"m": torch.tensor([True, False, True])})
    buf[-64] = 7  # the bool tensor's first byte (a single buffer at the end, padded to 64)
    with pytest.raises(CodecError, match="bool"):
        codec.decode_state(buf, copy=False)


def test_s3_round_trip_is_hashed_while_streaming_and_decodes_without_copy(moto_s3):
    """publish_payload + fetch_payload through a real S3 endpoint: the digest matches
    hashlib's, the bytes come back writable, and a swapped object is refused."""
    cfg = S3Config(bucket="fastpath-test", access_key="testing", secret_key="testing",
                   endpoint_url=moto_s3.endpoint_url)
    state = _state()
    data = codec.encode_state(state)

    async def go() -> None:
        async with PayloadStore(cfg) as store:
            await store.ensure_bucket()
            ref = await publish_payload(store, "fastpath/obj.octt", data, inline_max=0)
            assert ref.key and ref.sha256 == hashlib.sha256(data).hexdigest()
            got = await fetch_payload(store, ref, max_bytes=2**30)
            assert isinstance(got, bytearray) and got == data
            out = await decode_payload(got, codec.layout(state), 2**30)
            assert all(torch.equal(out[k], state[k]) for k in state)
            await store.put("fastpath/obj.octt", bytes(len(data)))  # same size, other bytes
            with pytest.raises(PayloadError, match="sha256"):
                await fetch_payload(store, ref, max_bytes=2**30)
            small = await publish_payload(store, "fastpath/small", data, inline_max=len(data))
            assert small.inline == bytes(data)
            assert await fetch_payload(store, PayloadRef(**{**small.__dict__}), max_bytes=2**30) == data

    asyncio.run(go())


def test_encode_segments_concatenate_to_encode_state():
    state = _state()
    state["t"] = torch.randn(4, 6).t()  # non-contiguous: converted once
    size, segments = codec.encode_segments(state)
    joined = b"".join(segments)
    assert size == len(joined) and joined == bytes(codec.encode_state(state))


def test_channel_frames_carry_segments_unassembled():
    import socket

    from octopusd.trainer import channel
    state = _state()
    _, segments = codec.encode_segments(state)
    a, b = socket.socketpair()
    with a, b:
        channel.set_buffers(a)
        channel.send_frame_sync(a, {"op": "result", "round": 3}, segments)
        header, blob = channel.read_frame_sync(b)
    assert header == {"op": "result", "round": 3} and blob == codec.encode_state(state)


def test_large_objects_go_up_in_parts_and_come_down_in_ranges(moto_s3):
    """Above the multipart threshold: a concurrent multipart upload of the streamed encode and
    concurrent ranged GETs hashed in order give back exactly the payload and its sha256."""
    from octopusd.payload import publish_state
    state = {"w": torch.randn(3 * 2**20 + 123), "b": torch.randn(77)}  # ~12 MiB: three parts
    cfg = S3Config(bucket="fastpath-big", access_key="testing", secret_key="testing",
                   endpoint_url=moto_s3.endpoint_url,
                   extra={"S3_MULTIPART_THRESHOLD": 6 * 2**20, "S3_PART_SIZE": 5 * 2**20,  # S3's smallest
                          "S3_MAX_CONCURRENCY": 2})

    async def go() -> None:
        async with PayloadStore(cfg) as store:
            await store.ensure_bucket()
            ref = await publish_state(store, "big/obj.octt", state, inline_max=0)
            expected = bytes(codec.encode_state(state))
            assert ref.size == len(expected) and ref.sha256 == hashlib.sha256(expected).hexdigest()
            assert store.multipart_threshold < ref.size
            got = await fetch_payload(store, ref, max_bytes=2**30)
            assert got == expected
            out = await decode_payload(got, codec.layout(state), 2**30)
            assert torch.equal(out["w"], state["w"]) and torch.equal(out["b"], state["b"])

    asyncio.run(go())


@pytest.mark.parametrize("extra", [{"S3_PART_SIZE": 2**20}, {"S3_MAX_CONCURRENCY": 0},
                                   {"S3_MULTIPART_THRESHOLD": "big"}])
def test_bad_transfer_settings_name_their_key(extra):
    from octopusd.errors import ConfigError
    with pytest.raises(ConfigError, match=next(iter(extra))):
        PayloadStore(S3Config(extra=extra))
