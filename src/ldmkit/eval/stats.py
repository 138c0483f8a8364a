"""Error bars for comparisons between training arms: the mean over training seeds with a 95% confidence interval,
and the paired difference between two arms trained with the same seeds and data order.

With two or more seeds the interval is Student's t over the seeds' means: mean +- t(n-1) s / sqrt(n). Each seed's
mean is measured on finite samples, so the spread between seeds already holds both sources of variation, training
(seed) and evaluation (samples); resampling the samples again would count the evaluation twice. A percentile
bootstrap over the seeds is too narrow at the seed counts that experiments afford: its interval never leaves the
range of the seeds' values, and `experiments/interval_coverage.py` measures it covering the true mean (or paired
difference) of one value per seed in 74-75% of draws at 3 seeds and 83% at 5, where Student's t covers 94-95%.
With one seed only the evaluation's variation can be estimated: the percentile bootstrap over that seed's samples
(and none without them).
"""

from __future__ import annotations

import numpy as np

LEVEL = 0.95
RESAMPLES = 4000

# The values a metric can take, by the end of its name. A t interval over two or three seeds can reach past them
# (a rate below 0, a distance below 0); clipping it there never lowers its coverage of a true value inside them.
# Unlisted metrics (KID, an unbiased estimate that can be negative; losses) are not clipped.
METRIC_BOUNDS = {
    "agreement": (0.0, 1.0),  # class_agreement, caption_agreement, mirrored_class_agreement
    "accuracy": (0.0, 1.0),
    "rate": (0.0, 1.0),  # label_change_rate
    "precision": (0.0, 1.0),
    "recall": (0.0, 1.0),
    "coverage": (0.0, 1.0),
    "crop_iou": (0.0, 1.0),
    "clip_score": (0.0, 100.0),
    "fid": (0.0, np.inf),
    "fd_effnetlite0": (0.0, np.inf),
    "drift": (0.0, np.inf),  # feature_drift
    "density": (0.0, np.inf),
    "sharpness": (0.0, np.inf),
    "correlation": (-1.0, 1.0),
    "iou_gain": (-1.0, 1.0),  # this and the next two: differences of two values in [0, 1]
    "mirror_test": (-1.0, 1.0),
    "flip_effect": (-1.0, 1.0),
}


def metric_bounds(name: str) -> tuple[float, float]:
    """(low, high) that the metric `name` ('crop_size.crop_iou_gain' counts by its last part) can take; (-inf, inf)
    for metrics not in METRIC_BOUNDS."""
    leaf = name.rsplit(".", 1)[-1]
    return next((b for end, b in METRIC_BOUNDS.items() if leaf.endswith(end)), (-np.inf, np.inf))


def _as_seeds(values) -> list[np.ndarray]:
    """[v, v, ...] (one value per seed) or [[v, ...], [v, ...]] (samples per seed) -> one array per seed."""
    seeds = [np.atleast_1d(np.asarray(v, dtype=np.float64)) for v in values]
    if not seeds or any(s.size == 0 for s in seeds):
        raise ValueError("a confidence interval needs at least one value for every seed")
    return seeds


def _student(means: np.ndarray, level: float) -> tuple[float, float]:
    """Student's t interval for the mean of n >= 2 per-seed values."""
    from scipy.stats import t

    half = t.ppf((1 + level) / 2, len(means) - 1) * means.std(ddof=1) / np.sqrt(len(means))
    return float(means.mean() - half), float(means.mean() + half)


def _bootstrap(samples: list[np.ndarray], signs: list[float], level: float, resamples: int, seed: int):
    """Percentile bootstrap of sum(sign x mean(samples)) (one seed: an arm's mean, or the difference of two arms'
    means); the value itself, twice, when no set has two samples. Sets of equal size are taken as index-aligned
    (ldmkit eval draws sample i of every arm from the same noise seed and condition) and resampled by the same
    indices, so what the arms' samples share cancels in the difference; sets of unequal size independently."""
    if all(s.size == 1 for s in samples):
        value = float(sum(sign * s.mean() for sign, s in zip(signs, samples)))
        return value, value
    rng = np.random.default_rng(seed)
    n = samples[0].size
    if all(s.size == n for s in samples):
        indices = [rng.integers(0, n, (resamples, n))] * len(samples)
    else:
        indices = [rng.integers(0, s.size, (resamples, s.size)) for s in samples]
    boot = sum(sign * s[i].mean(axis=1) for sign, s, i in zip(signs, samples, indices))
    return tuple(float(q) for q in np.quantile(boot, [(1 - level) / 2, (1 + level) / 2]))


def interval(
    values, level: float = LEVEL, resamples: int = RESAMPLES, seed: int = 0, bounds: tuple[float, float] | None = None
) -> dict:
    """{"mean", "low", "high", "seeds", "samples"}: the mean over seeds of the per-seed means and its interval at
    `level` (Student's t over seeds; one seed: bootstrap over its samples), clipped to `bounds` (the values the
    metric can take, see metric_bounds) when given. values: one number per seed, or a list of per-sample values
    per seed."""
    seeds = _as_seeds(values)
    means = np.array([s.mean() for s in seeds])
    if len(seeds) > 1:
        low, high = _student(means, level)
    else:
        low, high = _bootstrap(seeds, [1.0], level, resamples, seed)
    if bounds is not None:
        low, high = float(np.clip(low, *bounds)), float(np.clip(high, *bounds))
    return {
        "mean": float(means.mean()),
        "low": low,
        "high": high,
        "seeds": len(seeds),
        "samples": int(sum(s.size for s in seeds)),
    }


def paired(a: dict, b: dict, level: float = LEVEL, resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """The difference a - b between two arms over the seeds both ran ({seed: value or per-sample values}): per seed
    the difference of the means, then Student's t over the seeds (one seed: the bootstrap over both arms' samples,
    paired by index when both have as many).
    Adds "verdict": "a > b" or "a < b" when the interval excludes 0, else "inconclusive"; "too few seeds" with one
    seed (one training run per arm says nothing about training variation) and "no spread between seeds" when every
    seed gives the same difference (a tie of coarse values, e.g. label change rates, not a zero-width interval)."""
    common = sorted(set(a) & set(b))
    if not common:
        raise ValueError("a paired comparison needs seeds that both arms ran")
    sa, sb = _as_seeds([a[s] for s in common]), _as_seeds([b[s] for s in common])
    diffs = np.array([x.mean() - y.mean() for x, y in zip(sa, sb)])
    if len(common) > 1 and np.allclose(diffs, diffs[0], rtol=1e-6, atol=1e-9):
        low = high = float(diffs.mean())
        verdict = "no spread between seeds"
    elif len(common) > 1:
        low, high = _student(diffs, level)
        verdict = "a > b" if low > 0 else "a < b" if high < 0 else "inconclusive"
    else:
        low, high = _bootstrap([sa[0], sb[0]], [1.0, -1.0], level, resamples, seed)
        verdict = "too few seeds"
    return {"mean": float(diffs.mean()), "low": low, "high": high, "seeds": len(common), "verdict": verdict}


def format_interval(ci: dict, digits: int = 3) -> str:
    """'0.912 [0.897, 0.925]' (or the value alone when there is no spread to estimate)."""
    if np.allclose([ci["low"], ci["high"]], ci["mean"], rtol=1e-6, atol=1e-9):  # (float32 metrics: equal to 1e-7)
        return f"{ci['mean']:.{digits}f}"
    return f"{ci['mean']:.{digits}f} [{ci['low']:.{digits}f}, {ci['high']:.{digits}f}]"
