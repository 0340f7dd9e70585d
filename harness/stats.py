"""Statistics of step times: descriptive summaries, and paired comparisons over rounds.

Why the round is the unit: the steps of one round share a process, a heap and
whatever noisy spell the shared machine is in, so they are not independent
samples; rounds are, and because the runner interleaves systems inside each
round, round r of system A and round r of system B saw the same spell. A
comparison is therefore made of *paired per-round ratios* (one per round in
which both trials succeeded), never of pooled steps:

* the ratio is the geometric mean of the per-round ratios of round medians;
* its interval is a bootstrap over rounds (scipy.stats.bootstrap, BCa, on the
  mean log-ratio; percentile when BCa degenerates), seeded so the same data
  give the same interval; with fewer than MIN_PAIRS_FOR_INTERVAL pairs there is
  no interval ("too few rounds");
* a Wilcoxon signed-rank p-value on the log-ratios when there are at least
  MIN_PAIRS_FOR_WILCOXON pairs;
* the noise of a benchmark is the spread (sample standard deviation) of its
  per-round log-ratios.

Descriptive summaries (median, IQR, Tukey outlier counts, never dropped) still
describe each trial's pooled steps, because a reader wants to see them.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

TUKEY_FENCE = 1.5
MIN_PAIRS_FOR_INTERVAL = 3
MIN_PAIRS_FOR_WILCOXON = 6
CONFIDENCE = 0.95
N_RESAMPLES = 4999
BOOT_SEED = 0
TOO_FEW_ROUNDS = "too few rounds"


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


@dataclass(frozen=True)
class PairedRatio:
    """numerator/denominator from paired rounds; ratio > 1 means the numerator's times are larger.

    For a speedup the numerator is the baseline (speedup = baseline time / system time);
    for a slowdown check it is the candidate."""

    n_pairs: int
    ratio: float | None  # geometric mean of the per-round ratios; None with no pair
    ci_low: float | None  # None below MIN_PAIRS_FOR_INTERVAL pairs
    ci_high: float | None
    confidence: float
    interval_method: str  # "BCa" | "percentile" | "degenerate" (all ratios equal) | "none"
    noise: float | None  # sample stdev of the per-round log-ratios (about the relative round-to-round spread)
    p_value: float | None  # two-sided Wilcoxon signed-rank on the log-ratios; None below MIN_PAIRS_FOR_WILCOXON
    round_ratios: tuple[float, ...]
    rounds: tuple[int, ...] = ()  # the round numbers the pairs come from (1-based), when known

    @property
    def has_interval(self) -> bool:
        return self.ci_low is not None

    def interval_text(self, digits: int = 2) -> str:
        if not self.has_interval:
            return TOO_FEW_ROUNDS
        return f"[{self.ci_low:.{digits}f}, {self.ci_high:.{digits}f}]"

    def above_one(self) -> bool:
        """The whole interval lies above 1 (the numerator is really larger)."""
        return self.has_interval and self.ci_low > 1.0

    def below_one(self) -> bool:
        return self.has_interval and self.ci_high < 1.0

    def to_dict(self) -> dict:
        data = asdict(self)
        data["round_ratios"], data["rounds"] = list(self.round_ratios), list(self.rounds)
        return data


def _bootstrap_mean_interval(values: np.ndarray, confidence: float, n_resamples: int, seed: int):
    """(low, high, method) of the mean of `values`, bootstrapped over its entries."""
    from scipy import stats as scipy_stats

    if np.ptp(values) <= 1e-12:  # equal up to rounding: resampling cannot vary the mean
        return float(values.mean()), float(values.mean()), "degenerate"
    for method in ("BCa", "percentile"):
        result = scipy_stats.bootstrap((values,), np.mean, confidence_level=confidence, n_resamples=n_resamples,
                                       method=method, rng=np.random.default_rng(seed))
        low, high = result.confidence_interval
        if math.isfinite(low) and math.isfinite(high):
            return float(low), float(high), method
    raise ArithmeticError("bootstrap gave no finite interval")  # unreachable for finite, non-constant data


def paired_ratio(numerator, denominator, confidence: float = CONFIDENCE, n_resamples: int = N_RESAMPLES,
                 seed: int = BOOT_SEED, rounds=None) -> PairedRatio:
    """Paired comparison of two equally long lists of per-round times (round i of each is a pair)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1, got {confidence!r}")
    num = np.asarray(list(numerator), dtype=np.float64)
    den = np.asarray(list(denominator), dtype=np.float64)
    if num.shape != den.shape or num.ndim != 1:
        raise ValueError(f"paired samples must be two lists of equal length, got {num.shape} and {den.shape}")
    if num.size and (not np.all(np.isfinite(num) & (num > 0)) or not np.all(np.isfinite(den) & (den > 0))):
        raise ValueError("paired samples must be finite positive times")
    rounds = tuple(int(r) for r in rounds) if rounds is not None else tuple(range(1, num.size + 1))
    n = int(num.size)
    if n == 0:
        return PairedRatio(0, None, None, None, confidence, "none", None, None, (), ())
    log_ratios = np.log(num) - np.log(den)
    ratio = float(np.exp(log_ratios.mean()))
    noise = float(log_ratios.std(ddof=1)) if n > 1 else None
    low = high = None
    method = "none"
    if n >= MIN_PAIRS_FOR_INTERVAL:
        lo, hi, method = _bootstrap_mean_interval(log_ratios, confidence, n_resamples, seed)
        low, high = math.exp(lo), math.exp(hi)
    p_value = None
    if n >= MIN_PAIRS_FOR_WILCOXON:
        from scipy import stats as scipy_stats

        p_value = 1.0 if np.all(log_ratios == 0) else float(scipy_stats.wilcoxon(log_ratios).pvalue)
    return PairedRatio(n, ratio, low, high, confidence, method, noise, p_value,
                       tuple(float(r) for r in np.exp(log_ratios)), rounds)


def round_medians(trial: dict) -> dict[int, float]:
    """{round number: median step time} over a trial record's successful rounds."""
    return {r["round"]: r["median_s"] for r in trial.get("rounds") or []
            if r.get("status") == "ok" and r.get("median_s") is not None}


def paired_rounds(numerator_trial: dict, denominator_trial: dict) -> tuple[list[int], list[float], list[float]]:
    """(round numbers, numerator medians, denominator medians) for the rounds both trials completed."""
    a, b = round_medians(numerator_trial), round_medians(denominator_trial)
    common = sorted(set(a) & set(b))
    return common, [a[r] for r in common], [b[r] for r in common]


def trial_ratio(numerator_trial: dict, denominator_trial: dict, **kwargs) -> PairedRatio:
    """Paired ratio of two trial records of one run (their rounds were interleaved)."""
    common, num, den = paired_rounds(numerator_trial, denominator_trial)
    return paired_ratio(num, den, rounds=common, **kwargs)


def speedup(baseline_trial: dict, trial: dict, **kwargs) -> PairedRatio:
    """Speedup of `trial` over `baseline_trial` (above 1: faster), from their paired rounds.

    The one definition the run summary, the reports and the gate share."""
    return trial_ratio(baseline_trial, trial, **kwargs)


@dataclass(frozen=True)
class Comparison:
    """A candidate against a baseline: ratio = candidate time / baseline time (above 1: slower)."""

    paired: PairedRatio
    threshold: float
    verdict: str  # "regression" | "improvement" | "no change" | "too few rounds"

    @property
    def is_regression(self) -> bool:
        return self.verdict == "regression"


def classify_change(paired: PairedRatio, threshold: float = 0.05) -> Comparison:
    """A change counts only when it is both large and statistically real (asv/benchstat's rule).

    Regression: the ratio exceeds 1 + threshold and the interval's lower end exceeds 1.
    Improvement: the ratio is below 1 - threshold and the interval's upper end is below 1.
    Otherwise "no change"; without an interval, "too few rounds"."""
    if not 0 <= threshold < 1:
        raise ValueError(f"threshold must be in [0, 1), got {threshold!r}")
    if not paired.has_interval:
        verdict = TOO_FEW_ROUNDS
    elif paired.ratio > 1 + threshold and paired.above_one():
        verdict = "regression"
    elif paired.ratio < 1 - threshold and paired.below_one():
        verdict = "improvement"
    else:
        verdict = "no change"
    return Comparison(paired, threshold, verdict)


def is_finite_positive(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0


# ----------------------------------------------------------------- for the gate

def p_greater(values) -> float | None:
    """One-sided Wilcoxon signed-rank p-value that the log-ratios' centre is above 0 (a slowdown);
    None below MIN_PAIRS_FOR_WILCOXON values."""
    from scipy import stats as scipy_stats

    logs = np.log(_as_array(values, "ratios"))
    if logs.size < MIN_PAIRS_FOR_WILCOXON:
        return None
    if np.all(logs == 0):
        return 1.0
    return float(scipy_stats.wilcoxon(logs, alternative="greater").pvalue)


def independent_ratio(numerator, denominator, confidence: float = CONFIDENCE, n_resamples: int = N_RESAMPLES,
                      seed: int = BOOT_SEED) -> PairedRatio:
    """Ratio of geometric means of two independent samples (a stored baseline's rounds against this
    run's): a two-sample bootstrap of the difference of mean logs; p is one-sided Mann-Whitney
    (numerator larger). n_pairs is the smaller sample's size; no per-round ratios exist."""
    from scipy import stats as scipy_stats

    num, den = np.log(_as_array(numerator)), np.log(_as_array(denominator))
    diff = float(num.mean() - den.mean())
    noise = float(np.sqrt((num.var(ddof=1) + den.var(ddof=1)) / 2)) if min(num.size, den.size) > 1 else None
    n = int(min(num.size, den.size))
    low = high = p_value = None
    method = "none"
    if n >= MIN_PAIRS_FOR_INTERVAL:
        if np.ptp(num) <= 1e-12 and np.ptp(den) <= 1e-12:
            low = high = math.exp(diff)
            method = "degenerate"
        else:
            for method in ("BCa", "percentile"):
                result = scipy_stats.bootstrap((num, den), lambda a, b, axis=-1: a.mean(axis) - b.mean(axis),
                                               confidence_level=confidence, n_resamples=n_resamples,
                                               method=method, rng=np.random.default_rng(seed), vectorized=True)
                lo, hi = result.confidence_interval
                if math.isfinite(lo) and math.isfinite(hi):
                    low, high = math.exp(lo), math.exp(hi)
                    break
    if n >= MIN_PAIRS_FOR_WILCOXON:
        p_value = float(scipy_stats.mannwhitneyu(num, den, alternative="greater").pvalue)
    return PairedRatio(n, math.exp(diff), low, high, confidence, method, noise, p_value, (), ())


def holm(p_values: list[float | None]) -> list[float | None]:
    """Holm step-down adjusted p-values (None stays None and does not count as a test)."""
    tested = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
    m = len(tested)
    adjusted: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(tested):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted
