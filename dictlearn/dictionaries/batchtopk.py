"""BatchTopK SAE (Bussmann, Leask, Nanda 2024, arXiv:2412.06410 §2): TopK over the whole batch in training,
one global threshold at inference.

Training (`select(training=True)`): a = ReLU(π) for the B tokens of a batch; the B·k largest of its B·d_sae
values are kept and the rest zeroed, so the batch's mean L0 is exactly k while each token uses as
many latents as it needs. Everything else is TopK's (AuxK, normalised MSE, unit-norm decoder, lr).

Inference (`select(training=False)`: encode, validation, evaluation, export) never selects over a batch, whose
composition would change a token's latents: f = a ⊙ 1[a > θ], a JumpReLU whose threshold θ is
shared by every latent. θ is the smallest positive activation that batch selection kept, averaged
over training batches, in float64 (SAELens computes it in double after autocast trouble).

Which average. The paper (§2, recall) averages the per-batch minima; the reference repository
(bartbussmann/BatchTopK, sae.py) has no threshold code at all; dictionary_learning
(trainers/batch_top_k.py `update_threshold`) keeps an EMA, β = 0.999, first set to the batch
minimum at step 1000 and updated from then on; SAELens (saes/batchtopk_sae.py) an EMA with rate
0.01 (β = 0.99) starting from 0. dictlearn keeps an EMA — it forgets the minima of the early,
still-changing encoder that a plain mean would keep for the whole run — started as
dictionary_learning's: before `threshold_start_step` θ is the latest batch's minimum
(dictionary_learning leaves θ unset, a dense ReLU at inference, until step 1000), and the EMA starts
from that value, so θ is defined from the first step on. β defaults to SAELens' 0.99: with 0.999 θ
remembers ~1000 steps, too many for the 2,000-step base recipe — on the recovery data the
inference L0 then fell 8-18 % short of k (θ lagging a falling minimum), with 0.99 within 5 %.
(`--model.threshold_beta 0.999` is dictionary_learning's setting.)

The update runs inside the training step (in `sparsity_losses`, without gradient), so the θ a
checkpoint holds is the one after that step and a resumed run continues bit-identically. (Lightning
runs callbacks' `on_train_batch_end` — ModelCheckpoint's included — before the module's, so an
update there would miss the checkpoint.)

DDP: each rank selects the B_local·k largest values of its own batch (no cross-rank top-k; per rank
the mean L0 is k); the per-batch minimum fed to θ is the mean over ranks of the local minima, so θ
stays the same on every rank.

Precision: θ is a float64 buffer and its update runs in float64 under `32-true` and the `*-mixed`
precisions; a `*-true` half precision casts every floating buffer, θ too, so avoid it here.

Export: SAELens ships a trained BatchTopK as a `jumprelu` whose `threshold [d_sae]` holds θ in
every entry (`process_state_dict_for_saving_inference`); here θ × latent_scale, the folded units.
θ is stored per latent (all entries equal while training) so such an export loads back exactly.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from dictlearn.dictionaries.latents import Selection
from dictlearn.dictionaries.model import TrainingStep
from dictlearn.dictionaries.registry import Mechanism
from dictlearn.dictionaries.sparse import flat_topk_indices
from dictlearn.dictionaries.topk import TopKSAE
from dictlearn.errors import ConfigError


class BatchTopKSAE(TopKSAE):
    """Keeps the B·k largest activations of a batch in training, a > θ at inference (paper §2)."""

    sae_lens_architecture = "jumprelu"
    # in compare's short run θ's EMA starts after a fifth of it (1000 steps can be all of it)
    mechanism = Mechanism("batchtopk", short_run_steps={"threshold_start_step": 0.2})

    def __init__(
        self,
        k: int = 32,
        threshold_beta: float = 0.99,
        threshold_start_step: int = 1000,
        **kwargs,
    ):
        """
        Args:
            k: mean active latents per token over a training batch (32: BatchTopK repo config).
            threshold_beta: EMA factor of θ (0.99, SAELens `topk_threshold_lr` = 0.01;
                dictionary_learning uses 0.999).
            threshold_start_step: θ tracks the latest batch minimum before this step, an EMA
                after it (1000, dictionary_learning `threshold_start_step`).
            **kwargs: TopKSAE's (auxk_alpha 1/32, k_aux d_in/2; its training too: lr
                2e-4/sqrt(d_sae/2^14), Adam ε 6.25e-10 — dictionary_learning's BatchTopK trainer
                uses the same AuxK and lr law; the BatchTopK repo uses lr 3e-4, betas (0.9, 0.99),
                k_aux 512) and the shared `Dictionary` arguments.
        """
        super().__init__(k=k, **kwargs)
        if not 0.0 <= threshold_beta < 1.0:
            raise ConfigError(f"--model.threshold_beta must be in [0, 1), got {threshold_beta}")
        if threshold_start_step < 0:
            raise ConfigError(f"--model.threshold_start_step must be >= 0, got {threshold_start_step}")
        self.threshold_beta = threshold_beta
        self.threshold_start_step = threshold_start_step
        # θ in training units (scaled data, unit decoder rows); 0 until the first training batch.
        self.register_buffer("threshold", torch.zeros(self.d_sae, dtype=torch.float64))

    def select(self, pre: Tensor, training: bool) -> Selection:
        """Training: the batch·k largest pre-activations of the batch (ReLU is monotone, so the
        same entries as the largest activations up to ties at 0, which decode to 0 either way).
        Inference: every entry above θ (a JumpReLU with one threshold, SAELens)."""
        if training:
            return Selection.of_flat(flat_topk_indices(pre, len(pre) * self.k), ordered=True)
        return Selection.of_mask(lambda: pre > self.threshold)

    def activate_entries(self, entries, training: bool) -> Tensor:
        return entries.pre.relu()

    def sparsity_losses(self, x, y, pre, z, y_hat, latents=None, step: TrainingStep = TrainingStep()) -> dict[str, Tensor]:
        """TopK's (AuxK), after θ is updated from the step's kept values z (their positive
        minimum: the zeros of a dense z are not kept values)."""
        self._update_threshold(z.detach(), step.step)
        return super().sparsity_losses(x, y, pre, z, y_hat, latents, step)

    @torch.no_grad()
    def _update_threshold(self, kept: Tensor, step: int) -> None:
        """θ ← the smallest positive kept value (warm-up) or its EMA; mean over DDP ranks."""
        positive = kept > 0
        minimum = kept.masked_fill(~positive, float("inf")).min().double()
        has_positive = positive.any().double()
        # [sum of minima, number of ranks that had one]
        stats = torch.stack([torch.where(has_positive > 0, minimum, 0.0), has_positive])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stats)
        batch_minimum = stats[0] / stats[1].clamp_min(1.0)
        if step < self.threshold_start_step:
            updated = batch_minimum.expand_as(self.threshold)
        else:
            updated = self.threshold_beta * self.threshold + (1.0 - self.threshold_beta) * batch_minimum
        # no positive value kept anywhere (a collapsed encoder): θ stays
        self.threshold.copy_(torch.where(stats[1] > 0, updated, self.threshold))

    def export_fields(self) -> dict:
        return {}  # a SAELens jumprelu cfg has no k

    def adapt_export_tensors(self, tensors: dict[str, Tensor], latent_scale: Tensor) -> dict[str, Tensor]:
        # The folded encoder computes pre × latent_scale, so the threshold scales with it
        # (docs/conventions.md#folding).
        return {**tensors, "threshold": self.threshold * latent_scale}
