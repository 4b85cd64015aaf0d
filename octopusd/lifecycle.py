"""Lifecycle settings of the daemons: connect timeout, shutdown grace, offline grace.

They live in the config sections FedML already has (kept in each section's ``extra`` by
:mod:`octopusd.config`) and are validated here, once, when a daemon is built; an error names the
file and the key and ends the process with exit code 78 like every other configuration error.

- ``common_args.shutdown_grace_s`` (30): after SIGTERM/SIGINT a daemon stops its work (a silo
  its trainer group), announces itself offline and exits 0 within this many seconds; past it,
  it kills what is left and exits 130. systemd's ``TimeoutStopSec=`` should be a little longer.
- ``comm_args.connect_timeout_s`` (30): a daemon that cannot reach the MQTT broker at start-up
  exits 69 after this many seconds. Later outages are waited out (reconnect with backoff).
- ``train_args.silo_offline_grace_s`` (30): a selected silo whose status turns ``offline`` in a
  round is dropped from the round only if it is not back online within this many seconds, so a
  broker restart (Mosquitto publishes every client's last will when it stops) or a short network
  outage does not cost the round its updates. 0 drops at once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from octopusd.config import Config
from octopusd.errors import ConfigError


@dataclass(frozen=True)
class Lifecycle:
    shutdown_grace_s: float = 30.0
    connect_timeout_s: float = 30.0
    silo_offline_grace_s: float = 30.0


def _seconds(cfg: Config, extra: Mapping[str, Any], section: str, key: str, default: float,
             *, allow_zero: bool = False) -> float:
    value = extra.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"expected a number of seconds, got {value!r}", file=str(cfg.path),
                          key=f"{section}.{key}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        need = "zero or more" if allow_zero else "a positive number of"
        raise ConfigError(f"must be {need} seconds, got {value}", file=str(cfg.path), key=f"{section}.{key}")
    return value


def lifecycle(cfg: Config) -> Lifecycle:
    """The lifecycle settings of ``cfg`` (defaults where the keys are absent)."""
    d = Lifecycle()
    return Lifecycle(
        shutdown_grace_s=_seconds(cfg, cfg.common.extra, "common_args", "shutdown_grace_s",
                                  d.shutdown_grace_s),
        connect_timeout_s=_seconds(cfg, cfg.comm.extra, "comm_args", "connect_timeout_s",
                                   d.connect_timeout_s),
        silo_offline_grace_s=_seconds(cfg, cfg.train.extra, "train_args", "silo_offline_grace_s",
                                      d.silo_offline_grace_s, allow_zero=True),
    )
