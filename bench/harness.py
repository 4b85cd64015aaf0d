"""Shared bench machinery: real services, a bench federation, log parsing, peak RSS, stats.

Benches run the real daemons (``octopusd server`` / ``octopusd silo`` processes, real torchrun
trainer groups) against a real Mosquitto and a real ``moto_server`` on loopback, and read what
the daemons already log (JSON lines) instead of adding timing code to them.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

BENCH_DIR = Path(__file__).resolve().parent
PLUGIN_DIR = BENCH_DIR / "plugins"
ROOT = BENCH_DIR.parent
if str(ROOT) not in sys.path:  # `python bench/x.py` from anywhere
    sys.path.insert(0, str(ROOT))

from octopusd.testing import Federation, Mosquitto, MotoServer  # noqa: E402

MiB = 2**20


# ------------------------------------------------------------------------------------ services
@contextlib.contextmanager
def services(workdir: Path) -> Iterator[tuple[Mosquitto, MotoServer]]:
    """A real Mosquitto and a real moto_server, stopped on exit."""
    broker = Mosquitto(workdir / "mosquitto").start()
    s3 = MotoServer()
    try:
        s3.start()
        yield broker, s3
    finally:
        s3.stop()
        broker.stop()


# ------------------------------------------------------------------------------------- /proc
def proc_status_kib(pid: int, field_name: str) -> int | None:
    """A ``/proc/<pid>/status`` memory field (VmRSS, VmHWM) in KiB; None once the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


@dataclass
class Exit:
    """How a waited-for child ended, from ``wait4``: exit code, exact peak RSS, total CPU."""

    code: int | None
    peak_rss_kib: int | None = None
    cpu_s: float | None = None


def wait_rusage(proc: subprocess.Popen[bytes], timeout_s: float,
                others: Any = (), on_poll: Any = None) -> Exit:
    """Wait for ``proc`` (a direct child); ``code`` is None after ``timeout_s``.

    ``wait4`` reports the kernel's exact high-water mark and CPU time, so no sampling can miss
    them. Raises if one of ``others`` exits with an error first (the run cannot finish then).
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid == proc.pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return Exit(proc.returncode, int(usage.ru_maxrss), usage.ru_utime + usage.ru_stime)
        failed = [p.args for p in others if p.poll() not in (None, 0)]
        if failed:
            raise RuntimeError(f"a silo failed: {failed}")
        if on_poll is not None:
            on_poll()
        time.sleep(0.05)
    return Exit(None)


MIN_AVAILABLE_MIB = 1536


def memory_guard() -> None:
    """Abort the bench (and so stop its processes) before the kernel's OOM killer picks a victim
    on this shared machine: raise when MemAvailable drops under MIN_AVAILABLE_MIB."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            avail = int(line.split()[1]) // 1024
            if avail < MIN_AVAILABLE_MIB:
                raise MemoryError(f"only {avail} MiB of memory left: stopping the bench")
            return


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so the benches' ``finally`` blocks stop every process."""
    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, handler)


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a live process (from /proc/<pid>/stat)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -------------------------------------------------------------------------------------- logs
def read_events(path: Path) -> list[dict[str, Any]]:
    """The JSON log lines of one daemon (anything else on stdout is skipped)."""
    out = []
    if not path.exists():
        return out
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                ev = json.loads(line)
                if "timestamp" in ev:
                    ev["t"] = datetime.fromisoformat(ev["timestamp"].replace("Z", "+00:00")).timestamp()
                out.append(ev)
    return out


def wait_for_event(path: Path, name: str, proc: subprocess.Popen[bytes], timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for ev in read_events(path):
            if ev.get("event") == name:
                return ev
        if proc.poll() is not None:
            raise RuntimeError(f"{path.name}: process exited with {proc.returncode} before {name!r}:\n"
                               + path.read_text(errors="replace")[-3000:])
        time.sleep(0.05)
    raise TimeoutError(f"{path.name}: no {name!r} after {timeout_s} s")


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def ms(x: float | None) -> float | None:
    return None if x is None else round(1000 * x, 2)


# ------------------------------------------------------------------------------- federation
@dataclass
class BenchRun:
    """A bench federation: server + silos (one trainer each) on the given services."""

    workdir: Path
    broker: Mosquitto
    s3: MotoServer
    rounds: int
    silos: int = 2
    model: str = "lr"
    model_args: dict[str, Any] = field(default_factory=dict)
    data_args: dict[str, Any] = field(default_factory=dict)
    train_args: dict[str, Any] = field(default_factory=dict)
    comm_args: dict[str, Any] = field(default_factory=dict)
    eval_every: int = 0            # 0: only the last round (the server always evaluates it)
    s3_extra: dict[str, Any] = field(default_factory=dict)   # S3_* transfer settings (s3 config file)
    fed: Federation = field(init=False)

    def __post_init__(self) -> None:
        if self.s3_extra:  # octopusd reads the S3_* transfer settings from the s3 config file
            import yaml
            self.workdir.mkdir(parents=True, exist_ok=True)
            path = self.workdir / "s3_transfer.yaml"
            path.write_text(yaml.safe_dump(self.s3_extra))
            self.comm_args = {**self.comm_args, "s3_config_path": str(path)}
        train = {"epochs": 1, "batch_size": 32, "client_optimizer": "sgd", "learning_rate": 0.01,
                 "weight_decay": 0.0, "momentum": 0.0, **self.train_args}
        self.fed = Federation(
            self.workdir, self.broker.port, self.s3.endpoint_url, rounds=self.rounds,
            silo_procs=(1,) * self.silos, plugin_dirs=(str(PLUGIN_DIR),),
            overrides={"data_args": {"dataset": "random", **self.data_args},
                       "model_args": {"model": self.model, **self.model_args},
                       "train_args": train,
                       "validation_args": {"frequency_of_the_test": self.eval_every or self.rounds + 1},
                       "comm_args": self.comm_args})

    def run(self, timeout_s: float) -> dict[str, Any]:
        """Start the server, record its idle RSS, start the silos, wait; return raw facts."""
        fed = self.fed
        server = fed.start("server", 0)
        try:
            wait_for_event(fed.workdir / "server.log", "server_ready", server, 120)
            idle_rss = proc_status_kib(server.pid, "VmRSS")
            idle_hwm = proc_status_kib(server.pid, "VmHWM")
            cpu0 = cpu_seconds(server.pid)
            silos = [fed.start("silo", rank) for rank in range(1, self.silos + 1)]
            try:
                end = wait_rusage(server, timeout_s, silos, on_poll=memory_guard)
            except RuntimeError as exc:
                tails = {n: fed.log_text(n)[-2000:] for n in fed.procs}
                raise RuntimeError(f"{exc}: {tails}") from None
            if end.code is None:
                raise TimeoutError(f"server did not finish within {timeout_s} s")
            silo_codes = fed.wait_all(60)
            if end.code != 0 or any(c != 0 for c in silo_codes.values()):
                tails = {n: fed.log_text(n)[-2000:] for n in silo_codes}
                raise RuntimeError(f"exit codes {silo_codes}: {tails}")
        finally:
            fed.stop()
        return {"idle_rss_kib": idle_rss, "idle_hwm_kib": idle_hwm, "peak_rss_kib": end.peak_rss_kib,
                "server_cpu_at_ready_s": cpu0, "server_cpu_s": end.cpu_s,
                "server": read_events(fed.workdir / "server.log"),
                "silos": {r: read_events(fed.workdir / f"silo{r}.log") for r in range(1, self.silos + 1)}}


def round_table(raw: dict[str, Any]) -> list[dict[str, Any]]:
    """Per round: start time, wall time to the next round's start, slowest silo training, bytes."""
    starts = {e["round"]: e for e in raw["server"] if e.get("event") == "round_started"}
    ckpt = {e["round"]: e["t"] for e in raw["server"] if e.get("event") == "checkpoint_saved"}
    folded: dict[int, list[float]] = {}
    for e in raw["server"]:
        if e.get("event") == "update_folded":
            folded.setdefault(e["round"], []).append(e["t"])
    sent: dict[int, list[dict[str, Any]]] = {}
    for events in raw["silos"].values():
        for e in events:
            if e.get("event") == "update_sent":
                sent.setdefault(e["round"], []).append(e)
    rows = []
    for r in sorted(starts):
        if r + 1 not in starts:
            continue  # the last round ends the run; it has no next start to measure against
        ups = sent.get(r, [])
        t0 = starts[r]["t"]
        rows.append({
            "round": r,
            "round_s": starts[r + 1]["t"] - t0,
            "train_s": max((u["train_seconds"] for u in ups), default=0.0),
            "global_bytes": starts[r].get("payload_bytes", 0),
            "inline": starts[r].get("inline", False),
            "update_bytes": [u["bytes"] for u in ups],
            # phase marks relative to the round_started log line (after the global was published)
            "last_update_sent_s": max((u["t"] for u in ups), default=t0) - t0,
            "last_folded_s": max(folded.get(r, [t0])) - t0,
            "checkpoint_s": ckpt.get(r, t0) - t0,
        })
    return rows
