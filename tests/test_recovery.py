"""Ground truth: every mechanism, as an SAE and as a transcoder, recovers the true features of
`dictlearn synth` data (slow; `pytest -m slow -s` prints the measured values).

SAE setting (`synth_files`): 256 true unit features in d = 64, on average 4 active per row, 200k
rows; 2000 steps at batch 1024, seed 0. Thresholds: MMCS (mean over true features of the best
cosine with a decoder row) >= 0.9 and held-out FVU <= 0.1. A linear encoder sees interference from
the other active features (|cos| ~ 1/sqrt(64)), which puts an FVU floor near 0.06-0.09 on this
setting, so the margins are real, not generous. Each mechanism runs at the knee of its MMCS/FVU
frontier on the magnitude distribution that suits it; the frontiers, and why each sits where it
does, are in benchmarks/RESULTS.md ("Feature recovery on synthetic data" and "Feature recovery:
JumpReLU and transcoders"). Two exceptions to the common thresholds, stated rather than tuned away:
- JumpReLU holds FVU to 0.105: a latent that fires reports its whole pre-activation, so encoder
  interference costs it more, and no setting reached both MMCS >= 0.9 and FVU < 0.099;
- BatchTopK is measured at inference (its global threshold θ, as validation measures it), and its
  inference L0 must stay within 20 % of k: one θ cannot adapt to a row's interference level as
  per-token TopK does, so it needs k 16 where TopK needs 4.

Transcoder setting (`transcoder_recovery_files`): 128 true features in d = 64, x = c F, y = c G
through a second unit-norm dictionary G; MMCS of the decoder against G, FVU against the target.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest

from conftest import fit_and_score
from dictlearn import BatchTopKSAE, GatedSAE, JumpReLUSAE, ReLUL1SAE, TopKSAE
from dictlearn.training import Member, TrainingConfig


def _with(model, **training) -> Member:
    """`model` trained with these `TrainingConfig` settings."""
    return Member(model, training=TrainingConfig(**training))


@dataclass(frozen=True)
class Case:
    magnitude: str  # "exponential" or "uniform" [0, 2] code magnitudes
    make: Callable
    max_fvu: float = 0.1
    l0_target: int | None = None  # held-out L0 within 20 % of it


JUMPRELU = dict(lr=3e-3, adam_betas=(0.9, 0.999), lr_decay_fraction=0.3)  # training
SAE_CASES = {
    "topk": Case("exponential", lambda: TopKSAE(d_in=64, d_sae=512, k=4)),
    "relu_l1": Case("uniform", lambda: _with(ReLUL1SAE(d_in=64, d_sae=256, l1_coefficient=0.47), lr=3e-3)),
    "batchtopk": Case("uniform", lambda: _with(BatchTopKSAE(d_in=64, d_sae=512, k=16), lr=3e-3, lr_decay_fraction=0.2),
                      l0_target=16),
    "gated": Case("uniform", lambda: _with(GatedSAE(d_in=64, d_sae=384, l1_coefficient=1.4), lr=3e-3)),
    "jumprelu": Case("uniform", lambda: _with(JumpReLUSAE(d_in=64, d_sae=384, l0_coefficient=0.1, threshold_init=0.5,
                                                           bandwidth=2.0), **JUMPRELU), max_fvu=0.105),
}  # fmt: skip
TRANSCODER_CASES = {
    "topk": Case("exponential", lambda: TopKSAE(d_in=64, d_out=64, d_sae=256, k=4, transcoder=True)),
    "relu_l1": Case("uniform", lambda: _with(ReLUL1SAE(d_in=64, d_out=64, d_sae=128, l1_coefficient=0.47,
                                                       transcoder=True), lr=3e-3)),
    "gated": Case("uniform", lambda: _with(GatedSAE(d_in=64, d_out=64, d_sae=192, l1_coefficient=1.4,
                                                    transcoder=True), lr=3e-3)),
    "batchtopk": Case("uniform", lambda: _with(BatchTopKSAE(d_in=64, d_out=64, d_sae=256, k=8, transcoder=True),
                                               lr=3e-3, lr_decay_fraction=0.2)),
    "jumprelu": Case("uniform", lambda: _with(JumpReLUSAE(d_in=64, d_out=64, d_sae=256, transcoder=True,
                                                          l0_coefficient=0.15, threshold_init=1.0, bandwidth=2.0),
                                              **JUMPRELU)),
}  # fmt: skip

_trained: dict[str, tuple] = {}  # SAE runs, shared by the recovery and the shrinkage test


def _fit_sae(name: str, synth_files) -> tuple[float, dict]:
    if name not in _trained:
        case = SAE_CASES[name]
        score, metrics, cpu_seconds = fit_and_score(case.make, synth_files[case.magnitude])
        print(f"{name}: MMCS {score:.3f}, FVU {metrics['val/fvu']:.3f}, L0 {metrics['val/l0']:.2f}, "
              f"γ {metrics['val/rel_reconstruction_bias']:.3f}, {cpu_seconds:.0f} s CPU")
        _trained[name] = score, metrics
    return _trained[name]


def _assert_recovered(case: Case, score: float, metrics: dict) -> None:
    assert score >= 0.9
    assert metrics["val/fvu"] <= case.max_fvu
    if case.l0_target is not None:
        assert abs(metrics["val/l0"] - case.l0_target) <= 0.2 * case.l0_target


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SAE_CASES))
def test_sae_recovers_true_features(name, synth_files):
    _assert_recovered(SAE_CASES[name], *_fit_sae(name, synth_files))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TRANSCODER_CASES))
def test_transcoder_recovers_the_target_dictionary(name, transcoder_recovery_files):
    case = TRANSCODER_CASES[name]
    score, metrics, _ = fit_and_score(case.make, transcoder_recovery_files[case.magnitude], target_key="target",
                                      features_key="features_out")
    print(f"{name} transcoder: MMCS {score:.3f}, FVU {metrics['val/fvu']:.3f}, L0 {metrics['val/l0']:.2f}")
    _assert_recovered(case, score, metrics)


@pytest.mark.slow
def test_gated_is_unbiased_where_relu_l1_shrinks(synth_files):
    """γ = Σ‖ŷ‖² / Σ⟨y, ŷ⟩ (Rajamanoharan et al. 2024a eq. 10): the L1 penalty shrinks ReLU-L1's
    codes (γ < 1), the gated SAE's magnitude path is not penalised (γ ≈ 1)."""
    _, gated = _fit_sae("gated", synth_files)
    _, relu, _ = fit_and_score(lambda: _with(ReLUL1SAE(d_in=64, d_sae=256, l1_coefficient=1.0), lr=3e-3),
                               synth_files["uniform"])
    gamma_gated, gamma_relu = gated["val/rel_reconstruction_bias"], relu["val/rel_reconstruction_bias"]
    print(f"γ gated {gamma_gated:.3f} (L0 {gated['val/l0']:.1f}), γ ReLU-L1 {gamma_relu:.3f} (L0 {relu['val/l0']:.1f})")
    assert abs(gamma_gated - 1.0) <= 0.05
    assert gamma_relu < 0.95
