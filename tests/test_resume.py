"""Kill-and-resume: a run resumed from a mid-epoch checkpoint ends bit-identical (CPU)."""

from __future__ import annotations

import pytest

from conftest import assert_same_state, crash_and_resume
from dictlearn import ReLUL1SAE, TopKSAE
from dictlearn.training import Member, TrainingConfig


def _make(kind: str) -> Member:
    if kind == "relu_l1":  # schedules: λ warm-up, LR warm-up and decay
        return Member(ReLUL1SAE(d_in=16, d_sae=48, l1_coefficient=1.0),
                      training=TrainingConfig(lr=3e-3, lr_warmup_fraction=0.1))
    # small dead window so AuxK and the dead counters (the training's state) are active across the resume
    return Member(TopKSAE(d_in=16, d_sae=48, k=3), training=TrainingConfig(lr=3e-3, dead_window_tokens=256 * 3))


@pytest.mark.parametrize("kind", ["relu_l1", "topk"])
def test_resume_mid_epoch_is_bit_identical(kind, small_file, tmp_path):
    # 45 steps of 31 batches per epoch: the resumed run crosses an epoch
    reference, resumed, _ = crash_and_resume(lambda: _make(kind), small_file, tmp_path, steps=45,
                                             checkpoint_every=7, crash_at=17, resume_step=14)
    assert_same_state(reference, resumed)
    assert not list(tmp_path.rglob("*.tmp"))
