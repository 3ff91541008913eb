"""The Pareto front's two axes: the sweep's two targets (fidelity down, held-out quality up), what
the front, the selection and MLflow's charts are made of. Not "objectives": the objective is the
training loss. A module of its own so that selection reads it without importing evaluation's
libraries (diffusers, torch-fidelity)."""

FRONT_AXES = {"fid": "min", "heldout_quality": "max"}
