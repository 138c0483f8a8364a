"""The transfer experiment (results: docs/results/transfer.md).

Resolution: a 16x16 stage (`--base-images`), fine-tuned at 32x32 (`--finetune-images`) with the positional resampling
modes of `--modes` (each `mode` or `mode-shift`, the latter with the noise shift shift_base_resolution 16), against
32x32 from scratch for the same training compute (the 16x16 images counted at their FLOPs). Semantics: a
class-conditional 32x32 model (class token through attention) fine-tuned on the captioned digits with
init.semantic replace, against the caption model from scratch for the same total compute. Every arm runs with each
of `--seeds` (the same images, order and noise for every arm of a seed); every run logs a small-N metric every
5,000 images (the curve) and is evaluated at the end on `--eval-images` samples. Arms are compared with the scratch
run of the same seed, paired, with 95% intervals. Each finished run is recorded in --records, a folder kept in
the repository (its metrics with the per-sample correctness, its curve), and not run again: re-running continues,
and a lost <out> costs only the unfinished runs (a fine-tune whose starting stage is gone trains it again from its
seed). The summaries and the plot are built from the records alone. --budget stops starting new runs once that
many CPU-hours are spent (a seed, estimated from the digit runs' 14.5 images/s per 1-thread run: 240,000 32x32
images, about 4.6 CPU-hours, plus the curves' metrics and the evaluations); --jobs runs that many chains at once (per
seed: the 16x16 stage and its fine-tunes, scratch, the class stage and its caption fine-tune, captions from
scratch), each with its share of the cores and its output in <out>/logs/.
  python experiments/transfer.py [--seeds 0,1,2] [--budget 4] [--jobs 2] [--out runs/exp-transfer]
      [--records experiments/records/transfer]
Writes into the records folder summary.json, summary.md and curves.png (class agreement against training compute).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

from common import (
    Budget,
    Records,
    compare,
    evaluate,
    ldmkit,
    markdown,
    paired_markdown,
    run_tasks,
    sample_correct,
    seeds_label,
    sets,
    summarise,
)

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


def train(run: Path, config: str, overrides: list[str], seed: int, init: Path | None = None) -> None:
    """Train one run: a finished run returns at once, an interrupted one resumes, a lost one trains again."""
    init_args = ["--init", str(init)] if init else []
    ldmkit("train", config, *sets(overrides + [f"train.seed={seed}"]), *init_args, "--out", str(run))


def ready(run: Path, config: str, overrides: list[str], seed: int) -> Path:
    """The folder of a stage a fine-tune starts from, trained again from its seed if runs/ lost it."""
    train(run, config, overrides, seed)
    return run


def train_and_eval(
    run: Path, config: str, overrides: list[str], seed: int, args, records: Records, budget: Budget,
    init: Callable[[], Path] | None = None,
) -> dict | None:  # fmt: skip
    """Train (or resume) and evaluate one run unless it is recorded; its final metrics and curve from its record,
    or None when the budget stops it. init: makes sure the run it starts from exists and gives its folder."""

    def train_and_evaluate():
        train(run, config, overrides, seed, init() if init else None)
        evaluate(run, "--num-images", str(args.eval_images))

    if not records.step(run, "metrics.json", budget, train_and_evaluate, also=("eval.jsonl",)):
        return None
    record = records.of(run)
    metrics = json.loads((record / "metrics.json").read_text())
    curve = (
        [json.loads(line) for line in (record / "eval.jsonl").read_text().splitlines() if line.strip()]
        if (record / "eval.jsonl").is_file()
        else []
    )
    return {
        "class_agreement": sample_correct(record),
        "fd_effnetlite0": metrics.get("fd_effnetlite0"),
        "curve": [{k: r.get(k) for k in ("images", "class_agreement")} for r in curve if "class_agreement" in r],
    }


def plot(results: dict, ratio: float, base_images: int, caption_images: int, path: Path) -> None:
    """Class agreement against training compute, counted in 32x32 images (a 16x16 image counts `ratio`): the
    fine-tunes start where the 16x16 stage ended; each arm's curve is the mean over its seeds. Left: resolution
    transfer; right: class -> text. results: arm -> [per-seed result]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, runs in results.items():
        curves = [r["curve"] for r in runs if r["curve"]]
        if not curves:
            continue
        n = min(len(c) for c in curves)
        r = {"curve": [dict(curves[0][i], class_agreement=sum(c[i]["class_agreement"] for c in curves) / len(curves))
                       for i in range(n)]}  # fmt: skip
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
            label=f"{name} ({seeds_label(len(curves))})",
        )
    for ax, title in zip(
        axes, ("16x16 -> 32x32 (fine-tunes start at the 16x16 stage's compute)", "class -> text (captioned digits)")
    ):
        ax.set_xlabel("training compute (32x32 images)")
        ax.set_ylabel("class agreement (100 samples, mean over seeds)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
        else:  # an experiment still under way: say so rather than draw an empty legend
            ax.text(0.5, 0.5, "no run recorded yet", ha="center", va="center", transform=ax.transAxes, color="gray")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/exp-transfer")
    parser.add_argument("--seeds", default="0,1,2", help="training seeds of every arm")
    parser.add_argument("--modes", default="interpolate-shift,rectified-shift", help="fine-tune arms (mode[-shift])")
    parser.add_argument("--base-images", type=int, default=40000, help="images of the 16x16 stage")
    parser.add_argument("--finetune-images", type=int, default=20000, help="images of each 32x32 fine-tune")
    parser.add_argument(
        "--caption-images", type=int, default=40000, help="images of the class stage and of each caption fine-tune"
    )
    parser.add_argument("--eval-images", type=int, default=1000, help="samples per evaluation (default 1000)")
    parser.add_argument("--skip-captions", action="store_true", help="only the resolution part")
    parser.add_argument("--records", default="experiments/records/transfer", help="the results kept in the repository")
    parser.add_argument("--budget", type=float, default=None, help="CPU-hours to spend in this invocation")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (logs in <out>/logs; e.g. 8 on one GPU)")
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m.removesuffix("-shift") not in MODES]
    if bad:
        parser.error(f"--modes: unknown {bad[0]!r} (each of {', '.join(MODES)}, optionally with -shift)")
    budget, records = Budget(args.budget), Records(Path(args.records))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ratio = flops_ratio()
    scratch_images = args.finetune_images + round(args.base_images * ratio)
    caption_data = [f"data.path={out}/shards/mnist-{{00000..00008}}.tar", f"data.cache={out}/cache"]
    pending = [f"{arm}-seed{s}" for arm in ("text-from-class", "text-scratch") for s in args.seeds.split(",") if s]
    pending = [r for r in pending if not records.has(out / r, "metrics.json")]
    if not args.skip_captions and pending and budget.allows() and not (out / "cache" / "manifest.json").is_file():
        ldmkit("mnist-shards", str(out / "shards"))
        ldmkit("encode", CAPTIONS, *sets(caption_data))
    n = args.caption_images
    captions = caption_data + ["train.metric_every_images=5000", "eval.train_metric_images=100"]
    tune = [f"train.total_images={args.finetune_images}", "train.warmup_images=0", "model.pos_embed_base_size=16"]

    def resolution_chain(seed: int) -> list:
        """The 16x16 stage, then each fine-tune from it."""
        base = out / f"base-16-seed{seed}"
        low = ["data.resolution=16", "model.input_size=16", f"train.total_images={args.base_images}"]
        done = [("base-16", train_and_eval(base, DIGITS, low, seed, args, records, budget))]
        for arm in modes:
            shift = ["diffusion.shift_base_resolution=16"] if arm.endswith("-shift") else []
            overrides = tune + [f"model.pos_embed_resample={arm.removesuffix('-shift')}"] + shift
            if records.has(base, "metrics.json"):
                run, init = out / f"ft32-{arm}-seed{seed}", partial(ready, base, DIGITS, low, seed)
                done.append((f"ft32-{arm}", train_and_eval(run, DIGITS, overrides, seed, args, records, budget, init)))
        return done

    def scratch(seed: int) -> list:
        overrides = [f"train.total_images={scratch_images}"]
        run = out / f"scratch-32-seed{seed}"
        return [("scratch-32", train_and_eval(run, DIGITS, overrides, seed, args, records, budget))]

    def caption_chain(seed: int) -> list:
        """The class-conditional stage, then its caption fine-tune."""
        classes = out / f"class-32-seed{seed}"
        stage = [f"train.total_images={n}", "conditioning.mechanism=disentangled"]
        done = [("class-32", train_and_eval(classes, DIGITS, stage, seed, args, records, budget))]
        if records.has(classes, "metrics.json"):
            tuned = captions + [f"train.total_images={n}", "init.semantic=replace", "train.warmup_images=0"]
            run, init = out / f"text-from-class-seed{seed}", partial(ready, classes, DIGITS, stage, seed)
            done.append(("text-from-class", train_and_eval(run, CAPTIONS, tuned, seed, args, records, budget, init)))
        return done

    def text_scratch(seed: int) -> list:
        run, overrides = out / f"text-scratch-seed{seed}", captions + [f"train.total_images={2 * n}"]
        return [("text-scratch", train_and_eval(run, CAPTIONS, overrides, seed, args, records, budget))]

    # Seed by seed (an interrupted experiment has whole seeds); a chain's runs follow one another.
    chains = [("resolution", resolution_chain), ("scratch", scratch)]
    if not args.skip_captions:
        chains += [("captions", caption_chain), ("text-scratch", text_scratch)]
    tasks, seed_of = {}, {}
    for seed in [int(s) for s in args.seeds.split(",") if s]:
        for name, chain in chains:
            tasks[f"{name}-seed{seed}"], seed_of[f"{name}-seed{seed}"] = partial(chain, seed), seed
    results: dict[str, list] = {}
    rows = []
    for name, done in run_tasks(tasks, args.jobs, out / "logs").items():
        for arm, result in done:
            if result is not None:
                results.setdefault(arm, []).append(result)
                metrics = {k: result[k] for k in ("class_agreement", "fd_effnetlite0")}
                rows.append({"arm": arm, "seed": seed_of[name], **metrics})
    if records.none_in(rows):
        return 0
    summary = summarise(rows)
    arms = {r["arm"] for r in rows}
    paired = {
        f"{a} - {b}": {m: compare(rows, m, a, b) for m in ("class_agreement", "fd_effnetlite0")}
        for a, b in [(f"ft32-{m}", "scratch-32") for m in modes] + [("text-from-class", "text-scratch")]
        if {a, b} <= arms
    }
    records.root.mkdir(parents=True, exist_ok=True)
    (records.root / "summary.json").write_text(
        json.dumps(
            {
                "flops_ratio_16_over_32": ratio,
                "scratch_images": scratch_images,
                "runs": results,
                "summary": summary,
                "paired": paired,
            },
            indent=1,
        )  # fmt: skip
    )
    plot(results, ratio, args.base_images, args.caption_images, records.root / "curves.png")
    lines = [f"Scratch 32x32 runs: {scratch_images} images (equal compute).", "", markdown(summary)]
    lines += paired_markdown(paired)
    (records.root / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
