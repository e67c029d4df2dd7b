"""Ground-truth feature recovery: mean max cosine similarity (MMCS; Sharkey, Braun, Millidge 2022;
docs/metrics.md).

Also serves dictionary-vs-dictionary comparisons (how much of a small dictionary a larger one
contains, as Templeton et al. 2024 match features across sizes): pass the two decoders as `a` and `b`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def max_cosine(a: Tensor, b: Tensor, chunk: int = 4096) -> Tensor:
    """a: [K, d], b: [n, d] -> [K]: for each row of a, its largest (signed) cosine with any row of b.

    Rows are normalised here (a zero row has cosine 0 with everything). Computed in blocks of at
    most [chunk, chunk] so K x n is never held at once; in float32 or wider, clamped to [-1, 1].
    """
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"max_cosine needs [K, d] and [n, d] with one d; got {tuple(a.shape)}, {tuple(b.shape)}")
    if len(b) == 0:
        raise ValueError("max_cosine: the second set of directions is empty")
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    a = F.normalize(a.detach().to(dtype), dim=-1)
    b = F.normalize(b.detach().to(dtype), dim=-1)
    out = torch.empty(len(a), dtype=dtype, device=a.device)
    for i in range(0, len(a), chunk):
        best = torch.full((len(a[i : i + chunk]),), -1.0, dtype=dtype, device=a.device)
        for j in range(0, len(b), chunk):
            best = torch.maximum(best, (a[i : i + chunk] @ b[j : j + chunk].T).amax(dim=1))
        out[i : i + chunk] = best
    return out.clamp(-1.0, 1.0)


def mmcs(true_features: Tensor, learned: Tensor, chunk: int = 4096) -> float:
    """true_features: [K, d], learned: [n, d] -> mean over true features of the best cosine match."""
    return max_cosine(true_features, learned, chunk).mean().item()


def recovered_fraction(true_features: Tensor, learned: Tensor, threshold: float = 0.9, chunk: int = 4096) -> float:
    """true_features: [K, d], learned: [n, d] -> fraction of true features with max cosine > threshold."""
    return (max_cosine(true_features, learned, chunk) > threshold).to(torch.float64).mean().item()
