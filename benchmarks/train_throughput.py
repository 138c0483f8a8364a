"""Training throughput of a backbone preset: prints one JSON line (images/s, step time, peak memory,
MFU from analytic FLOPs). Runs the same forward/backward/optimizer step as ldmkit's training loop
(DDPM hybrid loss or flow loss, AdamW as train.optimizer_impl builds it, EMA update) on random latents, on CPU or GPU.

    python benchmarks/train_throughput.py --preset DiT-XL/2 --resolution 256 --batch 256 --precision bf16 --compile
    python benchmarks/train_throughput.py --preset DiT-S/2 --resolution 32 --latent-channels 4 --batch 32 --device cpu
    python benchmarks/train_throughput.py --preset mmDiT-S/2 --resolution 256 --batch 8 --objective flow --device cpu
Every backbone's presets work (DiT, PixArt-alpha, mmDiT, UNet, mDT-v2), class-conditional.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time

import torch

from ldmkit.conditioning.cond import Cond
from ldmkit.config import load_config
from ldmkit.diffusion.objectives import build_objective
from ldmkit.models.registry import backbone_of_preset, build_model, count_parameters, flops_per_image
from ldmkit.training.optim import build_optimizer, optimizer_impl
from ldmkit.training.parallel import compile_blocks

# Dense bf16 peak (TFLOP/s) for MFU; fp32 uses TF32 tensor cores on these GPUs.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="DiT-S/2")
    p.add_argument(
        "--resolution", type=int, default=256, help="image resolution; latents are resolution/8 unless --pixel"
    )
    p.add_argument("--pixel", action="store_true", help="pixel space (latent side = resolution)")
    p.add_argument("--latent-channels", type=int, default=4)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=10, help="timed steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--objective", choices=["ddpm", "flow"], default="ddpm")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--optimizer-impl",
        choices=["auto", "fused", "foreach", "for_loop"],
        default="auto",
        help="AdamW's step (train.optimizer_impl): auto is fused on GPU, tensor by tensor (for_loop) on CPU",
    )
    args = p.parse_args()

    side = args.resolution if args.pixel else args.resolution // 8
    overrides = [
        f"model.name={backbone_of_preset(args.preset)}",
        f"model.preset={args.preset}",
        f"model.input_size={side}",
        f"model.in_channels={args.latent_channels}",
        f"diffusion.objective={args.objective}",
        f"model.learn_sigma={'true' if args.objective == 'ddpm' else 'false'}",
        f"sample.sampler={'ddpm' if args.objective == 'ddpm' else 'euler'}",
        f"train.optimizer_impl={args.optimizer_impl}",
    ]
    cfg = load_config(overrides=overrides)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model = build_model(cfg.model).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    if args.compile:
        compile_blocks(model)
    opt = build_optimizer(model.parameters(), cfg.train, device.type)
    objective = build_objective(cfg)
    gen = torch.Generator(device).manual_seed(0)
    B = args.batch
    x0 = torch.randn(B, args.latent_channels, side, side, device=device)
    cond = Cond(
        class_labels=torch.randint(0, 1000, (B,), device=device),
        drop_semantic=torch.zeros(B, dtype=torch.bool, device=device),
    )

    def step():
        t = objective.sample_time(B, gen, device)
        noise = torch.randn(x0.shape, generator=gen, device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            loss = objective.loss(model, x0, cond, t, noise)["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1e-4)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    dt = (time.perf_counter() - t0) / args.steps
    flops = 3 * flops_per_image(model)  # forward + backward
    images_per_s = B / dt
    result = {
        "preset": args.preset,
        "resolution": args.resolution,
        "tokens": (side // model.patch_size) ** 2 if hasattr(model, "patch_size") else None,
        "batch": B,
        "precision": args.precision,
        "compile": args.compile,
        "optimizer_impl": optimizer_impl(cfg.train, device.type),
        "objective": args.objective,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "params_m": round(count_parameters(model) / 1e6, 2),
        "images_per_s": round(images_per_s, 2),
        "step_time_s": round(dt, 4),
        "train_gflops_per_image": round(flops / 1e9, 3),
        "achieved_tflops": round(images_per_s * flops / 1e12, 3),
        "torch": torch.__version__,
    }
    if device.type == "cuda":
        result["peak_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
        if peak:
            result["mfu"] = round(result["achieved_tflops"] / peak, 4)
    else:
        import resource

        result["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
