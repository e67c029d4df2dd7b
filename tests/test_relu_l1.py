"""ReLU-L1 SAE (Bricken et al. 2023; Conerly et al. 2024): the norm-weighted L1 loss and the
resampling of dead latents (dictionaries/relu_l1.py, training/resample.py)."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from conftest import initialise, quiet_trainer
from dictlearn import ActivationDataModule, ReLUL1SAE
from dictlearn.errors import ConfigError
from dictlearn.training import DictionaryTraining, TrainingConfig


@pytest.mark.parametrize(
    "make, flag",
    [
        (lambda: ReLUL1SAE(d_in=8, d_sae=16, l1_coefficient=-0.1), "--model.l1_coefficient"),
        (lambda: DictionaryTraining(ReLUL1SAE(d_in=8, d_sae=16), TrainingConfig(resample_every_steps=10)),
         "--training.resample_every_steps needs a unit-norm decoder"),
    ],
)
def test_bad_arguments_name_their_flag(make, flag):
    with pytest.raises(ConfigError, match=flag.replace(".", r"\.")):
        make()


def test_relu_l1_loss_matches_float64_formula():
    """April-2024 loss: mean_t ‖y − ŷ‖² + λ mean_t Σ_i z_i ‖d_i‖ (Conerly et al. 2024)."""
    torch.manual_seed(1)
    model = ReLUL1SAE(d_in=6, d_sae=10, l1_coefficient=0.7)
    with torch.no_grad():
        model.W_dec.mul_(torch.rand(10, 1) + 0.5)  # unequal row norms
        model.b_enc.normal_()
    x = torch.randn(32, 6)
    pre = model.pre_acts(x)
    z = model.activate(pre)
    y_hat = model.decode_scaled(z, x)
    loss = model.reconstruction_loss(x, y_hat) + model.sparsity_losses(x, x, pre, z, y_hat)["l1"]
    W_enc, b_enc, W_dec, b_dec = (p.detach().double() for p in (model.W_enc, model.b_enc, model.W_dec, model.b_dec))
    xd = x.double()
    zd = (xd @ W_enc + b_enc).clamp_min(0)  # no pre-encoder bias in the April recipe
    err = ((xd - (zd @ W_dec + b_dec)) ** 2).sum(1).mean()
    l1 = (zd * W_dec.norm(dim=1)).sum(1).mean()
    assert loss.item() == pytest.approx((err + 0.7 * l1).item(), rel=1e-5)


def test_relu_resampling_rewrites_dead_latents_and_resets_adam(small_file):
    L.seed_everything(0)
    model = ReLUL1SAE(d_in=16, d_sae=32, decoder_constraint="unit_norm", l1_coefficient=0.5)
    training = TrainingConfig(lr=1e-3, resample_every_steps=20, dead_window_tokens=256 * 10)
    dm = ActivationDataModule(small_file, batch_size=256, block_size=64)
    dm.setup("fit")
    initialise(model, dm)
    with torch.no_grad():
        model.b_enc[:8] = -50.0  # dead from the start
    before = model.W_dec.detach()[:8].clone()
    quiet_trainer(max_steps=21).fit(DictionaryTraining(model, training), dm)  # resampled at the start of step 20
    after = model.W_dec.detach()[:8]
    assert (after - before).norm(dim=-1).min() > 0.1  # every dead row moved to a data direction
    assert (model.b_enc.detach()[:8] > -1.0).all()  # b_enc reset to 0 at step 20, then trained one step
    torch.testing.assert_close(after.norm(dim=-1), torch.ones(8))
