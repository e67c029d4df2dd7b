"""Downstream (spliced) metrics: how much of the language model's next-token loss a dictionary keeps.

The model runs four ways on the same token windows (SPEC §3.8): clean; spliced (the activation at
the dictionary's site replaced by its reconstruction); zero-ablated; mean-ablated. An SAE reads and
writes one site; a transcoder reads the MLP input and writes the MLP output.

`DownstreamMetrics` holds float64 sums over the evaluated next-token predictions, so DDP sync is
exact and batches of any size accumulate; `downstream_metrics` runs the four passes and feeds it.

    site = SpliceSite("transformer.h.2.mlp", read="transformer.h.2.mlp:input")   # a transcoder
    metrics = downstream_metrics(model, dictionary, site, batches, mean_activation)
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from dictlearn.errors import ConfigError, DataError
from dictlearn.metrics.reconstruction import SumStateMetric
from dictlearn.models.hooks import HookPoint, capture, splice

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
      (SAELens `ce_loss_score`, dictionary_learning `frac_recovered`) [SPEC §3.8];
    - `ce_loss_recovered_mean`: the same with ce_mean_ablation, more telling at residual-stream
      sites where zero ablation is catastrophic and every dictionary scores ≈ 1 [SPEC §3.8];
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
        logits_clean: Tensor,
        logits_spliced: Tensor,
        logits_zero: Tensor,
        logits_mean: Tensor,
        targets: Tensor,
        mask: Tensor | None = None,
    ) -> None:
        """logits_*: [..., vocab] predictions for `targets` [...] (already aligned: position t's
        logits score targets[t]); mask [...] bool, True = count this prediction (None: all)."""
        logits = (logits_clean, logits_spliced, logits_zero, logits_mean)
        for value in logits:
            if value.shape != logits_clean.shape or value.shape[:-1] != targets.shape:
                raise ValueError(
                    f"DownstreamMetrics: logits {[tuple(v.shape) for v in logits]} do not match targets "
                    f"{tuple(targets.shape)} (+ a vocabulary dim)"
                )
        keep = torch.ones_like(targets, dtype=torch.bool) if mask is None else mask.bool()
        rows = [value.detach()[keep] for value in logits]  # [N, vocab] each
        target = targets[keep]
        chunk = max(1, _CHUNK_ELEMENTS // max(1, logits_clean.shape[-1]))
        for start in range(0, len(target), chunk):
            self._add(*(r[start : start + chunk] for r in rows), target[start : start + chunk])
        self.n_tokens += len(target)

    def _add(self, clean: Tensor, spliced: Tensor, zero: Tensor, mean: Tensor, target: Tensor) -> None:
        """One chunk of kept predictions: logits [n, vocab] ×4, target [n]."""
        log_probs = [value.to(torch.float64).log_softmax(-1) for value in (clean, spliced, zero, mean)]
        index = target.long().unsqueeze(-1)
        for run, lp in zip(_RUNS, log_probs):
            name = f"sum_ce_{run}"
            setattr(self, name, getattr(self, name) - lp.gather(-1, index).sum())
        lp_clean, lp_spliced = log_probs[0], log_probs[1]
        p_clean = lp_clean.exp()
        # 0 · log 0 = 0: a token the clean model rules out (logit −inf) adds nothing, not NaN
        self.sum_kl += torch.where(p_clean > 0, p_clean * (lp_clean - lp_spliced), 0.0).sum()

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


@dataclass(frozen=True)
class SpliceSite:
    """Where a dictionary enters the model: it reads `read` (None: `write` itself, an SAE) and
    its output replaces the activation at `write` (an SAE's hook; a transcoder's MLP output)."""

    write: str
    read: str | None = None

    @classmethod
    def from_metadata(cls, hook_name: str | None, hook_name_out: str | None, transcoder: bool) -> SpliceSite:
        """The site recorded in an export (cfg.json metadata.hook_name / hook_name_out)."""
        if not hook_name:
            raise ConfigError("the export records no metadata.hook_name, so it cannot be spliced into a model")
        if not transcoder:
            return cls(hook_name)
        if not hook_name_out:
            raise ConfigError(
                f"transcoder reads {hook_name!r} but its export records no metadata.hook_name_out (the site it writes)"
            )
        return cls(hook_name_out, read=hook_name)


Replacement = Callable[[Tensor, Tensor], Tensor]


def run_replaced(model: nn.Module, tokens: Tensor, site: SpliceSite, new: Replacement, keep: Tensor) -> Tensor:
    """A causal LM's logits [batch, seq, vocab] with the activation at `site.write` replaced by
    ``new(source, clean)`` where `keep` [batch, seq] is False (a Hugging Face model: `.logits`).

    `source` is the activation at `site.read` (or `site.write`), `clean` the write site's own
    activation; both [batch, seq, d]. Positions where `keep` is True (BOS and document separators
    when special tokens are excluded) keep `clean`, as in harvest, which drops those rows.
    """
    write_key = str(HookPoint.parse(site.write))
    keep = keep.unsqueeze(-1)

    def replace(source: Tensor) -> Tensor:
        clean = originals[write_key]
        return torch.where(keep, clean, new(source, clean).to(clean.dtype))

    # capture's hook is registered first, so it records the write site's clean value before
    # splice's hook (same module, later registration: PyTorch runs forward hooks in order)
    # replaces it; a transcoder's replacement needs that value at the kept positions.
    with capture(model, [site.write]) as originals, splice(model, site.write, replace, read=site.read):
        return model(tokens, use_cache=False).logits


def dictionary_replacement(dictionary: Callable[[Tensor], Tensor]) -> Replacement:
    """`new(source, clean)` = dictionary(source) on rows [n, d_in], in the dictionary's dtype."""
    parameters = list(dictionary.parameters()) if isinstance(dictionary, nn.Module) else []
    dtype = parameters[0].dtype if parameters else torch.float32

    def new(source: Tensor, clean: Tensor) -> Tensor:
        flat = source.reshape(-1, source.shape[-1]).to(dtype)
        return dictionary(flat).reshape(*clean.shape[:-1], -1)

    return new


def zero_replacement(source: Tensor, clean: Tensor) -> Tensor:
    return torch.zeros_like(clean)


def mean_replacement(mean: Tensor) -> Replacement:
    """`new` that writes the per-dimension mean activation [d] at every replaced position."""

    def new(source: Tensor, clean: Tensor) -> Tensor:
        return mean.to(clean.device, clean.dtype).expand_as(clean)

    return new


def recorded_corpus(recorded: str | None) -> str | None:
    """The corpus argument for a `corpus` provenance attribute (`corpus_name`'s output)."""
    recorded = str(recorded or "")
    if not recorded or recorded.startswith("python-stdlib"):
        return None  # the standard library, of this interpreter
    if not Path(recorded).exists():
        raise ConfigError(f"corpus {recorded} (recorded in the data file) does not exist here; pass --corpus PATH")
    return recorded


def heldout_batches(
    tokenizer, corpus: str | None, context: int, count: int, exclude_special: bool, batch_size: int
) -> list[tuple[Tensor, Tensor]]:
    """The first `count` held-out windows of `corpus` as (tokens [B, context], special [B, context]).

    special: the BOS positions (first token, document separators: the rows harvest drops) when
    `exclude_special`, else all False.
    """
    from dictlearn.data.corpus import corpus_name, iter_documents, iter_windows

    windows = list(itertools.islice(iter_windows(iter_documents(corpus, "heldout"), tokenizer, context), count))
    if not windows:
        raise DataError(f"corpus {corpus_name(corpus)}: no whole held-out window of {context} tokens; "
                        "lower --context or pass a larger --corpus")
    if len(windows) < count:
        print(f"dictlearn: note: the held-out corpus holds {len(windows)} windows of {context} tokens, "
              f"fewer than the {count} asked for", file=sys.stderr)
    batches = []
    for i in range(0, len(windows), batch_size):
        group = windows[i : i + batch_size]
        special = torch.stack([w.doc_index for w in group]) < 0
        batches.append((torch.stack([w.tokens for w in group]), special & exclude_special))
    return batches


@torch.no_grad()
def update_from_batch(
    metric: DownstreamMetrics,
    model: nn.Module,
    dictionary: Callable[[Tensor], Tensor],
    site: SpliceSite,
    tokens: Tensor,
    special: Tensor,
    mean_activation: Tensor,
) -> None:
    """Run the four passes on tokens [batch, seq] and add their next-token losses to `metric`.

    special [batch, seq] bool: positions that keep their clean activation (BOS, separators). A
    prediction counts when its own position was replaced and its target is not special: the
    logits at a kept position are the same in every run (causal attention), and predicting a
    document separator is not the text's loss.
    """
    clean = model(tokens, use_cache=False).logits
    runs = [
        run_replaced(model, tokens, site, new, special)
        for new in (dictionary_replacement(dictionary), zero_replacement, mean_replacement(mean_activation))
    ]
    mask = ~special[:, :-1] & ~special[:, 1:]
    metric.update(clean[:, :-1], *(r[:, :-1] for r in runs), tokens[:, 1:], mask)


def downstream_metrics(
    model: nn.Module,
    dictionary: Callable[[Tensor], Tensor],
    site: SpliceSite,
    batches: Iterable[tuple[Tensor, Tensor]],
    mean_activation: Tensor,
) -> tuple[dict[str, float], int]:
    """Over `batches` of (tokens [batch, seq], special [batch, seq] bool) on the model's device.

    -> ({key: value} for `DOWNSTREAM_KEYS`, number of predictions evaluated).
    """
    metric = DownstreamMetrics()
    for tokens, special in batches:
        metric = metric.to(tokens.device)  # states beside the logits (a no-op after the first batch)
        update_from_batch(metric, model, dictionary, site, tokens, special, mean_activation)
    if int(metric.n_tokens) == 0:
        raise ConfigError("downstream metrics: no next-token predictions to evaluate (every position is special)")
    return {k: float(v) for k, v in metric.compute().items()}, int(metric.n_tokens)
