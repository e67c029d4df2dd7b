"""Kill-and-resume: a run resumed from a mid-epoch checkpoint ends bit-identical (CPU)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from conftest import quiet_trainer
from dictlearn import ActivationDataModule, ReLUL1SAE, TopKSAE
from dictlearn.callbacks import RunGuard

TOTAL_STEPS, CHECKPOINT_EVERY, CRASH_AT = 45, 7, 17  # 31 batches per epoch: crosses an epoch


class _Crash(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == CRASH_AT:
            raise RuntimeError("injected crash")


def _make(kind: str):
    L.seed_everything(0)
    if kind == "relu_l1":  # schedules: λ warm-up, LR warm-up and decay
        return ReLUL1SAE(d_in=16, d_sae=48, l1_coefficient=1.0, lr=3e-3, lr_warmup_fraction=0.1)
    # small dead window so AuxK and the dead counters are active across the resume
    return TopKSAE(d_in=16, d_sae=48, k=3, lr=3e-3, dead_window_tokens=256 * 3)


def _fit(kind, small_file, ckpt_dir, callbacks=(), ckpt_path=None):
    model = _make(kind)
    dm = ActivationDataModule(small_file, batch_size=256, block_size=64)
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=CHECKPOINT_EVERY, save_top_k=-1)
    trainer = quiet_trainer(
        max_steps=TOTAL_STEPS, enable_checkpointing=True, callbacks=[checkpoint, RunGuard(), *callbacks]
    )
    trainer.fit(model, dm, ckpt_path=ckpt_path)
    return model


@pytest.mark.parametrize("kind", ["relu_l1", "topk"])
def test_resume_mid_epoch_is_bit_identical(kind, small_file, tmp_path):
    reference = _fit(kind, small_file, tmp_path / "reference")
    with pytest.raises(RuntimeError, match="injected crash"):
        _fit(kind, small_file, tmp_path / "crashed", callbacks=[_Crash()])
    checkpoint = tmp_path / "crashed" / "epoch=0-step=14.ckpt"
    assert checkpoint.is_file()
    resumed = _fit(kind, small_file, tmp_path / "crashed", ckpt_path=str(checkpoint))
    for (name, a), (_, b) in zip(reference.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), f"{name} differs after resume"
    assert not list(tmp_path.rglob("*.tmp"))
