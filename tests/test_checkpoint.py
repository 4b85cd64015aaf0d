"""Server checkpoints on a real S3 endpoint: the model is referenced, not stored twice; the local
file is the primary copy, the S3 replica a fallback; corrupt or missing models are refused."""
from __future__ import annotations

import asyncio
import json
import uuid
from types import SimpleNamespace

import pytest
import torch

from octopusd import codec
from octopusd.config import S3Config
from octopusd.payload import publish_state
from octopusd.server.checkpoint import Checkpointer, _read_slot
from octopusd.transport.s3 import PayloadStore, checkpoint_key


def _cfg(tmp_path, run_id: str) -> SimpleNamespace:
    return SimpleNamespace(run_id=run_id, run_dir=tmp_path / run_id, train=SimpleNamespace(comm_round=10),
                           comm=SimpleNamespace(inline_payload_max_bytes=4096))


class _Daemon:
    """What resume_round fills in: the global model and the aggregator's state."""

    def __init__(self, like: dict[str, torch.Tensor]) -> None:
        self.layout = codec.layout(like)
        self.max_payload = 4 * codec.encoded_size(like) + 2**20
        self.global_state: dict[str, torch.Tensor] = {}
        self.aggregator = SimpleNamespace(loaded=None)
        self.aggregator.load_state_dict = lambda d: setattr(self.aggregator, "loaded", d)


def _state(n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(n, generator=g), "b": torch.randn(3, generator=g)}


def _store(moto_s3) -> PayloadStore:
    return PayloadStore(S3Config(bucket="ckpt-test", access_key="testing", secret_key="testing",
                                 endpoint_url=moto_s3.endpoint_url))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("inline", [True, False], ids=["inline-model", "s3-model"])
def test_commit_then_resume_local_and_from_the_s3_replica(tmp_path, moto_s3, inline):
    """A committed checkpoint resumes exactly, from the local file and, with the disk lost, from
    the S3 replica. An S3-sized model is referenced by its payload key, never uploaded again."""
    run_id = f"ck-{uuid.uuid4().hex[:8]}"
    cfg = _cfg(tmp_path, run_id)
    state = _state(100 if inline else 5000, 1)

    async def go() -> None:
        async with _store(moto_s3) as store:
            await store.ensure_bucket()
            ck = Checkpointer(cfg)
            retained: list[int] = []

            async def after() -> None:
                retained.append(3)
            ref = await publish_state(store, f"{run_id}/round-000004/global.octt", state, 4096)
            assert (ref.inline is not None) == inline
            await ck.commit(store, 3, ref, {"step": 7}, [1, 2], after=after)
            meta = json.loads(_read_slot(ck.slots[1]))  # on disk before commit returns (round 3: slot 1)
            assert meta["round"] == 3 and meta["roster"] == [1, 2]
            assert ("model_b64" in meta) == inline and meta.get("model_key") == ref.key
            await ck.settle()
            assert retained == [3]  # retention ran behind, after the replica
            keys = await store.list_keys(run_id + "/")
            assert checkpoint_key(run_id) in keys
            assert not any("checkpoint/" in k for k in keys)  # no second copy of the model

            for lose_disk in (False, True):
                if lose_disk:
                    for slot in ck.slots:
                        slot.unlink(missing_ok=True)
                d = _Daemon(state)
                assert await Checkpointer(cfg).resume_round(store, d) == 4
                assert all(torch.equal(d.global_state[k], state[k]) for k in state)
                assert d.aggregator.loaded == {"step": 7}
    asyncio.run(go())


@pytest.mark.timeout(60)
def test_newest_valid_checkpoint_wins_and_corrupt_ones_are_refused(tmp_path, moto_s3):
    """Local ahead of a lagging S3 replica: local wins. A slot torn by a crash mid-write fails
    its sha256 and the other slot (the round before) is used; a replica whose model does not
    match its sha256, or is gone, is unusable."""
    run_id = f"ck-{uuid.uuid4().hex[:8]}"
    cfg = _cfg(tmp_path, run_id)
    s4, s5 = _state(5000, 4), _state(5000, 5)

    async def go() -> None:
        async with _store(moto_s3) as store:
            await store.ensure_bucket()
            ck = Checkpointer(cfg)
            ref4 = await publish_state(store, f"{run_id}/round-000004/global.octt", s4, 0)
            await ck.commit(store, 3, ref4, {}, [1])
            await ck.settle()
            replica = await store.get(checkpoint_key(run_id), max_bytes=2**20)
            ref5 = await publish_state(store, f"{run_id}/round-000005/global.octt", s5, 0)
            await ck.commit(store, 4, ref5, {}, [1])
            await ck.settle()
            await store.put(checkpoint_key(run_id), replica)  # the replica lags one round

            d = _Daemon(s4)
            assert await Checkpointer(cfg).resume_round(store, d) == 5
            assert torch.equal(d.global_state["w"], s5["w"])

            # Round 4 (slot 0) torn by a crash mid-write: its sha256 fails, round 3 (slot 1) is used.
            raw = bytearray(ck.slots[0].read_bytes())
            raw[-5] ^= 0xFF
            ck.slots[0].write_bytes(bytes(raw))
            d = _Daemon(s4)
            assert await Checkpointer(cfg).resume_round(store, d) == 4
            assert torch.equal(d.global_state["w"], s4["w"])

            # Both slots gone and a model whose sha256 does not match: the replica is refused too.
            for slot in ck.slots:
                slot.unlink()
            await store.put(f"{run_id}/round-000004/global.octt", b"x" * ref4.size)
            assert await Checkpointer(cfg).resume_round(store, _Daemon(s4)) is None

            await store.delete([f"{run_id}/round-000004/global.octt"])
            assert await Checkpointer(cfg).resume_round(store, _Daemon(s4)) is None  # model gone
    asyncio.run(go())


@pytest.mark.timeout(60)
def test_self_contained_replica_is_throttled_and_brought_up_to_date_at_the_end(tmp_path, moto_s3):
    """An inline model's S3 replica is written at most every REPLICA_INTERVAL_S; the local file
    follows every round; finish() writes the newest checkpoint to S3 before the process stops."""
    run_id = f"ck-{uuid.uuid4().hex[:8]}"
    cfg = _cfg(tmp_path, run_id)

    async def replica_round(store: PayloadStore) -> int:
        return int(json.loads(await store.get(checkpoint_key(run_id), max_bytes=2**20))["round"])

    async def go() -> None:
        async with _store(moto_s3) as store:
            await store.ensure_bucket()
            ck = Checkpointer(cfg)
            for r in range(3):
                ref = await publish_state(store, "unused", _state(10, r), 4096)
                await ck.commit(store, r, ref, {}, [1])
                await ck.settle()
                assert json.loads(_read_slot(ck.slots[r % 2]))["round"] == r
            assert await replica_round(store) == 0  # within the interval: only the first one
            await ck.finish(store)
            assert await replica_round(store) == 2
    asyncio.run(go())
