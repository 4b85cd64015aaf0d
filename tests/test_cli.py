"""The command line: clear errors and documented exit codes before anything touches the network."""
from __future__ import annotations

import subprocess
import sys

import yaml

from octopusd.testing import seed_config


def run(*args: str, cwd=None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "octopusd", *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd)


def write(tmp_path, mutate) -> str:
    raw = seed_config()
    raw.pop("private_config_paths")
    raw["comm_args"] = {"BROKER_HOST": "127.0.0.1", "BROKER_PORT": 1}
    mutate(raw)
    path = tmp_path / "fedml_config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_config_error_names_file_and_key_and_exits_78(tmp_path):
    """A wrong value stops the daemon with exit code 78, naming the file and the key."""
    cf = write(tmp_path, lambda r: r["train_args"].update(comm_round="many"))
    res = run("server", "--cf", cf, "--rank", "0")
    assert res.returncode == 78
    assert "fedml_config.yaml" in res.stderr and "train_args.comm_round" in res.stderr


def test_unknown_plugin_lists_known_names_and_exits_79(tmp_path):
    """An unknown aggregator fails at start-up with exit 79 and the registered names."""
    cf = write(tmp_path, lambda r: r["train_args"].update(federated_optimizer="FedMagic"))
    res = run("server", "--cf", cf, "--rank", "0")
    assert res.returncode == 79
    assert "FedMagic" in res.stderr and "FedAvg" in res.stderr


def test_unknown_model_fails_the_silo_before_launching_trainers(tmp_path):
    """A silo with an unknown model name fails at start-up, listing lr and cnn."""
    cf = write(tmp_path, lambda r: r["model_args"].update(model="resnet9000"))
    res = run("silo", "--cf", cf, "--rank", "1")
    assert res.returncode == 79
    assert "resnet9000" in res.stderr and "cnn" in res.stderr and "lr" in res.stderr


def test_missing_config_file_is_a_config_error(tmp_path):
    """A config path that does not exist is exit 78 with the path in the message."""
    res = run("server", "--cf", str(tmp_path / "nope.yaml"))
    assert res.returncode == 78 and "nope.yaml" in res.stderr


def test_plugins_command_lists_builtins():
    """`octopusd plugins` lists every built-in plugin by kind."""
    res = run("plugins")
    assert res.returncode == 0
    for name in ("FedAvg", "mnist", "lr", "cnn", "torchrun", "pdsh"):
        assert name in res.stdout


def test_keygen_writes_a_private_key_only_the_owner_reads(tmp_path):
    """`octopusd keygen` writes NAME.key (0600) and NAME.pub."""
    res = run("keygen", "--out", str(tmp_path), "--name", "silo-1")
    assert res.returncode == 0, res.stderr
    assert oct((tmp_path / "silo-1.key").stat().st_mode & 0o777) == "0o600"
    assert (tmp_path / "silo-1.pub").read_text().startswith("-----BEGIN PUBLIC KEY-----")
