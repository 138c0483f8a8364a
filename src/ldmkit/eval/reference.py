"""Reference statistics of real images, computed once and cached as .npz: the features themselves (for KID,
precision/recall, density/coverage), their float64 mean and covariance (for Frechet distances), the feature
extractor's name, the image count and the source. ADM's reference batches (`VIRTUAL_imagenet256_labeled.npz`:
arr_0 images, mu/sigma of TF Inception-v3 pool3) are read as they are.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..data.datasets import DataError
from .metrics import feature_statistics

REFERENCE_FORMAT = "ldmkit-reference/1"


def iterate_source_images(source: str, resolution: int, limit: int, batch: int = 100, allow_shell: bool = False):
    """[B, 3, R, R] tensors in [-1, 1] from an image folder (recursively, e.g. an ImageNet split), a shard set
    (brace pattern / .tar / URL list) or ADM's .npz (arr_0), centre-cropped to the resolution."""
    from ..data.datasets import IMAGE_SUFFIXES, pil_to_tensor
    from ..data.transforms import BadImage, center_crop_resize, load_image

    path = Path(str(source)).expanduser()
    if path.suffix == ".npz":
        arr = np.load(path)["arr_0"][:limit]
        for lo in range(0, len(arr), batch):
            yield torch.from_numpy(arr[lo : lo + batch]).permute(0, 3, 1, 2).float() / 127.5 - 1
        return
    if path.is_dir():
        sources = (f for f in sorted(path.rglob("*")) if f.suffix.lower() in IMAGE_SUFFIXES)
    else:
        from ..data.shards import IMAGE_KEYS, expand_urls, tar_records

        sources = (
            next(r[k] for k in IMAGE_KEYS if k in r)
            for url in expand_urls(str(source), allow_shell)
            for r in tar_records(url)
            if any(k in r for k in IMAGE_KEYS)
        )
    images, count = [], 0
    for item in sources:
        if count >= limit:
            break
        try:
            image, _ = load_image(item, 3)
        except BadImage:
            continue
        images.append(pil_to_tensor(center_crop_resize(image, resolution)))
        count += 1
        if len(images) == batch:
            yield torch.stack(images)
            images = []
    if images:
        yield torch.stack(images)
    if count == 0:
        raise DataError(f"no readable images in reference source {source}")


@torch.no_grad()
def features_of(batches, extractor) -> np.ndarray:
    return torch.cat([extractor(b).double().cpu() for b in batches]).numpy()


def compute_reference(
    source: str, extractor, resolution: int, limit: int = 50_000, batch: int = 100, allow_shell: bool = False
) -> dict:
    features = features_of(iterate_source_images(source, resolution, limit, batch, allow_shell), extractor)
    return reference_from_features(features, extractor.name, str(source), resolution)


def reference_from_features(features: np.ndarray, extractor: str, source: str, resolution: int) -> dict:
    """Reference statistics (float64 mean and covariance, the features kept for KID / P-R / D-C) of real images'
    features, in the layout save_reference writes and inception_metrics reads."""
    mu, sigma = feature_statistics(features)
    return {
        "features": features.astype(np.float32),
        "mu": mu,
        "sigma": sigma,
        "extractor": extractor,
        "count": len(features),
        "source": source,
        "resolution": resolution,
    }


def save_reference(ref: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {k: ref[k] for k in ("extractor", "count", "source", "resolution")}
    np.savez(
        path,
        features=ref["features"],
        mu=ref["mu"],
        sigma=ref["sigma"],
        meta=json.dumps(dict(meta, format=REFERENCE_FORMAT)),
    )
    return path


def load_reference(path: str | Path) -> dict:
    """An ldmkit reference .npz, or ADM's reference batch (mu/sigma of Inception pool3 + arr_0 images)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(
            f"reference statistics not found: {path} (make them with 'ldmkit reference SOURCE --out {path.name}')"
        )
    data = np.load(path)
    if "meta" in data:
        meta = json.loads(str(data["meta"]))
        return dict(meta, features=data["features"].astype(np.float64), mu=data["mu"], sigma=data["sigma"])
    if "mu" in data and "sigma" in data:  # ADM's evaluation-suite layout
        return {
            "extractor": "InceptionV3",
            "mu": data["mu"].astype(np.float64),
            "sigma": data["sigma"].astype(np.float64),
            "features": None,
            "count": int(len(data["arr_0"])) if "arr_0" in data else None,
            "source": f"ADM reference batch {path.name}",
            "images": path if "arr_0" in data else None,
            "resolution": int(data["arr_0"].shape[1]) if "arr_0" in data else None,
        }
    raise DataError(
        f"{path} is neither an ldmkit reference (features, mu, sigma, meta) nor ADM's reference batch (arr_0, mu, "
        "sigma)"
    )
