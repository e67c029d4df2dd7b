"""Sparsity-fidelity frontiers: FVU, CE loss recovered and KL divergence against L0.

Lower FVU and KL, higher CE loss recovered, fewer active latents are better; the rings mark
the Pareto-optimal settings over all architectures (seed means). The L0 axis is log-scaled,
as SAEBench draws it (Karvonen et al. 2025).
"""

from __future__ import annotations

import sys
from pathlib import Path

from dictlearn.analysis.cli import module_main
from dictlearn.analysis.metric_plot import MetricFigure, MetricSpec, draw_specs
from dictlearn.analysis.style import Drawn

FVU = MetricSpec("fvu", "FVU (fraction of variance unexplained)", better="lower")
CE_RECOVERED = MetricSpec("ce_loss_recovered", "CE loss recovered (fraction)", better="higher")
KL = MetricSpec("kl_div", "KL(clean ‖ spliced) (nats per token)", better="lower", log_y=True)

FIGURES = [
    MetricFigure("l0_fvu", (FVU,), "Reconstruction error against sparsity. Lower is better on both axes."),
    MetricFigure("l0_ce_loss_recovered", (CE_RECOVERED,),
                 "Fraction of the zero-ablation CE loss increase that splicing the dictionary in recovers. "
                 "Higher is better."),
    MetricFigure("l0_kl_div", (KL,),
                 "KL divergence of the spliced model's next-token distribution from the clean one. Lower is better."),
]


def draw(lines: list[dict], out_dir: Path, notes: list[str], site: tuple[str, str] | None = None) -> list[Drawn]:
    return draw_specs(lines, FIGURES, out_dir, notes, site)


if __name__ == "__main__":
    sys.exit(module_main(draw, __doc__.splitlines()[0]))
