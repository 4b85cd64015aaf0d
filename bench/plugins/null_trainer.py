"""Bench launcher ``null``: a silo's "trainer group" as one asyncio task inside the silo master.

For scale benchmarks: the silo master stays protocol-complete (state machine, MQTT, S3, payload
verification, the local channel to rank 0), but no process is launched and nothing is trained.
The task connects to the silo's trainer socket like rank 0 would, says hello, and answers each
``train`` with the global model plus a deterministic perturbation (``+ 1e-3·((silo + round) mod 5
− 2)`` on floating tensors), so every round's FedAvg is predictable. Samples per silo:
``data_args.samples_per_silo`` (default 500).
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from typing import Any

from octopusd import codec
from octopusd.hookspecs import hookimpl
from octopusd.silo.group import LaunchSpec
from octopusd.trainer import channel


def perturb(state: dict[str, Any], silo: int, round_: int) -> dict[str, Any]:
    delta = 1e-3 * ((silo + round_) % 5 - 2)
    for t in state.values():
        if t.is_floating_point():
            t.add_(delta)
    return state


async def serve_rank0(socket_path: str, silo: int, num_samples: int) -> int:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        await loop.sock_connect(sock, socket_path)
        channel.tune(sock)
        await channel.send_frame(sock, {"op": "hello", "world_size": 1, "num_samples": num_samples,
                                        "pid": os.getpid()})
        while True:
            header, blob = await channel.read_frame(sock)
            if header["op"] == "stop":
                return 0
            round_ = int(header["round"])
            state = perturb(codec.decode_state(blob, copy=False), silo, round_)
            out = codec.encode_state(state)
            await channel.send_frame(sock, {"op": "result", "round": round_, "num_samples": num_samples,
                                            "train_loss": 0.0, "train_seconds": 0.0}, out)
    except (ConnectionError, asyncio.IncompleteReadError):
        return 1
    finally:
        sock.close()


class NullGroup:
    def __init__(self, task: asyncio.Task[int]) -> None:
        self.task = task
        self.pid = os.getpid()

    async def wait(self) -> int:
        return await asyncio.shield(self.task)

    async def stop(self, grace_s: float) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self.task


class NullLauncher:
    def __init__(self, config: Any) -> None:
        self.silo = int(config.rank)
        self.samples = int(config.data.extra.get("samples_per_silo", 500))

    async def start(self, spec: LaunchSpec) -> NullGroup:
        path = spec.env["OCTOPUSD_TRAINER_SOCKET"]
        return NullGroup(asyncio.create_task(serve_rank0(path, self.silo, self.samples),
                                             name=f"null-trainer-{self.silo}"))


@hookimpl
def octopus_register_launchers(register) -> None:
    register.add("null", NullLauncher,
                 summary="no processes: an in-process rank 0 that returns a perturbed global (benchmarks)")
