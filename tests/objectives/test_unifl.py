"""UniFL's three kinds of feedback as the paper runs them: PeFL (style and segmentation) on a rollout
from the noised real image, decoupled rewards with data-set targets and offline prompt selection,
and adversarial feedback whose generator gradient does not vanish and whose discriminator sees
every micro-batch."""


import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from trainers.image_sets import DigitsDataset, images_only
from eval.quality import load_quality_model
from objectives.nr_iqa import mean_reward
from objectives.adversarial import Adversarial
from objectives.context import StepContext
from objectives.prompt_select import remove_near_duplicates, select_prompts, text_embedder
from objectives.registry import build_objective, validate_objective
from trainers.common.errors import ObjectiveError
from objectives.term import BuildEnv
from trainers.models import build_digits_scheduler, load_base_model
from trainers.denoiser.noise_process import NoiseProcess


@pytest.fixture(scope="module")
def specs(digits_assets):
    return {"cnniqa": {"arch": "cnniqa", "weights": str(digits_assets / "quality_cnniqa.safetensors")},
            "network": {"network": "digits-classifier", "weights": str(digits_assets / "classifier.safetensors")},
            "segmenter": {"network": "digits-segmenter", "weights": str(digits_assets / "segmenter.safetensors")},
            "agreement": {"arch": "digits_prompt_agreement", "weights": str(digits_assets / "classifier.safetensors")}}


@pytest.fixture(scope="module")
def real():
    return images_only(DigitsDataset("train"))[:16]


def context(model, x0, seed=0, **kwargs):
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(x0.shape, generator=generator)
    t = torch.randint(0, 1000, (len(x0),), generator=generator)
    return StepContext(model=model, process=NoiseProcess(build_digits_scheduler().config), x0=x0, noise=noise, t=t, generator=generator, **kwargs)


def test_pefl_style_variant_is_gram_only_by_default_on_a_rollout_from_the_real_image(specs, real, digits_assets):
    term = build_objective({"pefl": {"network": specs["network"]}}).terms["pefl"][1]
    assert (term.source.kind, term.source.start) == ("rollout", 10)  # UniFL: from the noised real image
    assert set(term(context(load_base_model(digits_assets / "base").denoiser, real[:4]))) == {"style"}
    with_content = build_objective({"pefl": {"network": specs["network"], "content_weight": 1.0}}).terms["pefl"][1]
    assert set(with_content(context(load_base_model(digits_assets / "base").denoiser, real[:4]))) == {"style", "content"}
    with pytest.raises(ObjectiveError, match=r"objective.pefl.x0.start: .*the rollout must start from it"):
        validate_objective({"pefl": {"network": specs["network"], "x0": {"start": None}}})


def test_pefl_segmentation_lowers_the_segmentation_loss_of_rolled_out_x0(specs, real, digits_assets):
    model = load_base_model(digits_assets / "base").denoiser.requires_grad_(True).train()
    term = build_objective({"pefl_segmentation": {"segmenter": specs["segmenter"]}}).terms["pefl_segmentation"][1]
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-5)

    def held_out_loss():  # the same x0s (same seeds: same noise, same stop steps) before and after
        with torch.no_grad():
            return sum(term(context(model, real, seed=seed)).mean().item() for seed in (123, 124, 125)) / 3

    before = held_out_loss()
    for step in range(10):
        loss = term(context(model, real, seed=step)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = held_out_loss()
    assert after < 0.97 * before, (before, after)  # measured: 0.260 -> 0.246 after 8 steps


def test_segmenter_masks_of_real_digits_are_their_annotation(specs, real):
    from objectives.segmenters import load_segmenter
    from trainers.image_sets import digit_masks

    segmenter = load_segmenter(specs["segmenter"])
    data = DigitsDataset("heldout")
    images01 = (data.images + 1) / 2
    with torch.no_grad():
        predicted = segmenter(images01).argmax(1)
    truth = digit_masks(images01, data.labels)
    stroke = truth > 0
    assert (predicted[stroke] == truth[stroke]).float().mean() > 0.9  # stroke pixels carry the right digit
    assert (predicted[~stroke] == 0).float().mean() > 0.95


def test_masks_from_the_data_are_what_the_structure_loss_scores_against(specs, real, digits_assets):
    from trainers.config import Config
    from trainers.image_sets import data_masks, digit_masks

    config = Config.from_dict({"data": {"source": "digits"}})
    masks = data_masks(config.data)
    train = DigitsDataset("train")
    assert torch.equal(masks, digit_masks((train.images + 1) / 2, train.labels.long()))  # the segmenter's training masks
    model = load_base_model(digits_assets / "base").denoiser
    own = build_objective({"pefl_segmentation": {"segmenter": specs["segmenter"]}}).terms["pefl_segmentation"][1]
    ground = build_objective({"pefl_segmentation": {"segmenter": specs["segmenter"], "masks": "data"}}).terms["pefl_segmentation"][1]
    assert ground.needs_masks and not own.needs_masks
    wrong = torch.zeros_like(masks[:4])  # "all background": a loss against the data's masks must see it
    with torch.no_grad():
        against_data = ground(context(model, real[:4], seed=1, masks=wrong))
        against_own = own(context(model, real[:4], seed=1, masks=wrong))
    assert not torch.allclose(against_data, against_own)
    with pytest.raises(ValueError, match="masks: data, but the batch carries no masks"):
        ground(context(model, real[:4], seed=1))


def test_a_missing_or_mis_sized_mask_file_is_refused_naming_it(tmp_path):
    from PIL import Image

    from trainers.common.errors import ConfigError
    from trainers.config import Config
    from trainers.image_sets import data_masks

    images, masks = tmp_path / "images", tmp_path / "masks"
    (images / "sub").mkdir(parents=True)
    (masks / "sub").mkdir(parents=True)
    for name in ("a", "sub/b"):
        Image.new("L", (20, 24), 128).save(images / f"{name}.png")
    Image.new("L", (20, 24), 3).save(masks / "a.png")
    data = Config.from_dict({"data": {"source": "folder", "path": str(images), "masks": str(masks), "resolution": 8}}).data
    with pytest.raises(ConfigError, match="^" + re.escape(f"data.masks: no mask for {images / 'sub' / 'b.png'}: expected {masks / 'sub' / 'b.png'}") + "$"):
        data_masks(data)
    Image.new("L", (24, 24), 5).save(masks / "sub" / "b.png")
    with pytest.raises(ConfigError, match="^" + re.escape(f"data.masks: {masks / 'sub' / 'b.png'} is 24x24, its image {images / 'sub' / 'b.png'} 20x24") + "$"):
        data_masks(data)
    Image.new("L", (20, 24), 5).save(masks / "sub" / "b.png")
    read = data_masks(data)
    assert read.shape == (2, 8, 8) and set(read[0].unique().tolist()) == {3} and set(read[1].unique().tolist()) == {5}
    with pytest.raises(ConfigError, match=r"^objective.pefl_segmentation.masks: data needs the digits or an image folder with data.masks"):
        data_masks(Config.from_dict({"data": {"source": "folder", "path": str(images)}}).data)


def test_the_trainer_hands_the_data_masks_to_the_structure_loss(digits_assets, tmp_path, monkeypatch):
    from objectives.pefl_segmentation import PeflSegmentation
    from sweeps.presets import load
    from trainers.loop import train

    seen = []
    original = PeflSegmentation.masks
    monkeypatch.setattr(PeflSegmentation, "masks", lambda self, ctx: (seen.append(ctx.masks), original(self, ctx))[1])
    config, _ = load("digits", ["train.steps=2", "train.batch_size=8", "eval.samples=8", "eval.sampling_steps=[2]",
                                f"train.output_dir={tmp_path}/run",
                                f"objective={{denoise: 1.0, pefl_segmentation: {{masks: data, x0: {{sampling_steps: 4, start: 1, stop_low: 2, "
                                f"stop_high: 3}}, segmenter: {{network: digits-segmenter, weights: {digits_assets}/segmenter.safetensors}}}}}}"])
    result = train(config)
    assert len(seen) == 2 and all(m is not None and m.shape == (8, 16, 16) and m.max() <= 10 and (m > 0).any() for m in seen)
    assert "loss/pefl_segmentation" in result["metrics"]


def scaled_metric(digits_assets, tmp_path, factor=100.0):
    """CNNIQA with its last layer scaled: scores on a 0..100 scale, as MUSIQ's."""
    state = load_file(digits_assets / "quality_cnniqa.safetensors")
    state["fc3.weight"], state["fc3.bias"] = state["fc3.weight"] * factor, state["fc3.bias"] * factor
    path = tmp_path / "cnniqa_x100.safetensors"
    save_file(state, path)
    return {"arch": "cnniqa", "weights": str(path)}


def grad_norm(loss, model):
    model.zero_grad()
    loss.backward()
    return torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters() if p.grad is not None)).item()


def test_adversarial_generator_gradient_is_not_negligible_on_a_0_to_100_metric(digits_assets, tmp_path, real):
    metric = scaled_metric(digits_assets, tmp_path)
    with torch.no_grad():
        scores = load_quality_model(metric)((real + 1) / 2)
    assert scores.mean() > 40  # the metric is on MUSIQ's scale
    model = load_base_model(digits_assets / "base").denoiser.requires_grad_(True)
    objective = build_objective({"denoise": 1.0, "adversarial": {"discriminator": metric}})
    ctx = context(model, real)
    _, parts = objective(ctx)
    denoise = grad_norm(objective.terms["denoise"][1](ctx).mean(), model)
    ctx = context(model, real)
    adversarial = grad_norm(objective.terms["adversarial"][1](ctx).mean(), model)
    assert adversarial > 0.05 * denoise, (adversarial, denoise)
    # what the logistic generator loss softplus(-score) gave on the raw score: a vanishing gradient
    ctx = context(model, real)
    raw = objective.terms["adversarial"][1].discriminator((ctx.image(ctx.generated(objective.terms["adversarial"][1].source)) + 1) / 2)
    assert grad_norm(torch.nn.functional.softplus(-raw).mean(), model) < 1e-9 * denoise


def test_the_logistic_discriminator_loss_is_unifls_eq_6(specs, real, monkeypatch):
    from objectives.adversarial import discriminator_loss

    real_logits, fake_logits = torch.tensor([2.0, -1.0, 0.0, 30.0]), torch.tensor([0.5, -3.0, 0.0, -30.0])
    by_hand = -(torch.log(torch.sigmoid(real_logits)) + torch.log(1 - torch.sigmoid(fake_logits)))  # Eq. 6, per sample
    assert torch.allclose(discriminator_loss(real_logits, fake_logits), by_hand, atol=1e-6)
    assert torch.allclose(discriminator_loss(real_logits, fake_logits, "hinge"), torch.tensor([0.0 + 1.5, 2.0 + 0.0, 1.0 + 1.0, 0.0 + 0.0]))
    # the term's own loss is that one by default, the hinge on request
    for kind, expected in (("logistic", by_hand), ("hinge", discriminator_loss(real_logits, fake_logits, "hinge"))):
        options = {"discriminator": specs["cnniqa"], "x0": "one_step"} | ({"loss": kind} if kind == "hinge" else {})
        term = build_objective({"adversarial": options}).terms["adversarial"][1]
        answers = iter([real_logits, fake_logits])
        monkeypatch.setattr(term, "logits", lambda images, prompts: next(answers))
        monkeypatch.setattr(term, "_calibrate", lambda ctx: None)
        assert torch.allclose(term.own_loss(context(CheapModel(), real[:4]))["discriminator"], expected, atol=1e-6)
    with pytest.raises(ObjectiveError, match=r"objective.adversarial.loss: expected 'logistic'"):
        validate_objective({"adversarial": {"discriminator": specs["cnniqa"], "loss": "wasserstein"}})


class CheapModel(torch.nn.Module):
    """A denoiser that predicts zero noise and counts its forwards: a rollout's length, for nothing."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x, t, **_):
        self.calls += 1
        return type("Output", (), {"sample": torch.zeros_like(x)})()


def test_the_adversarial_rollout_trains_every_step_of_a_20_step_schedule(specs, real):
    # UniFL: "the optimization step is set to t in [0, 20], encompassing the entire diffusion process"
    term = build_objective({"adversarial": {"discriminator": specs["cnniqa"]}}).terms["adversarial"][1]
    assert (term.source.kind, term.source.sampling_steps, term.source.start) == ("rollout", 20, 0)
    stops = set()
    for seed in range(300):
        model = CheapModel()
        context(model, real[:2], seed=seed).generated(term.source)
        stops.add(model.calls - 1)  # forwards from step 0 to the stop, both included
    assert stops == set(range(20))


def test_discriminator_learns_real_from_generated_and_round_trips(specs, real):
    term = build_objective({"adversarial": {"discriminator": specs["cnniqa"], "learning_rate": 1e-3,
                                            "x0": {"source": "one_step", "t_range": [0, 1000]}}}).terms["adversarial"][1]
    torch.manual_seed(0)
    from diffusers import UNet2DModel

    model = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16), norm_num_groups=4,
                        down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)  # untrained: x0 is not a digit

    def accuracy(ctx):
        with torch.no_grad():
            fake = (ctx.image(ctx.generated(term.source)) + 1) / 2
            return 0.5 * ((term.logits((real + 1) / 2, None) > 0).float().mean() + (term.logits(fake, None) <= 0).float().mean()).item()

    term._calibrate(context(model, real, seed=100))
    before = accuracy(context(model, real, seed=100))
    for step in range(40):
        ctx = context(model, real, seed=step)
        sum(v.mean() for v in term.own_loss(ctx).values()).backward()
        term.own_step()
    after = accuracy(context(model, real, seed=100))
    assert before < 0.8 and after > 0.9, (before, after)
    clone = build_objective({"adversarial": {"discriminator": specs["cnniqa"], "x0": "one_step"}}).terms["adversarial"][1]
    clone.load_state_dict(term.state_dict())
    assert torch.equal(clone.calibration.scale, term.calibration.scale)
    term.discriminator, term.calibration = clone.discriminator, clone.calibration
    assert accuracy(context(model, real, seed=100)) == pytest.approx(after)


def test_discriminator_trains_on_every_micro_batch(digits_assets, tmp_path, monkeypatch):
    from sweeps.presets import load
    from trainers.loop import train

    seen = []
    original = Adversarial.own_loss
    monkeypatch.setattr(Adversarial, "own_loss", lambda self, ctx: (seen.append(ctx.x0.sum().item()), original(self, ctx))[1])
    steps = []
    original_step = Adversarial.own_step
    monkeypatch.setattr(Adversarial, "own_step", lambda self, sync=None: (steps.append(1), original_step(self, sync))[1])
    config, _ = load("digits", ["train.steps=2", "train.batch_size=8", "train.gradient_accumulation=3", "eval.samples=8",
                                "eval.sampling_steps=[2]", f"train.output_dir={tmp_path}/run",
                                f"objective={{denoise: 1.0, adversarial: {{weight: 0.1, discriminator: {{arch: cnniqa, weights: "
                                f"{digits_assets}/quality_cnniqa.safetensors}}}}}}"])
    result = train(config)
    assert len(seen) == 6 and len(set(seen)) == 6  # 2 steps x 3 micro-batches, each a different batch
    assert len(steps) == 2  # its optimizer steps once per optimizer step
    assert "loss/adversarial/discriminator" in result["metrics"]


def test_target_auto_is_the_mean_reward_on_the_reference_set(specs, tmp_path):
    data = DigitsDataset("train")
    images01 = (data.images[:40] + 1) / 2
    prompts = [f"a handwritten {int(label)}" for label in data.labels[:40]]
    spec = {"decoupled_rewards": {"rewards": {"agreement": {"model": specs["agreement"], "target": "auto"},
                                              "sharp": {"model": specs["cnniqa"], "target": "auto"}}}}
    env = BuildEnv(text_conditioned=True, reference=lambda: (images01, prompts), cache_dir=str(tmp_path))
    term = build_objective(spec, env).terms["decoupled_rewards"][1]

    from eval.digits_fid import load_digits_classifier

    classifier = load_digits_classifier(specs["agreement"]["weights"])
    with torch.no_grad():  # computed here without the reward interface: the classifier's probability of each prompted digit
        expected = classifier(images01 * 2 - 1).softmax(1)[torch.arange(40), data.labels[:40]].mean().item()
        sharp = load_quality_model(specs["cnniqa"]).net.metric.net(images01.expand(-1, 3, -1, -1)).mean().item()
    assert term.targets()["agreement"] == pytest.approx(expected, abs=1e-5)
    assert term.targets()["sharp"] == pytest.approx(sharp, abs=1e-5)
    cached = sorted((tmp_path / "reward-targets").glob("*.json"))
    assert len(cached) == 2
    for path in cached:  # a second build reads the cache: plant a value and see it come back
        path.write_text('{"mean": 12.5}')
    again = build_objective(spec, env).terms["decoupled_rewards"][1]
    assert again.targets() == {"agreement": 12.5, "sharp": 12.5}


def test_mean_reward_cache_key_changes_with_the_images(specs, tmp_path):
    model = load_quality_model(specs["cnniqa"])
    images = (DigitsDataset("heldout").images[:20] + 1) / 2
    first = mean_reward(model, images, None, specs["cnniqa"], tmp_path)
    second = mean_reward(model, images.flip(-1) * 0.5, None, specs["cnniqa"], tmp_path)
    assert first != second and len(list((tmp_path / "reward-targets").glob("*.json"))) == 2


def test_prompt_conditioned_rewards_need_prompts(specs):
    model = load_quality_model(specs["agreement"])
    assert model.prompt_conditioned
    images = (DigitsDataset("heldout").images[:4] + 1) / 2
    with pytest.raises(ValueError, match="prompt-conditioned"):
        model(images)
    right = model(images, [f"a handwritten {int(d)}" for d in DigitsDataset("heldout").labels[:4]])
    wrong = model(images, [f"a handwritten {(int(d) + 1) % 10}" for d in DigitsDataset("heldout").labels[:4]])
    assert (right > 0.9).all() and (wrong < 0.1).all()
    with pytest.raises(ObjectiveError, match=r"objective.nr_iqa.metric: .*scores images against prompts"):
        build_objective({"nr_iqa": {"metric": specs["agreement"]}}, BuildEnv(text_conditioned=False))


def test_offline_prompt_selection_removes_planted_near_duplicates_and_is_seeded(digits_assets):
    embed = text_embedder(load_base_model(digits_assets.parent / "digits-t2i" / "base"))
    distinct = [f"a {style} handwritten {d}".replace("  ", " ") for d in range(10) for style in ("thin", "thick")]
    planted = ["A THIN handwritten 3", "a  thick handwritten 7", "a thin handwritten 3"]  # the same text after CLIP's normalization
    candidates = distinct + planted + ["7", "digit"]  # too little content: the semantic filter drops these
    # the frozen random text encoder of digits-t2i puts "a handwritten 7" and "a handwritten 1" at cosine ~0.993:
    # only a threshold above that keeps the digits apart (a trained CLIP separates them at UniFL's 0.8)
    pool = select_prompts(candidates, embed, size=100, seed=0, threshold=0.999)
    assert sorted(" ".join(p.lower().split()) for p in pool) == sorted(distinct)  # one of each planted pair, whichever the shuffle met first
    assert remove_near_duplicates(["a", "b"], torch.tensor([[1.0, 0.0], [0.99, 0.01]]), 0.9) == [0]
    a = select_prompts(candidates, embed, size=8, seed=1, threshold=0.999)
    assert a == select_prompts(candidates, embed, size=8, seed=1, threshold=0.999) and len(a) == 8
    assert a != select_prompts(candidates, embed, size=8, seed=2, threshold=0.999)


def test_prompt_selection_shuffles_then_drops_pairs_above_unifls_cosine():
    # planted: b at cosine 0.85 with a (a pair at UniFL's 0.8: one goes), c at 0.75 with a (kept)
    vectors = {"a one two": [1.0, 0.0, 0.0], "b one two": [0.85, (1 - 0.85 ** 2) ** 0.5, 0.0], "c one two": [0.75, 0.0, (1 - 0.75 ** 2) ** 0.5]}
    vectors.update({f"other {i} prompt": [0.0] * 3 + [1.0 if j == i else 0.0 for j in range(6)] for i in range(6)})
    width = max(len(v) for v in vectors.values())
    embed = lambda prompts: torch.tensor([vectors[p] + [0.0] * (width - len(vectors[p])) for p in prompts])  # noqa: E731
    survivors = []
    for seed in range(12):
        pool = select_prompts(list(vectors), embed, size=100, seed=seed)
        assert "c one two" in pool and len(pool) == len(vectors) - 1 and ("a one two" in pool) != ("b one two" in pool)
        assert pool == [p for p in vectors if p in pool]  # written in file order
        survivors.append("a one two" in pool)
    assert any(survivors) and not all(survivors)  # which of the pair survives is the seeded shuffle's, not the file's
    assert select_prompts(list(vectors), embed, size=4, seed=3) == select_prompts(list(vectors), embed, size=4, seed=3)


class PromptEcho(torch.nn.Module):
    """A text-conditioned "denoiser" whose output is its conditioning: what each forward was given shows in x0."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x, t, encoder_hidden_states=None):
        self.seen.append(encoder_hidden_states)
        return type("Output", (), {"sample": x * 0 + encoder_hidden_states.view(-1, 1, 1, 1)})()


def encode(prompts):
    return {"encoder_hidden_states": torch.tensor([float(len(p)) for p in prompts]).view(-1, 1, 1)}


def test_decoupled_rewards_roll_out_from_their_prompts_as_refl_does(specs, real):
    # UniFL's decoupled feedback follows ReFL: from noise, conditioned on the drawn prompts, to a stop in the last quarter
    pool = ["a handwritten 1", "a thick handwritten 22", "a very thin handwritten 333"]
    spec = {"decoupled_rewards": {"rewards": {"sharp": {"model": specs["cnniqa"]}}, "prompts": pool, "prompts_per_step": 2,
                                  "x0": {"sampling_steps": 8}}}
    term = build_objective(spec, BuildEnv(text_conditioned=True)).terms["decoupled_rewards"][1]
    assert (term.source.kind, term.source.start, term.source.stop_low, term.source.stop_high) == ("rollout", None, 6, 7)
    stops = set()
    for seed in range(16):
        model = PromptEcho()
        ctx = context(model, real[:4], seed=seed, conditioning=encode(["the batch's own caption"] * 4), encode_prompt=encode)
        assert torch.isfinite(term(ctx)["sharp"]).all()
        drawn = term._draw_prompts(context(model, real[:4], seed=seed))  # the same draw, from the same step generator
        assert all(torch.equal(seen, encode(list(drawn))["encoder_hidden_states"]) for seen in model.seen)  # every forward
        stops.add(len(model.seen) - 1)
    assert stops == {6, 7}
    # a prompt change changes x0 (same step, same noise, same stop)
    one = context(PromptEcho(), real[:2], seed=3, encode_prompt=encode).generated(term.source, ("a 1", "a 2"))
    other = context(PromptEcho(), real[:2], seed=3, encode_prompt=encode).generated(term.source, ("a 1", "a handwritten 2"))
    assert torch.equal(one[0], other[0]) and not torch.equal(one[1], other[1])
