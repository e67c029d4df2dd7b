"""Concept coverage: does each latent's firing match a known concept, over all rows?

An interpretability score that needs no LLM and scores the whole activation distribution rather
than a latent's top examples: for every latent and concept, the F1 of "the latent fires" (z > 0)
as a detector of "the row has the concept",

    F1 = 2 TP / (fires + positives)          TP = rows where the latent fires and the label holds,

counted by a streaming accumulator, so any number of rows fits in memory:

    coverage = ConceptCoverage(d_sae, n_concepts)
    for z, labels in batches:                     # z: [rows, d_sae]; labels: bool [rows, n_concepts]
        coverage.update(z > 0, labels)
    result = coverage.compute()
    result.best_concept, result.best_f1           # per latent: its best concept and that F1
    result.concept_coverage(), result.concept_f1_mean()

- ``concept_coverage``: the fraction of alive latents (fired on at least one counted row) whose
  best F1 is >= 0.5 — how much of the dictionary a known concept explains.
- ``concept_f1_mean``: the mean over concepts (with at least one positive row) of the best single
  latent's F1 — does some latent own the concept, or is it split or absorbed across several?
  A detector F1 is the measure of feature-to-concept match used for feature absorption and
  splitting (Chanin et al. 2024, "A is for Absorption"; Karvonen et al. 2025, SAEBench); the
  0.5 threshold is dictlearn's.

A `torchmetrics.Metric` (count states summed across processes), like dictlearn's other metrics.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torchmetrics import Metric

COVERAGE_THRESHOLD = 0.5  # a latent "has" a concept at detector F1 >= 0.5
# float32 matmuls count exactly below 2^24 rows; updates are cut into pieces of this many rows
_ROWS_PER_PRODUCT = 1 << 20


def _as_bool_tensor(value, device: torch.device) -> torch.Tensor:
    tensor = torch.as_tensor(value) if isinstance(value, np.ndarray) else value
    return tensor.to(device=device, dtype=torch.bool)


class ConceptCoverage(Metric):
    """Counts per latent and concept: true positives [d_sae, n_concepts], fires [d_sae],
    positives [n_concepts], rows. `update(fires, labels)`; `compute()` -> `CoverageResult`."""

    full_state_update = False

    def __init__(self, d_sae: int, n_concepts: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.d_sae, self.n_concepts = d_sae, n_concepts
        self.add_state("true_positives", torch.zeros(d_sae, n_concepts, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("fires", torch.zeros(d_sae, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("positives", torch.zeros(n_concepts, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("rows", torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, fires, labels) -> None:
        """fires: bool [rows, d_sae] (e.g. ``z > 0``); labels: bool [rows, n_concepts]; torch or numpy.

        Pass only rows that carry labels (`ConceptLabels.labelled`): every row counted is a
        positive or a negative of every concept.
        """
        fires, labels = _as_bool_tensor(fires, self.fires.device), _as_bool_tensor(labels, self.fires.device)
        if fires.ndim != 2 or labels.ndim != 2 or fires.shape[0] != labels.shape[0] \
                or fires.shape[1] != self.d_sae or labels.shape[1] != self.n_concepts:
            raise ValueError(f"ConceptCoverage.update: fires {tuple(fires.shape)} and labels {tuple(labels.shape)}"
                             f" must be [rows, {self.d_sae}] and [rows, {self.n_concepts}]")
        for start in range(0, fires.shape[0], _ROWS_PER_PRODUCT):  # float sums: bool ones are ~20x slower
            f = fires[start:start + _ROWS_PER_PRODUCT].float()
            y = labels[start:start + _ROWS_PER_PRODUCT].float()
            self.true_positives += (f.T @ y).round().long()
            self.fires += f.sum(0).round().long()
            self.positives += y.sum(0).round().long()
        self.rows += fires.shape[0]

    def compute(self) -> CoverageResult:
        tp = self.true_positives.double()
        denominator = self.fires.double()[:, None] + self.positives.double()[None, :]
        f1 = torch.where(denominator > 0, 2 * tp / denominator.clamp_min(1), torch.zeros_like(tp))
        return CoverageResult(f1.cpu().numpy(), self.fires.cpu().numpy(), self.positives.cpu().numpy(),
                              int(self.rows))


@dataclass
class CoverageResult:
    """f1: float64 [d_sae, n_concepts]; fires: int [d_sae]; positives: int [n_concepts]; rows."""

    f1: np.ndarray
    fires: np.ndarray
    positives: np.ndarray
    rows: int

    @property
    def alive(self) -> np.ndarray:
        """bool [d_sae]: fired on at least one counted row."""
        return self.fires > 0

    @property
    def best_concept(self) -> np.ndarray:
        """int [d_sae]: each latent's concept of highest F1 (0 for a latent with F1 0 everywhere)."""
        return self.f1.argmax(1)

    @property
    def best_f1(self) -> np.ndarray:
        """float [d_sae]: that F1."""
        return self.f1.max(1) if self.f1.shape[1] else np.zeros(self.f1.shape[0])

    @property
    def present(self) -> np.ndarray:
        """bool [n_concepts]: the concept has at least one positive row."""
        return self.positives > 0

    def concept_coverage(self, threshold: float = COVERAGE_THRESHOLD) -> float | None:
        """Fraction of alive latents whose best F1 >= threshold (None: no latent alive)."""
        alive = self.alive
        return float((self.best_f1[alive] >= threshold).mean()) if alive.any() else None

    def concept_f1_mean(self) -> float | None:
        """Mean over present concepts of the best latent's F1 (None: no concept present)."""
        present = self.present
        return float(self.f1[:, present].max(0).mean()) if present.any() and len(self.f1) else None

    def per_concept(self, names: list[str], threshold: float = COVERAGE_THRESHOLD) -> dict[str, dict]:
        """{concept: {f1, latent, latents, positive_fraction}} for the results record: the best
        latent and its F1, how many alive latents have this as their best concept at F1 >=
        threshold (several: the concept is split), and the concept's share of the rows."""
        owners = self.alive & (self.best_f1 >= threshold)
        out = {}
        for j, name in enumerate(names):
            column = self.f1[:, j]
            best = int(column.argmax()) if len(column) else None
            out[name] = {
                "f1": float(column[best]) if self.present[j] and best is not None else None,
                "latent": best if self.present[j] else None,
                "latents": int((owners & (self.best_concept == j)).sum()),
                "positive_fraction": float(self.positives[j] / self.rows) if self.rows else None,
            }
        return out
