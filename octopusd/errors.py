"""Error hierarchy and process exit codes.

Each layer raises a subclass of :class:`OctopusError`; every error carries the exit code the
daemon ends with when the error reaches the top, so systemd (``RestartPreventExitStatus=``) can
tell errors a restart cannot fix from transient ones.
"""
from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Documented process exit codes (see README, "Exit codes")."""

    OK = 0
    INTERNAL = 1          # a bug: unexpected exception
    USAGE = 2             # bad command line
    CONFIG = 78           # EX_CONFIG: the configuration is wrong; restarting will not help
    PLUGIN = 79           # an unknown or broken plugin
    BROKER_UNREACHABLE = 69  # EX_UNAVAILABLE: MQTT broker could not be reached
    STORAGE = 74          # EX_IOERR: S3 endpoint failed persistently
    QUORUM_LOST = 75      # not enough silos reported before the give-up time
    TRAINER_FAILED = 76   # the trainer group kept failing
    INTERRUPTED = 130     # forced exit after a second signal


class OctopusError(Exception):
    """Base of every error octopusd raises on purpose."""

    exit_code: ExitCode = ExitCode.INTERNAL


class ConfigError(OctopusError):
    """A configuration file or value is wrong; the message names the file and key."""

    exit_code = ExitCode.CONFIG

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None) -> None:
        self.file = file
        self.key = key
        where = ": ".join(p for p in (file, key) if p)
        super().__init__(f"{where}: {message}" if where else message)


class PluginError(OctopusError):
    """A plugin could not be loaded, or a name is not registered."""

    exit_code = ExitCode.PLUGIN


class UnknownPluginError(PluginError):
    """A plugin name is not registered; the message lists the known names."""

    def __init__(self, kind: str, name: str, known: list[str]) -> None:
        self.kind, self.name, self.known = kind, name, sorted(known)
        super().__init__(
            f"unknown {kind} {name!r}; known {kind}s: {', '.join(self.known) or '(none)'}"
        )


class WireError(OctopusError):
    """Bytes from the network could not be decoded or failed validation."""


class EnvelopeError(WireError):
    """An MQTT envelope is malformed, too large, or of an unknown schema."""


class CodecError(WireError):
    """A tensor payload is malformed, truncated, too large, or of an unknown format."""


class PayloadError(WireError):
    """A payload's digest, size or tensor layout does not match what was announced."""


class StorageError(OctopusError):
    """The S3 endpoint failed persistently."""

    exit_code = ExitCode.STORAGE


class BrokerUnreachableError(OctopusError):
    """The MQTT broker could not be reached."""

    exit_code = ExitCode.BROKER_UNREACHABLE


class TransitionError(OctopusError):
    """An event is not legal in the current state of a round state machine."""

    def __init__(self, machine: str, state: object, event: object) -> None:
        self.machine, self.state, self.event = machine, state, event
        super().__init__(f"{machine}: event {event!r} is illegal in state {state!r}")


class QuorumLostError(OctopusError):
    """Too few silos reported before the round's give-up time."""

    exit_code = ExitCode.QUORUM_LOST


class TrainerError(OctopusError):
    """The trainer group failed and could not be recovered."""

    exit_code = ExitCode.TRAINER_FAILED
