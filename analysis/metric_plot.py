"""The one drawing every "metric against L0" figure shares.

A figure is a list of `MetricSpec` panels. Each series (architecture, plus variant) is one line
through its seed-mean points sorted by measured L0, with error bars spanning the seeds' min..max
in both L0 and the metric. Panels with a direction (`better`) ring the Pareto-optimal points.
Adding a figure is one `MetricFigure(...)` entry and one `draw_specs` call.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

from dictlearn.analysis.aggregate import Point, aggregate, pareto
from dictlearn.analysis.results import Series, missing, value
from dictlearn.analysis.style import (Drawn, l0_axis, legend_outside, log_y_axis, new_figure, save, series_order,
                                      series_style, share_x_label, styled)

PARETO_STYLE = dict(linestyle="none", marker="o", markersize=12, markerfacecolor="none",
                    markeredgecolor="black", markeredgewidth=1.0, zorder=4)


@dataclass(frozen=True)
class MetricSpec:
    """One panel: the metric key, its axis label (with units), which way is better (None: no
    Pareto marking), and display options. `percent` shows a fraction as %; `reference` draws a
    dashed horizontal line (e.g. 1 for l2_ratio), named in the legend by `reference_label`."""

    metric: str
    label: str
    better: str | None = None
    log_y: bool = False
    percent: bool = False
    reference: float | None = None
    reference_label: str | None = None


@dataclass(frozen=True)
class MetricFigure:
    """A saved figure: file stem, its panels and the report's caption."""

    stem: str
    specs: tuple[MetricSpec, ...]
    caption: str


def draw_metric_axis(ax, lines: list[dict], spec: MetricSpec) -> dict[Series, list[Point]]:
    """Draw one panel on `ax`; -> the points drawn. Lines without the metric or L0 are left out."""
    points = aggregate(lines, spec.metric)
    variants = sorted({series[1] for series in points})
    for series in sorted(points, key=series_order):
        pts = points[series]
        container = ax.errorbar(
            [p.l0 for p in pts], [p.y for p in pts],
            # the metric: the 95 % interval of the seed mean; L0, the position: the seeds' range (a
            # t-interval of two L0s can reach below 0, which a log axis cannot draw)
            xerr=[[p.l0 - p.l0_min for p in pts], [p.l0_max - p.l0 for p in pts]],
            yerr=[[p.y - p.y_lo for p in pts], [p.y_hi - p.y for p in pts]],
            capsize=2.0, elinewidth=0.8, zorder=3, **series_style(series, variants))
        container.lines[0].set_gid(f"{spec.metric}:{container.get_label()}")
    everything = [p for pts in points.values() for p in pts]
    if spec.better is not None and everything:
        best = pareto(everything, higher_is_better=spec.better == "higher")
        ax.plot([p.l0 for p in best], [p.y for p in best], label="Pareto-optimal", gid="pareto", **PARETO_STYLE)
    if spec.reference is not None:
        ax.axhline(spec.reference, color="0.35", linestyle="--", linewidth=0.9, zorder=1, gid="reference",
                   label=spec.reference_label)
    if everything:
        l0_axis(ax, [p.l0_min for p in everything] + [p.l0_max for p in everything])
    if spec.log_y:
        log_y_axis(ax)
    if spec.percent:
        ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=None))
    ax.set_ylabel(spec.label)
    return points


@styled
def plot_metrics_vs_l0(lines: list[dict], specs: list[MetricSpec], title: str | None = None) -> Figure | None:
    """One figure, one panel per spec that has data; None when no spec has any."""
    specs = [spec for spec in specs if _drawable(lines, spec.metric)]
    if not specs:
        return None
    fig, axes = new_figure(ncols=len(specs), height_in=3.4 if len(specs) == 1 else 3.0)
    for ax, spec in zip(axes, specs):
        draw_metric_axis(ax, lines, spec)
    share_x_label(fig, axes)
    legend_outside(fig, axes, above=len(specs) > 1, title=title)
    return fig


def plot_metric_vs_l0(lines: list[dict], metric: str, label: str, better: str | None = None, **options) -> Figure | None:
    """The one-call form: e.g. `plot_metric_vs_l0(lines, "probe_auc_k1", "probe AUC (k = 1)", "higher")`."""
    return plot_metrics_vs_l0(lines, [MetricSpec(metric, label, better, **options)])


def _drawable(lines: list[dict], metric: str) -> bool:
    return any(value(line, metric) is not None and value(line, "l0") is not None for line in lines)


def draw_specs(lines: list[dict], figures: list[MetricFigure], out_dir: Path, notes: list[str],
               site: tuple[str, str] | None = None) -> list[Drawn]:
    """Draw and save each figure; a metric no line has skips its panel (its figure, when it is
    the only one) with a note; lines lacking a metric are named in a note and left out."""
    drawn = []
    for figure in figures:
        for spec in figure.specs:
            _note_missing(lines, figure.stem, spec.metric, notes)
        fig = plot_metrics_vs_l0(lines, list(figure.specs), title=site_title(site))
        if fig is None:
            continue
        stem = figure.stem + site_suffix(site)
        drawn.append(Drawn(stem, figure.caption, tuple(save(fig, out_dir, stem)), site))
    return drawn


def _note_missing(lines: list[dict], stem: str, metric: str, notes: list[str]) -> None:
    absent = sorted(set(missing(lines, metric)) | set(missing(lines, "l0")))
    if len(absent) == len(lines):
        notes.append(f"{stem}: no line has both `{metric}` and `l0`; skipped")
    elif absent:
        shown = ", ".join(absent[:5]) + (f" and {len(absent) - 5} more" if len(absent) > 5 else "")
        notes.append(f"{stem}: {len(absent)} of {len(lines)} lines lack `{metric}` or `l0` and are left out ({shown})")


def site_title(site: tuple[str, str] | None) -> str | None:
    return None if site is None else f"{site[0]}, {site[1]}"


def site_suffix(site: tuple[str, str] | None) -> str:
    """A file-name suffix for one (model, hook) group, when a results set has several."""
    if site is None:
        return ""
    return "".join("__" + re.sub(r"[^A-Za-z0-9._]+", "-", part).strip("-") for part in site)
