"""Matryoshka BatchTopK SAE (Bussmann, Nabeshima, Karvonen, Nanda 2025, "Learning Multi-Level
Features with Matryoshka Sparse Autoencoders", arXiv:2503.17547).

One BatchTopK selection over the whole dictionary (the B·k largest activations of the batch,
batchtopk.py), and nested prefixes of the latents, widths m_1 < … < m_M = d_sae: prefix m must
reconstruct the target on its own, from its first m latents and nothing else,

    ŷ_m = Σ_{i < m} z_i d_i + b_dec (+ x W_skipᵀ),    L = w Σ_m FVU(y, ŷ_m) + α · AuxK,

so the first latents are pushed to carry the broad features (a prefix without the later latents
cannot lean on a specific child to stand in for its parent: no absorption) and the later ones
the specific features. The z are the shared latents of the one selection, not a selection per
prefix. FVU is TopK's normalised MSE Σ‖y − ŷ_m‖² / Σ‖y − ȳ‖², the same denominator for every
prefix; the full-width term is the base's "reconstruction", the others are logged as
"prefix_<m>". Inference, the threshold θ, AuxK and the export (a SAELens `jumprelu` with θ per
latent) are BatchTopK's.

Where the published implementations differ, and what dictlearn does:

- *Prefix sizes.* Bussmann et al. (paper; bartbussmann/matryoshka_sae `main.py`: groups d/16,
  d/16, d/8, d/4, d/2) nest at d/16, d/8, d/4, d/2, d, fixed for the run, as SAELens
  (`matryoshka_widths`) and dictionary_learning (`group_fractions`). Nabeshima
  (noanabeshima/matryoshka-saes `sae.py`) draws new prefix boundaries every step from a
  Pareto-like distribution and permutes latents by usage. dictlearn: fixed, d/16 … d by
  default (`prefix_fractions`); fixed prefixes keep "latent i belongs to prefix m" true after
  training, which the splitting analysis and the sparse path rely on.
- *Summed or averaged.* The paper writes the loss as a sum over the prefixes (recall); SAELens
  sums (its base MSE plus one `inner_mse_loss_<m>` per inner prefix); Bussmann's repository
  averages the per-element MSE over the prefixes plus a b_dec-only term (M + 1 terms);
  dictionary_learning weights each prefix by 1/M and then averages the weighted terms again
  (Σ_m L_m / M²); Nabeshima averages. dictlearn: the mean (`prefix_loss: mean`, w = 1/M), so the
  loss keeps BatchTopK's scale and its lr law and AuxK weight carry over; `prefix_loss: sum` is
  SAELens'.
- *AuxK.* Bussmann's repository: the full reconstruction's residual, all dead latents,
  unnormalised, 1/32; dictionary_learning: the same, normalised by the residual's variance
  (OpenAI's); SAELens: the full residual by default, or one AuxK per prefix block
  (`use_matryoshka_aux_loss`). dictlearn: TopK's (OpenAI's normalised AuxK on the full
  residual, α 1/32, k_aux d_in/2), unchanged.

The prefix decodes run as disjoint blocks summed in order (`latents.decode_prefixes`), so the
inner prefixes cost half a decode more than BatchTopK (they cover the first d/2 latents), on the
dense and on the sparse path alike.
"""

from __future__ import annotations

from torch import Tensor

from dictlearn.dictionaries.batchtopk import BatchTopKSAE
from dictlearn.dictionaries.inputs import as_rows
from dictlearn.dictionaries.latents import DenseLatents
from dictlearn.dictionaries.model import TrainingStep
from dictlearn.dictionaries.registry import Mechanism
from dictlearn.dictionaries.topk import _normalised_mse
from dictlearn.errors import ConfigError

#: d/16, d/8, d/4, d/2, d (Bussmann et al. 2025; their repository's group sizes, cumulated)
DEFAULT_PREFIX_FRACTIONS = (1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0)


class MatryoshkaBatchTopKSAE(BatchTopKSAE):
    """BatchTopK whose nested prefixes of latents each reconstruct the target (Bussmann et al. 2025 §3)."""

    mechanism = Mechanism("matryoshka", short_run_steps={"threshold_start_step": 0.2})  # as BatchTopK

    def __init__(
        self,
        k: int = 32,
        prefix_fractions: tuple[float, ...] | list[float] = DEFAULT_PREFIX_FRACTIONS,
        prefix_loss: str = "mean",
        **kwargs,
    ):
        """
        Args:
            k: mean active latents per token over a training batch, as BatchTopK.
            prefix_fractions: the nested prefix widths as fractions of d_sae, increasing, the
                last 1.0 (d/16, d/8, d/4, d/2, d: Bussmann et al. 2025). Width = round(f·d_sae).
            prefix_loss: "mean" (w = 1/M per prefix; Bussmann's repository, dictionary_learning)
                or "sum" (w = 1; SAELens).
            **kwargs: BatchTopKSAE's (threshold_beta, threshold_start_step), TopKSAE's (auxk_alpha,
                k_aux) and the shared `Dictionary` arguments.
        """
        super().__init__(k=k, **kwargs)
        self.prefix_widths = prefix_widths(prefix_fractions, self.d_sae)
        if prefix_loss not in ("mean", "sum"):
            raise ConfigError(f"--model.prefix_loss must be mean or sum, got {prefix_loss!r}")
        self.prefix_loss = prefix_loss
        self.prefix_weight = 1.0 / len(self.prefix_widths) if prefix_loss == "mean" else 1.0

    def reconstruction_loss(self, y: Tensor, y_hat: Tensor) -> Tensor:
        """The full-width prefix: w · FVU(y, ŷ)."""
        return self.prefix_weight * _normalised_mse(y, y_hat)

    def sparsity_losses(self, x, y, pre, z, y_hat, latents=None, step: TrainingStep = TrainingStep()) -> dict[str, Tensor]:
        """AuxK (TopK's) and w · FVU(y, ŷ_m) for every inner prefix m, ŷ_m from the shared
        latents below m only (so its gradient reaches decoder rows < m and nothing after)."""
        losses = super().sparsity_losses(x, y, pre, z, y_hat, latents, step)
        inner = self.prefix_widths[:-1]
        if not inner:
            return losses
        latents = latents if latents is not None else DenseLatents(pre)
        base = self.b_dec if self.W_skip is None else self.b_dec + x @ self.W_skip.T
        variance = (y - y.mean(0)).pow(2).sum().clamp_min(1e-12)  # TopK's normalisation, once
        for width, partial in zip(inner, latents.decode_prefixes(z, self.W_dec, inner)):
            losses[f"prefix_{width}"] = self.prefix_weight * (y - base - partial).pow(2).sum() / variance
        return losses

    def prefix_reconstructions(self, x: Tensor) -> Tensor:
        """Raw x: [..., d_in] -> raw ŷ_m of every prefix at inference: [M, ..., d_out] in x's
        dtype (the last is `forward(x)`), for inspecting how much each prefix explains."""
        rows = as_rows(x, self.d_in, "x", self._where("prefix_reconstructions"), self.W_enc)
        x_scaled = rows.rows * self.input_scale
        z = self.activate(self.pre_acts(x_scaled))
        partial = DenseLatents(z).decode_prefixes(z, self.W_dec, self.prefix_widths)
        base = self.b_dec if self.W_skip is None else self.b_dec + x_scaled @ self.W_skip.T
        return rows.restore((partial + base) / self.target_scale)


def prefix_widths(fractions, d_sae: int) -> tuple[int, ...]:
    """Prefix fractions of d_sae -> strictly increasing widths ending at d_sae; one-line
    ConfigError naming --model.prefix_fractions otherwise."""
    fractions = tuple(float(f) for f in fractions)
    flag = "--model.prefix_fractions"
    if not fractions or fractions[-1] != 1.0:
        raise ConfigError(f"{flag} {list(fractions)}: the last prefix must be the whole dictionary (1.0)")
    widths = tuple(round(f * d_sae) for f in fractions)
    if widths[0] < 1 or any(b <= a for a, b in zip(widths, widths[1:])):
        raise ConfigError(f"{flag} {list(fractions)}: gives widths {list(widths)} of d_sae={d_sae}; they must "
                          "increase strictly from at least 1 (fewer or larger fractions, or a larger d_sae)")
    return widths
