"""What the report says about a dictionary the run did not train (`dictlearn compare --include`).

An included dictionary is one point: one set of weights, no seeds. The run's own series are
compared by a paired test over seeds (dictlearn.analysis.verdicts); nothing can be paired with a
dictionary that has no seeds, so no verdict is formed for it. What the report can say is where the
point lies: at its own measured L0, each run series of the same mapping is read as the summary
reads it (its seeds' curves interpolated along log L0, never extrapolated), and the point is placed
against that series' seeds (their range) and the 95 % interval of their mean (Student t over
seeds). Lying outside the interval says this dictionary differs from that series' mean at this L0;
it does not say that its architecture or its training recipe is better or worse, since one training
run of it says nothing about its own seed-to-seed spread.
"""

from __future__ import annotations

import math

from dictlearn.analysis.aggregate import aggregate, mean_interval, pareto
from dictlearn.analysis.results import is_outside, series_label, value
from dictlearn.analysis.statistics import interpolate_at_l0

#: (metric, name, True when higher is better): the frontier metrics the summary ranks by
METRICS = (("fvu", "FVU", False), ("ce_loss_recovered", "CE loss recovered", True), ("kl_div", "KL", False))


def _mapping(line: dict) -> str:
    return "SAEs" if line.get("mapping") in (None, "sae") else "transcoders"


def against_series(line: dict, trained: list[dict], metric: str) -> list[tuple[str, list[float]]]:
    """[(series label, [each seed's value at the included line's L0])] of the run's series of the
    same mapping whose seeds' curves reach that L0 (an empty list for one that does not)."""
    l0 = value(line, "l0")
    curves: dict[str, dict] = {}
    for other in trained:
        x, y = value(other, "l0"), value(other, metric)
        if x is not None and y is not None and _mapping(other) == _mapping(line):
            curves.setdefault(series_label(other["_series"]), {}).setdefault(other.get("seed"), []).append((x, y))
    found = []
    for label, seeds in curves.items():
        at = [float(interpolate_at_l0([p[0] for p in pts], [p[1] for p in pts], l0)[0]) for pts in seeds.values()]
        found.append((label, [y for y in at if math.isfinite(y)]))
    return found


def place(y: float, other: str, seeds: list[float], higher_is_better: bool) -> str:
    """Where `y` lies against series `other`'s seeds at the same L0, in words."""
    mean, low, high = mean_interval(seeds)
    side = "better than" if (y > mean) == higher_is_better else "worse than"
    if len(seeds) < 2:
        return f"{side} {other}'s one seed ({_n(mean)}; no interval)"
    spread = f"seeds {_n(min(seeds))}–{_n(max(seeds))}, 95 % interval of the mean [{_n(low)}, {_n(high)}]"
    beyond_seeds, beyond_interval = not min(seeds) <= y <= max(seeds), not low <= y <= high
    if beyond_seeds and beyond_interval:
        return f"{side} all {len(seeds)} {other} seeds and the interval of their mean ({spread})"
    if beyond_interval:
        return f"{side} the 95 % interval of the {other} seed mean, within its seeds' range ({spread})"
    if beyond_seeds:
        return f"{side} all {len(seeds)} {other} seeds, within the 95 % interval of their mean ({spread})"
    return f"within the 95 % interval of the {other} seed mean ({spread})"


def sentences(lines: list[dict]) -> list[str]:
    """One sentence per included dictionary: what it is, where it lies at its L0, what that allows."""
    outside = [line for line in lines if is_outside(line)]
    trained = [line for line in lines if not is_outside(line)]
    said = []
    for line in outside:
        label, l0 = series_label(line["_series"]), value(line, "l0")
        head = (f"**{label}** was not trained by this run: a {line.get('format') or 'unknown-format'} dictionary "
                f"read from `{line.get('source') or line.get('export')}` ({line.get('architecture')}, d_sae "
                f"{line.get('d_sae')}), evaluated on the run's own held-out rows"
                + (" and downstream windows" if value(line, "ce_loss_recovered") is not None else ""))
        if l0 is None or l0 <= 0:
            said.append(head + "; it has no measured L0 to place it on the frontier.")
            continue
        parts = []
        for metric, name, higher in METRICS:
            y = value(line, metric)
            if y is None:
                continue
            series = against_series(line, trained, metric)
            placed = [place(y, other, seeds, higher) for other, seeds in series if seeds]
            unreached = [other for other, seeds in series if not seeds]
            frontier = _on_frontier(lines, line, metric, higher)
            where = "; ".join(placed) if placed else "no run series reaches this L0"
            if unreached:
                curves = "its curve does" if len(unreached) == 1 else "their curves do"
                where += f" ({', '.join(unreached)} not compared: {curves} not reach this L0, nothing is extrapolated)"
            parts.append(f"{name} {_n(y)}{' (Pareto-optimal)' if frontier else ''}: {where}")
        said.append(head + f". At its L0 of {_n(l0)}: " + (". ".join(parts) if parts else "no frontier metric") + ".")
    if outside:
        it = "it has" if len(outside) == 1 else "they have"
        said.append(f"No paired test is made for a dictionary this run did not train ({it} no seeds): its point says "
                    "where that one dictionary lies against the run's seeds at its L0, not whether its architecture "
                    "or training recipe is better, since one training run shows nothing of its own seed-to-seed "
                    "spread; its training budget is its own too.")
    return said


def _on_frontier(lines: list[dict], line: dict, metric: str, higher: bool) -> bool:
    points = [p for pts in aggregate(lines, metric).values() for p in pts]
    return any(p.series == line["_series"] for p in pareto(points, higher_is_better=higher))


def _n(x: float) -> str:
    return f"{x:#.3g}" if 1e-3 <= abs(x) < 1000 else f"{x:.3g}"
