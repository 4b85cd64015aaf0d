"""Model payloads on S3: deterministic keys, digests, retries with backoff.

Keys: ``<run_id>/round-<r>/global.octt`` (the global model, uploaded once per round) and
``<run_id>/round-<r>/silo-<n>.octt`` (silo n's update). Objects are written private. Transient
errors are retried by botocore's standard mode and then by :meth:`PayloadStore._retry` with
jittered backoff; what still fails raises :class:`~octopusd.errors.StorageError`.
"""
from __future__ import annotations

import asyncio
import bisect
import contextlib
import hashlib
import io
import random
from typing import Any, Awaitable, Callable, TypeVar

import aioboto3
import structlog
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError

from octopusd.config import S3Config
from octopusd.errors import ConfigError, StorageError

log = structlog.get_logger(__name__)
T = TypeVar("T")

_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}


def global_key(run_id: str, round_: int) -> str:
    return f"{run_id}/round-{round_:06d}/global.octt"


def update_key(run_id: str, round_: int, rank: int) -> str:
    return f"{run_id}/round-{round_:06d}/silo-{rank}.octt"


def checkpoint_key(run_id: str) -> str:
    return f"{run_id}/checkpoint.json"


Buffers = "bytes | bytearray | memoryview | list[memoryview]"
# Defaults; the s3 config file (comm_args.s3_config_path) may set S3_MULTIPART_THRESHOLD,
# S3_PART_SIZE and S3_MAX_CONCURRENCY (bytes, bytes, parts in flight per object).
MULTIPART_THRESHOLD = 512 * 2**20   # objects above this go up in parts and come down in ranges
PART_SIZE = 64 * 2**20
MAX_CONCURRENCY = 4                 # parts in flight per object
MIN_PART_SIZE = 5 * 2**20           # S3's smallest part (all but the last)


def _transfer_setting(cfg: S3Config, key: str, default: int, minimum: int) -> int:
    value = cfg.extra.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"expected an integer >= {minimum}, got {value!r}", key=f"comm_args(s3).{key}")
    return value


def _segments(data: Any) -> list[memoryview]:
    if isinstance(data, list):
        return [memoryview(x).cast("B") for x in data]
    return [memoryview(data).cast("B")]


class BufferReader(io.RawIOBase):
    """A seekable, read-only file over bytes-like segments (a streamed encode), never copying them.

    ``start``/``stop`` make it a window onto ``[start, stop)`` of the concatenation: one part of
    a multipart upload.
    """

    def __init__(self, data: Any, start: int = 0, stop: int | None = None) -> None:
        super().__init__()
        self._segs = _segments(data)
        self._ends: list[int] = []
        total = 0
        for seg in self._segs:
            total += len(seg)
            self._ends.append(total)
        self._start = start
        self._stop = total if stop is None else min(stop, total)
        self._pos = 0

    def __len__(self) -> int:
        return self._stop - self._start

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, b: Any) -> int:
        out = memoryview(b).cast("B")
        want = max(0, min(len(out), len(self) - self._pos))
        done = 0
        at = self._start + self._pos
        i = bisect.bisect_right(self._ends, at)
        while done < want:
            seg, seg_start = self._segs[i], self._ends[i] - len(self._segs[i])
            n = min(want - done, self._ends[i] - at)
            out[done:done + n] = seg[at - seg_start:at - seg_start + n]
            done += n
            at += n
            i += 1
        self._pos += done
        return done

    def read(self, size: int | None = -1) -> bytes:
        n = len(self) - self._pos if size is None or size < 0 else min(size, len(self) - self._pos)
        buf = bytearray(max(n, 0))
        got = self.readinto(buf)
        return bytes(buf[:got])


_SESSION: aioboto3.Session | None = None


def _shared_session() -> aioboto3.Session:
    """One session per process: each session parses its own copy of the S3 service model
    (~11 MB); many stores in one process (bench/scale.py packs hundreds) share this one."""
    global _SESSION
    if _SESSION is None:
        _SESSION = aioboto3.Session()
    return _SESSION


class NotFoundError(StorageError):
    """The object does not exist."""


class PayloadStore:
    """One long-lived S3 client for a daemon; use as an async context manager."""

    def __init__(self, cfg: S3Config, *, attempts: int = 5, base_delay_s: float = 0.2) -> None:
        self.cfg = cfg
        self.bucket = cfg.bucket
        self.attempts = attempts
        self.base_delay_s = base_delay_s
        self._stack = contextlib.AsyncExitStack()
        self._client: Any = None
        self.multipart_threshold = _transfer_setting(cfg, "S3_MULTIPART_THRESHOLD", MULTIPART_THRESHOLD, 1)
        self.part_size = _transfer_setting(cfg, "S3_PART_SIZE", PART_SIZE, MIN_PART_SIZE)
        self.max_concurrency = _transfer_setting(cfg, "S3_MAX_CONCURRENCY", MAX_CONCURRENCY, 1)

    @property
    def put_args(self) -> dict[str, str]:
        """Objects are private; server-side encryption when configured."""
        args = {"ACL": "private"}
        if self.cfg.sse:
            args["ServerSideEncryption"] = self.cfg.sse
        return args

    async def __aenter__(self) -> "PayloadStore":
        session = _shared_session()
        # Payload integrity is checked end to end by the sha256 each envelope carries, so
        # botocore's per-request CRC32 and SigV4 body hash (on plain http) would only hash
        # every byte twice more: off, halving a 40 MB PUT on loopback (bench/round.py).
        boto_cfg = BotoConfig(retries={"max_attempts": 3, "mode": "standard"},
                              connect_timeout=10, read_timeout=60, max_pool_connections=32,
                              request_checksum_calculation="when_required",
                              response_checksum_validation="when_required",
                              s3={"addressing_style": "path", "payload_signing_enabled": False})
        self._client = await self._stack.enter_async_context(session.client(
            "s3", endpoint_url=self.cfg.endpoint_url, region_name=self.cfg.region,
            aws_access_key_id=self.cfg.access_key, aws_secret_access_key=self.cfg.secret_key,
            config=boto_cfg, verify=str(self.cfg.ca_bundle) if self.cfg.ca_bundle else None))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    async def _retry(self, what: str, fn: Callable[[], Awaitable[T]]) -> T:
        for attempt in range(1, self.attempts + 1):
            try:
                return await fn()
            except ClientError as exc:
                code = str(exc.response.get("Error", {}).get("Code", ""))
                if code in _NOT_FOUND:
                    raise NotFoundError(f"{what}: not found") from exc
                if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "NoSuchBucket"):
                    raise StorageError(f"{what}: {code}") from exc
                err: Exception = exc
            except (BotoCoreError, OSError, asyncio.TimeoutError) as exc:
                err = exc
            if attempt == self.attempts:
                raise StorageError(f"{what}: failed after {attempt} attempts: {err}") from err
            delay = self.base_delay_s * 2 ** (attempt - 1) * random.uniform(0.5, 1.5)
            log.warning("s3_retry", what=what, attempt=attempt, error=str(err), retry_in_s=round(delay, 2))
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def ensure_bucket(self) -> None:
        async def go() -> None:
            try:
                await self._client.head_bucket(Bucket=self.bucket)
            except ClientError as exc:
                if str(exc.response.get("Error", {}).get("Code")) not in ("404", "NoSuchBucket", "NotFound"):
                    raise
                kwargs: dict[str, Any] = {"Bucket": self.bucket}
                if self.cfg.region and self.cfg.region != "us-east-1":
                    kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.cfg.region}
                with contextlib.suppress(self._client.exceptions.BucketAlreadyOwnedByYou):
                    await self._client.create_bucket(**kwargs)
        await self._retry(f"bucket {self.bucket}", go)

    async def put(self, key: str, data: Any) -> None:
        """Upload a bytes-like object, or segments (``codec.encode_segments``) as one object.

        Above the multipart threshold the object goes up as a multipart upload, ``part_size``
        parts, ``max_concurrency`` at a time.
        """
        size = sum(len(seg) for seg in _segments(data))
        if size > self.multipart_threshold:
            await self._put_multipart(key, data, size)
            return

        async def go() -> None:
            # A file-like view: botocore/aiohttp copy a bytearray body several times over
            # (40 MB: 0.12 s of CPU), while they stream a seekable reader with no copy (0.02 s).
            await self._client.put_object(Bucket=self.bucket, Key=key, Body=BufferReader(data),
                                          **self.put_args)
        await self._retry(f"put s3://{self.bucket}/{key}", go)

    async def _put_multipart(self, key: str, data: Any, size: int) -> None:
        what = f"put s3://{self.bucket}/{key}"

        async def create() -> str:
            resp = await self._client.create_multipart_upload(Bucket=self.bucket, Key=key, **self.put_args)
            return str(resp["UploadId"])
        upload_id = await self._retry(what, create)
        slots = asyncio.Semaphore(self.max_concurrency)

        async def part(number: int, start: int) -> dict[str, Any]:
            async def go() -> dict[str, Any]:
                resp = await self._client.upload_part(
                    Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=number,
                    Body=BufferReader(data, start, start + self.part_size))
                return {"ETag": resp["ETag"], "PartNumber": number}
            async with slots:
                return await self._retry(f"{what} part {number}", go)
        try:
            parts = await asyncio.gather(*(part(i + 1, at) for i, at in enumerate(range(0, size, self.part_size))))

            async def complete() -> None:
                await self._client.complete_multipart_upload(
                    Bucket=self.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": list(parts)})
            await self._retry(what, complete)
        except BaseException:
            with contextlib.suppress(Exception):
                await self._client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            raise

    async def get(self, key: str, *, max_bytes: int) -> bytes:
        async def go() -> bytes:
            resp = await self._client.get_object(Bucket=self.bucket, Key=key)
            size = int(resp.get("ContentLength") or 0)
            if size > max_bytes:
                resp["Body"].close()
                raise StorageError(f"s3://{self.bucket}/{key}: {size} bytes exceeds the {max_bytes}-byte cap")
            async with resp["Body"] as body:
                return await body.read()
        return await self._retry(f"get s3://{self.bucket}/{key}", go)

    async def get_hashed(self, key: str, *, max_bytes: int, size_hint: int | None = None,
                         chunk: int = 1 << 20, alloc: Callable[[int], Any] = bytearray) -> tuple[Any, str]:
        """The object in a writable buffer and its sha256 hex digest, hashed as it streams in.

        Reading into one preallocated buffer avoids ``read()``'s chunk list and join (a second
        copy of the object), and hashing each chunk on arrival hides the digest behind the
        transfer instead of adding a pass over the bytes after it. Above
        the multipart threshold the object comes down as concurrent ranged GETs into the
        same buffer, hashed in order as the ranges complete; ``size_hint`` (the size the sender
        announced) picks the way without a HEAD request, and a wrong hint fails the transfer.
        """
        async def go() -> tuple[Any, str]:
            resp = await self._client.get_object(Bucket=self.bucket, Key=key)
            size = int(resp.get("ContentLength") or 0)
            if size > max_bytes:
                resp["Body"].close()
                raise StorageError(f"s3://{self.bucket}/{key}: {size} bytes exceeds the {max_bytes}-byte cap")
            buf, digest = alloc(size), hashlib.sha256()  # alloc: a shared-memory buffer, say
            pos = await self._read_into(resp["Body"], memoryview(buf), digest.update, key, chunk)
            if pos != size:
                raise OSError(f"s3://{self.bucket}/{key}: got {pos} of {size} bytes")
            return buf, digest.hexdigest()

        if size_hint is not None and self.multipart_threshold < size_hint <= max_bytes:
            return await self._get_ranges(key, size_hint, chunk, alloc)
        return await self._retry(f"get s3://{self.bucket}/{key}", go)

    @staticmethod
    async def _read_into(body: Any, out: memoryview, on_chunk: Callable[[memoryview], Any] | None,
                         key: str, chunk: int) -> int:
        pos = 0
        async with body:
            while part := await body.read(chunk):
                if pos + len(part) > len(out):
                    raise StorageError(f"{key}: longer than the {len(out)} bytes expected")
                out[pos:pos + len(part)] = part
                if on_chunk is not None:
                    on_chunk(part)
                pos += len(part)
        return pos

    async def _get_ranges(self, key: str, size: int, chunk: int,
                          alloc: Callable[[int], Any] = bytearray) -> tuple[Any, str]:
        buf = alloc(size)
        view = memoryview(buf)
        starts = list(range(0, size, self.part_size))
        done = [asyncio.Event() for _ in starts]
        slots = asyncio.Semaphore(self.max_concurrency)

        async def fetch(i: int, start: int) -> None:
            stop = min(size, start + self.part_size)

            async def go() -> None:
                resp = await self._client.get_object(Bucket=self.bucket, Key=key,
                                                     Range=f"bytes={start}-{stop - 1}")
                got = await self._read_into(resp["Body"], view[start:stop], None, key, chunk)
                if got != stop - start:
                    raise OSError(f"s3://{self.bucket}/{key}: range {start}: got {got} of {stop - start}")
            async with slots:
                await self._retry(f"get s3://{self.bucket}/{key} range {start}", go)
            done[i].set()

        async def hash_in_order() -> str:
            digest = hashlib.sha256()
            for i, start in enumerate(starts):
                await done[i].wait()
                await asyncio.to_thread(digest.update, view[start:min(size, start + self.part_size)])
            return digest.hexdigest()
        *_, hexdigest = await asyncio.gather(*(fetch(i, at) for i, at in enumerate(starts)), hash_in_order())
        return buf, hexdigest

    async def exists(self, key: str) -> bool:
        async def go() -> bool:
            await self._client.head_object(Bucket=self.bucket, Key=key)
            return True
        try:
            return await self._retry(f"head s3://{self.bucket}/{key}", go)
        except NotFoundError:
            return False

    async def delete(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):
            chunk = [{"Key": k} for k in keys[start:start + 1000]]
            async def go() -> None:
                await self._client.delete_objects(Bucket=self.bucket, Delete={"Objects": chunk, "Quiet": True})
            await self._retry("delete objects", go)

    async def list_keys(self, prefix: str) -> list[str]:
        keys: list[str] = []
        paginator = self._client.get_paginator("list_objects_v2")
        async for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
            keys.extend(obj["Key"] for obj in page.get("Contents", []))
        return keys
