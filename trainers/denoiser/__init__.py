"""The model's denoiser, below evaluation and the objectives: the network call (`flow_transformer`: SD3 and
Flux behind a UNet's call; `cascade`: Cas-DM's head), and the noise process of the model's kind
(`noise_process`). Imports nothing of the project here (tests/test_layers.py)."""
