"""nr_iqa (ACPO): a learned no-reference IQA model scores the predicted clean image; the loss
improves the score. Hinge form `relu(target - score)` as in ImageReward's ReFL and UniFL; `target: auto`
is the metric's mean on the training images (or a folder of preferred ones: `target_reference`).

The model is any pyiqa metric name (`musiq`, `topiq_nr`, ...) or `{arch, weights}` for a pyiqa
architecture with local weights (the digits preset's CNNIQA). The sign follows the metric's
`lower_better`; images go in as [0, 1] and are clamped, because pyiqa does not check the range in
loss mode. The clean image is the one-step estimate at t in `t_range`, or a sampled image with
truncated backprop (`x0: sampled`, `sampling_steps`, `feedback_steps`), decoded through the VAE
inside the graph for latent models.

Said plainly: ACPO's body was not available to us, only its abstract (a learned NR-IQA model as the
reward, an anchor to the frozen base). Ours, therefore: the hinge form and its `auto` target, the
one-step x0 at t < 400 in the presets (where Tweedie is sharp), the gradient through the IQA model
with clamped inputs, and where the anchor acts (`objectives/anchor.py`, `at`).

On a flow model (SD3, Flux) t is 1000 times the flow sigma, so a `t_range` keeps its meaning (less noise
below), and the one-step x0 is x_t - s v (`objectives/context.py`); ours, as ACPO's models are UNets.
"""

from __future__ import annotations

import json

import torch

from eval.quality import QualityModel, check_quality_spec
from objectives.context import StepContext, X0Source
from objectives.term import BuildEnv, Term, require_number
from trainers.common import storage
from trainers.common.errors import OptionError
from trainers.common.keys import ContentKey


def load_reward(spec, env: BuildEnv, option: str):
    """A quality or reward model a term trains against (frozen, eval mode), checked against the base
    model: a prompt-conditioned reward needs a text model, and a step-function metric (no gradient)
    cannot be trained against."""
    from eval.quality import load_quality_model

    model = load_quality_model(spec, env.device)
    if model.prompt_conditioned and not env.text_conditioned:
        raise OptionError(option, f"{model.name} scores images against prompts; the base model takes none")
    if not getattr(model.net, "trainable", True):
        raise OptionError(option, f"{model.name} has no gradient (an evaluation metric): nothing could train against it")
    return model


def check_target_reference(value) -> str:
    """`data` (the training images with their captions) or a folder of preferred images."""
    from pathlib import Path

    if value != "data" and not (isinstance(value, str) and Path(value).is_dir()):
        raise OptionError("target_reference", f"expected 'data' or a folder of preferred images, got {value!r}")
    return value


def auto_target(model, spec, env: BuildEnv, reference: str, option: str) -> float:
    """`target: auto`: the model's mean reward on the reference set (UniFL sets its hinge targets from
    data), with each image's caption for a prompt-conditioned model; cached (`mean_reward`)."""

    try:
        if reference == "data":
            images, prompts = env.reference()
        else:
            from trainers.image_sets import captioned_folder

            images, prompts = captioned_folder(reference, env.resolution, env.image_channels)
    except (FileNotFoundError, ValueError) as error:
        raise OptionError("target_reference", str(error)) from None
    if model.prompt_conditioned and prompts is None:
        raise OptionError(option, "auto needs captions for a prompt-conditioned model; the reference set has none")
    return mean_reward(model, images, prompts if model.prompt_conditioned else None, spec, env.cache_dir, device=env.device)


def quality_loss(score: torch.Tensor, lower_better: bool, target: float | None) -> torch.Tensor:
    """Per-sample loss from scores `[N]`: lower is better for the loss whatever the metric's direction.
    `target` is in the metric's own units: no loss once a sample is at least that good."""
    if target is None:
        return score if lower_better else -score
    return torch.relu(score - target) if lower_better else torch.relu(target - score)


class NrIqa(Term):
    name = "nr_iqa"

    def __init__(self, metric="musiq", target: float | str | None = None, x0: str | dict = "one_step", target_reference: str = "data"):
        check_quality_spec(metric, "metric")
        self.metric_spec = metric
        self.target = target if target == "auto" else require_number("target", target, minimum=float("-inf"), allow_none=True)
        self.target_reference = check_target_reference(target_reference)
        self.source = X0Source.from_options(x0)
        self.quality = None

    def setup(self, env: BuildEnv) -> None:
        self.source.check(env.process)
        self.quality = load_reward(self.metric_spec, env, "metric")
        if self.target == "auto":
            self.target = auto_target(self.quality, self.metric_spec, env, self.target_reference, "target")

    def __call__(self, ctx: StepContext) -> torch.Tensor:
        images = (ctx.image(ctx.generated(self.source)) + 1) / 2
        return quality_loss(self.quality(images, ctx.prompts), self.quality.lower_better, self.target)


def mean_reward(model: QualityModel, images01: torch.Tensor, prompts: list[str] | None, spec, cache_dir=None,
                batch_size: int = 250, device="cpu") -> float:
    """The mean score of `model` over a reference set (real training images, or preferred samples),
    with their prompts for a prompt-conditioned model: what `target: auto` sets a hinge target to
    (UniFL's alpha_d, the mean reward of preferred samples). Computed once per (images, prompts,
    model spec, weights file bytes) and cached as JSON under the fidelity cache folder."""
    from eval.fidelity import DEFAULT_CACHE_DIR, to_uint8

    key = ContentKey().pixels(to_uint8(images01)).json(prompts).json(spec)
    if isinstance(spec, dict):
        key.file(spec["weights"])
    location = storage.join(cache_dir or DEFAULT_CACHE_DIR, "reward-targets", f"{key.hex()}.json")
    if storage.is_file(location):
        return float(json.loads(storage.read_text(location))["mean"])
    scores = []
    with torch.no_grad():
        for start in range(0, len(images01), batch_size):
            batch = images01[start:start + batch_size].to(device)
            scores.append(model(batch, None if prompts is None else prompts[start:start + batch_size]).float().cpu())
    mean = torch.cat(scores).mean().item()
    storage.write_text(location, json.dumps({"mean": mean, "model": model.name, "images": len(images01)}) + "\n")
    return mean
