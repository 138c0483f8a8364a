"""Evaluation throughput: sample generation (per sampler and step count) and feature extraction.

    python benchmarks/eval_throughput.py                       # CPU: DiT-demo/4 on 32x32 digits, Inception + EffNet
    python benchmarks/eval_throughput.py --preset DiT-XL/2 --resolution 256 --latent --device cuda --batch 125

Generation uses an untrained model of the preset (speed does not depend on the weights) through the real path
(`ldmkit.eval.generate.generate`, per-sample seeds, classifier-free guidance). Inception-v3 runs with randomly
initialised weights of the standard layout unless --inception-weights gives the real file (same speed).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from ldmkit.autoencoders import IdentityAutoencoder
from ldmkit.config import load_config
from ldmkit.diffusion.objectives import build_objective
from ldmkit.eval.features import EffNetLite0Features, InceptionV3Features, extract, random_inception_weights
from ldmkit.eval.generate import generate
from ldmkit.models.registry import backbone_of_preset, build_model


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="DiT-demo/4")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument(
        "--latent", action="store_true", help="latents are resolution/8 with 4 channels (else pixels, 1 channel)"
    )
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--images", type=int, default=100, help="images per generation measurement")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--inception-weights")
    p.add_argument(
        "--parts",
        default="generation,features,statistics",
        help="what to measure, comma-separated: generation, features, statistics (the Frechet distance itself)",
    )
    args = p.parse_args(argv)
    parts = set(args.parts.split(","))
    unknown = parts - {"generation", "features", "statistics"}
    if unknown:
        p.error(f"--parts: unknown {sorted(unknown)}")
    device = torch.device(args.device)
    side, channels = (args.resolution // 8, 4) if args.latent else (args.resolution, 1)
    print(
        json.dumps(
            {
                "torch": torch.__version__,
                "machine": platform.machine(),
                "threads": torch.get_num_threads(),
                "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            }
        )
    )
    results = []
    runs = (("flow", "euler", 12), ("flow", "heun", 12), ("ddpm", "ddim", 50), ("ddpm", "ddpm", 250))
    for objective, sampler, steps in runs if "generation" in parts else ():
        cfg = load_config(
            overrides=[
                f"model.name={backbone_of_preset(args.preset)}",
                f"model.preset={args.preset}",
                f"model.input_size={side}",
                f"model.in_channels={channels}",
                "model.num_classes=10",
                f"diffusion.objective={objective}",
                f"model.learn_sigma={'true' if objective == 'ddpm' else 'false'}",
                f"sample.sampler={sampler}",
                f"sample.steps={steps}",
                "sample.guidance_scale=3",
            ]
        )
        model = build_model(cfg.model).to(device).eval()
        n = args.images if steps < 100 else max(args.images // 5, args.batch)
        labels = torch.arange(n) % 10
        generate(
            model,
            cfg,
            build_objective(cfg),
            IdentityAutoencoder(channels),
            labels[: min(4, n)],
            list(range(min(4, n))),
            device,
            batch=4,
        )  # warm-up
        t0 = time.perf_counter()
        generate(
            model,
            cfg,
            build_objective(cfg),
            IdentityAutoencoder(channels),
            labels,
            list(range(n)),
            device,
            batch=args.batch,
        )
        if device.type == "cuda":
            torch.cuda.synchronize()
        speed = n / (time.perf_counter() - t0)
        results.append(
            {
                "what": "generation",
                "preset": args.preset,
                "sampler": sampler,
                "steps": steps,
                "guidance": 3.0,
                "latent": f"{channels}x{side}x{side}",
                "batch": args.batch,
                "images_per_s": round(speed, 2),
            }
        )
        print(json.dumps(results[-1]))
    with tempfile.TemporaryDirectory() as tmp:
        weights = args.inception_weights or random_inception_weights(Path(tmp) / "w.pth")
        extractors = (
            (
                ("InceptionV3 (299x299)", InceptionV3Features(str(weights))),
                ("EffNetLite0 (224x224)", EffNetLite0Features()),
            )
            if "features" in parts
            else ()
        )
        for name, net in extractors:
            net = net.to(device)
            images = torch.rand(args.batch * 2, 3, args.resolution, args.resolution, device=device) * 2 - 1
            extract(net, images[: args.batch], args.batch)  # warm-up
            t0 = time.perf_counter()
            extract(net, images, args.batch)
            if device.type == "cuda":
                torch.cuda.synchronize()
            results.append(
                {
                    "what": "features",
                    "extractor": name,
                    "batch": args.batch,
                    "images_per_s": round(len(images) / (time.perf_counter() - t0), 2),
                }
            )
            print(json.dumps(results[-1]))
    if "statistics" in parts:
        results += frechet_timings()
    return 0


def frechet_timings(dim: int = 2048, reference_count: int = 10_000) -> list[dict]:
    """Seconds of one FID from features: sample statistics and the two D x D eigendecompositions
    (frechet_distance), against frechet_distance_to's (N - 1) x (N - 1) problem for N <= D (the same value)."""
    import numpy as np

    from ldmkit.eval.metrics import feature_statistics, frechet_distance, frechet_distance_to

    rng = np.random.default_rng(0)
    mu, sigma = feature_statistics(rng.normal(size=(reference_count, dim)))
    out = []
    for n in (100, 1000, 2000):
        features = rng.normal(size=(n, dim)) + 0.1
        timing = {"what": "frechet distance", "samples": n, "dimensions": dim}
        for route, fd in (
            ("D x D", lambda: frechet_distance(*feature_statistics(features), mu, sigma)),
            ("N x N", lambda: frechet_distance_to(features, mu, sigma)),
        ):
            t0 = time.perf_counter()
            timing[f"value ({route})"] = round(fd(), 6)
            timing[f"seconds ({route})"] = round(time.perf_counter() - t0, 3)
        out.append(timing)
        print(json.dumps(timing))
    return out


if __name__ == "__main__":
    sys.exit(main())
