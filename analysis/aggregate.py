"""Seeds -> one point per (series, setting); the Pareto frontier over points.

A point is the mean over the seeds of one dictionary setting (same series, same L0 target), with
the seeds' full range (min to max) as its spread. With two or three seeds the range is the
honest summary; a standard deviation of two numbers says little. Two points whose ranges overlap
are called "not separable" by the summary.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from dictlearn.analysis.results import Series, setting, value


@dataclass(frozen=True)
class Point:
    """One dictionary setting, seeds aggregated: means and min..max of the measured L0 and metric."""

    series: Series
    setting: object
    l0: float
    l0_min: float
    l0_max: float
    y: float
    y_min: float
    y_max: float
    names: tuple[str, ...]

    @property
    def n_seeds(self) -> int:
        return len(self.names)


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
        points[series].append(Point(series, key, _mean(xs), min(xs), max(xs), _mean(ys), min(ys), max(ys), names))
    return {series: sorted(pts, key=lambda p: p.l0) for series, pts in sorted(points.items())}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


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


def ranges_overlap(a: Point, b: Point) -> bool:
    """Whether the seeds' min..max of the metric of two points overlap (ends touching count)."""
    return a.y_min <= b.y_max and b.y_min <= a.y_max
