import pytest
import torch

from trainers.models import DiffusionModel, build_digits_scheduler, build_digits_unet, count_parameters, load_base_model, save_base_model


def test_digits_unet_size_and_shape():
    unet = build_digits_unet()
    assert 1.0e6 < count_parameters(unet) < 1.2e6
    out = unet(torch.zeros(2, 1, 16, 16), torch.tensor([0, 999])).sample
    assert out.shape == (2, 1, 16, 16)


def test_save_load_roundtrip_is_exact_and_safetensors_only(tmp_path):
    torch.manual_seed(0)
    model = DiffusionModel(build_digits_unet(block_out_channels=(8, 16, 16), norm_num_groups=4), build_digits_scheduler())
    path = save_base_model(model, tmp_path / "pipe")
    files = {p.name for p in path.rglob("*") if p.is_file()}
    assert "diffusion_pytorch_model.safetensors" in files
    assert not any(name.endswith((".bin", ".pkl", ".pt")) for name in files)
    loaded = load_base_model(path)
    x, t = torch.randn(3, 1, 16, 16), torch.tensor([1, 500, 999])
    saved, restored = model.denoiser.state_dict(), loaded.denoiser.state_dict()
    assert saved.keys() == restored.keys() and all(torch.equal(saved[k], restored[k]) for k in saved)
    model.denoiser.eval()  # same mode, same kernels
    with torch.no_grad():
        torch.testing.assert_close(model.denoiser(x, t).sample, loaded.denoiser(x, t).sample, rtol=0, atol=1e-6)
    assert loaded.scheduler.config.beta_schedule == "squaredcos_cap_v2"
    assert (loaded.channels, loaded.resolution) == (1, 16)


def test_missing_or_wrong_base_model_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_base_model(tmp_path / "nope")
    (tmp_path / "not_a_pipeline").mkdir()
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        load_base_model(tmp_path / "not_a_pipeline")


def test_hub_id_offline_is_a_one_line_error():
    with pytest.raises(FileNotFoundError, match="could not load base model 'google/ddpm-cifar10-32'"):
        load_base_model("google/ddpm-cifar10-32")
