"""report.md of a run: metrics, pictures, settings and how to reproduce them."""

from __future__ import annotations

import json
from pathlib import Path

from ..config import RunConfig


def read_log(run_dir: Path, file: str = "log.jsonl") -> list[dict]:
    """The records of a run's log.jsonl (or eval.jsonl); training/logging.py writes them."""
    path = Path(run_dir) / file
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_report(
    run_dir: str | Path,
    cfg: RunConfig,
    metrics: dict,
    checks: list[tuple[str, bool]] | None = None,
    command: str | None = None,
    timings: dict | None = None,
) -> Path:
    run_dir = Path(run_dir)
    log = read_log(run_dir)
    lines = [f"# {cfg.name}", ""]
    if command:
        lines += ["Reproduce with:", "", f"    {command}", ""]
    lines += ["## Metrics", "", "| metric | value |", "|---|---|"]
    names = {
        "classifier_heldout_accuracy": "digit classifier accuracy on held-out real digits",
        "class_agreement": "generated digits labelled with their conditioning class",
        "fd_effnetlite0": "FD-EffNetLite0 (Frechet distance in EfficientNet-Lite0 features; not FID)",
        "num_images": "generated images",
        "guidance_scale": "guidance scale",
        "sampler": "sampler",
        "steps": "sampling steps",
        "seed": "base seed",
        "fd_reference": "FD reference set",
        "generation_seconds": "generation time (s)",
    }
    for key, label in names.items():
        if key in metrics:
            v = metrics[key]
            lines.append(f"| {label} | {v:.4g} |" if isinstance(v, float) else f"| {label} | {v} |")
    for key, v in metrics.get("sampling", {}).items():  # every other guidance and sampler setting used
        lines.append(f"| sampling: {key} | {v} |")
    if "fd_effnetlite0" in metrics:
        lines += [
            "",
            f"FD-EffNetLite0 compares {metrics['num_images']} generated with "
            f"{metrics.get('fd_reference_count', '?')} real images; "
            "with fewer images than its 1,280 feature dimensions the covariances are singular, so values are "
            "comparable only between evaluations with the same image counts.",
        ]
    if "class_agreement_per_class" in metrics:
        per = ", ".join(f"{c}: {v:.2f}" for c, v in sorted(metrics["class_agreement_per_class"].items()))
        lines += ["", f"Agreement per class: {per}"]
    if checks:
        lines += ["", "## Checks", ""] + [
            f"- [{'x' if ok else ' '}] {text}: **{'pass' if ok else 'FAIL'}**" for text, ok in checks
        ]
    lines += ["", "## Training", ""]
    if log:
        last = log[-1]
        speed = sum(r["images_per_s"] for r in log) / len(log)
        lines.append(
            f"{last['images']:,} images in {last['step']:,} steps; final loss {last['loss']:.4f}; mean {speed:.1f} "
            "images/s."
        )
    if timings:
        lines.append("Wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + ".")
    lines += [
        "",
        f"Model {cfg.model.preset} ({cfg.model.name}), objective {cfg.diffusion.objective}, data {cfg.data.name} at "
        f"{cfg.data.resolution}px, "
        f"global batch {cfg.train.global_batch}, lr {cfg.train.lr}. Full settings: `config.yaml`.",
        "",
        "## Pictures",
        "",
        "Samples (one row per class):",
        "",
        "![samples](samples.png)",
        "",
        "Training loss:",
        "",
        "![loss](loss.png)",
        "",
    ]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
