"""Summary statistics and ratio tests for step-time samples.

Why medians and bootstrap intervals: step times on shared machines have heavy
right tails (a background job can slow a step 3-13x), so the median and the
interquartile range describe a trial better than mean and stdev, and a ratio
of medians compared through a bootstrap interval tells a real change from noise
without assuming normality. Outliers are counted (Tukey's 1.5*IQR fences),
never dropped.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

TUKEY_FENCE = 1.5
MIN_SAMPLES_FOR_VERDICT = 3


def _as_array(samples, what: str = "samples") -> np.ndarray:
    values = np.asarray(list(samples), dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"{what} must be a non-empty list of numbers")
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{what} contain a non-finite value")
    return values


def quantile(samples, q: float) -> float:
    """Quantile by linear interpolation between order statistics (numpy's default, Hyndman-Fan type 7)."""
    return float(np.quantile(_as_array(samples), q, method="linear"))


def summarize(samples: list[float]) -> dict:
    """n, median, mean, stdev (sample, n-1; None for one sample), min, max, q1, q3, iqr, Tukey outlier counts."""
    values = _as_array(samples)
    q1, median, q3 = (float(v) for v in np.quantile(values, [0.25, 0.5, 0.75], method="linear"))
    iqr = q3 - q1
    low_fence, high_fence = q1 - TUKEY_FENCE * iqr, q3 + TUKEY_FENCE * iqr
    return {
        "n": int(values.size),
        "median": median,
        "mean": float(values.mean()),
        "stdev": float(values.std(ddof=1)) if values.size > 1 else None,
        "min": float(values.min()),
        "max": float(values.max()),
        "q1": q1,
        "q3": q3,
        "iqr": iqr,
        "outliers_low": int(np.count_nonzero(values < low_fence)),
        "outliers_high": int(np.count_nonzero(values > high_fence)),
    }


def median_ratio(a, b) -> float:
    """median(a) / median(b)."""
    return float(np.median(_as_array(a, "a"))) / float(np.median(_as_array(b, "b")))


def bootstrap_ratio_ci(a, b, confidence: float = 0.95, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval for median(a)/median(b).

    a and b are resampled independently (they are separate trials). Seeded, so
    the same inputs always give the same interval.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1, got {confidence!r}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be positive, got {n_boot!r}")
    a_values, b_values = _as_array(a, "a"), _as_array(b, "b")
    if np.any(b_values <= 0):
        raise ValueError("b must be positive to form a ratio")
    rng = np.random.default_rng(seed)
    a_boot = np.median(a_values[rng.integers(0, a_values.size, size=(n_boot, a_values.size))], axis=1)
    b_boot = np.median(b_values[rng.integers(0, b_values.size, size=(n_boot, b_values.size))], axis=1)
    ratios = a_boot / b_boot
    tail = (1 - confidence) / 2
    low, high = np.quantile(ratios, [tail, 1 - tail], method="linear")
    return float(low), float(high)


@dataclass(frozen=True)
class Comparison:
    """new vs baseline step times: ratio = median(new)/median(baseline); > 1 means slower."""

    ratio: float
    ci_low: float
    ci_high: float
    threshold: float
    verdict: str  # "regression" | "improvement" | "no change" | "insufficient samples"

    @property
    def is_regression(self) -> bool:
        return self.verdict == "regression"


def compare_samples(
    baseline_samples, new_samples, threshold: float = 0.05, confidence: float = 0.95, n_boot: int = 2000, seed: int = 0
) -> Comparison:
    """A change counts only when it is both larger than the threshold and statistically real.

    Regression: the point ratio and the whole confidence interval lie above
    1 + threshold. Improvement: both lie below 1 - threshold. With fewer than
    three samples on either side no verdict is given.
    """
    if not 0 <= threshold < 1:
        raise ValueError(f"threshold must be in [0, 1), got {threshold!r}")
    ratio = median_ratio(new_samples, baseline_samples)
    low, high = bootstrap_ratio_ci(new_samples, baseline_samples, confidence=confidence, n_boot=n_boot, seed=seed)
    if min(len(baseline_samples), len(new_samples)) < MIN_SAMPLES_FOR_VERDICT:
        verdict = "insufficient samples"
    elif ratio > 1 + threshold and low > 1 + threshold:
        verdict = "regression"
    elif ratio < 1 - threshold and high < 1 - threshold:
        verdict = "improvement"
    else:
        verdict = "no change"
    return Comparison(ratio=ratio, ci_low=low, ci_high=high, threshold=threshold, verdict=verdict)


def is_regression(
    baseline_samples, new_samples, threshold: float = 0.05, confidence: float = 0.95, seed: int = 0
) -> bool:
    """True when new step times are slower than baseline by more than threshold, and the CI says it is real."""
    comparison = compare_samples(baseline_samples, new_samples, threshold=threshold, confidence=confidence, seed=seed)
    return comparison.is_regression


def is_finite_positive(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0
