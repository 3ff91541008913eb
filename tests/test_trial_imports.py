"""What importing a piece of the project costs: each case imports it in a fresh interpreter (a short
python subprocess, cwd the repo root) and lists the heavy libraries that came with it. The trial
function's module imports no quality models, no diffusers and no MLflow (a trial reports through
its spool; the driver tracks); the run config's schema check is pure (`Config.check_references` is
the one that imports pyiqa, at the edge); the error types import neither Ray nor MLflow nor torch.

On failure each case names the libraries and, for each, the project's lines that imported it."""

import json
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

# The child: a finder that records, for each forbidden library's first import, the project's frames
# on the stack (which of our lines pulled it in); then the case's code; then what it found, as JSON.
CHILD = r"""
import json, os, sys, traceback

FORBIDDEN = set(json.loads(sys.argv[1]))
ROOT = os.getcwd()
OURS = {"sweeps", "trainers", "objectives", "eval", "assets"}
WHO = {}

class Recorder:
    def find_spec(self, fullname, path=None, target=None):
        top = fullname.partition(".")[0]
        if top in FORBIDDEN and top not in WHO:
            frames = [(os.path.relpath(f.filename, ROOT), f.lineno) for f in traceback.extract_stack()]
            WHO[top] = [f"{name}:{line}" for name, line in frames if name.split(os.sep)[0] in OURS]
        return None

sys.meta_path.insert(0, Recorder())
CASE = json.loads(sys.argv[2])
DATA = json.loads(sys.argv[3])
exec(CASE)
loaded = sorted({name.partition(".")[0] for name in sys.modules} & FORBIDDEN)
print("RESULT " + json.dumps({"loaded": loaded, "by": {name: WHO.get(name, []) for name in loaded}}))
"""


def imported_by(code: str, forbidden: tuple[str, ...], data=None) -> dict:
    """Run `code` in a fresh interpreter; the forbidden libraries it left in sys.modules, and who imported them."""
    result = subprocess.run([sys.executable, "-c", CHILD, json.dumps(forbidden), json.dumps(code), json.dumps(data)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, f"{code!r} failed in a fresh interpreter:\n{result.stderr[-3000:]}"
    line = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def offenders(found: dict) -> str:
    return "\n".join(f"{name}, imported by: {' <- '.join(reversed(found['by'][name])) or '(no project frame)'}"
                     for name in found["loaded"])


def test_the_trial_module_imports_no_quality_models_diffusers_or_mlflow():
    found = imported_by("import sweeps.trial\nassert callable(sweeps.trial.run_trial)", ("pyiqa", "diffusers", "mlflow"))
    assert not found["loaded"], "import sweeps.trial loaded:\n" + offenders(found)


def test_the_config_schema_check_imports_no_model_library():
    preset = yaml.safe_load((ROOT / "sweeps" / "presets" / "digits.yaml").read_text())  # the digits run config
    preset.pop("sweep", None)
    code = "from trainers.config import Config\nConfig.from_dict(DATA)\nConfig.from_dict({})"
    found = imported_by(code, ("pyiqa", "diffusers", "transformers", "torch"), preset)
    assert not found["loaded"], "Config.from_dict loaded:\n" + offenders(found)


def test_the_error_types_import_neither_ray_nor_mlflow_nor_torch():
    found = imported_by("import trainers.common.errors", ("ray", "mlflow", "torch"))
    assert not found["loaded"], "import trainers.common.errors loaded:\n" + offenders(found)
