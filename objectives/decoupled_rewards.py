"""decoupled_rewards (UniFL, arXiv 2404.05595, "decoupled aesthetic feedback"): several named reward models
(color, layout, lighting, detail, or whatever the user names), each with its own weight and hinge
target, instead of one blended aesthetic score; each is logged on its own.

    decoupled_rewards:
      weight: 1.0
      rewards:
        detail: {model: musiq, weight: 1.0, target: 60}
        color:  {model: {arch: cnniqa, weights: color.safetensors}, weight: 0.5}
      x0: sampled            # or one_step with t_range, as for nr_iqa
      prompts: prompts.txt   # text models only: active prompt selection from this pool

With `prompts`, each step generates one image per selected prompt (`prompts_per_step`), chosen by
`PromptPool` (diverse, not yet saturated), and the pool learns each prompt's reward.
"""

from __future__ import annotations

import torch

from eval.quality import check_quality_spec
from objectives.context import StepContext, X0Source
from objectives.nr_iqa import quality_loss
from objectives.prompt_pool import PromptPool, read_prompts
from objectives.term import BuildEnv, OptionError, Term, require_number


class DecoupledRewards(Term):
    name = "decoupled_rewards"

    def __init__(self, rewards=None, x0: str = "one_step", t_range=None, sampling_steps: int = 20, feedback_steps: int = 1,
                 sampler: str = "ddim", stop_low: int | None = None, stop_high: int | None = None, start: int | None = None,
                 prompts=None, prompts_per_step: int = 4, saturation: float = 0.0):
        if not isinstance(rewards, dict) or not rewards:
            raise OptionError("rewards", "expected a mapping of reward name -> {model, weight, target}")
        self.rewards = {}
        for name, spec in rewards.items():
            option = f"rewards.{name}"
            if not isinstance(spec, dict) or "model" not in spec or set(spec) - {"model", "weight", "target"}:
                raise OptionError(option, f"expected {{model, weight, target}}, got {spec!r}")
            check_quality_spec(spec["model"], f"{option}.model")
            self.rewards[name] = {
                "model": spec["model"],
                "weight": require_number(f"{option}.weight", spec.get("weight", 1.0)),
                "target": require_number(f"{option}.target", spec.get("target"), minimum=float("-inf"), allow_none=True),
            }
        self.source = X0Source.from_options(x0, t_range, sampling_steps, feedback_steps, sampler, stop_low, stop_high, start)
        self.pool = None
        if prompts is not None:
            if self.source.kind != "sampled":
                raise OptionError("prompts", "prompt selection generates images from prompts: it needs x0: sampled")
            try:
                self.pool = PromptPool(read_prompts(prompts), saturation=require_number("saturation", saturation, minimum=float("-inf")))
            except (FileNotFoundError, ValueError) as error:
                raise OptionError("prompts", str(error)) from None
        if isinstance(prompts_per_step, bool) or not isinstance(prompts_per_step, int) or prompts_per_step < 1:
            raise OptionError("prompts_per_step", f"expected an integer >= 1, got {prompts_per_step!r}")
        self.prompts_per_step = prompts_per_step
        self.models = {}

    def setup(self, env: BuildEnv) -> None:
        from eval.quality import load_quality_model

        self.source.check(env.num_train_timesteps)
        if self.pool is not None and not env.text_conditioned:
            raise OptionError("prompts", "the base model is not text-conditioned; prompts need one")
        self.models = {name: load_quality_model(r["model"], env.device) for name, r in self.rewards.items()}

    def state_dict(self):
        return {"pool": self.pool.state_dict()} if self.pool else {}

    def load_state_dict(self, state):
        if self.pool:
            self.pool.load_state_dict(state["pool"])

    def __call__(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        prompts = None
        if self.pool is not None:
            prompts = tuple(self.pool.select(self.prompts_per_step, ctx.generator))
            x0 = ctx.sampled(self.source.sampling_steps, self.source.feedback_steps, self.source.sampler, prompts=prompts)
        else:
            x0 = ctx.generated(self.source)
        images = (ctx.image(x0) + 1) / 2
        parts = {}
        for name, reward in self.rewards.items():
            model = self.models[name]
            parts[name] = reward["weight"] * quality_loss(model(images), model.lower_better, reward["target"])
        if prompts is not None:
            self.pool.update(list(prompts), sum(parts.values()))
        return parts
