"""The champion as an MLflow pyfunc model (models from code, no pickle): saved from a diffusers
folder, loaded by MLflow's own loader, it samples exactly what the evaluation's sampler samples."""

import pandas as pd
import pytest
import torch

from eval.sampling import sample_images
from sweeps.champion_model import save_champion_model
from trainers.models import load_base_model

SETTINGS = {"sampler": "ddim", "guidance_scale": 1.0, "prompts": [], "steps": 4}


@pytest.fixture(scope="module")
def saved(tmp_path_factory, digits_assets):
    return save_champion_model(digits_assets / "base", tmp_path_factory.mktemp("pyfunc") / "model", SETTINGS)


def test_the_model_is_code_and_safetensors_not_a_pickle(saved):
    files = {p.relative_to(saved).as_posix() for p in saved.rglob("*") if p.is_file()}
    assert "MLmodel" in files and "mlflow_model.py" in files
    assert "artifacts/base/unet/diffusion_pytorch_model.safetensors" in files
    assert not [f for f in files if f.endswith((".pkl", ".pickle"))]


def test_pyfunc_predict_samples_what_the_evaluation_samples(saved, digits_assets):
    import mlflow.pyfunc

    model = mlflow.pyfunc.load_model(str(saved))
    assert [c.name for c in model.metadata.get_input_schema().inputs] == ["num_images", "steps", "seed"]
    images = model.predict(pd.DataFrame({"num_images": [3, 2], "steps": [4, 4], "seed": [7, 8]}))
    assert images.shape == (5, 16, 16, 1) and images.dtype.name == "uint8"
    base = load_base_model(digits_assets / "base")
    expected = sample_images(base, 3, steps=4, seed=7)
    assert torch.equal(torch.from_numpy(images[:3]).permute(0, 3, 1, 2), (expected * 255).round().to(torch.uint8))
    other_seed = torch.from_numpy(images[3:]).permute(0, 3, 1, 2)
    assert not torch.equal(other_seed, (expected[:2] * 255).round().to(torch.uint8))


def test_a_request_beyond_the_limits_is_refused_in_one_line(saved):
    import mlflow.pyfunc

    model = mlflow.pyfunc.load_model(str(saved))
    with pytest.raises(Exception, match="num_images must be 1..256"):
        model.predict(pd.DataFrame({"num_images": [0], "steps": [4], "seed": [0]}))
