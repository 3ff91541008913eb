"""A tiny sweep on the digits preset (3 trials of a few steps): its command line, and its runs in MLflow."""

TINY = ["train.batch_size=8", "train.eval_every=2", "eval.samples=16", "sweep.confirm.samples=16", "sweep.confirm.top_k=0", "eval.resamples=100", "eval.sampling_steps=[2]", "train.cpus_per_worker=1",
        "sweep.space.train.steps={randint: [2, 4], step: 2}"]


def sweep_args(name, storage, uri, samples=3):
    return ["--name", name, "--num-samples", str(samples), "--set", f"sweep.storage_dir={storage}", "--set", f"sweep.tracking_uri={uri}",
            *sum((["--set", item] for item in TINY), [])]


def runs_of(client, name):
    experiment = client.get_experiment_by_name(name)
    return client.search_runs([experiment.experiment_id], max_results=100)
