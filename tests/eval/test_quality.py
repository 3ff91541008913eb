import pytest
import torch

from eval.quality import load_quality_model


def test_unknown_metric_and_bad_specs(tmp_path):
    with pytest.raises(ValueError, match="unknown quality metric 'musiqq'"):
        load_quality_model("musiqq")
    with pytest.raises(FileNotFoundError, match="weights not found"):
        load_quality_model({"arch": "cnniqa", "weights": str(tmp_path / "none.safetensors")})
    with pytest.raises(ValueError, match="spec must be"):
        load_quality_model({"weights": "x"})


def test_pth_weights_are_read_without_unpickling_code(tmp_path, digits_assets):
    """A pyiqa-style .pth ({'params': state_dict}) loads through weights_only=True; a pickled object does not."""
    from safetensors.torch import load_file

    state = load_file(digits_assets / "quality_cnniqa.safetensors")
    torch.save({"params": state}, tmp_path / "cnniqa.pth")
    a = load_quality_model({"arch": "cnniqa", "weights": str(tmp_path / "cnniqa.pth")})
    b = load_quality_model({"arch": "cnniqa", "weights": str(digits_assets / "quality_cnniqa.safetensors")})
    x = torch.rand(4, 1, 16, 16)
    assert torch.equal(a(x), b(x))

    class Payload:
        def __reduce__(self):
            return (print, ("unpickled!",))

    torch.save({"params": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(Exception, match="(?i)weights.only|unsupported|global"):
        load_quality_model({"arch": "cnniqa", "weights": str(tmp_path / "evil.pth")})


def test_scores_are_differentiable_and_clamped(digits_assets):
    model = load_quality_model({"arch": "cnniqa", "weights": str(digits_assets / "quality_cnniqa.safetensors")})
    x = torch.rand(3, 1, 16, 16, requires_grad=True)
    model(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in model.parameters())  # frozen: the loss moves images, not the judge
    # out-of-range inputs are clamped, not passed through: 2.0 scores like 1.0
    assert torch.allclose(model(torch.full((1, 1, 16, 16), 2.0)), model(torch.ones(1, 1, 16, 16)))
