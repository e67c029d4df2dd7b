"""The statistics of a comparison's verdicts (dictlearn.analysis.verdicts writes them).

A verdict compares two series (architectures) on one metric at one L0, and says `better`, `worse`
or `not distinguishable` for the first series against the second. How each part is decided:

**L0 matched in fact.** Each seed of a series is a curve: the metric of its dictionaries against
their measured (held-out) L0, one point per L0 target. Between neighbouring points the metric is
interpolated linearly in log L0; outside the measured range nothing is extrapolated (NaN, "not
reached"). At each target the pair is compared at one common L0: the geometric mean of both
series' measured L0s there, moved into the range that every paired seed of both series reaches
when it lies outside, and kept only while it stays nearer that target than any other on a log
scale (half an octave beyond the end targets), so that two targets never compare the same thing.
Where no such L0 exists the record says the curves do not reach it. A dictionary whose measured L0
misses its target by more than 5 % is named in `off_target`. Curvature between two measured points
is an error no test below sees: points near the compared L0 keep it small.

**What is paired.** A seed fixes the initial weights and the data order, and the same seed gives
every architecture the same batches. Seed s of one series and seed s of the other form a pair, and
the test works on the per-seed differences d_s = a_s − b_s, in which what the batches did to both
cancels. A seed present on one side only is left out.

**The interval and the test.** With n paired seeds, d̄ and s² the mean and sample variance of
the d_s, and e_s the evaluation standard error of d_s (sqrt(e_a² + e_b²) from a bootstrap over
held-out documents, `dictlearn.metrics.bootstrap.ratio_se`, which evaluate records as
`<metric>_se`; 0 where a line records none):

    SE² = s²/n + mean(e_s²),   interval = d̄ ± t(0.975, n−1)·SE,   T = d̄/SE,   p = 2·P(t(n−1) > |T|)

The seed spread s² shows how much training varies, but not which documents happened to be held
out: when every seed is scored on the same documents that error is shared by all seeds, does not
average out over them, and is added whole. When each seed draws its own evaluation sample, s²
already holds it and the sum over-covers; so does treating a's and b's evaluation errors as
independent (scored on the same documents they move together). Without evaluation errors this is
exactly the paired t-test over seeds. The degrees of freedom stay n − 1 whatever the evaluation
part: that errs on the safe side (the added known variance makes T's tails lighter than t(n−1)'s),
while Welch–Satterthwaite's larger df is not safe with 3 seeds: it grows exactly when s² happens
to come out small, and in an A/A simulation with a small evaluation error it rejected 7 % of
cells at a nominal 5 %. The test is weak with few seeds: at n = 3 a difference must be 4.3
standard errors from zero for p = 0.05 in one cell, and further after the correction below; more
seeds buy more than anything else. With fewer than 2 paired seeds nothing is tested.

**Holm.** A report compares many cells (pairs × metrics × L0s). At α = 0.05 each, one identical
pair in twenty would still be called different, and over dozens of cells some call almost surely
would. Holm's step-down correction (the k-th smallest of m p-values is multiplied by m − k + 1,
then made non-decreasing) keeps the chance of any false claim in the whole report at α whatever
the dependence between cells, and never rejects less than Bonferroni. A cell is `better` or
`worse` (by the metric's direction) when its Holm p is at most α, else `not distinguishable`.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import numpy as np
from scipy import stats

ALPHA = 0.05  # family-wise error rate of one report's claims
CONFIDENCE = 0.95  # each cell's interval (not simultaneous: Holm decides the claims)
L0_TOLERANCE = 0.05  # a measured L0 this far (relative) from its target is flagged


# --- L0 matched in fact -------------------------------------------------------------------------


def interpolate_at_l0(l0s, values, at) -> np.ndarray:
    """One curve's metric at other L0s, linear in log L0; NaN outside the measured range.

    l0s, values: [n] measured points in any order (non-finite or L0 <= 0 points are dropped,
    repeated L0s averaged); at: scalar or [m] -> [m] float64.
    """
    curve = Curve.of(l0s, values)
    at = np.atleast_1d(np.asarray(at, dtype=np.float64))
    return np.full(at.shape, np.nan) if curve is None else curve.at(at)


class Curve(NamedTuple):
    """Measured points ready to interpolate along log L0: one or more columns (a metric, its
    standard error) that share the L0s."""

    log_l0: np.ndarray  # [points] ascending, unique
    columns: list[np.ndarray]  # each [points], averaged over repeated L0s
    low: float  # the lowest and highest measured L0 (the ends themselves: exp(log 16) may not be 16)
    high: float

    @classmethod
    def of(cls, l0s, *columns) -> Curve | None:
        """[n] L0s and [n] columns -> a Curve of the points with an L0 > 0 and finite columns, or None.
        (A curve has a handful of points: plain Python groups them faster than numpy calls would.)"""
        by_l0: dict[float, list[tuple]] = {}
        for point in zip(*(map(float, c) for c in (l0s, *columns))):
            if point[0] > 0 and all(map(math.isfinite, point)):
                by_l0.setdefault(point[0], []).append(point[1:])
        if not by_l0:
            return None
        x = sorted(by_l0)
        columns = [np.array([sum(p[i] for p in by_l0[l0]) / len(by_l0[l0]) for l0 in x]) for i in range(len(columns))]
        return cls(np.log(x), columns, x[0], x[-1])

    def at(self, l0: np.ndarray, column: int = 0) -> np.ndarray:
        """[m] L0s -> [m] values of one column; NaN outside low..high (never extrapolated)."""
        out = np.full(l0.shape, np.nan)
        inside = (l0 >= self.low) & (l0 <= self.high)
        out[inside] = np.interp(np.log(l0[inside]), self.log_l0, self.columns[column])
        return out


def off_target(l0, target, tolerance: float = L0_TOLERANCE) -> np.ndarray:
    """Whether each measured L0 misses its target by more than `tolerance` (relative); [n] -> [n]."""
    l0, target = np.asarray(l0, dtype=np.float64), np.asarray(target, dtype=np.float64)
    return np.abs(l0 - target) > tolerance * target


def common_l0(l0s_a, l0s_b, targets) -> np.ndarray:
    """Where a pair is compared at each target (module docstring); NaN where the curves share none.

    l0s_a, l0s_b: [seeds, targets] measured L0 of each paired seed's dictionary at each target
    (NaN where it has none); targets: [targets] ascending -> [targets].
    """
    a, b = np.asarray(l0s_a, dtype=np.float64), np.asarray(l0s_b, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.float64)
    both = np.concatenate([a, b])  # [2 seeds, targets]
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: NaN is the answer there
        low, high = np.nanmax(np.nanmin(both, axis=1)), np.nanmin(np.nanmax(both, axis=1))
        middle = np.exp(np.nanmean(np.log(both), axis=0))  # geometric mean per target
    if not low <= high:  # some curve is empty, or two curves share no L0 at all
        return np.full(targets.shape, np.nan)
    l0 = np.clip(middle, low, high)
    edges = np.sqrt(targets[1:] * targets[:-1])
    lower = np.concatenate([[targets[0] / math.sqrt(2)], edges]) if targets.size else targets
    upper = np.concatenate([edges, [targets[-1] * math.sqrt(2)]]) if targets.size else targets
    return np.where((l0 >= lower) & (l0 <= upper), l0, np.nan)


# --- Evaluation noise ---------------------------------------------------------------------------


# --- The paired test and Holm -------------------------------------------------------------------


def paired_test(differences, evaluation_se=None, confidence: float = CONFIDENCE) -> dict[str, np.ndarray]:
    """The module docstring's test, one row per cell.

    differences: [cells, seeds] a − b per paired seed, NaN-padded; evaluation_se: same shape, the
    standard error of each difference from evaluation (None: 0) -> {"n", "mean", "low", "high",
    "t", "df", "p"}, each [cells]; NaN where n < 2 or the standard error is 0 (up to rounding).
    """
    d = np.atleast_2d(np.asarray(differences, dtype=np.float64))
    e = np.zeros_like(d) if evaluation_se is None else np.atleast_2d(np.asarray(evaluation_se, dtype=np.float64))
    valid = np.isfinite(d)
    n = valid.sum(axis=1)
    with np.errstate(all="ignore"):
        mean = np.where(valid, d, 0).sum(axis=1) / n
        variance = np.where(valid, (d - mean[:, None]) ** 2, 0).sum(axis=1) / (n - 1)
        evaluation = np.where(valid, np.nan_to_num(e) ** 2, 0).sum(axis=1) / n
        se = np.sqrt(variance / n + evaluation)
        scale = np.where(valid, np.abs(d), 0).max(axis=1, initial=0.0)
        testable = (n >= 2) & (se > 1e-12 * scale)  # equal differences leave only rounding (1e-17) as spread
        df = np.where(testable, n - 1, np.nan)  # not Satterthwaite's: see the module docstring
        t = np.where(testable, mean / se, np.nan)
        p = np.where(testable, 2 * stats.t.sf(np.abs(t), df), np.nan)
        half = np.where(testable, stats.t.ppf(0.5 + confidence / 2, df) * se, np.nan)
    mean = np.where(n > 0, mean, np.nan)
    return {"n": n, "mean": mean, "low": mean - half, "high": mean + half, "t": t, "df": df, "p": p}


def holm(p) -> np.ndarray:
    """Holm-adjusted p-values over the finite entries (NaN stays NaN and is not counted); [m] -> [m]."""
    p = np.asarray(p, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    index = np.flatnonzero(np.isfinite(p))
    order = index[np.argsort(p[index], kind="stable")]
    m = order.size
    out[order] = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    return out


def claims(mean, p_adjusted, direction: str, alpha: float = ALPHA) -> list[str]:
    """`better` | `worse` | `not distinguishable` for a against b; [cells] -> [cells]."""
    sign = {"lower": -1.0, "higher": 1.0}[direction]
    words = []
    for m, p in zip(np.asarray(mean, dtype=np.float64), np.asarray(p_adjusted, dtype=np.float64)):
        words.append(("better" if sign * m > 0 else "worse") if p <= alpha and m != 0 else "not distinguishable")
    return words
