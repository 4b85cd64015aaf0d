"""Built-in launcher ``torchrun``: the silo's trainer group on this node, via torchrun.

Static rendezvous on ``master_address:launcher_rdzv_port`` (a free port when 0). torchrun runs in
its own session and gets SIGTERM if the silo master dies; its workers get SIGKILL if torchrun
dies (see the worker), so no trainer outlives its silo master.
"""
from __future__ import annotations

import asyncio
import os

from octopusd.hookspecs import hookimpl
from octopusd.procs import set_parent_death_signal, terminate_tree
from octopusd.silo.group import LaunchSpec


class LocalGroup:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.pid = proc.pid

    async def wait(self) -> int:
        return await self.proc.wait()

    async def stop(self, grace_s: float) -> None:
        await terminate_tree(self.proc, grace_s)


def torchrun_argv(spec: LaunchSpec, *, nnodes: int, node_rank: str) -> list[str]:
    return [spec.python, "-m", "torch.distributed.run",
            "--nnodes", str(nnodes), "--nproc_per_node", str(spec.nproc_per_node),
            "--node_rank", node_rank, "--master_addr", spec.master_address,
            "--master_port", str(spec.master_port), "--max_restarts", "0",
            *spec.worker_argv]


class TorchrunLauncher:
    def __init__(self, config: object) -> None:
        self.config = config

    async def start(self, spec: LaunchSpec) -> LocalGroup:
        argv = torchrun_argv(spec, nnodes=1, node_rank="0")
        proc = await asyncio.create_subprocess_exec(
            *argv, env={**os.environ, **spec.env}, start_new_session=True,
            preexec_fn=set_parent_death_signal)
        return LocalGroup(proc)


@hookimpl
def octopus_register_launchers(register):
    register.add("torchrun", TorchrunLauncher, summary="torchrun on this node (n_node_in_silo = 1)")
