"""Server checkpoints: the round just closed, its global model, the aggregator state, the roster.

A checkpoint never stores the model a second time when it does not have to. The model after
round ``r`` *is* the global model of round ``r + 1``, which the server publishes anyway, so the
checkpoint points to that payload (its S3 key and sha256) and carries the bytes only when the
payload rides inline in MQTT (then it is small: the bytes go into the checkpoint file itself).

Two copies, in this order on the round's critical path:

1. ``<run_dir>/state/checkpoint-0`` and ``checkpoint-1`` -- two slots, round r in slot r % 2,
   each a header (magic, length, sha256) and the checkpoint's JSON, written in place *before* the
   next round is announced. A crash of the server process (kill -9) at any point leaves a
   checkpoint consistent with what the silos were told: a torn write fails its sha256 and the
   other slot (the round before, not yet announced past) is used. In place because replacing a
   file by rename costs ext4 a flush on the critical path (0.2-0.5 ms, more than the rest of the
   checkpoint); each slot is flushed to disk (fsync) right after the announcement, behind the round.
2. ``<run_id>/checkpoint.json`` in S3 -- a replica for a server that lost its disk, written
   behind the announcement as well. A replica that points to an S3 payload is written every
   round, and payload retention for a round runs only after the replica that no longer needs it
   is written. A self-contained replica (inline model) is written at most every
   ``REPLICA_INTERVAL_S`` seconds and at the end of the run: for a small model a PUT per round
   would cost more CPU than the round's own messages. So the replica can lag the local file by
   the round in flight, or by ``REPLICA_INTERVAL_S`` for an inline model.

On start the newest checkpoint whose model verifies (sha256) is resumed, local or S3. A server
that resumes from a lagging replica catches up from the round announcement retained on the broker
(``ServerDaemon._catch_up``).
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import struct
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import structlog

from octopusd import codec
from octopusd.config import Config
from octopusd.envelope import PayloadRef
from octopusd.errors import OctopusError
from octopusd.payload import sha256_hex
from octopusd.transport.s3 import NotFoundError, PayloadStore, checkpoint_key

log = structlog.get_logger(__name__)
REPLICA_INTERVAL_S = 10.0
SLOT_MAGIC = b"OCKP"
_SLOT_HEAD = struct.Struct("<4sQ32s")  # magic, JSON length, sha256 of the JSON


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_slot(path: Path) -> bytes | None:
    """The JSON of a checkpoint slot, or None when it is missing, torn or not a slot."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    if len(raw) < _SLOT_HEAD.size:
        return None
    magic, n, digest = _SLOT_HEAD.unpack_from(raw)
    body = raw[_SLOT_HEAD.size:_SLOT_HEAD.size + n]
    if magic != SLOT_MAGIC or len(body) != n or hashlib.sha256(body).digest() != digest:
        log.warning("checkpoint_slot_invalid", path=str(path))
        return None
    return body


class Checkpointer:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.dir = cfg.run_dir / "state"
        self.slots = (self.dir / "checkpoint-0", self.dir / "checkpoint-1")
        self._fds: dict[int, int] = {}
        self._behind: asyncio.Task[None] | None = None
        self._replicated_at = -float("inf")
        self._unreplicated: bytes | None = None  # the newest checkpoint, when its replica was skipped

    def final_model_key(self) -> str:
        """Where the model goes when no next round publishes it (the last round, an exit)."""
        return f"{self.cfg.run_id}/checkpoint/global.octt"

    async def commit(self, store: PayloadStore, round_: int, ref: PayloadRef, aggregator_state: dict[str, Any],
                     roster: list[int], after: Callable[[], Awaitable[None]] | None = None,
                     final: bool = False) -> None:
        """Checkpoint ``round_`` whose resulting model ``ref`` describes (already uploaded when it
        has a key). Returns once the local checkpoint survives a crash of this process; the fsync,
        the S3 replica and then ``after`` (payload retention) run behind, in round order. An error
        of the previous round's work behind is raised here. ``final``: the last checkpoint of
        this process's run, always replicated."""
        await self.settle()
        meta: dict[str, Any] = {"run_id": self.cfg.run_id, "round": round_, "comm_round": self.cfg.train.comm_round,
                                "sha256": ref.sha256, "size": ref.size, "aggregator": aggregator_state,
                                "roster": roster}
        if ref.inline is not None:
            meta["model_b64"] = base64.b64encode(ref.inline).decode()
        else:
            meta["model_key"] = ref.key
        blob = json.dumps(meta).encode()
        slot = round_ % 2
        self._write_slot(slot, blob)  # a few KB to the page cache (inline models: <= 350 KB)
        log.info("checkpoint_saved", round=round_, sha256=ref.sha256[:16])
        now = time.monotonic()
        replicate = final or ref.inline is None or now - self._replicated_at >= REPLICA_INTERVAL_S
        if replicate:
            self._replicated_at = now
        self._unreplicated = None if replicate else blob
        self._behind = asyncio.create_task(self._replicate(store, slot, blob if replicate else None, after))

    def _write_slot(self, slot: int, blob: bytes) -> None:
        fd = self._fds.get(slot)
        if fd is None:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.slots[slot], os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            self._fds[slot] = fd
            _fsync_dir(self.dir)  # the slot's directory entry, once
        frame = _SLOT_HEAD.pack(SLOT_MAGIC, len(blob), hashlib.sha256(blob).digest()) + blob
        done = 0
        while done < len(frame):
            done += os.pwrite(fd, frame[done:], done)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    async def _replicate(self, store: PayloadStore, slot: int, blob: bytes | None,
                         after: Callable[[], Awaitable[None]] | None) -> None:
        await asyncio.to_thread(os.fsync, self._fds[slot])
        if blob is not None:
            await store.put(checkpoint_key(self.cfg.run_id), blob)
        if after is not None:
            await after()

    async def settle(self) -> None:
        """Wait for the work behind the last commit; its errors surface here."""
        task, self._behind = self._behind, None
        if task is not None:
            await task

    async def finish(self, store: PayloadStore) -> None:
        """Before this process stops: everything behind done, and the S3 replica up to date."""
        await self.settle()
        blob, self._unreplicated = self._unreplicated, None
        if blob is not None:
            await store.put(checkpoint_key(self.cfg.run_id), blob)

    # -- resume ------------------------------------------------------------------------------
    async def _model_of(self, store: PayloadStore, meta: dict[str, Any], max_bytes: int) -> Any:
        if isinstance(meta.get("model_b64"), str):
            return base64.b64decode(meta["model_b64"], validate=True)
        if isinstance(meta.get("model_key"), str):
            size = int(meta["size"])
            if not 0 <= size <= max_bytes:
                raise ValueError(f"model of {size} bytes exceeds the {max_bytes}-byte cap")
            data, _ = await store.get_hashed(meta["model_key"], max_bytes=max_bytes, size_hint=size)
            return data
        return None

    async def _candidate(self, store: PayloadStore, where: str, read: Callable[[], Awaitable[bytes]],
                         max_bytes: int) -> tuple[dict[str, Any], Any] | None:
        try:
            meta = json.loads(await read())
            if not isinstance(meta, dict) or meta.get("run_id") != self.cfg.run_id:
                return None
            data = await self._model_of(store, meta, max_bytes)
        except (NotFoundError, FileNotFoundError):
            return None
        except (OSError, ValueError, KeyError, TypeError, OctopusError) as exc:
            log.warning("checkpoint_unreadable", where=where, reason=str(exc))
            return None
        if data is None or await asyncio.to_thread(sha256_hex, data) != meta.get("sha256"):
            log.warning("checkpoint_corrupt", where=where, round=meta.get("round"))
            return None
        return meta, data

    async def resume_round(self, store: PayloadStore, daemon: Any) -> int | None:
        """Load the newest valid checkpoint into ``daemon``; return the round to start at, or None
        when there is no usable checkpoint (a fresh run)."""
        cap = int(daemon.max_payload)
        meta_cap = 2**20 + 2 * self.cfg.comm.inline_payload_max_bytes  # base64 of an inline model
        async def local(path: Path) -> bytes:
            body = await asyncio.to_thread(_read_slot, path)
            if body is None:
                raise FileNotFoundError(path)
            return body
        found = [await self._candidate(store, f"local {p.name}", lambda p=p: local(p), cap) for p in self.slots]
        found.append(await self._candidate(
            store, "s3", lambda: store.get(checkpoint_key(self.cfg.run_id), max_bytes=meta_cap), cap))
        candidates = [c for c in found if c is not None]
        if not candidates:
            return None
        meta, data = max(candidates, key=lambda c: int(c[0]["round"]))
        try:
            state = await asyncio.to_thread(codec.decode_state, data, expected=daemon.layout)
        except OctopusError as exc:
            log.warning("checkpoint_unusable", reason=str(exc))
            return None
        daemon.global_state = state
        daemon.aggregator.load_state_dict(meta.get("aggregator") or {})
        log.info("checkpoint_resumed", round=meta["round"], next_round=int(meta["round"]) + 1)
        return int(meta["round"]) + 1
