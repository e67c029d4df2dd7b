"""`SparsityCalibration`: set a sparsity coefficient during training so that L0 lands on a target.

TopK and BatchTopK fix L0 by construction (k). ReLU-L1, gated and JumpReLU have a coefficient λ
instead (`l1_coefficient`, `l0_coefficient`) whose L0 depends on the data, the width and the
training length. To compare architectures at matched sparsity, this callback runs a controller
on log λ from `start_fraction` to `control_fraction` of the steps and then freezes λ:

    m      ← EMA of log L0_step                      (smoothing 0.2)
    slope  ← EMA of the per-step change of m         (smoothing 0.1)
    error  = m − log L0_target + horizon · slope     (where L0 is heading, `horizon` steps on)
    log λ ← log λ + clamp(gain · error, ±max_log_step)

L0_step is the step's training L0 of the member (`DictionaryTraining.last_step_l0`), averaged
over ranks under DDP so every rank computes the same λ. The log error makes the update
scale-free (a member at 2× its target moves λ as fast as one at ½) and the clamp keeps one noisy
batch from throwing λ off.

Why the look-ahead term: L0 cannot follow λ quickly. Adam moves each parameter by about lr per
step whatever the gradient's size, so an encoder bias needs hundreds of steps to shift the
pre-activations by one unit, and raising λ further does not make L0 fall faster. A plain integral
controller keeps raising λ while L0 is still on its way down, then L0 overshoots (measured: gated
SAEs fell to L0 < 1 at a target of 8, then took a hundred steps to come back). Steering on the
predicted L0 stops pushing once L0 is heading for the target at the rate it can.

Freezing λ for the last part of the run (where the LR decays) lets the weights settle under one
fixed λ, so the export is an ordinary fixed-coefficient dictionary whose λ was chosen for it. The
frozen value is the average of log λ over about the last `average_fraction` (10 %) of the steps
(an EMA), not its last value: λ swings around the value that holds L0 with the period of L0's
lag, and the last value is wherever the swing happened to be (measured on synthetic data:
ReLU-L1 at target 4 landed at L0 7.1 frozen at its last λ, 4.1 at the average).

Which mechanisms are calibrated, through which attribute, and where they start is what each
mechanism class declares (`Mechanism.coefficient`, `.calibration_start`, dictlearn/dictionaries/
registry.py); the reasons for the shipped ones follow.

A JumpReLU member's thresholds and a ReLU-L1 member's encoder biases start where its L0 is the
target (`start_at_target`): both are learned slowly by Adam (about lr per step), so from the
default start L0 takes most of a short run to get anywhere near the target, and the controller,
seeing no response, winds λ far past the value it needs. A JumpReLU start that would put θ below
0.1 × the pre-activations' spread (an L0 near d_sae/2 or above) stops there and warns: from θ near 0,
log θ cannot climb to their scale in a run and the dictionary trained dense (`JumpReLUSAE.start_at_l0`).

JumpReLU starts above its target (`calibration_start`, 1.25×): the controller can only lower
its L0. Without the L0 term the reconstruction alone lowers it (a firing entry's pre-activation
moves toward its least-squares value, and where that lies below θ the entry stops firing; only the
kernel window lowers θ), so from the target itself λ ran down to near zero while L0 kept falling:
25.0 / 24.9 at a target of 32 (embedded model, default budget, seeds 0 / 1). From 1.25× the target
λ stays positive longer: 26.7 / 26.5 at 32, 15.5 / 15.9 at 16, 7.7 / 7.5 at 8, and 3.5 / 12.0 at 4 /
12 on synthetic data (tests/test_compare.py). A larger factor trades one end for the other: 1.5×
landed at 28.2 at 32 but 3.2 at 4 (synthetic); 3× at 24.8 at 32 (λ overshoots on the way down).

The members' own sparsity warm-up is switched off (their training's `sparsity_warmup_fraction = 0`): the
controller starts from `initial` λ (the mechanism's default) and moves it at once, which is a
warm-up of its own; a warm-up factor multiplying λ would hide the true coefficient from it.

State (λ per member) is the callback's `state_dict`, so a run resumed from a checkpoint continues
with exactly the coefficients it stopped with (bit-identical to an uninterrupted run).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import lightning as L
import torch

from dictlearn.dictionaries.registry import mechanism_of
from dictlearn.errors import ConfigError

def coefficient_attribute(dictionary) -> str | None:
    """The name of the sparsity coefficient `dictionary`'s loss reads at every step, as its class
    declares (`Mechanism.coefficient`, inherited by subclasses); None: its L0 is set by k."""
    declared = mechanism_of(dictionary)
    return declared.coefficient if declared is not None else None


def calibration_start(dictionary) -> float | None:
    """The starting L0 as a multiple of the target (`Mechanism.calibration_start`); None: the start
    is left as initialised."""
    declared = mechanism_of(dictionary)
    return declared.calibration_start if declared is not None else None


class SparsityCalibration(L.Callback):
    """Steer each named member's coefficient so its training L0 reaches `targets[name]`.

    Args:
        targets: {member name: target L0 (> 0)}; members not named are left alone.
        start_fraction: λ stays at its initial value for this fraction of the steps (the first
            steps' L0 says more about the random start than about λ).
        control_fraction: λ moves until this fraction of the steps; frozen after.
        gain: step size on log λ per unit of log error.
        max_log_step: bound on one step's change of log λ (0.1: at most ×1.105 per step).
        horizon: look-ahead of the error, as a fraction of the run's steps.
        average_fraction: the frozen λ is the EMA of log λ with this time constant (a fraction
            of the run's steps), taken at the end of the control window.
        bounds: (lowest, highest) λ allowed.
        start_at_target: a member whose mechanism declares a `calibration_start` (ReLU-L1 1,
            JumpReLU 1.25) starts where its L0 on a data sample is that multiple of the target,
            by `start_at_target`.
    """

    def __init__(self, targets: Mapping[str, float], start_fraction: float = 0.05, control_fraction: float = 0.8,
                 gain: float = 0.03, max_log_step: float = 0.1, horizon: float = 0.15,
                 average_fraction: float = 0.1, bounds: tuple[float, float] = (1e-6, 1e6),
                 start_at_target: bool = True) -> None:
        for name, target in targets.items():
            if not target > 0:
                raise ConfigError(f"calibration target of {name!r} must be > 0 (got {target})")
        if not average_fraction > 0:
            raise ConfigError(f"calibration average_fraction must be > 0 (got {average_fraction})")
        if not 0.0 <= start_fraction < control_fraction <= 1.0:
            raise ConfigError(f"need 0 <= start_fraction < control_fraction <= 1 (got {start_fraction}, {control_fraction})")
        self.targets = {str(k): float(v) for k, v in targets.items()}
        self.start_fraction, self.control_fraction = start_fraction, control_fraction
        self.gain, self.max_log_step, self.horizon = gain, max_log_step, horizon
        self.average_fraction, self.bounds, self.start_at_target = average_fraction, bounds, start_at_target
        self.log_coefficient: dict[str, float] = {}  # the controller's state, set at fit start
        self.averaged: dict[str, float] = {}  # name -> EMA of log λ, the value frozen at the end
        self.smoothed: dict[str, tuple[float, float]] = {}  # name -> (EMA of log L0, EMA of its slope)

    @property
    def state_key(self) -> str:
        return f"SparsityCalibration[{','.join(sorted(self.targets))}]"

    def coefficients(self) -> dict[str, float]:
        """{member name: λ now}."""
        return {name: math.exp(value) for name, value in self.log_coefficient.items()}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for name in self.targets:
            if name not in pl_module.members:
                raise ConfigError(f"calibration names member {name!r}, which the sweep does not have")
            member = pl_module.members[name]
            attribute = coefficient_attribute(member)
            if attribute is None:
                raise ConfigError(f"member {name!r} ({type(member).__name__}) has no sparsity coefficient to calibrate")
            pl_module.settings[name] = dataclasses.replace(pl_module.settings[name], sparsity_warmup_fraction=0.0)
            if name not in self.log_coefficient:  # a fresh run; a resumed one has its state already
                self.log_coefficient[name] = math.log(max(getattr(member, attribute), self.bounds[0]))
        self._apply(pl_module)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.start_at_target and trainer.global_step == 0:  # a fresh run, after the data init
            for name, target in self.targets.items():
                member = pl_module.members[name]
                factor = calibration_start(member)  # None: the start stays as initialised
                if factor is not None:  # JumpReLU's θ has a floor: its start stays below ~0.46 d_sae
                    start_at_target(member, target * factor, trainer.datamodule,
                                    pl_module.data_keys(name, trainer.datamodule))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self._apply(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        # global_step already counts the step just taken
        total = _total_steps(trainer)
        if not self.targets or not self.start_fraction * total < trainer.global_step <= self.control_fraction * total:
            return  # nothing to calibrate (every member has a k), or outside the control window
        names = list(self.targets)
        l0 = torch.stack([pl_module.last_step_l0[name].detach().float().reshape(()) for name in names])
        if trainer.world_size > 1:
            l0 = trainer.strategy.reduce(l0, reduce_op="mean")
        low, high = (math.log(b) for b in self.bounds)
        for name, value in zip(names, l0.cpu().double().tolist()):
            log_l0 = math.log(max(value, 1e-3))
            mean, slope = self.smoothed.get(name, (log_l0, 0.0))
            new_mean = mean + 0.2 * (log_l0 - mean)
            slope += 0.1 * ((new_mean - mean) - slope)
            self.smoothed[name] = (new_mean, slope)
            error = new_mean - math.log(self.targets[name]) + self.horizon * total * slope
            step = max(-self.max_log_step, min(self.max_log_step, self.gain * error))
            self.log_coefficient[name] = min(high, max(low, self.log_coefficient[name] + step))
            average = self.averaged.get(name, self.log_coefficient[name])
            self.averaged[name] = average + (self.log_coefficient[name] - average) / max(1.0, self.average_fraction * total)
            if trainer.global_step >= int(self.control_fraction * total):  # the last controlled step
                self.log_coefficient[name] = self.averaged[name]
        self._apply(pl_module)

    def _apply(self, pl_module) -> None:
        """Write λ into each member (its loss reads it next step) and into its hparams (its export records it)."""
        for name, value in self.coefficients().items():
            member = pl_module.members[name]
            attribute = coefficient_attribute(member)
            setattr(member, attribute, value)
            member.hparams[attribute] = value

    def state_dict(self) -> dict:
        return {"log_coefficient": dict(self.log_coefficient), "targets": dict(self.targets),
                "smoothed": {k: list(v) for k, v in self.smoothed.items()}, "averaged": dict(self.averaged)}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict.get("targets", self.targets) != self.targets:
            raise ConfigError("the checkpoint's calibration targets differ from this run's; resume with the same sweep")
        self.log_coefficient = {str(k): float(v) for k, v in state_dict["log_coefficient"].items()}
        self.smoothed = {str(k): (float(v[0]), float(v[1])) for k, v in state_dict.get("smoothed", {}).items()}
        self.averaged = {str(k): float(v) for k, v in state_dict.get("averaged", {}).items()}


@torch.no_grad()
def start_at_target(member, target: float, datamodule, keys, rows: int = 8192) -> None:
    """Move a JumpReLU member's thresholds, or a ReLU-L1 member's encoder biases, to where its L0
    on `rows` sampled training rows is `target`; mechanisms that declare no `calibration_start`
    are left as they are.

    JumpReLU: every θ := the (1 − target/d_sae) quantile of all the sample's pre-activations. θ is
    learned through Adam, so log θ moves by about lr per step whatever λ is; from the default
    θ_init (0.05) a few hundred steps cannot reach L0 8 of 512 (measured: L0 stayed at ~137 with
    λ at its upper bound). A Gaussian guess, Φ⁻¹(1 − t/d_sae), undershot L0 by 1.5-2x on the
    embedded model's residual stream.

    ReLU-L1: b_i −= the (1 − target/d_sae) quantile of latent i's pre-activations, so each latent
    fires on target/d_sae of the sample. At initialisation about half the latents fire; the
    encoder biases then need ~150 steps to come down, during which the controller saw L0 stay
    high and raised λ 100×, and L0 collapsed once they did (measured on synthetic data: L0 0.35
    and 1.85 at targets 4 and 12; 4.1 and 12.0 with this start).

    The sample is seeded (the data module's), so every DDP rank computes the same values."""
    if calibration_start(member) is None:
        return  # gated lands on its target without it; TopK and BatchTopK fix L0 by k
    x = datamodule.view(*keys).sample_rows(rows)[0].to(member.b_enc.device)
    member.start_at_l0(x * member.input_scale, target)


def _total_steps(trainer: L.Trainer) -> int:
    steps = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else trainer.estimated_stepping_batches
    return max(1, int(steps)) if math.isfinite(steps) else 1
