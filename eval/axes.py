"""The Pareto front's two axes: the sweep's two targets, a fidelity figure to lower and the held-out
quality to raise; what the front, the selection and MLflow's charts are made of. Not "objectives": the
objective is the training loss. A module of its own so that selection reads it without importing
evaluation's libraries (diffusers, torch-fidelity).

The fidelity axis is a choice (`sweep.fidelity`): FID (biased: its level falls with the sample count,
and at a few hundred samples the bias favours a less diverse model) or KID (unbiased, but wider
intervals for the same samples: docs/sweep.md, "FID or KID"). Every evaluation reports both.
"""

QUALITY_AXIS = "heldout_quality"
FIDELITY_AXES = ("fid", "kid")  # lower is better, both


def front_axes(fidelity: str = "fid") -> dict[str, str]:
    """The front's axes and their directions, for the fidelity axis `fidelity`."""
    if fidelity not in FIDELITY_AXES:
        raise ValueError(f"the fidelity axis is one of {', '.join(FIDELITY_AXES)}, not {fidelity!r}")
    return {fidelity: "min", QUALITY_AXIS: "max"}


FRONT_AXES = front_axes("fid")  # the default front
