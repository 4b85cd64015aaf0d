"""The transfer floor of one round: the transfers the protocol cannot avoid, done directly.

Same bytes, same broker and S3 endpoint, with plain aioboto3/aiomqtt clients (one per party, as
the daemons have) and as parallel as the protocol allows:

* down: the server uploads the global model once, announces it over MQTT, every silo downloads it
  (concurrently); or, when the payload rides inline, one MQTT publish that reaches every silo;
* up: every silo uploads its update (concurrently) and announces it, the server downloads each
  as its announcement arrives (concurrently); inline: one MQTT publish per silo.

``floor = down + up``; nothing is encoded, hashed, decoded, trained or aggregated.
"""
from __future__ import annotations

import asyncio
import contextlib
import socket
import statistics
import time
import uuid
from dataclasses import dataclass
from typing import Any

import aioboto3
import aiomqtt
from botocore.config import Config as BotoConfig

ENVELOPE_OVERHEAD = 320     # bytes of an announcement envelope around the payload reference


@dataclass
class _Party:
    mqtt: aiomqtt.Client
    s3: Any
    inbox: asyncio.Queue[bytes]


async def _pump(client: aiomqtt.Client, inbox: asyncio.Queue[bytes]) -> None:
    async for msg in client.messages:
        inbox.put_nowait(bytes(msg.payload) if isinstance(msg.payload, (bytes, bytearray)) else b"")


async def _read(s3: Any, bucket: str, key: str) -> int:
    resp = await s3.get_object(Bucket=bucket, Key=key)
    async with resp["Body"] as body:
        return len(await body.read())


async def measure_floor(broker_port: int, s3_endpoint: str, *, global_bytes: int, update_bytes: list[int],
                        inline_max: int, reps: int = 5, bucket: str = "octopusd-floor") -> dict[str, Any]:
    """Median down/up/total seconds over ``reps`` repetitions (after one warm-up)."""
    n = len(update_bytes)
    run = uuid.uuid4().hex[:8]
    bcast, up_topic = f"floor/{run}/broadcast", f"floor/{run}/update"
    session = aioboto3.Session()
    # The fastest settings for the same integrity: the protocol's sha256 covers the bytes, so no
    # per-request CRC32 or SigV4 body hash (octopusd's PayloadStore uses the same settings).
    boto_cfg = BotoConfig(max_pool_connections=32, request_checksum_calculation="when_required",
                          response_checksum_validation="when_required",
                          s3={"addressing_style": "path", "payload_signing_enabled": False})
    async with contextlib.AsyncExitStack() as stack:
        parties: list[_Party] = []
        for i in range(n + 1):
            m = await stack.enter_async_context(aiomqtt.Client(
                "127.0.0.1", broker_port, identifier=f"floor-{run}-{i}", clean_session=True,
                socket_options=((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)))
            await m.subscribe(up_topic if i == 0 else bcast, qos=1)
            s3 = await stack.enter_async_context(session.client(
                "s3", endpoint_url=s3_endpoint, region_name="us-east-1", aws_access_key_id="testing",
                aws_secret_access_key="testing", config=boto_cfg))
            inbox: asyncio.Queue[bytes] = asyncio.Queue()
            parties.append(_Party(m, s3, inbox))
        pumps = [asyncio.create_task(_pump(p.mqtt, p.inbox)) for p in parties]
        server, silos = parties[0], parties[1:]
        with contextlib.suppress(Exception):
            await server.s3.create_bucket(Bucket=bucket)
        gbuf = bytes(global_bytes)
        ubufs = {size: bytes(size) for size in set(update_bytes)}
        inline_down = global_bytes <= inline_max

        async def down(rep: int) -> float:
            t0 = time.perf_counter()
            key = f"{run}/{rep}/global"
            if inline_down:
                await server.mqtt.publish(bcast, gbuf + bytes(ENVELOPE_OVERHEAD), qos=1)
                await asyncio.gather(*(s.inbox.get() for s in silos))
            else:
                await server.s3.put_object(Bucket=bucket, Key=key, Body=gbuf)
                await server.mqtt.publish(bcast, bytes(ENVELOPE_OVERHEAD), qos=1)

                async def fetch(s: _Party) -> None:
                    await s.inbox.get()
                    await _read(s.s3, bucket, key)
                await asyncio.gather(*(fetch(s) for s in silos))
            return time.perf_counter() - t0

        async def up(rep: int) -> float:
            t0 = time.perf_counter()

            async def send(i: int, s: _Party) -> None:
                size = update_bytes[i]
                if size <= inline_max:
                    await s.mqtt.publish(up_topic, ubufs[size] + bytes(ENVELOPE_OVERHEAD), qos=1)
                else:
                    await s.s3.put_object(Bucket=bucket, Key=f"{run}/{rep}/silo-{i}", Body=ubufs[size])
                    await s.mqtt.publish(up_topic, f"{rep}/silo-{i}".encode().ljust(ENVELOPE_OVERHEAD), qos=1)

            async def collect() -> None:
                fetches = []
                for _ in range(n):
                    msg = await server.inbox.get()
                    if len(msg) == ENVELOPE_OVERHEAD:  # an announcement of an S3 object
                        key = f"{run}/" + msg.decode().strip()
                        fetches.append(asyncio.create_task(_read(server.s3, bucket, key)))
                await asyncio.gather(*fetches)
            await asyncio.gather(collect(), *(send(i, s) for i, s in enumerate(silos)))
            return time.perf_counter() - t0

        downs, ups = [], []
        for rep in range(reps + 1):
            d, u = await down(rep), await up(rep)
            if rep:  # the first repetition warms connections up
                downs.append(d)
                ups.append(u)
            keys = [f"{run}/{rep}/global"] + [f"{run}/{rep}/silo-{i}" for i in range(n)]
            await server.s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys]})
        for t in pumps:
            t.cancel()
    down_s, up_s = statistics.median(downs), statistics.median(ups)
    return {"floor_s": down_s + up_s, "floor_down_s": down_s, "floor_up_s": up_s, "floor_reps": reps}


def floor_sync(**kw: Any) -> dict[str, Any]:
    return asyncio.run(measure_floor(**kw))
