"""The server daemon: performs the effects of the server round state machine.

It owns the MQTT link, the S3 store, the global model and the aggregator. A reader task turns
MQTT messages into machine events (dropping malformed, foreign and spoofed ones with a log line);
one consumer feeds events to the machine and performs the returned effects in order. Payload
downloads run as tasks; hashing, decoding, aggregation and evaluation run in worker threads so
the loop keeps serving MQTT.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from typing import Any

import structlog
import torch

from octopusd import codec, security
from octopusd.config import Config
from octopusd.envelope import Envelope, MsgType, PayloadRef, decode_envelope, encode_envelope, sha256_hex
from octopusd.errors import EnvelopeError, ExitCode, OctopusError, WireError
from octopusd.lifecycle import lifecycle
from octopusd.memory import return_large_buffers
from octopusd.notify import Notifier
from octopusd.payload import decode_payload, fetch_payload, off_loop, publish_state
from octopusd.plugins import PluginManager, load_plugins
from octopusd.runtime import DaemonExit, Shutdown, Timers, first_daemon_exit, pump_messages
from octopusd.server.checkpoint import Checkpointer
from octopusd.server.machine import Effect, Ev, Event, ServerMachine
from octopusd.transport import s3 as s3keys, topics
from octopusd.transport.mqtt import Incoming, MqttLink
from octopusd.transport.s3 import PayloadStore

log = structlog.get_logger("octopusd.server")
UPDATES_IN_FLIGHT_BYTES = 64 * 2**20
MAX_ENVELOPE = 16 * 2**20


class _TestData:
    """Adapts a user's object for the server: a federated dataset, or a plain test Dataset."""

    def __init__(self, data: Any) -> None:
        self.data = data
        self.source = getattr(data, "source", f"user-supplied {type(data).__name__}")
        self.output_dim = getattr(data, "output_dim", None)

    def test_set(self) -> Any:
        return self.data.test_set() if hasattr(self.data, "test_set") else self.data


class ServerDaemon:
    def __init__(self, cfg: Config, *, plugins: PluginManager | None = None,
                 shutdown: Shutdown | None = None, dataset: Any = None,
                 model: torch.nn.Module | None = None, notifier: Notifier | None = None) -> None:
        return_large_buffers()  # freed model-sized buffers leave RSS (see octopusd.memory)
        self.cfg = cfg
        self.life = lifecycle(cfg)
        self.pm = plugins or load_plugins(cfg.plugin_dirs)
        # Resolve every plugin name now: an unknown name fails start-up, listing known names.
        self.aggregator = self.pm.aggregator(cfg.train.federated_optimizer)(cfg)
        self.signer, self.verifier = security.from_config(cfg)
        self.status_ids: dict[int, set[str]] = {}
        # The Python API may pass the user's own test data and model instead of plugin names.
        self.dataset = _TestData(dataset) if dataset is not None else self.pm.dataset(cfg.data.dataset)(cfg)
        self.model = model if model is not None else self._initial_model()
        self.global_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        # A model the daemon built itself only ever evaluates global_state (functional_call), so
        # its own parameters would be a second copy of the model for the whole run: drop them.
        # A user's model object, or one with tensors outside its state_dict, is left alone.
        names = {n for n, _ in self.model.named_parameters()} | {n for n, _ in self.model.named_buffers()}
        self._stateless_eval = model is None and names <= set(self.global_state)
        if self._stateless_eval:
            self.model.to("meta")
        self.layout = codec.layout(self.global_state)
        self.model_bytes = codec.encoded_size(self.global_state)
        # Aggregation of a model under 1 MiB runs on the loop (a thread hop costs more than it).
        self.max_payload = 4 * self.model_bytes + 2**20
        self.shutdown = shutdown or Shutdown()
        if self.shutdown.grace_s is None:
            self.shutdown.grace_s = self.life.shutdown_grace_s
        self.notifier = notifier or Notifier()
        self.machine = ServerMachine(
            silos_total=cfg.train.client_num_in_total, per_round=cfg.train.client_num_per_round,
            comm_round=cfg.train.comm_round, min_silos=cfg.train.min_silos_per_round,
            eval_every=cfg.validation.frequency_of_the_test, deadline_s=cfg.train.round_deadline_s,
            give_up_s=cfg.train.round_give_up_s, wait_timeout_s=cfg.train.silo_wait_timeout_s,
            seed=cfg.common.random_seed, offline_grace_s=self.life.silo_offline_grace_s)
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        # Update announcements by (silo, round, message id): the machine picks which one to fetch,
        # so a forged or replayed copy arriving meanwhile cannot replace the one being fetched.
        self.announced: dict[tuple[int, int, str], Envelope] = {}
        self.verified: dict[int, tuple[dict[str, torch.Tensor], Envelope]] = {}
        self.round_stats: dict[int, dict[str, Any]] = {}
        self.round_started = 0.0
        self.checkpointer = Checkpointer(cfg)
        self.run_dir = cfg.run_dir
        self._test_set: Any = None
        # The round closed but not yet checkpointed: (round, aggregator state, roster). It is
        # committed with the next global model's reference (see octopusd.server.checkpoint).
        self._pending_checkpoint: tuple[int, dict[str, Any], list[int]] | None = None
        # Rounds that may have payloads in S3 still (a global or an update went through S3):
        # retention deletes only those, so inline-only rounds cost no S3 request at all.
        self._s3_rounds: set[int] = set()
        # Updates fetched but not yet folded are bounded, so the server's memory does not grow
        # with the number of silos: one full-size update at a time, more while they are small.
        self._update_slots = asyncio.Semaphore(
            max(1, UPDATES_IN_FLIGHT_BYTES // max(1, codec.encoded_size(self.global_state))))
        self._offline_sent = False

    def _initial_model(self) -> torch.nn.Module:
        torch.manual_seed(self.cfg.common.random_seed)
        return self.pm.model(self.cfg.model.model)(self.cfg, self.dataset.output_dim)

    # -- messages -----------------------------------------------------------------------------
    def _envelope(self, type_: MsgType, round_: int, body: dict[str, Any]) -> bytes:
        return encode_envelope(self.signer.sign(
            Envelope(type=type_, run_id=self.cfg.run_id, round=round_, sender=0, body=body)))

    def _to_event(self, msg: Incoming) -> Event | None:
        parsed = topics.parse_silo_topic(self.cfg.run_id, msg.topic)
        if parsed is None or not msg.payload:
            return None
        kind, rank = parsed
        try:
            env = decode_envelope(msg.payload, max_bytes=MAX_ENVELOPE)
            if env.run_id != self.cfg.run_id or env.sender != rank:
                raise EnvelopeError(f"run_id {env.run_id!r} or sender {env.sender} does not match the topic")
            self.verifier.check(env)
        except EnvelopeError as exc:
            log.warning("message_rejected", topic=msg.topic, reason=str(exc))
            return None
        if kind == "status" and env.type is MsgType.STATUS:
            # A replayed old status (say "offline") must not override a newer one. (Not timestamps:
            # a last-will is signed when its silo connects, long before it is published; each
            # connection has a will of its own, so a second real disconnection is not a replay.)
            seen = self.status_ids.setdefault(rank, set())
            if env.msg_id in seen and not msg.retain:
                log.warning("message_rejected", topic=msg.topic, reason="replayed status message")
                return None
            seen.add(env.msg_id)
            online = env.body["state"] == "online"
            return Event(Ev.SILO_ONLINE if online else Ev.SILO_OFFLINE, rank=rank)
        if kind == "update" and env.type is MsgType.UPDATE:
            self.announced[(rank, env.round, env.msg_id)] = env
            if env.body["payload"].key is not None and 0 <= env.round <= self.machine.round + 1:
                self._s3_rounds.add(env.round)  # retention deletes its objects (late ones too)
            return Event(Ev.UPDATE_RECEIVED, rank=rank, round=env.round, name=env.msg_id)
        log.warning("message_rejected", topic=msg.topic, reason=f"{env.type.value} not expected on this topic")
        return None

    async def _reader(self, link: MqttLink) -> None:
        await pump_messages(link.incoming, self._to_event, self.queue, log)

    # -- effects ------------------------------------------------------------------------------
    async def _publish_global(self, fx: Effect) -> Event:
        r, selected = fx.args["round"], fx.args["selected"]
        # Streamed: uploaded and hashed from the tensors' own memory, never assembled.
        ref = await publish_state(self.store, s3keys.global_key(self.cfg.run_id, r), self.global_state,
                                  self.cfg.comm.inline_payload_max_bytes)
        if ref.key is not None:
            self._s3_rounds.add(r)
        # Never announce a round before its predecessor is checkpointed: the checkpoint points to
        # this very payload (the model after round r - 1), so it costs no second upload.
        await self._commit_checkpoint(ref)
        body = {"selected": list(selected), "payload": ref, "deadline_s": self.cfg.train.round_deadline_s}
        await self.link.publish(topics.broadcast(self.cfg.run_id), self._envelope(MsgType.ROUND_START, r, body),
                                retain=True)
        # The accumulator is set up while the silos fetch and train (no update can be folded
        # before this effect returns: the consumer performs effects one at a time).
        await self._begin_collect(r, selected)
        log.info("round_started", round=r, selected=list(selected), payload_bytes=ref.size,
                 inline=ref.inline is not None)
        return Event(Ev.GLOBAL_PUBLISHED, round=r)

    async def _begin_collect(self, r: int, selected: Any) -> None:
        self.round_started = time.monotonic()
        # Announcements the machine dropped (stale, duplicate, foreign) are never fetched.
        self.announced = {k: v for k, v in self.announced.items() if k[1] >= r}
        await off_loop(self.aggregator.begin_round, self.global_state, r, nbytes=self.model_bytes)
        self.round_stats[r] = {"silos": [], "num_samples": 0, "loss_sum": 0.0}
        self.notifier.status(f"round {r + 1}/{self.cfg.train.comm_round}: collecting from silos "
                             f"{', '.join(map(str, selected))}")

    async def _fetch_update(self, rank: int, round_: int, msg_id: str) -> None:
        env = self.announced.pop((rank, round_, msg_id), None)
        await self._update_slots.acquire()
        posted = False
        try:
            if env is None:
                raise WireError("announcement vanished")
            ref = env.body["payload"]
            data = await fetch_payload(self.store, ref, max_bytes=self.max_payload)
            state = await decode_payload(data, self.layout, self.max_payload)
            self._release_verified(rank)  # a stale entry of this silo's would keep its slot
            self.verified[rank] = (state, env)
            self.queue.put_nowait(Event(Ev.UPDATE_VERIFIED, rank=rank, round=round_))
            posted = True
        except (OctopusError, KeyError) as exc:
            log.warning("update_rejected", silo=rank, round=round_, reason=str(exc))
            self.queue.put_nowait(Event(Ev.UPDATE_REJECTED, rank=rank, round=round_, detail=str(exc)))
            return
        finally:
            if not posted:
                self._update_slots.release()

    def _release_verified(self, rank: int) -> None:
        """Forget a verified update the machine dropped (or replaced): its slot is free again."""
        if self.verified.pop(rank, None) is not None:
            self._update_slots.release()

    async def _fold(self, rank: int, round_: int) -> None:
        state, env = self.verified.pop(rank)
        n = int(env.body["num_samples"])
        try:
            await off_loop(self.aggregator.accumulate, state, n, rank, nbytes=self.model_bytes)
        finally:
            del state
            self._update_slots.release()
        stats = self.round_stats[round_]
        stats["silos"].append(rank)
        stats["num_samples"] += n
        loss = env.body.get("train_loss")
        if isinstance(loss, float) and loss == loss:
            stats["loss_sum"] += loss * n
        log.info("update_folded", silo=rank, round=round_, num_samples=n)

    async def _aggregate(self, fx: Effect) -> Event:
        new_state = await off_loop(self.aggregator.finish_round, nbytes=self.model_bytes)
        self.global_state = {k: v.contiguous() for k, v in new_state.items()}
        return Event(Ev.AGGREGATED, round=fx.args["round"])

    def _evaluate_sync(self) -> tuple[float, float]:
        if self._test_set is None:
            self._test_set = self.dataset.test_set()
        if not self._stateless_eval:
            self.model.load_state_dict(self.global_state)
        self.model.eval()
        loader = torch.utils.data.DataLoader(self._test_set, batch_size=1024)
        correct, loss, n = 0, 0.0, 0
        loss_fn = torch.nn.CrossEntropyLoss(reduction="sum")
        with torch.no_grad():
            for x, y in loader:
                out = torch.func.functional_call(self.model, self.global_state, (x,)) \
                    if self._stateless_eval else self.model(x)
                loss += float(loss_fn(out, y))
                correct += int((out.argmax(1) == y).sum())
                n += len(y)
        return correct / max(n, 1), loss / max(n, 1)

    async def _evaluate(self, fx: Effect) -> Event:
        r = fx.args["round"]
        acc, loss = await asyncio.to_thread(self._evaluate_sync)
        stats = self.round_stats.pop(r, {"silos": [], "num_samples": 0, "loss_sum": 0.0})
        record = {"round": r, "test_acc": acc, "test_loss": loss, "silos": sorted(stats["silos"]),
                  "num_samples": stats["num_samples"],
                  "train_loss": stats["loss_sum"] / stats["num_samples"] if stats["num_samples"] else None,
                  "round_seconds": round(time.monotonic() - self.round_started, 4),
                  "time": time.time()}
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        log.info("round_complete", round=r, rounds=self.cfg.train.comm_round, test_acc=round(acc, 4),
                 test_loss=round(loss, 4), silos=record["silos"], round_seconds=record["round_seconds"])
        return Event(Ev.EVALUATED, round=r)

    async def _checkpoint(self, fx: Effect) -> Event:
        self._pending_checkpoint = (fx.args["round"], self.aggregator.state_dict(), sorted(self.machine.online))
        return Event(Ev.CHECKPOINTED, round=fx.args["round"])

    async def _commit_checkpoint(self, ref: PayloadRef, final: bool = False) -> None:
        """Commit the pending checkpoint, whose model ``ref`` describes; retention of its round's
        payloads follows behind, after the S3 replica that no longer refers to them."""
        if self._pending_checkpoint is None:
            return
        r, agg, roster = self._pending_checkpoint
        await self.checkpointer.commit(self.store, r, ref, agg, roster, after=lambda: self._apply_retention(r),
                                       final=final)
        self._pending_checkpoint = None

    async def _flush_checkpoint(self) -> None:
        """Commit a pending checkpoint that no next round will publish the model for (the last
        round, an exit), and wait for everything behind it."""
        if self._pending_checkpoint is not None:
            ref = await publish_state(self.store, self.checkpointer.final_model_key(), self.global_state,
                                      self.cfg.comm.inline_payload_max_bytes)
            await self._commit_checkpoint(ref, final=True)
        await self.checkpointer.finish(self.store)

    async def _apply_retention(self, r: int) -> None:
        # Retention: payloads of rounds older than the last keep_rounds closed ones are deleted
        # (they are no longer needed, and moto keeps everything in memory).
        old = r - self.cfg.comm.s3.keep_rounds
        due = sorted(x for x in self._s3_rounds if x <= old)
        keys = [key for x in due for key in [s3keys.global_key(self.cfg.run_id, x)] + [
            s3keys.update_key(self.cfg.run_id, x, k) for k in range(1, self.cfg.train.client_num_in_total + 1)]]
        if keys:
            with contextlib.suppress(OctopusError):
                await self.store.delete(keys)
                self._s3_rounds.difference_update(due)

    async def _publish_finish(self, reason: str) -> None:
        await self._flush_checkpoint()
        final = self.run_dir / "final_model.octt"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        data = await asyncio.to_thread(codec.encode_state, self.global_state)
        tmp = final.with_suffix(".tmp")
        await asyncio.to_thread(tmp.write_bytes, data)
        os.replace(tmp, final)
        await self.link.publish(topics.broadcast(self.cfg.run_id),
                                self._envelope(MsgType.FINISH, self.machine.round, {"reason": reason}),
                                retain=True)
        log.info("run_finished", reason=reason, final_model=str(final))
        self.notifier.status(f"finished: {reason}")

    async def _perform(self, fx: Effect) -> Event | None:
        k, a = fx.kind, fx.args
        if k == "set_timer":
            self.timers.set(a["name"], a["delay"], Event(Ev.TIMER, name=a["name"], round=a["round"]))
        elif k == "cancel_timer":
            self.timers.cancel(a["name"])
        elif k in ("log", "drop"):
            if k == "drop" and a.get("ev") == Ev.UPDATE_VERIFIED.value:
                self._release_verified(a["silo"])
            if a.get("msg") == "waiting_for_silos":
                self.notifier.status(f"round {self.machine.round + 1}/{self.cfg.train.comm_round}: waiting "
                                     f"for silos ({len(a['online'])} of {a['need']} online)")
            log.info(a.get("msg", "message_dropped"),
                                                   **{x: y for x, y in a.items() if x != "msg"})
        elif k == "publish_global":
            return await self._publish_global(fx)
        elif k == "fetch_update":
            self.tasks.add(asyncio.create_task(self._fetch_update(a["rank"], a["round"], a["msg_id"])))
        elif k == "fold_update":
            await self._fold(a["rank"], a["round"])
        elif k == "aggregate":
            return await self._aggregate(fx)
        elif k == "evaluate":
            return await self._evaluate(fx)
        elif k == "checkpoint":
            return await self._checkpoint(fx)
        elif k == "publish_finish":
            await self._publish_finish(a["reason"])
            return Event(Ev.FINISHED)
        elif k == "fail":
            log.error("run_failed", reason=a["reason"], exit_code=a["code"])
            with contextlib.suppress(Exception):
                async with asyncio.timeout(10):
                    await self._publish_finish(f"failed: {a['reason']}")
            raise DaemonExit(a["code"], a["reason"])
        elif k == "exit":
            with contextlib.suppress(Exception):
                await self._flush_checkpoint()
            raise DaemonExit(a["code"], a.get("reason", ""))
        else:
            raise OctopusError(f"server: unknown effect {k}")
        return None

    async def _dispatch(self, event: Event) -> None:
        pending = [event]
        while pending:
            for fx in self.machine.handle(pending.pop(0)):
                _t0 = time.perf_counter()
                follow = await self._perform(fx)
                if os.environ.get("OCTO_PROF"):
                    log.info("prof", kind=fx.kind, ms=round(1000 * (time.perf_counter() - _t0), 3))
                if follow is not None:
                    pending.append(follow)

    async def _consume(self, start_round: int, adopt: Envelope | None) -> None:
        try:
            if start_round >= self.cfg.train.comm_round:
                log.info("run_already_complete", rounds=self.cfg.train.comm_round)
                await self._publish_finish("completed")
                raise DaemonExit(int(ExitCode.OK), "already complete")
            if adopt is not None:
                selected = tuple(adopt.body["selected"])
                await self._begin_collect(adopt.round, selected)
                effects = self.machine.resume_collect(adopt.round, selected)
            else:
                effects = self.machine.start(start_round)
            for fx in effects:
                await self._perform(fx)
            while True:
                await self._dispatch(await self.queue.get())
        except DaemonExit:
            await self._announce_offline()
            raise

    async def _announce_offline(self) -> None:
        """Publish the retained "offline" status (a clean disconnect does not fire the will)."""
        if self._offline_sent or not self.link.ever_connected.is_set():
            return
        self._offline_sent = True
        with contextlib.suppress(Exception):
            await self.link.publish(topics.server_status(self.cfg.run_id),
                                    self._envelope(MsgType.STATUS, -1, {"state": "offline"}), retain=True,
                                    timeout_s=min(5.0, self.life.shutdown_grace_s / 4))

    async def _watch_shutdown(self) -> None:
        """On SIGTERM/SIGINT: let the machine end the run; cut it short past half the grace."""
        await self.shutdown.event.wait()
        self.notifier.stopping("stopping: signal")
        if self.serving.is_set():
            self.queue.put_nowait(Event(Ev.SHUTDOWN))
            # Normally the consumer ends the task group long before this deadline passes.
            await asyncio.sleep(self.life.shutdown_grace_s / 2)
            log.warning("shutdown_cut_short", waited_s=self.life.shutdown_grace_s / 2)
        await self._announce_offline()
        raise DaemonExit(int(ExitCode.OK), "signal")

    async def _retained_announcement(self) -> Envelope | None:
        """The round announcement a previous server process of this run left retained, if any
        (checked like any message: well-formed, ours, signed by us when we sign)."""
        try:
            raw = await self.link.fetch_retained(topics.broadcast(self.cfg.run_id),
                                                 timeout_s=min(10.0, self.life.connect_timeout_s))
        except Exception as exc:  # best effort: without it the round is announced again
            log.warning("retained_read_failed", error=repr(exc))
            return None
        if not raw:
            return None
        try:
            env = decode_envelope(raw, max_bytes=MAX_ENVELOPE)
            if env.type is not MsgType.ROUND_START or env.run_id != self.cfg.run_id or env.sender != 0:
                return None
            own = {0: self.signer.key.public_key()} if self.signer.key is not None else {}
            security.Verifier(own, self.verifier.required).check(env)
        except EnvelopeError as exc:
            log.warning("retained_announcement_rejected", reason=str(exc))
            return None
        return env

    async def _adoptable(self, env: Envelope | None, round_: int) -> Envelope | None:
        """``env`` if it announces ``round_`` for exactly our global model and its payload is
        still readable; else None (announce anew)."""
        if env is None or env.round != round_:
            return None
        ref: PayloadRef = env.body["payload"]
        data = await asyncio.to_thread(codec.encode_state, self.global_state)
        if await asyncio.to_thread(sha256_hex, data) != ref.sha256 or len(data) != ref.size:
            log.warning("retained_announcement_stale", round=round_)
            return None
        if ref.inline is None and not (ref.key and await self.store.exists(ref.key)):
            log.warning("retained_announcement_payload_missing", round=round_, key=ref.key)
            return None
        return env

    async def _catch_up(self, env: Envelope | None, checkpoint_round: int) -> Envelope | None:
        """The announcement of a round past our checkpoint's successor, adopted with its model.

        That happens when the local state was lost and the S3 replica lags (see
        octopusd.server.checkpoint): the silos have finished rounds the checkpoint has not seen
        and would ignore older announcements. The retained announcement carries the model after
        the round before it (verified by its sha256), so the run goes on from there; only the
        aggregator's own state, if it keeps any, is the checkpoint's.
        """
        if env is None or env.round <= checkpoint_round + 1 or env.round >= self.cfg.train.comm_round:
            return None
        try:
            data = await fetch_payload(self.store, env.body["payload"], max_bytes=self.max_payload)
            state = await decode_payload(data, self.layout, self.max_payload)
        except OctopusError as exc:
            log.warning("retained_announcement_unusable", round=env.round, reason=str(exc))
            return None
        self.global_state = {k: v.clone() for k, v in state.items()}
        log.warning("resumed_from_announcement", checkpoint_round=checkpoint_round, round=env.round,
                    reason="the checkpoint is older than the round the silos were told about")
        return env

    async def _start_up(self, tg: asyncio.TaskGroup) -> None:
        cfg = self.cfg
        await self.store.ensure_bucket()
        resumed = await self.checkpointer.resume_round(self.store, self)
        start_round = 0 if resumed is None else resumed
        await self.link.wait_first_connection(self.life.connect_timeout_s)
        adopt = None
        if start_round < cfg.train.comm_round:
            retained = await self._retained_announcement()
            adopt = await self._adoptable(retained, start_round)
            if adopt is None and resumed is not None:
                adopt = await self._catch_up(retained, resumed - 1)
                start_round = adopt.round if adopt is not None else start_round
        # What a previous process may have left in S3 without deleting it yet.
        self._s3_rounds.update(range(max(0, start_round - 2 - cfg.comm.s3.keep_rounds), start_round + 1))
        if resumed is None and adopt is None:
            # A fresh run: clear what a previous run of this id left retained.
            await self.link.publish(topics.broadcast(cfg.run_id), b"", retain=True)
        log.info("server_ready", run_id=cfg.run_id, rounds=cfg.train.comm_round,
                 start_round=start_round, resumed=resumed is not None, adopted_round=adopt is not None,
                 silos=cfg.train.client_num_in_total,
                 dataset_source=getattr(self.dataset, "source", cfg.data.dataset))
        self.notifier.ready(f"round {start_round + 1}/{cfg.train.comm_round}: starting")
        tg.create_task(self._reader(self.link), name="reader")
        self.serving.set()
        await self._consume(start_round, adopt)

    # -- lifecycle ----------------------------------------------------------------------------
    async def run(self) -> int:
        """Serve the federation until it finishes (0) or fails (an ExitCode)."""
        cfg = self.cfg
        self.timers = Timers(self.queue.put_nowait)
        self.tasks: set[asyncio.Task[Any]] = set()
        self.serving = asyncio.Event()
        status = topics.server_status(cfg.run_id)

        def offline_will() -> bytes:
            return self._envelope(MsgType.STATUS, -1, {"state": "offline"})

        async def on_connect() -> None:
            await self.link.publish(status, self._envelope(MsgType.STATUS, -1, {"state": "online"}), retain=True)

        self.link = MqttLink(cfg.comm.mqtt, f"octopusd-{cfg.run_id}-server", will=(status, offline_will),
                             subscriptions=topics.silo_wildcards(cfg.run_id), on_connect=on_connect,
                             first_connect_timeout_s=self.life.connect_timeout_s)
        structlog.contextvars.bind_contextvars(run_id=cfg.run_id, role="server")
        try:
            async with PayloadStore(cfg.comm.s3) as self.store, asyncio.TaskGroup() as tg:
                tg.create_task(self._watch_shutdown(), name="shutdown")
                tg.create_task(self.notifier.watchdog_loop(), name="watchdog")
                tg.create_task(self.link.run(), name="mqtt")
                tg.create_task(self._start_up(tg), name="rounds")
        except BaseExceptionGroup as group:
            return await self._finish(group)
        finally:
            self.notifier.stopping()
        return int(ExitCode.OK)

    async def _finish(self, group: BaseExceptionGroup) -> int:
        done = first_daemon_exit(group)
        self.timers.cancel_all()
        for t in self.tasks:
            t.cancel()
        if done is None:
            raise group
        log.info("server_exit", code=done.code, reason=done.reason)
        return done.code
