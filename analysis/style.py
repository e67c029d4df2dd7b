"""One look for every figure: the architecture colour/marker table, sizes, the L0 axis, saving.

Figures are plain `matplotlib.figure.Figure` objects on an Agg canvas (no pyplot, no global
figure manager), so drawing is the same in tests, on a headless server and inside compare.
"""

from __future__ import annotations

import functools
import math
import textwrap
import zlib
from dataclasses import dataclass
from pathlib import Path

from matplotlib import rc_context
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FixedLocator, LogLocator, NullFormatter, NullLocator

from dictlearn.analysis.results import Series, is_outside_series, series_label
from dictlearn.io import atomic_path

#: architecture -> (colour, marker), keyed by the mechanisms' registry names
#: (dictlearn.dictionaries.registry; tests/test_registry.py checks every shipped one has a row) and
#: compare's `<name>_transcoder` variants. Okabe-Ito colours (distinguishable with colour-blindness);
#: the TopK family shares blues. Every figure and the report use this table; an architecture
#: without a row (a new mechanism) gets a fixed colour and marker from its name.
ARCHITECTURES: dict[str, tuple[str, str]] = {
    "relu_l1": ("#D55E00", "^"),
    "topk": ("#0072B2", "o"),
    "batchtopk": ("#56B4E9", "s"),
    "gated": ("#009E73", "D"),
    "jumprelu": ("#CC79A7", "v"),
    "matryoshka": ("#E69F00", "P"),
    "topk_transcoder": ("#8C564B", "X"),
    "topk_skip_transcoder": ("#555555", "h"),
    # whole replacement models (`dictlearn compare --replace mlp`): cross-layer transcoders
    "topk_clt": ("#9467BD", "*"),
    "jumprelu_clt": ("#2CA02C", "P"),
}
_EXTRA_COLOURS = ("#BCBD22", "#17BECF", "#9467BD", "#E377C2", "#7F7F7F", "#2CA02C", "#1F77B4")
_EXTRA_MARKERS = ("p", "*", "<", ">", "d", "H", "8")
#: dictionaries the run did not train (`--include`): a star, in colours no architecture uses, given
#: in the order `outside_styles` lists them (so two of them never share one); after eight, other markers
OUTSIDE_COLOURS = ("#000000", "#7F7F7F", "#6A3D9A", "#1B9E77", "#808000", "#000080", "#E7298A", "#B15928")
OUTSIDE_MARKERS = ("*", "P", "X")
_OUTSIDE_ORDER: dict[str, int] = {}


def outside_styles(labels) -> None:
    """Number the outside series of a report (sorted labels) so each gets its own colour; a label
    first seen later (a figure drawn alone) takes the next number."""
    _OUTSIDE_ORDER.clear()
    for label in sorted(set(labels)):
        _OUTSIDE_ORDER[label] = len(_OUTSIDE_ORDER)
#: variants of one architecture (other runs, other widths) differ by line style
LINESTYLES = ("-", "--", ":", "-.")

REFERENCE_LABELS = ("Pareto-optimal",)
WIDTH_IN = 7.0  # a two-column paper's text width
DPI = 200
RC = {
    "font.size": 9,
    "axes.labelsize": 9.5,
    "axes.titlesize": 10,
    "legend.fontsize": 8.5,
    "xtick.labelsize": 8.5,
    "ytick.labelsize": 8.5,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.6,
    "lines.linewidth": 1.5,
    "lines.markersize": 5.5,
    "svg.hashsalt": "dictlearn",  # reproducible SVG ids
}


def architecture_style(architecture: str) -> tuple[str, str]:
    """(colour, marker); an architecture outside the table gets a fixed one from its name."""
    if architecture in ARCHITECTURES:
        return ARCHITECTURES[architecture]
    if is_outside_series((architecture, "")):
        number = _OUTSIDE_ORDER.setdefault(architecture, len(_OUTSIDE_ORDER))
        marker = OUTSIDE_MARKERS[number // len(OUTSIDE_COLOURS) % len(OUTSIDE_MARKERS)]
        return OUTSIDE_COLOURS[number % len(OUTSIDE_COLOURS)], marker
    index = zlib.crc32(architecture.encode())
    return _EXTRA_COLOURS[index % len(_EXTRA_COLOURS)], _EXTRA_MARKERS[index % len(_EXTRA_MARKERS)]


def series_order(series: Series) -> tuple:
    """Legend order: the table's order, then other architectures by name, then the dictionaries
    the run did not train, then variants."""
    architecture, variant = series
    known = list(ARCHITECTURES)
    rank = known.index(architecture) if architecture in known else len(known) + is_outside_series(series)
    return (rank, architecture, variant)


def series_style(series: Series, variants: list[str]) -> dict:
    """Line2D keyword arguments for one series; `variants` are all variants in the figure."""
    colour, marker = architecture_style(series[0])
    linestyle = LINESTYLES[sorted(variants).index(series[1]) % len(LINESTYLES)] if series[1] in variants else "-"
    if is_outside_series(series):  # one point, not a curve: a large star, no line
        return dict(color=colour, marker=marker, markersize=11, markeredgecolor="white", markeredgewidth=0.6,
                    linestyle="none", label=series_label(series))
    return dict(color=colour, marker=marker, linestyle=linestyle, label=series_label(series))


def styled(function):
    """Run a plotting function under the house rcParams (text and lines pick them up at creation)."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with rc_context(RC):
            return function(*args, **kwargs)

    return wrapper


def new_figure(ncols: int = 1, height_in: float = 3.4) -> tuple[Figure, list]:
    """A constrained-layout figure of paper width on an Agg canvas, and its axes."""
    fig = Figure(figsize=(WIDTH_IN, height_in), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


L0_LABEL = "L0 (mean active latents per token, log scale)"


def l0_axis(ax, l0_values: list[float]) -> None:
    """Log-scaled L0 axis (as SAEBench draws it) with plain-number ticks at powers of two."""
    ax.set_xscale("log", base=2)
    ax.set_xlabel(L0_LABEL)
    low, high = min(l0_values), max(l0_values)
    ticks = [2.0**e for e in range(math.floor(math.log2(low)), math.ceil(math.log2(high)) + 1)]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(lambda v, _: f"{v:g}")
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlim(low / 1.25, high * 1.25)


def log_y_axis(ax) -> None:
    """Log y axis labelled in plain numbers (0.05, 0.1, 0.2) rather than 5 × 10^-2."""
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_minor_formatter(NullFormatter())


def share_x_label(fig: Figure, axes: list) -> None:
    """Panels side by side with the same x axis: one label under them all, not one each."""
    if len(axes) > 1:
        label = axes[0].get_xlabel()
        for ax in axes:
            ax.set_xlabel("")
        fig.supxlabel(label, fontsize=RC["axes.labelsize"])


def _proxy(handle, label: str):
    """A legend entry without the error bars: the line and marker only."""
    line = handle.lines[0] if hasattr(handle, "lines") else handle
    return Line2D([], [], color=line.get_color(), marker=line.get_marker(), linestyle=line.get_linestyle(),
                  markerfacecolor=line.get_markerfacecolor(), markeredgecolor=line.get_markeredgecolor(),
                  markeredgewidth=line.get_markeredgewidth(), markersize=line.get_markersize(),
                  linewidth=line.get_linewidth(), label=label)


LEGEND_LABEL_CHARS = 34  # a legend label wraps past this many characters


def legend_outside(fig: Figure, axes: list, above: bool = False, title: str | None = None) -> None:
    """One legend for the figure, outside the axes (right, or `above` them: side-by-side panels
    keep their width) so it never covers data; series first, "Pareto-optimal" last. `title`
    (the (model, hook) site when a report has several) heads the legend: a figure title would
    collide with a legend above the panels."""
    entries: dict[str, object] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    ordered = sorted(entries.items(), key=lambda item: item[0] in REFERENCE_LABELS)
    handles = [_proxy(handle, label) if hasattr(handle, "get_marker") or hasattr(handle, "lines") else handle
               for label, handle in ordered]
    if not handles:
        return
    # long labels (an outside dictionary's "name (format, not trained here) (dead …, L0 …)") wrap:
    # on one line they took the figure's width from the axes
    labels = [textwrap.fill(label, LEGEND_LABEL_CHARS, break_long_words=False) for label, _ in ordered]
    options = dict(handles=handles, labels=labels, frameon=False, handlelength=2.6, title=title,
                   title_fontproperties={"weight": "bold", "size": RC["legend.fontsize"]})
    if above:
        fig.legend(loc="outside upper center", ncols=min(4, len(handles)), **options)
    else:
        fig.legend(loc="outside right upper", ncols=1 if len(handles) <= 14 else 2, **options)


_NO_DATE = {"png": {"Software": None}, "svg": {"Date": None}}


@dataclass(frozen=True)
class Drawn:
    """A saved figure: file stem, caption for the report, PNG and SVG paths, its (model, hook)."""

    stem: str
    caption: str
    paths: tuple[Path, ...]
    site: tuple[str, str] | None = None

    @property
    def png(self) -> Path:
        return self.paths[0]


def save(fig: Figure, folder: Path, stem: str) -> list[Path]:
    """`folder/stem.png` and `.svg`, each written atomically; -> the two paths."""
    paths = []
    for extension in ("png", "svg"):
        final = Path(folder) / f"{stem}.{extension}"
        with atomic_path(final) as tmp:
            # no creation date in the files, so the same results give the same bytes
            fig.savefig(tmp, format=extension, dpi=DPI, metadata=_NO_DATE[extension])
        paths.append(final)
    return paths
