"""The transfer experiment of issue 7 (results: docs/results/transfer.md).

Resolution: a 16x16 stage (`--base-images`), fine-tuned at 32x32 (`--finetune-images`) with each positional
resampling mode (extrapolate, interpolate, rectified), with and without the noise shift (shift_base_resolution 16),
against 32x32 from scratch for the same training compute (the 16x16 images counted at their FLOPs). Semantics: a
class-conditional 32x32 model (class token through attention) fine-tuned on the captioned digits with
init.semantic replace, against the caption model from scratch. Every run logs a small-N metric every 2,500
images (the curve) and is evaluated at the end (300 samples). Steps whose outputs exist are skipped.
  python experiments/transfer.py [--out runs/exp-transfer] [--base-images 20000] [--finetune-images 10000]
Writes <out>/summary.json, <out>/summary.md and <out>/curves.png (class agreement against training compute).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common import ldmkit, sets

DIGITS = "configs/experiments/transfer_digits.yaml"
CAPTIONS = "configs/experiments/conditioning_captions.yaml"
MODES = ("extrapolate", "interpolate", "rectified")


def flops_ratio() -> float:
    """FLOPs per image of the 16x16 model over the 32x32 one (the scratch run's image budget counts them)."""
    from ldmkit.config import load_config
    from ldmkit.models.registry import build_model, flops_per_image

    small = build_model(load_config(DIGITS, ["model.input_size=16", "data.resolution=16"]).model)
    large = build_model(load_config(DIGITS).model)
    return flops_per_image(small) / flops_per_image(large)


def train_and_eval(run: Path, config: str, overrides: list[str], init: Path | None = None) -> dict:
    if not (run / "metrics.json").is_file():
        ldmkit("train", config, *sets(overrides), *(["--init", str(init)] if init else []), "--out", str(run))
        ldmkit("eval", str(run))
    metrics = json.loads((run / "metrics.json").read_text())
    curve = (
        [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines() if line.strip()]
        if (run / "eval.jsonl").is_file()
        else []
    )
    return {
        "final": {k: metrics.get(k) for k in ("class_agreement", "fd_effnetlite0")},
        "curve": [
            {k: r.get(k) for k in ("images", "class_agreement", "fd_effnetlite0")}
            for r in curve
            if "class_agreement" in r
        ],
    }


def plot(results: dict, ratio: float, base_images: int, caption_images: int, path: Path) -> None:
    """Class agreement against training compute, counted in 32x32 images (a 16x16 image counts `ratio`): the
    fine-tunes start where the 16x16 stage ended. Left: resolution transfer; right: class -> text."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, r in results.items():
        if not r["curve"]:
            continue
        ax = axes[1] if name in ("class-32", "text-from-class", "text-scratch") else axes[0]
        scale = ratio if name == "base-16" else 1.0
        start = base_images * ratio if name.startswith("ft32") else caption_images if name == "text-from-class" else 0.0
        xs = [start + c["images"] * scale for c in r["curve"]]
        mode = next((m for m in MODES if m in name), None)  # one colour per resampling mode, dashed with the shift
        color = (
            f"C{MODES.index(mode)}"
            if mode
            else {
                "base-16": "black",
                "scratch-32": "gray",
                "class-32": "black",
                "text-from-class": "C0",
                "text-scratch": "gray",
            }[name]
        )
        ax.plot(
            xs,
            [c["class_agreement"] for c in r["curve"]],
            "--" if name.endswith("-shift") else "-",
            color=color,
            marker="o",
            markersize=3,
            label=name,
        )
    for ax, title in zip(
        axes, ("16x16 -> 32x32 (fine-tunes start at the 16x16 stage's compute)", "class -> text (captioned digits)")
    ):
        ax.set_xlabel("training compute (32x32 images)")
        ax.set_ylabel("class agreement (100 samples)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/exp-transfer")
    parser.add_argument("--base-images", type=int, default=20000, help="images of the 16x16 stage")
    parser.add_argument("--finetune-images", type=int, default=10000, help="images of each 32x32 fine-tune")
    parser.add_argument(
        "--caption-images", type=int, default=15000, help="images of the class stage and of each caption run"
    )
    parser.add_argument("--skip-captions", action="store_true", help="only the resolution part")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    low = ["data.resolution=16", "model.input_size=16", f"train.total_images={args.base_images}"]
    results["base-16"] = train_and_eval(out / "base-16", DIGITS, low)
    tune = [f"train.total_images={args.finetune_images}", "train.warmup_images=0", "model.pos_embed_base_size=16"]
    for mode in MODES:
        for shift in (False, True):
            name = f"ft32-{mode}" + ("-shift" if shift else "")
            overrides = (
                tune + [f"model.pos_embed_resample={mode}"] + (["diffusion.shift_base_resolution=16"] if shift else [])
            )
            results[name] = train_and_eval(out / name, DIGITS, overrides, init=out / "base-16")
    ratio = flops_ratio()
    scratch = args.finetune_images + round(args.base_images * ratio)
    results["scratch-32"] = train_and_eval(out / "scratch-32", DIGITS, [f"train.total_images={scratch}"])
    results["scratch-32"]["images_equal_compute"] = scratch
    if not args.skip_captions:
        caption_data = [f"data.path={out}/shards/mnist-{{00000..00008}}.tar", f"data.cache={out}/cache"]
        if not (out / "cache" / "manifest.json").is_file():
            ldmkit("mnist-shards", str(out / "shards"))
            ldmkit("encode", CAPTIONS, *sets(caption_data))
        n = args.caption_images
        captions = caption_data + ["train.metric_every_images=2500", "eval.train_metric_images=100"]
        results["class-32"] = train_and_eval(
            out / "class-32", DIGITS, [f"train.total_images={n}", "conditioning.mechanism=disentangled"]
        )
        results["text-from-class"] = train_and_eval(
            out / "text-from-class",
            CAPTIONS,
            captions + [f"train.total_images={n}", "init.semantic=replace", "train.warmup_images=0"],
            init=out / "class-32",
        )
        results["text-scratch"] = train_and_eval(
            out / "text-scratch", CAPTIONS, captions + [f"train.total_images={2 * n}"]
        )
    (out / "summary.json").write_text(json.dumps({"flops_ratio_16_over_32": ratio, "runs": results}, indent=1))
    plot(results, ratio, args.base_images, args.caption_images, out / "curves.png")
    lines = [
        "| run | images (equal compute) | class agreement | FD-EffNetLite0 | curve (images: agreement) |",
        "|---|---|---|---|---|",
    ]
    for name, r in results.items():
        curve = ", ".join(f"{round(c['images'] / 500) / 2:g}k: {c['class_agreement']:.2f}" for c in r["curve"])
        lines.append(
            f"| {name} | {r.get('images_equal_compute', '')} | {r['final']['class_agreement']:.3f} | "
            f"{r['final']['fd_effnetlite0']:.1f} | {curve} |"
        )
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
