"""Every term trains 2 steps on the `digits-flow` stand-in through the command line a user types, and
changes what the model samples: the fine-tuned checkpoint's evaluation (the same seed bank as the
base's) differs from the base's (integration tier: ~3 min)."""

import json

import pytest

from sweeps.cli import main

CLASSIFIER = {"network": "digits-classifier", "weights": "assets/digits/classifier.safetensors"}
CNNIQA = {"arch": "cnniqa", "weights": "assets/digits/quality_cnniqa.safetensors"}
SEGMENTER = {"network": "digits-segmenter", "weights": "assets/digits/segmenter.safetensors"}

# One objective per term (the anchor beside a reward: at the base its gradient is 0, so alone it moves nothing).
OBJECTIVES = {
    "denoise": {"denoise": 1.0},
    "anchor+nr_iqa": {"anchor": 10.0, "nr_iqa": {"weight": 1.0, "metric": CNNIQA, "t_range": [0, 400]}},
    "nr_iqa_sampled": {"nr_iqa": {"weight": 1.0, "metric": CNNIQA, "x0": "sampled", "sampling_steps": 4}},
    "lpips_x0": {"lpips_x0": {"weight": 1.0, "metric": CLASSIFIER}},
    "self_perceptual": {"self_perceptual": 1.0},
    "pefl": {"pefl": {"weight": 1.0, "network": CLASSIFIER}},
    "pefl_segmentation": {"pefl_segmentation": {"weight": 1.0, "segmenter": SEGMENTER, "masks": "data"}},
    "decoupled_rewards": {"decoupled_rewards": {"weight": 1.0, "rewards": {"sharp": {"model": CNNIQA}}, "sampling_steps": 4}},
    "adversarial": {"adversarial": {"weight": 1.0, "discriminator": CNNIQA, "sampling_steps": 4, "start": 1, "stop_low": 2, "stop_high": 3}},
}
EVAL = ["eval.samples=40", "eval.sampling_steps=[10]", "eval.resamples=100", "train.batch_size=16", "train.learning_rate=1.0e-3"]


def run(tmp_path, name, objective, capsys):
    out = tmp_path / name
    args = ["train", "--preset", "digits-flow", "--local", "--set", "train.steps=2", "--set", f"train.output_dir={out}",
            "--set", f"objective={json.dumps(objective)}", *sum((["--set", item] for item in EVAL), [])]
    assert main(args) == 0, capsys.readouterr().err
    return json.loads((out / "checkpoints" / "step_000002" / "metrics.json").read_text())


@pytest.mark.integration
@pytest.mark.parametrize("case", list(OBJECTIVES))
def test_every_term_trains_the_flow_stand_in_and_changes_its_samples(case, tmp_path, capsys, base_figures):
    metrics = run(tmp_path, case, OBJECTIVES[case], capsys)
    losses = {k for k in metrics if k.startswith("loss/")}
    assert losses, metrics
    assert (metrics["fid@10"], metrics["heldout_quality@10"]) != (base_figures["fid@10"], base_figures["heldout_quality@10"])


@pytest.fixture(scope="module")
def base_figures():
    """The base model's figures on the same seed bank, as the training command's own evaluation takes them."""
    from eval.evaluate import Evaluator
    from sweeps.presets import load
    from trainers.models import load_base_model

    config, _ = load("digits-flow", EVAL)
    return Evaluator.from_config(config, "cpu").evaluate(load_base_model(config.model.base)).metrics
