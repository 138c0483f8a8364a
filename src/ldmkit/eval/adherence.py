"""Control adherence: do samples do what their control values asked? Measured on the images themselves, for
light strokes on a dark background (the digits), beside the semantic drift that `ldmkit probe` reports.

- `original_size`: a small original was upsampled, so it carries less fine detail. `sharpness` is the share of
  the image's variance in its Laplacian (high frequencies); adherence is its rank correlation with the requested
  size over all samples of a sweep (positive: larger requested originals come out sharper).
- `crop_size` / `crop_top_left`: the crop moves and magnifies the content. Each sample's ink bounding box is
  compared with where the requested crop puts the same sample's box at the sweep's first value (IoU), and with
  where it would stay if the crop were ignored.
- `flip`: the mirror test. Each sample is mirrored back and classified: a followed flag gives the asked label
  at flip 1. The probe also reports flip_effect, a pixel comparison of each flip-1 sample with its flip-0 one.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])


def sharpness(images: torch.Tensor) -> torch.Tensor:
    """[N] share of each image's variance in its Laplacian response (grey level, images [N, C, H, W])."""
    grey = images.float().mean(dim=1, keepdim=True)
    lap = F.conv2d(grey, LAPLACIAN.view(1, 1, 3, 3).to(grey), padding=1)[..., 1:-1, 1:-1]
    variance = (grey - grey.mean(dim=(2, 3), keepdim=True)).pow(2).mean(dim=(1, 2, 3))
    return lap.pow(2).mean(dim=(1, 2, 3)) / variance.clamp(min=1e-12)


def ink_box(images: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """[N, 4] (top, left, bottom, right) of the pixels brighter than threshold, in pixels (bottom/right exclusive);
    NaN for an image without ink."""
    ink = images.float().mean(dim=1) > threshold  # [N, H, W]
    boxes = torch.full((len(images), 4), float("nan"))
    for i, mask in enumerate(ink):
        rows, cols = mask.any(dim=1).nonzero().flatten(), mask.any(dim=0).nonzero().flatten()
        if len(rows):
            boxes[i] = torch.tensor([rows[0], cols[0], rows[-1] + 1, cols[-1] + 1], dtype=torch.float32)
    return boxes


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[N] intersection over union of boxes [N, 4] (top, left, bottom, right); NaN where either is missing."""
    top, left = torch.maximum(a[:, 0], b[:, 0]), torch.maximum(a[:, 1], b[:, 1])
    bottom, right = torch.minimum(a[:, 2], b[:, 2]), torch.minimum(a[:, 3], b[:, 3])
    inter = (bottom - top).clamp(min=0) * (right - left).clamp(min=0)
    area = lambda box: (box[:, 2] - box[:, 0]) * (box[:, 3] - box[:, 1])  # noqa: E731
    return inter / (area(a) + area(b) - inter).clamp(min=1e-12)


def cropped_box(box: torch.Tensor, top_left, size, side: int, original) -> torch.Tensor:
    """Where a box of the uncropped image (the whole original (h, w) shown at `side` pixels) lands when the crop
    (top_left, size), in original pixels, is shown at `side` pixels instead: shifted and magnified, clipped to the
    image."""
    (top, left), (h, w), (oh, ow) = top_left, size, original
    in_original = box * torch.tensor([oh / side, ow / side, oh / side, ow / side])
    shifted = (in_original - torch.tensor([top, left, top, left], dtype=torch.float32)) * torch.tensor(
        [side / h, side / w, side / h, side / w]
    )
    return shifted.clamp(0, side)


def rank_correlation(x, y) -> float:
    """Spearman's rho (ties get their mean rank)."""
    from scipy.stats import spearmanr

    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return 0.0  # nothing varies: no relation
    return float(spearmanr(x, y).statistic)


def size_adherence(values: list[tuple[float, float]], images: list[torch.Tensor]) -> dict:
    """`original_size` sweep: mean sharpness per value and its rank correlation with the requested size."""
    per_value = [sharpness(x) for x in images]
    sizes = [v[0] * v[1] for v, s in zip(values, per_value) for _ in range(len(s))]
    return {
        "sharpness": [float(s.mean()) for s in per_value],
        "size_sharpness_correlation": rank_correlation(sizes, torch.cat(per_value).tolist()),
    }


def crop_adherence(crops: list[tuple[tuple[float, float], tuple[float, float]]], original, images) -> dict:
    """Crop sweep (crops: (top_left, size) per value, in original pixels; the first one the whole original): the
    mean IoU of each sample's ink box with where the requested crop puts the first value's box (crop_iou), and
    with the first value's box itself (crop_iou_if_ignored: what a model ignoring the crop would score)."""
    reference, side = ink_box(images[0]), images[0].shape[-1]
    followed, ignored = [], []
    for (top_left, size), x in zip(crops, images):
        box = ink_box(x)
        followed.append(float(box_iou(box, cropped_box(reference, top_left, size, side, original)).nanmean()))
        ignored.append(float(box_iou(box, reference).nanmean()))
    return {"crop_iou": followed, "crop_iou_if_ignored": ignored}


def mirror_agreement(predict, images: list[torch.Tensor], labels: torch.Tensor) -> list[float]:
    """The mirror test of a `flip` sweep: per value, the share of samples that `predict` (images -> labels) labels
    as asked once mirrored back. A followed flag scores high at flip 1 and low at flip 0; an ignored one the same at
    both (symmetric digits score at either)."""
    return [float((predict(x.flip(-1)) == labels).float().mean()) for x in images]
