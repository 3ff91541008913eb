"""The champion as an MLflow model: the exported diffusers folder packaged as a pyfunc model
(`trainers/mlflow_model.py` as its code, no pickle), which the sweep's tracking logs under its parent
run and registers (sweeps/tracking.py `register_champion`).
"""

from __future__ import annotations

from pathlib import Path

import sweeps.mlflow_settings  # noqa: F401 - before mlflow is imported


def save_champion_model(exported: Path, out: Path, settings: dict) -> Path:
    """`exported` (a diffusers folder, `cascade/` for Cas-DM) as an MLflow pyfunc model folder at `out`:
    the code of `trainers/mlflow_model.py` (no pickle), the packages it imports as code, a signature
    and an input example, `settings` (sampler, guidance_scale, prompts, steps) as its model config."""
    from importlib.metadata import version

    import mlflow.pyfunc
    import numpy as np
    import pandas as pd
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    import trainers

    root = Path(trainers.__file__).resolve().parent.parent
    text = bool(settings["prompts"])
    columns = [ColSpec("long", "num_images"), ColSpec("long", "steps"), ColSpec("long", "seed")]
    example = {"num_images": [2], "steps": [int(settings["steps"])], "seed": [0]}
    if text:
        columns.append(ColSpec("string", "prompt", required=False))
        example["prompt"] = [settings["prompts"][0]]
    signature = ModelSignature(inputs=Schema(columns), outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, -1))]))
    requirements = [f"{name}=={version(name).split('+')[0]}" for name in
                    ("torch", "diffusers", "transformers", "safetensors", "numpy", "pandas", "pillow", "pydantic", "pyyaml")]
    mlflow.pyfunc.save_model(path=str(out), python_model=str(root / "trainers" / "mlflow_model.py"), artifacts={"pipeline": str(exported)},
                             code_paths=[str(root / package) for package in ("trainers", "eval", "objectives")],
                             signature=signature, input_example=pd.DataFrame(example), pip_requirements=requirements,
                             model_config={k: settings[k] for k in ("sampler", "guidance_scale", "prompts")})
    return out
