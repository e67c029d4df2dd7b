"""ReLU SAE with an L1 penalty.

Default: Anthropic's April-2024 recipe (Conerly et al., "Update on how we train SAEs"): no pre-encoder bias, L1
weighted by each decoder row's norm, no norm constraint, decoder rows initialised at norm 0.1,
λ warm-up over the first 5 % and LR decay over the last 20 % of steps, gradient clipping at 1.

Option `decoder_constraint="unit_norm"`: Bricken et al. 2023 ("Towards Monosemanticity"): unit-norm decoder with
gradient projection, tied pre-encoder bias, plain L1; its resampling of dead latents (towards badly
reconstructed inputs, p ∝ loss², Adam moments reset) is a training setting,
`--training.resample_every_steps N` (dictlearn/training/resample.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from dictlearn.dictionaries.latents import DenseLatents, Selection
from dictlearn.dictionaries.model import Dictionary, TrainingStep, firing_quantile
from dictlearn.dictionaries.registry import Mechanism
from dictlearn.errors import ConfigError

_CONSTRAINTS = ("norm_weighted_l1", "unit_norm")


class ReLUL1SAE(Dictionary):
    """z = ReLU(π); loss = ‖y − ŷ‖² + λ Σ_i z_i ‖d_i‖ (or λ‖z‖₁ with unit-norm rows)."""

    sae_lens_architecture = "standard"
    # Compare's short run uses Bricken et al. 2023's unit-norm decoder, not the April-2024
    # norm-weighted L1: in a short run the latter lowers its penalty by shrinking every decoder row
    # (init norm 0.1, ~100 steps at lr 1e-3) long before the encoder biases can switch latents
    # off, so no λ brings L0 down (measured on synthetic data: L0 60 of 128 at λ up to 1e5, FVU 1.03).
    mechanism = Mechanism("relu_l1", coefficient="l1_coefficient", calibration_start=1.0,
                          short_run={"decoder_constraint": "unit_norm", "l1_coefficient": 0.1})

    def __init__(
        self,
        l1_coefficient: float = 5.0,
        decoder_constraint: str = "norm_weighted_l1",
        apply_b_dec_to_input: bool | None = None,
        b_dec_init: str | None = None,
        decoder_init_norm: float | None = None,
        **kwargs,
    ):
        """
        Args:
            l1_coefficient: λ, on data scaled to E‖x‖ = sqrt(d_in) (≈5 in the April-2024 update).
            decoder_constraint: "norm_weighted_l1" (April 2024) or "unit_norm" (Bricken 2023).
            apply_b_dec_to_input, b_dec_init, decoder_init_norm: None means the constraint's own:
                no pre-encoder bias, zero b_dec and rows of norm 0.1 (April 2024); a pre-encoder
                bias at the geometric median and unit rows (Bricken 2023). In the signature, not
                left to **kwargs, so that LightningCLI passes None rather than the base class's
                defaults.
            **kwargs: the shared `Dictionary` arguments.
        """
        if decoder_constraint not in _CONSTRAINTS:
            raise ConfigError(f"--model.decoder_constraint must be one of {_CONSTRAINTS}, got {decoder_constraint!r}")
        unit_norm = decoder_constraint == "unit_norm"
        # The April recipe has no pre-encoder bias and zero b_dec; Bricken's ties and centres it.
        super().__init__(
            apply_b_dec_to_input=unit_norm if apply_b_dec_to_input is None else apply_b_dec_to_input,
            b_dec_init=("geometric_median" if unit_norm else "zeros") if b_dec_init is None else b_dec_init,
            decoder_init_norm=(1.0 if unit_norm else 0.1) if decoder_init_norm is None else decoder_init_norm,
            **kwargs,
        )
        if l1_coefficient < 0:
            raise ConfigError(f"--model.l1_coefficient must be >= 0, got {l1_coefficient}")
        self.l1_coefficient = l1_coefficient
        self.unit_norm_decoder = unit_norm

    def recommended_training(self) -> dict:
        """April-2024 defaults (Conerly et al.; SAELens' tutorial): lr 5e-5, λ warm-up over the
        first 5 %, LR decay over the last 20 % of steps."""
        return {"lr": 5e-5, "sparsity_warmup_fraction": 0.05, "lr_decay_fraction": 0.2}

    def select(self, pre: Tensor, training: bool) -> Selection:
        return Selection.of_mask(lambda: pre > 0, implied=True)

    def activate_entries(self, entries, training: bool) -> Tensor:
        return entries.pre.relu()

    @torch.no_grad()
    def start_at_l0(self, x: Tensor, l0: float) -> None:
        """Each latent fires on a fraction l0 / d_sae of the sample (b_enc shifted per latent)."""
        self.b_enc.sub_(firing_quantile(self.pre_acts(x), l0 / self.d_sae))

    def sparsity_losses(self, x, y, pre, z, y_hat, latents=None, step: TrainingStep = TrainingStep()) -> dict[str, Tensor]:
        latents = latents if latents is not None else DenseLatents(pre)
        # (a·b).sum(), not a @ b: autocast would run the dot in bf16
        l1 = latents.total(z) if self.unit_norm_decoder else (latents.column_sums(z) * self.W_dec.norm(dim=-1)).sum()
        return {"l1": self.l1_coefficient * step.sparsity_scale * l1 / latents.n_rows}
