"""Evaluation sample sets on disk: N images with one seed per sample index, written as PNGs (and the ADM
evaluation suite's .npz), by any number of processes, resumable.

The work is cut into fixed global batches (indices [k * batch, (k + 1) * batch)); process r of w draws the
batches k with k % w == r. A batch holds the same samples whatever the process count, so every image is
computed by the same operations on the same inputs: 1 or 64 processes write the same bytes. An image file
is written atomically; a batch whose files all exist is skipped, so a crashed run continues where it stopped.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .generate import generate


def sample_labels(num: int, num_classes: int) -> torch.Tensor:
    """Class-balanced labels: sample i has class i % num_classes."""
    return torch.arange(num) % num_classes


def image_path(folder: Path, index: int) -> Path:
    return folder / "images" / f"{index:06d}.png"


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, C, H, W] in [-1, 1] -> [B, H, W, 3] uint8 (grayscale repeated to RGB, as ADM's suite expects)."""
    x = ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def write_sample_set(
    folder: str | Path,
    model,
    cfg,
    objective,
    autoencoder,
    num: int,
    batch: int,
    device,
    *,
    labels: torch.Tensor,
    prompts: list[str] | None = None,
    guidance_scale=None,
    sampler=None,
    steps=None,
    seed=None,
    rank: int = 0,
    world_size: int = 1,
    text_encoder=None,
    log=print,
) -> int:
    """Generate this process's batches of the sample set into folder/images; returns how many images it wrote."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    written = 0
    for k in range(rank, (num + batch - 1) // batch, world_size):
        indices = list(range(k * batch, min((k + 1) * batch, num)))
        if all(image_path(folder, i).is_file() for i in indices):
            continue  # done before an interruption
        images = generate(
            model,
            cfg,
            objective,
            autoencoder,
            labels[indices],
            indices,
            device,
            batch=len(indices),
            guidance_scale=guidance_scale,
            sampler=sampler,
            steps=steps,
            seed=seed,
            prompts=[prompts[i] for i in indices] if prompts else None,
            text_encoder=text_encoder,
        )
        for i, pixels in zip(indices, to_uint8(images)):
            tmp = image_path(folder, i).with_suffix(".tmp.png")
            Image.fromarray(pixels).save(tmp)
            os.replace(tmp, image_path(folder, i))
        written += len(indices)
        log(f"sample set: images {indices[0]}..{indices[-1]} of {num} written")
    return written


def finish_sample_set(folder: str | Path, num: int, labels: torch.Tensor, info: dict, npz: bool = True) -> dict:
    """Check that all num images exist, write manifest.json and (npz) ADM's samples.npz: arr_0 [N, H, W, 3]
    uint8 and arr_1 the class labels, as guided-diffusion's sample script saves them."""
    folder = Path(folder)
    missing = [i for i in range(num) if not image_path(folder, i).is_file()]
    if missing:
        raise FileNotFoundError(
            f"sample set {folder} lacks {len(missing)} of {num} images (e.g. {image_path(folder, missing[0]).name}); "
            "run the same command again"
        )
    manifest = dict(info, num_images=num, labels="arr_1 of samples.npz" if npz else None)
    if npz:
        arr = np.stack([np.asarray(Image.open(image_path(folder, i)).convert("RGB")) for i in range(num)])
        np.savez(folder / "samples.npz", arr, labels[:num].numpy())
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def read_sample_set(folder: str | Path, num: int, batch: int = 100):
    """Yield the images of a sample set as [B, 3, H, W] tensors in [-1, 1], in index order."""
    folder = Path(folder)
    for lo in range(0, num, batch):
        arr = np.stack(
            [np.asarray(Image.open(image_path(folder, i)).convert("RGB")) for i in range(lo, min(lo + batch, num))]
        )
        yield torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1
