"""Configuration: the seed's ``fedml_config.yaml`` shape, parsed once into frozen typed objects.

Accepted sections (FedML's names): ``common_args``, ``environment_args``, ``data_args``,
``model_args``, ``train_args``, ``validation_args``, ``device_args``, ``comm_args``,
``tracking_args``, ``dist_training_args``, ``private_config_paths`` and octopusd's own
``plugin_dirs``. The file named by ``private_config_paths.server_config_path`` (rank 0) or by the
rank's entry of ``client_silo_config_paths`` (rank N ≥ 1) is merged over the main file. Every
error names the file and the dotted key. Keys octopusd does not use are kept in ``extra`` so
FedML configs load unchanged.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from octopusd.errors import ConfigError

_RUN_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
_SECTIONS = ("common_args", "environment_args", "data_args", "model_args", "train_args",
             "validation_args", "device_args", "comm_args", "tracking_args",
             "dist_training_args", "private_config_paths", "plugin_dirs", "security_args")


@dataclass(frozen=True)
class CommonConfig:
    training_type: str = "cross_silo"
    scenario: str = "hierarchical"
    random_seed: int = 0
    run_id: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "mnist"
    data_cache_dir: Path = Path("~/fedml_data")
    partition_method: str = "hetero"
    partition_alpha: float = 0.5
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelConfig:
    model: str = "lr"
    input_dim: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainConfig:
    federated_optimizer: str = "FedAvg"
    client_num_in_total: int = 2
    client_num_per_round: int = 2
    comm_round: int = 10
    epochs: int = 1
    batch_size: int = 10
    client_optimizer: str = "sgd"
    learning_rate: float = 0.001
    weight_decay: float = 0.0
    momentum: float = 0.0
    # Fault tolerance (see README "Rounds, deadlines and quorum").
    round_deadline_s: float = 600.0
    min_silos_per_round: int = 0          # 0: every selected silo
    round_give_up_s: float = 3600.0
    silo_wait_timeout_s: float = 3600.0
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ValidationConfig:
    frequency_of_the_test: int = 1
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DeviceConfig:
    using_gpu: bool = False
    gpu_mapping_file: Path | None = None
    gpu_mapping_key: str = "mapping_default"
    worker_num: int = 1
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MqttConfig:
    host: str = "127.0.0.1"
    port: int = 1883
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    keepalive: int = 60
    tls_ca_file: Path | None = None        # MQTT_TLS_CA: enables TLS; the CA that signed the broker
    tls_cert_file: Path | None = None      # MQTT_TLS_CERT: client certificate for mutual TLS
    tls_key_file: Path | None = None       # MQTT_TLS_KEY
    tls_insecure: bool = False             # MQTT_TLS_INSECURE: skip hostname verification (don't)
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class S3Config:
    bucket: str = "octopusd"
    access_key: str | None = field(default=None, repr=False)
    secret_key: str | None = field(default=None, repr=False)
    region: str = "us-east-1"
    endpoint_url: str | None = None
    ca_bundle: Path | None = None          # CN_S3_CA_BUNDLE: custom CA for an https endpoint
    sse: str | None = None                 # CN_S3_SSE: server-side encryption, e.g. AES256 or aws:kms
    keep_rounds: int = 0                   # S3_KEEP_ROUNDS: keep payloads of this many closed rounds
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CommConfig:
    backend: str = "MQTT_S3"
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    s3: S3Config = field(default_factory=S3Config)
    # Payloads up to this many bytes ride inline in the MQTT envelope instead of S3.
    inline_payload_max_bytes: int = 256 * 1024
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TrackingConfig:
    log_file_dir: Path = Path("./log")
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DistTrainingConfig:
    n_node_in_silo: int = 1
    n_proc_per_node: int = 1
    node_addresses: tuple[str, ...] = ()    # each node's address; the first is the master
    pdsh_hosts: tuple[str, ...] = ()        # pdsh target names when they differ (e.g. netns names)
    master_address: str = "127.0.0.1"
    launcher_rdzv_port: int = 0            # 0: pick a free port at launch
    network_interface: str | None = None
    launcher: str = ""                     # "": torchrun for one node, pdsh for several
    pdsh_rcmd: str = "ssh"
    node_command_prefix: str = ""          # e.g. "ip netns exec %h" for namespace nodes
    python: str = ""                       # interpreter on the nodes; "": this one
    dist_timeout_s: float = 60.0
    trainer_start_timeout_s: float = 120.0
    max_group_restarts: int = 3
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SecurityConfig:
    """Message signing (see octopusd.security): this party's key and the keys it trusts."""

    private_key: Path | None = None
    trusted_keys: Mapping[int, Path] = field(default_factory=dict)   # sender rank -> public key
    require_signatures: bool = False
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Config:
    """The whole parsed configuration of one party (server: rank 0, silo: rank ≥ 1)."""

    path: Path
    rank: int
    run_id: str
    common: CommonConfig
    data: DataConfig
    model: ModelConfig
    train: TrainConfig
    validation: ValidationConfig
    device: DeviceConfig
    comm: CommConfig
    tracking: TrackingConfig
    dist: DistTrainingConfig
    gpu_mapping: Mapping[str, Any] | None = None
    plugin_dirs: tuple[Path, ...] = ()
    security: SecurityConfig = field(default_factory=SecurityConfig)

    @property
    def role(self) -> str:
        return "server" if self.rank == 0 else "silo"

    @property
    def run_dir(self) -> Path:
        return self.tracking.log_file_dir / self.run_id

    @property
    def world_size(self) -> int:
        return self.dist.n_node_in_silo * self.dist.n_proc_per_node

    def __getattr__(self, name: str) -> Any:
        # FedML code reads flat names (args.batch_size); find them in the sections.
        if name.startswith("_"):
            raise AttributeError(name)
        for section in ("common", "data", "model", "train", "validation", "device", "tracking", "dist"):
            sec = object.__getattribute__(self, section)
            if name in {f.name for f in dataclasses.fields(sec)} and name != "extra":
                return getattr(sec, name)
            if name in sec.extra:
                return sec.extra[name]
        raise AttributeError(f"config has no setting {name!r}")


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------

def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file: {exc.strerror}", file=str(path)) from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML: {exc}", file=str(path)) from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("top level must be a mapping", file=str(path))
    return data


def _resolve_ref(value: str, base: Path) -> Path:
    """A file referenced from a config: relative to the config's directory, else to the cwd."""
    p = Path(os.path.expanduser(value))
    if p.is_absolute():
        return p
    for candidate in (base / p, Path.cwd() / p):
        if candidate.exists():
            return candidate
    # FedML's examples say "config/x.yaml" from the example's root: try the config dir's parent.
    if (base.parent / p).exists():
        return base.parent / p
    return base / p


def _check(value: Any, typ: Any, file: str, key: str) -> Any:
    """Coerce/validate one value against a dataclass field type."""
    origin = typ if isinstance(typ, type) else None
    tname = str(typ)
    optional = "None" in tname
    if value is None:
        if optional:
            return None
        raise ConfigError("must not be empty", file=file, key=key)
    if "Path" in tname:
        if not isinstance(value, str):
            raise ConfigError(f"expected a path string, got {value!r}", file=file, key=key)
        return Path(os.path.expanduser(value))
    if "tuple" in tname:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"expected a list of strings, got {value!r}", file=file, key=key)
        return tuple(value)
    if tname.startswith("bool") or origin is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"expected true or false, got {value!r}", file=file, key=key)
        return value
    if tname.startswith("int") or origin is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"expected an integer, got {value!r}", file=file, key=key)
        return value
    if tname.startswith("float") or origin is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"expected a number, got {value!r}", file=file, key=key)
        return float(value)
    if tname.startswith("str") or origin is str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ConfigError(f"expected a string, got {value!r}", file=file, key=key)
        return str(value)
    return value


def _build(cls: type, raw: Mapping[str, Any], file: str, section: str, aliases: Mapping[str, str] = {}) -> Any:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"expected a mapping, got {type(raw).__name__}", file=file, key=section)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "extra"}
    kwargs: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for k, v in raw.items():
        name = aliases.get(str(k), str(k))
        if name in fields:
            kwargs[name] = _check(v, fields[name].type, file, f"{section}.{k}")
        else:
            extra[str(k)] = v
    return cls(**kwargs, extra=extra)


def _deep_merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _deep_merge(dict(out[k]), v)
        else:
            out[k] = v
    return out


def _private_file(raw: Mapping[str, Any], rank: int, base: Path, file: str) -> Path | None:
    private = raw.get("private_config_paths") or {}
    if not isinstance(private, Mapping):
        raise ConfigError("expected a mapping", file=file, key="private_config_paths")
    if rank == 0:
        ref = private.get("server_config_path")
        return _resolve_ref(ref, base) if ref else None
    silos = private.get("client_silo_config_paths") or []
    if not isinstance(silos, list):
        raise ConfigError("expected a list of file names", file=file,
                          key="private_config_paths.client_silo_config_paths")
    if not 1 <= rank <= len(silos):
        return None  # a negative rank must not index the list from the end; _validate rejects it
    return _resolve_ref(str(silos[rank - 1]), base)


def _section_source(merged_from: dict[str, str], section: str, default: str) -> str:
    return merged_from.get(section, default)


_MQTT_KEYS = {"BROKER_HOST": "host", "BROKER_PORT": "port", "MQTT_USER": "user",
              "MQTT_PWD": "password", "MQTT_KEEPALIVE": "keepalive", "MQTT_TLS_CA": "tls_ca_file",
              "MQTT_TLS_CERT": "tls_cert_file", "MQTT_TLS_KEY": "tls_key_file",
              "MQTT_TLS_INSECURE": "tls_insecure"}
_S3_KEYS = {"BUCKET_NAME": "bucket", "CN_S3_AKI": "access_key", "CN_S3_SAK": "secret_key",
            "CN_REGION_NAME": "region", "CN_S3_ENDPOINT": "endpoint_url", "CN_S3_CA_BUNDLE": "ca_bundle",
            "CN_S3_SSE": "sse", "S3_KEEP_ROUNDS": "keep_rounds"}


def _comm(raw: Mapping[str, Any], file: str, base: Path, env: Mapping[str, str]) -> CommConfig:
    if not isinstance(raw, Mapping):
        raise ConfigError("expected a mapping", file=file, key="comm_args")
    mqtt_raw: dict[str, Any] = {}
    s3_raw: dict[str, Any] = {}
    mqtt_file = s3_file = file
    if raw.get("mqtt_config_path"):
        p = _resolve_ref(str(raw["mqtt_config_path"]), base)
        mqtt_raw.update(_read_yaml(p))
        mqtt_file = str(p)
    if raw.get("s3_config_path"):
        p = _resolve_ref(str(raw["s3_config_path"]), base)
        s3_raw.update(_read_yaml(p))
        s3_file = str(p)
    rest: dict[str, Any] = {}
    for k, v in raw.items():
        if k in _MQTT_KEYS or k.startswith("MQTT_"):
            mqtt_raw[k] = v
        elif k in _S3_KEYS or k in ("endpoint_url", "bucket"):
            s3_raw[k] = v
        elif k not in ("mqtt_config_path", "s3_config_path"):
            rest[k] = v
    s3_raw = {("CN_S3_ENDPOINT" if k == "endpoint_url" else "BUCKET_NAME" if k == "bucket" else k): v
              for k, v in s3_raw.items()}
    mqtt = _build(MqttConfig, mqtt_raw, mqtt_file, "comm_args(mqtt)", _MQTT_KEYS)
    s3 = _build(S3Config, s3_raw, s3_file, "comm_args(s3)", _S3_KEYS)
    # Secrets may stay out of config files: systemd's EnvironmentFile supplies them.
    mqtt = dataclasses.replace(mqtt, user=mqtt.user or env.get("OCTOPUSD_MQTT_USER"),
                               password=mqtt.password or env.get("OCTOPUSD_MQTT_PWD"))
    s3 = dataclasses.replace(
        s3,
        access_key=s3.access_key or env.get("AWS_ACCESS_KEY_ID"),
        secret_key=s3.secret_key or env.get("AWS_SECRET_ACCESS_KEY"),
        endpoint_url=s3.endpoint_url or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL"),
        region=s3.region if "CN_REGION_NAME" in s3_raw else env.get("AWS_DEFAULT_REGION", env.get("AWS_REGION", s3.region)),
    )
    comm = _build(CommConfig, {k: v for k, v in rest.items() if k not in ("mqtt", "s3")}, file, "comm_args")
    if comm.backend.upper() not in ("MQTT_S3", "MQTT_S3_MNN"):
        raise ConfigError(f"unsupported backend {comm.backend!r}; octopusd speaks MQTT_S3",
                          file=file, key="comm_args.backend")
    if not 1 <= mqtt.port <= 65535:
        raise ConfigError(f"port out of range: {mqtt.port}", file=mqtt_file, key="BROKER_PORT")
    return dataclasses.replace(comm, mqtt=mqtt, s3=s3)


def _security(raw: Any, file: str, base: Path) -> SecurityConfig:
    if not isinstance(raw, Mapping):
        raise ConfigError("expected a mapping", file=file, key="security_args")
    trusted_raw = raw.get("trusted_keys") or {}
    if not isinstance(trusted_raw, Mapping):
        raise ConfigError("expected {rank: public key file}", file=file, key="security_args.trusted_keys")
    trusted: dict[int, Path] = {}
    for rank, path in trusted_raw.items():
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0 or not isinstance(path, str):
            raise ConfigError(f"expected rank: file, got {rank!r}: {path!r}", file=file,
                              key="security_args.trusted_keys")
        trusted[rank] = _resolve_ref(path, base)
    rest = {k: v for k, v in raw.items() if k != "trusted_keys"}
    sec = _build(SecurityConfig, rest, file, "security_args")
    key = _resolve_ref(str(sec.private_key), base) if sec.private_key else None
    return dataclasses.replace(sec, private_key=key, trusted_keys=trusted)


def _validate(cfg: Config, file: str) -> None:
    t, d = cfg.train, cfg.dist
    positive = {"train_args.client_num_in_total": t.client_num_in_total,
                "train_args.client_num_per_round": t.client_num_per_round,
                "train_args.comm_round": t.comm_round, "train_args.epochs": t.epochs,
                "train_args.batch_size": t.batch_size,
                "dist_training_args.n_node_in_silo": d.n_node_in_silo,
                "dist_training_args.n_proc_per_node": d.n_proc_per_node,
                "validation_args.frequency_of_the_test": cfg.validation.frequency_of_the_test}
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"must be at least 1, got {value}", file=file, key=key)
    durations = {"train_args.round_deadline_s": t.round_deadline_s,
                 "train_args.round_give_up_s": t.round_give_up_s,
                 "train_args.silo_wait_timeout_s": t.silo_wait_timeout_s,
                 "dist_training_args.dist_timeout_s": d.dist_timeout_s,
                 "dist_training_args.trainer_start_timeout_s": d.trainer_start_timeout_s}
    for key, seconds in durations.items():
        if not seconds > 0:  # also rejects NaN
            raise ConfigError(f"must be a positive number of seconds, got {seconds}", file=file, key=key)
    if d.max_group_restarts < 0:
        raise ConfigError(f"must be at least 0, got {d.max_group_restarts}", file=file,
                          key="dist_training_args.max_group_restarts")
    if t.client_num_per_round > t.client_num_in_total:
        raise ConfigError(f"{t.client_num_per_round} silos per round but only "
                          f"{t.client_num_in_total} in total", file=file, key="train_args.client_num_per_round")
    if not 0 <= t.min_silos_per_round <= t.client_num_per_round:
        raise ConfigError("must be between 0 (all selected) and client_num_per_round",
                          file=file, key="train_args.min_silos_per_round")
    if t.learning_rate <= 0:
        raise ConfigError("must be positive", file=file, key="train_args.learning_rate")
    if cfg.rank < 0 or cfg.rank > t.client_num_in_total:
        raise ConfigError(f"rank {cfg.rank} outside 0..{t.client_num_in_total} "
                          "(0 = server, 1..client_num_in_total = silos)", file=file, key="--rank")
    if not _RUN_ID_RE.match(cfg.run_id):
        raise ConfigError("run_id must be 1-128 characters of A-Z a-z 0-9 _ . -", file=file,
                          key="common_args.run_id")
    if d.n_node_in_silo > 1 and len(d.node_addresses) != d.n_node_in_silo:
        raise ConfigError(f"{d.n_node_in_silo} nodes but {len(d.node_addresses)} node_addresses",
                          file=file, key="dist_training_args.node_addresses")
    if d.pdsh_hosts and len(d.pdsh_hosts) != len(d.node_addresses):
        raise ConfigError(f"{len(d.pdsh_hosts)} pdsh_hosts but {len(d.node_addresses)} node_addresses",
                          file=file, key="dist_training_args.pdsh_hosts")
    if d.n_node_in_silo > 1 and not _same_host(d.master_address, d.node_addresses[0]):
        raise ConfigError(f"master_address {d.master_address} is not the first node "
                          f"({d.node_addresses[0]}); trainer rank 0 runs on the first node and must "
                          "host the rendezvous", file=file, key="dist_training_args.master_address")


def _same_host(a: str, b: str) -> bool:
    if a == b:
        return True
    import socket
    try:
        return socket.gethostbyname(a) == socket.gethostbyname(b)
    except OSError:
        return False


def load_config(path: str | Path, rank: int, *, run_id: str | None = None,
                env: Mapping[str, str] | None = None) -> Config:
    """Parse the main config file and this rank's private file into a frozen :class:`Config`."""
    env = os.environ if env is None else env
    shm_min = env.get("OCTOPUSD_SHM_MIN_BYTES", "")
    if shm_min and not (shm_min.isdigit() and int(shm_min) >= 1):
        raise ConfigError(f"expected a positive number of bytes, got {shm_min!r}",
                          key="environment variable OCTOPUSD_SHM_MIN_BYTES")
    main = Path(path).expanduser()
    file = str(main)
    raw = _read_yaml(main)
    base = main.resolve().parent
    unknown = [k for k in raw if k not in _SECTIONS]
    if unknown:
        raise ConfigError(f"unknown section(s) {', '.join(map(str, unknown))}; known: "
                          f"{', '.join(_SECTIONS)}", file=file)
    merged = dict(raw)
    private = _private_file(raw, rank, base, file)
    if private is not None:
        merged = _deep_merge(merged, _read_yaml(private))
        file = f"{file} (+ {private})"
    sect = lambda name: merged.get(name) or {}  # noqa: E731 - tiny local accessor
    common = _build(CommonConfig, sect("common_args"), file, "common_args")
    chosen_run_id = run_id or common.run_id or env.get("OCTOPUSD_RUN_ID") or \
        "run-" + hashlib.sha256(main.read_bytes()).hexdigest()[:12]
    tracking = _build(TrackingConfig, sect("tracking_args"), file, "tracking_args")
    device = _build(DeviceConfig, sect("device_args"), file, "device_args")
    gpu_mapping = None
    if device.using_gpu and device.gpu_mapping_file:
        mp = _resolve_ref(str(device.gpu_mapping_file), base)
        gpu_mapping = _read_yaml(mp)
        device = dataclasses.replace(device, gpu_mapping_file=mp)
    dirs = merged.get("plugin_dirs") or []
    if not isinstance(dirs, list) or not all(isinstance(x, str) for x in dirs):
        raise ConfigError("expected a list of directories", file=file, key="plugin_dirs")
    cfg = Config(
        path=main, rank=rank, run_id=chosen_run_id, common=common,
        data=_build(DataConfig, sect("data_args"), file, "data_args"),
        model=_build(ModelConfig, sect("model_args"), file, "model_args"),
        train=_build(TrainConfig, sect("train_args"), file, "train_args"),
        validation=_build(ValidationConfig, sect("validation_args"), file, "validation_args"),
        device=device, comm=_comm(sect("comm_args"), file, base, env), tracking=tracking,
        dist=_build(DistTrainingConfig, sect("dist_training_args"), file, "dist_training_args"),
        gpu_mapping=gpu_mapping,
        plugin_dirs=tuple(_resolve_ref(x, base) for x in dirs),
        security=_security(sect("security_args"), file, base),
    )
    _validate(cfg, file)
    return cfg
