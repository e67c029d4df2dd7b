"""Latent health: dead and dense fractions against L0.

Dead: never fired on the evaluation rows; dense: fired on more than 10% of them (the
definitions in docs/evaluate.md). Both are shown in % of the dictionary's latents.
"""

from __future__ import annotations

import sys
from pathlib import Path

from dictlearn.analysis.cli import module_main
from dictlearn.analysis.metric_plot import MetricFigure, MetricSpec, draw_specs
from dictlearn.analysis.style import Drawn

DEAD = MetricSpec("dead_fraction", "dead latents (% of d_sae)", percent=True)
DENSE = MetricSpec("dense_fraction", "dense latents (% of d_sae)", percent=True)

FIGURES = [MetricFigure("l0_dead_dense", (DEAD, DENSE),
                        "Dead latents (never fire on the evaluation rows) and dense latents (fire on > 10% of them).")]


def draw(lines: list[dict], out_dir: Path, notes: list[str], site: tuple[str, str] | None = None) -> list[Drawn]:
    return draw_specs(lines, FIGURES, out_dir, notes, site)


if __name__ == "__main__":
    sys.exit(module_main(draw, __doc__.splitlines()[0]))
