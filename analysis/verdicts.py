"""`DIR/verdicts.json` from results lines, and the sentence a report prints for each record.

One record per compared pair, metric and L0 target (DESIGN.md's contract): the two series, the L0
they are compared at, each paired seed's values and difference, the interval, the test, its Holm p
and the claim, or the reason it cannot be tested. The method is dictlearn.analysis.statistics's
docstring; docs/compare.md says it for users.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Hashable, Iterable
from typing import NamedTuple

import numpy as np

from dictlearn.analysis.statistics import (
    ALPHA, CONFIDENCE, L0_TOLERANCE, Curve, claims, common_l0, holm, interpolate_at_l0,
    off_target, paired_test,
)  # fmt: skip
from dictlearn.errors import ConfigError

__all__ = ["ALPHA", "CONFIDENCE", "DIRECTIONS", "L0_TOLERANCE", "TEST", "build_verdicts",
           "claims", "common_l0", "holm", "interpolate_at_l0", "off_target", "paired_test", "se_key", "sentence"]

TEST = "paired t over seeds"
#: Which way is better for the metrics a report compares; l2_ratio and rel_reconstruction_bias are
#: best at 1 and have no direction.
DIRECTIONS = {
    **dict.fromkeys(("fvu", "mse", "kl_div", "delta_ce", "dead_fraction", "dense_fraction"), "lower"),
    **dict.fromkeys(("explained_variance", "cos_sim", "ce_loss_recovered", "ce_loss_recovered_mean", "mmcs",
                     "jacobian_cos", "probe_auc_k1", "probe_auc_k16", "probe_auc_linear", "concept_coverage",
                     "concept_f1_mean"), "higher"),
}  # fmt: skip


def se_key(metric: str) -> str:
    """The results key holding a metric's evaluation standard error: `fvu` -> `fvu_se`."""
    return f"{metric}_se"


# --- Records: verdicts.json ---------------------------------------------------------------------


def build_verdicts(lines: list[dict], metrics: Iterable[str] | dict[str, str],
                   pairs: Iterable[tuple[str, str]] | None = None, series: Callable[[dict], str] | None = None,
                   group: Callable[[dict], Hashable] | None = None, alpha: float = ALPHA) -> dict:
    """Results lines -> the verdicts.json document: one record per pair, metric and L0 target.

    metrics: keys (directions from `DIRECTIONS`) or {key: "lower" | "higher"}; pairs: (a, b)
    series names, default every pair in sorted order; series: line -> its name (default the
    architecture); group: line -> what must match to compare (e.g. model and hook), default one
    group. Holm runs over every tested cell of the call. Lines that cannot be placed, and cells
    that cannot be tested, are named in `notes` and in each record's `reason`; nothing raises
    except an unknown metric direction.
    """
    directions = _directions(metrics)
    series = series or (lambda line: line.get("architecture"))
    group = group or (lambda line: None)
    pairs = None if pairs is None else [(str(a), str(b)) for a, b in pairs]
    notes, records = [], []
    placed = _placed(lines, series, notes)
    for key, members in _groups(placed, group).items():
        for metric, direction in directions.items():
            curves = _curves(members, metric, notes)
            for a, b in pairs if pairs is not None else itertools.combinations(sorted(curves), 2):
                records += _cells(curves, a, b, metric, direction, key)
    _decide(records, directions, alpha)
    if not records:
        found = sorted({point[0] for point in placed})
        notes.append(f"no pair of series to compare ({len(placed)} usable line(s); series: {found or 'none'})")
    return {"test": TEST, "alpha": alpha, "confidence": CONFIDENCE, "correction": "holm",
            "family_size": sum(r.get("p") is not None for r in records), "l0_tolerance": L0_TOLERANCE,
            "records": [_json(r) for r in records], "notes": list(dict.fromkeys(notes))}


def _directions(metrics) -> dict[str, str]:
    metrics = [metrics] if isinstance(metrics, str) else metrics
    chosen = dict(metrics) if isinstance(metrics, dict) else {m: DIRECTIONS.get(m) for m in metrics}
    for metric, direction in chosen.items():
        if direction not in ("lower", "higher"):
            raise ConfigError(f"verdicts: metric {metric!r} has no direction ({direction!r}); "
                              f"pass {{'{metric}': 'lower'}} or {{'{metric}': 'higher'}}")
    return chosen


def _groups(placed, group) -> dict:
    out: dict = {}
    for point in placed:
        out.setdefault(group(point[-1]), []).append(point)
    return out


def _number(line: dict, key: str) -> float | None:
    raw = line.get(key)
    if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not math.isfinite(raw):
        return None
    return float(raw)


class _SeedCurve(NamedTuple):
    """One seed of one series for one metric: its curve (columns: value, evaluation SE), the
    measured L0 at each target, and whether any of its lines recorded an SE."""

    curve: Curve | None
    l0_at: dict[float, float]
    has_se: bool


def _placed(lines, series, notes) -> list[tuple]:
    """(series, seed, L0 target, L0, line) of each line that has them; the others named in notes."""
    placed, skipped = [], {}
    for index, line in enumerate(lines):
        if not isinstance(line, dict):
            skipped.setdefault("results object", []).append(f"line {index + 1}")
            continue
        name, seed, target, l0 = series(line), line.get("seed"), _number(line, "l0_target"), _number(line, "l0")
        name = None if name is None or name == "" else name
        seed = seed if isinstance(seed, (int, str)) and not isinstance(seed, bool) else None
        l0 = l0 if l0 is not None and l0 > 0 else None  # an L0 of 0 has no place on a log axis
        missing = [k for k, v in (("series", name), ("seed", seed), ("l0_target", target), ("l0", l0)) if v is None]
        if missing:
            skipped.setdefault(", ".join(missing), []).append(str(line.get("name") or f"line {index + 1}"))
        else:
            placed.append((str(name), seed, target, l0, line))
    notes += [f"{len(names)} line(s) without a usable {keys}, left out of every comparison: {_names(names)}"
              for keys, names in skipped.items()]
    return placed


def _names(names: list[str]) -> str:
    return ", ".join(names[:5]) + (" …" if len(names) > 5 else "")


def _curves(placed, metric, notes) -> dict[str, dict]:
    """{series: {seed: _SeedCurve}} of one metric from the placed lines that have it."""
    rows: dict = {}
    skipped = []
    for name, seed, target, l0, line in placed:
        value = _number(line, metric)
        if value is None:
            skipped.append(str(line.get("name") or f"{name} seed {seed} at L0 target {target:g}"))
            continue
        rows.setdefault(name, {}).setdefault(seed, []).append((target, l0, value, _number(line, se_key(metric))))
    if skipped:
        notes.append(f"{metric}: {len(skipped)} line(s) without a usable {metric}, left out: {_names(skipped)}")
    for name, by_seed in rows.items():
        for seed, points in by_seed.items():
            targets = [point[0] for point in points]
            if len(set(targets)) < len(targets):
                notes.append(f"{name} seed {seed} has several lines at one L0 target: all are points of its curve "
                             "(give each run its own series to compare them apart)")
    return {name: {seed: _curve(points) for seed, points in by_seed.items()} for name, by_seed in rows.items()}


def _curve(rows: list[tuple]) -> _SeedCurve:
    targets, l0s, values, ses = zip(*rows)
    by_target: dict[float, list[float]] = {}
    for target, l0 in zip(targets, l0s):
        by_target.setdefault(target, []).append(l0)
    l0_at = {t: sum(v) / len(v) for t, v in by_target.items()}  # repeats of one target: their mean
    has_se = any(se is not None for se in ses)
    return _SeedCurve(Curve.of(l0s, values, [0.0 if se is None else se for se in ses]), l0_at, has_se)


def _cells(curves, a, b, metric, direction, key) -> list[dict]:
    """The records of one pair and metric, one per L0 target either series has (untested yet)."""
    base = {"group": None if key is None else str(key), "metric": metric, "direction": direction, "a": a, "b": b}
    if a not in curves or b not in curves:
        absent = " and ".join(s for s in (a, b) if s not in curves)
        reason = f"no usable line of {absent} for {metric}"
        return [{**base, "l0_target": None, "l0": None, "seeds": [], "reason": reason}]
    seeds = sorted(set(curves[a]) & set(curves[b]), key=_seed_order)
    targets = np.array(sorted({t for s in (a, b) for c in curves[s].values() for t in c.l0_at}))
    l0s = {s: np.array([[curves[s][seed].l0_at.get(t, np.nan) for t in targets] for seed in seeds],
                       dtype=np.float64).reshape(len(seeds), len(targets)) for s in (a, b)}
    grid = common_l0(l0s[a], l0s[b], targets) if seeds else np.full(targets.shape, np.nan)
    values = {s: _at(curves[s], seeds, grid, 0) for s in (a, b)}  # [seeds, targets]
    differences = values[a] - values[b]
    has_se = any(curves[s][seed].has_se for s in (a, b) for seed in seeds)
    se = np.hypot(_at(curves[a], seeds, grid, 1), _at(curves[b], seeds, grid, 1)) if has_se else None
    off = {s: off_target(l0s[s], targets).any(axis=0) for s in (a, b)}
    unpaired = sorted(set(curves[a]) ^ set(curves[b]), key=_seed_order)
    records = []
    for j, target in enumerate(targets.tolist()):
        record = {**base, "l0_target": target, "l0": float(grid[j]), "seeds": seeds, "unpaired_seeds": unpaired,
                  "measured_l0": {a: l0s[a][:, j].tolist(), b: l0s[b][:, j].tolist()},
                  "off_target": [s for s in (a, b) if off[s][j]], "a_values": values[a][:, j].tolist(),
                  "b_values": values[b][:, j].tolist(), "differences": differences[:, j].tolist(),
                  "evaluation_se": None if se is None else se[:, j].tolist()}
        record["reason"] = _reason(record, l0s)
        records.append(record)
    return records


def _at(by_seed: dict, seeds: list, grid: np.ndarray, column: int) -> np.ndarray:
    """Each seed's curve (column 0: value, 1: evaluation SE) at the grid -> [seeds, grid]."""
    rows = [np.full(grid.shape, np.nan) if by_seed[s].curve is None else by_seed[s].curve.at(grid, column)
            for s in seeds]
    return np.array(rows, dtype=np.float64).reshape(len(seeds), len(grid))


def _seed_order(seed) -> tuple:
    return (0, seed, "") if isinstance(seed, int) else (1, 0, str(seed))


def _reason(record, l0s) -> str | None:
    """Why a cell cannot be tested (None when it can)."""
    a, b, n = record["a"], record["b"], sum(math.isfinite(d) for d in record["differences"])
    if not record["seeds"]:
        return f"no seed common to {a} and {b}: nothing to pair"
    if not math.isfinite(record["l0"]):
        ranges = ", ".join(f"{s} {_reach(l0s[s])}" for s in (a, b))
        return f"the curves share no L0 near target {record['l0_target']:g} (every paired seed reaches {ranges})"
    if n < 2:
        return f"{n} paired seed{'s' if n != 1 else ''}: a paired test needs at least 2"
    return None


def _reach(l0s: np.ndarray) -> str:
    """The L0 range every seed's curve covers, from [seeds, targets] measured L0s: "16.6–32.5"."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a seed without points: no range
        low, high = np.nanmax(np.nanmin(l0s, axis=1)), np.nanmin(np.nanmax(l0s, axis=1))
    return f"{low:.3g}–{high:.3g}" if low <= high else "nothing"


def _decide(records, directions, alpha) -> None:
    """Test every testable record at once, Holm over them all, and write the claims in place."""
    testable = [r for r in records if r["reason"] is None]
    width = max((len(r["seeds"]) for r in testable), default=0)
    d, e = np.full((len(testable), width), np.nan), np.zeros((len(testable), width))
    for i, r in enumerate(testable):
        d[i, : len(r["seeds"])] = r["differences"]
        if r["evaluation_se"] is not None:
            e[i, : len(r["seeds"])] = r["evaluation_se"]
    result = {k: v.tolist() for k, v in paired_test(d, e).items()}
    adjusted = holm(result["p"]).tolist()
    for i, r in enumerate(testable):
        if not math.isfinite(result["p"][i]):
            r["reason"] = "the differences do not vary across seeds and no evaluation error is recorded: no test"
            continue
        r.update(df=int(result["df"][i]), interval=[result["low"][i], result["high"][i]], t=result["t"][i],
                 p=result["p"][i], p_holm=adjusted[i])
    for r in records:
        finite = [x for x in r["differences"] if math.isfinite(x)] if "differences" in r else []
        r["n_seeds"], r["mean_difference"] = len(finite), sum(finite) / len(finite) if finite else None
        r["claim"] = "not distinguishable" if r["reason"] is not None else \
            claims([r["mean_difference"]], [r["p_holm"]], directions[r["metric"]], alpha)[0]
        r["test"], r["confidence"] = TEST, CONFIDENCE


_FIELDS = ("group", "metric", "direction", "a", "b", "l0_target", "l0", "seeds", "unpaired_seeds", "measured_l0",
           "off_target", "a_values", "b_values", "differences", "evaluation_se", "mean_difference", "interval",
           "confidence", "test", "n_seeds", "df", "t", "p", "p_holm", "claim", "reason")


def _json(record: dict) -> dict:
    """Every field of the contract in a fixed order, NaN as null (strict JSON)."""
    def clean(x):  # records hold numbers, strings, flat lists and one dict of flat lists
        if isinstance(x, float):
            return x if math.isfinite(x) else None
        if isinstance(x, list):
            return [v if not isinstance(v, float) or math.isfinite(v) else None for v in x]
        return {k: clean(v) for k, v in x.items()} if isinstance(x, dict) else x

    return {k: clean(record.get(k)) for k in _FIELDS}


# --- Sentences ----------------------------------------------------------------------------------


def sentence(record: dict, metric_name: str | None = None) -> str:
    """One record as the report says it, e.g. "topk − relu_l1 FVU at L0 15.7 (target 16): −0.21
    [−0.25, −0.17], paired t over 3 seeds, Holm p = 0.004: topk better" (`metric_name`: "FVU"
    instead of the key)."""
    a, b, n = record["a"], record["b"], record.get("n_seeds") or 0
    where = "any L0" if record.get("l0_target") is None else f"target {record['l0_target']:g}"
    if record.get("l0") is not None:
        where = f"L0 {record['l0']:.3g} ({where})"
    head = f"{a} − {b} {metric_name or record['metric']} at {where}"
    seeds = f"{n} seed{'s' * (n != 1)}"
    off = f" (measured L0 more than {L0_TOLERANCE:.0%} off target: {', '.join(record['off_target'])})" \
        if record.get("off_target") else ""
    if record.get("l0") is None or not record.get("seeds"):
        return f"{head}: not compared: {record.get('reason')}{off}"
    if record.get("p_holm") is None:
        shown = "" if record.get("mean_difference") is None else f"{_signed(record['mean_difference'])} on {seeds}, "
        return f"{head}: {shown}not tested ({record.get('reason')}): not distinguishable with {seeds}{off}"
    low, high = record["interval"]
    verdict = f"{a} {record['claim']}" if record["claim"] != "not distinguishable" else \
        f"not distinguishable with {seeds}"
    return (f"{head}: {_signed(record['mean_difference'])} [{_signed(low)}, {_signed(high)}], paired t over "
            f"{seeds}, Holm {_p(record['p_holm'])}: {verdict}{off}")


def _signed(x: float) -> str:
    return f"{x:.3g}".replace("-", "−")


def _p(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.2g}"
