"""Error bars: the interval over seeds covers the true mean at about its nominal rate (where the percentile bootstrap
over a few seeds is too narrow), paired differences remove the shared seed effect, and degenerate inputs are handled
or refused."""

import numpy as np
import pytest
from scipy.stats import t

from ldmkit.eval.stats import format_interval, interval, paired


def simulated_arm(rng, true_mean: float, seeds: int = 5, samples: int = 200, seed_sd: float = 0.05, effects=None):
    """Per-seed 0/1 outcomes (e.g. class agreement) whose rate varies with the training seed."""
    effects = rng.normal(0, seed_sd, seeds) if effects is None else effects
    return [rng.random(samples) < np.clip(true_mean + e, 0, 1) for e in effects], effects


@pytest.mark.parametrize("seeds", [3, 5])
def test_interval_covers_the_true_mean_at_about_95_percent(seeds):
    rng = np.random.default_rng(seeds)
    covered_samples = covered_values = 0
    for k in range(400):
        values, _ = simulated_arm(rng, 0.5, seeds=seeds)
        ci = interval(values, seed=k)
        covered_samples += ci["low"] <= 0.5 <= ci["high"]
        ci = interval(list(rng.normal(30, 3, seeds)))
        covered_values += ci["low"] <= 30 <= ci["high"]
    # binomial sd of a 95% rate over 400 draws: 1.1 points; a percentile bootstrap over seeds: 74-83%
    assert 360 <= covered_samples <= 395, covered_samples
    assert 360 <= covered_values <= 395, covered_values


def test_sample_only_bootstrap_would_be_too_narrow():
    """Resampling the pooled samples alone (one 'seed') ignores the training variation: the interval over seeds is
    wider on the same data."""
    rng = np.random.default_rng(1)
    values, _ = simulated_arm(rng, 0.5, seed_sd=0.1)
    over_seeds = interval(values)
    pooled = interval([np.concatenate(values)])
    assert (over_seeds["high"] - over_seeds["low"]) > 1.5 * (pooled["high"] - pooled["low"])
    assert over_seeds["seeds"] == 5 and over_seeds["samples"] == 1000


def test_paired_difference_cancels_the_shared_seed_effect():
    rng = np.random.default_rng(2)
    a, effects = simulated_arm(rng, 0.6, samples=1000, seed_sd=0.1)
    b, _ = simulated_arm(rng, 0.5, samples=1000, effects=effects)  # same seeds: same seed effects
    result = paired(dict(enumerate(a)), dict(enumerate(b)))
    assert result["verdict"] == "a > b"
    assert result["low"] <= 0.1 <= result["high"]
    same = paired(dict(enumerate(a)), dict(enumerate(a)))
    assert same["mean"] == 0.0 and same["verdict"] == "no spread between seeds"


def test_one_seed_difference_resamples_the_shared_samples_together():
    # ldmkit eval draws sample i of both arms from the same noise and class: arm b differs from arm a in 20 of
    # 1,000 samples. Resampled by the same indices the difference is 0.020 +- ~0.009; resampling the arms apart
    # would see two 90% rates (+- ~0.026) and could not tell them apart.
    rng = np.random.default_rng(3)
    a = (rng.random(1000) < 0.9).astype(float)
    b = a.copy()
    b[np.flatnonzero(a)[:20]] = 0.0
    one_seed = paired({0: a.tolist()}, {0: b.tolist()})
    assert one_seed["mean"] == pytest.approx(0.02) and one_seed["verdict"] == "too few seeds"
    assert 0.005 < one_seed["low"] < 0.02 < one_seed["high"] < 0.035
    apart = paired({0: a.tolist()}, {0: b[:-1].tolist()})  # unequal sizes: not index-aligned, resampled apart
    assert apart["low"] < 0.0 < apart["high"]


def test_one_value_per_seed_and_degenerate_inputs():
    ci = interval([0.8, 0.9, 0.85, 0.95, 0.9])
    half = t.ppf(0.975, 4) * np.std([0.8, 0.9, 0.85, 0.95, 0.9], ddof=1) / np.sqrt(5)
    assert ci["mean"] == pytest.approx(0.88)
    assert (ci["low"], ci["high"]) == pytest.approx((0.88 - half, 0.88 + half))
    one_seed = interval([[1.0] * 90 + [0.0] * 10])  # one seed: only the samples' variation, by the bootstrap
    assert one_seed["low"] < 0.9 < one_seed["high"] and one_seed["high"] - one_seed["low"] < 0.15
    assert format_interval(interval([0.5])) == "0.500"
    assert format_interval({"mean": 1.0, "low": 0.5, "high": 1.5}, 1) == "1.0 [0.5, 1.5]"
    with pytest.raises(ValueError, match="at least one value"):
        interval([[1.0], []])
    assert paired({0: [1.0, 1.0, 0.0]}, {0: [0.0, 0.0, 0.0]})["verdict"] == "too few seeds"
    tie = paired({0: 0.005, 1: 0.015}, {0: 0.015, 1: 0.025})  # coarse values, the same difference in both seeds
    assert tie["verdict"] == "no spread between seeds" and format_interval(tie) == "-0.010"
    with pytest.raises(ValueError, match="seeds that both arms ran"):
        paired({0: 1.0}, {1: 1.0})


def test_intervals_stay_inside_the_values_a_metric_can_take():
    from ldmkit.eval.stats import metric_bounds

    wide = interval([0.97, 0.99], bounds=metric_bounds("class_agreement"))  # two seeds: t(1) reaches past 1
    unclipped = interval([0.97, 0.99])
    assert unclipped["high"] > 1 and wide["high"] == 1.0 and wide["low"] == unclipped["low"]
    assert interval([5.0, 60.0], bounds=metric_bounds("fd_effnetlite0"))["low"] == 0.0
    assert metric_bounds("crop_size.label_change_rate") == (0.0, 1.0)
    assert metric_bounds("flip.mirror_test") == (-1.0, 1.0)
    assert metric_bounds("original_size.feature_drift")[0] == 0.0
    assert metric_bounds("kid") == (-np.inf, np.inf)  # an unbiased estimate: below 0 happens
    assert interval([-0.2, 0.4], bounds=metric_bounds("kid"))["low"] < -0.2


def test_the_comparison_report_shows_arms_with_intervals_and_a_paired_difference():
    from ldmkit.eval.compare import arm_table

    def cfg(mechanism, seed):
        return {"name": f"{mechanism}-{seed}", "conditioning": {"mechanism": mechanism}, "train": {"seed": seed}}

    configs = [cfg(m, s) for m in ("additive", "disentangled") for s in range(5)]
    jitter = [0.002, -0.001, 0.001, -0.002, 0.0]  # what the pairing leaves of the seed effect
    rows = [{"class_agreement": 0.80 + 0.01 * s} for s in range(5)] + [
        {"class_agreement": 0.85 + 0.01 * s + jitter[s]} for s in range(5)
    ]
    text = "\n".join(arm_table(configs, rows))
    assert "| conditioning.mechanism=additive | 5 | 0.820 [" in text
    assert "| conditioning.mechanism=disentangled | 5 | 0.870 [" in text
    assert "- class_agreement: -0.050 [" in text and "over 5 seeds, a < b" in text  # the seed effect cancels
    assert arm_table(configs[:1] + configs[5:6], rows[:1] + rows[5:6]) == []  # one seed per config: no arms
