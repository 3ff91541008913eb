"""`acpo train` end to end on the digits preset, shrunk by overrides."""

import json

from sweeps.cli import main
from trainers.models import load_base_model


def test_train_runs_evaluates_and_saves(tmp_path, capsys, digits_assets):
    out = tmp_path / "run"
    code = main(["train", "--local", "--set", "train.steps=3", "--set", "eval.samples=24", "--set", "eval.sampling_steps=[3]",
                 "--set", f"train.output_dir={out}"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "fid@3" in printed and "heldout_quality@3" in printed and "classifier FID, not Inception FID" in printed
    resolved = json.loads((out / "config.json").read_text())
    assert resolved["train"]["steps"] == 3
    checkpoint = printed.split("checkpoint: ")[1].split()[0]
    tuned, base = load_base_model(f"{checkpoint}/model"), load_base_model(digits_assets / "base")
    changed = [k for k, v in tuned.denoiser.state_dict().items() if not (v == base.denoiser.state_dict()[k]).all()]
    assert changed  # three optimizer steps moved the weights


def test_non_finite_loss_stops_with_the_step_and_term(tmp_path, capsys, digits_assets):
    code = main(["train", "--local", "--set", "train.steps=50", "--set", "train.learning_rate=1e30", "--set", "train.grad_clip=0",
                 "--set", "eval.samples=8", "--set", "eval.sampling_steps=[1]", "--set", f"train.output_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2
    assert "non-finite loss at step" in err and "denoise" in err


def test_dry_runs_of_select_and_prompt_selection_write_nothing(tmp_path, capsys):
    """A dry run of the commands that register or write (a model version, a prompt pool) stops before it."""
    from sweeps.cli import main
    from trainers.common import layout

    sweep = tmp_path / "sweeps" / "seen"
    sweep.mkdir(parents=True)
    (sweep / layout.BASE_METRICS).write_text("{}")
    before = sorted(p.name for p in sweep.iterdir())
    assert main(["select", "--sweep", "seen", "--dry-run", "--set", f"sweep.storage_dir={tmp_path / 'sweeps'}",
                 "--set", "sweep.tracking_uri=http://127.0.0.1:9"]) == 0  # nothing answers there: never contacted
    assert '"name": "seen"' in capsys.readouterr().out and sorted(p.name for p in sweep.iterdir()) == before
    (tmp_path / "candidates.txt").write_text("a handwritten 1\na handwritten 2\n")
    assert main(["prompts", "select", "--preset", "digits-t2i", "--in", str(tmp_path / "candidates.txt"), "--out", str(tmp_path / "pool.txt"),
                 "--dry-run"]) == 0
    assert not (tmp_path / "pool.txt").exists()
