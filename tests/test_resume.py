"""Kill-and-resume: a run resumed from a mid-epoch checkpoint ends bit-identical (CPU)."""

from __future__ import annotations

import signal

import lightning as L
import pytest
from lightning.pytorch.utilities.exceptions import SIGTERMException

from conftest import assert_same_state, crash_and_resume
from dictlearn import ActivationDataModule, ReLUL1SAE, TopKSAE
from dictlearn.callbacks import RunGuard
from dictlearn.data.synth import write_synth_file
from dictlearn.training import DictionaryTraining, Member, TrainingConfig


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


class _StopAfter(L.Callback):
    """Asks `RunGuard` to stop at the end of step `at`, as a compare worker is stopped."""

    def __init__(self, at: int):
        self.at = at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.at:
            next(c for c in trainer.callbacks if isinstance(c, RunGuard)).request_stop(signal.SIGTERM)


@pytest.mark.parametrize("stop_at", [5, 10])  # mid-epoch; after an epoch's last batch (10 batches an epoch)
def test_a_stop_after_an_epochs_last_batch_resumes_bit_identically(stop_at, tmp_path):
    """The stop at an epoch's end is raised after Lightning counts the epoch complete; restored
    as saved, the next epoch was taken as run and its data skipped (the resumed run differed, and
    ended in epoch 4 after 25 steps where the uninterrupted one ends in epoch 3)."""
    from conftest import quiet_trainer

    path = tmp_path / "ten_batches.h5"
    write_synth_file(path, n_rows=2560 + 64, d=16, n_features=32, mean_active=3.0, seed=1)  # 10 batches of 256

    def fit(folder, extra=(), ckpt_path=None):
        L.seed_everything(0)
        training = DictionaryTraining(_make("topk"))
        trainer = quiet_trainer(max_steps=25, default_root_dir=str(folder), callbacks=[RunGuard(), *extra])
        trainer.fit(training, ActivationDataModule(str(path), batch_size=256, block_size=64, val_rows=0),
                    ckpt_path=ckpt_path)
        return training, trainer

    reference, finished = fit(tmp_path / "reference")
    with pytest.raises(SIGTERMException):
        fit(tmp_path / "stopped", [_StopAfter(stop_at)])
    checkpoint = next((tmp_path / "stopped").rglob(f"interrupted-step={stop_at}.ckpt"))
    resumed, trainer = fit(tmp_path / "stopped", ckpt_path=str(checkpoint))
    assert trainer.num_training_batches == 10 and trainer.current_epoch == finished.current_epoch
    assert_same_state(reference, resumed)
