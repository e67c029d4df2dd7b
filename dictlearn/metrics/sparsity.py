"""Latent sparsity and firing density as sum-reduced, checkpointed counters (definitions: docs/metrics.md)."""

from __future__ import annotations

import torch
from torch import Tensor

from dictlearn.metrics.reconstruction import SumStateMetric


class SparsityMetrics(SumStateMetric):
    """l0, l1, dead_fraction, dense_fraction over the tokens seen since the last `reset()`.

    A latent fires on a token when its value is != 0 (SAEBench core; same as SAELens' `> 0` for
    non-negative latents). Counts are int64 (a float32 counter stops at 2^24) and all
    states are persistent, so a dead-latent window that spans a checkpoint survives the resume
    (torchmetrics' default is not persistent). L0 is derived from the per-latent counts (their
    sum), so no separate state.

    - `l0` = mean number of firing latents per token; `l1` = mean Σ_i |z_i| per token.
    - `dead_fraction` = fraction of latents that never fired; `dense_fraction` = fraction whose
      firing frequency is > `dense_threshold` (10% in SAEBench `freq_over_10_percent`;
      docs/conventions.md#dead-and-dense-latents).
    """

    def __init__(self, d_sae: int, dense_threshold: float = 0.1, **kwargs) -> None:
        super().__init__(**kwargs)
        if d_sae < 1:
            raise ValueError(f"SparsityMetrics needs d_sae >= 1, got {d_sae}")
        self.d_sae, self.dense_threshold = d_sae, dense_threshold
        long = torch.int64
        self.add_state("fire_counts", torch.zeros(d_sae, dtype=long), dist_reduce_fx="sum", persistent=True)
        self.add_state("n_tokens", torch.zeros((), dtype=long), dist_reduce_fx="sum", persistent=True)
        self.add_state("sum_abs", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum", persistent=True)

    def update(
        self,
        latents: Tensor | None = None,
        *,
        fire_counts: Tensor | None = None,
        n_tokens: int | None = None,
        sum_abs: Tensor | float | None = None,
    ) -> None:
        """latents: [..., d_sae] (leading dims are tokens), or precomputed statistics of a batch:
        `fire_counts` [d_sae], its `n_tokens` and Σ|z|. Training computes those once per step and
        feeds several metrics (a counting pass over [batch, d_sae] costs as much as a small matmul).
        """
        if latents is not None:
            if latents.shape[-1] != self.d_sae:
                raise ValueError(f"SparsityMetrics(d_sae={self.d_sae}) got latents of width {latents.shape[-1]}")
            fire_counts, n_tokens, sum_abs = self.statistics(latents).values()
        elif fire_counts is None or n_tokens is None or sum_abs is None:
            raise ValueError("SparsityMetrics.update needs latents, or fire_counts, n_tokens and sum_abs")
        self.fire_counts += fire_counts.to(self.fire_counts.device, torch.int64)
        self.n_tokens += int(n_tokens)
        self.sum_abs += torch.as_tensor(sum_abs, dtype=torch.float64, device=self.sum_abs.device)

    @staticmethod
    def statistics(latents: Tensor) -> dict:
        """latents [..., d_sae] -> {fire_counts [d_sae], n_tokens, sum_abs}: what `update` adds, for
        feeding several counters from one counting pass (`update(**statistics(z))`)."""
        z = latents.detach().reshape(-1, latents.shape[-1])
        # One counting pass; L1 per row in float32 (exact enough for a row) summed in float64,
        # never a float64 copy of z.
        sum_abs = torch.linalg.vector_norm(z, ord=1, dim=-1, dtype=torch.float32).sum(dtype=torch.float64)
        # int32 column sums of the mask: count_nonzero's counts (NaN counts) at half its time on CPU
        # (its int64 reduction down the rows does not vectorise); exact below 2**31 rows, which no
        # [rows, d_sae] tensor in memory reaches
        fire_counts = (z != 0).sum(0, dtype=torch.int32).to(torch.int64)
        return {"fire_counts": fire_counts, "n_tokens": z.shape[0], "sum_abs": sum_abs}

    def _density(self) -> Tensor:
        return self.fire_counts.to(torch.float64) / self.n_tokens.to(torch.float64)

    def compute(self) -> dict[str, Tensor]:
        n = self.n_tokens.to(torch.float64)
        return {
            "l0": self.fire_counts.sum().to(torch.float64) / n,
            "l1": self.sum_abs / n,
            "dead_fraction": (self.fire_counts == 0).to(torch.float64).mean(),
            "dense_fraction": (self._density() > self.dense_threshold).to(torch.float64).mean(),
        }

    def feature_density(self) -> Tensor:
        """-> [d_sae] float64 firing frequency per latent, over all ranks when distributed."""
        with self.sync_context(
            dist_sync_fn=self.dist_sync_fn, should_sync=self._to_sync, should_unsync=self._should_unsync
        ):
            return self._density()

    def log10_density_histogram(
        self, bins: int = 50, low: float = -10.0, high: float = 0.0
    ) -> tuple[Tensor, Tensor]:
        """-> (counts int64 [bins], edges float64 [bins + 1]) of log10(density + 1e-10) (SAELens' feature-density plot).

        Bin i holds edges[i] <= v < edges[i+1] (the last bin is closed). Values outside [low, high]
        go to the end bins, so counts sum to d_sae and dead latents (log10(1e-10) = -10, which may
        round just below `low`) land in bin 0.
        """
        values = torch.log10(self.feature_density() + 1e-10)
        edges = torch.linspace(low, high, bins + 1, dtype=torch.float64, device=values.device)
        index = (torch.bucketize(values, edges, right=True) - 1).clamp(0, bins - 1)
        return torch.bincount(index, minlength=bins), edges
