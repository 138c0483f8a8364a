"""Resize/crop strategies that record the control metadata of what they did (PAPER.md sections 2-3).

Every call returns the target image (square, or a bucket's h x w) and a `CropMetadata`, whose fields are the
named control values the conditioner embeds. Coordinates are in pixels of the ORIGINAL image (SDXL records the
crop corner in the resized image instead: multiply by target / min(original) to convert). Randomness comes from
the numpy Generator the caller passes, so a sample's crop is reproducible from its seed.

Strategies:
- `center`: ADM/DiT's centre crop, exactly (box-halving, bicubic resize of the short side, centre crop);
  its recorded region is the centred square, exact to within a source pixel of rounding. For a non-square
  target (a bucket): the largest centred region of the target's aspect ratio.
- `random`: the largest region of the target's aspect ratio at a random position (for a square target:
  resize the short side to the target, crop a random window).
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
    original_size: tuple[int, int]  # (h, w) of the source image
    crop_top_left: tuple[float, float]  # (top, left) of the cropped region, original pixels
    crop_size: tuple[float, float]  # (h, w) of the cropped region, original pixels
    target_size: tuple[int, int]  # (h, w) of the output
    aspect_ratio: float  # w / h of the source image
    flip: int  # 1 if the output was mirrored left-right

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


def crop_with_metadata(
    image: Image.Image,
    target: int | tuple[int, int],
    strategy: str = "center",
    rng: np.random.Generator | None = None,
    flip_prob: float = 0.0,
    scale: tuple[float, float] = (0.5, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[Image.Image, CropMetadata]:
    """Crop and resize `image` to target (side, or (h, w)) with `strategy`; returns the image and its metadata."""
    if strategy not in CROP_STRATEGIES:
        raise ValueError(f"unknown crop strategy {strategy!r} (one of {', '.join(CROP_STRATEGIES)})")
    if rng is None and (strategy in ("random", "random_resized") or flip_prob > 0):
        raise ValueError(f"crop strategy {strategy!r} needs a random generator")
    th, tw = (target, target) if isinstance(target, int) else (int(target[0]), int(target[1]))
    W, H = image.size
    # The largest region of the target's aspect ratio (the short side's square for a square target).
    rh, rw = (H, H * tw / th) if W * th >= H * tw else (W * th / tw, W)
    if th == tw:
        rh = rw = min(H, W)
    if strategy == "center":
        top, left, h, w = (H - rh) / 2, (W - rw) / 2, rh, rw
    elif strategy == "random":
        top, left = float(rng.integers(0, int(H - rh) + 1)), float(rng.integers(0, int(W - rw) + 1))
        h, w = rh, rw
    elif strategy == "random_resized":
        top, left, h, w = _random_resized_region(H, W, rng, scale, ratio)
    else:  # none
        top, left, h, w = 0.0, 0.0, H, W
    if strategy == "center" and th == tw:
        out = center_crop_resize(image, th)
    else:
        out = _resize_region(image, (left, top, left + w, top + h), (tw, th))
    flip = int(flip_prob > 0 and rng.random() < flip_prob)
    if flip:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    meta = CropMetadata((H, W), (float(top), float(left)), (float(h), float(w)), (th, tw), W / H, flip)
    return out, meta


def nearest_bucket(height: int, width: int, buckets: list[tuple[int, int]]) -> int:
    """Index of the bucket (h, w) whose aspect ratio is closest to the image's, in log space (so 1:2 and
    2:1 are equally far from 1:1); ties go to the first bucket listed."""
    aspect = math.log(width / height)
    return min(range(len(buckets)), key=lambda i: abs(math.log(buckets[i][1] / buckets[i][0]) - aspect))


class BadImage(ValueError):
    """An image that cannot be used; the message is the reason recorded in the skip counts."""


def load_image(source, channels: int | None = 3, min_size: int = 0) -> tuple[Image.Image, str | None]:
    """Decode a file path or bytes into an 'RGB' (channels 3) or 'L' (channels 1) image. Returns the image and
    the source mode when it had to be converted (grayscale, CMYK, palette, alpha), else None (channels None: keep
    the file's mode). Raises BadImage for corrupt, truncated or too-small images."""
    import io

    try:
        image = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
        image.load()  # decodes fully: truncated files fail here, not later in a worker
    except Exception as e:  # PIL raises many types for bad data (UnidentifiedImageError, OSError, SyntaxError...)
        reason = "truncated" if "truncated" in str(e).lower() else "corrupt"
        raise BadImage(f"{reason} ({type(e).__name__})") from None
    if min(image.size) < max(min_size, 1):
        raise BadImage(f"too small ({image.size[1]}x{image.size[0]} < {min_size})")
    source_mode = image.mode
    if image.mode in HIGH_DEPTH_MODES:
        image = to_8bit(image)
    want = {3: "RGB", 1: "L", None: image.mode}[channels]
    if image.mode == want:
        return image, None if source_mode == want else source_mode
    mode = image.mode
    if want == "RGB" and (mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info)):
        rgba = image.convert("RGBA")  # transparent pixels become white, not black
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return image.convert(want), source_mode


# PIL's modes for 16-bit (and 32-bit integer) grayscale; PIL's own convert("L") clips them at 255 (white).
HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_8bit(image: Image.Image) -> Image.Image:
    """A 16-bit grayscale image (PNG/TIFF, PIL mode I;16* or I) as 8-bit 'L', scaled by 255/65535."""
    values = np.asarray(image, dtype=np.float64)
    return Image.fromarray(np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8))


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
