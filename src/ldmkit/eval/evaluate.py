"""Evaluation of a run or a folder of images with the metrics available offline:
digit-classifier agreement (MNIST runs) and FD-EffNetLite0 against held-out or reference real images."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from PIL import Image

from ..autoencoders import build_autoencoder
from ..config import RunConfig, build, validate
from ..data.datasets import IMAGE_SUFFIXES, DataError, build_dataset, pil_to_tensor
from ..diffusion.objectives import build_objective
from ..models.registry import build_model
from ..train.state import CheckpointError, latest_checkpoint, load_checkpoint, load_weights
from .generate import generate


def load_generator(path: str | Path, use_ema: bool = True, device="cpu"):
    """(cfg, model, objective, autoencoder, run_dir) from a run folder (newest checkpoint) or a checkpoint file."""
    path = Path(path)
    if path.is_dir():
        ckpt = latest_checkpoint(path)
        if ckpt is None:
            raise CheckpointError(f"no checkpoint in run folder {path} (expected {path}/checkpoints/ckpt-*.pt)")
        run_dir = path
    else:
        ckpt, run_dir = path, (path.parent.parent if path.parent.name == "checkpoints" else None)
    state = load_checkpoint(ckpt)
    if "config" not in state:
        raise CheckpointError(f"{ckpt} is not an ldmkit checkpoint (no config); import foreign weights with 'ldmkit convert'")
    cfg = build(RunConfig, state["config"])
    validate(cfg)
    model = build_model(cfg.model)
    load_weights(model, state["ema" if use_ema else "model"], f"checkpoint {ckpt}")
    model.to(device).eval()
    autoencoder = build_autoencoder(cfg.autoencoder, cfg.data.channels).to(device)
    return cfg, model, build_objective(cfg), autoencoder, run_dir


def read_image_folder(folder: str | Path, channels: int, limit: int | None = None, size: int | None = None) -> torch.Tensor:
    """Every readable image below folder as [N, C, H, W] in [-1, 1]; unreadable files are skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    images = []
    for f in files:
        try:
            with Image.open(f) as im:
                im = im.convert("L" if channels == 1 else "RGB")
                if size and im.size != (size, size):
                    im = im.resize((size, size), Image.BICUBIC)
                images.append(pil_to_tensor(im))
        except Exception:  # any decoder error: the file is skipped
            continue
    if len(images) < 2:
        raise DataError(f"image folder {folder} holds fewer than 2 readable images")
    return torch.stack(images)


def digit_metrics(images: torch.Tensor, labels: torch.Tensor, classifier) -> dict:
    from .digits import predict

    pred = predict(classifier, images)
    per_class = {int(c): float((pred[labels == c] == c).float().mean()) for c in labels.unique()}
    return {"class_agreement": float((pred == labels).float().mean()), "class_agreement_per_class": per_class}


def fd_effnet(images: torch.Tensor, reference: torch.Tensor, batch: int = 100) -> float:
    from .features import EffNetLite0Features, extract
    from .metrics import frechet_distance_of

    net = EffNetLite0Features()
    return frechet_distance_of(extract(net, images, batch).numpy(), extract(net, reference, batch).numpy())


def digit_data(cfg):
    """The MNIST DataConfig when the run is evaluated on the embedded digits (data.name mnist, or eval.digits
    for digits read otherwise, e.g. the captioned shards), else None."""
    from ..config import DataConfig

    if cfg.data.name == "mnist" or cfg.eval.digits:
        return DataConfig(name="mnist", resolution=cfg.data.resolution, channels=1, held_out=cfg.data.held_out)
    return None


def evaluate_run(path, num_images: int | None = None, guidance_scale: float | None = None, steps: int | None = None,
                 sampler: str | None = None, seed: int | None = None, classifier_path: str | Path | None = None,
                 reference: str | Path | None = None, fd: bool | None = None, device="cpu", log=print,
                 eval_cfg=None) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Generate class-balanced samples from a run and compute its metrics. Returns (metrics, images, labels).
    Evaluation settings come from the run's config unless eval_cfg (an EvalConfig) is given."""
    cfg, model, objective, autoencoder, run_dir = load_generator(path, device=device)
    if eval_cfg is not None:
        cfg.eval = eval_cfg
    n = num_images or cfg.eval.num_images
    digits = digit_data(cfg)
    classes = cfg.model.num_classes if digits is None else 10
    labels = torch.arange(n) % classes
    t0 = time.time()
    images = generate(model, cfg, objective, autoencoder, labels, list(range(n)), device, batch=cfg.eval.batch,
                      guidance_scale=guidance_scale, sampler=sampler, steps=steps, seed=seed)
    metrics = {"num_images": n, "guidance_scale": cfg.sample.guidance_scale if guidance_scale is None else guidance_scale,
               "sampler": sampler or cfg.sample.sampler, "steps": steps or cfg.sample.steps,
               "seed": cfg.sample.seed if seed is None else seed, "generation_seconds": round(time.time() - t0, 1)}
    log(f"generated {n} images in {metrics['generation_seconds']} s")
    if digits is not None and cfg.eval.classifier:
        from .digits import load_or_train_classifier

        clf_path = Path(classifier_path or (Path(run_dir or ".") / "digit_classifier.pt"))
        classifier, clf_acc = load_or_train_classifier(digits, clf_path, cfg.eval.classifier_epochs)
        metrics["classifier_heldout_accuracy"] = clf_acc
        metrics.update(digit_metrics(images, labels, classifier))
        log(f"digit classifier: held-out accuracy {clf_acc:.4f}; generated digits labelled as conditioned: {metrics['class_agreement']:.4f}")
    if cfg.eval.fd_effnet if fd is None else fd:
        if reference is not None:
            ref = read_image_folder(reference, cfg.data.channels, size=cfg.data.resolution)
            metrics["fd_reference"] = str(reference)
        elif digits is not None:
            ref = build_dataset(digits, "held_out").images
            metrics["fd_reference"] = f"mnist held-out split ({len(ref)} real digits)"
        else:
            ref = None
        if ref is not None:
            t0 = time.time()
            metrics["fd_effnetlite0"] = fd_effnet(images, ref, cfg.eval.batch)
            metrics["fd_reference_count"] = len(ref)
            log(f"FD-EffNetLite0 {metrics['fd_effnetlite0']:.2f} against {metrics['fd_reference']} ({time.time() - t0:.0f} s)")
    return metrics, images, labels


def evaluate_folder(folder, reference=None, channels: int = 1, resolution: int = 32, data_cfg=None, log=print) -> dict:
    """FD-EffNetLite0 of a folder of images against a reference folder (or the MNIST held-out digits)."""
    images = read_image_folder(folder, channels, size=resolution)
    if reference is not None:
        ref, name = read_image_folder(reference, channels, size=resolution), str(reference)
    else:
        from ..config import DataConfig

        data_cfg = data_cfg or DataConfig(resolution=resolution)
        ref = build_dataset(data_cfg, "held_out").images
        name = f"mnist held-out split ({len(ref)} real digits)"
    metrics = {"num_images": len(images), "fd_effnetlite0": fd_effnet(images, ref), "fd_reference": name, "fd_reference_count": len(ref)}
    log(f"FD-EffNetLite0 {metrics['fd_effnetlite0']:.2f} for {len(images)} images against {name}")
    return metrics


def write_metrics(metrics: dict, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(metrics, indent=1))
    return path
