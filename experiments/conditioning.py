"""The conditioning experiment of issue 6 (results: docs/results/conditioning.md).

Arms, each trained for the same number of images with several training seeds, then evaluated (digit-classifier
agreement, FD-EffNetLite0 on `eval.num_images` samples) and, for the control arms, probed (`ldmkit probe`):
  digits:   configs/experiments/conditioning_digits.yaml with conditioning.mechanism additive | disentangled
  captions: configs/experiments/conditioning_captions.yaml with conditioning.padding zero | noisy_replicate
Every step is skipped when its output exists, so re-running continues. Usage:
  python experiments/conditioning.py [--seeds 0,1] [--caption-seeds 0,1] [--out runs/exp-conditioning]
Writes <out>/summary.json and <out>/summary.md (mean, standard deviation and per-seed values).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

DIGITS = "configs/experiments/conditioning_digits.yaml"
CAPTIONS = "configs/experiments/conditioning_captions.yaml"
# The probe's sweeps: one control at a time, the others at the sampling defaults of the config.
SWEEPS = {"original_size": "12,12;20,20;28,28", "crop_size": "28,28;22,22;17,17", "flip": "0;1"}


def ldmkit(*args: str) -> None:
    command = [sys.executable, "-m", "ldmkit.cli", *args]
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def run_arm(config: str, overrides: list[str], value: str, seed: int, out: Path, probe: bool, args) -> dict:
    run = out / f"{value}-seed{seed}"
    if not (run / "metrics.json").is_file():
        sets = [a for o in overrides + [f"train.seed={seed}"] + ([f"train.total_images={args.images}"] if args.images else []) for a in ("--set", o)]
        ldmkit("train", config, *sets, "--out", str(run))
        ldmkit("eval", str(run), *(["--num-images", str(args.eval_images)] if args.eval_images else []))
    result = {"arm": value, "seed": seed, **{k: v for k, v in json.loads((run / "metrics.json").read_text()).items()
                                             if k in ("class_agreement", "fd_effnetlite0")}}
    if probe:
        for control, values in SWEEPS.items():
            path = run / f"probe-{control}.json"
            if not path.is_file():
                ldmkit("probe", str(run), "--control", control, "--values", values, "--num", str(args.probe_images))
            probed = json.loads(path.read_text())
            for name in ("label_change_rate", "feature_drift", "flip_effect"):
                if name in probed:
                    result[f"{control}.{name}"] = probed[name]
    return result


def summarise(results: list[dict]) -> dict:
    """{arm: {metric: {mean, std, values}}} over seeds."""
    summary: dict = {}
    for arm in dict.fromkeys(r["arm"] for r in results):
        rows = [r for r in results if r["arm"] == arm]
        metrics = [k for k in rows[0] if k not in ("arm", "seed")]
        summary[arm] = {"seeds": [r["seed"] for r in rows]}
        for m in metrics:
            values = [r[m] for r in rows if m in r]
            summary[arm][m] = {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0, "values": values}
    return summary


def markdown(summary: dict) -> str:
    lines = []
    for arm, metrics in summary.items():
        lines.append(f"### {arm} (seeds {', '.join(map(str, metrics['seeds']))})\n\n| metric | mean | std | per seed |\n|---|---|---|---|")
        for name, s in metrics.items():
            if name != "seeds":
                lines.append(f"| {name} | {s['mean']:.3f} | {s['std']:.3f} | {' / '.join(f'{v:.3f}' for v in s['values'])} |")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1", help="training seeds of the digit arms")
    parser.add_argument("--caption-seeds", default="0,1", help="training seeds of the caption arms")
    parser.add_argument("--out", default="runs/exp-conditioning")
    parser.add_argument("--images", type=int, default=None, help="training images per run (default: the configs' 16,000)")
    parser.add_argument("--eval-images", type=int, default=None, help="samples per evaluation (default: the configs' 300)")
    parser.add_argument("--probe-images", type=int, default=40, help="samples per control value in the probe")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",") if s]
    caption_seeds = [int(s) for s in args.caption_seeds.split(",") if s]
    caption_data = [f"data.path={out}/shards/mnist-{{00000..00008}}.tar", f"data.cache={out}/cache"]
    if caption_seeds and not (out / "cache" / "manifest.json").is_file():
        ldmkit("mnist-shards", str(out / "shards"))
        ldmkit("encode", CAPTIONS, *[a for o in caption_data for a in ("--set", o)])
    results = []
    # Seed by seed, both arms of both experiments, so an interrupted run has comparable arms.
    for seed in sorted(set(seeds) | set(caption_seeds)):
        if seed in seeds:
            for mechanism in ("additive", "disentangled"):
                results.append(run_arm(DIGITS, [f"conditioning.mechanism={mechanism}"], mechanism, seed, out, True, args))
        if seed in caption_seeds:
            for padding in ("zero", "noisy_replicate"):
                results.append(run_arm(CAPTIONS, [f"conditioning.padding={padding}", *caption_data], padding, seed, out, False, args))
        summary = summarise(results)
        (out / "summary.json").write_text(json.dumps({"results": results, "summary": summary}, indent=1))
        (out / "summary.md").write_text(markdown(summary))
    print(markdown(summarise(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
