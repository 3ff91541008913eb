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
    config = yaml.safe_load((PROJECT_ROOT / "cluster.yaml").read_text())
    server = next(command for command in config["head_setup_commands"] if "mlflow server" in command)
    assert "--backend-store-uri postgresql://" in server and "sqlite" not in server  # no SQLite on NFS
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
