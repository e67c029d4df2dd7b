"""Stacked members (training/stack.py): a member trained in a stack equals the same member alone.

Bitwise on CPU fp32: the step's losses, outputs, bookkeeping and every gradient (one step, against
the member's own dense `training_losses`), then whole sweeps trained stacked against the same
members trained alone, with members that differ in k, lr, seed, dead latents and calibration, and
with gradient clipping that binds — a norm, an Adam state, a reduction or a coefficient shared
across the stack would move some member off its solo run. A stacked sweep resumes exactly.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch

from conftest import assert_same_state, crash_and_resume, quiet_trainer
from dictlearn import ActivationDataModule, BatchTopKSAE, GatedSAE, JumpReLUSAE, ReLUL1SAE, TopKSAE
from dictlearn.data import write_synth_file
from dictlearn.dictionaries.latents import TrainingStep
from dictlearn.training import DictionaryTraining, Member, TrainingConfig
from dictlearn.training.calibration import SparsityCalibration
from dictlearn.training.stack import stack_key, stacked_training_losses, stacks

D, D_OUT, D_SAE, STEPS = 16, 12, 48, 20


# mechanism -> three members that differ in what each is told (k, coefficients, thresholds)
MECHANISMS = {
    "topk": lambda **shape: [TopKSAE(k=k, d_sae=D_SAE, **shape) for k in (3, 7, 5)],
    "batchtopk": lambda **shape: [BatchTopKSAE(k=k, threshold_start_step=2, d_sae=D_SAE, **shape) for k in (3, 7, 5)],
    "relu_l1": lambda **shape: [ReLUL1SAE(l1_coefficient=c, d_sae=D_SAE, **shape) for c in (0.1, 1.0, 3.0)],
    "jumprelu": lambda **shape: [JumpReLUSAE(l0_coefficient=c, threshold_init=t, pre_act_coefficient=p, d_sae=D_SAE,
                                             **shape) for c, t, p in ((0.1, 0.1, 0.0), (1.0, 0.3, 1e-3), (2.0, 0.05, 0.1))],
}


def _members(mechanism: str, **shape) -> list:
    members = MECHANISMS[mechanism](**shape)
    for seed, member in enumerate(members):
        member.reset_parameters(seed)
        with torch.no_grad():  # distinct biases and scales: a wrong member's would show
            member.b_enc.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed))
            member.b_dec.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed + 10))
            member.target_scale.fill_(1.0 + seed / 4)
            if member.W_skip is not None:
                member.W_skip.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed + 20))
    return members


@pytest.mark.parametrize("mechanism", list(MECHANISMS))
@pytest.mark.parametrize("shape", [dict(d_in=D), dict(d_in=D, d_out=D_OUT, transcoder=True),
                                   dict(d_in=D, d_out=D_OUT, transcoder=True, skip_connection=True)],
                         ids=["sae", "transcoder", "skip_transcoder"])
def test_a_stacked_step_equals_each_members_own_step_bitwise(shape, mechanism):
    generator = torch.Generator().manual_seed(0)
    xs = [torch.randn(64, D, generator=generator) * (1 + i) for i in range(3)]
    ys = [x if not shape.get("transcoder") else torch.randn(64, D_OUT, generator=generator) for x in xs]
    dead = [torch.zeros(D_SAE, dtype=torch.bool), torch.arange(D_SAE) % 3 == 0, torch.arange(D_SAE) < 5]
    steps = [TrainingStep(step=4, sparsity_scale=0.5 + i / 4, dead=d, sparse_path="never") for i, d in enumerate(dead)]
    alone, stacked = _members(mechanism, **shape), _members(mechanism, **shape)
    expected = [m.training_losses(x, y, s) for m, x, y, s in zip(alone, xs, ys, steps)]
    sum(sum(r.losses.values()) for r in expected).backward()
    results = stacked_training_losses(stacked, xs, ys, steps)
    sum(sum(r.losses.values()) for r in results).backward()
    for mine, theirs, a, b in zip(results, expected, stacked, alone):
        assert mine.losses.keys() == theirs.losses.keys()
        for term in mine.losses:
            assert torch.equal(mine.losses[term], theirs.losses[term]), term
        assert torch.equal(mine.y_hat, theirs.y_hat)
        assert torch.equal(mine.fire_counts, theirs.fire_counts) and torch.equal(mine.sum_abs, theirs.sum_abs)
        for (name, p), q in zip(a.named_parameters(), b.parameters()):
            assert torch.equal(p.grad, q.grad), name
        assert_same_state(b, a)  # buffers too (BatchTopK's θ moves in the step)
    if mechanism in ("topk", "batchtopk"):  # dead latents are each member's
        assert "auxk" in results[1].losses and "auxk" not in results[0].losses


def test_what_stacks_together():
    sae = dict(d_in=D, d_sae=D_SAE)
    keys = {
        "a": stack_key(TopKSAE(k=3, **sae), "auto"),
        "b": stack_key(TopKSAE(k=5, **sae), "auto"),
        "wide": stack_key(TopKSAE(k=3, d_in=D, d_sae=2 * D_SAE), "auto"),
        "sparse": stack_key(TopKSAE(k=3, **sae), "always"),
        "batchtopk": stack_key(BatchTopKSAE(k=3, **sae), "auto"),
        "gated": stack_key(GatedSAE(**sae), "auto"),
        "c": stack_key(TopKSAE(k=8, **sae), "never"),
        "batchtopk2": stack_key(BatchTopKSAE(k=5, **sae), "auto"),
    }
    assert stacks(keys) == [["a", "b", "c"], ["wide"], ["sparse"], ["batchtopk", "batchtopk2"], ["gated"]]


@pytest.fixture(scope="module")
def pair_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("stack") / "pair.h5"
    write_synth_file(path, n_rows=16_384, d=D, n_features=32, mean_active=3.0, seed=2, d_out=D_OUT)
    return str(path)


SAE, TC = dict(d_in=D, d_sae=D_SAE), dict(d_in=D, d_sae=D_SAE, d_out=D_OUT, transcoder=True)
# name -> (constructor, member seed, target key, the member's own training, calibrated target L0)
MEMBERS = {
    "k3": (lambda: TopKSAE(k=3, **SAE), 0, None, TrainingConfig(lr=1e-2), None),
    "k6": (lambda: TopKSAE(k=6, **SAE), 1, None, None, None),
    "k4_same_seed": (lambda: TopKSAE(k=4, **SAE), 0, None,
                     TrainingConfig(lr_decay_fraction=0.5, adam_betas=(0.5, 0.9)), None),
    "batchtopk3": (lambda: BatchTopKSAE(k=3, threshold_start_step=5, **SAE), 2, None, None, None),
    "batchtopk5": (lambda: BatchTopKSAE(k=5, threshold_start_step=5, **SAE), 3, None, None, None),
    "relu4": (lambda: ReLUL1SAE(l1_coefficient=0.5, **SAE), 4, None, None, 4.0),
    "relu8": (lambda: ReLUL1SAE(l1_coefficient=0.5, **SAE), 5, None, TrainingConfig(sparsity_warmup_fraction=0.5), 8.0),
    "tc3": (lambda: TopKSAE(k=3, **TC), 7, "target", None, None),
    "tc5": (lambda: TopKSAE(k=5, **TC), 8, "target", TrainingConfig(lr=3e-3), None),
}


def _member(name: str) -> Member:
    make, seed, key, training, _ = MEMBERS[name]
    return Member(make(), target_key=key, seed=seed, training=training)


def _fit(path: str, members: dict, stack: bool, targets: dict, target_key: str | None = "target") -> DictionaryTraining:
    L.seed_everything(123)
    training = DictionaryTraining(members, TrainingConfig(lr=5e-3, dead_window_tokens=512), stack=stack)
    calibration = SparsityCalibration(targets, start_fraction=0.0, control_fraction=1.0, gain=0.3)
    # a small clipping norm binds every step: a norm over the stack would change every member
    quiet_trainer(max_steps=STEPS, gradient_clip_val=0.05, callbacks=[calibration]).fit(
        training, ActivationDataModule(path, input_key="acts", target_key=target_key, batch_size=256, block_size=64))
    return training


@pytest.mark.slow
def test_every_stacked_member_equals_the_same_member_trained_alone(pair_file):
    targets = {name: spec[4] for name, spec in MEMBERS.items() if spec[4] is not None}
    sweep = _fit(pair_file, {name: _member(name) for name in MEMBERS}, True, targets)
    assert sweep._stacks() == [["k3", "k6", "k4_same_seed"], ["batchtopk3", "batchtopk5"], ["relu4", "relu8"],
                               ["tc3", "tc5"]]
    coefficients = {name: float(sweep.members[name].l1_coefficient) for name in ("relu4", "relu8")}
    assert coefficients["relu4"] != coefficients["relu8"] != 0.5  # calibration moved each its own way
    for name, spec in MEMBERS.items():
        alone = _fit(pair_file, {"model": _member(name)}, False, {"model": spec[4]} if spec[4] else {}, spec[2])
        assert_same_state(alone.dictionary, sweep.members[name])
        assert_same_state(alone.activity["model"], sweep.activity[name])
        assert int(sweep.activity[name].tokens_since_fired.min()) == 0, name  # it trained


def test_a_stacked_sweep_resumes_bit_identically(small_file, tmp_path):
    def make():
        kwargs = dict(d_in=16, d_sae=32)
        return DictionaryTraining({f"k{k}": Member(TopKSAE(k=k, **kwargs), seed=k) for k in (2, 3, 5)},
                                  TrainingConfig(lr=3e-3, dead_window_tokens=256), stack=True)

    reference, resumed, _ = crash_and_resume(make, small_file, tmp_path, steps=20, checkpoint_every=6,
                                             crash_at=9, resume_step=6)
    assert reference._stacks() == [["k2", "k3", "k5"]]
    assert_same_state(reference, resumed)
