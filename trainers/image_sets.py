"""Image sets: the offline `digits` preset, a folder of the user's images, a Hugging Face dataset.
What the trainer reads (`data:`) and what FID is measured against (`eval.reference`) come from here.

Every dataset here yields images as float tensors `[C, H, W]` in [-1, 1] (the range diffusion
models are trained in). `DigitsDataset` also yields the label; a captioned Hugging Face set yields
(image, caption); the others yield images only.
"""

from __future__ import annotations

import hashlib
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from trainers.common.errors import UnreadableFileError

DIGITS_RESOLUTION = 16
DIGITS_HELDOUT = 297  # 1,797 images: 1,500 train, 297 held out
DIGITS_SPLIT_SEED = 0  # the split is part of the preset: changing it changes every figure in the cards

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}


def _digits_arrays():
    """scikit-learn's bundled 8x8 digits: images `[1797, 8, 8]` in 0..16 and labels. No download."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images.astype(np.float32), bunch.target.astype(np.int64)


def _digits_split_indices(n: int) -> dict[str, np.ndarray]:
    order = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(n)
    return {"heldout": np.sort(order[:DIGITS_HELDOUT]), "train": np.sort(order[DIGITS_HELDOUT:])}


class DigitsDataset(Dataset):
    """scikit-learn digits upsampled to 16x16: `(image [1, 16, 16] in [-1, 1], label)`.

    split: "train" (1,500 images) or "heldout" (297), fixed by `DIGITS_SPLIT_SEED`.
    """

    def __init__(self, split: str = "train"):
        if split not in ("train", "heldout"):
            raise ValueError(f"digits split must be 'train' or 'heldout', got {split!r}")
        images, labels = _digits_arrays()
        index = _digits_split_indices(len(images))[split]
        x = torch.from_numpy(images[index]).unsqueeze(1) / 16.0  # [N, 1, 8, 8] in [0, 1]
        # Bilinear upsampling keeps strokes smooth; nearest would teach the model 2x2 blocks,
        # which the quality model is trained to call a degradation (blockiness).
        x = F.interpolate(x, size=DIGITS_RESOLUTION, mode="bilinear", align_corners=False)
        self.images = (x.clamp(0, 1) * 2 - 1).contiguous()
        self.labels = torch.from_numpy(labels[index])
        self.split = split

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


STROKE_WORDS = ("thin", "", "thick")  # tertiles of ink per digit class; the middle third gets no word


def digits_captions(split: str = "train") -> list[str]:
    """A caption per digits image, from its label and one style word: "a thick handwritten 7",
    "a handwritten 7", "a thin handwritten 7". The word is the image's tertile of total ink among
    the images of the same digit in the split (stroke weight is what varies most within a class)."""
    dataset = DigitsDataset(split)
    ink = ((dataset.images + 1) / 2).flatten(1).sum(dim=1)
    words = [""] * len(dataset)
    for digit in range(10):
        index = (dataset.labels == digit).nonzero().flatten()
        ranks = ink[index].argsort().argsort()
        for i, r in zip(index.tolist(), ranks.tolist()):
            words[i] = STROKE_WORDS[min(3 * r // len(index), 2)]
    return [" ".join(filter(None, ("a", word, "handwritten", str(int(label))))) for word, label in zip(words, dataset.labels)]


class CaptionedDigits(Dataset):
    """The digits with `digits_captions` as their text: `(image [1, 16, 16] in [-1, 1], caption)`
    (`data.caption_column: caption` on the digits source)."""

    def __init__(self, split: str = "train"):
        self.digits, self.captions = DigitsDataset(split), digits_captions(split)

    def __len__(self) -> int:
        return len(self.digits)

    def __getitem__(self, i):
        return self.digits.images[i], self.captions[i]


def digits_data_hash() -> str:
    """Content hash of the digits data and split: what a card records, what a cache key uses."""
    images, labels = _digits_arrays()
    h = hashlib.sha256()
    h.update(images.tobytes())
    h.update(labels.tobytes())
    for name, index in sorted(_digits_split_indices(len(images)).items()):
        h.update(name.encode())
        h.update(index.tobytes())
    h.update(str(DIGITS_RESOLUTION).encode())
    return h.hexdigest()


# PIL refuses an image past Image.MAX_IMAGE_PIXELS (about 89 megapixels) only at twice that, and only
# warns below; a small file whose header claims a huge size (a decompression bomb) would take a node's
# memory when decoded. Past the limit an image is refused before decoding; this one stands in where a
# library turned PIL's off (MAX_IMAGE_PIXELS = None).
MAX_IMAGE_PIXELS = 89_478_485  # PIL's default: 0.25 GB of RGB


@contextmanager
def open_image(path: Path):
    """`Image.open` with every failure, a decompression bomb included, a one-line error naming the file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning, UnidentifiedImageError, OSError, SyntaxError) as error:
        raise UnreadableFileError(f"unreadable image {path}: {error}") from None
    with image:
        limit = Image.MAX_IMAGE_PIXELS or MAX_IMAGE_PIXELS
        if image.width * image.height > limit:
            raise UnreadableFileError(f"unreadable image {path}: {image.width}x{image.height} pixels, past the limit of "
                                      f"{limit:,} (a decompression bomb?)")
        yield image


def _square(image: Image.Image, resolution: int, resample) -> Image.Image:
    """Center crop to a square, then resize: the usual preprocessing for unconditional DDPMs."""
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return image.crop((left, top, left + side, top + side)).resize((resolution, resolution), resample)


def _to_model_range(image: Image.Image, resolution: int, channels: int) -> torch.Tensor:
    image = _square(image.convert("L" if channels == 1 else "RGB"), resolution, Image.BICUBIC)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
    x = x.unsqueeze(0) if channels == 1 else x.permute(2, 0, 1)
    return x * 2 - 1


class ImageFolderDataset(Dataset):
    """Every image file under `root` (recursively), center-cropped and resized: `[C, R, R]` in [-1, 1].

    Every file is opened once here, so an unreadable image is reported by name before training starts.
    """

    def __init__(self, root: str | Path, resolution: int, channels: int = 3):
        root = Path(root)
        if not root.exists():
            raise FileNotFoundError(f"image folder does not exist: {root}")
        if not root.is_dir():
            raise NotADirectoryError(f"image folder is not a directory: {root}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not self.files:
            raise ValueError(f"image folder has no images ({', '.join(sorted(IMAGE_SUFFIXES))}): {root}")
        self.resolution, self.channels = resolution, channels
        for path in self.files:
            with open_image(path) as image:
                try:
                    image.verify()
                except (OSError, SyntaxError) as error:
                    raise UnreadableFileError(f"unreadable image {path}: {error}") from None

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i) -> torch.Tensor:
        with open_image(self.files[i]) as image:
            return _to_model_range(image, self.resolution, self.channels)


class HFImageDataset(Dataset):
    """A Hugging Face `datasets` dataset: a hub name (e.g. "cifar10") or a folder made by `save_to_disk`.

    image_column names the PIL-image column ("img" for cifar10, "image" for most others). With
    caption_column (a text-to-image set's "text"), items are (image, caption) pairs.
    """

    def __init__(self, name: str, resolution: int, channels: int = 3, split: str = "train", image_column: str = "image",
                 caption_column: str = ""):
        import datasets

        if Path(name).is_dir():
            ds = datasets.load_from_disk(name)
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise ValueError(f"dataset {name} has no split {split!r} (has {sorted(ds)})")
                ds = ds[split]
        else:
            try:
                ds = datasets.load_dataset(name, split=split)
            except (ConnectionError, OSError, ValueError) as error:  # offline, or no such set: a user's error, one line
                first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                raise FileNotFoundError(f"could not load Hugging Face dataset {name!r} (split {split!r}): {first}") from None
        for column in filter(None, (image_column, caption_column)):
            if column not in ds.column_names:
                raise ValueError(f"dataset {name} has no column {column!r} (columns: {ds.column_names})")
        self.name, self.ds, self.resolution, self.channels = name, ds, resolution, channels
        self.image_column, self.caption_column = image_column, caption_column

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i):
        try:
            row = self.ds[i]  # datasets decodes the image here, with PIL's limit
        except Image.DecompressionBombError as error:
            raise UnreadableFileError(f"dataset {self.name}, row {i}: {error}") from None
        image = _to_model_range(row[self.image_column], self.resolution, self.channels)
        return (image, str(row[self.caption_column])) if self.caption_column else image


def parse_hf_reference(reference: str) -> tuple[str, str]:
    """"hf:NAME[:SPLIT]" (an evaluation reference set) -> (NAME, SPLIT), split "train" by default."""
    name, _, split = reference.removeprefix("hf:").partition(":")
    return name, split or "train"


FOREGROUND_THRESHOLD = 0.35  # a digits pixel (in [0, 1]) at or above this is stroke: the segmenter's training masks


def digit_masks(images01: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`[N, H, W]` class indices: 1 + label where the stroke is, 0 elsewhere (the digits' annotation)."""
    stroke = images01[:, 0] >= FOREGROUND_THRESHOLD
    return torch.where(stroke, labels.view(-1, 1, 1) + 1, torch.zeros_like(stroke, dtype=torch.long))


def data_masks(data) -> torch.Tensor:
    """`[N, R, R]` class indices, one label image per training image, in the training set's order:
    what `pefl_segmentation`'s `masks: data` scores against (UniFL: the data set's ground truth).
    Digits: the stroke masks the digits segmenter was trained from (stroke pixels labelled 1 + digit).
    A folder: `data.masks`, a label image per image at the same relative path with `.png`, of the
    image's size, center-cropped and resized as the image is (nearest)."""
    from trainers.common.errors import ConfigError

    if data.source == "digits":
        digits = DigitsDataset(data.split)
        return digit_masks((digits.images + 1) / 2, digits.labels.long())
    if data.source != "folder" or not data.masks:
        raise ConfigError("objective.pefl_segmentation.masks: data needs the digits or an image folder with data.masks "
                          "(a folder of label images); use masks: segmenter otherwise")
    images, root = ImageFolderDataset(data.path, data.resolution, data.channels), Path(data.masks)
    masks = []
    for path in images.files:
        mask_path = root / path.relative_to(Path(data.path)).with_suffix(".png")
        if not mask_path.is_file():
            raise ConfigError(f"data.masks: no mask for {path}: expected {mask_path}")
        with open_image(path) as image, open_image(mask_path) as mask:
            if mask.size != image.size:
                raise ConfigError(f"data.masks: {mask_path} is {mask.size[0]}x{mask.size[1]}, its image {path} "
                                  f"{image.size[0]}x{image.size[1]}")
            masks.append(_labels_to_resolution(mask, data.resolution))
    return torch.stack(masks)


def _labels_to_resolution(mask: Image.Image, resolution: int) -> torch.Tensor:
    """A label image center-cropped and resized as `_to_model_range` does an image (nearest: labels stay labels)."""
    array = np.asarray(_square(mask, resolution, Image.NEAREST))
    return torch.from_numpy((array if array.ndim == 2 else array[..., 0]).astype(np.int64))


class WithMasks(Dataset):
    """Items `(image, label or caption or None, mask [R, R])`: a training set with `data_masks`."""

    def __init__(self, dataset: Dataset, masks: torch.Tensor):
        if len(masks) != len(dataset):
            raise ValueError(f"{len(masks)} masks for {len(dataset)} training images")
        self.dataset, self.masks = dataset, masks

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        item = self.dataset[i]
        image, second = (item[0], item[1]) if isinstance(item, tuple) else (item, None)
        return image, second, self.masks[i]


def images_only(dataset: Dataset) -> torch.Tensor:
    """Stack a whole (small) dataset into `[N, C, H, W]` in [-1, 1], dropping labels if present."""
    items = [dataset[i] for i in range(len(dataset))]
    return torch.stack([item[0] if isinstance(item, tuple) else item for item in items])


def training_set(data) -> Dataset:
    """The training images named by a `data:` config section."""
    if data.source == "digits":
        return CaptionedDigits(data.split) if data.caption_column else DigitsDataset(data.split)
    if data.source == "folder":
        return ImageFolderDataset(data.path, data.resolution, data.channels)
    return HFImageDataset(data.path, data.resolution, data.channels, data.split, data.image_column, data.caption_column)


def reference_images(reference: str, data) -> torch.Tensor:
    """`[M, C, H, W]` in [0, 1]: the real images FID is measured against. `reference` is
    "digits:SPLIT", "hf:NAME[:SPLIT]" (the column `data.image_column`) or an image folder, read at
    the data's resolution and channels."""
    if reference.startswith("digits:"):
        images = images_only(DigitsDataset(reference.split(":", 1)[1]))
    elif reference.startswith("hf:"):  # hf:NAME[:SPLIT], e.g. hf:cifar10:train
        name, split = parse_hf_reference(reference)
        images = images_only(HFImageDataset(name, data.resolution, data.channels, split, data.image_column))
    else:
        images = images_only(ImageFolderDataset(reference, data.resolution, data.channels))
    return (images + 1) / 2


def captions(template: str, labels: list | None, n: int) -> list[str]:
    """Captions for text-conditioned models: the template, with `{label}` filled where the data has
    labels (a digit) or captions of its own (`data.caption_column`, with the template "{label}")."""
    if labels is None:
        return [template.replace("{label}", "").strip()] * n
    return [template.format(label=label) for label in labels]


def captioned_images(data, text_conditioned: bool) -> tuple[torch.Tensor, list[str] | None]:
    """The whole training set as `([N, C, H, W] in [0, 1], its captions or None)`, as the trainer
    captions it (`data.caption` filled with each label, or the data's own captions); None for
    an unconditional model. What `target: auto` scores a reward model on."""
    dataset = training_set(data)
    items = [dataset[i] for i in range(len(dataset))]
    images = torch.stack([item[0] if isinstance(item, tuple) else item for item in items])
    labels = [item[1] for item in items] if isinstance(items[0], tuple) else None
    prompts = captions(data.caption, labels, len(items)) if text_conditioned else None
    return (images + 1) / 2, prompts


def captioned_folder(root: str | Path, resolution: int, channels: int) -> tuple[torch.Tensor, list[str]]:
    """A folder of preferred images with a caption beside each (`name.png` + `name.txt`, the
    convention of most fine-tuning folders): `([N, C, H, W] in [0, 1], captions)`."""
    dataset = ImageFolderDataset(root, resolution, channels)
    prompts = []
    for path in dataset.files:
        caption = path.with_suffix(".txt")
        if not caption.is_file():
            raise FileNotFoundError(f"no caption beside {path}: expected {caption}")
        prompts.append(caption.read_text().strip())
    return (images_only(dataset) + 1) / 2, prompts
