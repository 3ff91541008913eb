"""decoupled_rewards (UniFL, arXiv 2404.05595, Sec. 3.3 "decoupled feedback learning"): one reward model
per aspect (color, layout, lighting, detail, or whatever the user names), each with its own weight and
hinge target, instead of one blended aesthetic score; each is logged on its own:

    loss = sum_d weight_d * relu(alpha_d - r_d(x0, prompt))

    decoupled_rewards:
      weight: 1.0
      rewards:
        agreement: {model: imagereward, weight: 1.0, target: auto}
        detail:    {model: musiq, weight: 0.5, target: 60}
      target_reference: data     # or a folder of preferred images, each with name.txt beside it
      prompts: pool.txt          # text models: the pool `acpo prompts select` made

As UniFL runs it (its Eq. 5): the reward models are prompt-conditioned where the model is
(ImageReward, PickScore, HPSv2 or the digits-t2i stand-in `digits_prompt_agreement`; image-only pyiqa
models work too); `target: auto` sets alpha_d from data, the mean reward of a reference set (UniFL:
of preferred samples; by default here the real training images with their captions), computed once
and cached (`objectives.nr_iqa.mean_reward`); with `prompts`, each step generates one image per
prompt drawn at random from a pool selected offline (UniFL's active prompt selection:
`objectives/prompt_select.py`), the way UniFL says it follows ReFL: from pure noise to a stop step
drawn in the last quarter of the schedule (`x0: rollout`, the default; 20 DDIM steps, stop in
15..19), the one-step x0 there, with gradients through that forward; without `prompts` the rollout
is conditioned on the batch's captions (text models) or on nothing. `x0: sampled` (the
whole schedule, gradients through its last, nearly clean, steps: DRaFT-K) is the alternative; its
gradient at the last step is scaled by about sqrt(1 - alpha_bar) ~ 0.01 next to `denoise`.

Ours, named as ours: UniFL trains its own per-aspect reward models on its annotated data; we take
existing ones. `prompt_order: ranked` replaces the random draw with our online pool that prefers
unsaturated, diverse prompts (`objectives/prompt_pool.py`). `x0: one_step`, or a rollout from the
noised real image (`start`, as the digits study shares PeFL's), score the batch's own x0 against its
captions; neither takes `prompts`.

On a flow model (SD3, Flux) the rollout runs the flow Euler sampler (`euler`, its default there; `ddim` is refused); ours,
as UniFL's and ReFL's models are DDPM-family UNets.
"""

from __future__ import annotations

import torch

from eval.quality import check_quality_spec
from objectives.context import StepContext, X0Source
from objectives.nr_iqa import auto_target, check_target_reference, load_reward, quality_loss
from objectives.prompt_pool import PromptPool, read_prompts
from objectives.term import BuildEnv, Term, require_number
from trainers.common.errors import OptionError


class DecoupledRewards(Term):
    name = "decoupled_rewards"

    def __init__(self, rewards=None, x0: str | dict = "rollout", prompts=None, prompts_per_step: int = 4, prompt_order: str = "random", saturation: float = 0.0,
                 target_reference: str = "data"):
        if not isinstance(rewards, dict) or not rewards:
            raise OptionError("rewards", "expected a mapping of reward name -> {model, weight, target}")
        self.rewards = {}
        for name, spec in rewards.items():
            option = f"rewards.{name}"
            if not isinstance(spec, dict) or "model" not in spec or set(spec) - {"model", "weight", "target"}:
                raise OptionError(option, f"expected {{model, weight, target}}, got {spec!r}")
            check_quality_spec(spec["model"], f"{option}.model")
            target = spec.get("target")
            if target != "auto":
                target = require_number(f"{option}.target", target, minimum=float("-inf"), allow_none=True)
            self.rewards[name] = {"model": spec["model"], "weight": require_number(f"{option}.weight", spec.get("weight", 1.0)), "target": target}
        self.source = X0Source.from_options(x0, default_source="rollout")
        if prompt_order not in ("random", "ranked"):
            raise OptionError("prompt_order", f"expected 'random' (UniFL) or 'ranked' (ours), got {prompt_order!r}")
        self.prompt_order, self.prompts = prompt_order, None
        self.pool = None
        if prompts is not None:
            if self.source.kind == "one_step" or self.source.start is not None:
                raise OptionError("prompts", "images are generated from the prompts: that needs x0: rollout from noise (no start) "
                                  "or x0: sampled")
            try:
                self.prompts = read_prompts(prompts)
            except (FileNotFoundError, ValueError) as error:
                raise OptionError("prompts", str(error)) from None
            if prompt_order == "ranked":
                self.pool = PromptPool(self.prompts, saturation=require_number("saturation", saturation, minimum=float("-inf")))
        if isinstance(prompts_per_step, bool) or not isinstance(prompts_per_step, int) or prompts_per_step < 1:
            raise OptionError("prompts_per_step", f"expected an integer >= 1, got {prompts_per_step!r}")
        self.prompts_per_step = prompts_per_step
        self.target_reference = check_target_reference(target_reference)
        self.models = {}

    def setup(self, env: BuildEnv) -> None:
        self.source.check(env.process)
        if self.prompts is not None and not env.text_conditioned:
            raise OptionError("prompts", "the base model is not text-conditioned; prompts need one")
        self.models = {name: load_reward(r["model"], env, f"rewards.{name}.model") for name, r in self.rewards.items()}
        for name, reward in self.rewards.items():
            if reward["target"] == "auto":
                reward["target"] = auto_target(self.models[name], reward["model"], env, self.target_reference, f"rewards.{name}.target")

    def state_dict(self):
        return {"pool": self.pool.state_dict()} if self.pool else {}

    def load_state_dict(self, state):
        if self.pool:
            self.pool.load_state_dict(state["pool"])

    def targets(self) -> dict[str, float | None]:
        """Each reward's hinge target as used (`auto` resolved at setup)."""
        return {name: r["target"] for name, r in self.rewards.items()}

    def _draw_prompts(self, ctx: StepContext) -> tuple[str, ...]:
        if self.pool is not None:
            return tuple(self.pool.select(self.prompts_per_step, ctx.generator))
        picks = ctx.draw(self.prompts_per_step, low=0, high=len(self.prompts), integers=True).tolist()
        return tuple(self.prompts[i] for i in picks)

    def __call__(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        prompts = self._draw_prompts(ctx) if self.prompts is not None else None
        x0 = ctx.generated(self.source, prompts)
        images = (ctx.image(x0) + 1) / 2
        scored_with = list(prompts) if prompts is not None else ctx.prompts
        parts = {}
        for name, reward in self.rewards.items():
            model = self.models[name]
            parts[name] = reward["weight"] * quality_loss(model(images, scored_with), model.lower_better, reward["target"])
        if self.pool is not None:
            self.pool.update(list(prompts), sum(parts.values()))
        return parts
