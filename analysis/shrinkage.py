"""Shrinkage: the reconstruction's norm against the input's, against L0.

`l2_ratio` is the mean of ‖x̂‖ / ‖x‖ and `rel_reconstruction_bias` γ = Σ‖x̂‖² / Σ⟨x, x̂⟩; both
are 1 for an unbiased reconstruction and below 1 when the sparsity penalty shrinks the latents
(the L1 shrinkage of Wright & Sharkey 2024, measured as in Rajamanoharan et al. 2024).
"""

from __future__ import annotations

import sys
from pathlib import Path

from dictlearn.analysis.cli import module_main
from dictlearn.analysis.metric_plot import MetricFigure, MetricSpec, draw_specs
from dictlearn.analysis.style import Drawn

L2_RATIO = MetricSpec("l2_ratio", "L2 ratio ‖x̂‖ / ‖x‖", reference=1.0)
GAMMA = MetricSpec("rel_reconstruction_bias", "relative reconstruction bias γ", reference=1.0)

FIGURES = [MetricFigure("l0_shrinkage", (L2_RATIO, GAMMA),
                        "Shrinkage: values below the dashed line at 1 mean reconstructions shorter than the input.")]


def draw(lines: list[dict], out_dir: Path, notes: list[str], site: tuple[str, str] | None = None) -> list[Drawn]:
    return draw_specs(lines, FIGURES, out_dir, notes, site)


if __name__ == "__main__":
    sys.exit(module_main(draw, __doc__.splitlines()[0]))
