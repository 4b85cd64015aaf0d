"""The silo-master daemon: performs the effects of the silo round state machine.

The only process of a silo that speaks MQTT. It launches and supervises the trainer group,
fetches and verifies the global model for rounds that select it, hands it to the group, and
uploads the trained model with its sample count. A round it cannot complete is reported in the
log and skipped — the server's deadline and quorum decide what happens to the round.
"""
from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import structlog

from octopusd import security
from octopusd.config import Config
from octopusd.envelope import Envelope, MsgType, decode_envelope, encode_envelope
from octopusd.errors import EnvelopeError, ExitCode, OctopusError, TrainerError
from octopusd.lifecycle import lifecycle
from octopusd.notify import Notifier
from octopusd.payload import fetch_payload, publish_payload
from octopusd.plugins import PluginManager, load_plugins
from octopusd.runtime import DaemonExit, Shutdown, first_daemon_exit, pump_messages
from octopusd.server.machine import Effect
from octopusd.silo.group import TrainerGroup, TrainResult
from octopusd.silo.machine import Ev, Event, SiloMachine
from octopusd.transport import s3 as s3keys, topics
from octopusd.transport.mqtt import Incoming, MqttLink
from octopusd.transport.s3 import PayloadStore

log = structlog.get_logger("octopusd.silo")
MAX_ENVELOPE = 16 * 2**20
MAX_MODEL = 2**34


class SiloDaemon:
    def __init__(self, cfg: Config, *, plugins: PluginManager | None = None,
                 shutdown: Shutdown | None = None, trainer_entry: tuple[str, ...] | None = None,
                 notifier: Notifier | None = None) -> None:
        if cfg.rank < 1:
            raise OctopusError("a silo's rank must be at least 1 (rank 0 is the server)")
        self.cfg = cfg
        self.life = lifecycle(cfg)
        self.signer, self.verifier = security.from_config(cfg)
        self.pm = plugins or load_plugins(cfg.plugin_dirs)
        if trainer_entry is None:
            # Unknown dataset/model names fail here, before any process is launched.
            self.pm.dataset(cfg.data.dataset)
            self.pm.model(cfg.model.model)
        launcher_name = cfg.dist.launcher or ("torchrun" if cfg.dist.n_node_in_silo == 1 else "pdsh")
        # Stopping the group (ask rank 0, then SIGTERM, then SIGKILL) must fit in the shutdown grace.
        self.group = TrainerGroup(cfg, self.pm.launcher(launcher_name)(cfg), entry=trainer_entry,
                                  stop_grace_s=self.life.shutdown_grace_s * 0.3)
        self.shutdown = shutdown or Shutdown()
        if self.shutdown.grace_s is None:
            self.shutdown.grace_s = self.life.shutdown_grace_s
        self.notifier = notifier or Notifier()
        self.last_update: tuple[int, bytes] | None = None   # (round, envelope) of the last upload
        self.machine = SiloMachine(cfg.rank)
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.global_bytes: Any = b""  # bytes, or a channel.SharedBlob when large
        self.result: TrainResult | None = None
        self.tasks: set[asyncio.Task[Any]] = set()
        self.tg: asyncio.TaskGroup | None = None

    def _envelope(self, type_: MsgType, round_: int, body: dict[str, Any]) -> bytes:
        return encode_envelope(self.signer.sign(Envelope(type=type_, run_id=self.cfg.run_id, round=round_,
                                                         sender=self.cfg.rank, body=body)))

    # -- messages -----------------------------------------------------------------------------
    def _to_event(self, msg: Incoming) -> Event | None:
        server_status = msg.topic == topics.server_status(self.cfg.run_id)
        if (msg.topic != topics.broadcast(self.cfg.run_id) and not server_status) or not msg.payload:
            return None
        try:
            env = decode_envelope(msg.payload, max_bytes=MAX_ENVELOPE)
            if env.run_id != self.cfg.run_id or env.sender != 0:
                raise EnvelopeError("not from this run's server")
            self.verifier.check(env)
        except EnvelopeError as exc:
            log.warning("message_rejected", topic=msg.topic, reason=str(exc))
            return None
        if server_status:
            # A server process came (back) online: it may have lost an update it had taken.
            if env.type is MsgType.STATUS and env.body["state"] == "online":
                self._spawn(self._resend_last_update())
            return None
        if env.type is MsgType.ROUND_START:
            return Event(Ev.ROUND_START, round=env.round, selected=tuple(env.body["selected"]), token=env)
        if env.type is MsgType.FINISH:
            log.info("finish_received", reason=env.body.get("reason"))
            return Event(Ev.FINISH)
        log.warning("message_rejected", topic=msg.topic, reason=f"{env.type.value} not expected here")
        return None

    async def _reader(self) -> None:
        await pump_messages(self.link.incoming, self._to_event, self.queue, log)

    # -- effects (long ones run as tasks that post their completion) --------------------------
    async def _launch(self) -> None:
        try:
            await self.group.start()
        except TrainerError as exc:
            self.queue.put_nowait(Event(Ev.GROUP_FAILED, detail=str(exc)))
            return
        self.queue.put_nowait(Event(Ev.GROUP_READY))

    async def _fetch(self, round_: int, env: Envelope) -> None:
        try:
            # Downloaded straight into shared memory when large: it goes to rank 0 by descriptor.
            self.global_bytes = await fetch_payload(self.store, env.body["payload"], max_bytes=MAX_MODEL,
                                                    alloc=self.group.shm.alloc)
        except OctopusError as exc:
            self.queue.put_nowait(Event(Ev.GLOBAL_REJECTED, round=round_, detail=str(exc)))
            return
        self.queue.put_nowait(Event(Ev.GLOBAL_FETCHED, round=round_))

    async def _train(self, round_: int) -> None:
        try:
            self.result = await self.group.train(round_, self.global_bytes)
        except OctopusError as exc:
            self.queue.put_nowait(Event(Ev.TRAIN_FAILED, round=round_, detail=str(exc)))
            return
        self.queue.put_nowait(Event(Ev.TRAINED, round=round_))

    async def _upload(self, round_: int) -> None:
        res = self.result
        assert res is not None and res.round == round_
        try:
            ref = await publish_payload(self.store, s3keys.update_key(self.cfg.run_id, round_, self.cfg.rank),
                                        res.model, self.cfg.comm.inline_payload_max_bytes)
            body = {"payload": ref, "num_samples": res.num_samples, "train_loss": res.train_loss,
                    "train_seconds": res.train_seconds}
            envelope = self._envelope(MsgType.UPDATE, round_, body)
            await self.link.publish(topics.silo_update(self.cfg.run_id, self.cfg.rank), envelope)
            self.last_update = (round_, envelope)
            self.notifier.status(f"idle: round {round_ + 1} uploaded")
            log.info("update_sent", round=round_, num_samples=res.num_samples, bytes=ref.size,
                     train_loss=round(res.train_loss, 6), train_seconds=round(res.train_seconds, 3))
        except OctopusError as exc:
            log.error("update_upload_failed", round=round_, error=str(exc))
        self.queue.put_nowait(Event(Ev.UPLOADED, round=round_))

    async def _resend_last_update(self) -> None:
        """A server (re)started: send our last update again, in case it was received by a server
        process that died before checkpointing its round. The same message id, so a server that
        has it already drops the copy; one for a closed round is dropped as stale."""
        if self.last_update is None:
            return
        round_, envelope = self.last_update
        log.info("update_resent", round=round_)
        await self.link.publish(topics.silo_update(self.cfg.run_id, self.cfg.rank), envelope)

    def _spawn(self, coro: Any) -> None:
        # In the daemon's task group: an unexpected exception ends the daemon (exit 1, a restart
        # under systemd) instead of leaving the machine waiting for a completion forever.
        task = self.tg.create_task(coro) if self.tg is not None else asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _perform(self, fx: Effect) -> None:
        k, a = fx.kind, fx.args
        if k == "launch_group":
            self._spawn(self._launch())
        elif k == "fetch_global":
            self._spawn(self._fetch(a["round"], a["token"]))
        elif k == "train":
            self.notifier.status(f"training round {a['round'] + 1}")
            self._spawn(self._train(a["round"]))
        elif k == "upload":
            self._spawn(self._upload(a["round"]))
        elif k == "publish_status":
            await self._publish_status(a["state"])
        elif k == "stop_group":
            self.notifier.status("stopping the trainer group")
            await self._stop_group()
        elif k in ("log", "drop"):
            log.info(a.get("msg", "message_dropped"),
                                                   **{x: y for x, y in a.items() if x != "msg"})
        elif k == "exit":
            raise DaemonExit(a["code"], a.get("reason", ""))
        else:
            raise OctopusError(f"silo: unknown effect {k}")

    async def _publish_status(self, state: str) -> None:
        body: dict[str, Any] = {"state": state}
        if state == "online":
            body["num_samples"] = self.group.num_samples
        with contextlib.suppress(TimeoutError):
            await self.link.publish(topics.silo_status(self.cfg.run_id, self.cfg.rank),
                                    self._envelope(MsgType.STATUS, -1, body), retain=True,
                                    timeout_s=None if state == "online" else 5)

    async def _consume(self) -> None:
        for fx in self.machine.start():
            await self._perform(fx)
        while True:
            event = await self.queue.get()
            for fx in self.machine.handle(event):
                await self._perform(fx)

    async def _stop_group(self) -> None:
        for t in list(self.tasks):
            t.cancel()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self.life.shutdown_grace_s * 0.7):
                await self.group.close()

    async def _watch_shutdown(self) -> None:
        """On SIGTERM/SIGINT: the machine stops the group and says offline; cut short near the grace."""
        await self.shutdown.event.wait()
        self.notifier.stopping("stopping: signal")
        if self.serving.is_set():
            self.queue.put_nowait(Event(Ev.SHUTDOWN))
            # Normally the consumer ends the task group long before this deadline passes.
            await asyncio.sleep(self.life.shutdown_grace_s * 0.75)
            log.warning("shutdown_cut_short", waited_s=self.life.shutdown_grace_s * 0.75)
        raise DaemonExit(int(ExitCode.OK), "signal")

    async def _start_up(self, tg: asyncio.TaskGroup) -> None:
        self.tg = tg
        await self.link.wait_first_connection(self.life.connect_timeout_s)
        log.info("silo_ready", run_id=self.cfg.run_id, world_size=self.cfg.world_size)
        self.notifier.ready("connected; starting the trainer group")
        tg.create_task(self._reader(), name="reader")
        self.serving.set()
        await self._consume()

    async def run(self) -> int:
        cfg = self.cfg
        self.serving = asyncio.Event()
        status = topics.silo_status(cfg.run_id, cfg.rank)
        will = (status, lambda: self._envelope(MsgType.STATUS, -1, {"state": "offline"}))

        async def on_connect() -> None:
            if self.machine.state.value not in ("starting", "done"):
                await self._publish_status("online")

        self.link = MqttLink(cfg.comm.mqtt, f"octopusd-{cfg.run_id}-silo-{cfg.rank}", will=will,
                             subscriptions=[topics.broadcast(cfg.run_id), topics.server_status(cfg.run_id)],
                             on_connect=on_connect, first_connect_timeout_s=self.life.connect_timeout_s)
        structlog.contextvars.bind_contextvars(run_id=cfg.run_id, role="silo", silo=cfg.rank)
        try:
            async with PayloadStore(cfg.comm.s3) as self.store, asyncio.TaskGroup() as tg:
                tg.create_task(self._watch_shutdown(), name="shutdown")
                tg.create_task(self.notifier.watchdog_loop(), name="watchdog")
                tg.create_task(self.link.run(), name="mqtt")
                tg.create_task(self._start_up(tg), name="rounds")
        except BaseExceptionGroup as group:
            done = first_daemon_exit(group)
            if done is None:
                raise
            log.info("silo_exit", code=done.code, reason=done.reason)
            return done.code
        finally:
            self.notifier.stopping()
            await self._stop_group()
        return int(ExitCode.OK)
