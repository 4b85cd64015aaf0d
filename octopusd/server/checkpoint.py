"""Server checkpoints: after each aggregation, atomically, locally and in S3.

A checkpoint is the round just closed, the global model (tensor codec) with its sha256, the
aggregator's state and the silo roster. Local files are written to a temporary name and renamed;
in S3 the model object is written before the JSON that points to it, so a reader never sees a
JSON whose model is missing. On start, the newest valid checkpoint (local or S3) is resumed.
"""
from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import structlog
import torch

from octopusd import codec
from octopusd.config import Config
from octopusd.errors import OctopusError
from octopusd.payload import sha256_hex
from octopusd.transport.s3 import NotFoundError, PayloadStore, checkpoint_key

log = structlog.get_logger(__name__)


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Checkpointer:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.dir = cfg.run_dir / "state"

    def _model_key(self) -> str:
        return f"{self.cfg.run_id}/checkpoint/global.octt"

    async def save(self, store: PayloadStore, round_: int, state: dict[str, torch.Tensor],
                   aggregator_state: dict[str, Any], roster: list[int]) -> None:
        data = await asyncio.to_thread(codec.encode_state, state)
        digest = await asyncio.to_thread(sha256_hex, data)
        meta = {"run_id": self.cfg.run_id, "round": round_, "sha256": digest, "model_key": self._model_key(),
                "aggregator": aggregator_state, "roster": roster, "comm_round": self.cfg.train.comm_round}
        blob = json.dumps(meta).encode()
        await asyncio.to_thread(_atomic_write, self.dir / "global.octt", data)
        await asyncio.to_thread(_atomic_write, self.dir / "checkpoint.json", blob)
        await store.put(self._model_key(), data)
        await store.put(checkpoint_key(self.cfg.run_id), blob)
        log.info("checkpoint_saved", round=round_, sha256=digest[:16])

    async def _load_local(self) -> tuple[dict[str, Any], bytes] | None:
        try:
            meta = json.loads((self.dir / "checkpoint.json").read_text())
            data = (self.dir / "global.octt").read_bytes()
        except (OSError, ValueError):
            return None
        return meta, data

    async def _load_s3(self, store: PayloadStore) -> tuple[dict[str, Any], bytes] | None:
        try:
            meta = json.loads(await store.get(checkpoint_key(self.cfg.run_id), max_bytes=2**20))
            data = await store.get(str(meta["model_key"]), max_bytes=2**40)
        except (NotFoundError, ValueError, KeyError, TypeError):
            return None
        return meta, data

    async def resume_round(self, store: PayloadStore, daemon: Any) -> int | None:
        """Load the newest valid checkpoint into ``daemon``; return the round to start at, or None
        when there is no usable checkpoint (a fresh run)."""
        candidates = [c for c in (await self._load_local(), await self._load_s3(store)) if c is not None]
        best: tuple[dict[str, Any], bytes] | None = None
        for meta, data in candidates:
            if not isinstance(meta, dict) or meta.get("run_id") != self.cfg.run_id:
                continue
            if sha256_hex(data) != meta.get("sha256"):
                log.warning("checkpoint_corrupt", round=meta.get("round"))
                continue
            if best is None or int(meta["round"]) > int(best[0]["round"]):
                best = (meta, data)
        if best is None:
            return None
        meta, data = best
        try:
            state = await asyncio.to_thread(codec.decode_state, data, expected=daemon.layout)
        except OctopusError as exc:
            log.warning("checkpoint_unusable", reason=str(exc))
            return None
        daemon.global_state = state
        daemon.aggregator.load_state_dict(meta.get("aggregator") or {})
        log.info("checkpoint_resumed", round=meta["round"], next_round=int(meta["round"]) + 1)
        return int(meta["round"]) + 1
