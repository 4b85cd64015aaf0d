"""What both daemons share: signal handling, timers, event dispatch, exit-code plumbing.

Signals only set an event or schedule a callback on the loop (never work in a handler):

- SIGTERM / SIGINT: :attr:`Shutdown.event` is set; the daemon stops its work, announces itself
  offline and exits 0. If that takes longer than ``shutdown_grace_s``, or a second SIGTERM/SIGINT
  arrives, every descendant process is killed and the process exits 130 at once.
- SIGHUP: the log level is re-read (:func:`reload_log_level`) — nothing else; the daemon keeps
  running. stdout is the only log sink (journald under systemd), so there is no file to reopen.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any, Callable, Mapping

import structlog

from octopusd.errors import ExitCode, OctopusError
from octopusd.procs import descendants, signal_all

log = structlog.get_logger(__name__)

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def _env_file_values(path: str) -> dict[str, str]:
    """``KEY=VALUE`` lines as systemd's EnvironmentFile= reads them (comments, optional quotes)."""
    out: dict[str, str] = {}
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line or line[0] in "#;" or "=" not in line:
            continue
        key, value = line.split("=", 1)
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        out[key.strip()] = value
    return out


def log_level_from_env(env: Mapping[str, str] | None = None) -> str | None:
    """``OCTOPUSD_LOG_LEVEL`` from the file named by ``OCTOPUSD_ENV_FILE`` (if it sets it), else
    from the environment; None when neither sets it. Raises ValueError for an unknown level."""
    env = os.environ if env is None else env
    level = env.get("OCTOPUSD_LOG_LEVEL")
    path = env.get("OCTOPUSD_ENV_FILE")
    if path:
        try:
            level = _env_file_values(path).get("OCTOPUSD_LOG_LEVEL", level)
        except OSError as exc:
            log.warning("env_file_unreadable", path=path, error=str(exc))
    if level is None or not level.strip():
        return None
    level = level.strip().lower()
    if level not in LOG_LEVELS:
        raise ValueError(f"OCTOPUSD_LOG_LEVEL: unknown level {level!r}; known: {', '.join(LOG_LEVELS)}")
    return level


def set_log_level(level: str) -> None:
    """Change the level of every structlog logger (they are not cached, see octopusd.logs)."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())))


def reload_log_level(env: Mapping[str, str] | None = None) -> str | None:
    """SIGHUP: apply the log level found by :func:`log_level_from_env`; return it (None: kept)."""
    try:
        level = log_level_from_env(env)
    except ValueError as exc:
        log.warning("reload_rejected", error=str(exc))
        return None
    if level is None:
        log.info("reload", log_level="unchanged", reason="OCTOPUSD_LOG_LEVEL not set")
        return None
    set_log_level(level)
    log.warning("reload", log_level=level)  # warning: visible whatever the new level
    return level


def force_exit(reason: str) -> None:
    """Kill every descendant (trainer groups) and leave at once with exit code 130."""
    log.error("forced_exit", reason=reason, exit_code=int(ExitCode.INTERRUPTED))
    signal_all(descendants(os.getpid()), signal.SIGKILL)
    try:
        sys.stdout.flush()
    finally:
        os._exit(int(ExitCode.INTERRUPTED))


class Shutdown:
    """SIGTERM/SIGINT set :attr:`event`; a second one, or ``grace_s`` passing, forces exit 130.

    SIGHUP calls :attr:`on_reload` (default :func:`reload_log_level`). Tests call
    :meth:`request` instead of sending a signal.
    """

    def __init__(self, grace_s: float | None = None,
                 on_reload: Callable[[], Any] | None = None) -> None:
        self.event = asyncio.Event()
        self.signals = 0
        self.grace_s = grace_s
        self.on_reload = on_reload or reload_log_level
        self._grace: asyncio.TimerHandle | None = None

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self._on_hup)

    def _on_hup(self) -> None:
        log.info("signal_received", signal="SIGHUP")
        try:
            self.on_reload()
        except Exception as exc:  # a reload must never take the daemon down
            log.error("reload_failed", error=repr(exc))

    def _on_signal(self, sig: int) -> None:
        self.signals += 1
        name = signal.Signals(sig).name
        if self.signals > 1:
            force_exit(f"second {name}")
        log.info("shutdown_requested", signal=name, grace_s=self.grace_s)
        self.request()

    def request(self) -> None:
        """Start a graceful shutdown, bounded by ``grace_s`` when set."""
        if self.event.is_set():
            return
        self.event.set()
        if self.grace_s is not None:
            self._grace = asyncio.get_running_loop().call_later(
                self.grace_s, force_exit, f"shutdown took longer than {self.grace_s:g} s")

    def cancel_grace(self) -> None:
        if self._grace is not None:
            self._grace.cancel()
            self._grace = None


class Timers:
    """Named one-shot timers that post an event into a queue when they fire."""

    def __init__(self, post: Callable[[Any], None]) -> None:
        self._post = post
        self._handles: dict[str, asyncio.TimerHandle] = {}

    def set(self, name: str, delay: float, event: Any) -> None:
        self.cancel(name)
        self._handles[name] = asyncio.get_running_loop().call_later(delay, self._post, event)

    def cancel(self, name: str) -> None:
        handle = self._handles.pop(name, None)
        if handle is not None:
            handle.cancel()

    def cancel_all(self) -> None:
        for name in list(self._handles):
            self.cancel(name)


def first_octopus_error(exc: BaseException) -> OctopusError | None:
    """Find the OctopusError inside an ExceptionGroup (TaskGroup failures arrive wrapped)."""
    if isinstance(exc, OctopusError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = first_octopus_error(inner)
            if found is not None:
                return found
    return None


def first_daemon_exit(exc: BaseException) -> "DaemonExit | None":
    """Find the DaemonExit inside (possibly nested) ExceptionGroups."""
    if isinstance(exc, DaemonExit):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = first_daemon_exit(inner)
            if found is not None:
                return found
    return None


class DaemonExit(Exception):
    """Raised inside a daemon's task group to end it with an exit code."""

    def __init__(self, code: int, reason: str = "") -> None:
        self.code, self.reason = code, reason
        super().__init__(f"exit {code}: {reason}")


async def pump_messages(incoming: "asyncio.Queue[Any]", to_event: Callable[[Any], Any],
                        events: "asyncio.Queue[Any]", log: Any) -> None:
    """Turn MQTT messages into machine events forever; a message that breaks the handler is logged
    and dropped — nothing from the network may kill a daemon."""
    while True:
        msg = await incoming.get()
        try:
            event = to_event(msg)
        except Exception as exc:  # noqa: BLE001 - see docstring
            log.error("message_handler_error", topic=getattr(msg, "topic", "?"), error=repr(exc))
            continue
        if event is not None:
            events.put_nowait(event)
