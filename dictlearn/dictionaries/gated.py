"""Gated SAE (Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated SAEs",
arXiv:2404.16014 §3).

Two paths share one encoder matrix W_gate (= the base's `W_enc`):

    x̄      = x − b_dec
    π_gate = x̄ W_gate + b_gate                      decides *whether* latent i fires
    π_mag  = x̄ W_mag + b_mag,  W_mag[:, i] = exp(r_mag[i]) W_gate[:, i]     *how much*
    z      = 1[π_gate > 0] · ReLU(π_mag),   ŷ = z W_dec + b_dec

    L = ‖y − ŷ‖² + λ ‖ReLU(π_gate)‖₁ + ‖y − (ReLU(π_gate) sg(W_dec) + sg(b_dec))‖²

The L1 penalty touches only the gate path, so active latents are not shrunk (γ ≈ 1, paper §5;
docs/metrics.md#rel_reconstruction_bias);
the Heaviside passes no gradient, so the auxiliary term (a reconstruction from ReLU(π_gate)
through a stop-gradient copy of the decoder, weight 1) is what trains the gate path.

Which variant each default follows:
- b_gate *is* the base's `b_enc` parameter (checkpoints hold `b_enc`; the export renames it
  `b_gate`, the SAELens name, and has no `b_enc`).
- Loss and decoder: dictionary_learning `trainers/gdm.py` — unit-norm decoder rows (gradient
  projection + renormalisation, base class), plain L1 on ReLU(π_gate), aux through
  `W_dec.detach()` / `b_dec.detach()`. As in the paper's and gdm.py's loss, b_dec still receives
  the aux term's gradient through the encoder input x − b_dec (it is also the pre-encoder bias);
  through the decoder it receives none. `decoder_constraint="norm_weighted_l1"` is SAELens'
  variant (free decoder norms, L1 weighted by ‖d_i‖) but keeps the frozen-decoder aux term
  (SAELens' aux uses the live decoder, which the paper does not).
- Init: r_mag = b_gate = b_mag = 0, unit random decoder rows (gdm.py / GatedAutoEncoder); b_dec
  the geometric median and W_gate = W_decᵀ (dictlearn's shared tied init; dictionary_learning
  leaves nn.Linear's default encoder init; its GatedAutoEncoder reset uses W_decᵀ).
- Transcoders: the base centres π_gate at init (b_gate = −mean(x) W_gate, sparsify); b_mag gets
  the same value, so π_mag starts centred too.
- Optimiser: Adam β = (0, 0.999), lr 5e-5 (gdm.py). gdm.py warms the LR over 1,000 steps and λ
  over 2,000; dictlearn's schedules are fractions of the run, and 0.04 / 0.08 are those step
  counts on dictionary_learning's demo run (50M tokens / batch 2,048 ≈ 24.4k steps).
- λ = 1.0: no reference value transfers (gdm.py's 0.1 is on other activation units). On
  dictlearn's E‖x‖ = sqrt(d_in) scale the synthetic benchmark (d_in 64, 4 of 256 features active)
  goes from L0 27 at λ 1.25 to L0 6 at λ 2 (d_sae 256); tune it per site.
- Export: SAELens `gated` tensors W_enc, b_gate, r_mag, b_mag, W_dec, b_dec, folded so decoder rows
  are unit and inputs raw. Folding a positive per-latent factor s multiplies W_gate, b_gate and
  b_mag by s and leaves r_mag alone. (SAELens' `fold_W_dec_norm` multiplies r_mag by s too; on an
  export, whose rows are already unit, s = 1 and that is a no-op.)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dictlearn.dictionaries.latents import DenseLatents, Selection
from dictlearn.dictionaries.model import Dictionary, TrainingStep, firing_quantile
from dictlearn.dictionaries.registry import Mechanism
from dictlearn.errors import ConfigError

_CONSTRAINTS = ("unit_norm", "norm_weighted_l1")


class GatedSAE(Dictionary):
    """z = 1[π_gate > 0] · ReLU(π_mag) with W_mag = exp(r_mag) ⊙ W_gate (paper §3.1)."""

    sae_lens_architecture = "gated"
    # calibrated from the start it is initialised at: it lands on its target without a moved one
    mechanism = Mechanism("gated", coefficient="l1_coefficient", short_run={"l1_coefficient": 1.0})
    sparse_beats_tensor_cores = True  # measured on an H100 under bf16 (model.py)

    def __init__(
        self,
        l1_coefficient: float = 1.0,
        decoder_constraint: str = "unit_norm",
        **kwargs,
    ):
        """
        Args:
            l1_coefficient: λ on ‖ReLU(π_gate)‖₁, data scaled to E‖x‖ = sqrt(d_in).
            decoder_constraint: "unit_norm" (dictionary_learning) or "norm_weighted_l1" (SAELens).
            **kwargs: the shared `Dictionary` arguments.
        """
        if decoder_constraint not in _CONSTRAINTS:
            raise ConfigError(f"--model.decoder_constraint must be one of {_CONSTRAINTS}, got {decoder_constraint!r}")
        super().__init__(**kwargs)
        if l1_coefficient < 0:
            raise ConfigError(f"--model.l1_coefficient must be >= 0, got {l1_coefficient}")
        self.l1_coefficient = l1_coefficient
        self.unit_norm_decoder = decoder_constraint == "unit_norm"
        self.r_mag = nn.Parameter(torch.zeros(self.d_sae))
        self.b_mag = nn.Parameter(torch.zeros(self.d_sae))

    def recommended_training(self) -> dict:
        """lr 5e-5, Adam β (0, 0.999), LR and λ warm-ups over 4 % and 8 % of the run (the module docstring)."""
        return {"lr": 5e-5, "adam_betas": (0.0, 0.999), "lr_warmup_fraction": 0.04, "sparsity_warmup_fraction": 0.08}

    @property
    def b_gate(self) -> Tensor:
        """[d_sae]: the gate bias, stored as the base's `b_enc`."""
        return self.b_enc

    # ----------------------------------------------------------------- forward
    def pre_acts(self, x: Tensor) -> Tensor:
        """x: [batch, d_in] (scaled) -> the shared projection x̄ W_gate [batch, d_sae], no bias:
        each path adds its own, so neither bias is subtracted back out (exact gradients)."""
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc

    def gate_pre_acts(self, pre: Tensor) -> Tensor:
        """π_gate = x̄ W_gate + b_gate: [batch, d_sae]."""
        return pre + self.b_gate

    def magnitude_pre_acts(self, pre: Tensor) -> Tensor:
        """π_mag = x̄ (exp(r_mag) ⊙ W_gate) + b_mag: [batch, d_sae]."""
        return pre * self.r_mag.exp() + self.b_mag

    def select(self, pre: Tensor, training: bool) -> Selection:
        """Open gates, π_gate > 0: every non-zero latent and every entry with a gradient."""
        return Selection.of_mask(lambda: self.gate_pre_acts(pre) > 0)

    def activate_entries(self, entries, training: bool) -> Tensor:
        """z = ReLU(π_mag) where the gate is open; gradients reach z through π_mag only."""
        return (entries.pre * entries.at(self.r_mag.exp()) + entries.at(self.b_mag)).relu()

    # ----------------------------------------------------------------- losses
    def sparsity_losses(self, x, y, pre, z, y_hat, latents=None, step: TrainingStep = TrainingStep()) -> dict[str, Tensor]:
        latents = latents if latents is not None else DenseLatents(pre)
        gate = (latents.pre + latents.at(self.b_gate)).relu()
        # (a·b).sum(), not a @ b: autocast would run the dot in bf16
        l1 = latents.total(gate) if self.unit_norm_decoder else (latents.column_sums(gate) * self.W_dec.norm(dim=-1)).sum()
        # The aux reconstruction trains the gate path without pulling on the decoder (paper §3.2).
        y_gate = latents.decode(gate, self.W_dec.detach()) + self.b_dec.detach()
        if self.W_skip is not None:
            y_gate = y_gate + x @ self.W_skip.detach().T
        return {
            "l1": self.l1_coefficient * step.sparsity_scale * l1 / latents.n_rows,
            "aux_reconstruction": (y - y_gate).pow(2).sum(-1).mean(),
        }

    def encoder_affine(self):
        shift, W, _ = super().encoder_affine()
        return shift, W, None  # pre_acts has no bias here: each path adds its own

    def encoder_parameters(self) -> list[nn.Parameter]:
        return [*super().encoder_parameters(), self.b_mag]  # W_gate, b_gate; W_mag = exp(r_mag) W_gate follows

    @torch.no_grad()
    def initialise_from_sample(self, x: Tensor, y: Tensor) -> None:
        if self.transcoder:  # the base centres π_gate via b_gate; centre π_mag alike (r_mag = 0 here)
            self.b_mag.copy_(self.b_gate * self.r_mag.exp())

    @torch.no_grad()
    def start_at_l0(self, x: Tensor, l0: float) -> None:
        """Each gate opens on a fraction l0 / d_sae of the sample (b_gate shifted per latent);
        the magnitude path is left alone, so the latents that fire keep their values."""
        self.b_enc.sub_(firing_quantile(self.gate_pre_acts(self.pre_acts(x)), l0 / self.d_sae))

    # ----------------------------------------------------------------- export (SAELens `gated`)
    def adapt_export_tensors(self, tensors: dict[str, Tensor], latent_scale: Tensor) -> dict[str, Tensor]:
        """A positive per-latent factor s keeps the gate's sign and scales π_mag by s when b_mag
        does too; r_mag is unchanged (W_gate already carries s). b_enc (already × s) -> b_gate."""
        tensors = dict(tensors)
        tensors["b_gate"] = tensors.pop("b_enc")
        tensors["r_mag"] = self.r_mag.detach().clone()
        tensors["b_mag"] = self.b_mag.detach() * latent_scale
        return tensors

    @torch.no_grad()
    def load_folded(self, tensors: dict[str, Tensor]) -> None:
        tensors = dict(tensors)
        if "b_gate" in tensors:
            tensors["b_enc"] = tensors.pop("b_gate")
        super().load_folded(tensors)
