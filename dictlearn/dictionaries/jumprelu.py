"""JumpReLU SAE (Rajamanoharan et al. 2024b, "Jumping Ahead"; Gemma Scope, Lieberum et al. 2024).

z_i = π_i · H(π_i − θ_i), π = x W_enc + b_enc (no pre-encoder bias, as Gemma Scope), a learned
threshold θ_i > 0 per latent stored as `log_threshold` (θ = exp(log_threshold), SAELens), unit-norm
decoder rows. Loss: ‖y − ŷ‖² + λ Σ_i H(π_i − θ_i), averaged over tokens, λ warmed up linearly.

H has no useful derivative, so the backward pass uses the paper's straight-through estimator with
a rectangle kernel K(u) = 1[|u| < 1/2] of bandwidth ε (paper Eq. 11–12):
    ∂z/∂π = H(π − θ)                    (the jump is ignored with respect to π)
    ðz/ðθ = −(θ/ε) K((π − θ)/ε)
    ðH/ðθ = −(1/ε) K((π − θ)/ε)         (and no gradient from the L0 term to π)
Autograd then multiplies the θ gradient by θ for `log_threshold` (chain rule through exp).

Units. ε and θ_init are in the units of the pre-activations, so they only transfer within one
input normalisation. dictlearn trains on data scaled to E‖x‖ = sqrt(d_in); at initialisation
(unit decoder rows, W_enc = W_decᵀ, b_enc = 0) a pre-activation is then ≈ N(0, 1) whatever d_in
is. The paper and Gemma Scope use E‖x‖² = 1 (Gemma Scope §3.1, via dictionary_learning), where
ε = θ_init = 0.001; in dictlearn's units that is 0.001·sqrt(d_in), i.e. 0.048 at Gemma 2 2B's
d_in = 2304 — and SAELens' defaults on sqrt(d)-normalised data are ε = 0.05, θ_init = 0.01
(`JumpReLUTrainingSAEConfig`). Defaults here: ε = θ_init = 0.05, about 5 % of the initial pre-activation spread.

Which variant each default follows (checked against SAELens `saes/jumprelu_sae.py` and
dictionary_learning `trainers/jumprelu.py`):
- λ·L0 penalty with the rectangle-kernel STE (paper; SAELens "step" mode) — not dictionary_learning's
  target-L0 loss λ(L0/target − 1)², nor Anthropic's tanh penalty.
- Anthropic's pre-act loss (Circuits Updates, January 2025) is available and off by default
  (`pre_act_coefficient`): λ_P Σ_i ReLU(θ_i − π_i) ‖d_i‖ over the dead latents only, as SAELens
  applies it. The L0 term reaches θ only through the kernel window, so a latent whose
  pre-activations all lie below θ − ε/2 gets no gradient at all and stays dead; this term pulls
  its pre-activations up (and its θ down) until it fires again.
- θ stored in log space (SAELens); dictionary_learning stores θ directly.
- strict H(0) = 0: a latent fires when π > θ (both references).
- Adam β = (0, 0.999), ε_Adam = 1e-8, lr 7e-5, b_dec = 0 (paper App. I via dictionary_learning;
  Gemma Scope). The paper warms the LR up over 1,000 and λ over 10,000 steps (recall); dictlearn's
  schedules are run fractions, so the defaults keep that 1 : 10 ratio (1 % and 10 % of the run).
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor, nn

from dictlearn.dictionaries.latents import DenseLatents, Selection
from dictlearn.dictionaries.model import Dictionary, TrainingStep, firing_quantile
from dictlearn.dictionaries.registry import Mechanism
from dictlearn.errors import ConfigError, DataError


def _rectangle(u: Tensor) -> Tensor:
    """K(u) = 1 where |u| < 1/2, else 0 (the paper's rectangle kernel)."""
    return _indicator(torch.lt, u.abs(), 0.5, u.dtype)


def _indicator(compare, a: Tensor, b: Tensor | float, dtype: torch.dtype) -> Tensor:
    """compare(a, b) (torch.gt, torch.lt) as 0/1 in `dtype`. On CPU written straight into a float
    tensor: ~10× faster than casting a bool tensor with `.to` at [1024, 512] (the same values)."""
    if a.device.type != "cpu":
        return compare(a, b).to(dtype)
    shape = torch.broadcast_shapes(a.shape, b.shape if isinstance(b, Tensor) else ())
    return compare(a, b, out=torch.empty(shape, dtype=dtype, device=a.device))


class JumpReLUFunction(torch.autograd.Function):
    """pre [batch, d_sae], threshold [d_sae], bandwidth -> pre · H(pre − threshold).

    Backward: ∂/∂pre = H(pre − θ); ð/ðθ = −(θ/ε) K((pre − θ)/ε), summed over the batch. With a
    threshold of pre's shape (the sparse path: one θ per active entry) the sum is left to the
    caller's gather.
    """

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * _indicator(torch.gt, pre, threshold, pre.dtype)

    @staticmethod
    def backward(ctx, grad_z: Tensor):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_pre = grad_z * _indicator(torch.gt, pre, threshold, grad_z.dtype)
        kernel = _rectangle((pre - threshold) / eps)
        per_entry = threshold.shape == pre.shape
        grad_threshold = -(threshold / eps) * (kernel * grad_z if per_entry else (kernel * grad_z).sum(0))
        return grad_pre, grad_threshold, None


class StepFunction(torch.autograd.Function):
    """pre [batch, d_sae], threshold [d_sae], bandwidth -> H(pre − threshold) (float).

    Backward: no gradient to pre; ðH/ðθ = −(1/ε) K((pre − θ)/ε), summed over the batch (not for
    a per-entry threshold, as `JumpReLUFunction`).
    """

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return _indicator(torch.gt, pre, threshold, pre.dtype)

    @staticmethod
    def backward(ctx, grad_h: Tensor):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        weighted = _rectangle((pre - threshold) / eps) * grad_h
        grad_threshold = -(1.0 / eps) * (weighted if threshold.shape == pre.shape else weighted.sum(0))
        return None, grad_threshold, None


#: the lowest start θ (`JumpReLUSAE.start_at_l0`), as a fraction of the sample's pre-activation
#: standard deviation: a threshold far below their scale is none log θ can grow out of in a run
START_FLOOR = 0.1


class JumpReLUSAE(Dictionary):
    """z = π · H(π − θ) with a learned θ per latent; loss ‖y − ŷ‖² + λ‖z‖₀ (paper Eq. 9–10)."""

    sae_lens_architecture = "jumprelu"
    # Calibration starts L0 at 1.25× the target (the controller can only lower it; training/
    # calibration.py). A wider kernel in the short run (θ starts at ~1-2 there) gives θ a gradient
    # on most steps.
    mechanism = Mechanism("jumprelu", coefficient="l0_coefficient", calibration_start=1.25,
                          short_run={"l0_coefficient": 0.1, "bandwidth": 0.1})
    sparse_beats_tensor_cores = True  # measured on an H100 under bf16 (model.py)

    def __init__(
        self,
        l0_coefficient: float = 1.0,
        bandwidth: float = 0.05,
        threshold_init: float = 0.05,
        pre_act_coefficient: float = 0.0,
        apply_b_dec_to_input: bool = False,
        b_dec_init: str = "zeros",
        **kwargs,
    ):
        """
        Args:
            l0_coefficient: λ of the L0 penalty, on data scaled to E‖x‖ = sqrt(d_in) (the squared
                error is summed over dimensions, so λ is in the same units as one token's error;
                SAELens' default `l0_coefficient` is 1.0 in these units).
            bandwidth: ε of the rectangle kernel, in pre-activation units (see the module docstring).
            threshold_init: initial θ of every latent, same units.
            pre_act_coefficient: λ_P of the pre-act loss on dead latents (0: off, the paper;
                SAELens recommends 3e-6 with its tanh penalty). Not warmed up.
            apply_b_dec_to_input, b_dec_init: no pre-encoder bias and a zero b_dec (Gemma Scope);
                in the signature so that LightningCLI does not pass the base class's defaults.
            **kwargs: the shared `Dictionary` arguments.
        """
        super().__init__(apply_b_dec_to_input=apply_b_dec_to_input, b_dec_init=b_dec_init, **kwargs)
        if not l0_coefficient >= 0:
            raise ConfigError(f"--model.l0_coefficient must be >= 0, got {l0_coefficient}")
        if not (bandwidth > 0 and math.isfinite(bandwidth)):
            raise ConfigError(f"--model.bandwidth must be a finite number > 0, got {bandwidth}")
        if not (threshold_init > 0 and math.isfinite(threshold_init)):
            raise ConfigError(f"--model.threshold_init must be a finite number > 0, got {threshold_init}")
        if not (pre_act_coefficient >= 0 and math.isfinite(pre_act_coefficient)):
            raise ConfigError(f"--model.pre_act_coefficient must be a finite number >= 0, got {pre_act_coefficient}")
        self.l0_coefficient = l0_coefficient
        self.pre_act_coefficient = pre_act_coefficient
        self.bandwidth = bandwidth
        self.log_threshold = nn.Parameter(torch.full((self.d_sae,), math.log(threshold_init)))

    def recommended_training(self) -> dict:
        """lr 7e-5, Adam β (0, 0.999) (paper App. I; dictionary_learning); LR and λ warm-ups over
        1 % and 10 % of the run (the paper's 1,000 / 10,000 steps, as fractions)."""
        return {"lr": 7e-5, "adam_betas": (0.0, 0.999), "lr_warmup_fraction": 0.01, "sparsity_warmup_fraction": 0.1}

    @property
    def threshold(self) -> Tensor:
        """θ [d_sae] > 0, in training (scaled) units."""
        return self.log_threshold.exp()

    def select(self, pre: Tensor, training: bool) -> Selection:
        """Entries above θ − ε: the active ones and the kernel window below θ, whose STE gradient
        reaches θ (the window is |π − θ| < ε/2; a full ε keeps rounding at its edge inside)."""
        return Selection.of_mask(lambda: pre > self.threshold.detach() - self.bandwidth, implied=True)

    def activate_entries(self, entries, training: bool) -> Tensor:
        """z = π · H(π − θ): exact JumpReLU forward, straight-through backward."""
        return JumpReLUFunction.apply(entries.pre, entries.at(self.threshold), self.bandwidth)

    def sparsity_losses(self, x, y, pre, z, y_hat, latents=None, step: TrainingStep = TrainingStep()) -> dict[str, Tensor]:
        latents = latents if latents is not None else DenseLatents(pre)
        fired = StepFunction.apply(latents.pre, latents.at(self.threshold), self.bandwidth)
        losses = {"l0": self.l0_coefficient * step.sparsity_scale * latents.total(fired) / latents.n_rows}
        dead = step.dead.nonzero().squeeze(1) if self.pre_act_coefficient > 0 and step.dead is not None else ()
        if len(dead) > 0:  # nonzero() syncs with the device, so only when the term is on
            # every token's pre-activation of every dead latent, with gradient to W_enc, b_enc, θ
            entries = latents.at_rows(dead.expand(latents.n_rows, -1).contiguous())
            # the decoder norm only weighs the term (unit rows here): it pulls the encoder, not the decoder
            norms = entries.at(self.W_dec.detach().norm(dim=1))
            gap = (entries.at(self.threshold) - entries.pre).relu()
            losses["pre_act"] = self.pre_act_coefficient * entries.total(gap * norms) / latents.n_rows
        return losses

    @torch.no_grad()
    def start_at_l0(self, x: Tensor, l0: float) -> None:
        """x: [rows, d_in] -> one θ for every latent: the value that l0 / d_sae of the sample's
        pre-activations exceed, but never below `START_FLOOR` × their standard deviation. A θ per
        latent at its own quantile starts at the same L0 but drifted away from it in calibrated
        short runs (benchmarks/RESULTS.md: 14.8 at a target of 8, against 7.9).

        Why the floor: at initialisation the pre-activations spread about 0, so an L0 near d_sae/2
        or above puts the quantile near or below 0, where θ > 0 cannot follow (it was clamped at
        0.001). From there log θ climbs by about the learning rate per step (Adam), ~20-fold in a
        1,000-step run, never reaching the pre-activations' scale; the L0 term reaches only θ, so
        the dictionary trained as a ReLU without sparsity pressure and ended dense (L0 = d_sae, λ at
        its bound; on ground truth at targets 22 of 50 and 32 of 64, docs/metrics.md). From 0.1 σ
        about 46 % of a centred, symmetric spread fires, so the floor binds only where the start
        asks for about that or more; there it warns and starts at the floor's L0 instead."""
        pre = self.pre_acts(x).float().reshape(-1, 1)
        theta = float(firing_quantile(pre, l0 / self.d_sae))
        floor = START_FLOOR * float(pre.std())
        if theta < floor:
            started = float((pre > floor).sum()) / len(x)
            warnings.warn(f"jumprelu: a start at L0 {l0:.3g} of d_sae {self.d_sae} needs a threshold of {theta:.3g}, "
                          f"below {START_FLOOR} x the pre-activations' spread ({floor:.3g}), from which it could not "
                          f"grow in a run; started there instead, at L0 {started:.3g} (an L0 target near d_sae/2 or "
                          "above is no sparse code for JumpReLU: a wider dictionary or a smaller target)", stacklevel=2)
        self.log_threshold.fill_(math.log(max(theta, floor, 1e-3)))

    @torch.no_grad()
    def scale_encoder(self, scale: float) -> None:
        super().scale_encoder(scale)
        self.log_threshold.add_(math.log(scale))  # θ scales with π: the same latents fire

    # ----------------------------------------------------------------- export
    def adapt_export_tensors(self, tensors: dict[str, Tensor], latent_scale: Tensor) -> dict[str, Tensor]:
        # π is multiplied by latent_scale in the folded encoder; θ must follow (SAELens fold_W_dec_norm).
        return {**tensors, "threshold": self.threshold * latent_scale}

    def pop_threshold(self, tensors: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor]:
        """-> (the other tensors, 'threshold' [d_sae]); a one-line DataError when it is missing or
        of another shape."""
        tensors = dict(tensors)
        threshold = tensors.pop("threshold", None)
        if threshold is None or threshold.shape != (self.d_sae,):
            got = "none" if threshold is None else tuple(threshold.shape)
            raise DataError(f"a jumprelu dictionary needs a 'threshold' tensor of shape ({self.d_sae},); got {got}")
        return tensors, threshold

    @torch.no_grad()
    def load_folded(self, tensors: dict[str, Tensor]) -> None:
        tensors, threshold = self.pop_threshold(tensors)
        super().load_folded(tensors)
        self.log_threshold.copy_(threshold.to(self.log_threshold.dtype).log())
