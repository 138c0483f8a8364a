"""How often does a 95% interval over a few training seeds cover the true mean? A simulation, the reason behind the
intervals of ldmkit.eval.stats (every experiment's error bars).

Compared: ldmkit's interval (Student's t over the seeds' means; one seed: the bootstrap over its samples) and the
percentile bootstrap over seeds and, within each drawn seed, over its samples (a two-level bootstrap). Simulated
metrics, each drawn --draws times with 3 and 5 seeds:
  - one value per seed: an FD-like figure, normal across seeds (mean 30, sd 3);
  - per-sample values: a class agreement, --samples 0/1 outcomes per seed at a rate 0.9 + a seed effect (sd 0.02);
  - a paired difference of two arms with no true difference, one value per seed (sd 3).
Usage: python experiments/interval_coverage.py [--draws 2000] [--samples 300] [--resamples 1000]
       [--out experiments/records/interval_coverage.md]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from ldmkit.eval.stats import interval, paired


def two_level_bootstrap(values: list[np.ndarray], rng: np.random.Generator, resamples: int) -> tuple[float, float]:
    """The percentile bootstrap over seeds, and over the samples of each drawn seed."""
    per_seed = np.stack([s[rng.integers(0, s.size, (resamples, s.size))].mean(axis=1) for s in values])
    n = len(values)
    boot = per_seed[rng.integers(0, n, (resamples, n)), rng.integers(0, resamples, (resamples, n))].mean(axis=1)
    return tuple(np.quantile(boot, [0.025, 0.975]))


def draw(case: str, seeds: int, samples: int, rng: np.random.Generator) -> tuple[list, list | None, float]:
    """(values of arm a, values of arm b or None, the true mean or difference)."""
    if case == "one value per seed":
        return list(rng.normal(30, 3, seeds)), None, 30.0
    if case == "per-sample values":
        return [(rng.random(samples) < 0.9 + e).astype(float) for e in rng.normal(0, 0.02, seeds)], None, 0.9
    return list(rng.normal(0, 3, seeds)), [0.0] * seeds, 0.0  # paired, no true difference


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=2000, help="simulated experiments per case")
    parser.add_argument("--samples", type=int, default=300, help="samples per seed of the per-sample case")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples")
    parser.add_argument("--out", default="experiments/records/interval_coverage.md")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    lines = [
        f"Coverage of nominal 95% intervals ({args.draws} simulated experiments per row; "
        f"`python experiments/interval_coverage.py --draws {args.draws} --samples {args.samples} "
        f"--resamples {args.resamples}`)",
        "",
        "| metric | seeds | two-level percentile bootstrap | ldmkit (Student's t over seeds) |",
        "|---|---|---|---|",
    ]
    for case in ("one value per seed", "per-sample values", "paired difference"):
        for seeds in (3, 5):
            bootstrap = ours = 0
            for k in range(args.draws):
                a, b, truth = draw(case, seeds, args.samples, rng)
                diff = [np.atleast_1d(x - y) for x, y in zip(a, b)] if b is not None else [np.atleast_1d(x) for x in a]
                low, high = two_level_bootstrap(diff, rng, args.resamples)
                bootstrap += low <= truth <= high
                ci = paired(dict(enumerate(a)), dict(enumerate(b))) if b is not None else interval(a)
                ours += ci["low"] <= truth <= ci["high"]
            lines.append(f"| {case} | {seeds} | {bootstrap / args.draws:.3f} | {ours / args.draws:.3f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
