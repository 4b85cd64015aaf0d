"""MQTT topic names. Everything of a run lives under ``octopus/<run_id>/``.

- ``octopus/<run>/server/broadcast``   server → all silos: round announcements, finish (retained)
- ``octopus/<run>/server/status``      server liveness (retained, last-will "offline")
- ``octopus/<run>/silo/<rank>/status`` silo liveness (retained, last-will "offline")
- ``octopus/<run>/silo/<rank>/update`` silo → server: model updates
"""
from __future__ import annotations

import re


def prefix(run_id: str) -> str:
    return f"octopus/{run_id}"


def broadcast(run_id: str) -> str:
    return f"{prefix(run_id)}/server/broadcast"


def server_status(run_id: str) -> str:
    return f"{prefix(run_id)}/server/status"


def silo_status(run_id: str, rank: int) -> str:
    return f"{prefix(run_id)}/silo/{rank}/status"


def silo_update(run_id: str, rank: int) -> str:
    return f"{prefix(run_id)}/silo/{rank}/update"


def silo_wildcards(run_id: str) -> list[str]:
    return [f"{prefix(run_id)}/silo/+/status", f"{prefix(run_id)}/silo/+/update"]


_SILO_RE = re.compile(r"^octopus/(?P<run>[^/]+)/silo/(?P<rank>[1-9][0-9]{0,8})/(?P<kind>status|update)$")


def parse_silo_topic(run_id: str, topic: str) -> tuple[str, int] | None:
    """``(kind, rank)`` for a silo topic of this run, else None (foreign or malformed)."""
    m = _SILO_RE.match(topic)
    if not m or m["run"] != run_id:
        return None
    return m["kind"], int(m["rank"])
