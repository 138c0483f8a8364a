"""Data pipeline throughput: reading the latent cache with the training loader, and `ldmkit encode`.

    python benchmarks/data_throughput.py                      # cache read (32x32x4 latents) + encode (tiny VAE)
    python benchmarks/data_throughput.py --encode-vae sd --encode-resolution 256 --encode-images 32

Cache read: a cache of --cache-images samples of C x S x S latents is written in the real format (fp16, both
flips, as `ldmkit encode` writes it), then read through the training path (LatentCache + StreamBatches in a
DataLoader, per-sample seeded flips) for --read-images images at --batch per step, with 0 and 2 workers.
Encode: `encode_dataset` on --encode-images random JPEGs in class folders (decode, centre crop, VAE
posterior of the image and its mirror image, write) with `none` (identity: the pipeline alone), a tiny
random VAE (8 channels, full resolution convolutions), or `sd` (the SD VAE architecture with random weights:
the cost of the real model).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def write_synthetic_cache(folder: Path, count: int, channels: int, size: int, part_size: int = 10_000) -> None:
    from ldmkit.data.cache import CACHE_FORMAT
    from ldmkit.training.encode import UnitWriter

    folder.mkdir(parents=True, exist_ok=True)
    parts, rng = [], torch.Generator().manual_seed(0)
    for u, lo in enumerate(range(0, count, part_size)):
        n = min(part_size, count - lo)
        writer = UnitWriter(folder, f"{u:06d}", torch.float16)
        control = {
            "original_size": torch.full((n, 2), 256.0),
            "crop_top_left": torch.zeros(n, 2),
            "crop_size": torch.full((n, 2), 256.0),
            "target_size": torch.full((n, 2), 256.0),
            "aspect_ratio": torch.ones(n, 1),
            "flip": torch.zeros(n, 1),
        }
        writer.add(
            0,
            {
                "latent_mean": torch.randn(n, 2, channels, size, size, generator=rng),
                "latent_std": torch.rand(n, 2, channels, size, size, generator=rng),
                "label": torch.randint(0, 1000, (n,), generator=rng),
                **{f"control.{k}": v for k, v in control.items()},
            },
            [f"s{lo + i}" for i in range(n)],
        )
        parts += writer.finish([], {}, "synthetic")["parts"]
    manifest = {"format": CACHE_FORMAT, "count": count, "parts": parts, "latent_shape": [channels, size, size]}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def bench_cache_read(folder: Path, images: int, batch: int, workers: int, hflip: bool = True) -> float:
    from ldmkit.data.cache import LatentCache
    from ldmkit.data.loader import StreamBatches, _collated

    cache = LatentCache(folder, hflip=hflip)
    sampler = StreamBatches(len(cache), 0, 0, images, batch, batch, 1, 1, 0)
    loader = torch.utils.data.DataLoader(cache, batch_sampler=sampler, collate_fn=_collated, num_workers=workers)
    it = iter(loader)
    first = next(it)  # worker start-up is not throughput
    seen, t0 = 0, time.perf_counter()
    for b in it:
        seen += len(b["label"])
        x = b["latent_mean"].float() + b["latent_std"].float()  # what the loop does with a batch (on the CPU here)
    elapsed = time.perf_counter() - t0
    assert first["latent_mean"].shape[1:] == x.shape[1:]
    return seen / elapsed


def bench_encode(root: Path, images: int, resolution: int, vae_kind: str, batch: int, workers: int) -> float:
    from diffusers import AutoencoderKL
    from PIL import Image

    from ldmkit.config import load_config
    from ldmkit.training.encode import encode_dataset

    rng = np.random.default_rng(0)
    data = root / "images"
    for i in range(images):
        folder = data / f"n{i % 4:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        h, w = int(resolution * rng.uniform(1.0, 1.5)), int(resolution * rng.uniform(1.0, 1.5))
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.jpg", quality=90)
    if vae_kind == "none":  # identity autoencoder: the pipeline alone (decode, crop, convert, write)
        vae = None
    elif vae_kind == "tiny":
        vae = AutoencoderKL(
            block_out_channels=(8, 8, 8, 8),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=1,
            norm_num_groups=4,
            latent_channels=4,
        )
    else:  # the SD VAE architecture (AutoencoderKL's defaults are SD's: 128-256-512-512, 2 layers per block)
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
            latent_channels=4,
        )
    autoencoder = ["autoencoder.name=identity"]
    if vae is not None:
        vae.save_pretrained(root / "vae")
        autoencoder = ["autoencoder.name=kl", f"autoencoder.path={root / 'vae'}", "autoencoder.layout=sd"]
    cfg = load_config(
        overrides=[
            "data.name=image_folder",
            f"data.path={data}",
            "data.channels=3",
            f"data.resolution={resolution}",
            f"data.cache={root / 'cache'}",
            f"data.num_workers={workers}",
            "data.encode_chunk=1000",
            "train.device=auto",
            *autoencoder,
        ]
    )
    t0 = time.perf_counter()
    encode_dataset(cfg, batch_size=batch, log=lambda *a: None)
    return images / (time.perf_counter() - t0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache-images", type=int, default=50_000)
    p.add_argument("--read-images", type=int, default=200_000)
    p.add_argument("--latent-size", type=int, default=32)
    p.add_argument("--channels", type=int, default=4)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--encode-images", type=int, default=512)
    p.add_argument("--encode-resolution", type=int, default=256)
    p.add_argument(
        "--encode-vae", choices=["none", "tiny", "sd"], default="tiny", help="none: identity (pipeline cost only)"
    )
    p.add_argument("--encode-batch", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"cuda: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_synthetic_cache(tmp / "cache", args.cache_images, args.channels, args.latent_size)
        size_mb = sum(f.stat().st_size for f in (tmp / "cache").glob("*.safetensors")) / 2**20
        print(
            f"cache: {args.cache_images:,} samples of {args.channels}x{args.latent_size}x{args.latent_size} fp16 "
            "latents "
            f"(mean and std, both flips): {size_mb:.0f} MiB"
        )
        for workers in sorted({0, args.workers}):
            speed = bench_cache_read(tmp / "cache", args.read_images, args.batch, workers)
            print(f"cache read, batch {args.batch}, {workers} worker(s): {speed:,.0f} img/s")
        if args.encode_images:
            speed = bench_encode(
                tmp / "encode",
                args.encode_images,
                args.encode_resolution,
                args.encode_vae,
                args.encode_batch,
                args.workers,
            )
            print(
                f"encode {args.encode_images} JPEGs at {args.encode_resolution}px, {args.encode_vae} VAE (random "
                "weights), "
                f"{args.workers} decode worker(s): {speed:,.1f} img/s"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
