"""The indicated L0 of a set of results lines: where the L0 diagnostic of Chanin & Garriga-Alonso
2025 (`nth_decoder_projection`, dictlearn/metrics/decoder_projection.py) is lowest along L0.

The rule (ours; docs/metrics.md says what the paper does and does not fix): the minimum over the
L0 targets of the seed-mean proxy, refined by the parabola through that point and its two
neighbours in log L0 (the vertex, kept between the neighbours). A minimum at the smallest or the
largest target is no location: the targets do not bracket it, and the record says on which side
the proxy was still falling (`indicated_l0` null). The interval is the range of the same estimate
made seed by seed (each seed's own curve); a seed whose minimum sits at an end leaves that side
open (null). Used by the report (analysis/l0_scan_text.py, l0_scan.py) and by `dictlearn compare
--l0 scan` for `DIR/l0_scan.json` (dictlearn/compare/scan.py).

The same rule is applied to the proxy at n = d_sae/8 and d_sae/2 where the results hold them
(`by_n`), because where the minimum falls depends on n (docs/metrics.md, "How n decides"): the
readings at the three n agree when their seed intervals share a point (`n_agreement`); when they
do not, the reading is not confirmed across n (on synthetic ground truth that also happened where
n = d_sae/4 alone read the true L0, docs/metrics.md). A reading whose n is not above the L0 it
points at (its indicated L0, or the end target its curve runs to) takes no part (`left_out`,
`n_left_out`): there the n-th largest projection of a row is an active latent's, not one that
should stay silent, so that reading measures active features, not the mixing the proxy is meant
to read (docs/metrics.md, "At three n").
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable

from dictlearn.metrics.decoder_projection import default_n

PROXY = "nth_decoder_projection"
#: the proxy at each n a scan reads, smallest n first: (label, fraction of d_sae, result key)
PROXY_BY_N = (("d_sae/8", 1 / 8, "nth_decoder_projection_eighth"), ("d_sae/4", 1 / 4, PROXY),
              ("d_sae/2", 1 / 2, "nth_decoder_projection_half"))
PROBES = ("probe_auc_k1", "probe_auc_k16")
RULE = ("minimum of the seed-mean nth_decoder_projection over the scanned L0 targets, refined by a parabola in "
        "log L0 through its neighbours; interval: the range of the per-seed estimates (null: a seed's minimum lies "
        "at an end of the scan); the same at n = d_sae/8 and d_sae/2 (by_n), which agree with n = d_sae/4 when "
        "the seed intervals share a point (n_agreement), over the n above the L0 each reading points at (the others in "
        "n_left_out)")


def _number(line: dict, key: str) -> float | None:
    raw = line.get(key)
    if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not math.isfinite(raw):
        return None
    return float(raw)


def minimum(l0s: list[float], values: list[float]) -> tuple[float | None, str | None]:
    """Points (measured L0, proxy) -> (the L0 of the minimum refined in log L0, None) when it is
    inside, (None, "smallest" | "largest") when it lies at the smallest or largest L0, (None, "too
    few") below 3 points. The points are taken in order of their L0, not of their targets: a
    calibrated JumpReLU can measure L0s out of its targets' order (on ground truth, targets past
    the true L0 landed below it; docs/metrics.md), and the parabola's neighbours must be neighbours
    in L0 (in target order its vertex was clamped onto the wrong one)."""
    if len(values) < 3:
        return None, "too few"
    order = sorted(range(len(l0s)), key=l0s.__getitem__)  # stable: TopK's and BatchTopK's order unchanged
    l0s, values = [l0s[i] for i in order], [values[i] for i in order]
    i = min(range(len(values)), key=values.__getitem__)
    if i == 0:
        return None, "smallest"
    if i == len(values) - 1:
        return None, "largest"
    (x0, x1, x2), (y0, y1, y2) = [math.log(v) for v in l0s[i - 1 : i + 2]], values[i - 1 : i + 2]
    # vertex of the parabola through the three points (y1 is the lowest, so it opens upwards or is flat)
    denominator = (x1 - x0) * (y1 - y2) - (x1 - x2) * (y1 - y0)
    if denominator == 0:
        return l0s[i], None
    vertex = x1 - 0.5 * ((x1 - x0) ** 2 * (y1 - y2) - (x1 - x2) ** 2 * (y1 - y0)) / denominator
    return math.exp(min(max(vertex, x0), x2)), None


def _means(lines: list[dict], key: str) -> float | None:
    found = [v for v in (_number(line, key) for line in lines) if v is not None]
    return sum(found) / len(found) if found else None


def indicated(lines: list[dict], group: Callable[[dict], tuple] | None = None) -> list[dict]:
    """Results lines -> one record per group (default: architecture and d_sae) with at least one
    `nth_decoder_projection`: the scanned targets, seed means, the indicated L0 and its interval."""
    group = group or (lambda line: (line.get("architecture"), line.get("d_sae")))
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for line in lines:
        if _number(line, PROXY) is not None and _number(line, "l0") is not None and line.get("l0_target") is not None:
            groups[group(line)].append(line)
    return [_record(key, members) for key, members in groups.items()]


def _record(key: tuple, members: list[dict]) -> dict:
    by_target: dict[float, list[dict]] = defaultdict(list)
    for line in members:
        by_target[line["l0_target"]].append(line)
    targets = sorted(by_target)
    l0 = [_means(by_target[t], "l0") for t in targets]
    main = _reading(by_target, targets, l0, PROXY)
    record = {
        "architecture": members[0].get("architecture"), "d_sae": members[0].get("d_sae"),
        "d_in": members[0].get("d_in"), "group": list(key),
        "indicated_l0": main["indicated_l0"], "interval": main["interval"],
        "bracketed": main["bracketed"], "proxy_lowest_at": main["proxy_lowest_at"],
        "scanned_l0": targets, "measured_l0": l0, PROXY: main["values"],
        # s_n^dec reads every decoder row, a dead latent's too: the report says when they are many
        "dead_fraction": [_means(by_target[t], "dead_fraction") for t in targets],
        "nth_decoder_projection_n": members[0].get("nth_decoder_projection_n"),
        "seeds": sorted({line.get("seed") for line in members}, key=str), "per_seed": main["per_seed"],
    }  # fmt: skip
    record["by_n"] = _by_n(by_target, targets, l0, record)
    record["n_left_out"] = [r["n_of_d_sae"] for r in record["by_n"] if r["left_out"]]
    record["n_agreement"] = agreement(record["by_n"], len(record["per_seed"]))
    for probe in PROBES:
        means = [_means(by_target[t], probe) for t in targets]
        record[probe] = means
        known = [(m, t) for m, t in zip(means, targets) if m is not None]
        record[f"{probe}_peak_l0"] = max(known)[1] if known else None
    return record


def _reading(by_target: dict[float, list[dict]], targets: list, l0: list, key: str) -> dict:
    """The indicated L0 of proxy `key`: its seed-mean curve's minimum, the per-seed estimates and
    their range (a seed whose minimum sits at an end leaves that side open)."""
    values = [_means(by_target[t], key) for t in targets]
    value, edge = minimum(l0, values)
    per_seed = _per_seed(by_target, targets, key)
    estimates = list(per_seed.values())
    located = [e["l0"] for e in estimates if e["l0"] is not None]
    low = None if any(e["edge"] == "smallest" for e in estimates) or not located else min(located)
    high = None if any(e["edge"] == "largest" for e in estimates) or not located else max(located)
    return {"indicated_l0": value, "interval": [low, high] if value is not None else [None, None],
            "bracketed": value is not None, "proxy_lowest_at": edge, "values": values, "per_seed": per_seed}


def _by_n(by_target: dict[float, list[dict]], targets: list, l0: list, record: dict) -> list[dict]:
    """The reading at each n of `PROXY_BY_N` that every target holds (results from before the
    d_sae/8 and d_sae/2 keys hold only d_sae/4)."""
    found = []
    for label, fraction, key in PROXY_BY_N:
        if any(_means(by_target[t], key) is None for t in targets):
            continue
        reading = _reading(by_target, targets, l0, key)
        n = record["nth_decoder_projection_n"] if key == PROXY else None
        if n is None and isinstance(record["d_sae"], int):
            n = default_n(record["d_sae"], fraction)
        found.append({"n_of_d_sae": label, "n": n, "key": key, **{k: v for k, v in reading.items() if k != "per_seed"}})
        found[-1]["left_out"] = left_out(found[-1], l0)
    return found


def left_out(reading: dict, l0: list[float]) -> str | None:
    """Why a reading at n takes no part in the agreement, or None: n is not above the L0 it points
    at — its indicated L0, or, unbracketed, the measured L0 of the end target where its minimum
    lies. Below that n the n-th largest projection of a row is an active latent's (l0: the seed-mean
    measured L0 per target; the end is its smallest or largest, as `minimum` orders the points)."""
    n, edge = reading.get("n"), reading.get("proxy_lowest_at")
    if not isinstance(n, int) or isinstance(n, bool):
        return None
    if reading["indicated_l0"] is not None:
        bound, what = reading["indicated_l0"], "its indicated L0"
    elif edge in ("smallest", "largest") and l0:
        bound, what = (min(l0), "the smallest target's L0") if edge == "smallest" else (max(l0), "the largest target's L0")
    else:
        return None
    return f"n = {n} is not above {what} ({bound:.3g})" if n <= bound else None


def agreement(readings: list[dict], seeds: int) -> str | None:
    """Whether the readings at the three n point at the same L0, over those not `left_out`:
    "agree" (all bracketed, and their seed intervals share a point, an open side unbounded),
    "disagree", "unbracketed" (at some n the minimum lies at an end), "one seed" (no seed range to
    judge by), "one n" (fewer than two readings left to compare), or None (fewer than three n
    recorded: older results)."""
    if len(readings) < len(PROXY_BY_N):
        return None
    readings = [r for r in readings if not r.get("left_out")]  # results from before `left_out`: all take part
    if len(readings) < 2:
        return "one n"
    if not all(r["bracketed"] for r in readings):
        return "unbracketed"
    if seeds < 2:
        return "one seed"
    lows = [r["interval"][0] for r in readings if r["interval"][0] is not None]
    highs = [r["interval"][1] for r in readings if r["interval"][1] is not None]
    return "agree" if not lows or not highs or max(lows) <= min(highs) else "disagree"


def _per_seed(by_target: dict[float, list[dict]], targets: list, key: str = PROXY) -> dict[str, dict]:
    """{seed: {"l0": estimate or None, "edge": None | "smallest" | "largest" | "too few"}}, over
    the seeds measured (with proxy `key`) at every target."""
    seeds = set.intersection(*({line.get("seed") for line in by_target[t] if _number(line, key) is not None}
                               for t in targets))
    out = {}
    for seed in sorted(seeds, key=str):
        rows = [next(line for line in by_target[t] if line.get("seed") == seed and _number(line, key) is not None)
                for t in targets]
        estimate, edge = minimum([_number(r, "l0") for r in rows], [_number(r, key) for r in rows])
        out[str(seed)] = {"l0": estimate, "edge": edge}
    return out


def measured(target: float, record: dict) -> float:
    """The seed-mean measured L0 of a scanned target (the record's `measured_l0`); the value itself
    where it is no scanned target or none was measured."""
    for scanned, l0 in zip(record["scanned_l0"], record.get("measured_l0") or ()):
        if scanned == target and l0 is not None:
            return l0
    return target


def position(target: float, record: dict) -> str | None:
    """Where an L0 target lies against the indicated L0, placed by what it measured (`measured`):
    "below", "around" (inside the seeds' interval) or "above"; None when the scan does not bracket
    it or the interval is open on both sides. An open side (null) is unbounded: no target lies
    beyond it. By measured L0, not by name: a calibrated mechanism (JumpReLU, ReLU-L1, gated) can
    miss its target, and the indicated L0 is a measured L0 (on ground truth JumpReLU's target 25
    measured 12.5, below a truth of 16; docs/metrics.md)."""
    low, high = record["interval"]
    if record["indicated_l0"] is None or (low is None and high is None):
        return None
    l0 = measured(target, record)
    if low is not None and l0 < low:
        return "below"
    if high is not None and l0 > high:
        return "above"
    return "around"
