"""Which L0? The L0 diagnostic of Chanin & Garriga-Alonso 2025 against L0, beside sparse probing.

One panel per n the results hold: `nth_decoder_projection` (s_n^dec at n = d_sae/4,
dictlearn/metrics/decoder_projection.py) and, where recorded, the same at n = d_sae/8 and d_sae/2
(small multiples on a shared L0 axis, each with its own y axis: the score's scale moves with n),
against the measured L0 per architecture; the shaded band is that n's indicated L0's interval over
seeds and the dashed line the indicated L0 (analysis/indicated_l0.py: the minimum of the seed-mean
curve, refined in log L0). Last panel: sparse-probe ROC-AUC (k = 16, else k = 1) against L0 with
the d_sae/4 bands, so the reader sees whether the proxy's L0 and the probes' peak agree on this
model. The report's sentences on the same records are analysis/l0_scan_text.py's (`records`,
`sentence`, `summary_blocks`, also importable from here).
"""

from __future__ import annotations

import sys
from pathlib import Path

from dictlearn.analysis.cli import module_main
from dictlearn.analysis.metric_plot import MetricSpec, draw_metric_axis, site_suffix, site_title
from dictlearn.analysis.results import series_label, value
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dictlearn.analysis.style import (DPI, WIDTH_IN, Drawn, architecture_style, legend_outside, save, share_x_label,
                                      styled)
from dictlearn.analysis.indicated_l0 import PROXY, PROXY_BY_N
# the report's words, here too for callers of l0_scan.sentence / summary_blocks from before the split
from dictlearn.analysis.l0_scan_text import interval_text, records, sentence, summary_blocks, target_text  # noqa: F401

STEM = "l0_scan"
CAPTION = ("Which L0? The nth decoder projection s_n^dec of Chanin & Garriga-Alonso (2025) against L0 (mean over "
           "seeds, 95 % interval), one panel per n (d_sae/8, d_sae/4, d_sae/2 where recorded); the dashed line is that "
           "n's indicated L0 (the minimum of the seed-mean curve, refined in log L0) and the band its range over seeds. "
           "Last panel: sparse-probe ROC-AUC against L0 with the d_sae/4 bands. An architecture without a line: the "
           "scan does not bracket its indicated L0 at that n. Readings that move with n do not locate the L0.")


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


if __name__ == "__main__":
    sys.exit(module_main(draw, __doc__.splitlines()[0]))
