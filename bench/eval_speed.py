"""How fast evaluation is: our FID (`eval.fidelity.fidelity_metrics`: torch-fidelity's extractor and
formulas, our content-keyed reference cache) against `torch_fidelity.calculate_metrics` on the same
images, both with a warm reference cache and both cold; and sampling and feature extraction in
images per second. Side by side in one run, medians of the repeats.

    .venv/bin/python bench/eval_speed.py                 # digits: 500 samples vs the 297 held-out images
    .venv/bin/python bench/eval_speed.py --tiny          # the test suite's size

Target: ours / torch-fidelity <= 1.05 with a warm cache. The two FIDs must agree (printed).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import describe, median, pick_device, sync  # noqa: E402


def timed(fn, device):
    sync(device)
    started = time.perf_counter()
    value = fn()
    sync(device)
    return time.perf_counter() - started, value


@torch.no_grad()  # sampling and features only
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="digits")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--samples", type=int, default=0, help="images to sample (default: eval.samples)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    import torch_fidelity

    from eval.evaluate import Evaluator
    from eval.fidelity import _Uint8Images, extract_features, fidelity_metrics, prepare_feature_extractor
    from eval.sampling import sample_images
    from sweeps.presets import load
    from trainers.models import load_base_model

    config, _ = load(args.preset, args.set)
    if args.tiny:
        args.samples, args.repeats = 32, 2
    samples = args.samples or config.eval.samples
    settings = config.eval
    base = load_base_model(config.model.base, device)
    evaluator = Evaluator.from_config(config, device)
    steps = settings.sampling_steps[0]

    def sample():
        return sample_images(base, samples, steps=steps, sampler=settings.sampler, seed=0, device=device, prompts=list(evaluator.prompts),
                             guidance_scale=settings.guidance_scale)

    sample_s, images = timed(sample, device)
    reference, extractor, weights = evaluator.reference, settings.feature_extractor, settings.feature_extractor_weights or None
    extract_s = median([timed(lambda: extract_features(images, extractor, weights, device), device)[0] for _ in range(args.repeats)])

    with tempfile.TemporaryDirectory(prefix="eval-speed-") as work:
        def ours(cache):
            return fidelity_metrics(images, reference, extractor, weights, kid=False, device=device, cache_dir=cache)["fid"]

        def theirs(cache_name):
            return torch_fidelity.calculate_metrics(
                input1=_Uint8Images(images), input2=_Uint8Images(reference), fid=True, feature_extractor=prepare_feature_extractor(extractor),
                feature_extractor_weights_path=weights, cuda=device.type == "cuda", cache=cache_name is not None,
                input2_cache_name=cache_name, cache_root=str(Path(work) / "torch-fidelity"), save_cpu_ram=True, verbose=False,
            )["frechet_inception_distance"]

        figures = {"ours, cold": [], "torch-fidelity, cold": [], "ours, warm": [], "torch-fidelity, warm": []}
        fids = {}
        for r in range(args.repeats):
            for name, run in (("ours, cold", lambda: ours(Path(work) / f"cold-{r}")), ("torch-fidelity, cold", lambda: theirs(None)),
                              ("ours, warm", lambda: ours(Path(work) / "warm")), ("torch-fidelity, warm", lambda: theirs("warm"))):
                seconds, fids[name] = timed(run, device)
                if r or "cold" in name:  # the first warm call fills the cache
                    figures[name].append(seconds)
    figures = {name: median(values) for name, values in figures.items()}

    print(f"device: {describe(device)}; preset {args.preset}: {samples} samples at {steps} {settings.sampler} steps, "
          f"{len(reference)} reference images, extractor {extractor}; median of {args.repeats}")
    print(f"  sampling              {samples / sample_s:10.1f} images/s")
    print(f"  feature extraction    {samples / extract_s:10.1f} images/s")
    for name, seconds in figures.items():
        print(f"  FID, {name:22s} {seconds * 1000:9.1f} ms   FID {fids[name]:.4f}")
    agree = max(fids.values()) - min(fids.values())
    print(f"the FIDs agree to {agree:.2e}; cold: x{figures['ours, cold'] / figures['torch-fidelity, cold']:.3f}")
    print(f"eval_speed: ratio {figures['ours, warm'] / figures['torch-fidelity, warm']:.3f} (ours / torch-fidelity, warm cache, "
          "target <= 1.05)")
    return 0 if agree < 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
