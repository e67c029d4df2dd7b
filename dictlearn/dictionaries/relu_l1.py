"""ReLU SAE with an L1 penalty.

Default: Anthropic's April-2024 recipe (Conerly et al., "Update on how we train SAEs"): no pre-encoder bias, L1
weighted by each decoder row's norm, no norm constraint, decoder rows initialised at norm 0.1,
λ warm-up over the first 5 % and LR decay over the last 20 % of steps, gradient clipping at 1.

Option `decoder_constraint="unit_norm"`: Bricken et al. 2023 ("Towards Monosemanticity"): unit-norm decoder with
gradient projection, tied pre-encoder bias, plain L1, and (with `resample_every_steps`) dead
latents resampled towards badly reconstructed inputs with p ∝ loss², Adam moments reset.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dictlearn.dictionaries.latents import DenseLatents, Selection
from dictlearn.dictionaries.model import Dictionary, firing_quantile
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
        resample_every_steps: int = 0,
        resample_encoder_scale: float = 0.2,
        lr: float = 5e-5,
        sparsity_warmup_fraction: float = 0.05,
        lr_decay_fraction: float = 0.2,
        apply_b_dec_to_input: bool | None = None,
        b_dec_init: str | None = None,
        decoder_init_norm: float | None = None,
        **kwargs,
    ):
        """
        Args:
            l1_coefficient: λ, on data scaled to E‖x‖ = sqrt(d_in) (≈5 in the April-2024 update).
            decoder_constraint: "norm_weighted_l1" (April 2024) or "unit_norm" (Bricken 2023).
            resample_every_steps: with "unit_norm", resample dead latents every N steps (0: off).
            resample_encoder_scale: resampled encoder column norm, × mean alive encoder norm
                (0.2, Bricken et al. appendix).
            lr, sparsity_warmup_fraction, lr_decay_fraction: April-2024 defaults (Conerly et al.; SAELens' tutorial).
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
            lr=lr, sparsity_warmup_fraction=sparsity_warmup_fraction, lr_decay_fraction=lr_decay_fraction,
            apply_b_dec_to_input=unit_norm if apply_b_dec_to_input is None else apply_b_dec_to_input,
            b_dec_init=("geometric_median" if unit_norm else "zeros") if b_dec_init is None else b_dec_init,
            decoder_init_norm=(1.0 if unit_norm else 0.1) if decoder_init_norm is None else decoder_init_norm,
            **kwargs,
        )
        if l1_coefficient < 0:
            raise ConfigError(f"--model.l1_coefficient must be >= 0, got {l1_coefficient}")
        if resample_every_steps < 0 or (resample_every_steps and not unit_norm):
            raise ConfigError("--model.resample_every_steps needs --model.decoder_constraint unit_norm and must be >= 0")
        self.l1_coefficient = l1_coefficient
        self.unit_norm_decoder = unit_norm
        self.resample_every_steps = resample_every_steps
        self.resample_encoder_scale = resample_encoder_scale

    def select(self, pre: Tensor, training: bool) -> Selection:
        return Selection.of_mask(lambda: pre > 0, implied=True)

    def activate_entries(self, entries, training: bool) -> Tensor:
        return entries.pre.relu()

    @torch.no_grad()
    def start_at_l0(self, x: Tensor, l0: float) -> None:
        """Each latent fires on a fraction l0 / d_sae of the sample (b_enc shifted per latent)."""
        self.b_enc.sub_(firing_quantile(self.pre_acts(x), l0 / self.d_sae))

    def sparsity_losses(self, x, y, pre, z, y_hat, latents=None) -> dict[str, Tensor]:
        latents = latents if latents is not None else DenseLatents(pre)
        # (a·b).sum(), not a @ b: autocast would run the dot in bf16
        l1 = latents.total(z) if self.unit_norm_decoder else (latents.column_sums(z) * self.W_dec.norm(dim=-1)).sum()
        return {"l1": self.l1_coefficient * self.sparsity_coefficient_scale * l1 / latents.n_rows}

    def before_step(self, x_raw: Tensor, y_raw: Tensor, optimizer_state: dict, broadcast) -> None:
        # At the start of a step, not the end: a checkpoint saved at the end of the previous step
        # then resumes into the same resampling, on the same batch (exact resume).
        every = self.resample_every_steps
        if every and self.step > 0 and self.step % every == 0 and self.dead_mask.any():
            self.resample_dead_latents(x_raw, y_raw, optimizer_state, broadcast)

    @torch.no_grad()
    def resample_dead_latents(self, x_raw: Tensor, y_raw: Tensor, optimizer_state: dict | None = None,
                              broadcast=None) -> int:
        """Point dead latents at inputs the dictionary reconstructs worst (Bricken et al. 2023). -> count.

        `optimizer_state`: Adam's state by parameter, whose moments of the touched latents are
        zeroed; `broadcast(t)`: rank 0's copy of `t` under DDP (every rank must write the same rows)."""
        dead = self.dead_mask.nonzero().flatten()
        x, y = x_raw * self.input_scale, y_raw * self.target_scale
        loss = (y - self.decode_scaled(self.activate(self.pre_acts(x)), x)).pow(2).sum(-1)
        generator = torch.Generator(device=x.device).manual_seed(self.step)
        picks = torch.multinomial(loss.pow(2) + 1e-12, len(dead), replacement=True, generator=generator)
        picks = broadcast(picks) if broadcast is not None else picks
        x_pick, y_pick = x[picks], y[picks]
        alive = ~self.dead_mask
        enc_norm = self.W_enc[:, alive].norm(dim=0).mean() if alive.any() else torch.tensor(1.0)
        self.W_dec.data[dead] = y_pick / y_pick.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        x_unit = x_pick / x_pick.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        self.W_enc.data[:, dead] = (x_unit * self.resample_encoder_scale * enc_norm).T
        self.b_enc.data[dead] = 0.0
        self._reset_adam_rows(dead, optimizer_state or {})
        self.tokens_since_fired[dead] = 0
        return len(dead)

    def _reset_adam_rows(self, latents: Tensor, state: dict) -> None:
        """Zero Adam's moments for the touched latents, or they re-kill them (Bricken et al. 2023)."""
        for param, index in ((self.W_dec, (latents,)), (self.W_enc, (slice(None), latents)), (self.b_enc, (latents,))):
            for key in ("exp_avg", "exp_avg_sq"):
                if param in state and key in state[param]:
                    state[param][key][index] = 0.0
