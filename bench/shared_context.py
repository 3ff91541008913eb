"""What the shared StepContext saves: one training step of a seven-term objective with the terms
sharing one context (the trainer's way) against each term computing its pieces in a context of its
own (what seven independent loss functions would do). Same model, batch, noise and t; side by side,
in one run. Prints UNet forward calls and seconds per step for both, and their ratios.

    .venv/bin/python bench/shared_context.py [--batch 64] [--repeats 5]

Offline, on the digits assets (run `make install` first). The base and trainable models are the
1.1M-parameter digits DDPM.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from objectives.context import StepContext  # noqa: E402
from objectives.registry import Objective, Weight, build_objective  # noqa: E402
from trainers.image_sets import DigitsDataset, images_only  # noqa: E402
from trainers.models import load_base_model  # noqa: E402

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "digits"


def count_calls(denoiser: torch.nn.Module) -> torch.nn.Module:
    """Counts forward calls in `denoiser.calls` (a hook, so the network keeps its own attributes)."""
    denoiser.calls = 0

    def hook(module, _inputs):
        module.calls += 1

    denoiser.register_forward_pre_hook(hook)
    return denoiser


def objective_spec() -> dict:
    cnniqa = {"arch": "cnniqa", "weights": str(ASSETS / "quality_cnniqa.safetensors")}
    heldout = {"arch": "digits_heldout_iqa", "weights": str(ASSETS / "heldout_iqa.safetensors")}
    network = {"network": "digits-classifier", "weights": str(ASSETS / "classifier.safetensors")}
    LOW = {"source": "one_step", "t_range": [0, 400]}  # noqa: N806 - one x0 source shared by three terms
    return {
        "denoise": 1.0,
        "anchor": 10.0,
        "nr_iqa": {"weight": 0.3, "metric": cnniqa, "x0": LOW},
        "pefl": {"weight": 0.1, "network": network, "x0": LOW},
        "lpips_x0": {"weight": 0.1, "metric": network},
        "self_perceptual": 0.1,
        "decoupled_rewards": {"weight": 0.1, "rewards": {"sharp": {"model": cnniqa}, "clean": {"model": heldout}}, "x0": LOW},
    }


def step(objective: Objective, contexts) -> float:
    """Forward and backward of the whole objective; `contexts(name)` gives the context a term sees."""
    start = time.perf_counter()
    total = 0.0
    for name, (weight, term) in objective.terms.items():
        total = total + weight.at(1) * Objective({name: (Weight([(0, 1.0)]), term)})(contexts(name))[0]
    total.backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    base_model = load_base_model(ASSETS / "base")
    model = count_calls(copy.deepcopy(base_model.denoiser).requires_grad_(True).train())
    base = count_calls(base_model.denoiser.requires_grad_(False).eval())
    objective = build_objective(objective_spec())
    x0 = images_only(DigitsDataset("train"))[: args.batch]

    def fresh_context(seed):
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, 1000, (len(x0),), generator=generator)
        return StepContext(model=model, process=base_model.process, x0=x0, noise=noise, t=t, base=base,
                           generator=torch.Generator().manual_seed(seed))

    results = {}
    for mode in ("shared", "per-term", "shared", "per-term"):  # interleaved, the first round is warm-up
        seconds, calls = [], []
        for r in range(args.repeats):
            model.zero_grad(set_to_none=True)
            model.calls = base.calls = 0
            shared = fresh_context(r)
            contexts = (lambda name: shared) if mode == "shared" else (lambda name: fresh_context(r))
            seconds.append(step(objective, contexts))
            calls.append((model.calls, base.calls))
        results[mode] = (sorted(seconds)[len(seconds) // 2], calls[-1])

    (t_shared, (m_shared, b_shared)), (t_own, (m_own, b_own)) = results["shared"], results["per-term"]
    print(f"objective: {', '.join(objective.terms)}; batch {args.batch}; median of {args.repeats} steps")
    print(f"{'':10s} {'trainable UNet calls':>21s} {'base UNet calls':>16s} {'s/step':>8s}")
    print(f"{'shared':10s} {m_shared:21d} {b_shared:16d} {t_shared:8.3f}")
    print(f"{'per-term':10s} {m_own:21d} {b_own:16d} {t_own:8.3f}")
    print(f"ratio per-term/shared: trainable calls {m_own / m_shared:.1f}x, time {t_own / t_shared:.2f}x")


if __name__ == "__main__":
    main()
