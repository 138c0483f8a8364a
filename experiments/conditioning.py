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
import sys
from pathlib import Path

from common import ldmkit, markdown, sets, summarise

DIGITS = "configs/experiments/conditioning_digits.yaml"
CAPTIONS = "configs/experiments/conditioning_captions.yaml"
# The probe's sweeps: one control at a time, the others at the sampling defaults of the config.
SWEEPS = {"original_size": "12,12;20,20;28,28", "crop_size": "28,28;22,22;17,17", "flip": "0;1"}


def run_arm(config: str, overrides: list[str], value: str, seed: int, out: Path, probe: bool, args) -> dict:
    run = out / f"{value}-seed{seed}"
    if not (run / "metrics.json").is_file():
        ldmkit(
            "train",
            config,
            *sets(overrides + [f"train.seed={seed}"] + ([f"train.total_images={args.images}"] if args.images else [])),
            "--out",
            str(run),
        )
        ldmkit("eval", str(run), *(["--num-images", str(args.eval_images)] if args.eval_images else []))
    result = {
        "arm": value,
        "seed": seed,
        **{
            k: v
            for k, v in json.loads((run / "metrics.json").read_text()).items()
            if k in ("class_agreement", "fd_effnetlite0")
        },
    }
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1", help="training seeds of the digit arms")
    parser.add_argument("--caption-seeds", default="0,1", help="training seeds of the caption arms")
    parser.add_argument("--out", default="runs/exp-conditioning")
    parser.add_argument(
        "--images", type=int, default=None, help="training images per run (default: the configs' 16,000)"
    )
    parser.add_argument(
        "--eval-images", type=int, default=None, help="samples per evaluation (default: the configs' 300)"
    )
    parser.add_argument("--probe-images", type=int, default=40, help="samples per control value in the probe")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",") if s]
    caption_seeds = [int(s) for s in args.caption_seeds.split(",") if s]
    caption_data = [f"data.path={out}/shards/mnist-{{00000..00008}}.tar", f"data.cache={out}/cache"]
    if caption_seeds and not (out / "cache" / "manifest.json").is_file():
        ldmkit("mnist-shards", str(out / "shards"))
        ldmkit("encode", CAPTIONS, *sets(caption_data))
    results = []
    # Seed by seed, both arms of both experiments, so an interrupted run has comparable arms.
    for seed in sorted(set(seeds) | set(caption_seeds)):
        if seed in seeds:
            for mechanism in ("additive", "disentangled"):
                results.append(
                    run_arm(DIGITS, [f"conditioning.mechanism={mechanism}"], mechanism, seed, out, True, args)
                )
        if seed in caption_seeds:
            for padding in ("zero", "noisy_replicate"):
                results.append(
                    run_arm(
                        CAPTIONS, [f"conditioning.padding={padding}", *caption_data], padding, seed, out, False, args
                    )
                )
        summary = summarise(results)
        (out / "summary.json").write_text(json.dumps({"results": results, "summary": summary}, indent=1))
        (out / "summary.md").write_text(markdown(summary))
    print(markdown(summarise(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
