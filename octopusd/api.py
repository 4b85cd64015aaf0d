"""The seed's Python API: ``octopusd.init()``, ``Client(...).run()``, ``Server(...).run()`` and the
one-line runners.

A script using it is both the silo master and its trainers: ``Client.run()`` in the script started
by the user becomes the silo master, which launches the *same script* under torchrun for every
trainer rank; there ``Client.run()`` sees it is a trainer (``OCTOPUSD_TRAINER_SOCKET`` is set) and
trains the dataset and model the script built — so a user's own ``torch.utils.data.Dataset`` and
``nn.Module`` work with no plugin, and nothing is pickled between processes.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any

import torch

from octopusd.config import Config, load_config
from octopusd.errors import OctopusError
from octopusd.logs import configure_logging
from octopusd.runtime import Shutdown, first_octopus_error
from octopusd.trainer.worker import SOCKET_ENV, exit_now, is_trainer_process, run_trainer


def init(argv: list[str] | None = None) -> Config:
    """Parse ``--cf CONFIG --rank N`` (FedML's ``--role`` and ``--run_id`` accepted) and load the config."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--cf", required=True)
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--role", default=None)
    p.add_argument("--run_id", "--run-id", dest="run_id", default=None)
    args, _unknown = p.parse_known_args(sys.argv[1:] if argv is None else argv)
    configure_logging()
    # Trainer processes inherit the run id their silo master chose (it may come from --run-id).
    run_id = os.environ.get("OCTOPUSD_RUN_ID") if is_trainer_process() else args.run_id
    return load_config(args.cf, args.rank, run_id=run_id)


def _exit_code_of(coro: Any) -> int:
    async def serve() -> int:
        return await coro(Shutdown())

    try:
        return asyncio.run(serve())
    except BaseException as exc:  # noqa: BLE001 - the top of a user's script
        err = first_octopus_error(exc)
        if err is None:
            raise
        print(f"octopusd: error: {err}", file=sys.stderr)
        return int(err.exit_code)


class Client:
    """One silo: ``Client(args, device, dataset, model).run()``."""

    def __init__(self, args: Config, device: Any = None, dataset: Any = None, model: torch.nn.Module | None = None) -> None:
        if args.rank < 1:
            raise OctopusError("a Client needs --rank N with N ≥ 1 (rank 0 is the server)")
        self.args, self.device, self.dataset, self.model = args, device, dataset, model

    def run(self) -> int:
        if is_trainer_process():
            # A trainer process ends here, when its silo master says stop: the rest of the
            # user's script belongs to the silo master process, which returns from run().
            exit_now(run_trainer(self.args, os.environ[SOCKET_ENV], dataset=self.dataset, model=self.model))
        from octopusd.silo.daemon import SiloDaemon

        custom = self.dataset is not None or self.model is not None
        entry = (os.path.abspath(sys.argv[0]), *sys.argv[1:]) if custom else None

        async def go(shutdown: Shutdown) -> int:
            shutdown.install(asyncio.get_running_loop())
            return await SiloDaemon(self.args, shutdown=shutdown, trainer_entry=entry).run()

        return _exit_code_of(go)


class Server:
    """The federation's server: ``Server(args, device, dataset, model).run()``."""

    def __init__(self, args: Config, device: Any = None, dataset: Any = None, model: torch.nn.Module | None = None) -> None:
        if args.rank != 0:
            raise OctopusError("the Server runs as --rank 0")
        self.args, self.device, self.dataset, self.model = args, device, dataset, model

    def run(self) -> int:
        from octopusd.server.daemon import ServerDaemon

        async def go(shutdown: Shutdown) -> int:
            shutdown.install(asyncio.get_running_loop())
            return await ServerDaemon(self.args, shutdown=shutdown, dataset=self.dataset, model=self.model).run()

        return _exit_code_of(go)


def run_hierarchical_cross_silo_server() -> int:
    """One line: the server from ``--cf/--rank`` with the config's plugins."""
    return Server(init()).run()


def run_hierarchical_cross_silo_client() -> int:
    """One line: a silo from ``--cf/--rank`` with the config's plugins."""
    args = init()
    return Client(args).run()
