"""The decision rule (ued_fast.stats) against scipy and against Holm's method written out by hand."""
import math

import numpy as np
import pytest
from scipy import stats as sps

from ued_fast import stats


@pytest.mark.parametrize("n", [2, 3, 5, 8])
def test_paired_t_matches_scipy(n):
    rng = np.random.default_rng(n)
    a, b = rng.normal(0.8, 0.02, n), rng.normal(0.79, 0.02, n)
    mean, sd, lo, hi, p = stats.paired_t(a - b)
    ref = sps.ttest_rel(a, b)
    ci = ref.confidence_interval(0.95)
    assert p == pytest.approx(ref.pvalue, rel=1e-10)
    assert (lo, hi) == pytest.approx((ci.low, ci.high), rel=1e-10)
    assert mean == pytest.approx(np.mean(a - b), rel=1e-12)
    assert sd == pytest.approx(np.std(a - b, ddof=1), rel=1e-12)
    lo99, hi99 = stats.paired_t(a - b, alpha=0.01)[2:4]
    ci99 = ref.confidence_interval(0.99)
    assert (lo99, hi99) == pytest.approx((ci99.low, ci99.high), rel=1e-10)


def test_paired_t_edge_cases():
    assert stats.paired_t([0.01]) == (0.01, pytest.approx(float("nan"), nan_ok=True), -math.inf, math.inf, 1.0)
    mean, sd, lo, hi, p = stats.paired_t([0.02, 0.02, 0.02])
    assert (lo, hi, p) == (0.02, 0.02, 0.0)
    assert stats.paired_t([0.0, 0.0])[4] == 1.0
    for bad in ([], [[1.0, 2.0]], [float("nan"), 1.0]):
        with pytest.raises(ValueError, match="diffs"):
            stats.paired_t(bad)
    with pytest.raises(ValueError, match="alpha"):
        stats.paired_t([0.1, 0.2], alpha=1.5)


def _holm_by_hand(p, alpha):
    """Holm (1979) written out: reject H_(1..j) while p_(i) <= alpha / (m - i + 1)."""
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    reject = [False] * m
    for rank, i in enumerate(order):
        if p[i] <= alpha / (m - rank):
            reject[i] = True
        else:
            break
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return reject, adjusted


def test_holm_textbook_example():
    # Four tests: sorted 0.01, 0.02, 0.03, 0.04 at alpha 0.05 -> levels 0.0125, 0.01667, 0.025, 0.05.
    p = [0.03, 0.01, 0.04, 0.02]
    levels, adjusted = stats.holm(p, 0.05)
    assert levels == pytest.approx([0.025, 0.0125, 0.05, 0.05 / 3])
    assert adjusted == pytest.approx([0.06, 0.04, 0.06, 0.06])
    assert [a <= 0.05 for a in adjusted] == [False, True, False, False]


@pytest.mark.parametrize("seed", range(20))
def test_holm_matches_hand_written_rule(seed):
    rng = np.random.default_rng(seed)
    p = rng.uniform(0, 0.08, size=int(rng.integers(1, 12))).tolist()
    levels, adjusted = stats.holm(p, 0.05)
    reject, adj_ref = _holm_by_hand(p, 0.05)
    assert adjusted == pytest.approx(adj_ref)
    assert [a <= 0.05 for a in adjusted] == reject


def _per_seed(rows: dict) -> dict:
    return {name: dict(enumerate(v)) for name, v in rows.items()}


def test_compare_rows_corrected_intervals_and_verdict():
    rng = np.random.default_rng(0)
    base = rng.normal(0.80, 0.01, 6)  # the seed's shared luck
    rows = _per_seed({
        "kd_uste_v1": base + 0.030 + rng.normal(0, 0.002, 6),
        "kd_uste_v2": base + 0.025 + rng.normal(0, 0.002, 6),
        "scratch": base,
        "kd_strong": base + 0.010 + rng.normal(0, 0.002, 6),
    })
    comps = stats.compare_rows(rows, ["kd_uste_v1", "kd_uste_v2"], ["kd_uste_v1", "kd_uste_v2", "scratch", "kd_strong"])
    pairs = [(c.row, c.other) for c in comps]
    assert pairs == [("kd_uste_v1", "kd_uste_v2"), ("kd_uste_v1", "scratch"), ("kd_uste_v1", "kd_strong"),
                     ("kd_uste_v2", "kd_uste_v1"), ("kd_uste_v2", "scratch"), ("kd_uste_v2", "kd_strong")]
    for c in comps:  # the corrected interval is the t interval at the Holm level, hence wider
        d = np.array([rows[c.row][s] - rows[c.other][s] for s in range(6)])
        ci = sps.ttest_rel(d, np.zeros(6)).confidence_interval(1 - c.holm_level)
        assert (c.holm_ci_low, c.holm_ci_high) == pytest.approx((ci.low, ci.high), rel=1e-9)
        assert c.holm_ci_low <= c.ci_low and c.holm_ci_high >= c.ci_high
    # all corrected intervals exclude 0 exactly when Holm rejects every null
    assert all(c.holm_ci_low > 0 or c.holm_ci_high < 0 for c in comps) == all(c.holm_p < 0.05 for c in comps)
    # v1 vs v2 and v2 vs v1 point opposite ways: one interval must lie below 0 or include it
    code, line = stats.verdict(comps)
    assert code != "holds"
    only_others = stats.compare_rows(rows, ["kd_uste_v1", "kd_uste_v2"], ["scratch", "kd_strong"])
    code, line = stats.verdict(only_others)
    assert code == "holds" and line.startswith("the claim holds") and "6 paired seeds" in line
    assert stats.verdict(only_others, min_seeds=7)[0] == "undecided"
    assert stats.verdict(only_others, uninformative=["kd_uste_v2"])[0] == "undecided"


def test_verdict_contradicted_and_not_shown():
    rng = np.random.default_rng(1)
    base = rng.normal(0.8, 0.01, 5)
    worse = _per_seed({"kd_uste_v1": base - 0.03 + rng.normal(0, 0.002, 5), "scratch": base})
    assert stats.verdict(stats.compare_rows(worse, ["kd_uste_v1"], ["scratch"]))[0] == "contradicted"
    noise = _per_seed({"kd_uste_v1": base + rng.normal(0, 0.02, 5), "scratch": base})
    assert stats.verdict(stats.compare_rows(noise, ["kd_uste_v1"], ["scratch"]))[0] in ("not shown", "contradicted")


def test_compare_rows_bad_input():
    with pytest.raises(KeyError, match="kd_uste_v1"):
        stats.compare_rows({"scratch": {0: 0.5}}, ["kd_uste_v1"], ["scratch"])
    with pytest.raises(ValueError, match="share no seed"):
        stats.compare_rows({"a": {0: 0.5}, "b": {1: 0.5}}, ["a"], ["b"])
