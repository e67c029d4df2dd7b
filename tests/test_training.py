"""The training module (training/module.py): decoder-gradient projection, dead-latent counters,
the LR schedule and the non-finite guards."""

from __future__ import annotations

import pytest
import torch

from dictlearn import ReLUL1SAE, TopKSAE
from dictlearn.training import DictionaryTraining, TrainingConfig


def test_gradient_projection_removes_the_parallel_component():
    model = TopKSAE(d_in=8, d_sae=16, k=2)
    model.W_dec.grad = torch.randn(16, 8)
    DictionaryTraining(model).on_before_optimizer_step(None)
    parallel = (model.W_dec.grad * model.W_dec.detach()).sum(-1)
    assert parallel.abs().max().item() < 1e-6


def test_dead_counter_counts_tokens_since_last_fire():
    model = TopKSAE(d_in=4, d_sae=6, k=1)
    fire = torch.tensor([3, 0, 0, 1, 0, 0])
    training = DictionaryTraining(model)
    training._update_fired({"model": fire}, 100)
    training._update_fired({"model": torch.tensor([0, 0, 2, 0, 0, 0])}, 50)
    assert training.activity["model"].tokens_since_fired.tolist() == [50, 150, 0, 50, 150, 150]
    assert training.activity["model"].dead(150).tolist() == [False, True, False, False, True, True]


def test_lr_schedule_warms_up_and_decays():
    model = ReLUL1SAE(d_in=4, d_sae=8)
    training = DictionaryTraining(model, TrainingConfig(lr=1.0, lr_warmup_fraction=0.1, lr_decay_fraction=0.2))
    training._total_steps = lambda: 100
    scheduler = training.configure_optimizers()["lr_scheduler"]["scheduler"]
    factors = [scheduler.lr_lambdas[0](s) for s in (0, 4, 9, 50, 79, 80, 90, 99)]
    assert factors == pytest.approx([0.1, 0.5, 1.0, 1.0, 1.0, 1.0, 0.5, 0.05])


def test_nan_batch_loss_and_gradient_stop_training_before_the_step():
    from dictlearn.errors import NonFiniteError

    model = DictionaryTraining(TopKSAE(d_in=4, d_sae=8, k=2))
    model.log = lambda *args, **kwargs: None  # no trainer attached
    x = torch.randn(10, 4)
    x[3, 1] = float("nan")
    with pytest.raises(NonFiniteError, match=r"NaN/Inf in 1 of 10 rows .* step 0 .*first: row 3"):
        model.training_step((x, x), 0)
    with torch.no_grad():
        model.dictionary.W_dec[0, 0] = float("inf")
    clean = torch.randn(10, 4)
    with pytest.raises(NonFiniteError, match="loss is"):
        model.training_step((clean, clean), 0)
    model = DictionaryTraining(TopKSAE(d_in=4, d_sae=8, k=2))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    model.dictionary.b_enc.grad[2] = float("nan")
    with pytest.raises(NonFiniteError, match="non-finite gradient in b_enc"):
        model.on_before_optimizer_step(None)
