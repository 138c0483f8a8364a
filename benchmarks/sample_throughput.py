"""Sampling throughput per backbone and sampler: images/s and model evaluations/s through the real generation path
(`ldmkit.eval.generate.generate`: per-sample seeds, classifier-free guidance, the configured sampler), and what a
50,000-image evaluation would take at that rate.

    python benchmarks/sample_throughput.py                    # CPU: every backbone's tiny preset, 16x16x4 latents
    python benchmarks/sample_throughput.py --presets DiT-XL/2 --latent-size 32 --device cuda --precision bf16 \\
        --compile --batch 125 --images 500 --samplers ddpm:250,dpmpp:25

Models are untrained (speed does not depend on the weights) and class-conditional; latents are decoded by the
identity autoencoder, so the figures are the denoiser's alone (a VAE decode adds a fixed cost per image). Prints
one JSON line per (preset, sampler).
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from ldmkit.autoencoders import IdentityAutoencoder
from ldmkit.config import load_config
from ldmkit.diffusion.objectives import build_objective
from ldmkit.eval.generate import generate
from ldmkit.models.registry import backbone_of_preset, build_model

TINY = "DiT-tiny/2,mDT-v2-tiny/2,PixArt-alpha-tiny/2,mmDiT-tiny/2,UNet-tiny"
SAMPLERS = "ddpm:250,ddim:50,dpmpp:25,euler:28,heun:14"  # sampler:steps; each runs on the objective it fits
FLOW_SAMPLERS = ("euler", "heun")


class Counted(torch.nn.Module):
    """The denoiser, counting its calls and the images each call processes."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls, self.rows = model, 0, 0

    def forward(self, x, t, cond, **kwargs):
        self.calls += 1
        self.rows += len(x)
        return self.model(x, t, cond, **kwargs)


def measure(preset: str, sampler: str, steps: int, args) -> dict:
    objective = "flow" if sampler in FLOW_SAMPLERS else "ddpm"
    cfg = load_config(
        overrides=[
            f"model.name={backbone_of_preset(preset)}",
            f"model.preset={preset}",
            f"model.input_size={args.latent_size}",
            "model.in_channels=4",
            "model.num_classes=1000",
            f"diffusion.objective={objective}",
            f"model.learn_sigma={'true' if objective == 'ddpm' else 'false'}",
            f"sample.sampler={sampler}",
            f"sample.steps={steps}",
            f"sample.guidance_scale={args.guidance}",
            f"sample.precision={args.precision}",
        ]
    )
    device = torch.device(args.device)
    denoiser = build_model(cfg.model).to(device).eval()
    if args.compile:
        denoiser = torch.compile(denoiser)
    model = Counted(denoiser)
    labels = torch.arange(args.images) % 1000
    run = (
        lambda n, batch: generate(  # noqa: E731
            model, cfg, build_objective(cfg), IdentityAutoencoder(4), labels[:n], list(range(n)), device, batch=batch
        )
    )
    run(min(args.batch, args.images), args.batch)  # warm-up (and compilation)
    model.calls = model.rows = 0
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    run(args.images, args.batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    images_per_s = args.images / seconds
    return {
        "preset": preset,
        "sampler": sampler,
        "steps": steps,
        "guidance": args.guidance,
        "latent": f"4x{args.latent_size}x{args.latent_size}",
        "precision": args.precision,
        "compile": args.compile,
        "batch": args.batch,
        "images_per_s": round(images_per_s, 3),
        "model_evaluations_per_image": round(model.rows / args.images, 1),  # guidance doubles each call's rows
        "model_evaluations_per_s": round(model.rows / seconds, 1),
        "hours_for_50k_images": round(50_000 / images_per_s / 3600, 2),
        "device_name": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default=TINY, help=f"comma-separated presets (default {TINY})")
    p.add_argument("--samplers", default=SAMPLERS, help=f"comma-separated sampler:steps (default {SAMPLERS})")
    p.add_argument("--latent-size", type=int, default=16, help="latent side (32 = 256 px with an 8x VAE)")
    p.add_argument("--images", type=int, default=8, help="images per measurement")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--guidance", type=float, default=1.5)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--compile", action="store_true", help="torch.compile the denoiser (compilation not timed)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    print(json.dumps({"torch": torch.__version__, "machine": platform.machine(), "threads": torch.get_num_threads()}))
    for preset in args.presets.split(","):
        for item in args.samplers.split(","):
            sampler, steps = item.split(":")
            print(json.dumps(measure(preset, sampler, int(steps), args)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
