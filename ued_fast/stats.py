"""The decision rule of the experiment: paired per-seed comparisons with a Holm correction.

Every row of a seed starts from the same student initialization and sees the same batch order and
augmentation draws, so the per-seed difference d_s = acc(USTE row, s) - acc(other row, s) removes
the seed's shared luck. For each comparison: the mean of d over n seeds, its Student-t 95%
confidence interval (n - 1 degrees of freedom) and two-sided p-value. The m comparisons of one
dataset are corrected together with Holm's step-down method: sort the p-values ascending; the one
of rank i (1-based) is tested at level alpha / (m - i + 1), and its corrected interval is the t
interval at confidence 1 - alpha / (m - i + 1). Holm rejects every null exactly when every
corrected interval excludes 0 (lower bound > 0 when the difference is positive).

The claim holds on a dataset only if every corrected interval lies above 0 (USTE v1 AND v2 beat
every other row), with at least MIN_SEEDS seeds.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import numpy as np
from scipy import stats as _sps

MIN_SEEDS = 5
ALPHA = 0.05
# A KD row whose teacher does not beat the scratch student by this much (accuracy in [0, 1])
# cannot show that distillation helps: it is flagged uninformative.
MIN_TEACHER_GAIN = 0.02


@dataclass
class Comparison:
    row: str  # the USTE row
    other: str  # the row it is compared with
    n: int  # paired seeds
    mean_diff: float  # mean over seeds of acc(row) - acc(other), accuracy in [0, 1]
    sd_diff: float
    ci_low: float  # uncorrected 95% t interval
    ci_high: float
    p_value: float  # two-sided paired t test
    holm_level: float = float("nan")  # the level alpha / (m - i + 1) this comparison is tested at
    holm_ci_low: float = float("nan")  # the t interval at confidence 1 - holm_level
    holm_ci_high: float = float("nan")
    holm_p: float = float("nan")  # Holm-adjusted p-value (monotone step-down)

    def as_dict(self) -> dict:
        return asdict(self)


def _check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    return float(alpha)


def paired_t(diffs: Sequence[float], alpha: float = ALPHA) -> tuple[float, float, float, float, float]:
    """(mean, sd, ci_low, ci_high, p) of the paired differences: two-sided t interval at 1 - alpha
    and the two-sided p-value of mean = 0. n = 1 gives an infinite interval and p = 1; zero
    variance gives a zero-width interval (p = 0 unless the mean is 0)."""
    alpha = _check_alpha(alpha)
    d = np.asarray(diffs, dtype=np.float64)
    if d.ndim != 1 or d.size == 0:
        raise ValueError(f"diffs must be a non-empty 1-d sequence, got shape {d.shape}")
    if not np.all(np.isfinite(d)):
        raise ValueError("diffs must be finite")
    n = d.size
    mean = float(d.mean())
    if n == 1:
        return mean, float("nan"), -math.inf, math.inf, 1.0
    sd = float(d.std(ddof=1))
    se = sd / math.sqrt(n)
    if se == 0.0:
        return mean, sd, mean, mean, (1.0 if mean == 0.0 else 0.0)
    half = float(_sps.t.ppf(1 - alpha / 2, df=n - 1)) * se
    p = float(2 * _sps.t.sf(abs(mean) / se, df=n - 1))
    return mean, sd, mean - half, mean + half, p


def holm(p_values: Sequence[float], alpha: float = ALPHA) -> tuple[list[float], list[float]]:
    """Holm's step-down method: (per-test levels alpha / (m - rank + 1), adjusted p-values).
    Ties in p keep input order (a stable sort)."""
    alpha = _check_alpha(alpha)
    p = np.asarray(p_values, dtype=np.float64)
    m = p.size
    order = np.argsort(p, kind="stable")
    levels = np.empty(m)
    adjusted = np.empty(m)
    running = 0.0
    for rank, idx in enumerate(order):
        levels[idx] = alpha / (m - rank)
        running = max(running, min(1.0, (m - rank) * p[idx]))
        adjusted[idx] = running
    return levels.tolist(), adjusted.tolist()


def _paired_values(per_seed: Mapping[str, Mapping[int, float]], a: str, b: str) -> np.ndarray:
    seeds = sorted(set(per_seed[a]) & set(per_seed[b]))
    return np.asarray([per_seed[a][s] - per_seed[b][s] for s in seeds], dtype=np.float64)


def compare_rows(per_seed: Mapping[str, Mapping[int, float]], rows: Sequence[str], others: Sequence[str],
                 alpha: float = ALPHA) -> list[Comparison]:
    """Every row in `rows` against every row in `others` (itself excluded), paired over the seeds
    both have; Holm-corrected together. per_seed: row -> {seed: test accuracy}."""
    alpha = _check_alpha(alpha)
    for r in list(rows) + list(others):
        if r not in per_seed:
            raise KeyError(f"row {r!r} has no results; rows with results: {sorted(per_seed)}")
    comps = []
    for row in rows:
        for other in others:
            if other == row:
                continue
            d = _paired_values(per_seed, row, other)
            if d.size == 0:
                raise ValueError(f"rows {row!r} and {other!r} share no seed")
            mean, sd, lo, hi, p = paired_t(d, alpha)
            comps.append(Comparison(row, other, int(d.size), mean, sd, lo, hi, p))
    if not comps:
        return comps
    levels, adjusted = holm([c.p_value for c in comps], alpha)
    for c, level, adj in zip(comps, levels, adjusted):
        d = _paired_values(per_seed, c.row, c.other)
        _, _, c.holm_ci_low, c.holm_ci_high, _ = paired_t(d, level)
        c.holm_level, c.holm_p = level, adj
    return comps


def verdict(comparisons: Sequence[Comparison], *, min_seeds: int = MIN_SEEDS,
            uninformative: Sequence[str] = ()) -> tuple[str, str]:
    """(code, sentence). code: 'holds' (every corrected interval above 0, enough seeds, no USTE
    teacher flagged), 'contradicted' (some corrected interval entirely below 0: an other row is
    better), 'not shown' (otherwise), 'undecided' (fewer than min_seeds seeds, or a USTE row whose
    teacher does not beat the scratch student: uninformative)."""
    if not comparisons:
        return "undecided", "undecided: no comparisons"
    n = min(c.n for c in comparisons)
    below = [c for c in comparisons if c.holm_ci_high < 0]
    above = [c for c in comparisons if c.holm_ci_low > 0]
    worst = min(comparisons, key=lambda c: c.holm_ci_low)
    bad_rows = sorted({c.row for c in comparisons} & set(uninformative))
    detail = (f"{len(above)}/{len(comparisons)} Holm-corrected 95% CIs above 0, {len(below)} below; "
              f"lowest bound {100 * worst.holm_ci_low:+.2f} points ({worst.row} - {worst.other}); {n} paired seeds")
    if n < min_seeds:
        return "undecided", f"undecided: fewer than {min_seeds} seeds ({detail})"
    if bad_rows:
        return "undecided", f"undecided: the teachers of {', '.join(bad_rows)} do not beat the scratch student ({detail})"
    if len(above) == len(comparisons):
        return "holds", f"the claim holds ({detail})"
    if below:
        return "contradicted", f"the claim is contradicted ({detail})"
    return "not shown", f"the claim is not shown ({detail})"
