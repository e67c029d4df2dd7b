"""Downstream (spliced) metrics: how much of the language model's next-token loss a dictionary keeps.

The model runs four ways on the same token windows: clean; spliced (the activation at the
dictionary's site replaced by its reconstruction); zero-ablated; mean-ablated. `DownstreamMetrics`
turns their logits into losses. It holds float64 sums over the evaluated next-token predictions,
so DDP sync is exact and batches of any size accumulate. The four passes themselves, and the
inputs they share, live in `dictlearn.downstream`.

    metric = DownstreamMetrics()
    metric.update(logits_clean, logits_spliced, logits_zero, logits_mean, targets, mask)
    metric.compute()["ce_loss_recovered"]
"""

from __future__ import annotations

import torch
from torch import Tensor

from dictlearn.metrics.reconstruction import SumStateMetric

DOWNSTREAM_KEYS = (
    "ce_clean", "ce_spliced", "ce_zero_ablation", "ce_mean_ablation",
    "ce_loss_recovered", "ce_loss_recovered_mean", "kl_div", "delta_ce",
)  # fmt: skip
_RUNS = ("clean", "spliced", "zero", "mean")
# Elements per float64 log-softmax chunk (128 MiB): a GPT-2 vocabulary (50k) times thousands of
# tokens would not fit at once.
_CHUNK_ELEMENTS = 1 << 24


class DownstreamMetrics(SumStateMetric):
    """ce_clean, ce_spliced, ce_zero_ablation, ce_mean_ablation, ce_loss_recovered(_mean), kl_div, delta_ce.

    Over the N next-token predictions t kept by the masks (P_run = softmax of that run's logits):
    - `ce_<run>` = (1/N) Σ_t −log P_run(target_t);
    - `ce_loss_recovered` = (ce_zero_ablation − ce_spliced) / (ce_zero_ablation − ce_clean)
      (SAELens `ce_loss_score`, dictionary_learning `frac_recovered`);
    - `ce_loss_recovered_mean`: the same with ce_mean_ablation, more telling at residual-stream
      sites where zero ablation is catastrophic and every dictionary scores ≈ 1 (docs/evaluate.md);
    - `kl_div` = (1/N) Σ_t KL(P_clean,t ‖ P_spliced,t) in nats;
    - `delta_ce` = ce_spliced − ce_clean (Gao et al. "downstream loss").
    Per-token values are computed in float64 and summed.
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        state = dict(dist_reduce_fx="sum", persistent=True)
        self.add_state("n_tokens", torch.zeros((), dtype=torch.int64), **state)
        for run in _RUNS:
            self.add_state(f"sum_ce_{run}", torch.zeros((), dtype=torch.float64), **state)
        self.add_state("sum_kl", torch.zeros((), dtype=torch.float64), **state)

    def update(
        self,
        logits_clean: Tensor | None = None,
        logits_spliced: Tensor | None = None,
        logits_zero: Tensor | None = None,
        logits_mean: Tensor | None = None,
        targets: Tensor | None = None,
        mask: Tensor | None = None,
        *,
        losses: tuple[Tensor, ...] | None = None,
    ) -> None:
        """logits_*: [..., vocab] predictions for `targets` [...] (already aligned: position t's
        logits score targets[t]); mask [...] bool, True = count this prediction (None: all).
        Or `losses`: per-prediction float64 (ce_clean, ce_spliced, ce_zero, ce_mean, kl) [N] each
        (`token_cross_entropy`, `spliced_token_losses`), for callers that compute the
        dictionary-independent runs once (dictlearn.downstream)."""
        if losses is None:
            losses = self._losses(logits_clean, logits_spliced, logits_zero, logits_mean, targets, mask)
        *ces, kl = losses
        for run, values in zip(_RUNS, ces):
            name = f"sum_ce_{run}"
            setattr(self, name, getattr(self, name) + values.sum())
        self.sum_kl += kl.sum()
        self.n_tokens += len(kl)

    @staticmethod
    def _losses(logits_clean, logits_spliced, logits_zero, logits_mean, targets, mask) -> tuple[Tensor, ...]:
        logits = (logits_clean, logits_spliced, logits_zero, logits_mean)
        if any(value is None for value in logits) or targets is None:
            raise ValueError("DownstreamMetrics.update needs the four logits and targets, or losses")
        for value in logits:
            if value.shape != logits_clean.shape or value.shape[:-1] != targets.shape:
                raise ValueError(
                    f"DownstreamMetrics: logits {[tuple(v.shape) for v in logits]} do not match targets "
                    f"{tuple(targets.shape)} (+ a vocabulary dim)"
                )
        keep = torch.ones_like(targets, dtype=torch.bool) if mask is None else mask.bool()
        rows = [value.detach()[keep] for value in logits]  # [N, vocab] each
        target = targets[keep]
        ce_clean, ce_spliced, kl = spliced_token_losses(rows[0], rows[1], target)
        return ce_clean, ce_spliced, token_cross_entropy(rows[2], target), token_cross_entropy(rows[3], target), kl

    def compute(self) -> dict[str, Tensor]:
        n = self.n_tokens.to(torch.float64)
        clean, spliced, zero, mean = (getattr(self, f"sum_ce_{run}") / n for run in _RUNS)
        return {
            "ce_clean": clean,
            "ce_spliced": spliced,
            "ce_zero_ablation": zero,
            "ce_mean_ablation": mean,
            "ce_loss_recovered": (zero - spliced) / (zero - clean),
            "ce_loss_recovered_mean": (mean - spliced) / (mean - clean),
            "kl_div": self.sum_kl / n,
            "delta_ce": spliced - clean,
        }


def _chunks(n_rows: int, vocab: int) -> list[slice]:
    step = max(1, _CHUNK_ELEMENTS // max(1, vocab))
    return [slice(start, start + step) for start in range(0, n_rows, step)]


def _log_probs(logits: Tensor) -> Tensor:
    return logits.detach().to(torch.float64).log_softmax(-1)


def token_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """logits [N, vocab], target [N] -> float64 [N]: −log P(target) per prediction, in chunks."""
    parts = [-_log_probs(logits[c]).gather(-1, target[c].long().unsqueeze(-1)).squeeze(-1)
             for c in _chunks(len(target), logits.shape[-1])]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64, device=logits.device)


def spliced_token_losses(clean: Tensor, spliced: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """clean, spliced [N, vocab] logits, target [N] -> float64 [N] each: clean CE, spliced CE and
    KL(P_clean ‖ P_spliced), the clean log-softmax computed once per chunk."""
    ce_clean, ce_spliced, kl = [], [], []
    for c in _chunks(len(target), clean.shape[-1]):
        lp_clean, lp_spliced = _log_probs(clean[c]), _log_probs(spliced[c])
        index = target[c].long().unsqueeze(-1)
        ce_clean.append(-lp_clean.gather(-1, index).squeeze(-1))
        ce_spliced.append(-lp_spliced.gather(-1, index).squeeze(-1))
        p_clean = lp_clean.exp()
        # 0 · log 0 = 0: a token the clean model rules out (logit −inf) adds nothing, not NaN
        kl.append(torch.where(p_clean > 0, p_clean * (lp_clean - lp_spliced), 0.0).sum(-1))
    if not ce_clean:
        empty = torch.zeros(0, dtype=torch.float64, device=clean.device)
        return empty, empty, empty
    return torch.cat(ce_clean), torch.cat(ce_spliced), torch.cat(kl)
