"""Which L0? The L0 diagnostic of Chanin & Garriga-Alonso 2025 against L0, beside sparse probing.

One panel per n the results hold: `nth_decoder_projection` (s_n^dec at n = d_sae/4,
dictlearn/metrics/decoder_projection.py) and, where recorded, the same at n = d_sae/8 and d_sae/2
(small multiples on a shared L0 axis, each with its own y axis: the score's scale moves with n),
against the measured L0 per architecture; the shaded band is that n's indicated L0's interval over
seeds and the dashed line the indicated L0 (analysis/indicated_l0.py: the minimum of the seed-mean
curve, refined in log L0). Last panel: sparse-probe ROC-AUC (k = 16, else k = 1) against L0 with
the d_sae/4 bands, so the reader sees whether the proxy's L0 and the probes' peak agree on this
model. The report's sentences (`summary_blocks`) say, per architecture, where the compared L0
targets lie against the indicated L0 (placed by their seed-mean measured L0, which a calibrated
mechanism need not hold at its target; both are named where they differ by more than 25 %), or plainly that the run does not bracket it, and whether the
readings at the n above the L0 they point at agree (where they do not, the reading is not confirmed
across n).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

from dictlearn.analysis.cli import module_main
from dictlearn.analysis.metric_plot import MetricSpec, draw_metric_axis, site_suffix, site_title
from dictlearn.analysis.render import Bullets, Paragraph
from dictlearn.analysis.results import series_label, value
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dictlearn.analysis.style import (DPI, WIDTH_IN, Drawn, architecture_style, legend_outside, save, series_order,
                                      share_x_label, styled)
from dictlearn.analysis.indicated_l0 import PROXY, PROXY_BY_N, indicated, measured, position
from dictlearn.analysis.summary import DEAD_THRESHOLD

STEM = "l0_scan"
CAPTION = ("Which L0? The nth decoder projection s_n^dec of Chanin & Garriga-Alonso (2025) against L0 (mean over "
           "seeds, 95 % interval), one panel per n (d_sae/8, d_sae/4, d_sae/2 where recorded); the dashed line is that "
           "n's indicated L0 (the minimum of the seed-mean curve, refined in log L0) and the band its range over seeds. "
           "Last panel: sparse-probe ROC-AUC against L0 with the d_sae/4 bands. An architecture without a line: the "
           "scan does not bracket its indicated L0 at that n. Readings that move with n do not locate the L0.")


def records(lines: list[dict]) -> list[dict]:
    """`dictlearn.compare.scan.indicated` per series (architecture, plus run or width variant)."""
    found = indicated(lines, group=lambda line: tuple(line["_series"]))
    return sorted(found, key=lambda r: series_order(tuple(r["group"])))


def _probe_key(lines: list[dict]) -> str | None:
    for key in ("probe_auc_k16", "probe_auc_k1"):
        if any(value(line, key) is not None for line in lines):
            return key
    return None


def _proxy_specs(lines: list[dict], found: list[dict]) -> list[tuple[MetricSpec, str]]:
    """(panel, key of the record's `by_n` reading) per n the lines hold, smallest n first."""
    specs = []
    for label, _, key in PROXY_BY_N:
        if not any(value(line, key) is not None for line in lines):
            continue
        readings = [r for record in found for r in record.get("by_n", ()) if r["key"] == key]
        ns = {r["n"] for r in readings}
        shown = f", n = {label}" + (f" = {ns.pop()}" if len(ns) == 1 and None not in ns else "")
        if readings and all(r.get("left_out") for r in readings):  # n not above the L0 it points at
            shown += " (left out)"
        specs.append((MetricSpec(key, r"$s_n^{\mathrm{dec}}$" + shown), key))
    return specs


def _figure(panels: int) -> tuple[Figure, list]:
    """Up to three panels in a row; four in two rows (three n and the probes)."""
    rows, cols = (2, 2) if panels == 4 else (1, panels)
    fig = Figure(figsize=(WIDTH_IN, 3.2 * rows), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, list(fig.subplots(rows, cols, squeeze=False).ravel())


def _bands(ax, found: list[dict], key: str) -> None:
    """The indicated L0 at proxy `key` (dashed) and its seed range (band) per series."""
    for record in found:
        reading = next((r for r in record.get("by_n", ()) if r["key"] == key), None)
        if reading is None or reading["indicated_l0"] is None:
            continue
        colour = architecture_style(record["group"][0])[0]
        low, high = reading["interval"]
        left, right = ax.get_xlim()
        ax.axvspan(low if low is not None else left, high if high is not None else right, color=colour,
                   alpha=0.12, linewidth=0, zorder=0)
        ax.axvline(reading["indicated_l0"], color=colour, linestyle="--", linewidth=1.0, zorder=1,
                   label=f"indicated L0, {series_label(tuple(record['group']))}")


@styled
def plot(lines: list[dict], found: list[dict], title: str | None = None):
    specs = _proxy_specs(lines, found)
    probe = _probe_key(lines)
    if probe is not None:
        k = probe.removeprefix("probe_auc_k")
        specs.append((MetricSpec(probe, f"sparse-probe ROC-AUC, k = {k}"), PROXY))
    fig, axes = _figure(len(specs))
    for ax, (spec, bands) in zip(axes, specs):
        draw_metric_axis(ax, lines, spec)
        _bands(ax, found, bands)
    share_x_label(fig, axes)
    legend_outside(fig, axes, above=len(specs) > 1, title=title)
    return fig


def draw(lines: list[dict], out_dir: Path, notes: list[str], site: tuple[str, str] | None = None) -> list[Drawn]:
    # results from before the key existed carry no proxy: nothing to draw, nothing to note
    found = [r for r in records(lines) if len(r["scanned_l0"]) >= 3]
    if not found:
        return []
    usable = [line for line in lines if value(line, PROXY) is not None]
    fig = plot(usable, found, title=site_title(site))
    stem = STEM + site_suffix(site)
    return [Drawn(stem, CAPTION, tuple(save(fig, out_dir, stem)), site)]


# ----------------------------------------------------------------------------- the report's words
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
    measured = [(l0, t) for l0, t in zip(record.get("measured_l0") or [], record["scanned_l0"]) if l0 is not None]
    if not measured:
        return record["scanned_l0"][0 if edge == "smallest" else -1]
    return (min(measured) if edge == "smallest" else max(measured))[1]


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
    """Targets whose seed-mean measured L0 lies more than 25 % from them (a calibrated architecture,
    JumpReLU, not held there). On synthetic ground truth JumpReLU's targets above the data's L0
    landed at it or trained dense, and the proxy's minimum then marked where L0 stopped following
    the target, not mixing read past the truth (docs/metrics.md, "JumpReLU on ground truth")."""
    missed = [(t, l0) for t, l0 in zip(record["scanned_l0"], record.get("measured_l0") or [])
              if l0 is not None and abs(l0 - t) > UNFOLLOWED * t]
    if not missed:
        return ""
    items = ", ".join(f"{l0:.3g} for {t:g}" for t, l0 in missed)
    return (f" Caution: its measured L0 (seed means) is more than {UNFOLLOWED:.0%} off target at {items}; the rule "
            "reads the measured L0, and on synthetic ground truth JumpReLU's targets above the data's L0 landed at it "
            "(or trained dense, L0 near d_sae), so its minimum marked where L0 stopped following the target rather "
            "than mixing read past it (docs/metrics.md, \"JumpReLU on ground truth\").")


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
            text += (f" (seed mean {ranked[0][0]:.3f}; next {ranked[1][0]:.3f} at "
                     f"{target_text(ranked[1][1], record, inside=True)})")
        return text + "."
    return ""


def summary_blocks(lines: list[dict]) -> list:
    found = records(lines)
    if not found:
        return []
    return [Paragraph("**Which L0?** Where each architecture's decoders point: the minimum over this run's L0 "
                      "targets of the nth decoder projection (Chanin & Garriga-Alonso 2025; the rule is ours, "
                      "docs/metrics.md), with the range of the same estimate over seeds — a reading of this run's "
                      "own points, not a test."),
            Bullets(tuple(sentence(r) for r in found))]


if __name__ == "__main__":
    sys.exit(module_main(draw, __doc__.splitlines()[0]))
