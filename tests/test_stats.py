"""Summary statistics and ratio tests, checked against numbers worked out by hand."""
import math

import pytest

from harness.stats import bootstrap_ratio_ci, compare_samples, is_regression, median_ratio, quantile, summarize


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


def test_bootstrap_interval_is_deterministic_and_bounded():
    a = [2.0, 2.05, 2.1, 2.0, 2.02, 2.08]
    b = [1.0, 1.05, 1.01, 1.03, 1.0, 1.02]
    low, high = bootstrap_ratio_ci(a, b, seed=7)
    assert (low, high) == bootstrap_ratio_ci(a, b, seed=7)
    # every resampled median of a lies in [2.0, 2.1] and of b in [1.0, 1.05]
    assert 2.0 / 1.05 - 1e-12 <= low <= median_ratio(a, b) <= high <= 2.1 / 1.0 + 1e-12
    assert median_ratio(a, b) == pytest.approx(2.035 / 1.015)


def test_bootstrap_of_constant_samples_is_a_point():
    assert bootstrap_ratio_ci([3.0] * 5, [1.5] * 4) == (2.0, 2.0)


def test_wider_confidence_gives_a_wider_interval():
    a = [1.0, 1.3, 0.9, 1.2, 1.1, 1.4, 0.95, 1.25]
    b = [1.0, 1.1, 0.9, 1.05, 0.95, 1.02, 0.98, 1.08]
    low90, high90 = bootstrap_ratio_ci(a, b, confidence=0.90)
    low99, high99 = bootstrap_ratio_ci(a, b, confidence=0.99)
    assert low99 <= low90 < high90 <= high99


def test_bootstrap_rejects_bad_arguments():
    with pytest.raises(ValueError):
        bootstrap_ratio_ci([1.0], [1.0], confidence=1.5)
    with pytest.raises(ValueError):
        bootstrap_ratio_ci([1.0], [0.0])


BASE = [1.00, 1.01, 0.99, 1.02, 0.98, 1.00, 1.01, 0.99, 1.00, 1.02]


def test_clear_slowdown_is_a_regression():
    slower = [x * 1.20 for x in BASE]
    c = compare_samples(BASE, slower)
    assert c.ratio == pytest.approx(1.20)
    assert c.verdict == "regression" and c.ci_low > 1.05
    assert is_regression(BASE, slower)


def test_real_but_small_slowdown_is_not_flagged():
    # 3% slower, every sample scaled: statistically real (CI above 1), but below the 5% threshold
    slightly = [x * 1.03 for x in BASE]
    c = compare_samples(BASE, slightly)
    assert c.ci_low > 1.0
    assert c.verdict == "no change"
    assert not is_regression(BASE, slightly)
    assert is_regression(BASE, slightly, threshold=0.01)  # interval is about [1.015, 1.046]


def test_large_but_noisy_difference_is_not_flagged():
    noisy_base = [1.0, 2.0, 1.0, 2.0, 1.0, 2.0, 1.0, 2.0]
    noisy_new = [1.1, 2.2, 1.1, 2.2, 1.1, 2.2, 1.1, 2.2]
    c = compare_samples(noisy_base, noisy_new)
    assert c.ratio == pytest.approx(1.65 / 1.5)  # 10% slower at the median ...
    assert c.ci_low < 1.05  # ... but the interval does not exclude "no change"
    assert not c.is_regression


def test_clear_speedup_is_an_improvement_not_a_regression():
    faster = [x * 0.8 for x in BASE]
    c = compare_samples(BASE, faster)
    assert c.verdict == "improvement" and c.ci_high < 0.95
    assert not is_regression(BASE, faster)


def test_too_few_samples_give_no_verdict():
    assert compare_samples([1.0, 1.0], [2.0, 2.0]).verdict == "insufficient samples"
