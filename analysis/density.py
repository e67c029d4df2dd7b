"""Feature-density histograms: log10 firing frequency of every latent, architectures overlaid.

Uses the optional `feature_density` key of a results line: a list with one number per latent,
the fraction of evaluation tokens on which it fired. One L0 target is shown (the one with the
most architectures carrying densities; ties: the middle target), one dictionary per
architecture (its lowest seed). Bars are fractions of that dictionary's latents, so widths
compare; latents that never fired have no logarithm and are counted in the legend instead.
"""

from __future__ import annotations

import math
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from dictlearn.analysis.cli import module_main
from dictlearn.analysis.metric_plot import site_suffix, site_title
from dictlearn.analysis.results import Series, is_outside, series_label
from dictlearn.analysis.style import Drawn, legend_outside, new_figure, save, series_order, series_style, styled

KEY = "feature_density"
BIN_WIDTH = 0.2  # decades


def densities(line: dict) -> np.ndarray | None:
    """The line's per-latent firing frequencies, or None when absent or not a list of numbers."""
    raw = line.get(KEY)
    if not isinstance(raw, list) or not raw:
        return None
    try:
        array = np.asarray(raw, dtype=float)
    except (TypeError, ValueError):
        return None
    return array if array.ndim == 1 and np.isfinite(array).all() else None


def choose_target(lines: list[dict]):
    """The L0 target with the most series carrying densities; ties go to the middle one."""
    series_at = defaultdict(set)
    for line in lines:
        if densities(line) is not None and line.get("l0_target") is not None and not is_outside(line):
            series_at[line["l0_target"]].add(line["_series"])
    if not series_at:
        return None
    most = max(len(s) for s in series_at.values())
    candidates = sorted(t for t, s in series_at.items() if len(s) == most)
    return candidates[(len(candidates) - 1) // 2]


def pick(lines: list[dict], l0_target) -> dict[Series, dict]:
    """{series: its lowest-seed line with densities at `l0_target`}, and every dictionary the run
    did not train (it has no target: its own L0 is in the legend)."""
    chosen: dict[Series, dict] = {}
    for line in lines:
        if (line.get("l0_target") != l0_target and not is_outside(line)) or densities(line) is None:
            continue
        best = chosen.get(line["_series"])
        if best is None or (line.get("seed") or 0) < (best.get("seed") or 0):
            chosen[line["_series"]] = line
    return dict(sorted(chosen.items(), key=lambda item: series_order(item[0])))


@styled
def plot_density(lines: list[dict], l0_target=None, title: str | None = None) -> Figure | None:
    """Overlaid step histograms of log10 density at one L0 target; None without densities."""
    l0_target = choose_target(lines) if l0_target is None else l0_target
    chosen = pick(lines, l0_target)
    if not chosen:
        return None
    positive = np.concatenate([d[d > 0] for d in map(densities, chosen.values())])
    low = math.floor(np.log10(positive.min())) if positive.size else -6
    edges = np.linspace(low, 0.0, round(-low / BIN_WIDTH) + 1)
    fig, (ax,) = new_figure(height_in=3.2)
    variants = sorted({series[1] for series in chosen})
    for series, line in chosen.items():
        density = densities(line)
        counts, _ = np.histogram(np.log10(density[density > 0]), bins=edges)
        dead = float(np.mean(density <= 0))
        style = series_style(series, variants)
        outside = f", L0 {line['l0']:.3g}" if is_outside(line) and isinstance(line.get("l0"), (int, float)) else ""
        ax.stairs(counts / density.size, edges, color=style["color"], linewidth=1.4,
                  linestyle=":" if style["linestyle"] == "none" else style["linestyle"],  # an outside one: dotted
                  label=f"{series_label(series)} (dead {100 * dead:.1f}%{outside})",
                  gid=f"density:{series_label(series)}")
    ax.set_xlabel("log10 feature density (fraction of tokens a latent fires on)")
    ax.set_ylabel("fraction of latents per bin")
    ax.set_xlim(edges[0], 0)
    ax.set_ylim(bottom=0)
    legend_outside(fig, [ax], title=title)
    ax.set_title(f"L0 target {l0_target}")
    return fig


def draw(lines: list[dict], out_dir: Path, notes: list[str], site: tuple[str, str] | None = None) -> list[Drawn]:
    if not any(densities(line) is not None for line in lines):
        notes.append(f"density{site_suffix(site)}: no line has `{KEY}` (a list of per-latent firing "
                     "frequencies); histogram skipped")
        return []
    target = choose_target(lines)
    if target is None:
        notes.append(f"density{site_suffix(site)}: lines with `{KEY}` have no `l0_target`; histogram skipped")
        return []
    fig = plot_density(lines, target, site_title(site))
    stem = "density" + site_suffix(site)
    caption = (f"Feature density at L0 target {target}, one dictionary (lowest seed) per architecture; "
               "dead latents (density 0) are counted in the legend.")
    if any(is_outside(line) and densities(line) is not None for line in lines):
        caption += " Dotted: dictionaries this run did not train, at their own L0 (in the legend)."
    return [Drawn(stem, caption, tuple(save(fig, out_dir, stem)), site)]


if __name__ == "__main__":
    sys.exit(module_main(draw, __doc__.splitlines()[0]))
