"""The per-worker loop without Ray: exact resume, data-parallel ranks in a gloo group, LoRA on the
SD-shaped latent model, EMA, NaN stop, bf16 autocast on the CPU, and the CUDA bf16 path where a GPU exists."""

import math
import os

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from sweeps.presets import load
from tests.servers import free_port
from tests.tiny_models import build_tiny_sd
from trainers.checkpoint import load_checkpoint_model
from trainers.common.errors import ConfigError
from trainers.data import ShardedBatchSampler, batch_loader
from trainers.loop import train
from trainers.models import DiffusionModel, build_digits_scheduler, build_digits_unet, save_base_model

QUICK_EVAL = ["eval.samples=8", "eval.sampling_steps=[1]"]


def small_config(tmp_path, *overrides):
    return load("digits", [*QUICK_EVAL, "train.batch_size=8", f"train.output_dir={tmp_path}", *overrides])[0]


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_resume_is_exact(tmp_path, digits_assets):
    """Resumed at step 2, across the adversarial term's stage boundary (it starts at step 3), with the
    batches read by DataLoader worker processes."""
    objective = ("objective={denoise: 1.0, anchor: 2.0, nr_iqa: {weight: 0.3, metric: {arch: cnniqa, weights: "
                 f"{digits_assets}/quality_cnniqa.safetensors}}, x0: {{t_range: [0, 400]}}}}, adversarial: {{weight: 0.1, from_step: 3, discriminator: "
                 f"{{arch: cnniqa, weights: {digits_assets}/quality_cnniqa.safetensors}}, x0: one_step}}}}")
    common = ["train.steps=4", "train.eval_every=2", "train.ema_decay=0.9", objective, "data.workers=2"]
    straight = train(small_config(tmp_path / "a", *common), report=lambda *_: None)
    resumed = train(small_config(tmp_path / "b", *common), report=lambda *_: None,
                    resume_from=tmp_path / "a" / "checkpoints" / "step_000002")
    a, b = weights(straight["model"]), weights(resumed["model"])
    assert all(torch.equal(a[k], b[k]) for k in a)
    ema_a = load_file(tmp_path / "a/checkpoints/step_000004/ema.safetensors")
    ema_b = load_file(tmp_path / "b/checkpoints/step_000004/ema.safetensors")
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    disc_a = torch.load(tmp_path / "a/checkpoints/step_000004/objective.pt", weights_only=True)["adversarial"]["discriminator"]
    disc_b = torch.load(tmp_path / "b/checkpoints/step_000004/objective.pt", weights_only=True)["adversarial"]["discriminator"]
    assert all(torch.equal(disc_a[k], disc_b[k]) for k in disc_a)
    # before its stage the term is off: the discriminator has not moved at step 2, and has by step 4
    initial = {f"net.metric.net.{k}": v for k, v in load_file(digits_assets / "quality_cnniqa.safetensors").items()}
    disc_2 = torch.load(tmp_path / "a/checkpoints/step_000002/objective.pt", weights_only=True)["adversarial"]["discriminator"]
    assert initial.keys() <= disc_2.keys() and all(torch.equal(disc_2[k], initial[k]) for k in initial)
    assert not all(torch.equal(disc_a[k], initial[k]) for k in initial)
    # a resumed run with a different step count would not be the same run: 3 steps differ from 4
    three = train(small_config(tmp_path / "c", "train.steps=3", *common[1:]), report=lambda *_: None)
    assert not all(torch.equal(a[k], v) for k, v in weights(three["model"]).items())


def test_checkpoints_are_complete_and_load_for_sampling(tmp_path, digits_assets):
    reports = []
    train(small_config(tmp_path, "train.steps=2", "train.eval_every=1", "train.ema_decay=0.5"), report=lambda m, c=None: reports.append((m, c)))
    assert [m["step"] for m, _ in reports] == [1, 2]
    assert all({"fid", "heldout_quality", "loss", "loss/denoise"} <= set(m) for m, _ in reports)
    assert all(c is not None for _, c in reports)
    assert not list((tmp_path / "checkpoints").glob(".*"))  # no temporary folders left behind
    model = load_checkpoint_model(reports[-1][1])
    assert model.denoiser(torch.zeros(1, 1, 16, 16), torch.tensor([10])).sample.shape == (1, 1, 16, 16)
    assert not list(tmp_path.rglob("*.bin")) and not list(tmp_path.rglob("*.pkl"))


def test_sharded_batches_partition_each_epoch_and_repeat_by_index():
    ranks = [ShardedBatchSampler(40, 5, seed=3, rank=r, world_size=2) for r in (0, 1)]
    seen = [j for r in (0, 1) for i in range(4) for j in ranks[r].indices(i)]
    assert sorted(seen) == list(range(40))  # one epoch: every image once, over both ranks
    assert ShardedBatchSampler(40, 5, seed=3, rank=1, world_size=2).indices(6) == ranks[1].indices(6)
    assert ranks[0].indices(4) != ranks[0].indices(0)  # the next epoch is reshuffled


def test_loader_with_workers_reads_the_batches_in_sampler_order_from_the_resumed_index():
    data = torch.arange(40).float().view(40, 1)
    sampler = ShardedBatchSampler(40, 5, seed=3, rank=1, world_size=2)
    loaded = [images.flatten().long().tolist() for images, _ in batch_loader(data, 5, 3, 1, 2, start=3, stop=9, workers=2)]
    assert loaded == [sampler.indices(i) for i in range(3, 9)]  # workers race; the loader keeps the order


def _rank_main(rank, world_size, port, base, out, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    config, _ = load("digits", [*QUICK_EVAL, "train.batch_size=16", "train.steps=30", "train.eval_every=10", "train.learning_rate=2e-3",
                                "objective={denoise: 1.0}", f"model.base={base}", f"train.output_dir={out}"])
    losses = []
    result = train(config, report=lambda m, c=None: losses.append(m["loss"]), rank=rank, world_size=world_size)
    save_file({k: v.contiguous() for k, v in result["model"].state_dict().items()}, f"{result_dir}/rank{rank}.safetensors")
    torch.save(torch.tensor(losses), f"{result_dir}/losses{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.integration  # two processes in a gloo group
def test_two_workers_keep_identical_weights_and_the_loss_goes_down(tmp_path):
    torch.manual_seed(0)  # an untrained model, so denoising has something to learn
    base = save_base_model(DiffusionModel(build_digits_unet(block_out_channels=(16, 32, 32)), build_digits_scheduler()), tmp_path / "base")
    port = free_port()
    mp.spawn(_rank_main, args=(2, port, str(base), str(tmp_path / "run"), str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    initial = load_file(base / "unet" / "diffusion_pytorch_model.safetensors")
    assert not all(torch.equal(initial[k], rank0[k]) for k in rank0)
    losses = torch.load(tmp_path / "losses0.pt", weights_only=True)
    assert losses[-1] < 0.7 * losses[0], losses.tolist()


def test_non_finite_loss_names_the_step_and_term(tmp_path, digits_assets):
    config = small_config(tmp_path, "train.steps=30", "train.learning_rate=1e30", "train.grad_clip=0")
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step \d+ \(term: .*denoise"):
        train(config, report=lambda *_: None)


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    return save_base_model(build_tiny_sd(), tmp_path_factory.mktemp("sd") / "tiny_sd")


def test_latent_text_model_lora_changes_only_the_adapters(tmp_path, tiny_sd, digits_assets):
    config = small_config(tmp_path, "train.steps=3", "model.finetune=lora", f"model.base={tiny_sd}", "train.learning_rate=1e-2",
                          f"objective={{denoise: 1.0, anchor: 1.0, nr_iqa: {{weight: 0.5, metric: {{arch: cnniqa, weights: "
                          f"{digits_assets}/quality_cnniqa.safetensors}}, x0: {{t_range: [0, 400]}}}}}}")
    reports = []
    result = train(config, report=lambda m, c=None: reports.append((m, c)))
    before = load_file(tiny_sd / "unet" / "diffusion_pytorch_model.safetensors")
    after = weights(result["model"])
    adapters = {k: v for k, v in after.items() if "lora_" in k}
    frozen = {k.replace(".base_layer", ""): v for k, v in after.items() if "lora_" not in k}
    assert frozen.keys() == before.keys() and all(torch.equal(before[k], frozen[k]) for k in before)
    assert any(v.abs().sum() > 0 for k, v in adapters.items() if "lora_B" in k)  # B starts at zero
    assert {"loss/anchor", "loss/nr_iqa", "fid", "heldout_quality"} <= set(reports[-1][0])
    stored = load_file(reports[-1][1] / "model" / "adapter_model.safetensors")
    assert stored.keys() == adapters.keys()  # the checkpoint holds the adapter only
    sampled = load_checkpoint_model(reports[-1][1])
    assert sampled.text_conditioned and sampled.latent


def test_latent_cache_is_the_same_run_bit_for_bit(tmp_path, tiny_sd):
    """The VAE's encodings cached once (then read back) or computed every step: the same losses and
    weights, bit for bit, for the SD-shaped model and the same seed."""
    runs = {}
    for name, cached in (("writes the cache", True), ("uncached", False), ("reads the cache", True)):
        config = small_config(tmp_path / name.replace(" ", "_"), "train.steps=3", "train.eval_every=1", f"model.base={tiny_sd}",
                              f"data.cache_latents={str(cached).lower()}", f"data.cache_dir={tmp_path / 'cache'}",
                              "objective={denoise: 1.0, anchor: 1.0}")
        losses = []
        result = train(config, report=lambda m, c=None: losses.append(m["loss"]))
        runs[name] = losses, weights(result["model"])
        if name == "writes the cache":
            [cache] = (tmp_path / "cache").glob("*.safetensors")
            written = cache.stat().st_mtime_ns
    assert cache.stat().st_mtime_ns == written  # the third run read it
    (a, wa), (b, wb), (c, wc) = runs.values()
    assert a == b == c and len(a) == 3
    assert all(torch.equal(wa[k], wb[k]) and torch.equal(wa[k], wc[k]) for k in wa)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the bf16 autocast path only runs there")
def test_cuda_bf16_steps(tmp_path, tiny_sd, digits_assets):
    config = small_config(tmp_path, "train.steps=3", "train.use_gpu=true", "train.mixed_precision=bf16", "model.finetune=lora",
                          f"model.base={tiny_sd}", "objective={denoise: 1.0, anchor: 1.0}")
    result = train(config, report=lambda *_: None)
    assert next(result["model"].parameters()).is_cuda and torch.isfinite(torch.tensor(result["metrics"]["loss"]))


@pytest.mark.parametrize("precision", ["bf16", "auto"])
def test_cpu_bf16_autocast_runs_the_gpu_dtype_path(tmp_path, tiny_sd, digits_assets, monkeypatch, precision):
    """`mixed_precision: bf16` on the CPU: the UNet runs in bf16 under autocast (the denoise step, the
    anchor's frozen base, a sampled x0 decoded by the VAE for the fp32 reward model), the losses stay
    finite, the fp32 LoRA weights move and the base's do not; `auto` stays fp32 on the CPU."""
    from diffusers import UNet2DConditionModel

    config = small_config(tmp_path, "train.steps=2", "model.finetune=lora", f"model.base={tiny_sd}", "train.learning_rate=1e-2",
                          f"train.mixed_precision={precision}",
                          f"objective={{denoise: 1.0, anchor: 1.0, nr_iqa: {{weight: 0.5, metric: {{arch: cnniqa, weights: "
                          f"{digits_assets}/quality_cnniqa.safetensors}}, x0: {{source: sampled, sampling_steps: 3, feedback_steps: 1}}}}}}")
    dtypes, forward = set(), UNet2DConditionModel.forward

    def recording(self, *args, **kwargs):  # every UNet call, trained or frozen (evaluation samples without autocast)
        out = forward(self, *args, **kwargs)
        dtypes.add((out.sample if hasattr(out, "sample") else out[0]).dtype)
        return out

    monkeypatch.setattr(UNet2DConditionModel, "forward", recording)
    reports = []
    result = train(config, report=lambda m, c=None: reports.append(m))
    assert (torch.bfloat16 in dtypes) == (precision == "bf16")
    assert all(math.isfinite(reports[-1][k]) for k in ("loss", "loss/denoise", "loss/anchor", "loss/nr_iqa"))
    after = weights(result["model"])
    before = load_file(tiny_sd / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(v.dtype == torch.float32 for v in after.values())
    assert any(v.abs().sum() > 0 for k, v in after.items() if "lora_B" in k)
    frozen = {k.replace(".base_layer", ""): v for k, v in after.items() if "lora_" not in k}
    assert all(torch.equal(before[k], frozen[k]) for k in before)


def test_captioned_hf_data_conditions_on_its_own_captions(tmp_path, tiny_sd, digits_assets, monkeypatch):
    import datasets
    import numpy as np
    from PIL import Image

    import trainers.loop as loop

    captions = [f"caption number {i}" for i in range(16)]
    images = [Image.fromarray(np.full((16, 16), 15 * i, dtype=np.uint8)) for i in range(16)]
    datasets.Dataset.from_dict({"image": images, "text": captions}).save_to_disk(str(tmp_path / "ds"))
    config = small_config(tmp_path / "run", "train.steps=2", "model.finetune=lora", f"model.base={tiny_sd}",
                          "data.source=hf", f"data.path={tmp_path / 'ds'}", "data.caption_column=text", "data.caption='{label}'",
                          f"eval.reference=hf:{tmp_path / 'ds'}:train", "eval.prompts=[a prompt, another prompt]",
                          "eval.guidance_scale=3.0")
    seen = []
    original = loop.captions
    monkeypatch.setattr(loop, "captions", lambda *args: seen.append(original(*args)) or seen[-1])
    reports = []
    train(config, report=lambda m, c=None: reports.append(m))
    assert seen and all(c in captions for batch in seen for c in batch)  # the dataset's own text, not a template
    assert len(seen[0]) == 8 and len(set(seen[0])) == 8
    assert {"fid", "heldout_quality"} <= set(reports[-1])  # evaluated against the hf: reference with guided sampling


@pytest.mark.parametrize("overrides, message", [
    (["data.caption_column=text"], r"data.caption_column: the digits have one caption column, 'caption', not 'text'"),
    (["data.source=folder", "data.path=.", "data.caption_column=text"], r"data.caption_column: only for data.source 'hf'"),
    (["data.source=hf", "data.path=x", "data.caption_column=text"], r"eval.prompts: required when data.caption_column"),
    (["eval.guidance_scale=0.5"], r"eval.guidance_scale: Input should be greater than or equal to 1, got 0.5"),
    (["eval.clip_score=clipscorez"], r"eval.clip_score: unknown pyiqa metric 'clipscorez'"),
])
def test_text_data_and_eval_options_are_checked(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        small_config(tmp_path, *overrides)


def test_cas_dm_head_reaches_the_samples_checkpoints_and_export(tmp_path, digits_assets):
    """Cas-DM with the metric alone (denoise off): the eps-module gets no gradient, yet the samples
    change, because the cascaded head takes part in every sampling step; a checkpoint and the
    exported folder sample the same images, bit for bit."""
    from eval.evaluate import Evaluator
    from eval.sampling import sample_images
    from trainers.denoiser.cascade import CascadedDenoiser
    from sweeps.champion import export_champion
    from trainers.models import load_base_model

    metric = f"{{network: digits-classifier, weights: {digits_assets}/classifier.safetensors}}"
    config = small_config(tmp_path, "train.steps=6", "train.eval_every=6", "train.learning_rate=3e-3", "eval.samples=64",
                          "eval.sampling_steps=[4]", f"objective={{denoise: 0, lpips_x0: {{weight: 1.0, metric: {metric}}}}}")
    reports = []
    result = train(config, report=lambda m, c=None: reports.append((m, c)))
    base = load_base_model(config.model.base)
    before = load_file(digits_assets / "base" / "unet" / "diffusion_pytorch_model.safetensors")
    after = weights(result["model"])
    assert all(torch.equal(before[k], after[k]) for k in before)  # the eps-module: not one weight moved

    checkpoint = reports[-1][1]
    from_checkpoint = load_checkpoint_model(checkpoint)
    exported = load_base_model(export_champion(checkpoint, tmp_path / "champion"))
    assert isinstance(from_checkpoint.denoiser, CascadedDenoiser) and isinstance(exported.denoiser, CascadedDenoiser)
    head = from_checkpoint.denoiser.head.net[-1].weight
    assert head[:1].abs().sum() > 0 and head[1:].abs().sum() > 0  # the correction and the blend weight r_t both learned (init 0)

    def samples(model, sampler="ddim"):
        return sample_images(model, 16, steps=4, seed=3, sampler=sampler)

    for sampler in ("ddim", "dpm_solver"):  # both samplers step from the cascaded x0
        assert torch.equal(samples(from_checkpoint, sampler), samples(exported, sampler))
        assert not torch.equal(samples(from_checkpoint, sampler), samples(base, sampler))
    trained_fid = reports[-1][0]["fid"]
    base_fid = Evaluator.from_config(config).evaluate(base).metrics["fid"]
    assert trained_fid != pytest.approx(base_fid, abs=1e-6)
    assert (tmp_path / "champion" / "cascade" / "model.safetensors").is_file()


def test_the_latent_cache_encodes_a_few_images_at_a_time(tmp_path, tiny_sd, monkeypatch):
    # 32 images at once was the chunk: at 512 px that is ~4 GiB per encoder activation, and the sd15
    # rehearsal was killed at 24 GB. The encoder now sees at most ENCODE_PIXELS pixels per call, with
    # the same moments as one big batch.
    from trainers import data as data_module
    from trainers.data import cached_latents, latent_moments
    from trainers.models import load_base_model

    vae = load_base_model(tiny_sd).vae
    size = vae.config.sample_size
    monkeypatch.setattr(data_module, "ENCODE_PIXELS", 2 * size * size)
    batches = []
    vae.encoder.register_forward_pre_hook(lambda module, args: batches.append(len(args[0])))
    torch.manual_seed(0)
    images = torch.rand(5, vae.config.in_channels, size, size) * 2 - 1
    encoded = cached_latents([(image, 0) for image in images], vae, "cpu", tmp_path, log=lambda *_: None)
    assert batches and max(batches) == 2 and sum(batches) == 5
    assert torch.allclose(encoded.moments, latent_moments(vae, images), atol=1e-5)
