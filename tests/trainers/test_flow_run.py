"""Every term trains 2 steps on the `digits-flow` stand-in through the command line a user types, and
changes what the model samples: the fine-tuned checkpoint's evaluation (the same seed bank as the
base's) differs from the base's (integration tier: ~3 min)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from sweeps.cli import main

CLASSIFIER = {"network": "digits-classifier", "weights": "assets/digits/classifier.safetensors"}
CNNIQA = {"arch": "cnniqa", "weights": "assets/digits/quality_cnniqa.safetensors"}
SEGMENTER = {"network": "digits-segmenter", "weights": "assets/digits/segmenter.safetensors"}

# One objective per term (the anchor beside a reward: at the base its gradient is 0, so alone it moves nothing).
OBJECTIVES = {
    "denoise": {"denoise": 1.0},
    "anchor+nr_iqa": {"anchor": 10.0, "nr_iqa": {"weight": 1.0, "metric": CNNIQA, "x0": {"t_range": [0, 400]}}},
    "nr_iqa_sampled": {"nr_iqa": {"weight": 1.0, "metric": CNNIQA, "x0": {"source": "sampled", "sampling_steps": 4}}},
    "lpips_x0": {"lpips_x0": {"weight": 1.0, "metric": CLASSIFIER}},
    "self_perceptual": {"self_perceptual": 1.0},
    "pefl": {"pefl": {"weight": 1.0, "network": CLASSIFIER}},
    "pefl_segmentation": {"pefl_segmentation": {"weight": 1.0, "segmenter": SEGMENTER, "masks": "data"}},
    "decoupled_rewards": {"decoupled_rewards": {"weight": 1.0, "rewards": {"sharp": {"model": CNNIQA}}, "x0": {"sampling_steps": 4}}},
    "adversarial": {"adversarial": {"weight": 1.0, "discriminator": CNNIQA,
                                    "x0": {"sampling_steps": 4, "start": 1, "stop_low": 2, "stop_high": 3}}},
}
EVAL = ["eval.samples=40", "eval.sampling_steps=[10]", "eval.resamples=100", "train.batch_size=16", "train.learning_rate=1.0e-3"]


def run(tmp_path, name, objective, capsys, extra=()):
    out = tmp_path / name
    args = ["train", "--preset", "digits-flow", "--local", "--set", "train.steps=2", "--set", f"train.output_dir={out}",
            "--set", f"objective={json.dumps(objective)}", *sum((["--set", item] for item in [*EVAL, *extra]), [])]
    assert main(args) == 0, capsys.readouterr().err
    return json.loads((out / "checkpoints" / "step_000002" / "metrics.json").read_text())


@pytest.mark.integration
@pytest.mark.parametrize("case", list(OBJECTIVES))
def test_every_term_trains_the_flow_stand_in_and_changes_its_samples(case, tmp_path, capsys, base_figures):
    metrics = run(tmp_path, case, OBJECTIVES[case], capsys)
    losses = {k for k in metrics if k.startswith("loss/")}
    assert losses, metrics
    assert (metrics["fid@10"], metrics["heldout_quality@10"]) != (base_figures["fid@10"], base_figures["heldout_quality@10"])
    if case == "lpips_x0":  # the head is part of the model: the checkpoint reloads with it around the transformer
        from trainers.denoiser.cascade import CascadedDenoiser
        from trainers.checkpoint import load_checkpoint_model

        model = load_checkpoint_model(tmp_path / case / "checkpoints" / "step_000002")
        assert isinstance(model.denoiser, CascadedDenoiser) and model.pipeline_kind == "sd3"


@pytest.mark.integration
def test_ema_and_gradient_checkpointing_on_the_flow_transformer(tmp_path, capsys, base_figures):
    """The EMA's weights are what evaluation samples (they lag the trained ones, so the figures differ from
    the plain run's) and gradient checkpointing recomputes the same gradients (the same figures)."""
    plain = run(tmp_path, "plain", OBJECTIVES["denoise"], capsys)
    checkpointed = run(tmp_path, "checkpointed", OBJECTIVES["denoise"], capsys, ["train.gradient_checkpointing=true"])
    ema = run(tmp_path, "ema", OBJECTIVES["denoise"], capsys, ["train.ema_decay=0.5"])
    assert checkpointed["fid@10"] == pytest.approx(plain["fid@10"], rel=1e-4)
    assert ema["fid@10"] != plain["fid@10"] and ema["fid@10"] != base_figures["fid@10"]


@pytest.fixture(scope="module")
def base_figures():
    """The base model's figures on the same seed bank, as the training command's own evaluation takes them."""
    from eval.evaluate import Evaluator
    from sweeps.presets import load
    from trainers.models import load_base_model

    config, _ = load("digits-flow", EVAL)
    return Evaluator.from_config(config, "cpu").evaluate(load_base_model(config.model.base)).metrics


LORA = ["model.finetune=lora", "model.lora_targets=[to_q, to_k, to_v, to_out.0, add_q_proj, add_k_proj, add_v_proj, to_add_out]"]


@pytest.mark.integration
def test_bf16_base_weights_train_fp32_adapters_and_evaluate(tmp_path, capsys):
    """`model.weights_dtype: bf16` (the flux preset's): the frozen transformer, VAE and text encoders load
    in bf16, the LoRA adapters train in fp32 under bf16 autocast, evaluation samples, and the checkpoint
    reloads with its base in bf16."""
    from trainers.checkpoint import load_checkpoint_model

    out = tmp_path / "bf16"
    args = ["train", "--preset", "digits-flow", "--local", "--set", "train.steps=2", "--set", f"train.output_dir={out}",
            "--set", "model.weights_dtype=bf16", "--set", "train.mixed_precision=bf16", *sum((["--set", item] for item in LORA + EVAL), [])]
    assert main(args) == 0, capsys.readouterr().err
    metrics = json.loads((out / "checkpoints" / "step_000002" / "metrics.json").read_text())
    adapters = load_file(out / "checkpoints" / "step_000002" / "model" / "adapter_model.safetensors")
    assert adapters and {t.dtype for t in adapters.values()} == {torch.float32}  # trained in fp32
    model = load_checkpoint_model(out / "checkpoints" / "step_000002")
    frozen = {p.dtype for name, p in model.denoiser.named_parameters() if "lora_" not in name}
    assert frozen == {torch.bfloat16} and model.vae.dtype == torch.bfloat16 and model.text_encoder.dtype == torch.bfloat16
    assert {p.dtype for name, p in model.denoiser.named_parameters() if "lora_" in name} == {torch.float32}  # reloaded as trained


def test_a_flow_density_on_a_ddpm_model_fails_in_one_line_before_training(tmp_path, capsys):
    assert main(["train", "--preset", "digits", "--local", "--set", "train.timestep_density=logit_normal",
                 "--set", f"train.output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("train.timestep_density: 'logit_normal' is for flow models; a DDPM-family model draws t uniformly"), err
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("overrides, message", [
    (["model.weights_dtype=bf16", "train.mixed_precision=bf16"], "model.weights_dtype: bf16 keeps the base weights frozen in bf16; full"),
    (["model.weights_dtype=bf16", "model.finetune=lora"], "model.weights_dtype: bf16 weights need train.mixed_precision: bf16"),
])
def test_bf16_weights_need_lora_and_bf16_autocast(overrides, message, capsys):
    assert main(["train", "--preset", "digits-flow", "--dry-run", *sum((["--set", item] for item in overrides), [])]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
