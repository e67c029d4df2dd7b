"""Initialisation and schedule helpers: geometric median (b_dec), warm-up/decay factors, firing quantiles (thresholds)."""

from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def geometric_median(points: Tensor, max_iter: int = 100, tol: float = 1e-5) -> Tensor:
    """Weiszfeld's algorithm, started at the mean (Bricken et al. 2023 b_dec init; dictionary_learning's
    iteration limits).

    points: [n, d] -> [d], the point minimising the sum of Euclidean distances to `points`.
    Runs in float64 so the fixed point does not stall on rounding.
    """
    x = points.double()
    median = x.mean(0)
    for _ in range(max_iter):
        # eps guards the division when the estimate sits exactly on a data point
        weights = 1.0 / (x - median).norm(dim=-1).clamp_min(1e-12)
        new = (weights[:, None] * x).sum(0) / weights.sum()
        shift = (new - median).norm()
        median = new
        if shift <= tol * median.norm().clamp_min(1.0):
            break
    return median.to(points.dtype)


def warmup_decay_factor(step: int, total: int, warmup: float, decay: float = 0.0) -> float:
    """Linear warm-up over `warmup` steps, constant, linear decay to 0 over the last `decay`
    steps of `total` (docs/conventions.md#schedules). -> factor in [0, 1] for the LR or a sparsity coefficient."""
    factor = 1.0 if warmup <= 0 else min(1.0, (step + 1) / warmup)
    if decay > 0:
        factor = min(factor, max(0.0, (total - step) / decay))
    return factor


def firing_quantile(values: Tensor, fraction: float) -> Tensor:
    """values [n, m] -> [m]: per column, the value it exceeds on `fraction` of the rows (its
    (r + 1)-th largest, r = that many rows, at least one). kthvalue, not topk: a JumpReLU start
    passes every entry of the sample as one column (67M rows), where topk's output would not fit."""
    n = values.shape[0]
    kept = min(n - 1, max(1, round(n * fraction)))
    return values.kthvalue(n - kept, dim=0).values
