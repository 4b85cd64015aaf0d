"""The ``octopusd`` command: ``server``, ``silo``, ``demo`` and ``plugins``."""
from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any, Callable

import structlog

from octopusd.errors import ExitCode, OctopusError
from octopusd.logs import configure_logging
from octopusd.runtime import LOG_LEVELS, Shutdown, first_octopus_error, log_level_from_env


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="octopusd", description="Hierarchical cross-silo federated learning daemons.")
    sub = p.add_subparsers(dest="command", required=True)
    for name, helptext in (("server", "run the federation's server (rank 0)"),
                           ("silo", "run one silo master (rank N ≥ 1)")):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("--cf", required=True, help="fedml_config.yaml-style config file")
        s.add_argument("--rank", type=int, default=0 if name == "server" else None, required=name == "silo")
        s.add_argument("--run-id", default=None, help="override common_args.run_id")
        s.add_argument("--log-level", default=None, choices=LOG_LEVELS,
                       help="default: $OCTOPUSD_LOG_LEVEL, else info (SIGHUP re-reads it, see README)")
        s.add_argument("--log-format", choices=("auto", "json", "console"), default="auto")
    d = sub.add_parser("demo", help="one-command demo: embedded broker + S3, server and two silos")
    d.add_argument("--rounds", type=int, default=None, help="override comm_round (seed: 50)")
    d.add_argument("--cf", default=None, help="config to run (default: the seed config in etc/)")
    d.add_argument("--workdir", default=None, help="keep logs and metrics here (default: a temp dir)")
    k = sub.add_parser("keygen", help="make an Ed25519 key pair for signing messages")
    k.add_argument("--out", required=True, help="directory for NAME.key (mode 0600) and NAME.pub")
    k.add_argument("--name", required=True, help="e.g. server, silo-1")
    pl = sub.add_parser("plugins", help="list registered plugins")
    pl.add_argument("--cf", default=None)
    return p


def _json_flag(fmt: str) -> bool | None:
    return {"json": True, "console": False}.get(fmt)


async def _serve(make: Callable[[Shutdown], Any]) -> int:
    shutdown = Shutdown()
    shutdown.install(asyncio.get_running_loop())
    daemon = make(shutdown)
    return await daemon.run()


def _run_daemon(args: argparse.Namespace) -> int:
    from octopusd.config import load_config

    try:
        level = args.log_level or log_level_from_env() or "info"
    except ValueError as exc:
        print(f"octopusd: error: {exc}", file=sys.stderr)
        return int(ExitCode.CONFIG)
    configure_logging(level, json=_json_flag(args.log_format))
    log = structlog.get_logger("octopusd")
    try:
        cfg = load_config(args.cf, args.rank, run_id=args.run_id)
        if args.command == "server" and cfg.rank != 0:
            raise OctopusError("the server runs as rank 0")
        if args.command == "server":
            from octopusd.server.daemon import ServerDaemon as Daemon
        else:
            from octopusd.silo.daemon import SiloDaemon as Daemon  # type: ignore[assignment]
        return asyncio.run(_serve(lambda shutdown: Daemon(cfg, shutdown=shutdown)))
    except KeyboardInterrupt:
        return int(ExitCode.INTERRUPTED)
    except BaseException as exc:  # noqa: BLE001 - the top: turn every error into an exit code
        err = first_octopus_error(exc)
        if err is None:
            if isinstance(exc, SystemExit):
                raise
            log.exception("internal_error", error=repr(exc))
            return int(ExitCode.INTERNAL)
        log.error("fatal", error=str(err), kind=type(err).__name__, exit_code=int(err.exit_code))
        print(f"octopusd: error: {err}", file=sys.stderr)
        return int(err.exit_code)


def _plugins(args: argparse.Namespace) -> int:
    from octopusd.config import load_config
    from octopusd.plugins import load_plugins

    dirs = load_config(args.cf, 0).plugin_dirs if args.cf else ()
    pm = load_plugins(dirs)
    for kind, reg in pm.registries.items():
        for e in reg.entries():
            print(f"{kind:<11} {e.name:<14} {e.origin:<40} {e.summary}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command in ("server", "silo"):
        return _run_daemon(args)
    if args.command == "keygen":
        from octopusd.security import generate_keypair

        try:
            key, pub = generate_keypair(args.out, args.name)
        except OctopusError as exc:
            print(f"octopusd: error: {exc}", file=sys.stderr)
            return int(exc.exit_code)
        print(f"private key: {key} (keep it secret; mode 0600)\npublic key:  {pub} (list it in the peers' "
              "security_args.trusted_keys)")
        return 0
    if args.command == "plugins":
        try:
            return _plugins(args)
        except OctopusError as exc:
            print(f"octopusd: error: {exc}", file=sys.stderr)
            return int(exc.exit_code)
    from octopusd.demo import run_demo

    return run_demo(rounds=args.rounds, config=args.cf, workdir=args.workdir)


if __name__ == "__main__":
    sys.exit(main())
