"""The conditioning experiment (results: docs/results/conditioning.md).

Arms, each trained for the same number of images with the same training seeds (same images, order and noise in
every arm of a seed), evaluated, probed and compared paired by seed with 95% intervals:
  digits:   configs/experiments/conditioning_digits.yaml with conditioning.mechanism additive | disentangled;
            evaluated on --eval-images samples (digit-classifier agreement, FD-EffNetLite0), probed on each
            control (--probe-images per value: semantic drift and adherence), and the disentangled arm's control
            guidance swept (--control-scales) for adherence against quality;
  captions: configs/experiments/conditioning_pairs.yaml (two digits side by side, captions of 3 to 40+ words
            saying which is where) with conditioning.padding zero | zero_unmasked | noisy_replicate.
Each finished step (an evaluation, a probe, a guidance scale) is recorded in --records, a folder kept in the
repository (its metrics with the per-sample correctness, its probes), and not run again: re-running continues, and
a lost <out> costs only the unfinished steps (a step that needs a model whose run is gone trains it again from its
seed). The summaries and plots are built from the records alone. --budget stops starting new steps once that many
CPU-hours are spent; --jobs runs that many runs at once (each with its share of the cores, its output in
<out>/logs/). A digit run trains 100,000 images: measured, 14.5 images/s for each of two 1-thread runs on 2 cores
(about 2 hours, two at once); its evaluation and probes take roughly 15 minutes more and each control guidance
scale of the sweep (on --sweep-seeds) roughly 20 (estimated). A caption run trains 80,000 two-digit images
(measured: 13-14 images/s each with four 1-thread runs on 2 cores).
Usage:
  python experiments/conditioning.py [--seeds 0,1,2,3,4] [--caption-seeds ...] [--sweep-seeds 0,1,2]
      [--budget 6] [--jobs 2] [--out runs/exp-conditioning] [--records experiments/records/conditioning]
Writes into the records folder summary.json, summary.md (mean [95% interval], per seed, paired differences, the
sweep by scale and each scale paired with the first by seed), control_sweeps.png (each control sweep, both arms) and
control_guidance.png (adherence against class agreement and FD-EffNetLite0 at each scale).
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
    compare_all,
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

DIGITS = "configs/experiments/conditioning_digits.yaml"
CAPTIONS = "configs/experiments/conditioning_pairs.yaml"
PADDINGS = ("zero", "zero_unmasked", "noisy_replicate")
# One control at a time, the others at the sampling defaults; the first value is the uncropped full-size digit.
# original_size within the trained 20..28; the crops from a 28-pixel original: 25 at the edge of the trained 80-100%
# of the area (79.7%), 22 beyond it (61.7%), where a followed crop moves the ink box most.
SWEEPS = {"original_size": "20,20;24,24;28,28", "crop_size": "28,28;25,25;22,22", "flip": "0;1"}
PROBED = ("label_change_rate", "feature_drift", "flip_effect", "size_sharpness_correlation")


def probe_row(run: Path, train: Callable[[], None], args, records: Records, budget: Budget, scale=None) -> dict:
    """Probe metrics of a run (at a control guidance scale), from its records. The probes the budget stopped are
    left out of the row (the summary reports what exists; paired comparisons use a metric only where every run of
    both arms has it)."""
    row = {}
    for control, values in SWEEPS.items():
        # control guidance 1 is the sampling default: the run's own probes
        name = f"probe-{control}" + (f"-cg{scale:g}" if scale not in (None, 1) else "") + ".json"

        def make(control=control, values=values, name=name):
            train()
            extra = ["--set", f"sample.control_guidance_scale={scale}"] if scale is not None else []
            probe = ["probe", str(run), "--control", control, "--values", values, "--num", str(args.probe_images)]
            ldmkit(*probe, "--json", str(run / name), *extra)

        if not records.step(run, name, budget, make):
            continue
        probed = json.loads((records.of(run) / name).read_text())
        row.update({f"{control}.{k}": probed[k] for k in PROBED if k in probed})
        if "crop_iou" in probed:  # the cropped values: following the crop against ignoring it
            gain = [a - b for a, b in zip(probed["crop_iou"][1:], probed["crop_iou_if_ignored"][1:])]
            row[f"{control}.crop_iou_gain"] = sum(gain) / len(gain)
        if "mirrored_class_agreement" in probed:  # the mirror test: flip 1 against flip 0, samples mirrored back
            mirrored = probed["mirrored_class_agreement"]
            row[f"{control}.mirror_test"] = mirrored[1] - mirrored[0]
    return row


def control_guidance_sweep(run: Path, train: Callable[[], None], args, records: Records, budget) -> list[dict]:
    """Adherence (probes) against quality (agreement and FD on --eval-images samples) at each control scale."""
    points = []
    for scale in args.control_scales:
        # control guidance 1 is the sampling default (as for the probes): the run's own evaluation, not a second one
        name = "metrics.json" if scale == 1 else f"metrics-cg{scale:g}.json"

        def make(scale=scale, name=name):
            train()
            ldmkit(
                "eval", str(run), "--num-images", str(args.eval_images), "--control-guidance", str(scale),
                "--json", str(run / name),
            )  # fmt: skip

        if not records.step(run, name, budget, make):
            break
        probed = probe_row(run, train, args, records, budget, scale)
        fd = json.loads((records.of(run) / name).read_text()).get("fd_effnetlite0")
        quality = {"class_agreement": sample_correct(records.of(run), name), "fd_effnetlite0": fd}
        points.append({"scale": scale, **quality, **probed})
    return points


def arm_task(
    config, overrides, arm, seed, out: Path, probe: bool, args, records: Records, budget
) -> tuple[dict | None, list | None]:
    """One arm and seed, from its records where they exist: its row, and for the disentangled digits its control
    guidance sweep."""
    run = out / f"{arm}-seed{seed}"
    trained = []

    def train():
        """Train the run, once per invocation: a finished run returns at once, an interrupted one resumes from its
        newest checkpoint, a lost one trains again."""
        if not trained:
            images = [f"train.total_images={args.images}"] if args.images else []
            ldmkit("train", config, *sets(overrides + [f"train.seed={seed}"] + images), "--out", str(run))
            trained.append(True)

    def train_and_evaluate():
        train()
        evaluate(run, "--num-images", str(args.eval_images))

    if not records.step(run, "metrics.json", budget, train_and_evaluate):
        return None, None
    metrics = json.loads((records.of(run) / "metrics.json").read_text())
    row = {"arm": arm, "seed": seed, "class_agreement": sample_correct(records.of(run))}
    row["fd_effnetlite0"] = metrics.get("fd_effnetlite0")
    if probe:
        row.update(probe_row(run, train, args, records, budget))
    sweep = None
    if arm == "disentangled" and seed in args.sweep_seeds:
        sweep = control_guidance_sweep(run, train, args, records, budget)
    return row, sweep


def plot_sweep(points_by_seed: dict[int, list[dict]], summary: dict, path: Path) -> None:
    """Adherence against quality (class agreement, top; FD-EffNetLite0, bottom) at each control guidance scale: each
    seed faint, the mean over seeds with its 95% intervals on both axes (summary: the sweep's summarise() by scale
    label)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["original_size.size_sharpness_correlation", "crop_size.crop_iou_gain", "flip.mirror_test"]
    qualities = {"class_agreement": "class agreement", "fd_effnetlite0": "FD-EffNetLite0"}
    fig, axes = plt.subplots(len(qualities), len(keys), figsize=(4 * len(keys), 3.4 * len(qualities)), dpi=120)
    mean = lambda v: sum(v) / len(v) if isinstance(v, list) else v  # noqa: E731
    for row, (quality, quality_label) in enumerate(qualities.items()):
        for ax, key in zip(axes[row], keys):
            for seed, points in points_by_seed.items():
                points = [p for p in points if p.get(key) is not None and p.get(quality) is not None]
                ax.plot([p[key] for p in points], [mean(p[quality]) for p in points], color="gray", alpha=0.35,
                        linewidth=1)  # fmt: skip
            labels = [label for label, s in summary.items() if key in s and quality in s]
            means = [summary[label] for label in labels]
            x = [s[key]["mean"] for s in means]
            y = [s[quality]["mean"] for s in means]
            xerr = [[v - s[key]["low"] for v, s in zip(x, means)], [s[key]["high"] - v for v, s in zip(x, means)]]
            yerr = [[v - s[quality]["low"] for v, s in zip(y, means)]]
            yerr.append([s[quality]["high"] - v for v, s in zip(y, means)])
            ax.errorbar(x, y, xerr=xerr, yerr=yerr, marker="o", color="C0", capsize=2, label="mean, 95% interval")
            for label, xi, yi in zip(labels, x, y):
                ax.annotate(label.removeprefix("control guidance "), (xi, yi), fontsize=8, xytext=(4, 4),
                            textcoords="offset points")  # fmt: skip
            ax.ticklabel_format(axis="both", style="plain", useOffset=False)
            ax.set_xlabel(key.replace(".", ": "))
            ax.set_ylabel(quality_label)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(
        f"disentangled arm, {seeds_label(len(points_by_seed))} (grey): "
        "control guidance scale (labels), adherence and quality"
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_probes(records: Records, seeds: list[int], path: Path) -> None:
    """One column per control sweep, each arm's mean over seeds with 95% intervals at every value: top, class
    agreement (semantic drift: how the content holds as the control changes); bottom, what adherence measures
    (sharpness for original_size; ink-box IoU with the requested crop for crop_size, dotted: the IoU of samples
    that ignore the crop; for flip the mirror test, the class agreement of the samples mirrored back)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ldmkit.eval.stats import interval, metric_bounds

    fig, axes = plt.subplots(2, len(SWEEPS), figsize=(4 * len(SWEEPS), 6.4), dpi=120)
    below = {
        "original_size": ("sharpness", "sharpness"),
        "crop_size": ("crop_iou", "ink box IoU with the crop"),
        "flip": ("mirrored_class_agreement", "class agreement, mirrored back"),
    }
    for col, (control, values) in enumerate(SWEEPS.items()):
        labels = values.split(";")
        for i, arm in enumerate(("additive", "disentangled")):
            probes = [records.root / f"{arm}-seed{s}" / f"probe-{control}.json" for s in seeds]
            probes = [json.loads(f.read_text()) for f in probes if f.is_file()]
            probes = [p for p in probes if below[control][0] in p]  # (probes written before the mirror test)
            if not probes:
                continue
            series = [("class_agreement", axes[0, col], "-"), (below[control][0], axes[1, col], "-")]
            if control == "crop_size":
                series.append(("crop_iou_if_ignored", axes[1, col], ":"))
            for key, ax, style in series:
                cis = [interval([p[key][v] for p in probes], bounds=metric_bounds(key)) for v in range(len(labels))]
                mean = [c["mean"] for c in cis]
                err = [[m - c["low"] for m, c in zip(mean, cis)], [c["high"] - m for m, c in zip(mean, cis)]]
                x = [v + (i - 0.5) * 0.08 for v in range(len(labels))]
                label = f"{arm} ({seeds_label(len(probes))})" + (", crop ignored" if style == ":" else "")
                ax.errorbar(x, mean, yerr=err, fmt=style, marker="o", color=f"C{i}", capsize=2, label=label)
        axes[0, col].set_title(f"{control} sweep")
        axes[0, col].set_ylabel("class agreement")
        for ax in axes[:, col]:
            ax.set_xticks(range(len(labels)), labels)
        axes[1, col].set_ylabel(below[control][1])
        axes[1, col].set_xlabel(f"requested {control}")
    axes[0, 0].legend(fontsize=7)
    axes[1, 1].legend(fontsize=7)
    fig.suptitle("control sweeps: content held (top) and control followed (bottom), mean and 95% interval")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2,3,4", help="training seeds of the digit arms")
    parser.add_argument("--caption-seeds", default="0,1,2", help="training seeds of the caption arms")
    parser.add_argument("--out", default="runs/exp-conditioning")
    parser.add_argument("--images", type=int, default=None, help="training images per run (default: the configs')")
    parser.add_argument("--eval-images", type=int, default=1000, help="samples per evaluation (default 1000)")
    parser.add_argument("--probe-images", type=int, default=100, help="samples per control value (default 100)")
    parser.add_argument("--control-scales", default="1,1.5,2,3", help="control guidance scales of the sweep")
    parser.add_argument("--sweep-seeds", default="0,1,2", help="seeds of the disentangled arm to sweep")
    parser.add_argument(
        "--records", default="experiments/records/conditioning", help="the results kept in the repository"
    )
    parser.add_argument("--budget", type=float, default=None, help="CPU-hours to spend in this invocation")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (logs in <out>/logs; e.g. 8 on one GPU)")
    args = parser.parse_args()
    args.control_scales = [float(s) for s in args.control_scales.split(",") if s]
    args.sweep_seeds = [int(s) for s in args.sweep_seeds.split(",") if s]
    budget, records = Budget(args.budget), Records(Path(args.records))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",") if s]
    caption_seeds = [int(s) for s in args.caption_seeds.split(",") if s]
    caption_data = [f"data.path={out}/pairs/mnist-{{00000..00008}}.tar", f"data.cache={out}/pairs-cache"]
    pending = any(not records.has(out / f"{p}-seed{s}", "metrics.json") for p in PADDINGS for s in caption_seeds)
    if pending and budget.allows() and not (out / "pairs-cache" / "manifest.json").is_file():
        if not (out / "pairs").is_dir():
            ldmkit("mnist-shards", str(out / "pairs"), "--layout", "pairs")
        ldmkit("encode", CAPTIONS, *sets(caption_data))
    # Seed by seed, every arm, so that an interrupted experiment has comparable arms; the disentangled run of a seed
    # goes on to its control-guidance sweep.
    tasks = {}
    for seed in sorted(set(seeds) | set(caption_seeds)):
        arms = []
        if seed in seeds:
            arms += [(DIGITS, [f"conditioning.mechanism={m}"], m, True) for m in ("additive", "disentangled")]
        if seed in caption_seeds:
            arms += [(CAPTIONS, [f"conditioning.padding={p}", *caption_data], p, False) for p in PADDINGS]
        for config, overrides, arm, probe in arms:
            task = partial(arm_task, config, overrides, arm, seed, out, probe, args, records, budget)
            tasks[f"{arm}-seed{seed}"] = task
    done = run_tasks(tasks, args.jobs, out / "logs")
    results = [row for row, _ in done.values() if row is not None]
    sweeps = {row["seed"]: sweep for row, sweep in done.values() if sweep is not None}
    if records.none_in(results):
        return 0
    summary = summarise(results)
    comparisons = {}
    pairs = [("disentangled", "additive"), ("noisy_replicate", "zero"), ("zero_unmasked", "zero")]
    for a, b in pairs + [("noisy_replicate", "zero_unmasked")]:
        if {a, b} <= {r["arm"] for r in results}:
            comparisons[f"{a} - {b}"] = compare_all(results, a, b)
    # each control guidance scale as an arm, over the swept seeds
    points = [
        {"seed": seed, **p, "scale": f"control guidance {p['scale']:g}"}
        for seed in sorted(sweeps)
        for p in sweeps[seed]
    ]
    sweep_summary = summarise(points, key="scale")
    # each scale against control guidance 1, paired by seed: does raising it buy adherence, and at what quality?
    scales = list(dict.fromkeys(p["scale"] for p in points))
    sweep_paired = {f"{s} - {scales[0]}": compare_all(points, s, scales[0], key="scale") for s in scales[1:]}
    records.root.mkdir(parents=True, exist_ok=True)
    (records.root / "summary.json").write_text(
        json.dumps(
            {
                "results": results,
                "summary": summary,
                "paired": comparisons,
                "sweeps": sweeps,
                "sweep": sweep_summary,
                "sweep_paired": sweep_paired,
            },
            indent=1,
        )
    )
    lines = [markdown(summary)]
    lines += paired_markdown(comparisons)
    if sweep_summary:
        lines += ["## control guidance sweep (disentangled)", "", markdown(sweep_summary)]
        lines += paired_markdown(sweep_paired)
    (records.root / "summary.md").write_text("\n".join(lines))
    if sweep_summary:
        plot_sweep(sweeps, sweep_summary, records.root / "control_guidance.png")
    if any(r["arm"] in ("additive", "disentangled") for r in results):
        plot_probes(records, seeds, records.root / "control_sweeps.png")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
