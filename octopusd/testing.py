"""Real services and a federation runner for tests and benchmarks (not used by the daemons).

:class:`Mosquitto` and :class:`MotoServer` start the real broker and S3 endpoint as separate
processes on free loopback ports; :class:`Federation` writes a seed-style config pointed at them
and runs ``octopusd server`` + ``octopusd silo`` processes, stopping every process it started.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from octopusd.procs import alive, descendants


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, timeout_s: float, proc: subprocess.Popen[Any]) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout_s} s")


def _stop(proc: subprocess.Popen[Any] | None) -> None:
    if proc and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _find(binary: str, extra: tuple[str, ...] = ()) -> str:
    for candidate in (shutil.which(binary), *extra):
        if candidate and os.path.exists(candidate):
            return candidate
    raise FileNotFoundError(f"{binary} not found; install it (see README)")


class Mosquitto:
    """A real Mosquitto broker on 127.0.0.1:<port>; ``stop()``/``start()`` restart it on the same port."""

    def __init__(self, workdir: Path, port: int | None = None, extra_conf: str = "",
                 anonymous: bool = True) -> None:
        self.port = port or free_port()
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.conf = self.workdir / "mosquitto.conf"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous {str(anonymous).lower()}\nset_tcp_nodelay true\n"
            f"persistence true\npersistence_location {self.workdir}/\nautosave_interval 1\n"
            f"max_queued_messages 100000\nmessage_size_limit 0\n"
            # As root Mosquitto would drop to user "mosquitto", which cannot read the test's private
            # temp dirs (persistence, certificates, password file).
            f"{'user root' + chr(10) if os.geteuid() == 0 else ''}{extra_conf}")
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.workdir / "mosquitto.log"

    def start(self) -> "Mosquitto":
        exe = _find("mosquitto", ("/usr/sbin/mosquitto",))
        self.proc = subprocess.Popen([exe, "-c", str(self.conf)], stdout=open(self.log, "ab"),
                                     stderr=subprocess.STDOUT)
        _wait_port(self.port, 10, self.proc)
        return self

    def stop(self) -> None:
        _stop(self.proc)


class MotoServer:
    """A real ``moto_server`` S3 endpoint process on 127.0.0.1:<port>."""

    def __init__(self, port: int | None = None, tls: tuple[Path, Path] | None = None) -> None:
        self.port = port or free_port()
        self.tls = tls  # (certificate, key): serve https
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def start(self) -> "MotoServer":
        local = Path(sys.executable).with_name("moto_server")
        exe = str(local) if local.exists() else _find("moto_server")
        tls = ["-s", "-c", str(self.tls[0]), "-k", str(self.tls[1])] if self.tls else []
        self.proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(self.port), *tls],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_port(self.port, 30, self.proc)
        deadline = time.monotonic() + 30
        while True:  # the port opens a little before the app answers
            try:
                import ssl
                ctx = ssl._create_unverified_context() if self.tls else None  # readiness probe only
                urllib.request.urlopen(self.endpoint_url + "/moto-api/", timeout=2, context=ctx).read()
                return self
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def stop(self) -> None:
        _stop(self.proc)


def seed_config() -> dict[str, Any]:
    here = Path(__file__).resolve().parent
    return yaml.safe_load((here.parent / "etc" / "fedml_config.yaml").read_text())


@dataclass
class Federation:
    """A config in ``workdir`` pointed at the given broker and S3, and the processes running it."""

    workdir: Path
    broker_port: int
    s3_endpoint: str
    rounds: int = 3
    silo_procs: tuple[int, ...] = (2, 1)          # trainer processes per silo
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    silo_overrides: dict[int, dict[str, Any]] = field(default_factory=dict)   # dist_training_args
    silo_sections: dict[int, dict[str, dict[str, Any]]] = field(default_factory=dict)  # other sections
    plugin_dirs: tuple[str, ...] = ()
    run_id: str = field(default_factory=lambda: f"t-{uuid.uuid4().hex[:10]}")
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        raw = seed_config()
        n = len(self.silo_procs)
        raw["common_args"]["run_id"] = self.run_id
        raw["data_args"]["data_cache_dir"] = str(self.workdir / "no-data")  # use the offline sample
        raw["train_args"].update(comm_round=self.rounds, client_num_in_total=n, client_num_per_round=n)
        raw["comm_args"] = {"backend": "MQTT_S3", "BROKER_HOST": "127.0.0.1", "BROKER_PORT": self.broker_port,
                            "MQTT_KEEPALIVE": 10, "BUCKET_NAME": "octopusd-test", "CN_REGION_NAME": "us-east-1",
                            "CN_S3_ENDPOINT": self.s3_endpoint, "CN_S3_AKI": "testing", "CN_S3_SAK": "testing"}
        raw["tracking_args"]["log_file_dir"] = str(self.workdir / "log")
        raw["device_args"].pop("gpu_mapping_file", None)
        if self.plugin_dirs:
            raw["plugin_dirs"] = [str(d) for d in self.plugin_dirs]
        for section, values in self.overrides.items():
            raw.setdefault(section, {}).update(values)
        raw["private_config_paths"] = {"server_config_path": "server.yaml",
                                       "client_silo_config_paths": [f"silo_{i}.yaml" for i in range(1, n + 1)]}
        (self.workdir / "server.yaml").write_text(yaml.safe_dump({}))
        for i, nproc in enumerate(self.silo_procs, start=1):
            dist = {"n_node_in_silo": 1, "n_proc_per_node": nproc, "dist_timeout_s": 30}
            dist.update(self.silo_overrides.get(i, {}))
            private: dict[str, Any] = {"dist_training_args": dist, **self.silo_sections.get(i, {})}
            (self.workdir / f"silo_{i}.yaml").write_text(yaml.safe_dump(private))
        self.config = self.workdir / "fedml_config.yaml"
        self.config.write_text(yaml.safe_dump(raw, sort_keys=False))

    @property
    def run_dir(self) -> Path:
        return self.workdir / "log" / self.run_id

    def start(self, role: str, rank: int, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start ``octopusd server`` (rank 0) or ``octopusd silo --rank N``; ``env`` adds variables."""
        name = "server" if rank == 0 else f"silo{rank}"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
        log = open(self.workdir / f"{name}.log", "ab")
        proc = subprocess.Popen([sys.executable, "-m", "octopusd", role, "--cf", str(self.config),
                                 "--rank", str(rank), "--log-format", "json"],
                                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.procs[name] = proc
        return proc

    def start_command(self, name: str, argv: list[str], env: dict[str, str] | None = None,
                      cwd: str | None = None) -> subprocess.Popen[bytes]:
        """Run any command (an example script, say) as one of this federation's processes."""
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
        log = open(self.workdir / f"{name}.log", "ab")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=full_env, cwd=cwd,
                                start_new_session=True)
        self.procs[name] = proc
        return proc

    def start_all(self, env: dict[str, str] | None = None) -> None:
        self.start("server", 0, env)
        for rank in range(1, len(self.silo_procs) + 1):
            self.start("silo", rank, env)

    def wait_all(self, timeout_s: float) -> dict[str, int | None]:
        deadline = time.monotonic() + timeout_s
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        return {name: p.poll() for name, p in self.procs.items()}

    def log_text(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def run_processes(self) -> list[tuple[int, str]]:
        """(pid, command line) of the live processes whose command line mentions this run."""
        out = []
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if str(self.config) in text or self.run_id in text:
                pid = int(cmdline.parent.name)
                if alive(pid):
                    out.append((pid, text))
        return out

    def stray_pids(self) -> list[int]:
        """Live processes whose command line mentions this run (trainers included)."""
        return [pid for pid, _ in self.run_processes()]

    def stop(self) -> None:
        """Kill whatever is still running (after a test, pass or fail)."""
        for proc in self.procs.values():
            if proc.poll() is None:
                for pid in descendants(proc.pid):
                    with_suppress_kill(pid)
                with_suppress_kill(proc.pid)
                proc.wait()
        for pid in self.stray_pids():
            with_suppress_kill(pid)


def with_suppress_kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
