"""What a feedback term's clean image costs per step: UNet forwards (with and without gradient) and
seconds per step of `one_step`, `rollout` and `sampled` with K feedback steps, against the cost
model reward backprop papers give (DRaFT-K, AlignProp: the sampling steps without gradient plus
~3 forward-equivalents per step with gradient, forward and backward). Side by side in one run.

    .venv/bin/python bench/feedback_cost.py                          # digits, CPU
    .venv/bin/python bench/feedback_cost.py --sampling-steps 20 --k 1 2 4
    .venv/bin/python bench/feedback_cost.py --tiny                   # the test suite's size

The term is the digits preset's `nr_iqa` (CNNIQA on x0) alone, so every UNet call is the feedback's.
measured/model near 1 means the sampler's and the reward model's own work are small next to the UNet's.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ObjectiveStep, describe, median, pick_device, sync  # noqa: E402


def forward_seconds(step: ObjectiveStep, repeats: int) -> float:
    """One UNet forward without gradient on the step's batch, at a mid-range t."""
    t = torch.full((len(step.x0),), 500, device=step.device)
    times = []
    for _ in range(repeats + 1):
        sync(step.device)
        started = time.perf_counter()
        with torch.no_grad(), step.autocast:
            step.model(step.x0, t, **step.conditioning)
        sync(step.device)
        times.append(time.perf_counter() - started)
    return median(times[1:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="digits")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--sampling-steps", type=int, default=20)
    parser.add_argument("--k", type=int, nargs="+", default=[1, 2, 4], help="feedback steps (gradient through the last K)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    from sweeps.presets import load

    if args.tiny:
        args.set, args.sampling_steps, args.k, args.repeats = [*args.set, "train.batch_size=4"], 4, [1, 2], 2
    config, _ = load(args.preset, args.set)
    metric = config.objective.get("nr_iqa", {}).get("metric") or config.eval.trained_quality
    sources = {"one_step": {"x0": {"source": "one_step", "t_range": [0, 400]}}}
    for k in args.k:
        sources[f"rollout K={k}"] = {"x0": {"source": "rollout", "sampling_steps": args.sampling_steps, "feedback_steps": k}}
        sources[f"sampled K={k}"] = {"x0": {"source": "sampled", "sampling_steps": args.sampling_steps, "feedback_steps": k}}

    rows = []
    for name, source in sources.items():
        config, _ = load(args.preset, [*args.set, f"objective={{nr_iqa: {{weight: 1.0, metric: {metric}, "
                                                  + ", ".join(f"{k}: {v}" for k, v in source.items()) + "}}"])
        step = ObjectiveStep(config, device)
        calls = {"grad": 0, "no_grad": 0}
        step.model.register_forward_pre_hook(lambda *_: calls.__setitem__("grad" if torch.is_grad_enabled() else "no_grad",
                                                                            calls["grad" if torch.is_grad_enabled() else "no_grad"] + 1))
        forward = forward_seconds(step, args.repeats)
        step.run()  # warm-up
        seconds, counts = [], []
        for _ in range(args.repeats):
            calls.update(grad=0, no_grad=0)
            seconds.append(step.run())
            counts.append(dict(calls))
        grad = median([c["grad"] for c in counts])
        no_grad = median([c["no_grad"] for c in counts])
        model = (no_grad + 3 * grad) * forward
        rows.append((name, no_grad, grad, median(seconds), model))

    print(f"device: {describe(device)}; preset {args.preset}, batch {config.train.batch_size}, {args.sampling_steps} sampling steps, "
          f"median of {args.repeats}")
    print(f"  {'x0 source':14s} {'forwards':>9s} {'with grad':>10s} {'s/step':>9s} {'model s':>9s} {'measured/model':>15s}")
    for name, no_grad, grad, measured, model in rows:
        print(f"  {name:14s} {no_grad + grad:9d} {grad:10d} {measured:9.4f} {model:9.4f} {measured / model:15.2f}")
    one = rows[0][3]
    print("  (model: forwards without gradient + 3 x forwards with gradient, each a measured no-grad forward)")
    worst = max(rows, key=lambda row: row[3] / row[4])
    print(f"feedback_cost: ratio {worst[3] / worst[4]:.2f} (measured / cost model, worst: {worst[0]}); "
          f"{rows[-1][0]} costs x{rows[-1][3] / one:.1f} a one_step step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
