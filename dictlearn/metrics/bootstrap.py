"""Evaluation standard errors: a bootstrap over held-out documents of ratio-of-sums metrics.

Held-out rows come in documents, and rows of one document are alike (the same file, the same
code), so the rows are not independent draws and a per-row standard error would be too small.
Each metric evaluate reports is a ratio of two sums over rows (FVU: residual over total sum of
squares; L0: active latents over rows; KL: summed KL over predictions; CE loss recovered:
(zero − spliced) over (zero − clean) summed CE). Summed per document, the ratio is recomputed on
`n_boot` resamples of whole documents (drawn with replacement, as many as there are), and the
standard deviation of those ratios is its standard error.

    numerators, denominators = per-document sums, [documents, metrics] each
    ratio_se(numerators, denominators)   # -> [metrics]

The resamples are one [n_boot, documents] count matrix and two matrix products: a few
milliseconds for 1,000 resamples of a few hundred documents. A fixed seed makes the same
documents give the same errors every run (and across the dictionaries of a comparison, which
are then scored on the same resamples). A weighted mean over documents is the same ratio
(numerators = weight × value, denominators = weight).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import Tensor

N_BOOT = 1000
BOOTSTRAP_SEED = 0
MIN_DOCUMENTS = 2  # one document gives no spread to resample


@functools.lru_cache(maxsize=64)
def resample_counts(n_documents: int, n_boot: int = N_BOOT, seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """int [n_boot, n_documents] (read-only): how often each document is drawn in each resample.
    A pure function of its arguments, kept because drawing it costs more than using it (probes
    ask for the same shape ~100 times per dictionary)."""
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n_documents, np.full(n_documents, 1.0 / n_documents), size=n_boot)
    counts.setflags(write=False)
    return counts


def ratio_se(numerators, denominators, n_boot: int = N_BOOT, seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """numerators, denominators: [documents] or [documents, metrics] per-document sums -> [] or
    [metrics] float64: the bootstrap standard error of Σ numerators / Σ denominators. NaN with
    fewer than `MIN_DOCUMENTS` documents."""
    numerators = np.asarray(numerators, dtype=np.float64)
    denominators = np.asarray(denominators, dtype=np.float64)
    if len(numerators) < MIN_DOCUMENTS:
        return np.full(numerators.shape[1:], np.nan)
    counts = resample_counts(len(numerators), n_boot, seed).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = (counts @ numerators) / (counts @ denominators)  # [n_boot(, metrics)]
    return ratios.std(axis=0, ddof=1)


def per_document(values: Tensor, documents: Tensor) -> tuple[np.ndarray, Tensor]:
    """values [N, m] (or [N]) per row, documents [N] ids -> (the distinct ids [D], float64 sums
    [D, m] (or [D]) per document, in id order)."""
    ids, inverse = torch.unique(documents, return_inverse=True)
    sums = torch.zeros((len(ids), *values.shape[1:]), dtype=torch.float64, device=values.device)
    sums.index_add_(0, inverse, values.to(torch.float64))
    return ids.cpu().numpy(), sums
