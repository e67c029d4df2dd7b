"""Seeds -> one point per (series, setting); the Pareto frontier over points.

A point is the mean over the seeds of one dictionary setting (same series, same L0 target), with
the 95 % confidence interval of that mean (Student t over seeds: mean ± t(0.975, n−1)·s/√n) as
its spread, in L0 and in the metric. With one seed there is no interval (the bar is the point).
Whether two series differ is not read off these bars: the summary's verdicts pair the seeds
(dictlearn.analysis.verdicts).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

from scipy import stats

from dictlearn.analysis.results import Series, setting, value

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Point:
    """One dictionary setting, seeds aggregated: means, min..max and the 95 % interval of the
    mean (`*_lo`, `*_hi`) of the measured L0 and the metric."""

    series: Series
    setting: object
    l0: float
    l0_min: float
    l0_max: float
    y: float
    y_min: float
    y_max: float
    names: tuple[str, ...]
    l0_lo: float = math.nan
    l0_hi: float = math.nan
    y_lo: float = math.nan
    y_hi: float = math.nan

    @property
    def n_seeds(self) -> int:
        return len(self.names)


def mean_interval(values: list[float], confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """(mean, low, high): the Student-t interval of the mean; low = high = mean for one value."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, mean, mean
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def aggregate(lines: list[dict], metric: str, x: str = "l0") -> dict[Series, list[Point]]:
    """Lines with both `x` and `metric` -> {series: points sorted by mean x}."""
    buckets: dict[tuple, list[dict]] = defaultdict(list)
    for line in lines:
        if value(line, x) is not None and value(line, metric) is not None:
            buckets[(line["_series"], _hashable(setting(line)))].append(line)
    points: dict[Series, list[Point]] = defaultdict(list)
    for (series, key), members in buckets.items():
        xs = [value(line, x) for line in members]
        ys = [value(line, metric) for line in members]
        names = tuple(str(line.get("name") or line["_source"]) for line in members)
        (l0, l0_lo, l0_hi), (y, y_lo, y_hi) = mean_interval(xs), mean_interval(ys)
        points[series].append(Point(series, key, l0, min(xs), max(xs), y, min(ys), max(ys), names,
                                    l0_lo, l0_hi, y_lo, y_hi))
    return {series: sorted(pts, key=lambda p: p.l0) for series, pts in sorted(points.items())}


def _hashable(key):
    return tuple(key) if isinstance(key, list) else key


def pareto(points: list[Point], higher_is_better: bool = False) -> list[Point]:
    """Points no other point dominates: fewer-or-equal L0 and a better-or-equal metric, one
    strictly. On the seed means, across every series of the figure."""
    sign = -1.0 if higher_is_better else 1.0

    def dominates(a: Point, b: Point) -> bool:
        no_worse = a.l0 <= b.l0 and sign * a.y <= sign * b.y
        return no_worse and (a.l0 < b.l0 or sign * a.y < sign * b.y)

    return [p for p in points if not any(dominates(q, p) for q in points if q is not p)]
