"""The report's section for whole replacement models (`dictlearn compare --replace mlp`).

A replacement's results line (docs/metrics.md, "Replacement models") holds the whole
replacement's `replacement_ce_loss_recovered` and `replacement_kl_div`, its `total_l0` (latents
per token summed over the replaced layers), its `l0_target` (total) and per-layer `fvu`/`l0`
under `layers`. Replacements are compared at equal *measured* total L0 with the machinery of
the single-site comparison (dictlearn.analysis.verdicts): each seed's curve interpolated along
log total L0, a paired t-test over seeds, Holm's correction over the section's claims (one per
metric and L0 target: the leader against the runner-up), claims no stronger than the test.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from dictlearn.analysis.aggregate import mean_interval
from dictlearn.analysis.metric_plot import MetricSpec, plot_metrics_vs_l0
from dictlearn.analysis.render import Heading, Image, Paragraph, Table
from dictlearn.analysis.results import series_label, value
from dictlearn.analysis.statistics import claims, holm
from dictlearn.analysis.style import RC, Drawn, legend_outside, new_figure, save, series_order, series_style, styled
from dictlearn.analysis.summary import Lead, ranked_at
from dictlearn.analysis.verdicts import L0_TOLERANCE, build_verdicts

#: (metric, name, True when higher is better)
METRICS = (("replacement_ce_loss_recovered", "replacement CE loss recovered", True),
           ("replacement_kl_div", "replacement KL", False))
GROUP = "replacements"
TOTAL_L0_LABEL = "total L0 (active latents per token, summed over layers; log scale)"


def is_replacement(line: dict) -> bool:
    """A line of a whole replacement model (`replace` recorded), not of one dictionary."""
    return line.get("replace") is not None


def _placed(lines: list[dict]) -> list[dict]:
    """Copies whose `l0` is the total L0: what the shared curve and verdict code reads as L0."""
    return [{**line, "l0": line.get("total_l0")} for line in lines]


def _group(line: dict) -> str:
    return json.dumps([str(line.get("model_name") or "?"), "replace " + str(line.get("replace")), GROUP])


def verdicts(lines: list[dict], alpha: float = 0.05) -> dict:
    """verdicts.json records for every pair of replacements, metric and total L0 target; the
    leader-against-runner-up records are the section's family (`family: "replacement report"`),
    Holm-corrected over them alone, as the single-site report does for its own."""
    placed = _placed(lines)
    document = build_verdicts(placed, {m: "higher" if h else "lower" for m, _, h in METRICS},
                              series=lambda line: series_label(line["_series"]), group=_group, alpha=alpha)
    records = document["records"]
    family = [lead.record for metric, _, higher in METRICS for lead in leads(placed, records, metric, higher)
              if lead.record is not None and lead.record.get("p") is not None]
    adjusted = holm([r["p"] for r in family]) if family else []
    for r in records:
        r["family"] = "all replacement pairs"
    for r, p in zip(family, adjusted):
        r["family"], r["p_holm"] = "replacement report", float(p)
        r["claim"] = claims([r["mean_difference"]], [p], r["direction"], alpha)[0]
    document["report_family_size"] = len(family)
    return document


def _targets(lines: list[dict]) -> list[float]:
    return sorted({value(line, "l0_target") for line in lines if value(line, "l0_target") is not None})


def ranking_l0(placed: list[dict], target: float) -> tuple[float | None, list[str], list[str]]:
    """Where the replacements are ranked at a total L0 target: the target, moved into the range
    every seed of every replacement near it covers when that range ends within `L0_TOLERANCE` of
    it (a TopK replacement's total L0 can fall just short of L0 = k per layer: the ReLU after the
    TopK zeroes negative pre-activations); nothing is extrapolated. -> (L0 or None, series ranked
    there, series whose curves end farther from it)."""
    ranges: dict[str, list[tuple[float, float]]] = {}
    by_seed: dict = {}
    for line in placed:
        if value(line, "l0") is not None:
            by_seed.setdefault((series_label(line["_series"]), line.get("seed")), []).append(value(line, "l0"))
    for (label, _), l0s in by_seed.items():
        ranges.setdefault(label, []).append((min(l0s), max(l0s)))
    low_edge, high_edge = target * (1 - L0_TOLERANCE), target * (1 + L0_TOLERANCE)
    near = {label: (max(lo for lo, _ in r), min(hi for _, hi in r)) for label, r in ranges.items()}
    near = {label: r for label, r in near.items() if r[0] <= high_edge and r[1] >= low_edge and r[0] <= r[1]}
    far = sorted(set(ranges) - set(near))
    if not near:
        return None, [], far
    low, high = max(r[0] for r in near.values()), min(r[1] for r in near.values())
    if low > high:  # the near curves share no L0 around the target: rank each where it can be read
        return None, [], sorted(ranges)
    return min(max(target, low), high), sorted(near), far


def leads(placed: list[dict], records: list[dict], metric: str, higher: bool) -> list[Lead]:
    """One Lead per total L0 target: every replacement's seed mean at the ranking L0, best first."""
    from dictlearn.analysis.summary import _claim, _record

    out = []
    for target in _targets(placed):
        at, _, _ = ranking_l0(placed, target)
        if at is None:
            continue
        ranked, unreached = ranked_at(placed, at, metric, higher)
        if ranked:
            record = _record(records, metric, target, ranked[0].label, ranked[1].label) if len(ranked) > 1 else None
            out.append(Lead(target, GROUP, tuple(ranked), tuple(unreached), record, _claim(record, ranked[0].label)))
    return out


# ----------------------------------------------------------------------------- figures
def draw(lines: list[dict], out_dir: Path, notes: list[str]) -> list[Drawn]:
    """figures/replacement_ce_kl.png (both metrics against total L0) and replacement_layer_fvu.png."""
    drawn = []
    placed = _placed(lines)
    missing = [str(line.get("name")) for line in placed if value(line, "l0") is None]
    if missing:
        notes.append(f"replacement figures: {len(missing)} line(s) without total_l0 left out: {', '.join(missing[:5])}")
    fig = _ce_kl(placed)
    if fig is not None:
        drawn.append(Drawn("replacement_ce_kl", CE_KL_CAPTION, tuple(save(fig, out_dir, "replacement_ce_kl"))))
    fig = _layer_fvu(lines)
    if fig is not None:
        drawn.append(Drawn("replacement_layer_fvu", FVU_CAPTION, tuple(save(fig, out_dir, "replacement_layer_fvu"))))
    return drawn


CE_KL_CAPTION = ("Whole replacement models (every MLP replaced at once) against total L0 per token. Left: CE loss "
                 "recovered (higher is better); right: KL(clean ‖ replaced), nats per prediction (lower is better). "
                 "Marker: seed mean; vertical bar: 95 % interval of the seed mean; horizontal bar: the seeds' range "
                 "of total L0; rings: Pareto-optimal.")
FVU_CAPTION = ("Per-layer FVU of each replacement's output on the clean run's MLP inputs (what the layer's MLP "
               "writes), one panel per total L0 target. Marker: seed mean; bar: 95 % interval of the seed mean.")


@styled
def _ce_kl(placed: list[dict]):
    specs = [MetricSpec("replacement_ce_loss_recovered", "CE loss recovered (fraction)", better="higher"),
             MetricSpec("replacement_kl_div", "KL(clean ‖ replaced) (nats)", better="lower", log_y=True)]
    fig = plot_metrics_vs_l0(placed, specs)
    if fig is not None:
        panels = [ax for ax in fig.axes if ax.get_ylabel()]
        if len(panels) > 1:  # share_x_label put one label under both panels: say it is the total
            fig.supxlabel(TOTAL_L0_LABEL, fontsize=RC["axes.labelsize"])
        else:
            panels[0].set_xlabel(TOTAL_L0_LABEL)
    return fig


def _layer_values(lines: list[dict]) -> dict:
    """{(target, series): {layer: [fvu per seed]}}."""
    out: dict = {}
    for line in lines:
        layers = line.get("layers") if isinstance(line.get("layers"), dict) else {}
        for layer, entry in layers.items():
            fvu = value(entry, "fvu") if isinstance(entry, dict) else None
            if fvu is not None and value(line, "l0_target") is not None:
                key = (value(line, "l0_target"), line["_series"])
                out.setdefault(key, {}).setdefault(int(layer), []).append(fvu)
    return out


@styled
def _layer_fvu(lines: list[dict]):
    values = _layer_values(lines)
    targets = sorted({t for t, _ in values})
    if not targets:
        return None
    fig, axes = new_figure(ncols=len(targets), height_in=3.0)
    every = sorted({s for _, s in values}, key=series_order)
    variants = sorted({s[1] for s in every})
    for ax, target in zip(axes, targets):
        for series in every:
            per_layer = values.get((target, series))
            if not per_layer:
                continue
            layers = sorted(per_layer)
            stats = [mean_interval(per_layer[layer]) for layer in layers]
            means = [s[0] for s in stats]
            ax.errorbar(layers, means, yerr=[[s[0] - s[1] for s in stats], [s[2] - s[0] for s in stats]],
                        capsize=2.0, elinewidth=0.8, **series_style(series, variants))
        ax.set_title(f"total L0 target {target:g}")
        ax.set_xlabel("layer")
        ax.set_xticks(sorted({layer for (t, _), d in values.items() if t == target for layer in d}))
    axes[0].set_ylabel("FVU of the layer's MLP output")
    legend_outside(fig, list(axes), above=True)
    return fig


# ----------------------------------------------------------------------------- the report section
KEY = ("At each total L0 target every replacement is read at that same total L0, interpolated along log total L0 "
       "between its own measured points seed by seed (never extrapolated); the best seed mean leads. The interval "
       "after each replacement is the 95 % Student-t interval of its seed mean there. **better**: a paired t-test "
       "over seeds (same seed: same initial-weight seed, same batches) rejects equality between the leader and the "
       "runner-up after Holm's correction over this table's cells (family-wise α = 0.05); otherwise the two are "
       "**not distinguishable** with these seeds, whatever the gap between the means. The replacements are "
       "evaluated without error terms: every MLP replaced, errors compounding (docs/replacement.md).")


def blocks(lines: list[dict], drawn: list[Drawn], document: dict, first_figure: int = 1) -> list:
    """The section: key, ranking table, sentences, figures, per-replacement table."""
    placed = _placed(lines)
    records = document.get("records", [])
    out: list = [Heading(2, "Replacement models"), Paragraph(KEY)]
    header, rows = ranking_table(placed, records)
    if rows:
        out.append(Table(tuple(header), tuple(map(tuple, rows))))
    out += [Paragraph(s) for s in sentences(placed, records)]
    out += [Image(d.png, d.caption, first_figure + i) for i, d in enumerate(drawn)]
    out.append(_line_table(lines))
    return out


def _per_seed_at(placed: list[dict], label: str, target: float, metric: str) -> list[float]:
    from dictlearn.analysis.verdicts import interpolate_at_l0

    by_seed: dict = {}
    for line in placed:
        if series_label(line["_series"]) == label and value(line, "l0") is not None and value(line, metric) is not None:
            by_seed.setdefault(line.get("seed"), []).append((value(line, "l0"), value(line, metric)))
    at = [interpolate_at_l0([p[0] for p in pts], [p[1] for p in pts], target)[0] for pts in by_seed.values()]
    return [y for y in at if math.isfinite(y)]


def ranking_table(placed: list[dict], records: list[dict]) -> tuple[list[str], list[list[str]]]:
    """One row per total L0 target and metric: every replacement ranked (seed mean [95 % interval])."""
    header = ["total L0", "metric", "ranking (seed mean [95 % interval], best first)", "leader vs runner-up"]
    rows = []
    for metric, name, higher in METRICS:
        for lead in leads(placed, records, metric, higher):
            at = ranking_l0(placed, lead.target)[0]
            ranked = []
            for r in lead.ranked:
                mean, low, high = mean_interval(_per_seed_at(placed, r.label, at, metric))
                ranked.append(f"{r.label} {mean:.4g} [{low:.4g}, {high:.4g}]" if r.n_seeds > 1
                              else f"{r.label} {mean:.4g} (1 seed)")
            ranked += [f"{label}: does not reach this L0" for label in lead.unreached]
            verdict = lead.cells()[2] if len(lead.ranked) > 1 else "only one replacement reaches this L0"
            where = f"{lead.target:g}" + (f" (read at {at:.3g})" if abs(at - lead.target) > 1e-9 else "")
            rows.append([where, f"{name} ({'higher' if higher else 'lower'} is better)",
                         "; ".join(ranked), verdict])
    rows.sort(key=lambda row: float(row[0].split()[0]))
    return header, rows


def sentences(placed: list[dict], records: list[dict]) -> list[str]:
    """Who leads where, and only what the tests support."""
    out = []
    for metric, name, higher in METRICS:
        found = leads(placed, records, metric, higher)
        if not found:
            continue
        better = [f"{lead.ranked[0].label} at total L0 {lead.target:g}" for lead in found if lead.claim == "better"]
        tied = [f"{lead.target:g}" for lead in found if len(lead.ranked) > 1 and lead.claim != "better"]
        parts = []
        if better:
            parts.append("ahead of the runner-up by a paired test over seeds (Holm-corrected): " + "; ".join(better))
        if tied:
            n = sorted({lead.record.get("n_seeds") or 0 for lead in found if lead.record})
            parts.append(f"the leader is not distinguishable from the runner-up with {'/'.join(map(str, n)) or 0} "
                         f"seeds at total L0 {', '.join(tied)}")
        out.append(f"Best {name} at equal total L0: " + "; ".join(
            f"**{lead.ranked[0].label}** at {lead.target:g}" for lead in found) + (f" — {'; '.join(parts)}." if parts
                                                                                  else "."))
    off = [line for line in placed if value(line, "l0") is not None and value(line, "l0_target")
           and abs(value(line, "l0") - value(line, "l0_target")) > 0.25 * value(line, "l0_target")]
    if off:
        more = f", and {len(off) - 8} more (the table below)" if len(off) > 8 else ""
        out.append(f"Measured total L0 more than 25 % off its target for {len(off)} of {len(placed)} replacements "
                   "(the comparison interpolates at the target, so these count only where the curve reaches it): "
                   + ", ".join(f"{line.get('name')} ({value(line, 'l0'):.3g})" for line in off[:8]) + more + ".")
    return out


def _line_table(lines: list[dict]) -> Table:
    layers = sorted({int(k) for line in lines for k in (line.get("layers") or {})})
    header = (("name", "replacement", "total L0 target", "seed", "total L0", "CE recovered", "KL")
              + tuple(f"FVU layer {layer}" for layer in layers))
    rows = []
    for line in sorted(lines, key=lambda l: (series_order(l["_series"]), value(l, "l0_target") or 0,
                                             str(l.get("seed")))):
        per_layer = line.get("layers") or {}
        fvus = [per_layer.get(str(layer), {}).get("fvu") for layer in layers]
        rows.append((str(line.get("name")), series_label(line["_series"]), f"{value(line, 'l0_target') or 0:g}",
                     str(line.get("seed")), _fmt(value(line, "total_l0"), ".1f"),
                     _fmt(value(line, "replacement_ce_loss_recovered"), ".4f"),
                     _fmt(value(line, "replacement_kl_div"), ".4f"),
                     *(_fmt(f if isinstance(f, (int, float)) else None, ".4f") for f in fvus)))
    return Table(header, tuple(rows), swatch_column=1)


def _fmt(x: float | None, fmt: str) -> str:
    return "–" if x is None else format(x, fmt)
