"""What both daemons share: signal handling, timers, event dispatch, exit-code plumbing."""
from __future__ import annotations

import asyncio
import os
import signal
from typing import Any, Callable

import structlog

from octopusd.errors import ExitCode, OctopusError

log = structlog.get_logger(__name__)


class Shutdown:
    """Signals only set an event; a second SIGTERM/SIGINT forces an immediate exit."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.signals = 0

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: int) -> None:
        self.signals += 1
        if self.signals > 1:
            log.error("forced_exit", signal=signal.Signals(sig).name)
            os._exit(int(ExitCode.INTERRUPTED))
        log.info("shutdown_requested", signal=signal.Signals(sig).name)
        self.event.set()


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


class DaemonExit(Exception):
    """Raised inside a daemon's task group to end it with an exit code."""

    def __init__(self, code: int, reason: str = "") -> None:
        self.code, self.reason = code, reason
        super().__init__(f"exit {code}: {reason}")
