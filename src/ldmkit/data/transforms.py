"""Resize/crop strategies that record the control metadata of what they did (PAPER.md sections 2-3).

Every call returns the square target image and a `CropMetadata`, whose fields are the named control values
the conditioner embeds. Coordinates are in pixels of the ORIGINAL image (SDXL records the crop corner in the
resized image instead: multiply by target / min(original) to convert). Randomness comes from the numpy
Generator the caller passes, so a sample's crop is reproducible from its seed.

Strategies:
- `center`: ADM/DiT's centre crop, exactly (box-halving, bicubic resize of the short side, centre crop);
  its recorded region is the centred square, exact to within a source pixel of rounding.
- `random`: resize the short side to the target, crop a random target x target window.
- `random_resized`: a random region covering `scale` of the area with aspect ratio in `ratio` (as
  torchvision's RandomResizedCrop), resized to the target.
- `none`: the whole image resized to target x target (aspect ratio not kept).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

CROP_STRATEGIES = ("center", "random", "random_resized", "none")


@dataclass(frozen=True)
class CropMetadata:
    original_size: tuple[int, int]     # (h, w) of the source image
    crop_top_left: tuple[float, float]  # (top, left) of the cropped region, original pixels
    crop_size: tuple[float, float]      # (h, w) of the cropped region, original pixels
    target_size: tuple[int, int]        # (h, w) of the output
    aspect_ratio: float                 # w / h of the source image
    flip: int                           # 1 if the output was mirrored left-right

    def as_control(self) -> dict[str, list[float]]:
        """Named control values, each a flat list of floats (what the conditioner embeds)."""
        return {k: [float(x) for x in (v if isinstance(v, tuple) else (v,))] for k, v in asdict(self).items()}


def center_crop_resize(image: Image.Image, size: int) -> Image.Image:
    """ADM/DiT's centre crop: halve with a box filter while the short side allows, bicubic resize the short
    side to size, then crop the centre."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    left, top = (image.size[0] - size) // 2, (image.size[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


def _resize_region(image: Image.Image, box: tuple[float, float, float, float], size: tuple[int, int]) -> Image.Image:
    """Resize the region box = (left, top, right, bottom) of image to size (w, h), halving with a box
    filter first while the region is at least twice the target (ADM's anti-aliasing)."""
    left, top, right, bottom = box
    while (right - left) >= 2 * size[0] and (bottom - top) >= 2 * size[1] and min(image.size) >= 2:
        half = (image.size[0] // 2, image.size[1] // 2)
        sx, sy = half[0] / image.size[0], half[1] / image.size[1]  # exactly 1/2 only for even sizes
        image = image.resize(half, resample=Image.BOX)
        left, top, right, bottom = left * sx, top * sy, right * sx, bottom * sy
    return image.resize(size, resample=Image.BICUBIC, box=(left, top, right, bottom))


def crop_with_metadata(image: Image.Image, target: int, strategy: str = "center", rng: np.random.Generator | None = None,
                       flip_prob: float = 0.0, scale: tuple[float, float] = (0.5, 1.0),
                       ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[Image.Image, CropMetadata]:
    """Crop and resize `image` to target x target with `strategy`; returns the image and its metadata."""
    if strategy not in CROP_STRATEGIES:
        raise ValueError(f"unknown crop strategy {strategy!r} (one of {', '.join(CROP_STRATEGIES)})")
    if rng is None and (strategy in ("random", "random_resized") or flip_prob > 0):
        raise ValueError(f"crop strategy {strategy!r} needs a random generator")
    W, H = image.size
    short = min(H, W)
    if strategy == "center":
        top, left, h, w = (H - short) / 2, (W - short) / 2, short, short
    elif strategy == "random":
        top, left = float(rng.integers(0, H - short + 1)), float(rng.integers(0, W - short + 1))
        h = w = short
    elif strategy == "random_resized":
        top, left, h, w = _random_resized_region(H, W, rng, scale, ratio)
    else:  # none
        top, left, h, w = 0.0, 0.0, H, W
    if strategy == "center":
        out = center_crop_resize(image, target)
    else:
        out = _resize_region(image, (left, top, left + w, top + h), (target, target))
    flip = int(flip_prob > 0 and rng.random() < flip_prob)
    if flip:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    meta = CropMetadata((H, W), (float(top), float(left)), (float(h), float(w)), (target, target), W / H, flip)
    return out, meta


def _random_resized_region(H: int, W: int, rng: np.random.Generator, scale, ratio, attempts: int = 10):
    """torchvision's RandomResizedCrop.get_params: area fraction in scale, log-uniform aspect in ratio;
    falls back to the largest centred crop within the ratio bounds."""
    area = H * W
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(attempts):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= W and 0 < h <= H:
            return float(rng.integers(0, H - h + 1)), float(rng.integers(0, W - w + 1)), h, w
    in_ratio = W / H
    if in_ratio < ratio[0]:
        w, h = W, round(W / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = H, round(H * ratio[1])
    else:
        w, h = W, H
    return (H - h) / 2, (W - w) / 2, h, w
