"""Each bench script runs at its tiny size and prints its ratio: the scripts keep working as the code
moves. The figures themselves are not asserted (timings are the scripts' business, on a quiet
machine); that a ratio was measured and printed, and what each script checks of itself, is."""

import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_bench(capsys, script: str, *args: str) -> str:
    """The script's `main(args)`, in this process (no subprocess in the unit tier); its printout."""
    path = ROOT / "bench" / script
    spec = importlib.util.spec_from_file_location(f"bench_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    capsys.readouterr()
    assert module.main(list(args)) == 0
    return capsys.readouterr().out


def ratio(output: str, name: str) -> float:
    match = re.search(rf"^{name}: ratio (\d+\.\d+)", output, re.MULTILINE)
    assert match, f"no '{name}: ratio' line in:\n{output}"
    return float(match.group(1))


def test_step_overhead(capsys, digits_assets):
    output = run_bench(capsys, "step_overhead.py", "--tiny")
    assert ratio(output, "step_overhead") > 0
    assert re.search(r"one loss\.item\(\) per step costs x\d", output)


def test_anchor_lora_adds_no_parameter_memory_with_lora(capsys, digits_assets):
    output = run_bench(capsys, "anchor_lora.py", "--tiny")
    assert ratio(output, "anchor_lora") > 0
    assert "extra parameter memory 0 bytes" in output  # the base is the same weights with adapters off
    full = re.search(r"full fine-tuning: (\d+\.\d+) MiB", output)
    assert full and float(full.group(1)) > 1  # while full fine-tuning holds a frozen copy


def test_feedback_cost_counts_the_forwards_each_source_makes(capsys, digits_assets):
    output = run_bench(capsys, "feedback_cost.py", "--tiny")
    assert ratio(output, "feedback_cost") > 0
    rows = {m.group(1): (int(m.group(2)), int(m.group(3))) for m in re.finditer(r"^  (\S+(?: K=\d)?)\s+(\d+)\s+(\d+)\s", output, re.MULTILINE)}
    assert rows["one_step"] == (1, 1)
    assert rows["sampled K=1"] == (4, 1) and rows["sampled K=2"] == (4, 2)  # 4 sampling steps, gradient through the last K
    assert 1 <= rows["rollout K=2"][0] <= 4 and rows["rollout K=2"][1] == 2


def test_eval_speed_agrees_with_torch_fidelity(capsys, digits_assets):
    output = run_bench(capsys, "eval_speed.py", "--tiny")
    assert ratio(output, "eval_speed") > 0
    agree = re.search(r"the FIDs agree to (\S+);", output)
    assert agree and float(agree.group(1)) < 1e-3


@pytest.mark.integration  # the GPU check at tiny size on the CPU: sd_shape's eight variants, a rehearsal of sd15, the CUDA tests
def test_gpu_check_tiny_on_the_cpu_writes_its_json(tmp_path, digits_assets):
    import json
    import subprocess

    out = tmp_path / "check.json"
    # the session's $ACPO_REHEARSAL_CACHE (tests/conftest.py) passes through: quality stand-ins built once per session
    done = subprocess.run([str(ROOT / "bench" / "gpu_check.sh"), "--device", "cpu", "--size", "tiny", "--out", str(out)],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    assert report["ok"] and report["size"] == "tiny" and set(report["parts"]) == {"cuda_tests", "sd_shape", "rehearsal"}
    shape = report["parts"]["sd_shape"]
    assert shape["ratio"] > 0 and sum(re.match(r"^  (bare loop|ours, )", line) is not None for line in shape["table"]) == 7
    rehearsal = report["parts"]["rehearsal"]
    assert rehearsal["seconds_per_step"] > 0 and rehearsal["figures"]["memory/rss_peak_gib"] > 0
    assert "REHEARSAL: every model in this run has RANDOM weights" in rehearsal["stdout_tail"]
    assert report["parts"]["cuda_tests"]["counts"].get("skipped", 0) >= 1  # no GPU here: skipped, and said so


@pytest.mark.integration  # a real sweep: Ray, MLflow, two tiny trials
def test_sweep_overhead_tiny(capsys, digits_assets):
    import ray

    try:
        output = run_bench(capsys, "sweep_overhead.py", "--tiny")
    finally:
        ray.shutdown()  # the sweep started a local Ray in this process; the next test starts its own
    assert ratio(output, "sweep_overhead") > 1  # the platform costs something: the trials' own clocks add up to less
    assert re.search(r"trials' own time:\s+\d+\.\d s", output)
