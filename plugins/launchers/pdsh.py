"""Built-in launcher ``pdsh``: a silo's trainer group across several nodes, via pdsh + torchrun.

For each node i of ``node_addresses`` (pdsh target ``pdsh_hosts[i]``, default the address) it runs
``pdsh -R <pdsh_rcmd> -w <host> <node_command_prefix> env GLOO_SOCKET_IFNAME=… torchrun --nnodes N
--node_rank i --master_addr <master_address> --master_port <launcher_rdzv_port> …``. The first node
is the master: trainer rank 0 runs there, next to the silo master, and hosts the static rendezvous
(torchrun's c10d rendezvous cannot tell which node should host the store when nodes share a host
name, e.g. network namespaces). ``%h`` in ``node_command_prefix`` is the node's pdsh host, so
``node_command_prefix: "ip netns exec %h"`` with ``pdsh_rcmd: exec`` drives namespace "nodes".

Stopping: the local pdsh processes and their children are terminated, then a ``pkill`` on every
node (through the same pdsh route) removes whatever still carries this group's unique marker in
its command line — with ssh, killing the local client alone would leave remote trainers running.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shlex
import shutil

import structlog

from octopusd.errors import TrainerError
from octopusd.hookspecs import hookimpl
from octopusd.procs import set_parent_death_signal, terminate_tree
from octopusd.silo.group import LaunchSpec

log = structlog.get_logger(__name__)


def _pdsh() -> str:
    exe = shutil.which("pdsh")
    if exe is None:
        raise TrainerError("pdsh is not installed (Debian package 'pdsh'); it launches multi-node silos")
    return exe


def _prefix(spec: LaunchSpec, host: str) -> list[str]:
    return shlex.split(spec.node_command_prefix.replace("%h", host)) if spec.node_command_prefix else []


def node_command(spec: LaunchSpec, node_rank: int) -> list[str]:
    """The command pdsh runs on node ``node_rank`` (environment passed explicitly: ssh drops it)."""
    host = (spec.pdsh_hosts or spec.node_addresses)[node_rank]
    env = {**spec.env, "OCTOPUSD_NODE_ADDR": spec.node_addresses[node_rank], "OCTOPUSD_NODE_RANK": str(node_rank)}
    torchrun = [spec.python, "-m", "torch.distributed.run", "--nnodes", str(spec.nnodes),
                "--nproc_per_node", str(spec.nproc_per_node), "--node_rank", str(node_rank),
                "--master_addr", spec.master_address, "--master_port", str(spec.master_port),
                "--max_restarts", "0", *spec.worker_argv]
    return [*_prefix(spec, host), "env", *(f"{k}={v}" for k, v in sorted(env.items())), *torchrun]


def pdsh_argv(spec: LaunchSpec, host: str, command: list[str]) -> list[str]:
    base = [_pdsh(), "-R", spec.pdsh_rcmd, "-w", host]
    if spec.pdsh_rcmd == "exec":  # exec keeps the words apart, as argv
        return base + command
    # Remote modules (ssh, rsh) join the words into one line for the remote shell: quote them.
    return base + [" ".join(shlex.quote(c) for c in command)]


def _unmatchable_pattern(marker: str) -> str:
    """A pkill -f pattern matching ``marker`` but not the pkill/pdsh command lines that carry it."""
    escaped = re.escape(marker)
    return f"[{escaped[0]}]{escaped[1:]}" if escaped and escaped[0] != "\\" else escaped


class PdshGroup:
    def __init__(self, spec: LaunchSpec, procs: list[asyncio.subprocess.Process]) -> None:
        self.spec = spec
        self.procs = procs
        self.pid = procs[0].pid

    async def wait(self) -> int:
        """Ends when any node's launcher ends: one node failing fails the whole group."""
        waits = [asyncio.ensure_future(p.wait()) for p in self.procs]
        done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for t in pending:
            t.cancel()
        return next(iter(done)).result()

    async def _pkill_everywhere(self, sig: str) -> None:
        if not self.spec.marker:
            return
        hosts = self.spec.pdsh_hosts or self.spec.node_addresses
        pattern = _unmatchable_pattern(self.spec.marker)
        runs = []
        for host in hosts:
            argv = pdsh_argv(self.spec, host, [*_prefix(self.spec, host), "pkill", f"-{sig}", "-f", pattern])
            runs.append(await asyncio.create_subprocess_exec(
                *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(30):
                await asyncio.gather(*(r.wait() for r in runs))

    async def stop(self, grace_s: float) -> None:
        await asyncio.gather(*(terminate_tree(p, grace_s) for p in self.procs))
        await self._pkill_everywhere("TERM")
        await self._pkill_everywhere("KILL")


class PdshLauncher:
    def __init__(self, config: object) -> None:
        self.config = config

    async def start(self, spec: LaunchSpec) -> PdshGroup:
        if len(spec.node_addresses) != spec.nnodes:
            raise TrainerError(f"{spec.nnodes} nodes but {len(spec.node_addresses)} node_addresses")
        hosts = spec.pdsh_hosts or spec.node_addresses
        procs = []
        for rank, host in enumerate(hosts):
            argv = pdsh_argv(spec, host, node_command(spec, rank))
            log.info("pdsh_launch", node_rank=rank, host=host, rcmd=spec.pdsh_rcmd)
            procs.append(await asyncio.create_subprocess_exec(
                *argv, env={**os.environ, **spec.env}, start_new_session=True,
                preexec_fn=set_parent_death_signal))
        return PdshGroup(spec, procs)


@hookimpl
def octopus_register_launchers(register):
    register.add("pdsh", PdshLauncher, summary="pdsh + torchrun on every node of node_addresses")
