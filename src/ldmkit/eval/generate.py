"""Generation: class- or text-conditional samples with one seed per sample index, decoded to images."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..conditioning.build import build_text_encoder, check_sampling_control, prompts_for_labels, sampling_cond
from ..config import ConfigError, check_sampler
from ..diffusion import samplers
from ..diffusion.guidance import guided


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
    bf16 autocast when sample.precision is bf16; progress shows a bar with images/s on stderr. Negative labels or
    prompts (one per sample) take the place of the null condition in classifier-free guidance."""
    if cfg.model.conditioning != "class":
        prompts = prompts or prompts_for_labels(cfg, labels)
        text_encoder = text_encoder or build_text_encoder(cfg, device)
    check_sampling_control(cfg)
    model.eval()
    scale = cfg.sample.guidance_scale if guidance_scale is None else guidance_scale
    if not math.isfinite(scale) or not math.isfinite(cfg.sample.control_guidance_scale):
        raise ConfigError(
            f"the guidance scale must be a finite number, got {scale} (control: {cfg.sample.control_guidance_scale})"
        )
    seed = cfg.sample.seed if seed is None else seed
    shape = (cfg.model.in_channels, cfg.model.input_size, cfg.model.input_size)
    guided_channels = cfg.model.in_channels if cfg.model.learn_sigma else None
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
            control_scale = cfg.sample.control_guidance_scale
            fn = guided(model, cond, scale, guided_channels, control_scale=control_scale, negative=negative)
            with autocast:
                z = samplers.sample(fn, cfg, objective, shape, gens, device, steps=steps, sampler=sampler)
            out.append(autoencoder.decode(z.float()).clamp(-1, 1).cpu())
            bar.update(len(idx))
    finally:
        bar.close()
    return torch.cat(out)


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
