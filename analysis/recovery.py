"""Feature recovery on synthetic data: MMCS against L0.

MMCS is the mean over the true features of the best cosine similarity with any decoder row
(Sharkey et al. 2022); 1 means every true feature has an exact copy in the dictionary. Only
results on `dictlearn synth` files carry it; elsewhere the figure is skipped without a note.
"""

from __future__ import annotations

import sys
from pathlib import Path

from dictlearn.analysis.cli import module_main
from dictlearn.analysis.metric_plot import MetricFigure, MetricSpec, draw_specs
from dictlearn.analysis.results import value
from dictlearn.analysis.style import Drawn

MMCS = MetricSpec("mmcs", "MMCS (mean max cosine similarity)", better="higher")

FIGURES = [MetricFigure("l0_mmcs", (MMCS,), "Recovery of the true features of the synthetic data. Higher is better.")]


def draw(lines: list[dict], out_dir: Path, notes: list[str], site: tuple[str, str] | None = None) -> list[Drawn]:
    # mmcs exists only on synthetic data: its absence on real activations is not worth a note
    if not any(value(line, "mmcs") is not None for line in lines):
        return []
    return draw_specs(lines, FIGURES, out_dir, notes, site)


if __name__ == "__main__":
    sys.exit(module_main(draw, __doc__.splitlines()[0]))
