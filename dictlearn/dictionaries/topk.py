"""TopK SAE (Gao et al. 2024, "Scaling and evaluating sparse autoencoders"), with AuxK.

z = ReLU(TopK_k(π)), π = (x − b_dec) W_enc + b_enc; unit-norm decoder rows. Dead latents are
revived by AuxK: the k_aux largest pre-activations among dead latents reconstruct the residual.
"""

from __future__ import annotations

import math

from torch import Tensor

from dictlearn.dictionaries.latents import DenseLatents, Selection
from dictlearn.dictionaries.model import Dictionary, TrainingStep
from dictlearn.dictionaries.registry import Mechanism
from dictlearn.dictionaries.sparse import topk_indices
from dictlearn.errors import ConfigError


class TopKSAE(Dictionary):
    """Keeps the k largest pre-activations per token (Gao et al. 2024 §2)."""

    sae_lens_architecture = "topk"
    mechanism = Mechanism("topk")

    def __init__(
        self,
        k: int = 32,
        auxk_alpha: float = 1 / 32,
        k_aux: int | None = None,
        d_sae: int = 4096,
        **kwargs,
    ):
        """
        Args:
            k: active latents per token.
            auxk_alpha: weight of the AuxK loss; 1/32 (Gao et al. App. A.2; OpenAI, dictionary_learning).
            k_aux: dead latents used by AuxK; None means d_in // 2 (Gao et al. App. B.1).
            d_sae: number of latents.
            **kwargs: the shared `Dictionary` arguments.
        """
        super().__init__(d_sae=d_sae, **kwargs)
        if not 0 < k <= d_sae:
            raise ConfigError(f"--model.k must be in [1, d_sae={d_sae}], got {k}")
        if auxk_alpha < 0:
            raise ConfigError(f"--model.auxk_alpha must be >= 0, got {auxk_alpha}")
        if k_aux is not None and not 0 < k_aux <= d_sae:
            raise ConfigError(f"--model.k_aux must be in [1, d_sae={d_sae}], got {k_aux}")
        self.k = k
        self.auxk_alpha = auxk_alpha
        self.k_aux = k_aux if k_aux is not None else max(1, self.d_in // 2)

    def recommended_training(self) -> dict:
        """lr 2e-4 / sqrt(d_sae / 2^14) (Gao et al. Fig. 3, as in sparsify); Adam ε 6.25e-10 as
        OpenAI's reference trainer."""
        return {"lr": 2e-4 / math.sqrt(self.d_sae / 2**14), "adam_eps": 6.25e-10}

    def select(self, pre: Tensor, training: bool) -> Selection:
        """The k largest pre-activations of each token."""
        return Selection.of_rows(topk_indices(pre, self.k))

    def activate_entries(self, entries, training: bool) -> Tensor:
        return entries.pre.relu()

    def sparse_l0(self) -> float:
        return self.k

    def export_fields(self) -> dict:
        return {"k": self.k, "rescale_acts_by_decoder_norm": False}

    def reconstruction_loss(self, y: Tensor, y_hat: Tensor) -> Tensor:
        """Batch FVU: Σ‖y − ŷ‖² / Σ‖y − ȳ‖² (normalised MSE, Gao et al. §2.1; sparsify)."""
        return _normalised_mse(y, y_hat)

    def sparsity_losses(self, x, y, pre, z, y_hat, latents=None, step: TrainingStep = TrainingStep()) -> dict[str, Tensor]:
        """AuxK: the residual (no gradient) is reconstructed from the k_aux largest pre-activations
        among dead latents, decoded without the bias, normalised by the residual's variance
        (Gao et al. App. A.2; OpenAI `kernels.normalized_mse`)."""
        if self.auxk_alpha == 0 or step.dead is None:
            return {}
        dead = step.dead.nonzero().squeeze(1)
        if len(dead) == 0:
            return {}
        latents = latents if latents is not None else DenseLatents(pre)
        residual = (y - y_hat).detach()
        aux = latents.at_rows(dead[topk_indices(latents.full_pre.index_select(1, dead), min(self.k_aux, len(dead)))])
        return {"auxk": self.auxk_alpha * _normalised_mse(residual, aux.decode(aux.pre.relu(), self.W_dec))}


def _normalised_mse(target: Tensor, prediction: Tensor) -> Tensor:
    """Σ‖target − prediction‖² / Σ‖target − mean(target)‖² over the batch."""
    variance = (target - target.mean(0)).pow(2).sum().clamp_min(1e-12)
    return (target - prediction).pow(2).sum() / variance
