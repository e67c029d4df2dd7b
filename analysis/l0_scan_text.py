"""The report's words on an L0 scan: per architecture, where the compared L0 targets lie against
the indicated L0 (analysis/indicated_l0.py; the L0 diagnostic of Chanin & Garriga-Alonso 2025),
or plainly that the run does not bracket it, and whether the readings at the n above the L0 they
point at agree (where they do not, the reading is not confirmed across n). Targets are placed by
their seed-mean measured L0, which a calibrated mechanism (JumpReLU, ReLU-L1, gated) need not hold
at its target; both are named where they differ by more than 25 %. The figure on the same records
is analysis/l0_scan.py's.
"""

from __future__ import annotations

import math

from dictlearn.analysis.indicated_l0 import indicated, measured, position
from dictlearn.analysis.render import Bullets, Paragraph
from dictlearn.analysis.results import series_label
from dictlearn.analysis.style import series_order
from dictlearn.analysis.summary import DEAD_THRESHOLD


def records(lines: list[dict]) -> list[dict]:
    """`dictlearn.compare.scan.indicated` per series (architecture, plus run or width variant)."""
    found = indicated(lines, group=lambda line: tuple(line["_series"]))
    return sorted(found, key=lambda r: series_order(tuple(r["group"])))


UNFOLLOWED = 0.25  # a seed-mean measured L0 this far (relative) from its target: the target was not held


def _missed(target: float, record: dict) -> float | None:
    """The target's seed-mean measured L0 where it lies more than `UNFOLLOWED` from it, else None."""
    l0 = measured(target, record)
    return l0 if abs(l0 - target) > UNFOLLOWED * target else None


def target_text(target: float, record: dict, inside: bool = False) -> str:
    """A target as a sentence that places it names it: its value, with its seed-mean measured L0
    beside it where that lies more than 25 % away, "12 (measured 6.6)" (inside parentheses:
    "12, measured 6.6"). The report places what was measured (`indicated_l0.position`)."""
    l0 = _missed(target, record)
    if l0 is None:
        return f"{target:g}"
    return f"{target:g}, measured {l0:.3g}" if inside else f"{target:g} (measured {l0:.3g})"


def _targets(values: list, record: dict) -> str:
    return ", ".join(target_text(v, record) for v in values)


def sentence(record: dict) -> str:
    """One architecture: where its L0 targets lie against the indicated L0, or that the scan does
    not bracket it."""
    name = series_label(tuple(record["group"]))
    targets = record["scanned_l0"]
    span = f"{targets[0]:g}–{targets[-1]:g}"
    if record["indicated_l0"] is None:
        if record["proxy_lowest_at"] == "too few":
            return f"**{name}**: fewer than 3 L0 targets; the proxy cannot locate an L0."
        end = _end_target(record, record["proxy_lowest_at"])
        beyond = "below" if record["proxy_lowest_at"] == "smallest" else "past"
        return (f"**{name}**: the proxy is lowest at the {record['proxy_lowest_at']} L0 target "
                f"({target_text(end, record, inside=True)}); the "
                f"targets ({span}) **do not bracket** the indicated L0, so this run does not locate it (that needs "
                f"targets {beyond} {end:g}: your own `--l0` list with `l0_scan: true`, docs/compare.md)."
                + _agreement_clause(record) + _probe_clause(record) + _n_clause(record) + _dead_clause(record)
                + _unfollowed_clause(record))
    interval = interval_text(*record["interval"])
    groups: dict[str, list] = {"below": [], "around": [], "above": []}
    for target in targets:
        side = position(target, record)
        if side is not None:
            groups[side].append(target)
    where = "; ".join(f"{_targets(v, record)} {'lie' if len(v) > 1 else 'lies'} {k} it"
                      for k, v in groups.items() if v)
    at = " at n = d_sae/4" if len(record.get("by_n", ())) > 1 else ""
    text = (f"**{name}**: the proxy{at} is lowest at L0 ≈ {record['indicated_l0']:.3g} (seeds' range {interval}, "
            f"{len(record['per_seed'])} seeds); of the targets, {where}.")
    return (text + _width_clause(record) + _agreement_clause(record) + _topk_clause(record) + _probe_clause(record)
            + _n_clause(record) + _dead_clause(record) + _unfollowed_clause(record))


def interval_text(low: float | None, high: float | None) -> str:
    """A seed range as the report writes it: 3 significant figures, or, where the range is
    narrower than their last digit, the decimals that show it to one significant figure
    (136.5–136.9, never 137–137, which reads as no spread, nor 136–137); one value where the ends
    are equal (one seed, or seeds alike); an open side (a seed's minimum at an end of the scan)
    as ≤ or ≥."""
    if low is None or high is None:
        return f"{'≤' if low is None else f'{low:.3g}'}–{'≥' if high is None else f'{high:.3g}'}"
    spread, size = abs(high - low), max(abs(low), abs(high))
    if spread == 0:
        return f"{low:.3g}"
    if size == 0 or spread >= 10 ** (math.floor(math.log10(size)) - 2):  # the 3rd figure's unit
        return f"{low:.3g}–{high:.3g}"
    decimals = min(9, -math.floor(math.log10(spread)))
    return f"{low:.{decimals}f}–{high:.{decimals}f}"


def _width_clause(record: dict) -> str:
    """An indicated L0 at or above d_in is no sparse code: with d_in active latents a dictionary can
    write any row exactly (reconstruction error ~0 there), so the reading names no sparsity to train at."""
    d_in = record.get("d_in")
    if not isinstance(d_in, int) or record["indicated_l0"] < d_in:
        return ""
    return (f" That is at or above the input's width (d_in = {d_in}): codes with that many active latents "
            "can write any row exactly, so read it as no sparse L0 found below d_in, not as an L0 to train at.")


def _end_target(record: dict, edge: str) -> float:
    """The target of the smallest or largest seed-mean measured L0: the end where a minimum lies
    (indicated_l0.minimum orders the points by measured L0; a calibrated JumpReLU's need not follow
    its targets' order)."""
    points = [(l0, t) for l0, t in zip(record.get("measured_l0") or [], record["scanned_l0"]) if l0 is not None]
    if not points:
        return record["scanned_l0"][0 if edge == "smallest" else -1]
    return (min(points) if edge == "smallest" else max(points))[1]


def _reading_text(reading: dict, record: dict) -> str:
    if reading["indicated_l0"] is not None:
        return f"L0 ≈ {reading['indicated_l0']:.3g}"
    edge = reading["proxy_lowest_at"]
    if edge in ("smallest", "largest"):
        return f"the {edge} target ({target_text(_end_target(record, edge), record, inside=True)})"
    return "no L0 (fewer than 3 targets)"


def _agreement_clause(record: dict) -> str:
    """One sentence: the indicated L0 at n = d_sae/8, /4, /2 and whether those whose n lies above
    the L0 they point at agree within the seeds' ranges (which were left out, and why); nothing
    for results from before the d_sae/8 and d_sae/2 keys."""
    verdict = record.get("n_agreement")
    if verdict is None:
        return ""
    readings = record["by_n"]
    ns = ", ".join(f"{r['n_of_d_sae']}" + (f" = {r['n']}" if r["n"] is not None else "") for r in readings)
    *first, last = [_reading_text(r, record) for r in readings]
    found = f" Read at n = {ns}, the proxy is lowest at {', '.join(first)} and {last} respectively"
    dropped = [r["n_of_d_sae"] for r in readings if r.get("left_out")]
    points = "it points" if len(dropped) == 1 else "they point"
    left = (f"leaving out n = {' and '.join(dropped)} (n not above the L0 {points} at, where the n-th "
            "projection is an active latent's), ") if dropped else ""
    others = "the other two readings" if len(dropped) == 1 else "the three readings"
    if verdict == "agree":
        return found + f": {left}{others} agree within the seeds' ranges."
    if verdict == "one n":
        return found + f": {left}no second n is left to check the reading against."
    if verdict == "one seed":
        return found + f": {left}one seed gives no seed range to judge whether they agree."
    if verdict == "unbracketed" and record["indicated_l0"] is None and not dropped:
        # d_sae/4 already does not locate it (the sentence says so): only what the other n add
        others = [r for r in readings if r["n_of_d_sae"] != "d_sae/4"]
        texts = [_reading_text(r, record) for r in others]
        if texts and all(r["indicated_l0"] is None and r["proxy_lowest_at"] == record["proxy_lowest_at"]
                         for r in others):
            return f" The same at n = {' and '.join(r['n_of_d_sae'] for r in others)}."
        (first, *rest) = [(r["n_of_d_sae"], t) for r, t in zip(others, texts)]
        return (f" At n = {first[0]} it is lowest at {first[1]}"
                + "".join(f", at n = {n} at {t}" for n, t in rest) + ".")
    why = (f"not every n {'left ' if dropped else ''}brackets it" if verdict == "unbracketed"
           else "their seed ranges do not overlap")
    # on synthetic ground truth this happened where d_sae/4 alone read the true L0 (docs/metrics.md):
    # a failed check leaves the reading unconfirmed, it does not show it wrong
    return (found + f"; {left}{why}, so **the reading is not confirmed across n** (on synthetic ground truth "
            "this also happened where n = d_sae/4 read the true L0; docs/metrics.md, \"At three n\").")


def _topk_clause(record: dict) -> str:
    """TopK fires exactly k on every row: on synthetic ground truth its minimum lay above the true
    mean L0, towards the upper tail of the per-row count (docs/metrics.md, "Which L0?")."""
    if record.get("architecture") != "topk":
        return ""
    return (" For TopK this marks where TopK itself mixes least, which on synthetic ground truth lay above the "
            "data's mean L0 when the active count varies by row; BatchTopK's reading is the one that matched the "
            "data's mean L0 there.")


def _n_clause(record: dict) -> str:
    """The proxy reads latents that should stay silent only when n lies above the data's L0: above
    the indicated L0, or, when the scan does not bracket it, above the largest L0 measured (a
    calibrated target may have measured more or less than its name)."""
    n = record.get("nth_decoder_projection_n")
    largest = max(measured(t, record) for t in record["scanned_l0"])
    bound, what = ((record["indicated_l0"], "the indicated L0") if record["indicated_l0"] is not None
                   else (largest, "the largest measured L0"))
    if isinstance(n, int) and n <= bound:
        return (f" Caution: n = {n} is not above {what} ({bound:.3g}); a wider dictionary (n = d_sae / 4) "
                "reads it better.")
    return ""


def _dead_clause(record: dict) -> str:
    """s_n^dec ranks the projections on every decoder row, a dead latent's (one that fired on none
    of the census tokens) as much as a live one's: where many are dead, and more at some targets
    than at others, the curve moves with the dead fraction as well as with L0."""
    dead = [(d, t) for d, t in zip(record.get("dead_fraction") or [], record["scanned_l0"]) if d is not None]
    if not dead or max(d for d, _ in dead) <= DEAD_THRESHOLD:
        return ""
    (most, at_most), (least, at_least) = max(dead), min(dead)
    return (f" Caution: {most:.0%} of its latents are dead at target {at_most:g} and {least:.0%} at {at_least:g} "
            "(seed means); the proxy reads dead latents' decoder rows like live ones, so this curve follows "
            "the dead fraction as well as L0.")



def _unfollowed_clause(record: dict) -> str:
    """Targets whose seed-mean measured L0 lies more than 25 % from them (a calibrated architecture
    not held there: ReLU-L1, gated, JumpReLU). The reading and the placements go by the measured
    L0; where those bunch (on synthetic ground truth JumpReLU's targets above the data's L0 landed
    at it, docs/metrics.md, "JumpReLU on ground truth") the curve has few distinct points."""
    missed = [(t, l0) for t in record["scanned_l0"] if (l0 := _missed(t, record)) is not None]
    if not missed:
        return ""
    items = ", ".join(f"{l0:.3g} for {t:g}" for t, l0 in missed)
    return (f" Caution: its measured L0 (seed means) is more than {UNFOLLOWED:.0%} off target at {items}; the "
            "curve and this sentence's placements go by the measured L0, and where a calibrated architecture's measured L0s "
            "bunch together, its curve has few distinct points to place a minimum between (on synthetic ground "
            "truth JumpReLU's targets above the data's L0 landed at it: docs/metrics.md, \"JumpReLU on ground "
            "truth\").")


def _probe_clause(record: dict) -> str:
    """Where the seed-mean sparse-probe AUC peaks, with the next-best target's mean beside it:
    the means alone, no test, so the reader sees how small the margin is."""
    for key, k in (("probe_auc_k16", 16), ("probe_auc_k1", 1)):
        if record.get(f"{key}_peak_l0") is None:
            continue
        ranked = sorted(((m, t) for m, t in zip(record.get(key) or [], record["scanned_l0"]) if m is not None),
                        reverse=True)
        text = f" Sparse-probe AUC (k = {k}) is highest at target {target_text(record[f'{key}_peak_l0'], record)}"
        if len(ranked) > 1:
            best, next_best = _apart(ranked[0][0], ranked[1][0])
            text += f" (seed mean {best}; next {next_best} at {target_text(ranked[1][1], record, inside=True)})"
        return text + "."
    return ""


def _apart(a: float, b: float) -> tuple[str, str]:
    """Two AUCs at 3 decimals, or at as many more (up to 6) as it takes to tell them apart: a
    margin that rounds away would print as a tie ("0.913; next 0.913"); a true tie at 3."""
    for decimals in range(3, 7):
        texts = f"{a:.{decimals}f}", f"{b:.{decimals}f}"
        if texts[0] != texts[1]:
            return texts
    return f"{a:.3f}", f"{b:.3f}"


def summary_blocks(lines: list[dict]) -> list:
    found = records(lines)
    if not found:
        return []
    return [Paragraph("**Which L0?** Where each architecture's decoders point: the minimum over this run's L0 "
                      "targets of the nth decoder projection (Chanin & Garriga-Alonso 2025; the rule is ours, "
                      "docs/metrics.md), with the range of the same estimate over seeds — a reading of this run's "
                      "own points, not a test."),
            Bullets(tuple(sentence(r) for r in found))]
