"""The exported champion as an MLflow model: this file is the model's code (MLflow's "models from
code", so nothing is pickled), the diffusers pipeline folder its one artifact.

    model = mlflow.pyfunc.load_model("models:/digits-acpo@champion")
    images = model.predict(pandas.DataFrame({"num_images": [8], "steps": [25], "seed": [0]}))  # uint8 [8, H, W, C]
    mlflow models serve -m models:/digits-acpo@champion --env-manager local    # POST /invocations

One input row per request: `num_images`, `steps` (sampler steps), `seed`, and for text models
`prompt` (every image of the row gets it; none: the prompts the sweep evaluated with, cycled). The
rows' images are concatenated. Sampling is the evaluation's own (`eval.sampling.sample_images`:
its sampler, its guidance scale, its seeding, so `seed` s gives the images the evaluation saw), and
a Cas-DM model samples with its cascaded head. Settings come from the model's config
(`sampler`, `guidance_scale`, `prompts`), written when the champion is registered.

The pipeline is the model's one artifact, `artifacts/champion/`: `DiffusionPipeline.from_pretrained` on it
loads it without MLflow (without the Cas-DM head), `trainers.models.load_base_model` with it.
"""

from __future__ import annotations

import mlflow
from mlflow.pyfunc import PythonModel

MAX_IMAGES = 256  # per row: a request for more is refused, not queued for minutes


class ChampionSampler(PythonModel):
    def load_context(self, context):
        import torch

        from trainers.models import load_base_model

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = load_base_model(context.artifacts["pipeline"], device=self.device)
        self.settings = {"sampler": None, "guidance_scale": 1.0, "prompts": [], **(context.model_config or {})}

    def predict(self, context, model_input, params=None):
        import numpy as np
        import torch

        from eval.sampling import sample_images

        model, out = self.model, []
        for row in model_input.to_dict("records"):
            count, steps, seed = int(row["num_images"]), int(row["steps"]), int(row["seed"])
            if not 1 <= count <= MAX_IMAGES or steps < 1:
                raise ValueError(f"num_images must be 1..{MAX_IMAGES} and steps >= 1; got num_images={count}, steps={steps}")
            prompt = row.get("prompt")
            prompts = [prompt] if isinstance(prompt, str) and prompt else self.settings["prompts"]
            if model.text_conditioned and not prompts:
                raise ValueError("prompt: this is a text-to-image model and no prompt was given")
            images = sample_images(model, count, steps=steps, sampler=self.settings["sampler"], seed=seed, device=self.device,
                                   prompts=prompts, guidance_scale=float(self.settings["guidance_scale"]))
            out.append((images.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy())
        return np.concatenate(out)


mlflow.models.set_model(ChampionSampler())
