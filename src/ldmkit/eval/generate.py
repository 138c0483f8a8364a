"""Generation: class- or text-conditional samples with one seed per sample index, decoded to images."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..conditioning.build import build_text_encoder, check_sampling_control, prompts_for_labels, sampling_cond
from ..config import ConfigError, check_sampler, check_sampling
from ..diffusion import samplers
from ..diffusion.guidance import Guidance, guided


def sample_seed(base_seed: int, index: int) -> int:
    """The seed of sample `index`: the same image comes out whatever the batch or process count."""
    return (base_seed * 1_000_003 + index) % (2**63 - 1)


@torch.no_grad()
def generate(
    model,
    cfg,
    objective,
    autoencoder,
    labels: torch.Tensor,
    indices: list[int],
    device,
    batch: int = 64,
    guidance_scale: float | None = None,
    sampler: str | None = None,
    steps: int | None = None,
    seed: int | None = None,
    prompts: list[str] | None = None,
    text_encoder=None,
    progress: bool = False,
    negative_labels: torch.Tensor | None = None,
    negative_prompts: list[str] | None = None,
) -> torch.Tensor:
    """Images [N, C, H, W] in [-1, 1] for class `labels[i]` (text-conditional models: for prompts[i], by
    default sample.class_prompts[labels[i]]) drawn with the seed of sample `indices[i]`. The denoiser runs under
    bf16 autocast when sample.precision is bf16; progress shows a bar with images/s on stderr. Guidance follows
    sample.* (diffusion.guidance.Guidance); negative labels or prompts (one per sample; default
    sample.negative_class / negative_prompt) take the place of the null condition."""
    if cfg.model.conditioning != "class":
        prompts = prompts or prompts_for_labels(cfg, labels)
        text_encoder = text_encoder or build_text_encoder(cfg, device)
    check_sampling_control(cfg)
    check_sampling(cfg)
    model.eval()
    scale = cfg.sample.guidance_scale if guidance_scale is None else guidance_scale
    if not math.isfinite(scale) or not math.isfinite(cfg.sample.control_guidance_scale):
        raise ConfigError(
            f"the guidance scale must be a finite number, got {scale} (control: {cfg.sample.control_guidance_scale})"
        )
    seed = cfg.sample.seed if seed is None else seed
    shape = (cfg.model.in_channels, cfg.model.input_size, cfg.model.input_size)
    # learned-sigma outputs: guide the noise prediction, keep the conditional variance
    guidance = Guidance.from_config(
        cfg.sample, objective, scale, steps, channels=cfg.model.in_channels if cfg.model.learn_sigma else None
    )
    if negative_labels is None and cfg.sample.negative_class is not None:
        negative_labels = torch.full_like(labels, cfg.sample.negative_class)
    if negative_prompts is None and cfg.sample.negative_prompt is not None:
        negative_prompts = [cfg.sample.negative_prompt] * len(labels)
    check_sampler(cfg.diffusion.objective, sampler or cfg.sample.sampler, "--sampler")  # before any work
    device = torch.device(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.sample.precision == "bf16")
    bar = tqdm(total=len(indices), unit="img", desc="sampling", disable=not progress, leave=False)
    out = []
    try:
        for lo in range(0, len(indices), batch):
            idx = indices[lo : lo + batch]
            gens = [torch.Generator().manual_seed(sample_seed(seed, i)) for i in idx]
            cond = sampling_cond(
                cfg, labels[lo : lo + len(idx)], prompts[lo : lo + len(idx)] if prompts else None, text_encoder, device
            )
            negative = None
            if negative_labels is not None or negative_prompts is not None:
                negative = sampling_cond(
                    cfg,
                    None if negative_labels is None else negative_labels[lo : lo + len(idx)],
                    None if negative_prompts is None else negative_prompts[lo : lo + len(idx)],
                    text_encoder,
                    device,
                )
            fn = guided(model, cond, guidance, negative)
            with autocast:
                z = samplers.sample(fn, cfg, objective, shape, gens, device, steps=steps, sampler=sampler)
            out.append(autoencoder.decode(z.float()).clamp(-1, 1).cpu())
            bar.update(len(idx))
    finally:
        bar.close()
    return torch.cat(out)


def sampling_extras(cfg) -> dict:
    """The sample.* settings beyond sampler, steps, scale and seed that shape the images, where they differ from
    the defaults: guidance schedule, interval, channels, skip layers, control scale, negatives, the solver's
    order and noise levels. Metrics files and reports record them; sample-set folders are named by them."""
    s = cfg.sample
    out = {k: v for k, v in Guidance.from_config(s).describe().items() if k != "scale"}
    if s.sampler == "dpmpp":
        out["solver_order"] = s.solver_order
    if s.sampler == "ddim" and s.eta:
        out["eta"] = s.eta
    if s.sigma_schedule != "uniform" and cfg.diffusion.objective == "flow":
        out["sigma_schedule"] = s.sigma_schedule
    for key in ("negative_class", "negative_prompt"):
        if getattr(s, key) is not None:
            out[key] = getattr(s, key)
    return out


def grid_labels(
    cfg, num_classes: int, classes: list[int] | None = None, per_class: int | None = None
) -> tuple[torch.Tensor, int]:
    """Labels for a grid with one row per class: (labels [rows * per_class], per_class). Defaults: the
    config's sample.classes (else the first 10 classes) and sample.per_class."""
    classes = classes or cfg.sample.classes or list(range(min(num_classes, 10)))
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"class {bad[0]} is out of range 0..{num_classes - 1}")
    per = per_class or cfg.sample.per_class
    return torch.tensor([c for c in classes for _ in range(per)]), per


def generate_split(d, model, cfg, objective, autoencoder, labels: torch.Tensor, prompts=None, **kwargs):
    """generate() for all of `labels`, split over the processes of d (ldmkit.distributed.Dist): each process draws
    samples rank, rank + N, ... (every sample has its own seed, so the split changes no image), and process 0
    gets all of them in order; the others get None."""
    from ..distributed import gather_to_main

    mine = list(range(d.rank, len(labels), d.world_size))
    prompts = [prompts[i] for i in mine] if prompts else None
    images = generate(model, cfg, objective, autoencoder, labels[mine], mine, d.device, prompts=prompts, **kwargs)
    return gather_to_main(images.cpu(), mine, d)


def save_grid(images: torch.Tensor, path: str | Path, nrow: int) -> Path:
    """Images in [-1, 1] -> one PNG, nrow images per row."""
    from torchvision.utils import save_image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image((images + 1) / 2, path, nrow=nrow, padding=1, pad_value=1.0)
    return path


def save_images(
    images: torch.Tensor, folder: str | Path, indices: list[int], labels: torch.Tensor | None = None
) -> None:
    """One PNG per sample, named by its index (and class), so folders from different processes merge."""
    from torchvision.utils import save_image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for k, (img, i) in enumerate(zip(images, indices)):
        suffix = f"_class{int(labels[k])}" if labels is not None else ""
        save_image((img + 1) / 2, folder / f"{i:06d}{suffix}.png")
