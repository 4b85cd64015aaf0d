"""The silo master's trainer group: launch through the launcher plugin, talk to rank 0, supervise.

:class:`TrainerGroup` owns the local channel's listening socket, the launcher handle and the
connection from rank 0. ``train()`` sends a global model and awaits the result while watching the
group's processes: if the group dies mid-round it is stopped everywhere, relaunched (up to
``max_group_restarts`` times per round) and the round retrained; if that keeps failing the round
fails with :class:`~octopusd.errors.TrainerError` and the daemon reports it — never a silent hang.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol

import structlog

from octopusd.config import Config
from octopusd.errors import TrainerError, WireError
from octopusd.trainer import channel

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class LaunchSpec:
    """Everything a launcher needs to start one silo's trainer group."""

    silo_rank: int
    nnodes: int
    nproc_per_node: int
    master_address: str
    master_port: int
    node_addresses: tuple[str, ...]
    network_interface: str | None
    python: str
    worker_argv: tuple[str, ...]                   # after "python -m torch.distributed.run ..."
    env: Mapping[str, str] = field(default_factory=dict)
    pdsh_rcmd: str = "ssh"
    node_command_prefix: str = ""
    pdsh_hosts: tuple[str, ...] = ()           # pdsh targets; default: node_addresses
    marker: str = ""                           # unique text in every trainer's command line


class GroupHandle(Protocol):
    pid: int

    async def wait(self) -> int: ...
    async def stop(self, grace_s: float) -> None: ...


class Launcher(Protocol):
    async def start(self, spec: LaunchSpec) -> GroupHandle: ...


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class TrainResult:
    round: int
    model: bytes | bytearray
    num_samples: int
    train_loss: float
    train_seconds: float


class TrainerGroup:
    def __init__(self, cfg: Config, launcher: Launcher, *, stop_grace_s: float = 15.0,
                 entry: tuple[str, ...] | None = None) -> None:
        self.cfg = cfg
        # What torchrun runs on each rank: our worker module, or a user's script (Python API).
        self.entry = entry
        self.launcher = launcher
        self.stop_grace_s = stop_grace_s
        self._dir = tempfile.mkdtemp(prefix="octopusd-")
        self.socket_path = os.path.join(self._dir, f"silo{cfg.rank}.sock")
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._conn: asyncio.Queue[socket.socket] = asyncio.Queue()
        self._sock: socket.socket | None = None       # the connection from rank 0
        self.handle: GroupHandle | None = None
        self._exit: asyncio.Task[int] | None = None
        self.num_samples = 0
        self.launches = 0
        # Large models go to rank 0 and back by shared memory, the buffers reused every round.
        self.shm = channel.SharedMemory()

    def spec(self) -> LaunchSpec:
        d = self.cfg.dist
        port = d.launcher_rdzv_port or free_port()
        env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
               "PYTHONUNBUFFERED": "1"}
        if d.network_interface:
            env["GLOO_SOCKET_IFNAME"] = env["NCCL_SOCKET_IFNAME"] = d.network_interface
        env["OCTOPUSD_TRAINER_SOCKET"] = self.socket_path
        env["OCTOPUSD_RUN_ID"] = self.cfg.run_id
        if self.entry:  # the marker lets the pdsh launcher find this group's processes on every node
            argv = (*self.entry, f"--octopusd-trainer-socket={self.socket_path}")
        else:
            argv = ("-m", "octopusd.trainer.worker", "--cf", str(self.cfg.path.resolve()),
                              "--rank", str(self.cfg.rank), "--run-id", self.cfg.run_id, "--socket", self.socket_path)  # noqa: E501
        return LaunchSpec(silo_rank=self.cfg.rank, nnodes=d.n_node_in_silo, nproc_per_node=d.n_proc_per_node,
                          master_address=d.master_address, master_port=port,
                          node_addresses=d.node_addresses, network_interface=d.network_interface,
                          python=d.python or sys.executable, worker_argv=argv, env=env,
                          pdsh_rcmd=d.pdsh_rcmd, node_command_prefix=d.node_command_prefix,
                          pdsh_hosts=d.pdsh_hosts, marker=self.socket_path)

    async def start(self) -> None:
        """Launch the group and wait for rank 0's hello (bounded by trainer_start_timeout_s)."""
        if self._listener is None:
            self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._listener.bind(self.socket_path)
            os.chmod(self.socket_path, 0o600)
            self._listener.listen()
            self._listener.setblocking(False)
            self._accepting = asyncio.create_task(self._accept(), name="trainer-channel-accept")
        self.launches += 1
        self.handle = await self.launcher.start(self.spec())
        self._exit = asyncio.create_task(self.handle.wait(), name="trainer-group-exit")
        log.info("trainer_group_launched", pid=self.handle.pid, launch=self.launches,
                 world_size=self.cfg.world_size)
        try:
            async with asyncio.timeout(self.cfg.dist.trainer_start_timeout_s):
                self._sock = await self._race(self._conn.get(), "start")
                header, _ = await self._race(channel.read_frame(self._sock), "start")
        except TimeoutError:
            await self.stop()
            raise TrainerError(f"trainer group did not start within "
                               f"{self.cfg.dist.trainer_start_timeout_s:.0f} s") from None
        if header.get("op") != "hello":
            await self.stop()
            raise TrainerError(f"trainer rank 0 sent {header.get('op')!r} instead of hello")
        self.num_samples = int(header.get("num_samples", 0))
        log.info("trainer_group_ready", world_size=header.get("world_size"), num_samples=self.num_samples)

    async def _accept(self) -> None:
        assert self._listener is not None
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(self._listener)
            channel.tune(conn)
            self._conn.put_nowait(conn)

    async def _race(self, aw: Any, what: str) -> Any:
        """Await ``aw`` unless the group exits first."""
        task = asyncio.ensure_future(aw)
        assert self._exit is not None
        done, _ = await asyncio.wait({task, self._exit}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        raise TrainerError(f"trainer group exited with code {self._exit.result()} during {what}")

    async def _train_once(self, round_: int, model: bytes) -> TrainResult:
        if self._sock is None:
            raise TrainerError("trainer group is not running")
        await self._race(channel.send_frame(self._sock, {"op": "train", "round": round_}, model, self.shm),
                         f"round {round_}")
        header, blob = await self._race(channel.read_frame(self._sock, self.shm), f"round {round_}")
        if header.get("op") == "error":
            raise WireError(f"trainer rejected the global model: {header.get('message')}")
        if header.get("op") != "result" or header.get("round") != round_:
            raise TrainerError(f"unexpected trainer reply {header.get('op')!r} for round {header.get('round')}")
        return TrainResult(round_, blob, int(header["num_samples"]),
                           float(header.get("train_loss", float("nan"))), float(header.get("train_seconds", 0.0)))

    async def train(self, round_: int, model: bytes) -> TrainResult:
        """Train one round; relaunch and retrain if the group dies; TrainerError if it keeps dying."""
        attempts = self.cfg.dist.max_group_restarts + 1
        for attempt in range(1, attempts + 1):
            try:
                return await self._train_once(round_, model)
            except (TrainerError, ConnectionError, asyncio.IncompleteReadError) as exc:
                log.warning("trainer_group_failed", round=round_, attempt=attempt, error=str(exc))
                await self.stop()
                if attempt == attempts:
                    raise TrainerError(f"round {round_}: trainer group failed {attempts} times: {exc}") from exc
                await self.start()
        raise AssertionError("unreachable")

    async def stop(self) -> None:
        """Stop the group on every node: ask rank 0 politely, then the launcher stops the rest."""
        if self._sock is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await channel.send_frame(self._sock, {"op": "stop"})
            self._sock.close()
        self._sock = None
        self.shm.forget_incoming()
        if self.handle is not None and self._exit is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(5.0, self.stop_grace_s)):
                    await asyncio.shield(self._exit)
            await self.handle.stop(self.stop_grace_s)
            with contextlib.suppress(Exception):
                await self._exit
        self.handle = None
        self._exit = None

    async def close(self) -> None:
        await self.stop()
        if self._accepting is not None:
            self._accepting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accepting
            self._accepting = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        while not self._conn.empty():
            self._conn.get_nowait().close()
        with contextlib.suppress(OSError):
            os.unlink(self.socket_path)
        with contextlib.suppress(OSError):
            os.rmdir(self._dir)
