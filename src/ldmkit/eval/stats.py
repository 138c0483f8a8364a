"""Error bars for comparisons between training arms: means with percentile-bootstrap confidence intervals over
training seeds (and, where per-sample values exist, over the samples of each seed), and paired differences between
two arms trained with the same seeds and data order.

Two-level bootstrap: each resample draws the seeds with replacement, then for each drawn seed a resample of its
samples; the statistic is the mean over the drawn seeds of their sample means. It counts both sources of
variation, training (seed) and evaluation (finite samples). With one value per seed it is the ordinary bootstrap
over seeds.
"""

from __future__ import annotations

import numpy as np

LEVEL = 0.95
RESAMPLES = 4000


def _as_seeds(values) -> list[np.ndarray]:
    """[v, v, ...] (one value per seed) or [[v, ...], [v, ...]] (samples per seed) -> one array per seed."""
    seeds = [np.atleast_1d(np.asarray(v, dtype=np.float64)) for v in values]
    if not seeds or any(s.size == 0 for s in seeds):
        raise ValueError("a confidence interval needs at least one value for every seed")
    return seeds


def _sample_means(s: np.ndarray, rng: np.random.Generator, resamples: int) -> np.ndarray:
    """[resamples] means of resamples of one seed's samples (its own value, repeated, when it has one)."""
    return s[rng.integers(0, s.size, (resamples, s.size))].mean(axis=1) if s.size > 1 else np.repeat(s, resamples)


def _percentiles(per_seed: np.ndarray, chosen: np.ndarray, rng: np.random.Generator, level: float):
    """The two-level bootstrap interval from per-seed sample-resample means [seeds, resamples] and the seeds drawn
    with replacement [resamples, seeds]: each draw takes an independent sample resample of its seed."""
    resamples, n = chosen.shape
    which = rng.integers(0, resamples, (resamples, n))
    boot = per_seed[chosen, which].mean(axis=1)
    return (float(q) for q in np.quantile(boot, [(1 - level) / 2, (1 + level) / 2]))


def interval(values, level: float = LEVEL, resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """{"mean", "low", "high", "seeds", "samples"}: the mean over seeds of the per-seed means, and its two-level
    percentile-bootstrap interval at `level`. values: one number per seed, or a list of per-sample values per
    seed."""
    seeds = _as_seeds(values)
    mean = float(np.mean([s.mean() for s in seeds]))
    if len(seeds) == 1 and seeds[0].size == 1:
        low = high = mean
    else:
        rng = np.random.default_rng(seed)
        per_seed = np.stack([_sample_means(s, rng, resamples) for s in seeds])
        chosen = rng.integers(0, len(seeds), (resamples, len(seeds)))
        low, high = _percentiles(per_seed, chosen, rng, level)
    return {"mean": mean, "low": low, "high": high, "seeds": len(seeds), "samples": int(sum(s.size for s in seeds))}


def paired(a: dict, b: dict, level: float = LEVEL, resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """The difference a - b between two arms over the seeds both ran ({seed: value or per-sample values}); per
    seed the difference of the means, then `interval` over seeds (with per-sample values, each arm's samples are
    resampled within the seed). Adds "verdict": "a > b" or "a < b" when the interval excludes 0, else
    "inconclusive"; "too few seeds" with one seed."""
    common = sorted(set(a) & set(b))
    if not common:
        raise ValueError("a paired comparison needs seeds that both arms ran")
    rng = np.random.default_rng(seed)
    sa, sb = _as_seeds([a[s] for s in common]), _as_seeds([b[s] for s in common])
    mean = float(np.mean([x.mean() - y.mean() for x, y in zip(sa, sb)]))
    if len(common) == 1 and sa[0].size == sb[0].size == 1:
        low = high = mean
    else:
        chosen = rng.integers(0, len(common), (resamples, len(common)))
        diffs = np.stack([_sample_means(x, rng, resamples) - _sample_means(y, rng, resamples) for x, y in zip(sa, sb)])
        low, high = _percentiles(diffs, chosen, rng, level)
    if len(common) < 2:
        verdict = "too few seeds"  # one training run per arm says nothing about training variation
    else:
        verdict = "a > b" if low > 0 else "a < b" if high < 0 else "inconclusive"
    return {"mean": mean, "low": low, "high": high, "seeds": len(common), "verdict": verdict}


def format_interval(ci: dict, digits: int = 3) -> str:
    """'0.912 [0.897, 0.925]' (or the value alone when there is no spread to estimate)."""
    if ci["low"] == ci["high"] == ci["mean"]:
        return f"{ci['mean']:.{digits}f}"
    return f"{ci['mean']:.{digits}f} [{ci['low']:.{digits}f}, {ci['high']:.{digits}f}]"
