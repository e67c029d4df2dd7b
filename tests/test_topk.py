"""TopK SAE (Gao et al. 2024): the k largest ReLU values, the AuxK term on dead latents, the
unit-norm decoder kept through training (dictionaries/topk.py)."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from conftest import initialise, quiet_trainer
from dictlearn import ActivationDataModule, TopKSAE
from dictlearn.dictionaries.model import TrainingStep
from dictlearn.errors import ConfigError
from dictlearn.training import DictionaryTraining, TrainingConfig


@pytest.mark.parametrize(
    "make, flag",
    [
        (lambda: TopKSAE(d_in=8, d_sae=16, k=17), "--model.k"),
        (lambda: TopKSAE(d_in=8, d_sae=16, k=0), "--model.k"),
        (lambda: TopKSAE(d_in=8, d_sae=16, k=4, auxk_alpha=-1.0), "--model.auxk_alpha"),
    ],
)
def test_bad_arguments_name_their_flag(make, flag):
    with pytest.raises(ConfigError, match=flag.replace(".", r"\.")):
        make()


def test_hparams_rebuild_the_same_class():
    model = TopKSAE(d_in=8, d_sae=32, k=3, k_aux=5)
    assert model.hparams.k == 3 and model.hparams.k_aux == 5 and model.hparams.d_sae == 32
    clone = TopKSAE(**model.hparams)
    assert (clone.k, clone.k_aux) == (3, 5)
    lr = DictionaryTraining(clone).settings["model"].lr  # the training's, from the mechanism's recommendation
    assert lr == pytest.approx(2e-4 / (32 / 2**14) ** 0.5)  # Gao et al. lr scaling


def test_topk_keeps_the_k_largest_relu_values():
    torch.manual_seed(0)
    model = TopKSAE(d_in=8, d_sae=64, k=5)
    pre = torch.randn(100, 64)
    pre[0] = -1.0 - torch.rand(64)  # all negative: ReLU leaves nothing active
    z = model.activate(pre)
    kth = pre.sort(dim=-1, descending=True).values[:, 4:5]
    reference = torch.where(pre >= kth, pre, torch.zeros(())).relu()
    torch.testing.assert_close(z, reference)
    assert ((z != 0).sum(-1)[1:] == 5).all() and (z[0] == 0).all()


def test_topk_loss_is_batch_fvu_plus_auxk_on_dead_latents():
    torch.manual_seed(2)
    model = TopKSAE(d_in=6, d_sae=20, k=2, k_aux=3, auxk_alpha=0.5)
    x = torch.randn(16, 6)
    pre = model.pre_acts(x)
    z = model.activate(pre)
    y_hat = model.decode_scaled(z, x)
    dead = torch.arange(20) < 10  # latents 0..9 dead
    terms = model.sparsity_losses(x, x, pre, z, y_hat, step=TrainingStep(dead=dead))
    xd, pd, e = x.double(), pre.detach().double(), (x - y_hat).detach().double()
    fvu = ((xd - y_hat.detach().double()) ** 2).sum() / ((xd - xd.mean(0)) ** 2).sum()
    assert model.reconstruction_loss(x, y_hat).item() == pytest.approx(fvu.item(), rel=1e-5)
    dead_pre = pd[:, :10]
    values, idx = dead_pre.topk(3, dim=-1)
    z_aux = torch.zeros_like(pd).scatter(1, idx, values.clamp_min(0))
    e_hat = z_aux @ model.W_dec.detach().double()
    aux = ((e - e_hat) ** 2).sum() / ((e - e.mean(0)) ** 2).sum()
    assert terms["auxk"].item() == pytest.approx(0.5 * aux.item(), rel=1e-5)
    assert model.sparsity_losses(x, x, pre, z, y_hat, step=TrainingStep(dead=~dead & dead)) == {}  # nothing dead, no AuxK
    assert model.sparsity_losses(x, x, pre, z, y_hat) == {}


class _RecordDecoderNorms(L.Callback):
    def __init__(self):
        self.max_deviation = 0.0
        self.steps = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        norms = pl_module.dictionary.W_dec.detach().norm(dim=-1)
        self.max_deviation = max(self.max_deviation, (norms - 1).abs().max().item())
        self.steps += 1


def test_topk_decoder_rows_stay_unit_norm_after_every_step(small_file):
    record = _RecordDecoderNorms()
    model = TopKSAE(d_in=16, d_sae=64, k=4)
    dm = ActivationDataModule(small_file, batch_size=256, block_size=64)
    quiet_trainer(max_steps=40, callbacks=[record]).fit(DictionaryTraining(model, TrainingConfig(lr=1e-2)), dm)
    assert record.steps == 40 and record.max_deviation < 1e-5


def test_auxk_revives_latents_forced_dead(small_file):
    """Kill half the latents (encoder columns shrunk so they never reach the top k); AuxK brings
    them back, its absence not (a latent outside the top k gets no gradient from the main loss)."""

    def revived(auxk_alpha: float) -> int:
        L.seed_everything(0)
        model = TopKSAE(d_in=16, d_sae=64, k=4, auxk_alpha=auxk_alpha, k_aux=8)
        training = TrainingConfig(lr=3e-3, dead_window_tokens=512)
        dm = ActivationDataModule(small_file, batch_size=256, block_size=64)
        dm.setup("fit")
        initialise(model, dm)
        with torch.no_grad():
            model.W_enc[:, 32:] *= 0.01  # pre-activations near 0: never in the top k
        quiet_trainer(max_steps=150).fit(DictionaryTraining(model, training), dm)
        z = torch.cat([model.encode(x) for x, _ in dm.val_dataloader()])
        return int(((z[:, 32:] != 0).sum(0) > 0).sum())

    with_auxk, without = revived(1 / 32 * 8), revived(0.0)
    assert without == 0
    assert with_auxk >= 8, f"AuxK revived only {with_auxk} of 32 forced-dead latents"
