"""The GPU check: what a first hour on a GPU should establish, in one command and one JSON.

    bench/gpu_check.sh --wheels DIR              # on a machine with one GPU: installs from DIR first
    .venv/bin/python bench/gpu_check.py --device cpu --size tiny --out check.json   # here, the tests

Three parts, each a subprocess with its own exit code, seconds and figures, so one failing part
leaves the others measured:
1. `cuda_tests`: the unit tests that need CUDA (named `cuda`; skipped on a CPU, said so);
2. `sd_shape`: bench/sd_shape.py (SD 1.5 at 512 px, batch 8, bf16; compile off and on) - its table
   and ratio as printed;
3. `rehearsal`: `acpo train --preset sd15 --local` in rehearsal (random weights, trainers/rehearsal.py),
   2 steps of LoRA + anchor + MUSIQ on a sampled x0, one small evaluation with every metric, its
   checkpoint; the step's seconds and peak memory from the checkpoint's metrics.

`--size tiny` runs the same parts on the narrow SD-shaped architecture at 64 px (the CPU test);
`--size sd15` is the real one (the default on CUDA). The figures are cost figures: random weights.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The rehearsal's settings: the sd15 preset at its resolution, cut to 2 steps and a token evaluation.
REHEARSAL = ["model.rehearsal=true", "train.steps=2", "train.batch_size=1", "train.gradient_accumulation=1",
             "objective.nr_iqa.x0.sampling_steps=2", "eval.samples=3", "eval.sampling_steps=[2]", "eval.resamples=100", "data.workers=0"]
SIZES = {"sd15": [], "tiny": ["model.base=tiny", "data.resolution=64"]}


def run(name: str, command: list[str], timeout: float, env: dict) -> dict:
    """One part: its command, exit code, seconds and the tails of its output."""
    started = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        rc, stdout, stderr = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as expired:
        text = lambda out: out.decode() if isinstance(out, bytes) else out or ""
        rc, stdout, stderr = 124, text(expired.stdout), text(expired.stderr) + f"\n[gpu_check] {name}: over {timeout:.0f} s"
    print(f"[gpu_check] {name}: exit {rc} in {time.perf_counter() - started:.1f} s", flush=True)
    return {"command": " ".join(command), "exit": rc, "seconds": round(time.perf_counter() - started, 1),
            "stdout_tail": stdout[-3000:], "stderr_tail": stderr[-3000:] if rc else stderr[-500:]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--size", choices=sorted(SIZES), default="")
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    parser.add_argument("--skip", default="", help="comma-separated parts to leave out: cuda_tests, sd_shape, rehearsal")
    parser.add_argument("--timeout", type=float, default=150.0, help="seconds each part may take (the whole check: under 8 min)")
    args = parser.parse_args(argv)
    size = args.size or ("sd15" if args.device == "cuda" else "tiny")
    skip = set(filter(None, args.skip.split(",")))
    python = sys.executable
    report = {"device": args.device, "size": size, "python": platform.python_version(), "parts": {}}
    try:
        import torch

        report["torch"] = torch.__version__
        report["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        report["torch"] = None
    if args.device == "cuda" and not report.get("gpu"):
        print("[gpu_check] --device cuda: torch sees no CUDA device", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        env = {**os.environ, "ACPO_REHEARSAL_CACHE": os.environ.get("ACPO_REHEARSAL_CACHE", f"{scratch}/rehearsal"),
               "ACPO_LATENT_CACHE": f"{scratch}/latents", "ACPO_FIDELITY_CACHE": f"{scratch}/fidelity", "PYTHONUNBUFFERED": "1"}
        parts = report["parts"]
        if "cuda_tests" not in skip:
            parts["cuda_tests"] = part = run("cuda_tests", [python, "-m", "pytest", "-q", "-rs", "-m", "not integration", "-k", "cuda",
                                                            "-p", "no:cacheprovider", "tests"], args.timeout, env)
            counts = re.findall(r"(\d+) (passed|failed|skipped|deselected|error)", part["stdout_tail"])
            part["counts"] = {word: int(number) for number, word in counts}
        if "sd_shape" not in skip:
            parts["sd_shape"] = part = run("sd_shape", [python, "bench/sd_shape.py", "--size", size, "--device", args.device,
                                                        "--steps", "3", "--warmup", "1", "--batch", "8" if size == "sd15" else "2",
                                                        "--compile", "both" if args.device == "cuda" else "off"], args.timeout, env)
            ratio = re.search(r"^sd_shape: ratio (\d+\.\d+)", part["stdout_tail"], re.MULTILINE)
            part["ratio"] = float(ratio.group(1)) if ratio else None
            part["table"] = [line for line in part["stdout_tail"].splitlines() if line.startswith("  ")]
        if "rehearsal" not in skip:
            out_dir = Path(scratch) / "rehearsal-run"
            parts["rehearsal"] = part = run("rehearsal", [python, "-m", "sweeps.cli", "train", "--preset", "sd15", "--local",
                                                          *[f"--set={item}" for item in [*REHEARSAL, *SIZES[size],
                                                                                          f"train.use_gpu={str(args.device == 'cuda').lower()}",
                                                                                          f"train.output_dir={out_dir}"]]],
                                            args.timeout * 2, env)
            metrics = sorted(out_dir.glob("checkpoints/*/metrics.json"))
            if metrics:
                figures = json.loads(metrics[-1].read_text())
                part["figures"] = {key: value for key, value in figures.items() if key.startswith(("time/", "memory/", "loss"))}
                part["seconds_per_step"] = round(figures["time/train_s"] / figures["step"], 2)

    report["ok"] = all(part["exit"] == 0 for part in report["parts"].values())
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"[gpu_check] {'all parts passed' if report['ok'] else 'a part failed'}; figures (random weights: cost, not quality): {args.out}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
