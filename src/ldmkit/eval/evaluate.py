"""Evaluation of a run or a folder of images: the run's sample set (eval/sampleset.py), then digit-classifier
agreement (digit runs), FD-EffNetLite0 (offline), and with Inception-v3 weights FID, KID, precision/recall and
density/coverage against reference statistics (eval/reference.py)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..autoencoders import build_autoencoder
from ..checkpoint import CheckpointError, load_weights, nonfinite_count, run_checkpoint
from ..config import run_config, set_sampling
from ..data.datasets import IMAGE_SUFFIXES, DataError, build_dataset, pil_to_tensor
from ..data.transforms import BadImage, load_image
from ..diffusion.objectives import build_objective
from ..models.registry import build_model
from .features import extract
from .generate import generate, sampling_extras
from .metrics import frechet_distance_of


def load_generator(
    path: str | Path, use_ema: bool = True, device="cpu", config: str | Path | None = None, overrides=None
):
    """(cfg, model, objective, autoencoder, run_dir) from a run folder (newest checkpoint) or a checkpoint file;
    config (a file) replaces the recorded config and overrides (KEY=VALUE) change it."""
    try:
        ckpt, state, run_dir = run_checkpoint(path)
    except CheckpointError as e:
        if "lacks 'config'" not in str(e):
            raise
        raise CheckpointError(
            f"{path} is not an ldmkit checkpoint (no config); import foreign weights with 'ldmkit convert'"
        ) from None
    cfg = run_config(state["config"], config, overrides)
    model = build_model(cfg.model, cfg.conditioning)
    weights = state["ema" if use_ema else "model"]
    bad = int(nonfinite_count(weights.values()))
    if bad:
        raise CheckpointError(
            f"checkpoint {ckpt} holds {bad:,} non-finite {'EMA ' if use_ema else ''}weights: it cannot sample "
            "(the run diverged before it was written)"
        )
    load_weights(model, weights, f"checkpoint {ckpt}")
    model.to(device).eval()
    autoencoder = build_autoencoder(cfg.autoencoder, cfg.data.channels).to(device)
    return cfg, model, build_objective(cfg), autoencoder, run_dir


def read_image_folder(
    folder: str | Path, channels: int, limit: int | None = None, size: int | None = None
) -> torch.Tensor:
    """Every readable image below folder as [N, C, H, W] in [-1, 1]; unreadable files are skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    images = []
    for f in files:
        try:
            im, _ = load_image(f, channels)  # 16-bit images scaled, alpha on white
        except BadImage:  # any decoder error: the file is skipped
            continue
        if size and im.size != (size, size):
            im = im.resize((size, size), Image.BICUBIC)
        images.append(pil_to_tensor(im))
    if len(images) < 2:
        raise DataError(f"image folder {folder} holds fewer than 2 readable images")
    return torch.stack(images)


def fd_effnet(images: torch.Tensor, reference: torch.Tensor, batch: int = 100) -> float:
    from .features import EffNetLite0Features

    net = EffNetLite0Features()
    return frechet_distance_of(extract(net, images, batch).numpy(), extract(net, reference, batch).numpy())


def digit_data(cfg):
    """The MNIST DataConfig when the run is evaluated on the embedded digits (data.name mnist, or eval.digits
    for digits read otherwise, e.g. the captioned shards), else None."""
    from ..config import DataConfig

    if cfg.data.name == "mnist" or cfg.eval.digits:
        return DataConfig(name="mnist", resolution=cfg.data.resolution, channels=1, held_out=cfg.data.held_out)
    return None


def digit_classes(cfg) -> int:
    """How many labels a run's evaluation samples take: its classes, the 10 digits, or 100 digit pairs."""
    if digit_data(cfg) is None:
        return cfg.model.num_classes
    return 100 if cfg.eval.digit_layout == "pairs" else 10


def classifier_data(cfg):
    """The digits the run's digit classifier learns: at the run's resolution, or at half of it for digit pairs
    (each half of a pair image is one digit at half the side)."""
    digits = digit_data(cfg)
    if digits is not None and cfg.eval.digit_layout == "pairs":
        digits = replace(digits, resolution=cfg.data.resolution // 2)
    return digits


def reference_digits(cfg) -> torch.Tensor:
    """Real images to compare samples with (FD): the held-out digits, or pairs of them for digit pairs."""
    images = build_dataset(digit_data(cfg), "held_out").images
    if cfg.eval.digit_layout != "pairs":
        return images
    from ..data.shards import pair_image

    partner = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    return torch.stack([pair_image(images[i], images[j]) for i, j in enumerate(partner.tolist())])


def predict_digits(cfg, classifier, images: torch.Tensor) -> torch.Tensor:
    """The digit classifier's label of each image (in grey): the digit, or 10 x left + right for digit pairs."""
    from .digits import predict

    grey = images.mean(dim=1, keepdim=True)
    if cfg.eval.digit_layout == "pairs":
        from ..data.shards import pair_halves

        left, right = pair_halves(grey)
        return 10 * predict(classifier, left) + predict(classifier, right)
    return predict(classifier, grey)


def sample_set_folder(
    cfg, run_dir, checkpoint_path: Path, n: int, guidance: float, sampler: str, steps: int, seed: int
) -> Path:
    """Where a run's evaluation sample set goes: one folder per setting, so settings never mix."""
    base = Path(run_dir) / "eval" if run_dir is not None else checkpoint_path.parent / f"{checkpoint_path.stem}-eval"
    import hashlib

    name = f"samples-n{n}-{sampler}{steps}-cfg{guidance:g}-seed{seed}"
    if cfg.conditioning.control:  # control values and their guidance are settings too
        values = hashlib.sha1(json.dumps(sorted(cfg.sample.control)).encode()).hexdigest()[:8]
        name += f"-ctrlcfg{cfg.sample.control_guidance_scale:g}-{values}"
    extras = {k: v for k, v in sampling_extras(cfg).items() if k != "control_scale"}
    if extras:  # guidance schedule, interval, negatives, ...: each setting its own folder
        name += "-" + hashlib.sha1(json.dumps(extras, sort_keys=True).encode()).hexdigest()[:8]
    return base / name


@dataclass
class SampleSettings:
    """Changes to a run's config for one evaluation (None: the run's): the sampling options, and a config file
    that replaces the recorded one and KEY=VALUE overrides (applied first)."""

    num_images: int | None = None
    guidance_scale: float | None = None
    steps: int | None = None
    sampler: str | None = None
    seed: int | None = None
    control: list[str] = field(default_factory=list)  # added to sample.control
    control_guidance: float | None = None
    config: str | None = None
    overrides: list[str] = field(default_factory=list)
    negative_prompt: str | None = None
    negative_class: int | None = None
    precision: str | None = None  # fp32 | bf16
    compile: bool = False  # torch.compile the denoiser

    def apply(self, cfg) -> None:
        cfg.eval.num_images = self.num_images or cfg.eval.num_images
        set_sampling(
            cfg,
            guidance_scale=self.guidance_scale,
            sampler=self.sampler,
            steps=self.steps,
            seed=self.seed,
            control=list(cfg.sample.control) + list(self.control or []),
            control_guidance_scale=self.control_guidance,
            negative_prompt=self.negative_prompt,
            negative_class=self.negative_class,
            precision=self.precision,
        )


def evaluate_run(
    path,
    settings: SampleSettings | None = None,
    eval_cfg=None,
    reference: str | Path | None = None,
    classifier_path: str | Path | None = None,
    fd: bool | None = None,
    sample_dir: str | Path | None = None,
    device=None,
    log=print,
) -> tuple[dict | None, torch.Tensor | None, torch.Tensor | None]:
    """Generate the class-balanced sample set of a run (one seed per sample index, over all torchrun
    processes, resumable, PNGs + ADM .npz) and compute its metrics on process 0.
    Returns (metrics, images [N, C, H, W] when N <= 5000, labels); other processes get (None, None, None).
    Evaluation settings come from the run's config unless eval_cfg (an EvalConfig) is given; settings override
    its sampling settings."""
    from .. import distributed
    from .sampleset import finish_sample_set, read_sample_set, sample_labels, write_sample_set

    path = Path(path)
    d = distributed.init_distributed("auto" if device is None else str(device))
    settings = settings or SampleSettings()
    cfg, model, objective, autoencoder, run_dir = load_generator(
        path, True, d.device, settings.config, settings.overrides
    )
    if eval_cfg is not None:
        cfg.eval = replace(eval_cfg)  # a copy: the settings below change it
    settings.apply(cfg)
    if settings.compile:
        model = torch.compile(model)
    if cfg.eval.fid:  # fail before hours of sampling, not after
        from .features import inception_weights_path

        inception_weights_path(cfg.eval.inception_weights)
        if not cfg.eval.reference:
            raise ValueError(
                "eval.fid needs eval.reference: a reference .npz ('ldmkit reference'), ADM's reference batch, a "
                "folder or shards"
            )
    n, guidance, sampler = cfg.eval.num_images, cfg.sample.guidance_scale, cfg.sample.sampler
    steps, seed = cfg.sample.steps, cfg.sample.seed
    digits = digit_data(cfg)
    labels = sample_labels(n, digit_classes(cfg))
    prompts = eval_prompts(cfg, labels)
    folder = (
        Path(sample_dir) if sample_dir else sample_set_folder(cfg, run_dir, path, n, guidance, sampler, steps, seed)
    )
    t0 = time.time()
    write_sample_set(
        folder,
        model,
        cfg,
        objective,
        autoencoder,
        n,
        cfg.eval.batch,
        d.device,
        labels=labels,
        prompts=prompts,
        guidance_scale=guidance,
        sampler=sampler,
        steps=steps,
        seed=seed,
        rank=d.rank,
        world_size=d.world_size,
        log=lambda *a: None,
    )
    distributed.barrier(d)
    if not d.is_main:
        return None, None, None
    info = {
        "source": str(path),
        "guidance_scale": guidance,
        "sampler": sampler,
        "steps": steps,
        "seed": seed,
        "processes": d.world_size,
    }
    if cfg.conditioning.control:
        info.update(control=list(cfg.sample.control), control_guidance_scale=cfg.sample.control_guidance_scale)
    info["sampling"] = sampling_extras(cfg)  # every other setting that shapes the images
    finish_sample_set(folder, n, labels, info, npz=cfg.eval.npz)
    metrics = dict(info, num_images=n, sample_set=str(folder), generation_seconds=round(time.time() - t0, 1))
    log(f"sample set of {n} images in {folder} ({metrics['generation_seconds']} s)")

    # Extractors and references, then one pass over the sample set.
    extractors, references = {}, {}
    if digits is not None and cfg.eval.classifier:
        from .digits import load_or_train_classifier

        clf_path = Path(classifier_path or (Path(run_dir or folder) / "digit_classifier.pt"))
        classifier, clf_acc = load_or_train_classifier(classifier_data(cfg), clf_path, cfg.eval.classifier_epochs)
        metrics["classifier_heldout_accuracy"] = clf_acc
    if cfg.eval.fd_effnet if fd is None else fd:
        from .features import EffNetLite0Features

        if reference is not None:
            ref_images, name = read_image_folder(reference, 3, size=cfg.data.resolution), str(reference)
        elif digits is not None:
            ref_images = reference_digits(cfg)
            kind = "digit pairs" if cfg.eval.digit_layout == "pairs" else "digits"
            name = f"mnist held-out split ({len(ref_images)} real {kind})"
        else:
            ref_images = None
        if ref_images is not None:
            extractors["effnet"] = EffNetLite0Features()
            references["effnet"] = (extract(extractors["effnet"], ref_images, cfg.eval.batch).numpy(), name)
    if cfg.eval.fid:
        from .features import InceptionV3Features
        from .reference import compute_reference, load_reference

        extractors["inception"] = InceptionV3Features(cfg.eval.inception_weights)
        ref_path = Path(cfg.eval.reference).expanduser()
        ref = (
            load_reference(ref_path)
            if ref_path.suffix == ".npz"
            else compute_reference(
                cfg.eval.reference,
                extractors["inception"],
                cfg.data.resolution,
                cfg.eval.reference_images,
                cfg.eval.batch,
                cfg.data.allow_shell,
            )
        )
        references["inception"] = (ref, ref["source"])

    clip_metric = None
    if cfg.eval.clip_model and prompts:
        from .clip_score import clip_score_metric

        clip_metric = clip_score_metric(cfg.eval.clip_model)
    predictions, features, kept, start = [], {k: [] for k in extractors}, [], 0
    for images in read_sample_set(folder, n, cfg.eval.batch):
        if "classifier_heldout_accuracy" in metrics:
            predictions.append(predict_digits(cfg, classifier, images))
        for key, extractor in extractors.items():
            features[key].append(extractor(images.to(next(extractor.parameters()).device)).double().cpu())
        if n <= 5000:
            kept.append(images if digits is None else images.mean(dim=1, keepdim=True))
        if clip_metric is not None:  # accumulated batch by batch, computed once below
            from .clip_score import update_clip_score

            update_clip_score(clip_metric, images, prompts[start : start + len(images)])
        start += len(images)
    if clip_metric is not None:
        metrics["clip_score"], metrics["clip_model"] = float(clip_metric.compute()), cfg.eval.clip_model
        log(f"CLIP score {metrics['clip_score']:.2f} ({cfg.eval.clip_model})")
    if predictions:
        pred = torch.cat(predictions)
        metrics["class_agreement"] = float((pred == labels).float().mean())
        metrics["class_agreement_per_class"] = {
            int(c): float((pred[labels == c] == c).float().mean()) for c in labels.unique()
        }
        # per sample, beside the sample set: what error bars over samples resample (ldmkit.eval.stats)
        (folder / "predictions.json").write_text(
            json.dumps({"labels": labels[: len(pred)].tolist(), "predicted": pred.tolist()})
        )
        log(
            f"digit classifier: held-out accuracy {metrics['classifier_heldout_accuracy']:.4f}; generated digits "
            f"labelled as conditioned: {metrics['class_agreement']:.4f}"
        )
    if "effnet" in features:
        ref_features, name = references["effnet"]
        metrics["fd_effnetlite0"] = frechet_distance_of(torch.cat(features["effnet"]).numpy(), ref_features)
        metrics["fd_reference"], metrics["fd_reference_count"] = name, len(ref_features)
        log(f"FD-EffNetLite0 {metrics['fd_effnetlite0']:.2f} against {name}")
    if "inception" in features:
        metrics.update(inception_metrics(torch.cat(features["inception"]).numpy(), references["inception"][0]))
        log(f"FID {metrics['fid']:.3f} against {metrics['fid_reference']} ({metrics['fid_reference_count']} images)")
    return metrics, (torch.cat(kept) if kept else None), labels


_REFERENCE_CACHE: dict = {}


@torch.no_grad()
def quick_metrics(model, cfg, objective, autoencoder, device, run_dir, n: int) -> dict:
    """A small-N metric of a model while it trains: n class-balanced samples generated in memory (quantised as a
    PNG would be), then the digit-classifier agreement and FD-EffNetLite0 for digit runs and FID when eval.fid is
    set. Small-N values are biased (FID grows as N shrinks): compare them across runs at the same N only."""
    from .features import EffNetLite0Features, InceptionV3Features
    from .sampleset import sample_labels

    digits = digit_data(cfg)
    labels = sample_labels(n, digit_classes(cfg))
    images = generate(
        model,
        cfg,
        objective,
        autoencoder,
        labels,
        list(range(n)),
        device,
        batch=cfg.eval.batch,
        prompts=eval_prompts(cfg, labels),
    )
    images = ((images + 1) * 127.5).round().clamp(0, 255) / 127.5 - 1
    out = {"metric_images": n}
    if digits is not None:
        from .digits import load_or_train_classifier

        with torch.enable_grad():  # trains the classifier the first time
            classifier, _ = load_or_train_classifier(
                classifier_data(cfg), Path(run_dir) / "digit_classifier.pt", cfg.eval.classifier_epochs
            )
        out["class_agreement"] = float((predict_digits(cfg, classifier, images) == labels).float().mean())
        key = ("effnet", cfg.data.resolution, cfg.eval.digit_layout)  # the reference set: digits or digit pairs
        if key not in _REFERENCE_CACHE:
            net = EffNetLite0Features()
            _REFERENCE_CACHE[key] = (
                net,
                extract(net, reference_digits(cfg), cfg.eval.batch).numpy(),
            )
        net, ref = _REFERENCE_CACHE[key]
        out["fd_effnetlite0"] = frechet_distance_of(extract(net, images, cfg.eval.batch).numpy(), ref)
    if cfg.eval.fid:
        from .metrics import frechet_distance_to
        from .reference import load_reference

        key = ("inception", cfg.eval.reference)
        if key not in _REFERENCE_CACHE:
            _REFERENCE_CACHE[key] = (
                InceptionV3Features(cfg.eval.inception_weights),
                load_reference(cfg.eval.reference),
            )
        net, ref = _REFERENCE_CACHE[key]
        out["fid"] = frechet_distance_to(extract(net, images, cfg.eval.batch).numpy(), ref["mu"], ref["sigma"])
    return out


def eval_prompts(cfg, labels: torch.Tensor) -> list[str] | None:
    """Text runs: the caption of each sample: eval.prompts_file (a text file, one caption per line, or a
    validation shard set's captions), cycled; for digit pairs, the pair's caption; else sample.class_prompts per
    label."""
    if cfg.model.conditioning == "class":
        return None
    if cfg.eval.prompts_file:
        file = Path(cfg.eval.prompts_file).expanduser()
        if file.suffix in (".txt", ""):
            if not file.is_file():
                raise FileNotFoundError(f"eval.prompts_file not found: {file}")
            lines = [line.strip() for line in file.read_text().splitlines() if line.strip()]
        else:  # the captions of a validation shard set, in order
            from ..data.shards import expand_urls, record_caption, tar_records

            lines = []
            for url in expand_urls(cfg.eval.prompts_file, cfg.data.allow_shell):
                lines += [record_caption(r) for r in tar_records(url) if "txt" in r]
                if len(lines) >= len(labels):
                    break
        if not lines:
            raise ValueError(f"eval.prompts_file {file} holds no prompts")
        return [lines[i % len(lines)] for i in range(len(labels))]
    if cfg.eval.digit_layout == "pairs":  # each pair's caption, the templates taken in turn
        from ..data.shards import pair_caption

        return [pair_caption(int(label) // 10, int(label) % 10, i) for i, label in enumerate(labels)]
    from ..conditioning.build import prompts_for_labels

    return prompts_for_labels(cfg, labels)


def inception_metrics(gen_features: np.ndarray, ref: dict) -> dict:
    """FID from float64 statistics; KID, precision/recall and density/coverage when the reference has features."""
    from .metrics import (
        density_coverage,
        frechet_distance_to,
        kernel_inception_distance,
        precision_recall,
    )

    out = {
        "fid": frechet_distance_to(gen_features, ref["mu"], ref["sigma"]),
        "fid_reference": ref["source"],
        "fid_reference_count": ref["count"],
        "feature_extractor": "InceptionV3 (pt_inception-2015-12-05)",
    }
    if ref.get("features") is not None:
        out.update(kernel_inception_distance(gen_features, ref["features"]))
        out.update(precision_recall(gen_features, ref["features"]))
        out.update(density_coverage(gen_features, ref["features"]))
    return out


def evaluate_folder(
    folder,
    reference: str | None,
    channels: int = 3,
    resolution: int | None = None,
    fid: bool = False,
    inception_weights: str | None = None,
    batch: int = 100,
    log=print,
) -> dict:
    """Metrics of a folder of images against a reference, as torch-fidelity and pytorch-fid compare two sets:
    FD-EffNetLite0 against a folder of real images (or 'mnist': the embedded held-out digits), and with fid,
    FID/KID/precision-recall/density-coverage of Inception-v3 features against the reference (a folder, shards,
    or statistics in a .npz). Images keep their size unless resolution is given (then all are resized to it)."""
    if reference is None:
        raise ValueError(
            "an image folder is compared with a reference: give --ref (a folder of real images, a reference .npz "
            "from 'ldmkit reference', or mnist for the embedded held-out digits)"
        )
    images = read_image_folder(folder, channels, size=resolution)
    side = images.shape[-1]
    metrics = {"num_images": len(images), "source": str(folder), "channels": channels, "resolution": side}
    reference = str(reference)
    statistics_only = reference.endswith(".npz")
    if reference == "mnist":
        from ..config import DataConfig

        ref = build_dataset(DataConfig(resolution=side), "held_out").images
        ref = ref.repeat(1, channels, 1, 1) if channels != ref.shape[1] else ref
        name = f"mnist held-out split ({len(ref)} real digits)"
    elif not statistics_only:
        ref, name = read_image_folder(reference, channels, size=side), reference
    if not statistics_only:
        metrics.update(fd_effnetlite0=fd_effnet(images, ref, batch), fd_reference=name, fd_reference_count=len(ref))
        log(f"FD-EffNetLite0 {metrics['fd_effnetlite0']:.2f} for {len(images)} images against {name}")
    elif not fid:
        raise ValueError(f"--ref {reference} holds Inception statistics: add --fid (FD-EffNetLite0 needs real images)")
    if fid:
        from .features import InceptionV3Features
        from .reference import compute_reference, load_reference, reference_from_features

        extractor = InceptionV3Features(inception_weights)
        if statistics_only:
            stats = load_reference(reference)
        elif reference == "mnist":
            features = extract(extractor, ref, batch).double().numpy()
            stats = reference_from_features(features, extractor.name, name, side)
        else:
            stats = compute_reference(reference, extractor, side, batch=batch)
        metrics.update(inception_metrics(extract(extractor, images, batch).double().numpy(), stats))
        log(f"FID {metrics['fid']:.3f} against {metrics['fid_reference']} ({metrics['fid_reference_count']} images)")
    return metrics


def write_metrics(metrics: dict, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(metrics, indent=1))
    return path
