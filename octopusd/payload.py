"""Moving tensor payloads: choose inline or S3, verify digests, decode off the event loop."""
from __future__ import annotations

import asyncio
from typing import Mapping

import torch

from octopusd import codec
from octopusd.envelope import PayloadRef, sha256_hex
from octopusd.errors import PayloadError
from octopusd.transport.s3 import PayloadStore



async def publish_payload(store: PayloadStore, key: str, data: bytes | bytearray,
                          inline_max: int) -> PayloadRef:
    """Upload ``data`` under ``key`` (or keep it inline when small) and describe it."""
    digest = await asyncio.to_thread(sha256_hex, data)
    if len(data) <= inline_max:
        return PayloadRef(sha256=digest, size=len(data), inline=bytes(data))
    await store.put(key, data)
    return PayloadRef(sha256=digest, size=len(data), key=key)


async def fetch_payload(store: PayloadStore, ref: PayloadRef, *, max_bytes: int) -> bytes:
    """The announced bytes, verified against the announced size and sha256."""
    if ref.size > max_bytes:
        raise PayloadError(f"announced payload of {ref.size} bytes exceeds the {max_bytes}-byte cap")
    if ref.inline is not None:
        data = ref.inline
    else:
        assert ref.key is not None
        data = await store.get(ref.key, max_bytes=max_bytes)
    if len(data) != ref.size:
        raise PayloadError(f"payload is {len(data)} bytes, announced {ref.size}")
    digest = await asyncio.to_thread(sha256_hex, data)
    if digest != ref.sha256:
        raise PayloadError(f"payload sha256 {digest[:16]}… does not match announced {ref.sha256[:16]}…")
    return data


async def decode_payload(data: bytes, layout: Mapping[str, tuple[str, tuple[int, ...]]],
                         max_bytes: int) -> dict[str, torch.Tensor]:
    return await asyncio.to_thread(codec.decode_state, data, max_bytes=max_bytes,
                                   expected=layout, check_finite=True)
