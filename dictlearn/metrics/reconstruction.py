"""Reconstruction fidelity as streamed, sum-reduced torchmetrics states (definitions: docs/metrics.md).

Every state is a sum, so `compute()` on DDP-synced totals equals the single-process result, and a
metric can be fed any number of uneven batches. Metric names are the contract in `METRIC_NAMES`.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


class SumStateMetric(Metric):
    """Base for metrics whose states are sums: float64 sums stay float64 under `module.to(dtype)`.

    torchmetrics only guards `.half()/.float()/...`; `module.to(torch.bfloat16)` (what Lightning's
    `bf16-true`/`16-true` precision calls) would cast float states too, and a bf16 sum over 1e8
    tokens is meaningless. Devices still move.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    def _apply(self, fn, exclude_state=()):
        keep = [k for k, v in self._defaults.items() if isinstance(v, Tensor) and v.dtype == torch.float64]
        this = super()._apply(fn, exclude_state=(*exclude_state, *keep))
        for key in keep:
            this._defaults[key] = this._defaults[key].to(this.device)
            setattr(this, key, getattr(this, key).to(this.device))
        return this


class ReconstructionMetrics(SumStateMetric):
    """mse, fvu, explained_variance, cos_sim, l2_ratio, rel_reconstruction_bias over all tokens seen.

    Conventions (y = target, ŷ = reconstruction, e = y − ŷ, N tokens, μ = per-dim mean of y):
    - `mse` = (1/N) Σ_t ‖e_t‖²: summed over dims, mean over tokens (SAELens/dictionary_learning
      training convention; `F.mse_loss` would be d times smaller).
    - `fvu` = Σ_t ‖e_t‖² / Σ_t ‖y_t − μ‖², a ratio of totals, centred; the denominator is streamed as
      Σ‖y‖² − ‖Σy‖²/N. Not the per-token-ratio mean nor variance about zero (SAEBench#76,
      SAELens#659; docs/metrics.md#fvu). `explained_variance` = 1 − fvu.
    - `cos_sim` = mean_t ⟨y_t, ŷ_t⟩ / max(‖y_t‖‖ŷ_t‖, eps): a zero reconstruction scores 0.
    - `l2_ratio` = mean_t ‖ŷ_t‖ / ‖y_t‖.
      Both means run over the tokens with ‖y_t‖ > eps; they are undefined for a zero target.
    - `rel_reconstruction_bias` γ = Σ‖ŷ‖² / Σ⟨y, ŷ⟩ (Rajamanoharan et al. 2024a eq. 10, ratio of totals).

    Args:
        d: feature width; optional. Without it the per-dim sum takes its shape at the first update,
            so under DDP every rank must see at least one batch before `compute()`.
        eps: targets with ‖y_t‖ <= eps are left out of `cos_sim` and `l2_ratio`.
    """

    def __init__(self, d: int | None = None, eps: float = 1e-8, **kwargs) -> None:
        super().__init__(**kwargs)
        self.d, self.eps = d, eps
        f64 = torch.float64
        # persistent: a logging interval that spans a checkpoint resumes with its sums
        state = dict(dist_reduce_fx="sum", persistent=True)
        self.add_state("n_tokens", torch.zeros((), dtype=torch.int64), **state)
        self.add_state("n_ratio_tokens", torch.zeros((), dtype=torch.int64), **state)
        self.add_state("sum_target", torch.zeros(() if d is None else (d,), dtype=f64), **state)
        for name in ("sum_sq_error", "sum_sq_target", "sum_sq_recon", "sum_dot", "sum_cos", "sum_l2_ratio"):
            self.add_state(name, torch.zeros((), dtype=f64), **state)

    def update(self, target: Tensor, reconstruction: Tensor, target_statistics: TargetStatistics | None = None) -> None:
        """target, reconstruction: [..., d]; leading dims are tokens. `target_statistics`: this
        `target`'s `TargetStatistics` (same eps), shared by metrics that read one target (a sweep's
        members): the same states as without it, the target's passes done once."""
        if target.shape != reconstruction.shape:
            raise ValueError(
                f"target {tuple(target.shape)} and reconstruction {tuple(reconstruction.shape)} differ in shape"
            )
        if self.d is not None and target.shape[-1] != self.d:
            raise ValueError(f"ReconstructionMetrics(d={self.d}) got inputs of width {target.shape[-1]}")
        stats = target_statistics
        if stats is None or stats.target is not target or stats.eps != self.eps:
            stats = TargetStatistics(target, self.eps)
        # detach: forward() enables grad, and a graph attached to a state would be kept alive.
        # Per-token reductions run in the inputs' precision (float32 at least: ~1e-7 relative per
        # token); every running total is float64, so sums over 1e8 tokens do not drift. (A float64
        # copy of each batch cost 1/8 of a sparse training step; these reductions a tenth of that.)
        y = stats.y
        y_hat = reconstruction.detach().reshape(-1, target.shape[-1]).to(y.dtype)
        f64 = torch.float64
        y_hat_norm = torch.linalg.vector_norm(y_hat, dim=-1)
        dot = torch.linalg.vecdot(y, y_hat)
        self.n_tokens += y.shape[0]
        self.sum_target = self.sum_target + stats.sum_target  # not +=: a lazily sized state broadcasts to [d]
        self.sum_sq_error += torch.linalg.vector_norm(y - y_hat, dim=-1).to(f64).square().sum()
        self.sum_sq_target += stats.sum_sq_target
        self.sum_sq_recon += y_hat_norm.to(f64).square().sum()
        self.sum_dot += dot.to(f64).sum()
        # cos and ‖ŷ‖/‖y‖ are undefined for a zero target (a synthetic row with nothing active, a
        # padding token): such tokens are left out of those two means, not divided by eps.
        self.n_ratio_tokens += stats.n_defined
        y_norm, y_hat_norm, dot = stats.y_norm_f64, y_hat_norm.to(f64), dot.to(f64)
        cos, y_hat_norm = dot / (y_norm * y_hat_norm).clamp_min(self.eps), y_hat_norm
        if stats.defined is not None:  # some targets are zero: compact (a boolean index) the defined ones
            cos, y_hat_norm, y_norm = cos[stats.defined], y_hat_norm[stats.defined], y_norm[stats.defined]
        self.sum_cos += cos.sum()
        self.sum_l2_ratio += (y_hat_norm / y_norm).sum()

    def compute(self) -> dict[str, Tensor]:
        n = self.n_tokens.to(torch.float64)
        total_variance = self.sum_sq_target - self.sum_target.square().sum() / n
        fvu = self.sum_sq_error / total_variance
        return {
            "mse": self.sum_sq_error / n,
            "fvu": fvu,
            "explained_variance": 1.0 - fvu,
            "cos_sim": self.sum_cos / self.n_ratio_tokens,
            "l2_ratio": self.sum_l2_ratio / self.n_ratio_tokens,
            "rel_reconstruction_bias": self.sum_sq_recon / self.sum_dot,
        }


class TargetStatistics:
    """What `ReconstructionMetrics.update` computes from the target alone, once per batch.

    target: [..., d] -> y [tokens, d] (float32 at least), y_norm_f64 [tokens], sum_target [d] and
    sum_sq_target (float64), n_defined (targets with ‖y_t‖ > eps) and `defined` [tokens] bool, None
    when every target is defined (then no compaction is needed: a boolean index of an all-true mask
    is the tensor itself, so the sums are the same).
    """

    def __init__(self, target: Tensor, eps: float = 1e-8) -> None:
        self.target, self.eps = target, eps
        f64 = torch.float64
        self.y = target.detach().reshape(-1, target.shape[-1]).to(torch.promote_types(target.dtype, torch.float32))
        y_norm = torch.linalg.vector_norm(self.y, dim=-1)
        self.sum_target = self.y.sum(0).to(f64)
        self.y_norm_f64 = y_norm.to(f64)
        self.sum_sq_target = self.y_norm_f64.square().sum()
        defined = y_norm > eps
        self.n_defined = defined.sum()
        # one host read per batch (the boolean index it saves needed one per metric)
        self.defined = None if int(self.n_defined) == len(defined) else defined
