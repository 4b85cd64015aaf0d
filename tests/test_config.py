"""Specification of configuration loading (octopusd/config.py): FedML's shape, typed and checked."""
from __future__ import annotations

import dataclasses
import hashlib
import shutil
from pathlib import Path

import pytest
import yaml

from octopusd.config import Config, load_config
from octopusd.errors import ConfigError, ExitCode

ETC = Path(__file__).resolve().parents[1] / "etc"
SEED = ETC / "fedml_config.yaml"

MINIMAL = {
    "common_args": {"training_type": "cross_silo", "random_seed": 0},
    "data_args": {"dataset": "mnist"},
    "model_args": {"model": "lr"},
    "train_args": {"federated_optimizer": "FedAvg", "client_num_in_total": 2,
                   "client_num_per_round": 2, "comm_round": 3, "epochs": 1, "batch_size": 10,
                   "learning_rate": 0.03},
    "comm_args": {"backend": "MQTT_S3"},
}


def write_config(tmp_path: Path, overrides: dict | None = None, name: str = "fedml_config.yaml") -> Path:
    """MINIMAL with ``overrides`` merged section by section, written as YAML into tmp_path."""
    data = {k: dict(v) for k, v in MINIMAL.items()}
    for section, values in (overrides or {}).items():
        if isinstance(values, dict) and isinstance(data.get(section), dict):
            data[section].update(values)
        else:
            data[section] = values
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def config_error(path: Path, rank: int = 0, **kw) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path, rank, env=kw.pop("env", {}), **kw)
    assert info.value.exit_code == ExitCode.CONFIG
    return info.value


# -- the seed files in etc/ -------------------------------------------------------------------------

@pytest.mark.parametrize(("rank", "procs"), [(0, 1), (1, 2), (2, 1)])
def test_seed_configs_load_for_every_rank(rank, procs):
    """etc/fedml_config.yaml loads for the server and both silos with their private settings."""
    cfg = load_config(SEED, rank, env={})
    assert isinstance(cfg, Config)
    assert cfg.rank == rank and cfg.role == ("server" if rank == 0 else "silo")
    assert cfg.dist.n_proc_per_node == procs and cfg.world_size == procs
    assert cfg.train.client_num_in_total == 2 and cfg.train.comm_round == 50
    assert cfg.train.federated_optimizer == "FedAvg" and cfg.data.dataset == "mnist"
    assert cfg.model.model == "lr"


def test_seed_comm_settings_come_from_the_mqtt_and_s3_files():
    """mqtt_config.yaml and s3_config.yaml (FedML key names) fill the broker and bucket settings."""
    comm = load_config(SEED, 1, env={}).comm
    assert comm.backend == "MQTT_S3"
    assert (comm.mqtt.host, comm.mqtt.port, comm.mqtt.keepalive) == ("127.0.0.1", 1883, 60)
    assert comm.s3.bucket == "octopusd" and comm.s3.region == "us-east-1"
    assert comm.s3.endpoint_url == "http://127.0.0.1:5000"
    assert (comm.s3.access_key, comm.s3.secret_key) == ("testing", "testing")


def test_fedml_flat_attribute_access():
    """FedML-style flat reads (cfg.batch_size, cfg.learning_rate, ...) find the section's value."""
    cfg = load_config(SEED, 1, env={})
    assert cfg.batch_size == 10 and cfg.learning_rate == 0.001
    assert cfg.comm_round == 50 and cfg.frequency_of_the_test == 1
    assert cfg.partition_method == "hetero" and cfg.n_proc_per_node == 2
    assert cfg.enable_wandb is False, "keys octopusd does not use are kept and readable"
    with pytest.raises(AttributeError, match="no_such_setting"):
        cfg.no_such_setting


def test_config_is_frozen():
    """The parsed config cannot be modified."""
    cfg = load_config(SEED, 0, env={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.rank = 3  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.comm_round = 1  # type: ignore[misc]


# -- run id ------------------------------------------------------------------------------------------

def test_default_run_id_is_shared_by_all_ranks_and_derived_from_the_main_file():
    """Without run_id anywhere every rank derives the same id from the main file's bytes."""
    ids = {load_config(SEED, rank, env={}).run_id for rank in (0, 1, 2)}
    assert ids == {"run-" + hashlib.sha256(SEED.read_bytes()).hexdigest()[:12]}


def test_changing_the_main_file_changes_the_default_run_id(tmp_path):
    """Two different main files give two different default run ids."""
    for name in ("mqtt_config.yaml", "s3_config.yaml", "server.yaml", "silo_1.yaml", "silo_2.yaml"):
        shutil.copy(ETC / name, tmp_path / name)
    copy = tmp_path / "fedml_config.yaml"
    copy.write_bytes(SEED.read_bytes())
    same = load_config(copy, 0, env={}).run_id
    copy.write_bytes(SEED.read_bytes() + b"# one more comment\n")
    assert same == load_config(SEED, 0, env={}).run_id
    assert load_config(copy, 0, env={}).run_id != same


def test_explicit_run_id_wins(tmp_path):
    """run_id= beats common_args.run_id, which beats OCTOPUSD_RUN_ID in the environment."""
    path = write_config(tmp_path, {"common_args": {"run_id": "from-file"}})
    assert load_config(path, 0, run_id="from-arg", env={}).run_id == "from-arg"
    assert load_config(path, 0, env={"OCTOPUSD_RUN_ID": "from-env"}).run_id == "from-file"
    plain = write_config(tmp_path, name="plain.yaml")
    assert load_config(plain, 0, env={"OCTOPUSD_RUN_ID": "from-env"}).run_id == "from-env"


@pytest.mark.parametrize("bad", ["has space", "a/b", "x" * 129, "ünïcode"])
def test_a_bad_run_id_is_rejected(tmp_path, bad):
    """A run_id that would be unsafe in MQTT topics or S3 keys fails naming common_args.run_id."""
    err = config_error(write_config(tmp_path), run_id=bad)
    assert err.key == "common_args.run_id"


# -- comm settings ------------------------------------------------------------------------------------

INLINE = {"backend": "MQTT_S3", "BROKER_HOST": "broker.example", "BROKER_PORT": 8883,
          "MQTT_USER": "silo", "MQTT_PWD": "hunter2-mqtt", "MQTT_KEEPALIVE": 30,
          "BUCKET_NAME": "fl-bucket", "CN_S3_AKI": "AKIAINLINEKEY", "CN_S3_SAK": "inline-secret-sak",
          "CN_REGION_NAME": "eu-west-1", "CN_S3_ENDPOINT": "http://minio:9000"}


def test_inline_fedml_comm_keys_are_understood(tmp_path):
    """BROKER_HOST/BROKER_PORT/MQTT_*/BUCKET_NAME/CN_S3_* given inline in comm_args are used."""
    comm = load_config(write_config(tmp_path, {"comm_args": INLINE}), 0, env={}).comm
    assert (comm.mqtt.host, comm.mqtt.port, comm.mqtt.keepalive) == ("broker.example", 8883, 30)
    assert (comm.mqtt.user, comm.mqtt.password) == ("silo", "hunter2-mqtt")
    assert (comm.s3.bucket, comm.s3.region, comm.s3.endpoint_url) == (
        "fl-bucket", "eu-west-1", "http://minio:9000")
    assert (comm.s3.access_key, comm.s3.secret_key) == ("AKIAINLINEKEY", "inline-secret-sak")


def test_inline_keys_override_the_referenced_files(tmp_path):
    """A key given inline in comm_args beats the same key in mqtt_config_path's file."""
    (tmp_path / "mqtt.yaml").write_text("BROKER_HOST: from-file\nBROKER_PORT: 1884\n")
    path = write_config(tmp_path, {"comm_args": {"mqtt_config_path": "mqtt.yaml",
                                                 "BROKER_HOST": "inline"}})
    mqtt = load_config(path, 0, env={}).comm.mqtt
    assert (mqtt.host, mqtt.port) == ("inline", 1884)


def test_s3_settings_fall_back_to_the_aws_environment(tmp_path):
    """Without CN_S3_* keys, AWS_ACCESS_KEY_ID/SECRET/ENDPOINT/REGION from env are used."""
    env = {"AWS_ACCESS_KEY_ID": "env-aki", "AWS_SECRET_ACCESS_KEY": "env-sak",
           "AWS_ENDPOINT_URL": "http://env-endpoint:5000", "AWS_DEFAULT_REGION": "ap-south-1"}
    s3 = load_config(write_config(tmp_path), 0, env=env).comm.s3
    assert (s3.access_key, s3.secret_key) == ("env-aki", "env-sak")
    assert s3.endpoint_url == "http://env-endpoint:5000" and s3.region == "ap-south-1"


def test_the_s3_specific_endpoint_variable_wins_over_the_generic_one(tmp_path):
    """AWS_ENDPOINT_URL_S3 is preferred to AWS_ENDPOINT_URL."""
    env = {"AWS_ENDPOINT_URL": "http://generic", "AWS_ENDPOINT_URL_S3": "http://s3-only"}
    assert load_config(write_config(tmp_path), 0, env=env).comm.s3.endpoint_url == "http://s3-only"


def test_config_values_win_over_the_aws_environment(tmp_path):
    """Keys in the config beat the AWS environment variables."""
    env = {"AWS_ACCESS_KEY_ID": "env-aki", "AWS_SECRET_ACCESS_KEY": "env-sak",
           "AWS_ENDPOINT_URL": "http://env", "AWS_DEFAULT_REGION": "ap-south-1"}
    s3 = load_config(write_config(tmp_path, {"comm_args": INLINE}), 0, env=env).comm.s3
    assert (s3.access_key, s3.secret_key, s3.endpoint_url, s3.region) == (
        "AKIAINLINEKEY", "inline-secret-sak", "http://minio:9000", "eu-west-1")


def test_without_settings_or_environment_the_defaults_apply(tmp_path):
    """No comm keys and an empty environment: local broker, AWS-style S3 without credentials."""
    comm = load_config(write_config(tmp_path), 0, env={}).comm
    assert (comm.mqtt.host, comm.mqtt.port) == ("127.0.0.1", 1883)
    assert comm.s3.access_key is None and comm.s3.endpoint_url is None


def test_secrets_are_not_in_the_repr(tmp_path):
    """Passwords and S3 keys never appear in repr(cfg) (so never in logs)."""
    cfg = load_config(write_config(tmp_path, {"comm_args": INLINE}), 0, env={})
    text = repr(cfg)
    for secret in ("hunter2-mqtt", "AKIAINLINEKEY", "inline-secret-sak"):
        assert secret not in text
    assert "broker.example" in text, "non-secret settings stay visible"


def test_secrets_from_the_environment_are_not_in_the_repr(tmp_path):
    """Credentials taken from AWS_* variables are hidden in repr(cfg) too."""
    env = {"AWS_ACCESS_KEY_ID": "ENVKEYID123", "AWS_SECRET_ACCESS_KEY": "env-secret-456"}
    text = repr(load_config(write_config(tmp_path), 0, env=env))
    assert "ENVKEYID123" not in text and "env-secret-456" not in text


def test_an_unsupported_backend_is_rejected(tmp_path):
    """comm_args.backend other than MQTT_S3 fails naming the key."""
    err = config_error(write_config(tmp_path, {"comm_args": {"backend": "GRPC"}}))
    assert err.key == "comm_args.backend" and "GRPC" in str(err)


def test_a_broker_port_out_of_range_names_the_mqtt_file(tmp_path):
    """An impossible BROKER_PORT fails naming the file that set it."""
    (tmp_path / "mqtt.yaml").write_text("BROKER_PORT: 70000\n")
    err = config_error(write_config(tmp_path, {"comm_args": {"mqtt_config_path": "mqtt.yaml"}}))
    assert err.file == str(tmp_path / "mqtt.yaml") and err.key == "BROKER_PORT"


def test_a_wrongly_typed_comm_key_names_its_file(tmp_path):
    """BROKER_PORT: 'abc' in the MQTT file fails naming that file and the key."""
    (tmp_path / "mqtt.yaml").write_text("BROKER_PORT: abc\n")
    err = config_error(write_config(tmp_path, {"comm_args": {"mqtt_config_path": "mqtt.yaml"}}))
    assert err.file == str(tmp_path / "mqtt.yaml") and "BROKER_PORT" in err.key


# -- errors name the file and the key ----------------------------------------------------------------

@pytest.mark.parametrize(("section", "key", "value"), [
    ("train_args", "comm_round", "abc"),
    ("train_args", "batch_size", 2.5),
    ("train_args", "learning_rate", "fast"),
    ("train_args", "epochs", True),
    ("device_args", "using_gpu", "yes"),
    ("dist_training_args", "node_addresses", 5),
])
def test_a_wrong_type_names_the_file_and_the_dotted_key(tmp_path, section, key, value):
    """A value of the wrong type fails with the file and 'section.key' in the message."""
    path = write_config(tmp_path, {section: {key: value}})
    err = config_error(path)
    assert err.file == str(path) and err.key == f"{section}.{key}"
    assert str(path) in str(err) and f"{section}.{key}" in str(err)


@pytest.mark.parametrize(("section", "key", "value"), [
    ("train_args", "comm_round", 0),
    ("train_args", "comm_round", -1),
    ("train_args", "batch_size", 0),
    ("train_args", "epochs", -3),
    ("train_args", "client_num_in_total", 0),
    ("train_args", "learning_rate", 0),
    ("train_args", "learning_rate", -0.1),
    ("train_args", "round_deadline_s", 0),
    ("train_args", "round_give_up_s", -5),
    ("train_args", "silo_wait_timeout_s", 0),
    ("train_args", "min_silos_per_round", -1),
    ("validation_args", "frequency_of_the_test", 0),
    ("dist_training_args", "n_proc_per_node", 0),
    ("dist_training_args", "dist_timeout_s", -1),
    ("dist_training_args", "max_group_restarts", -1),
])
def test_non_positive_values_are_rejected(tmp_path, section, key, value):
    """Counts, rates and timeouts that must be positive fail naming the dotted key."""
    path = write_config(tmp_path, {section: {key: value}})
    err = config_error(path)
    assert err.key == f"{section}.{key}" and str(path) in str(err)


def test_more_silos_per_round_than_in_total_is_rejected(tmp_path):
    """client_num_per_round > client_num_in_total fails naming client_num_per_round."""
    path = write_config(tmp_path, {"train_args": {"client_num_per_round": 3}})
    assert config_error(path).key == "train_args.client_num_per_round"


def test_min_silos_above_per_round_is_rejected(tmp_path):
    """min_silos_per_round larger than client_num_per_round fails naming it."""
    path = write_config(tmp_path, {"train_args": {"min_silos_per_round": 3}})
    assert config_error(path).key == "train_args.min_silos_per_round"


def test_an_unknown_top_level_section_is_rejected(tmp_path):
    """A misspelt section fails naming the file and the section."""
    path = write_config(tmp_path, {"trian_args": {"epochs": 1}})
    err = config_error(path)
    assert err.file == str(path) and "trian_args" in str(err)


def test_a_section_that_is_not_a_mapping_is_rejected(tmp_path):
    """A section given as a list fails naming the section."""
    path = write_config(tmp_path, {"train_args": [1, 2]})
    assert config_error(path).key == "train_args"


def test_unknown_keys_inside_a_section_are_kept(tmp_path):
    """Keys FedML knows but octopusd does not use load unchanged into ``extra``."""
    path = write_config(tmp_path, {"train_args": {"client_id_list": None, "server_lr": 1.0}})
    cfg = load_config(path, 0, env={})
    assert cfg.train.extra == {"client_id_list": None, "server_lr": 1.0}
    assert cfg.server_lr == 1.0


def test_a_missing_config_file_is_named(tmp_path):
    """A path that does not exist fails with ConfigError naming it."""
    missing = tmp_path / "absent.yaml"
    err = config_error(missing)
    assert err.file == str(missing) and "cannot read" in str(err)


def test_a_missing_private_file_is_named(tmp_path):
    """A server_config_path that does not exist fails naming that file."""
    path = write_config(tmp_path, {"private_config_paths": {"server_config_path": "nope.yaml"}})
    err = config_error(path)
    assert "nope.yaml" in str(err)


def test_invalid_yaml_is_named(tmp_path):
    """A file that is not YAML fails with ConfigError naming it."""
    path = tmp_path / "broken.yaml"
    path.write_text("train_args:\n  comm_round: [1, 2\n")
    err = config_error(path)
    assert err.file == str(path) and "invalid YAML" in str(err)


def test_a_top_level_that_is_not_a_mapping_is_rejected(tmp_path):
    """A YAML list at the top level fails naming the file."""
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    assert config_error(path).file == str(path)


@pytest.mark.parametrize("rank", [3, 17, -1, -5])
def test_a_rank_out_of_range_is_rejected(rank):
    """Ranks outside 0..client_num_in_total fail with ConfigError naming --rank."""
    err = config_error(SEED, rank)
    assert err.key == "--rank" and str(rank) in str(err)


# -- private files --------------------------------------------------------------------------------

def test_the_private_file_of_the_rank_is_merged_over_the_main_file(tmp_path):
    """server_config_path / client_silo_config_paths[rank-1] override the main file's values."""
    (tmp_path / "server.yaml").write_text("train_args:\n  comm_round: 7\n")
    (tmp_path / "s1.yaml").write_text("dist_training_args:\n  n_proc_per_node: 4\n")
    (tmp_path / "s2.yaml").write_text("train_args:\n  batch_size: 32\n")
    path = write_config(tmp_path, {"private_config_paths": {
        "server_config_path": "server.yaml", "client_silo_config_paths": ["s1.yaml", "s2.yaml"]}})
    server, s1, s2 = (load_config(path, r, env={}) for r in (0, 1, 2))
    assert (server.comm_round, s1.comm_round, s2.comm_round) == (7, 3, 3)
    assert (server.n_proc_per_node, s1.n_proc_per_node, s2.n_proc_per_node) == (1, 4, 1)
    assert (server.batch_size, s1.batch_size, s2.batch_size) == (10, 10, 32)


def test_an_error_in_a_private_file_names_both_files(tmp_path):
    """A bad value from a rank's private file is reported with the main and the private file."""
    (tmp_path / "s1.yaml").write_text("dist_training_args:\n  n_proc_per_node: two\n")
    path = write_config(tmp_path, {"private_config_paths": {"client_silo_config_paths": ["s1.yaml"]}})
    err = config_error(path, 1)
    assert str(path) in str(err) and "s1.yaml" in str(err)
    assert err.key == "dist_training_args.n_proc_per_node"


def test_several_nodes_need_as_many_addresses(tmp_path):
    """n_node_in_silo > 1 requires that many node_addresses."""
    path = write_config(tmp_path, {"dist_training_args": {"n_node_in_silo": 2,
                                                          "node_addresses": ["10.0.0.1"]}})
    assert config_error(path).key == "dist_training_args.node_addresses"
    ok = write_config(tmp_path, {"dist_training_args": {"n_node_in_silo": 2, "master_address": "10.0.0.1",
                                                        "node_addresses": "10.0.0.1, 10.0.0.2"}},
                      name="ok.yaml")
    assert load_config(ok, 0, env={}).dist.node_addresses == ("10.0.0.1", "10.0.0.2")


def test_the_first_node_must_be_the_master(tmp_path):
    """master_address must be the first of node_addresses: trainer rank 0 hosts the rendezvous."""
    path = write_config(tmp_path, {"dist_training_args": {"n_node_in_silo": 2, "master_address": "10.0.0.2",
                                                          "node_addresses": ["10.0.0.1", "10.0.0.2"]}})
    err = config_error(path)
    assert err.key == "dist_training_args.master_address" and "first node" in str(err)


@pytest.mark.parametrize("value", ["0", "-5", "1MB", "lots"])
def test_a_bad_shared_memory_threshold_is_a_config_error(value):
    with pytest.raises(ConfigError, match="OCTOPUSD_SHM_MIN_BYTES"):
        load_config(SEED, 1, env={"OCTOPUSD_SHM_MIN_BYTES": value})
    assert load_config(SEED, 1, env={"OCTOPUSD_SHM_MIN_BYTES": "4096"}).rank == 1
