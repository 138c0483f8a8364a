"""The demo: train a small DiT on the embedded MNIST digits, sample with guidance, evaluate
(digit-classifier agreement, FD-EffNetLite0) and write runs/demo/ with a report. The default config is
class-conditional; configs/demo/mnist_text_dit.yaml runs the text path (shards -> MiniLM -> cache -> training)."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .config import SHIPPED_CONFIGS, ConfigError, load_config
from .eval.evaluate import evaluate_run, write_metrics
from .eval.generate import save_grid
from .eval.report import write_report
from .training.logging import print_status
from .training.loop import training_loop

DEMO_CONFIG = SHIPPED_CONFIGS / "demo" / "mnist_dit.yaml"

# A shorter run with the same code path, for the test suite (seconds, not minutes).
QUICK_OVERRIDES = [
    "model.preset=DiT-tiny/4",
    "train.total_images=512",
    "train.global_batch=32",
    "train.log_every_images=128",
    "train.checkpoint_every_images=256",
    "train.warmup_images=0",
    "sample.steps=3",
    "sample.per_class=2",
    "eval.num_images=40",
    "eval.batch=40",
    "eval.classifier_epochs=1",
    "data.held_out=100",
]
MIN_CLASSIFIER_ACCURACY, MIN_AGREEMENT = 0.97, 0.90


def prepare_digit_shards(cfg) -> None:
    """The text demo's inputs, when missing: the captioned digits as shards (in the folder data.path names),
    then the latent cache (`ldmkit encode`; it continues where an interrupted run stopped)."""
    from .data.shards import expand_urls, write_mnist_caption_shards
    from .training.encode import encode_dataset

    urls = expand_urls(cfg.data.path, cfg.data.allow_shell)
    if not all(Path(u).is_file() for u in urls):
        folder = Path(urls[0]).parent
        written = write_mnist_caption_shards(folder, cfg.data, "train", shard_size=500)
        print_status(f"wrote {len(written)} shards of captioned digits to {folder}")
        if [str(p) for p in written] != sorted(urls):
            raise ConfigError(
                f"config key 'data.path': {cfg.data.path} does not name the {len(written)} shards written to {folder}"
            )
    if cfg.data.from_cache and not (Path(cfg.data.cache) / "manifest.json").is_file():
        encode_dataset(cfg, batch_size=250, log=print_status)


def run_demo(
    out: str | Path = "runs/demo",
    quick: bool = False,
    config: str | Path | None = None,
    overrides: list[str] | None = None,
) -> dict:
    config = Path(config or DEMO_CONFIG)
    if not config.is_file():
        raise ConfigError(f"demo config not found: {config} (run from a clone of ldmkit, or pass --config)")
    cfg = load_config(config, (QUICK_OVERRIDES if quick else []) + list(overrides or []))
    out = Path(out)
    timings = {}
    if cfg.data.name == "shards":
        t0 = time.time()
        prepare_digit_shards(cfg)
        timings["shards and cache"] = time.time() - t0
    t0 = time.time()
    training_loop(cfg, out)
    timings["training"] = time.time() - t0

    t0 = time.time()
    metrics, images, labels = evaluate_run(out, log=print_status, eval_cfg=cfg.eval)
    timings["sampling and evaluation"] = time.time() - t0
    # The grid: the first `per_class` samples of each class, one row per class.
    per = cfg.sample.per_class
    rows = [images[labels == c][:per] for c in range(10)]
    save_grid(torch.cat(rows), out / "samples.png", per)
    write_metrics(metrics, out / "metrics.json")
    checks = None
    if not quick:
        checks = [
            (
                f"digit classifier held-out accuracy >= {MIN_CLASSIFIER_ACCURACY:.0%} "
                f"({metrics['classifier_heldout_accuracy']:.1%})",
                metrics["classifier_heldout_accuracy"] >= MIN_CLASSIFIER_ACCURACY,
            ),
            (
                f"generated digits labelled as conditioned >= {MIN_AGREEMENT:.0%} ({metrics['class_agreement']:.1%})",
                metrics["class_agreement"] >= MIN_AGREEMENT,
            ),
        ]
    if config == DEMO_CONFIG:
        command = "ldmkit demo --quick" if quick else "make demo   # or: ldmkit demo --out runs/demo"
    else:
        command = f"ldmkit demo --config {config} --out {out}" + (" --quick" if quick else "")
    report = write_report(out, cfg, metrics, checks, command, timings)
    print_status(f"demo done: {report}")
    for text, ok in checks or []:
        print_status(f"  {'pass' if ok else 'FAIL'}: {text}")
    return metrics
