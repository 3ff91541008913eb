"""`acpo select` on a finished sweep folder moved elsewhere (another machine, another disk): the
selection reads everything from the folder itself, not from the paths its runs recorded; and a
selection that fails for its own reasons says so, not that MLflow failed.

The finished sweep is built without Ray: checkpoints written with `write_checkpoint` (the base model's
weights, figures of our choosing), the trials' parameters, the base model's figures and the sweep's id,
where the sweep folder's layout puts them."""

import json
import shutil

import pytest
import torch

from sweeps.champion import select, select_and_export, select_and_register
from sweeps.presets import SweepConfig, apply_overrides, read_preset
from trainers.checkpoint import load_checkpoint_model, write_checkpoint
from trainers.common import layout
from trainers.common.errors import SelectionError
from trainers.config import Config
from trainers.models import load_base_model

BASE = {"fid": 50.0, "kid": 10.0, "heldout_quality": 0.5}
# (trial, step, fid, held-out quality, kid): the front is trial_0002@2, trial_0001@2, trial_0001@4; trial_0002@4 is dominated by trial_0001@4.
# Within the FID tolerance (10%: FID <= 55) the highest held-out quality is trial_0001@4: the champion.
# On the KID axis (tolerance 5: KID <= 15) the front is trial_0001@2, trial_0002@4, trial_0001@4 and the champion trial_0002@4.
FIGURES = [("trial_0001", 2, 45.0, 0.55, 10.0), ("trial_0001", 4, 52.0, 0.70, 30.0), ("trial_0002", 2, 40.0, 0.52, 12.0), ("trial_0002", 4, 60.0, 0.60, 14.0)]
SWEEP = SweepConfig(name="moved", fid_tolerance=0.1, space={"train.steps": {"randint": [2, 4]}}, tracking_wait_s=0)


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory, digits_assets):
    """(a finished sweep's folder, the base model's folder its runs recorded as `model.base`)."""
    root = tmp_path_factory.mktemp("finished")
    weights = root / "weights" / "base"
    shutil.copytree(digits_assets / "base", weights)
    data = apply_overrides(read_preset("digits"), [f"model.base={weights}", f"train.output_dir={root / 'out'}"])
    data.pop("sweep", None)
    config = Config.from_dict(data)
    base = load_base_model(str(weights))
    optimizer = torch.optim.AdamW(base.denoiser.parameters())
    folder = root / "sweep"
    for trial, step, fid, quality, kid in FIGURES:
        write_checkpoint(f"{layout.trial_checkpoints(folder, trial)}/{layout.checkpoint_name(step)}", step=step, model=base.denoiser,
                         base=base, config=config, optimizer=optimizer,
                         metrics={"step": step, "fid": fid, "kid": kid, "heldout_quality": quality, "trained_quality": quality})
        params = layout.params_file(folder, trial)
        (folder / "work" / trial).mkdir(parents=True, exist_ok=True)
        with open(params, "w") as out:
            json.dump({"train.steps": 4 if trial == "trial_0001" else 2}, out)
    with open(layout.base_metrics_file(folder), "w") as out:
        json.dump(BASE, out)
    with open(layout.sweep_id_file(folder), "w") as out:
        out.write("0123abcd\n")
    return folder, weights


def copy_of(finished_sweep, where):
    folder, _ = finished_sweep
    copy = where / "copied" / "moved"
    shutil.copytree(folder, copy)
    return copy


def test_select_runs_on_a_sweep_folder_moved_elsewhere(finished_sweep, tmp_path):
    """Moved to another parent folder, and the base model's weights gone from where the runs recorded
    them: the champion is selected among the moved checkpoints, verified, exported into the moved
    folder and sampled as its config says."""
    copy = copy_of(finished_sweep, tmp_path / "before")
    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    shutil.move(str(copy), str(moved))
    weights = finished_sweep[1]
    gone = weights.with_name("base.gone")
    weights.rename(gone)  # the recorded `model.base` (every checkpoint's config.json) names nothing now
    try:
        selection, exported, settings = select_and_export(SWEEP, str(moved), tmp_path / "stage")
    finally:
        gone.rename(weights)
    champion = selection["champion"]
    assert (champion["trial"], champion["step"]) == ("trial_0001", 4), selection["rule"]
    assert champion["checkpoint"] == str(moved / "trials" / "trial_0001" / "step_000004")
    assert champion["param:train.steps"] == 4
    assert [(row["trial"], row["step"]) for row in selection["front"]] == [("trial_0002", 2), ("trial_0001", 2), ("trial_0001", 4)]
    assert selection["unreadable"] == [] and selection["evaluated"] == 4
    written = json.loads((moved / "selection.json").read_text())
    assert written["champion"]["checkpoint"] == champion["checkpoint"]
    assert (moved / "pareto.png").is_file() and (moved / "pareto.html").is_file()
    # the champion, exported into the moved folder, loads on its own
    stored_champion = moved / json.loads((moved / "champion.json").read_text())["folder"]  # champions/<export>/, named once whole
    assert exported is not None and (stored_champion / "model_index.json").is_file()
    assert json.loads((stored_champion / "metrics.json").read_text())["fid"] == 52.0
    assert load_checkpoint_model(stored_champion).denoiser is not None
    stored = json.loads((moved / "trials" / "trial_0001" / "step_000004" / "config.json").read_text())["eval"]
    assert settings == {"sampler": stored["sampler"], "guidance_scale": stored["guidance_scale"], "prompts": [],
                        "steps": stored["sampling_steps"][0]}


def test_a_sweep_on_the_kid_axis_selects_on_kid(finished_sweep, tmp_path):
    """`sweep.fidelity: kid`: the front, the tolerance (absolute) and the champion are KID's, the
    selection records its axis, and the plots are drawn on KID."""
    moved = copy_of(finished_sweep, tmp_path)
    sweep = SWEEP.model_copy(update={"fidelity": "kid", "kid_tolerance": 5.0})
    selection = select(sweep, str(moved))
    assert [(row["trial"], row["step"]) for row in selection["front"]] == [("trial_0001", 2), ("trial_0002", 4), ("trial_0001", 4)]
    assert (selection["champion"]["trial"], selection["champion"]["step"]) == ("trial_0002", 4), selection["rule"]
    assert "KID <= 15" in selection["rule"] and selection["base"] == {"kid": 10.0, "heldout_quality": 0.5}
    assert selection["fidelity"] == {"axis": "kid", "tolerance": 5.0, "kind": "absolute"}
    assert "KID (lower is better)" in (moved / "pareto.html").read_text()


def test_a_config_of_another_version_still_gives_the_sampling_settings(finished_sweep, tmp_path):
    """The champion's settings are four values read from its config.json, not the whole config
    re-validated: a key this version does not know (a folder written by another version) is no error."""
    moved = copy_of(finished_sweep, tmp_path)
    config_file = moved / "trials" / "trial_0001" / "step_000004" / "config.json"
    config = json.loads(config_file.read_text())
    config["model"]["from_another_version"] = True
    config_file.write_text(json.dumps(config))
    _, _, settings = select_and_export(SWEEP, str(moved), tmp_path / "stage")
    assert settings["sampler"] == config["eval"]["sampler"]


@pytest.mark.parametrize("broken, names", [
    ("base_metrics.json", "base_metrics.json"),
    ("trials/trial_0001/step_000004/config.json", "config.json"),
])
def test_a_broken_selection_input_is_named_and_mlflow_is_not_blamed(finished_sweep, tmp_path, broken, names):
    """Something of the sweep's own folder unreadable: a SelectionError naming it, before MLflow is
    contacted (no server answers at the tracking URI here); not "MLflow ... failed"."""
    moved = copy_of(finished_sweep, tmp_path)
    (moved / broken).write_text("{not json")
    with pytest.raises(SelectionError) as raised:
        select_and_register(SWEEP, str(moved), "http://127.0.0.1:9")
    message = str(raised.value)
    assert names in message and "mlflow" not in message.lower(), message


def test_a_folder_with_no_sweep_is_a_selection_error(tmp_path):
    with pytest.raises(SelectionError, match="no sweep at"):
        select(SWEEP, str(tmp_path))
