"""cluster.yaml is a real Ray cluster launcher file: it validates against the schema ray ships."""

import json
import re
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from trainers.config import PROJECT_ROOT

SCHEMA = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"


def test_cluster_yaml_validates_against_rays_schema():
    config = yaml.safe_load((PROJECT_ROOT / "cluster.yaml").read_text())
    jsonschema.validate(config, json.loads(SCHEMA.read_text()))
    assert config["head_node_type"] in config["available_node_types"]
    assert any("mlflow server" in command for command in config["head_setup_commands"])


def test_tracking_is_postgres_and_behind_basic_auth_when_it_listens_beyond_loopback():
    from mlflow.cli import server as server_command

    config = yaml.safe_load((PROJECT_ROOT / "cluster.yaml").read_text())
    server = next(command for command in config["head_setup_commands"] if "mlflow server" in command)
    # The backend store reaches the server through its environment (the variable click reads for the
    # option, in the installed mlflow), from a file written at setup: PostgreSQL, no SQLite on NFS.
    envvar = next(option.envvar for option in server_command.params if option.name == "backend_store_uri")
    assert envvar == "MLFLOW_BACKEND_STORE_URI"
    assert re.search(r"set -a && \. ~/\.mlflow-db-env && set \+a && .*mlflow server", server)
    assert any(re.search(rf"printf '{envvar}=postgresql://mlflow:%s@127\.0\.0\.1:5432/mlflow\\n' \"\$MLFLOW_DB_PASSWORD\" > ~/\.mlflow-db-env", command)
               for command in config["head_setup_commands"])
    assert not any("sqlite" in command for command in config["head_setup_commands"])
    assert "--host 127.0.0.1" in server or "--app-name basic-auth" in server
    assert any("RAY_AUTH_MODE=token" in command for command in config["head_start_ray_commands"])
    assert all("RAY_AUTH_MODE=token" in command for command in config["worker_start_ray_commands"] if "ray start" in command)


def test_the_schema_check_would_catch_a_broken_file():
    config = yaml.safe_load((PROJECT_ROOT / "cluster.yaml").read_text())
    config["available_node_types"]["gpu_worker"]["max_workers"] = "eight"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, json.loads(SCHEMA.read_text()))


def test_the_nodes_share_one_bucket_and_no_file_system():
    text = (PROJECT_ROOT / "cluster.yaml").read_text()
    config = yaml.safe_load(text)
    server = next(command for command in config["head_setup_commands"] if "mlflow server" in command)
    artifacts = re.search(r"--artifacts-destination (s3://[^/\s]+)/", server)
    assert artifacts, "MLflow's artifacts are not in a bucket"
    bucket = artifacts.group(1)
    for setting in ("sweep.storage_dir", "eval.cache_dir"):  # the documented job command
        assert re.search(rf"--set {re.escape(setting)}={re.escape(bucket)}/", text), f"{setting} is not in {bucket}"
    assert not any("nfs" in command or "/shared" in command for command in config["setup_commands"] + config["head_setup_commands"])
    assert all("IamInstanceProfile" in node["node_config"] for name, node in config["available_node_types"].items() if name != config["head_node_type"])


def simple_commands(command: str) -> list[str]:
    """A shell line cut at its pipes and lists (|, ||, &&, ;): roughly one program and its arguments each."""
    return [part.strip() for part in re.split(r"\|\|?|&&|;", command)]


def test_no_password_is_on_a_command_line():
    """ps, /proc/*/cmdline, sudo's log and Ray's job records show a program's arguments: a password may be
    in a file, in an environment, or on a program's standard input, never among its arguments."""
    text = (PROJECT_ROOT / "cluster.yaml").read_text()
    config = yaml.safe_load(text)
    commands = config["head_setup_commands"] + config["head_start_ray_commands"]
    for part in (part for command in commands for part in simple_commands(command)):
        for program in ("mlflow server", "ray start"):
            if program in part:
                arguments = part.split(program, 1)[1]
                assert "postgresql://" not in arguments and "PASSWORD" not in arguments and "--backend-store-uri" not in arguments, part
        if "psql" in part:
            assert "PASSWORD" not in part.split("psql", 1)[1], part  # CREATE ROLE ... PASSWORD goes on psql's stdin
    job = text[text.index("#   ray job submit"):text.index("# Validated against")]
    assert "optuna_storage" not in job and "PASSWORD" not in job  # the sweep reads $ACPO_OPTUNA_STORAGE itself


def test_the_optuna_study_has_its_own_least_privileged_role():
    config = yaml.safe_load((PROJECT_ROOT / "cluster.yaml").read_text())
    setup = " ".join(config["head_setup_commands"])
    assert "test -f ~/.optuna-db || printf 'OPTUNA_DB_PASSWORD=%s\\n'" in setup and "umask 077" in setup
    assert "CREATE ROLE optuna LOGIN PASSWORD '%s'" in setup and '"$OPTUNA_DB_PASSWORD" | sudo -u postgres psql' in setup
    assert "CREATE DATABASE optuna OWNER optuna" in setup and "optuna OWNER mlflow" not in setup
    assert re.search(r"REVOKE ALL ON DATABASE mlflow, mlflow_auth\b.* FROM PUBLIC", setup)  # the optuna role may not connect to them
    start = next(command for command in config["head_start_ray_commands"] if "ray start" in command)
    assert "ACPO_OPTUNA_STORAGE=postgresql://optuna:$OPTUNA_DB_PASSWORD@127.0.0.1:5432/optuna" in start
    # The head's Ray (and every driver on it) carries the study's URL and MLflow's login, not MLflow's database password.
    assert ". ~/.mlflow-db" not in start and "MLFLOW_DB_PASSWORD" not in start
    assert start.index(". ~/.optuna-db") < start.index("set -a")  # the password itself is not exported
