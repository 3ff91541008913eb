import numpy as np
import pytest
import torch
from PIL import Image

from trainers.image_sets import DigitsDataset, HFImageDataset, ImageFolderDataset, digits_data_hash


def test_digits_split_sizes_range_and_labels():
    train, heldout = DigitsDataset("train"), DigitsDataset("heldout")
    assert (len(train), len(heldout)) == (1500, 297)
    image, label = train[0]
    assert image.shape == (1, 16, 16)
    for ds in (train, heldout):
        assert ds.images.min() >= -1 and ds.images.max() <= 1
        assert ds.images.min() < -0.99 and ds.images.max() > 0.5  # really spans the range: background and strokes
        assert set(ds.labels.tolist()) == set(range(10))


def test_digits_split_is_fixed_and_disjoint():
    a, b = DigitsDataset("heldout"), DigitsDataset("heldout")
    assert torch.equal(a.images, b.images)
    train = DigitsDataset("train").images.flatten(1)
    held = a.images.flatten(1)
    # no held-out image appears in train (sklearn digits has no exact duplicates across the split)
    distances = torch.cdist(held, train).min(dim=1).values
    assert distances.min() > 0


def test_digits_hash_is_stable_and_recorded_in_the_cards(digits_assets):
    import json

    card = json.loads((digits_assets / "classifier.json").read_text())
    assert card["data"]["data_hash"] == digits_data_hash()  # the data the committed assets were trained on


def test_digits_hash_changes_with_one_pixel(monkeypatch):
    import trainers.image_sets as image_sets

    original = image_sets._digits_arrays()
    images, labels = original[0].copy(), original[1]
    images[5, 3, 3] += 1
    monkeypatch.setattr(image_sets, "_digits_arrays", lambda: (images, labels))
    changed = digits_data_hash()
    monkeypatch.setattr(image_sets, "_digits_arrays", lambda: original)
    assert changed != digits_data_hash()


def test_unknown_digits_split():
    with pytest.raises(ValueError, match="digits split"):
        DigitsDataset("test")


def _write_images(folder, n, size=(20, 12)):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(folder / f"img{i}.png")


def test_image_folder_loads_resized_in_model_range(tmp_path):
    _write_images(tmp_path / "a" / "nested", 3)
    ds = ImageFolderDataset(tmp_path / "a", resolution=8, channels=3)
    assert len(ds) == 3
    x = ds[0]
    assert x.shape == (3, 8, 8) and x.min() >= -1 and x.max() <= 1
    gray = ImageFolderDataset(tmp_path / "a", resolution=8, channels=1)
    assert gray[0].shape == (1, 8, 8)


def test_image_folder_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist: .*missing"):
        ImageFolderDataset(tmp_path / "missing", 8)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="no images"):
        ImageFolderDataset(tmp_path / "empty", 8)
    _write_images(tmp_path / "broken", 2)
    (tmp_path / "broken" / "bad.png").write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match="unreadable image .*bad.png"):
        ImageFolderDataset(tmp_path / "broken", 8)


def test_hf_dataset_from_a_saved_folder(tmp_path):
    import datasets

    images = [Image.fromarray(np.full((10, 10, 3), 40 * i, dtype=np.uint8)) for i in range(4)]
    datasets.Dataset.from_dict({"img": images}).save_to_disk(str(tmp_path / "ds"))
    ds = HFImageDataset(str(tmp_path / "ds"), resolution=4, channels=3, image_column="img")
    assert len(ds) == 4 and ds[3].shape == (3, 4, 4)
    assert ds[0].max() < ds[3].min()  # the pixel values came through, in order
    with pytest.raises(ValueError, match="no column 'image'"):
        HFImageDataset(str(tmp_path / "ds"), resolution=4)


def test_hf_dataset_by_name_offline_is_a_clear_error(capsys):
    from trainers.common.errors import report_error

    with pytest.raises(FileNotFoundError, match="could not load Hugging Face dataset 'uoft-cs/cifar10'") as raised:
        HFImageDataset("uoft-cs/cifar10", resolution=32, image_column="img")
    assert report_error(raised.value) != 0  # a user's error: one line, no traceback
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
