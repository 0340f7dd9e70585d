"""Summary statistics and ratio tests, checked against numbers worked out by hand."""
import math

import numpy as np
import pytest

from harness.stats import classify_change, paired_ratio, quantile, speedup, summarize


def test_summary_of_five_samples_with_a_high_outlier():
    s = summarize([3.0, 1.0, 100.0, 2.0, 4.0])
    # sorted 1 2 3 4 100; type-7 quartiles sit exactly on order statistics 2 and 4
    assert s["n"] == 5
    assert s["median"] == 3.0
    assert s["q1"] == 2.0 and s["q3"] == 4.0 and s["iqr"] == 2.0
    assert s["mean"] == 22.0
    # deviations -21 -20 -19 -18 78: squares sum 7610, / (n-1) = 1902.5
    assert s["stdev"] == pytest.approx(math.sqrt(1902.5))
    assert s["min"] == 1.0 and s["max"] == 100.0
    # fences 2 - 3 = -1 and 4 + 3 = 7: only 100 lies outside, and it is counted, not dropped
    assert (s["outliers_low"], s["outliers_high"]) == (0, 1)


def test_quartiles_interpolate_between_order_statistics():
    s = summarize([40.0, 10.0, 30.0, 20.0])
    # positions (n-1)q: 0.75 -> 10 + 0.75*10, 1.5 -> 25, 2.25 -> 30 + 0.25*10
    assert s["q1"] == pytest.approx(17.5)
    assert s["median"] == pytest.approx(25.0)
    assert s["q3"] == pytest.approx(32.5)
    assert s["iqr"] == pytest.approx(15.0)
    assert quantile([40.0, 10.0, 30.0, 20.0], 0.1) == pytest.approx(13.0)  # position 0.3


def test_low_outlier_is_counted():
    s = summarize([1.0, 10.0, 11.0, 12.0, 13.0])
    # q1 10, q3 12, iqr 2: low fence 7 catches 1.0, high fence 15 catches nothing
    assert (s["outliers_low"], s["outliers_high"]) == (1, 0)
    assert s["median"] == 11.0


def test_single_sample_has_no_stdev_and_zero_spread():
    s = summarize([0.25])
    assert s["n"] == 1 and s["median"] == 0.25 and s["iqr"] == 0.0
    assert s["stdev"] is None


@pytest.mark.parametrize("bad", [[], [1.0, float("nan")], [float("inf")]])
def test_summary_rejects_empty_or_non_finite(bad):
    with pytest.raises(ValueError):
        summarize(bad)


# ---------------------------------------------------------------- paired rounds

def _rounds(n: int, seed: int, machine_sd: float = 0.3, pair_sd: float = 0.04):
    """Per-round baseline medians whose level wanders from round to round (a shared machine's noisy
    spells hit both systems of a round alike), and each round's own small pair noise."""
    rng = np.random.default_rng(seed)
    level = 0.2 * np.exp(rng.normal(0.0, machine_sd, n))
    return level, np.exp(rng.normal(0.0, pair_sd, n))


def test_fixed_ten_percent_slowdown_with_round_noise_is_detected():
    base, pair_noise = _rounds(12, seed=3)
    candidate = base * 1.10 * pair_noise
    r = paired_ratio(candidate, base)
    assert r.n_pairs == 12 and r.interval_method == "BCa"
    assert r.ci_low < 1.10 < r.ci_high, r
    assert r.ci_low > 1.0 and r.above_one()
    assert r.p_value is not None and r.p_value < 0.01
    assert classify_change(r, threshold=0.05).verdict == "regression"


def test_pure_noise_interval_contains_one():
    base, pair_noise = _rounds(12, seed=4)
    r = paired_ratio(base * pair_noise, base)
    assert r.ci_low < 1.0 < r.ci_high, r
    assert not r.above_one() and not r.below_one()
    assert classify_change(r).verdict == "no change"


def test_pooling_would_hide_what_pairing_shows():
    """The machine's round-to-round drift (30%) dwarfs the 10% effect; pairing removes it."""
    base, pair_noise = _rounds(10, seed=5, machine_sd=0.3, pair_sd=0.02)
    r = paired_ratio(base * 1.10 * pair_noise, base)
    assert r.noise < 0.05  # the spread of log-ratios is the pair noise, not the drift
    assert r.above_one()


def test_geometric_mean_of_round_ratios_by_hand():
    r = paired_ratio([2.0, 4.0, 1.0], [1.0, 1.0, 1.0])
    assert r.ratio == pytest.approx((2.0 * 4.0 * 1.0) ** (1 / 3))
    assert r.round_ratios == (2.0, 4.0, 1.0)
    assert r.noise == pytest.approx(np.std(np.log([2.0, 4.0, 1.0]), ddof=1))
    assert r.p_value is None  # fewer than 6 pairs


def test_interval_is_seeded_and_deterministic():
    base, pair_noise = _rounds(8, seed=6)
    assert paired_ratio(base * pair_noise, base, seed=1) == paired_ratio(base * pair_noise, base, seed=1)


def test_constant_ratios_give_a_point_interval():
    r = paired_ratio([3.0, 6.0, 1.5], [1.5, 3.0, 0.75])
    assert (r.ci_low, r.ci_high, r.interval_method) == (pytest.approx(2.0), pytest.approx(2.0), "degenerate")


@pytest.mark.parametrize("n", [0, 1, 2])
def test_fewer_than_three_pairs_say_too_few_rounds(n):
    r = paired_ratio([1.2] * n, [1.0] * n)
    assert not r.has_interval and r.interval_text() == "too few rounds"
    assert classify_change(r).verdict == "too few rounds"


def test_wider_confidence_gives_a_wider_interval():
    base, pair_noise = _rounds(10, seed=8)
    r90 = paired_ratio(base * pair_noise, base, confidence=0.90)
    r99 = paired_ratio(base * pair_noise, base, confidence=0.99)
    assert r99.ci_low <= r90.ci_low < r90.ci_high <= r99.ci_high


def test_paired_ratio_rejects_bad_arguments():
    with pytest.raises(ValueError):
        paired_ratio([1.0], [1.0], confidence=1.5)
    with pytest.raises(ValueError):
        paired_ratio([1.0, 2.0], [1.0])
    with pytest.raises(ValueError):
        paired_ratio([1.0], [0.0])


def _trial(medians: dict[int, float | None]) -> dict:
    return {"rounds": [{"round": r, "status": "ok" if m else "error", "median_s": m} for r, m in medians.items()]}


def test_trials_pair_only_the_rounds_both_completed():
    base = _trial({1: 2.0, 2: 2.2, 3: None, 4: 2.0})
    system = _trial({1: 1.0, 2: 1.1, 3: 1.0, 4: None})
    r = speedup(base, system)
    assert r.rounds == (1, 2) and r.round_ratios == (2.0, 2.0) and r.ratio == pytest.approx(2.0)
    assert not r.has_interval


def test_small_real_change_is_not_flagged_below_the_threshold():
    base, pair_noise = _rounds(12, seed=9, pair_sd=0.005)
    r = paired_ratio(base * 1.03 * pair_noise, base)
    assert r.above_one()  # statistically real ...
    assert classify_change(r, threshold=0.05).verdict == "no change"  # ... but smaller than 5%
    assert classify_change(r, threshold=0.01).verdict == "regression"


def test_clear_speedup_is_an_improvement():
    base, pair_noise = _rounds(12, seed=10)
    r = paired_ratio(base * 0.8 * pair_noise, base)
    assert r.below_one() and classify_change(r).verdict == "improvement"
