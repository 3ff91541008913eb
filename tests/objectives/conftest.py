"""Fixtures of the objectives' tests."""

import pytest


@pytest.fixture(scope="module")
def specs(digits_assets):
    """The committed digits models as the specs a term names (quality models, feature networks, the segmenter)."""
    cnniqa = {"arch": "cnniqa", "weights": str(digits_assets / "quality_cnniqa.safetensors")}
    heldout = {"arch": "digits_heldout_iqa", "weights": str(digits_assets / "heldout_iqa.safetensors")}
    network = {"network": "digits-classifier", "weights": str(digits_assets / "classifier.safetensors")}
    segmenter = {"network": "digits-segmenter", "weights": str(digits_assets / "segmenter.safetensors")}
    return {"cnniqa": cnniqa, "heldout": heldout, "network": network, "segmenter": segmenter}
