"""`acpo study` end to end, tiny: 2 methods x 2 seeds x 1 trial of 2 steps on a local Ray instance and a
real MLflow server (integration tier); its report recomputed from its own per-checkpoint table; run
again under another name, the same trials with the same figures; bad studies fail in one line before
Ray starts (unit tier)."""

import json
from pathlib import Path

import pytest
import yaml

from sweeps.acpo_study import main, read_study

TINY = ["train.steps=2", "train.batch_size=8", "train.eval_every=1", "eval.samples=16", "sweep.confirm.samples=16", "eval.resamples=100", "eval.sampling_steps=[2]", "train.cpus_per_worker=1"]


def tiny_study(tmp_path, uri, methods=("baseline", "acpo"), name="tiny"):
    shipped = read_study("digits")
    data = {"name": name, "preset": "digits", "noise_seeds": 2, "seeds": [0, 1], "trials": 1, "set": TINY, "storage_dir": str(tmp_path),
            "tracking_uri": uri, "methods": {m: shipped.methods[m].model_dump() for m in methods}}
    for method in data["methods"].values():  # keep the spaces off train.steps: the budget is the same for all
        method["space"] = {k: v for k, v in method["space"].items() if k != "train.steps"}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.integration
def test_tiny_study_runs_tracks_and_reports(tmp_path, mlflow_server, digits_assets, monkeypatch):
    import ray
    from mlflow.tracking import MlflowClient

    import sweeps.confirm
    from sweeps.study_report import summarize

    base_measurements = []  # (where, whether it was there before): the base's per-sample data on a confirmation bank
    real_measure = sweeps.confirm.measure

    def spy(evaluator, location, model_location, base_model=False, **options):
        if base_model:
            base_measurements.append((location, Path(location).is_file()))
        return real_measure(evaluator, location, model_location, base_model, **options)

    monkeypatch.setattr(sweeps.confirm, "measure", spy)
    path = tiny_study(tmp_path, mlflow_server)
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        assert main(["--study", str(path)]) == 0
    finally:
        ray.shutdown()
    # the base sampled once per confirmation bank (one per study seed), in the study's folder; every
    # sweep's confirmation found it there already
    sampled = [where for where, existed in base_measurements if not existed]
    assert len(sampled) == 2 and all(Path(where).parent.parent == tmp_path / "tiny" / "confirmation" for where in sampled)
    assert sum(existed for _, existed in base_measurements) == 4  # 2 methods x 2 seeds
    report = tmp_path / "tiny" / "report"
    assert {"report.md", "report.html", "fronts.png", "summary.json"} <= {p.name for p in report.iterdir()}
    summary = json.loads((report / "summary.json").read_text())
    assert set(summary["methods"]) == {"baseline", "acpo"} and not summary["failures"]
    assert all(m["seeds"] == [0, 1] and m["checkpoints"] == 4 for m in summary["methods"].values())  # 2 seeds x 1 trial x steps 1, 2
    # the report's figures, recomputed from the sweeps' own per-checkpoint files
    rows = []
    for method in ("baseline", "acpo"):
        for seed in (0, 1):
            for metrics in sorted((tmp_path / "tiny" / "sweeps" / f"{method}-seed{seed}").glob("trials/*/step_*/metrics.json")):
                rows.append({**json.loads(metrics.read_text()), "method": method, "seed": seed, "trial": metrics.parts[-3]})
    recomputed = summarize(rows, summary["base"], 0.1)
    for method, figures in summary["methods"].items():
        for key in ("hypervolume", "best_fid", "reward_gap"):
            assert figures[key] == pytest.approx(list(recomputed[method][key]), nan_ok=True)
    assert "<img src=\"data:image/png;base64," in (report / "report.html").read_text()  # self-contained
    # each sweep confirmed its pick on its seed's confirmation bank (1000 + seed), shared by the methods
    for method in ("baseline", "acpo"):
        confirmed = summary["methods"][method]["confirmed"]
        assert confirmed["seeds"] == [0, 1] and all(-1 < p["gain"]["low"] <= p["gain"]["value"] <= p["gain"]["high"] < 1
                                                    for p in confirmed["per_seed"])
        for seed in (0, 1):
            selection = json.loads((tmp_path / "tiny" / "sweeps" / f"{method}-seed{seed}" / "selection.json").read_text())
            assert len(selection["confirmation"]["candidates"]) == 1 and selection["confirmation"]["bank"] == {"seed": 1000 + seed, "samples": 16, "steps": 2}
    assert "gain_vs_baseline" in summary["methods"]["acpo"]["confirmed"] and "gain_vs_baseline" not in summary["methods"]["baseline"]["confirmed"]
    assert [b["seed"] for b in summary["confirmation_banks"]] == [1000, 1001] and not summary["unconfirmed"]
    assert "re-measured on samples the search never saw" in (report / "report.md").read_text()
    # the hacking flag's paired intervals: one per evaluated checkpoint, from its stored per-sample data
    assert len(json.loads((tmp_path / "tiny" / "screening_intervals.json").read_text())) == 8
    # MLflow: one study run, both methods' sweeps nested under it, the report on it
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("tiny")
    runs = client.search_runs([experiment.experiment_id], max_results=200)
    study_run = next(r for r in runs if r.data.tags.get("acpo.role") == "study")
    sweeps = {r.data.tags["acpo.sweep"] for r in runs if r.data.tags.get("mlflow.parentRunId") == study_run.info.run_id
              and r.data.tags.get("acpo.role") == "sweep"}
    assert sweeps == {"baseline-seed0", "baseline-seed1", "acpo-seed0", "acpo-seed1"}
    assert {"baseline.hypervolume", "acpo.reward_gap", "acpo.hacked_checkpoints", "noise.fid", "acpo.confirmed_gain",
            "acpo.confirmed_fid_ratio"} <= set(study_run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(study_run.info.run_id, "report")}
    assert {"report/fronts.png", "report/report.md", "report/report.html"} <= artifacts
    # --resume of a finished study runs nothing again and writes the same table
    before = (report / "report.md").read_text()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        assert main(["--study", str(path), "--resume"]) == 0
    finally:
        ray.shutdown()
    assert (report / "report.md").read_text() == before
    # the same study again (one method, under another name), its seed-1 sweep failing: reported, not
    # fatal; --resume runs that one alone; then the same trials were proposed, with the same figures
    import sweeps.driver

    real_run_sweep = sweeps.driver.run_sweep

    def failing_seed1(config, sweep, resume=False, **options):
        if sweep.name == "baseline-seed1":
            raise RuntimeError("injected failure")
        return real_run_sweep(config, sweep, resume, **options)

    again = tiny_study(tmp_path, mlflow_server, methods=("baseline",), name="tiny-again")
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        sweeps.driver.run_sweep = failing_seed1
        assert main(["--study", str(again)]) == 0
        failed = json.loads((tmp_path / "tiny-again" / "report" / "summary.json").read_text())
        assert failed["failures"] == {"baseline-seed1": "injected failure"} and failed["methods"]["baseline"]["seeds"] == [0]
        assert "baseline-seed1 failed: injected failure" in (tmp_path / "tiny-again" / "report" / "report.md").read_text()
        sweeps.driver.run_sweep = real_run_sweep
        assert main(["--study", str(again), "--resume"]) == 0
    finally:
        sweeps.driver.run_sweep = real_run_sweep
        ray.shutdown()

    def proposed(name, seed):
        folder = tmp_path / name / "sweeps" / f"baseline-seed{seed}"
        return sorted(json.loads(p.read_text())["train.learning_rate"] for p in folder.glob("work/*/params.json"))

    for seed in (0, 1):
        assert proposed("tiny", seed) and proposed("tiny", seed) == proposed("tiny-again", seed)
    figures = json.loads((tmp_path / "tiny-again" / "report" / "summary.json").read_text())["methods"]["baseline"]
    assert figures["seeds"] == [0, 1]
    for key in ("hypervolume", "best_fid", "reward_gap"):
        assert figures[key] == pytest.approx(summary["methods"]["baseline"][key], nan_ok=True)


@pytest.mark.integration
def test_a_study_name_taken_in_mlflow_is_refused_before_anything_runs(tmp_path, mlflow_server, capsys):
    """A study whose folder is gone but whose MLflow experiment holds its runs: every sweep of a new
    one would fail on its name there, one by one; it is refused in one line, nothing written."""
    import ray

    from sweeps.tracking import SweepTracking

    SweepTracking(mlflow_server, "taken", "taken").run("study", "taken")
    path = tiny_study(tmp_path, mlflow_server, methods=("baseline",), name="taken")
    assert main(["--study", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "study.name: 'taken' is already used in MLflow experiment 'taken'" in err, err
    assert not (tmp_path / "taken").exists() and not ray.is_initialized()


@pytest.mark.parametrize("overrides, message", [
    (["trials=0"], r"study.trials: Input should be greater than or equal to 1"),
    (["methods={bad: {objective: {denoise: 1.0}, space: {train.lr: {loguniform: [1.0e-5, 1.0e-4]}}}}"], r"study.methods.bad: .*train.lr"),
    (["methods={bad: {objective: {perceptual: 1.0}, space: {train.learning_rate: {loguniform: [1.0e-5, 1.0e-4]}}}}"],
     r"study.methods.bad: objective.perceptual: unknown term"),
    (["nosuch=1"], r"unknown key 'study.nosuch'"),
    (["set=[sweep.fidelity=kid, sweep.kid_tolerance=5]"], r"study.set: sweep.fidelity=kid: a study compares its methods on FID"),
])
def test_bad_studies_fail_in_one_line_before_ray(capsys, overrides, message):
    import re

    assert main(["--study", "digits", "--dry-run", *sum((["--set", o] for o in overrides), [])]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err), err


def test_broken_study_file_fails_in_one_line(tmp_path, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: x\nmethods: [unclosed\n")
    assert main(["--study", str(broken), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"study {broken}: not valid YAML" in err, err


@pytest.mark.parametrize("preset, methods", [
    ("digits", {"baseline", "reward_only", "acpo", "cas_dm", "self_perceptual", "unifl"}),
    ("digits-t2i", {"baseline", "reward_only", "acpo", "cas_dm", "self_perceptual", "unifl"}),
    ("digits-flow", {"baseline", "reward_only", "acpo", "cas_dm", "self_perceptual", "unifl"}),
    ("cifar10", {"baseline", "reward_only", "acpo", "cas_dm", "self_perceptual", "unifl"}),
    ("sd15", {"baseline", "reward_only", "acpo", "cas_dm", "self_perceptual", "unifl"}),
    ("digits-anchor", {"at_denoise", "at_feedback", "at_both"}),
    ("digits-adversarial", {"before", "unifl"}),
    ("digits-pefl-masks", {"segmenter", "data"}),
    ("digits-self-perceptual", {"with_denoise", "published"}),
    ("digits-t2i-decoupled", {"sampled", "rollout"}),
])
def test_shipped_studies_validate(capsys, preset, methods):
    assert main(["--preset", preset, "--dry-run"]) == 0
    study = json.loads(capsys.readouterr().out)
    base = next((name for name in ("digits-t2i", "digits-flow", "digits") if preset.startswith(name)), preset)
    assert set(study["methods"]) == methods and study["preset"] == base and len(study["seeds"]) >= 3
