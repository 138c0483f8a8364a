"""`ldmkit probe RUN --control KEY --values ...`: does changing a control value change what the image shows?

With fixed seeds and fixed semantic conditions, one control is swept over values. Reported:
- semantic drift: the share of samples whose digit-classifier label differs from the label at the first value
  (digit runs), and the EffNetLite0 feature distance between each sample's images across values, relative to
  the mean distance between different samples (0: the control changes nothing; 1: as different as unrelated
  images);
- control effect, for `flip`: how much closer a flip=1 image is to the mirror of its flip=0 image than to the
  flip=0 image itself (positive: the flag mirrors the image), and for digit runs the mirror test (the class
  agreement of each value's samples mirrored back);
- control adherence (eval/adherence.py), for `original_size`: sharpness per value and its rank correlation with
  the requested size; for `crop_size` / `crop_top_left` (first value uncropped): the IoU of each sample's ink box
  with where the requested crop puts it, and with where it would stay if the crop were ignored.
"""

from __future__ import annotations

from functools import partial

import torch

from ..distributed import Dist
from .evaluate import digit_classes, digit_data, eval_prompts, load_generator, predict_digits
from .features import EffNetLite0Features, extract
from .generate import generate_split
from .sampleset import sample_labels


def _relative_distance(features: list[torch.Tensor]) -> float:
    base = features[0]
    spread = torch.cdist(base, base).sum() / max(len(base) * (len(base) - 1), 1)  # mean distance between samples
    moved = torch.stack([(f - base).norm(dim=1).mean() for f in features[1:]]).mean()
    return float(moved / spread.clamp(min=1e-12))


def adherence(cfg, key: str, base_control: list[str], values: list[str], images: list[torch.Tensor]) -> dict:
    """What eval/adherence.py measures for this control's sweep: sharpness against the requested original_size,
    the ink box against the requested crop (the first value must be the whole original); {} for other controls."""
    from ..conditioning.build import sampling_control
    from .adherence import crop_adherence, size_adherence

    if key not in ("original_size", "crop_size", "crop_top_left"):
        return {}
    settings = []
    for value in values:
        cfg.sample.control = base_control + [f"{key}={value}"]
        c = sampling_control(cfg, 1, "cpu")
        settings.append({k: tuple(float(x) for x in v[0]) for k, v in c.items()})
    if key == "original_size":
        return size_adherence([s["original_size"] for s in settings], images)
    first = settings[0]
    if first["crop_top_left"] != (0.0, 0.0) or first["crop_size"] != first["original_size"]:
        return {}  # the reference must be uncropped
    crops = [(s["crop_top_left"], s["crop_size"]) for s in settings]
    return crop_adherence(crops, first["original_size"], images)


@torch.no_grad()
def probe_control(
    run,
    key: str,
    values: list[str],
    num: int = 20,
    steps: int | None = None,
    seed: int | None = None,
    guidance_scale: float | None = None,
    log=print,
    device="cpu",
    config=None,
    overrides: list[str] | None = None,
    processes: Dist | None = None,
) -> dict | None:
    """Generate the same samples (seeds, classes) at each value of one control; report the semantic drift.
    config / overrides change the run's recorded config as in load_generator. processes (under torchrun): the
    samples are split over them and process 0 measures; the others return None."""
    d = processes or Dist(device=torch.device(device))
    cfg, model, objective, autoencoder, run_dir = load_generator(run, device=device, config=config, overrides=overrides)
    if key not in cfg.conditioning.control:
        raise ValueError(
            f"this run does not embed control {key!r} (it embeds: {', '.join(cfg.conditioning.control) or 'none'})"
        )
    digits = digit_data(cfg)
    labels = sample_labels(num, digit_classes(cfg))
    base_control = list(cfg.sample.control)
    images = []
    for value in values:
        cfg.sample.control = base_control + [f"{key}={value}"]
        kwargs = dict(batch=cfg.eval.batch, steps=steps, seed=seed, guidance_scale=guidance_scale)
        kwargs["prompts"] = eval_prompts(cfg, labels)  # text runs: the evaluation's captions
        images.append(generate_split(d, model, cfg, objective, autoencoder, labels, **kwargs))
    if not d.is_main:
        return None
    net = EffNetLite0Features()
    features = [extract(net, x, cfg.eval.batch).float() for x in images]
    out = {"control": key, "values": values, "num_images": num, "feature_drift": _relative_distance(features)}
    if digits is not None:
        from pathlib import Path

        from .digits import load_or_train_classifier

        with torch.enable_grad():
            classifier, _ = load_or_train_classifier(
                digits, Path(run_dir or ".") / "digit_classifier.pt", cfg.eval.classifier_epochs
            )
        preds = [predict_digits(cfg, classifier, x) for x in images]
        out["label_change_rate"] = float(torch.stack([(p != preds[0]).float().mean() for p in preds[1:]]).mean())
        out["class_agreement"] = [float((p == labels).float().mean()) for p in preds]
        if key == "flip":
            from .adherence import mirror_agreement

            digit = partial(predict_digits, cfg, classifier)
            out["mirrored_class_agreement"] = mirror_agreement(digit, images, labels)
    out.update(adherence(cfg, key, base_control, values, images))
    if key == "flip" and len(values) >= 2:
        plain, flipped = images[0], images[1]
        to_mirror = (flipped - plain.flip(-1)).flatten(1).norm(dim=1)
        to_plain = (flipped - plain).flatten(1).norm(dim=1)
        out["flip_effect"] = float(((to_plain - to_mirror) / (to_plain + to_mirror).clamp(min=1e-12)).mean())
    log(", ".join(f"{k} {v:.3f}" for k, v in out.items() if isinstance(v, float)))
    return out
