"""What a config may ask for is bounded: a count or size past any real run, a YAML value that contains
itself or expands past reason, and an image whose header claims a huge size each fail in one line
naming the field, the file or the override, before anything runs."""

import pytest
from PIL import Image

from sweeps.cli import main
from sweeps.presets import PRESETS_DIR, load, read_preset, read_yaml_mapping
from trainers.common.errors import UnreadableFileError
from trainers.config import Config
from trainers.common.errors import ConfigError
from trainers.image_sets import ImageFolderDataset

STUDIES_DIR = PRESETS_DIR.parent / "studies"


@pytest.mark.parametrize(
    "override, field",
    [
        ("eval.samples=1000000000", "eval.samples"),
        ("eval.resamples=1000000000", "eval.resamples"),
        ("eval.sampling_steps=[25, 1000000]", "eval.sampling_steps.1"),
        ("sweep.confirm.samples=1000000000", "sweep.confirm.samples"),
        ("sweep.num_samples=1000000000", "sweep.num_samples"),
        ("data.resolution=1000000", "data.resolution"),
        ("data.workers=100000", "data.workers"),
        ("data.prefetch=1000000000", "data.prefetch"),
        ("train.batch_size=1000000000", "train.batch_size"),
        ("train.gradient_accumulation=1000000000", "train.gradient_accumulation"),
        ("train.steps=1000000000", "train.steps"),
        ("train.eval_every=1000000000", "train.eval_every"),
        ("train.workers=100000", "train.workers"),
        ("model.lora_rank=1000000", "model.lora_rank"),
    ],
)
def test_a_count_past_any_real_run_fails_naming_the_field(override, field):
    with pytest.raises(ConfigError, match=rf"^{field}: Input should be less than or equal to \d+, got \d+$") as raised:
        load("digits", [override])
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize(
    "overrides",
    [
        ["eval.samples=200000", "eval.resamples=100000", "sweep.confirm.samples=200000", "sweep.num_samples=100000"],
        ["data.resolution=4096", "train.batch_size=65536", "eval.sampling_steps=[10000]", "train.steps=10000000"],
    ],
)
def test_the_bounds_themselves_are_allowed(overrides):
    load("digits", overrides)


def test_the_cli_reports_a_bound_in_one_line(capsys):
    assert main(["train", "--dry-run", "--set", "eval.samples=1000000000"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "acpo: error: eval.samples: Input should be less than or equal to 200000, got 1000000000\n"


@pytest.mark.parametrize("study", sorted(p.stem for p in STUDIES_DIR.glob("*.yaml")))
def test_every_shipped_study_still_reads_its_aliases(study):
    from sweeps.study import read_study

    assert read_study(study).methods  # the studies share spaces and objectives between methods with anchors


@pytest.mark.parametrize(
    "text, message",
    [
        ("train: &x [*x]\n", r"the value at line 1, column 8 contains itself"),
        ("objective: &x {denoise: 1.0, again: *x}\n", r"the value at line 1, column 12 contains itself"),
        ("objective: &x {<<: *x}\n", r"the value at line 1, column 12 contains itself"),
        # a "billion laughs": nine levels of ten aliases each, 10^9 values once expanded
        ("a: &a [" + ", ".join(["x"] * 10) + "]\n"
         + "".join(f"{c}: &{c} [{', '.join([f'*{p}'] * 10)}]\n" for p, c in zip("abcdefgh", "bcdefghi")),
         r"aliases expand to more than 1,000,000 values"),
        ("train: " + "[" * 5000 + "]" * 5000 + "\n", r"nested deeper than 100 levels"),
    ],
)
def test_a_self_referencing_or_exploding_preset_fails_naming_the_file(tmp_path, text, message):
    preset = tmp_path / "bomb.yaml"
    preset.write_text(text)
    with pytest.raises(ConfigError, match=rf"^preset {preset}: {message}") as raised:
        read_preset(str(preset))
    assert "\n" not in str(raised.value)
    with pytest.raises(ConfigError, match=rf"^study {preset}: {message}"):
        read_yaml_mapping(preset, "study")


def test_a_self_referencing_override_fails_naming_the_override(capsys):
    with pytest.raises(ConfigError, match=r"^override 'eval.prompts=&x \[\*x\]': the value at line 1, column 1 contains itself"):
        load("digits", ["eval.prompts=&x [*x]"])
    assert main(["train", "--dry-run", "--set", "objective=&x {denoise: *x}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("acpo: error: override 'objective=&x {denoise: *x}': the value at") and err.count("\n") == 1


def test_a_value_that_contains_itself_from_python_names_the_field():
    data = Config().to_dict()
    options = {"weight": 1.0}
    options["inner"] = [options]
    data["objective"] = {"denoise": options}
    with pytest.raises(ConfigError, match=r"^objective.denoise.inner.0: the value contains itself$"):
        Config.from_dict(data)
    deep = {}
    data["objective"] = {"denoise": deep}
    for _ in range(2000):
        deep["x"] = deep = {}
    with pytest.raises(ConfigError, match=r"^objective.denoise(.x)+: nested deeper than 100 levels$"):
        Config.from_dict(data)


def _write_png(path, size=(64, 64)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (10, 20, 30)).save(path)
    return path


@pytest.mark.parametrize("pixels", [64 * 64 // 3 - 1, 64 * 64 - 1])  # PIL raises past twice its limit, warns past it
def test_a_decompression_bomb_is_a_one_line_error_naming_the_file(tmp_path, monkeypatch, capsys, pixels):
    from trainers.common.errors import report_error

    _write_png(tmp_path / "images" / "fine.png", (8, 8))
    bomb = _write_png(tmp_path / "images" / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pixels)  # the 64x64 image counts as a bomb, cheaply
    with pytest.raises(UnreadableFileError, match=rf"^unreadable image {bomb}: .*exceeds limit of") as raised:
        ImageFolderDataset(tmp_path / "images", resolution=8)
    assert report_error(raised.value) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_an_image_past_the_limit_is_refused_where_pil_checks_nothing(tmp_path, monkeypatch):
    import trainers.image_sets as image_sets

    bomb = _write_png(tmp_path / "images" / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # a library turned PIL's check off
    monkeypatch.setattr(image_sets, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(UnreadableFileError, match=rf"^unreadable image {bomb}: 64x64 pixels, past the limit of 1,000"):
        ImageFolderDataset(tmp_path / "images", resolution=8)
    monkeypatch.setattr(image_sets, "MAX_IMAGE_PIXELS", 64 * 64)
    assert ImageFolderDataset(tmp_path / "images", resolution=8)[0].shape == (3, 8, 8)
