"""The gate's three-valued verdict, from the rounds of two independent blocks.

Pure functions of measured numbers (no processes, no clocks), so the rule is
tested on its own. Ratios are candidate time / baseline time: above 1 is slower.

* FAIL: the pooled slowdown is at least the fail threshold, max(threshold,
  NOISE_MULTIPLE x the measured round-to-round noise); the pooled interval's
  lower end exceeds 1; so does each block's on its own (the second block, in
  fresh processes, confirms the first); and the one-sided p-value, Holm-adjusted
  across the suite, is below 1 - confidence.
* PASS: the pooled interval's upper end is below 1 + threshold and no block's
  estimate reaches it. The *nominal* threshold, not the noise-scaled one: noise
  makes a FAIL harder to earn and must never make a PASS easier.
* otherwise UNDECIDED, which becomes INCONCLUSIVE when the time budget is spent.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from harness import stats

NOISE_MULTIPLE = 3.0
FAIL, PASS, UNDECIDED, INCONCLUSIVE = "FAIL", "PASS", "UNDECIDED", "INCONCLUSIVE"


@dataclass(frozen=True)
class Evidence:
    pooled: stats.PairedRatio
    blocks: tuple[stats.PairedRatio, ...]
    p_value: float | None  # one-sided, that the candidate is slower

    @property
    def noise(self) -> float | None:
        return self.pooled.noise

    def fail_threshold(self, threshold: float) -> float:
        noise = self.noise if self.noise is not None and math.isfinite(self.noise) else 0.0
        return max(threshold, NOISE_MULTIPLE * noise)

    def to_dict(self) -> dict:
        return {"pooled": self.pooled.to_dict(), "blocks": [b.to_dict() for b in self.blocks],
                "p_value": self.p_value}


def geometric_mean(values) -> float:
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values))


def paired_evidence(blocks: list[list[tuple[float, float]]], confidence: float) -> Evidence:
    """From (baseline, candidate) round values of each block (interleaved in the same processes' time)."""
    pairs = [pair for block in blocks for pair in block]
    pooled = stats.paired_ratio([c for _, c in pairs], [b for b, _ in pairs], confidence=confidence)
    per_block = tuple(stats.paired_ratio([c for _, c in block], [b for b, _ in block], confidence=confidence)
                      for block in blocks)
    p = stats.p_greater(pooled.round_ratios) if pooled.n_pairs else None
    return Evidence(pooled, per_block, p)


def stored_evidence(blocks: list[list[float]], stored: list[float], confidence: float) -> Evidence:
    """From this run's normalised round values per block against a stored baseline's (independent samples)."""
    pooled = stats.independent_ratio([v for block in blocks for v in block], stored, confidence=confidence)
    per_block = tuple(stats.independent_ratio(block, stored, confidence=confidence) for block in blocks)
    return Evidence(pooled, per_block, pooled.p_value)


def decide(evidence: Evidence, threshold: float, alpha: float, p_adjusted: float | None = None) -> str:
    """FAIL, PASS or UNDECIDED (see the module docstring); `p_adjusted` defaults to the raw p-value."""
    pooled, blocks = evidence.pooled, evidence.blocks
    if not pooled.has_interval or not all(b.has_interval for b in blocks):
        return UNDECIDED
    p = evidence.p_value if p_adjusted is None else p_adjusted
    if (pooled.ratio >= 1 + evidence.fail_threshold(threshold) and pooled.ci_low > 1
            and all(b.ci_low > 1 for b in blocks) and p is not None and p < alpha):
        return FAIL
    if pooled.ci_high < 1 + threshold and all(b.ratio < 1 + threshold for b in blocks):
        return PASS
    return UNDECIDED


@dataclass
class ItemVerdict:
    """What the gate says about one (benchmark, system)."""

    benchmark: str
    system: str
    verdict: str
    reason: str
    threshold: float
    fail_threshold: float | None = None
    evidence: Evidence | None = None
    p_holm: float | None = None
    work_problems: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        data = asdict(self)
        data["evidence"] = self.evidence.to_dict() if self.evidence else None
        data["work_problems"] = list(self.work_problems)
        return data


def apply_holm(verdicts: list[ItemVerdict], confidence: float) -> None:
    """Holm-adjust the timing p-values across the suite and decide every timed item again with them."""
    alpha = 1 - confidence
    timed = [v for v in verdicts if v.evidence is not None and not v.work_problems]
    adjusted = stats.holm([v.evidence.p_value for v in timed])
    for item, p in zip(timed, adjusted, strict=True):
        item.p_holm = p
        decided = decide(item.evidence, item.threshold, alpha, p_adjusted=p if p is not None else 1.0)
        if decided != UNDECIDED:
            item.verdict = decided
        elif item.verdict in (FAIL, PASS):
            item.verdict = INCONCLUSIVE
            item.reason = "significant only before the Holm correction across the suite"
