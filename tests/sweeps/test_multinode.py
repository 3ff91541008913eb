"""A sweep on a Ray cluster of three nodes (a head that schedules nothing, two worker nodes), all on
this machine (`ray.cluster_utils.Cluster`: a GCS and a raylet per node), tracked by an MLflow server
on PostgreSQL (the cluster's tracking setup, cluster.yaml): the trials' training workers run on the
worker nodes, the sweep completes and registers its champion (integration tier). The nodes share
nothing but object storage: the sweep's storage and MLflow's artifacts are in an S3-compatible server
on 127.0.0.1 (moto's), and no local sweep folder is written. Its Optuna study is in PostgreSQL, and a
sentinel password in the Optuna URL, the tracking URI and the object store's secret key is in no byte the
sweep wrote (the bucket, MLflow's database and artifacts) and in no line it printed."""

import json

import pytest

from types import SimpleNamespace

from tests.servers import database_text, mlflow_server, postgres, postgres_database
from tests.sweeps.tiny_sweep import sweep_args

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def postgres_mlflow(s3):
    with postgres() as database, mlflow_server(database, f"{s3}/mlflow-multinode") as uri:
        yield SimpleNamespace(uri=uri, database=database)


SENTINEL = "Sentinel-0f-a-Pa55word"


def test_trials_train_on_the_worker_nodes(tmp_path, s3, postgres_mlflow, digits_assets, monkeypatch, capfd):
    import ray
    from mlflow.tracking import MlflowClient
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors

    from sweeps.acpo_sweep import main

    from trainers.common import storage
    from tests.servers import s3_keys

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SENTINEL)  # moto takes any key; every node starts with it
    optuna_url = postgres_database(postgres_mlflow.database, "optuna").replace("mlflow@", f"mlflow:{SENTINEL}@")  # trust auth
    tracking_uri = postgres_mlflow.uri.replace("http://", f"http://acpo:{SENTINEL}@")  # basic auth, which this server ignores
    # the dashboard: Ray's state API (which node each actor ran on) is served by it. The nodes start
    # with the S3 server's AWS_* variables (set by the s3 fixture), as a cluster's nodes get their credentials.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": True})
    workers = {cluster.add_node(num_cpus=1).node_id for _ in range(2)}
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        args = sweep_args("multinode", f"{s3}/multinode-sweeps", tracking_uri, samples=2)
        assert main([*args, "--set", f"sweep.optuna_storage={optuna_url}", "--dry-run"]) == 0
        assert main([*args, "--set", f"sweep.optuna_storage={optuna_url}"]) == 0
        actors = list_actors(filters=[("class_name", "=", "RayTrainWorker")], detail=True, limit=1000, raise_on_missing_output=False)
    finally:
        ray.shutdown()
        cluster.shutdown()
    nodes = {actor.node_id for actor in actors}
    assert len(actors) >= 2 and nodes <= workers, f"training workers ran on {nodes}; worker nodes: {workers}"
    assert len(nodes) == 2  # two trials at a time, one CPU per node: one on each
    selection = json.loads(storage.read_text(f"{s3}/multinode-sweeps/multinode/selection.json"))
    assert selection["champion"] and selection["registered"]["version"]
    client = MlflowClient(postgres_mlflow.uri)
    assert client.get_model_version_by_alias("multinode", "champion").tags["trial"] == selection["champion"]["trial"]
    runs = client.search_runs([client.get_experiment_by_name("multinode").experiment_id])
    assert sorted(r.data.tags["acpo.role"] for r in runs) == ["base", "sweep", "trial", "trial"]  # in PostgreSQL
    assert all(r.info.status == "FINISHED" for r in runs)
    assert any("/champion/" in key and key.endswith("/MLmodel") for key in s3_keys("mlflow-multinode/"))  # the registered model, in the bucket
    assert list(tmp_path.iterdir()) == []
    import optuna

    names = optuna.get_all_study_names(optuna_url)  # the sweep's name and its folder's id: a shared database
    assert len(names) == 1 and names[0].startswith("multinode-")
    assert len(optuna.load_study(study_name=names[0], storage=optuna_url).trials) == 2  # the study was in PostgreSQL
    printed = capfd.readouterr()
    assert SENTINEL not in printed.out + printed.err
    assert "mlflow:***@127.0.0.1" in printed.out  # the dry run printed the Optuna URL, redacted
    written = {key: storage.read_bytes(f"{s3}/{key}") for key in s3_keys("") if not key.endswith("/")}  # the sweep's folder, Tune's state, MLflow's artifacts
    assert any("/tune/" in key for key in written) and any("/champion/" in key for key in written)
    assert [key for key, data in written.items() if SENTINEL.encode() in data] == []
    assert SENTINEL not in database_text(postgres_mlflow.database) + database_text(optuna_url)
