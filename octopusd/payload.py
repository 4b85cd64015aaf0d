"""Moving tensor payloads: choose inline or S3, verify digests, decode off the event loop."""
from __future__ import annotations

import asyncio
import hashlib
from typing import Any, Callable, Mapping, TypeVar

import torch

from octopusd import codec
from octopusd.envelope import PayloadRef, sha256_hex
from octopusd.errors import PayloadError
from octopusd.transport.s3 import PayloadStore

T = TypeVar("T")


async def publish_payload(store: PayloadStore, key: str, data: bytes | bytearray,
                          inline_max: int) -> PayloadRef:
    """Upload ``data`` under ``key`` (or keep it inline when small) and describe it."""
    if len(data) <= inline_max:
        return PayloadRef(sha256=sha256_hex(data), size=len(data), inline=bytes(data))
    # The digest is only needed once the upload is done: hash on another core meanwhile.
    digest, _ = await asyncio.gather(asyncio.to_thread(sha256_hex, data), store.put(key, data))
    return PayloadRef(sha256=digest, size=len(data), key=key)


SMALL = 1 << 20  # below this, a worker-thread hop costs more than the work it would move


async def off_loop(fn: Callable[..., T], *args: Any, nbytes: int, **kwargs: Any) -> T:
    """``fn`` in a worker thread, or right here when its input is small."""
    if nbytes < SMALL:
        return fn(*args, **kwargs)
    return await asyncio.to_thread(fn, *args, **kwargs)


def _sha256_segments(segments: list[memoryview]) -> str:
    digest = hashlib.sha256()
    for seg in segments:
        digest.update(seg)
    return digest.hexdigest()


async def publish_state(store: PayloadStore, key: str, state: Mapping[str, torch.Tensor],
                        inline_max: int) -> PayloadRef:
    """Encode ``state`` and publish it like :func:`publish_payload`, streaming the encode.

    The payload is never assembled: the upload and the digest read the codec's segments (views
    of the tensors' own memory), so publishing a 1 GB model costs no 1 GB buffer. The tensors
    must not change until this returns.
    """
    size, segments = await off_loop(codec.encode_segments, state, nbytes=codec.encoded_size(state))
    if size <= inline_max:
        data = b"".join(segments)
        return PayloadRef(sha256=sha256_hex(data), size=size, inline=data)
    digest, _ = await asyncio.gather(asyncio.to_thread(_sha256_segments, segments), store.put(key, segments))
    return PayloadRef(sha256=digest, size=size, key=key)


async def fetch_payload(store: PayloadStore, ref: PayloadRef, *, max_bytes: int,
                        alloc: Callable[[int], Any] = bytearray) -> Any:
    """The announced bytes, verified against the announced size and sha256.

    An S3 payload comes back as a writable buffer (``alloc(size)``: a ``bytearray`` unless the
    caller wants another kind) hashed while it streamed in, so :func:`decode_payload` can decode
    it without copying.
    """
    if ref.size > max_bytes:
        raise PayloadError(f"announced payload of {ref.size} bytes exceeds the {max_bytes}-byte cap")
    data: bytes | bytearray
    if ref.inline is not None:
        data = ref.inline
        digest = sha256_hex(data)
    else:
        assert ref.key is not None
        data, digest = await store.get_hashed(ref.key, max_bytes=max_bytes, size_hint=ref.size, alloc=alloc)
    if len(data) != ref.size:
        raise PayloadError(f"payload is {len(data)} bytes, announced {ref.size}")
    if digest != ref.sha256:
        raise PayloadError(f"payload sha256 {digest[:16]}… does not match announced {ref.sha256[:16]}…")
    return data


async def decode_payload(data: bytes | bytearray, layout: Mapping[str, tuple[str, tuple[int, ...]]],
                         max_bytes: int) -> dict[str, torch.Tensor]:
    """Decode and validate (layout, finite values) off the loop; tensors may alias ``data``."""
    return await off_loop(codec.decode_state, data, max_bytes=max_bytes, expected=layout,
                           check_finite=True, copy=False, nbytes=len(data))
