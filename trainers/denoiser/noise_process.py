"""The noise process of a diffusion model: the one place that knows a DDPM-family model from a flow model.

A model's denoiser (a UNet, an SD3 / Flux transformer behind `FlowTransformer`, with or without Cas-DM's
cascade: `trainers/denoiser/cascade.py`) is called one way, `denoiser(x_t, t, **conditioning).sample`. What its
output means, how data is noised, how timesteps are drawn and how a sampler steps is this module's
`NoiseProcess`, built once from the model's scheduler config (`DiffusionModel.process`). The loss terms, the
training loop, evaluation, rollouts and the export ask it; none of them branches on the model's kind.

Kinds (`NoiseProcess.kind`, read once from the scheduler config: `is_flow_config`):
- `ddpm`: x_t = sqrt(a) x0 + sqrt(1 - a) eps, a = alphas_cumprod[t]; `t` an integer timestep in
  [0, T); the network predicts eps, v or x0 (`prediction`: the scheduler's `prediction_type`).
- `flow` (rectified flow, SD3 / Flux): x_t = (1 - s) x0 + s eps with s = t / T, the flow sigma; `t` is
  what the transformer is called with, sigma * 1000 as in diffusers' pipelines; the network predicts
  the velocity v = eps - x0 (`prediction`: `flow_prediction`, diffusers' name), so x0 = x_t - s v and
  eps = x_t + (1 - s) v.
Either way `t` is on [0, T] with larger noisier, and `noise_level(t)` is its sigma: sqrt((1 - a) / a)
for DDPM (the variance-exploding sigma of EDM), s for flow.

Samplers (`sampler(name)`): `ddim` (DDPM: deterministic DDIM), `euler` (flow: the Euler step of the
model's ODE, what DDIM is for a DDPM model; on a DDPM model diffusers' Euler, whose state is scaled by
sigma), `dpm_solver` (DPM-Solver++, on flow sigmas with the config's shift for a flow model). `ddim`
on a flow model is refused, naming `euler`. `stochastic_step` is the step of the policy-gradient
methods: the next state drawn from a Gaussian whose mean and standard deviation it returns (DDIM with
eta for DDPM, as DDPO's `ddim_step_with_logprob`; Flow-GRPO's SDE for flow); with no noise it is the
deterministic step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

from trainers.common.errors import ConfigError, OptionError

SAMPLERS = ("ddim", "dpm_solver", "euler")
# The samplers whose state is the sample itself (what a feedback term's rollout differentiates through):
# `euler` on a DDPM model keeps it scaled by its sigma.
ROLLOUT_SAMPLERS = {"ddpm": ("ddim", "dpm_solver"), "flow": ("euler", "dpm_solver")}
DETERMINISTIC_SAMPLER = {"ddpm": "ddim", "flow": "euler"}  # first order, no noise: what a term rolls out with by default
TIMESTEP_DENSITIES = ("auto", "uniform", "logit_normal", "mode")
FLOW_SIGMA_MIN = 1e-3  # from_x0 divides by s: at s = 0 (t = 0) any velocity gives the same x0


def is_flow_config(scheduler_config) -> bool:
    """A flow-matching model's scheduler config: one of diffusers' FlowMatch schedulers, by its class name
    when the config was read from a file, else by what only they have: a `shift` and no `prediction_type`
    (DPM-Solver's and UniPC's configs carry `use_dynamic_shifting` and `flow_shift` too, beside a
    `prediction_type`: an SD 1.5 that ships one of them is a DDPM-family model)."""
    name = scheduler_config.get("_class_name")
    if name:
        return str(name).startswith("FlowMatch")
    return "shift" in scheduler_config and "use_dynamic_shifting" in scheduler_config and "prediction_type" not in scheduler_config


def training_scheduler(scheduler_config):
    """The scheduler whose forward process noises the training data: DDPM's for the UNet families
    (whatever sampler the pipeline shipped with), the flow path for flow models."""
    return (FlowMatchEulerDiscreteScheduler if is_flow_config(scheduler_config) else DDPMScheduler).from_config(scheduler_config)


class FlowMatchEuler(FlowMatchEulerDiscreteScheduler):
    """diffusers' flow Euler sampler with the two members every other diffusers sampler has (a flow
    sampler starts from unit noise and takes its input unscaled), and, for a model that shifts by
    resolution (Flux: `use_dynamic_shifting`), FluxPipeline's step grid and shift (`dynamic_shift`)."""

    init_noise_sigma = 1.0
    mu = None  # the dynamic shift's exponent (`dynamic_shift`), set by NoiseProcess.sampler

    def scale_model_input(self, sample, timestep=None):
        return sample

    def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, mu=None, timesteps=None):
        if self.mu is not None and sigmas is None and timesteps is None:  # FluxPipeline's grid: linspace(1, 1/N, N), then shifted
            sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        return super().set_timesteps(num_inference_steps, device=device, sigmas=sigmas, mu=self.mu if mu is None else mu, timesteps=timesteps)


def dynamic_shift(scheduler_config, latent_size: int | None) -> float | None:
    """The exponent mu of the resolution-dependent shift (`use_dynamic_shifting`: Flux), from the number of
    2x2 latent patches as FluxPipeline computes it (1024 px when the size is not known); None without one."""
    if not scheduler_config.get("use_dynamic_shifting", False):
        return None
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    return calculate_shift(((latent_size or 128) // 2) ** 2, scheduler_config["base_image_seq_len"], scheduler_config["max_image_seq_len"],
                           scheduler_config["base_shift"], scheduler_config["max_shift"])


@dataclass(frozen=True)
class GaussianStep:
    """One stochastic sampler step: the next state, drawn from N(mean, std^2) (std broadcasts over it)."""

    sample: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor

    def log_prob(self, sample: torch.Tensor | None = None) -> torch.Tensor:
        """log N(sample | mean, std^2) per image `[N]`, averaged over the other dimensions, as DDPO and
        Flow-GRPO average it; `sample` defaults to the drawn one."""
        x = (self.sample if sample is None else sample).detach()
        std = self.std.expand_as(self.mean)
        value = -((x - self.mean) ** 2) / (2 * std ** 2) - torch.log(std) - math.log(math.sqrt(2 * math.pi))
        return value.mean(dim=tuple(range(1, value.dim())))


class NoiseProcess:
    """The forward process, the parameterisation and the samplers of one model (see the module docstring)."""

    def __init__(self, scheduler_config):
        self.kind = "flow" if is_flow_config(scheduler_config) else "ddpm"
        self.scheduler = training_scheduler(scheduler_config)
        self.config = self.scheduler.config
        self.num_train_timesteps = int(self.config.num_train_timesteps)
        # what the network outputs: eps, v or x0 (the scheduler's config), or the flow velocity
        self.prediction = "flow_prediction" if self.kind == "flow" else self.config.prediction_type
        if self.prediction not in ("flow_prediction", "epsilon", "v_prediction", "sample"):
            raise ValueError(f"unsupported prediction_type {self.prediction!r}")

    @property
    def flow(self) -> bool:
        return self.kind == "flow"

    # -- noise levels ------------------------------------------------------------------------------
    def _alphas(self, t, like):
        return self.scheduler.alphas_cumprod.to(like.device)[t.long()].view(-1, *([1] * (like.dim() - 1))).to(like.dtype)

    def flow_sigma(self, t, like) -> torch.Tensor:
        """A flow model's sigma s = t / T at timestep `t`, shaped to broadcast over `like`."""
        return (t.to(like.device).float() / self.num_train_timesteps).view(-1, *([1] * (like.dim() - 1))).to(like.dtype)

    def noise_level(self, t, like) -> torch.Tensor:
        """The sigma of timestep `t`, shaped to broadcast over `like`: s for a flow model, sqrt((1 - a) / a) for DDPM."""
        if self.flow:
            return self.flow_sigma(t, like)
        alphas = self._alphas(t, like)
        return ((1 - alphas) / alphas).sqrt()

    def min_snr_weight(self, t, gamma: float) -> torch.Tensor:
        """Min-SNR-gamma's loss weight `[N]` for a DDPM-family model (Hang et al. 2023): min(SNR, gamma)
        over what the loss of its prediction type weighs by SNR (SNR for eps, SNR + 1 for v, 1 for x0)."""
        alphas = self.scheduler.alphas_cumprod.to(t.device)[t]
        snr = alphas / (1 - alphas)
        return torch.clamp(snr, max=gamma) / {"epsilon": snr, "v_prediction": snr + 1, "sample": torch.ones_like(snr)}[self.prediction]

    # -- the forward process and the conversions ------------------------------------------------------
    def add_noise(self, x0, noise, t) -> torch.Tensor:
        """x_t at timesteps `t` `[N]`."""
        if self.flow:
            s = self.flow_sigma(t, x0)
            return (1 - s) * x0 + s * noise
        return self.scheduler.add_noise(x0, noise, t)

    def target(self, x0, noise, t) -> torch.Tensor:
        """What the network's output is regressed onto at (x0, noise, t): eps, v, x0, or the flow velocity."""
        if self.prediction == "flow_prediction":
            return noise - x0
        if self.prediction == "epsilon":
            return noise
        if self.prediction == "v_prediction":
            alphas = self._alphas(t, x0)
            return alphas.sqrt() * noise - (1 - alphas).sqrt() * x0
        return x0

    def x0(self, prediction, x_t, t) -> torch.Tensor:
        """The one-step estimate of x0 from a network output (Tweedie for DDPM; x_t - s v for a flow)."""
        if self.prediction == "flow_prediction":
            return x_t - self.flow_sigma(t, prediction) * prediction
        alphas = self._alphas(t, prediction)
        if self.prediction == "epsilon":
            return (x_t - (1 - alphas).sqrt() * prediction) / alphas.sqrt()
        if self.prediction == "v_prediction":
            return alphas.sqrt() * x_t - (1 - alphas).sqrt() * prediction
        return prediction

    def eps(self, prediction, x_t, t) -> torch.Tensor:
        """The noise a network output implies at (x_t, t)."""
        if self.prediction == "flow_prediction":
            return x_t + (1 - self.flow_sigma(t, prediction)) * prediction
        alphas = self._alphas(t, prediction)
        if self.prediction == "epsilon":
            return prediction
        if self.prediction == "v_prediction":  # v = sqrt(a) eps - sqrt(1-a) x0
            return alphas.sqrt() * prediction + (1 - alphas).sqrt() * x_t
        return (x_t - alphas.sqrt() * prediction) / (1 - alphas).sqrt()

    def velocity(self, prediction, x_t, t) -> torch.Tensor:
        """The flow velocity eps - x0 a network output implies (for a flow model, its output)."""
        if self.prediction == "flow_prediction":
            return prediction
        return self.eps(prediction, x_t, t) - self.x0(prediction, x_t, t)

    def from_x0(self, x0, x_t, t) -> torch.Tensor:
        """The network output that implies clean image `x0` at (x_t, t)."""
        if self.prediction == "flow_prediction":  # v = eps - x0 with eps = (x_t - (1 - s) x0) / s
            return (x_t - x0) / self.flow_sigma(t, x0).clamp(min=FLOW_SIGMA_MIN)
        alphas = self._alphas(t, x0)
        eps = (x_t - alphas.sqrt() * x0) / (1 - alphas).sqrt()
        if self.prediction == "epsilon":
            return eps
        if self.prediction == "v_prediction":
            return alphas.sqrt() * eps - (1 - alphas).sqrt() * x0
        return x0

    # -- training timesteps ----------------------------------------------------------------------------
    def check_density(self, density: str) -> None:
        if density not in TIMESTEP_DENSITIES:
            raise OptionError("timestep_density", f"expected one of {', '.join(TIMESTEP_DENSITIES)}, got {density!r}")
        if density not in ("auto", "uniform") and not self.flow:
            raise OptionError("timestep_density", f"{density!r} is for flow models; a DDPM-family model draws t uniformly")

    def draw_timesteps(self, n: int, generator: torch.Generator, density: str = "auto") -> torch.Tensor:
        """The denoise step's timesteps `[n]`, as each kind trains: DDPM uniform over the integer
        timesteps; a flow model as diffusers' SD3 and Flux training scripts draw them (`auto`:
        logit-normal(0, 1); `mode` with scale 1.29; `uniform`): u from that density indexes the
        scheduler's training sigmas (shifted by its `shift`, unless it shifts by resolution as Flux does)."""
        self.check_density(density)
        if not self.flow:
            return torch.randint(0, self.num_train_timesteps, (n,), generator=generator)
        from diffusers.training_utils import compute_density_for_timestep_sampling

        u = compute_density_for_timestep_sampling("logit_normal" if density == "auto" else density, n, logit_mean=0.0, logit_std=1.0,
                                                  mode_scale=1.29, generator=generator)
        table = training_scheduler(self.config).timesteps  # descending sigma * T, as the scripts index it
        return table[(u * len(table)).long().clamp(max=len(table) - 1)]

    # -- samplers ----------------------------------------------------------------------------------------
    def sampler_problem(self, name: str, rollout: bool = False) -> str | None:
        """Why `name` cannot sample this model (a rollout's sampler must also keep its state the sample), or None."""
        if name == "ddim" and self.flow:
            return ("ddim is a DDPM-family sampler; this flow model samples with euler (its ODE's Euler step, what DDIM "
                    "is for a DDPM model) or dpm_solver")
        known = ROLLOUT_SAMPLERS[self.kind] if rollout else SAMPLERS
        if name not in known:
            return f"expected one of {', '.join(known)} for this {self.kind} model, got {name!r}"
        return None

    def check_sampler(self, name: str, field: str = "sampler") -> None:
        """`name` samples this model; else a one-line ConfigError naming `field` and what to use."""
        problem = self.sampler_problem(name)
        if problem:
            raise ConfigError(f"{field}: {problem}")

    def sampler(self, name: str | None = None, latent_size: int | None = None):
        """A fresh diffusers sampler of this model; `name` None is the deterministic first-order one
        (`ddim`, or `euler` on a flow model). For a flow model, `euler` is the flow Euler sampler and
        `dpm_solver` is DPM-Solver++ on flow sigmas with the config's shift; `latent_size` (the side of
        x0) sets the dynamic shift of models that shift by resolution (Flux)."""
        name = name or DETERMINISTIC_SAMPLER[self.kind]
        self.check_sampler(name)
        if self.flow:
            mu = dynamic_shift(self.config, latent_size)
            if name == "dpm_solver":  # its flow shift is the static one, or exp(mu) as its set_timesteps(mu=...) would make it
                return DPMSolverMultistepScheduler(num_train_timesteps=self.num_train_timesteps, use_flow_sigmas=True,
                                                   prediction_type="flow_prediction",
                                                   flow_shift=math.exp(mu) if mu is not None else self.config.get("shift", 1.0))
            scheduler = FlowMatchEuler.from_config(self.config)
            scheduler.mu = mu
            return scheduler
        return {"ddim": DDIMScheduler, "dpm_solver": DPMSolverMultistepScheduler, "euler": EulerDiscreteScheduler}[name].from_config(self.config)

    @staticmethod
    def step(sampler, output, t, x) -> torch.Tensor:
        """The sampler's deterministic step from `x` at `t` given the network's `output` (fp32)."""
        return sampler.step(output.float(), t, x).prev_sample

    def stochastic_step(self, sampler, output, t, x, noise_level: float, generator: torch.Generator | None = None,
                        noise: torch.Tensor | None = None) -> GaussianStep:
        """The step from `x` at `t` as a Gaussian: DDIM with eta = `noise_level` for DDPM (DDPO's
        `ddim_step_with_logprob`: std = eta * sqrt(beta~_t), the mean DDIM's with that variance), or the
        reverse SDE of Flow-GRPO's `sde_step_with_logprob` (std = noise_level * sqrt(s / (1 - s)) * sqrt(-dt))
        for a flow model, on the `sampler` of this process (`sampler("ddim")` / `sampler("euler")`) after
        its `set_timesteps`. `noise` (else drawn from `generator`) is the standard normal the sample adds."""
        output, x = output.float(), x.float()
        if self.flow:
            if not isinstance(sampler, FlowMatchEulerDiscreteScheduler):
                raise ValueError("a flow model's stochastic step runs on its euler sampler")
            index = sampler.index_for_timestep(t)
            sigma, sigma_next = (sampler.sigmas[index].to(x.device), sampler.sigmas[index + 1].to(x.device))
            dt = sigma_next - sigma
            sigma_max = sampler.sigmas[1].item()
            std_t = torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_max, sigma))) * noise_level
            mean = x * (1 + std_t ** 2 / (2 * sigma) * dt) + output * (1 + std_t ** 2 * (1 - sigma) / (2 * sigma)) * dt
            std = std_t * torch.sqrt(-dt)
        else:
            if not isinstance(sampler, DDIMScheduler):
                raise ValueError("a DDPM-family model's stochastic step runs on its ddim sampler")
            previous = t - sampler.config.num_train_timesteps // sampler.num_inference_steps
            alpha = sampler.alphas_cumprod[t]
            alpha_previous = sampler.alphas_cumprod[previous] if previous >= 0 else sampler.final_alpha_cumprod
            timesteps = torch.as_tensor(t).expand(len(x))
            x0, eps = self.x0(output, x, timesteps), self.eps(output, x, timesteps)  # eps unclipped, as DDIM's step takes it
            if sampler.config.clip_sample:
                x0 = x0.clamp(-sampler.config.clip_sample_range, sampler.config.clip_sample_range)
            variance = (1 - alpha_previous) / (1 - alpha) * (1 - alpha / alpha_previous)
            std = (noise_level * variance.sqrt()).to(x.device)
            mean = alpha_previous.sqrt() * x0 + (1 - alpha_previous - std ** 2).sqrt() * eps
        if noise is None:
            noise = torch.randn(x.shape, generator=generator).to(x.device)
        std = std.reshape([1] * x.dim())  # one level for the batch: every image is at the same t
        return GaussianStep(mean + std * noise, mean, std)
