"""The Dictionary base and its mechanisms: formulas, constraints, schedules (dictionaries/)."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from conftest import quiet_trainer
from dictlearn.training import DictionaryTraining
from dictlearn import ActivationDataModule, ReLUL1SAE, TopKSAE
from dictlearn.dictionaries.init import geometric_median
from dictlearn.errors import ConfigError


# ------------------------------------------------------------------ constructor validation
@pytest.mark.parametrize(
    "make, flag",
    [
        (lambda: TopKSAE(d_in=8, d_sae=16, k=17), "--model.k"),
        (lambda: TopKSAE(d_in=8, d_sae=16, k=0), "--model.k"),
        (lambda: TopKSAE(d_in=8, d_sae=16, k=4, auxk_alpha=-1.0), "--model.auxk_alpha"),
        (lambda: ReLUL1SAE(d_in=8, d_sae=16, l1_coefficient=-0.1), "--model.l1_coefficient"),
        (lambda: ReLUL1SAE(d_in=8, d_sae=0), "--model.d_sae"),
        (lambda: ReLUL1SAE(d_in=8, d_sae=16, lr=0.0), "--model.lr"),
        (lambda: ReLUL1SAE(d_in=8, d_sae=16, lr_decay_fraction=1.5), "--model.lr_decay_fraction"),
        (lambda: ReLUL1SAE(d_in=8, d_sae=16, resample_every_steps=10), "--model.resample_every_steps"),
    ],
)
def test_bad_arguments_name_their_flag(make, flag):
    with pytest.raises(ConfigError, match=flag.replace(".", r"\.")):
        make()


def test_hparams_rebuild_the_same_class():
    model = TopKSAE(d_in=8, d_sae=32, k=3, k_aux=5)
    assert model.hparams.k == 3 and model.hparams.k_aux == 5 and model.hparams.d_sae == 32
    clone = TopKSAE(**model.hparams)
    assert (clone.k, clone.k_aux, clone.lr) == (3, 5, model.lr)
    assert model.lr == pytest.approx(2e-4 / (32 / 2**14) ** 0.5)  # Gao et al. lr scaling


# ------------------------------------------------------------------ formulas
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


def test_relu_l1_loss_matches_float64_formula():
    """April-2024 loss: mean_t ‖y − ŷ‖² + λ mean_t Σ_i z_i ‖d_i‖ (Conerly et al. 2024)."""
    torch.manual_seed(1)
    model = ReLUL1SAE(d_in=6, d_sae=10, l1_coefficient=0.7, sparsity_warmup_fraction=0.0)
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


def test_topk_loss_is_batch_fvu_plus_auxk_on_dead_latents():
    torch.manual_seed(2)
    model = TopKSAE(d_in=6, d_sae=20, k=2, k_aux=3, auxk_alpha=0.5)
    model.tokens_since_fired[:10] = model.dead_window_tokens  # latents 0..9 dead
    x = torch.randn(16, 6)
    pre = model.pre_acts(x)
    z = model.activate(pre)
    y_hat = model.decode_scaled(z, x)
    terms = model.sparsity_losses(x, x, pre, z, y_hat)
    xd, pd, e = x.double(), pre.detach().double(), (x - y_hat).detach().double()
    fvu = ((xd - y_hat.detach().double()) ** 2).sum() / ((xd - xd.mean(0)) ** 2).sum()
    assert model.reconstruction_loss(x, y_hat).item() == pytest.approx(fvu.item(), rel=1e-5)
    dead_pre = pd[:, :10]
    values, idx = dead_pre.topk(3, dim=-1)
    z_aux = torch.zeros_like(pd).scatter(1, idx, values.clamp_min(0))
    e_hat = z_aux @ model.W_dec.detach().double()
    aux = ((e - e_hat) ** 2).sum() / ((e - e.mean(0)) ** 2).sum()
    assert terms["auxk"].item() == pytest.approx(0.5 * aux.item(), rel=1e-5)
    model.tokens_since_fired.zero_()
    assert model.sparsity_losses(x, x, pre, z, y_hat) == {}  # nothing dead, no AuxK


def test_geometric_median_minimises_the_sum_of_distances():
    torch.manual_seed(3)
    points = torch.randn(501, 5) * torch.tensor([1.0, 2.0, 0.5, 3.0, 1.0]) + 4.0
    points[:20] += 100.0  # outliers pull the mean, not the median
    median = geometric_median(points).double()
    p = points.double()
    grad = ((median - p) / (median - p).norm(dim=1, keepdim=True)).sum(0)
    assert grad.norm().item() < 1e-2  # first-order optimality of Σ‖p − m‖
    cost = lambda m: (p - m).norm(dim=1).sum()
    assert cost(median) < cost(p.mean(0))
    # Collinear odd set: the median is the middle point.
    line = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [10.0, 10.0]])
    torch.testing.assert_close(geometric_median(line), torch.tensor([2.0, 2.0]), atol=1e-3, rtol=0)


# ------------------------------------------------------------------ constraints in training
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
    model = TopKSAE(d_in=16, d_sae=64, k=4, lr=1e-2)
    dm = ActivationDataModule(small_file, batch_size=256, block_size=64)
    quiet_trainer(max_steps=40, callbacks=[record]).fit(DictionaryTraining(model), dm)
    assert record.steps == 40 and record.max_deviation < 1e-5


def test_gradient_projection_removes_the_parallel_component():
    model = TopKSAE(d_in=8, d_sae=16, k=2)
    model.W_dec.grad = torch.randn(16, 8)
    DictionaryTraining(model).on_before_optimizer_step(None)
    parallel = (model.W_dec.grad * model.W_dec.detach()).sum(-1)
    assert parallel.abs().max().item() < 1e-6


def test_auxk_revives_latents_forced_dead(small_file):
    """Kill half the latents (encoder columns shrunk so they never reach the top k); AuxK brings
    them back, its absence not (a latent outside the top k gets no gradient from the main loss)."""

    def revived(auxk_alpha: float) -> int:
        L.seed_everything(0)
        model = TopKSAE(d_in=16, d_sae=64, k=4, lr=3e-3, auxk_alpha=auxk_alpha, k_aux=8, dead_window_tokens=512)
        dm = ActivationDataModule(small_file, batch_size=256, block_size=64)
        dm.setup("fit")
        model.initialise_from_data(dm)
        with torch.no_grad():
            model.W_enc[:, 32:] *= 0.01  # pre-activations near 0: never in the top k
        quiet_trainer(max_steps=150).fit(DictionaryTraining(model), dm)
        z = torch.cat([model.encode(x) for x, _ in dm.val_dataloader()])
        return int(((z[:, 32:] != 0).sum(0) > 0).sum())

    with_auxk, without = revived(1 / 32 * 8), revived(0.0)
    assert without == 0
    assert with_auxk >= 8, f"AuxK revived only {with_auxk} of 32 forced-dead latents"


def test_dead_counter_counts_tokens_since_last_fire():
    model = TopKSAE(d_in=4, d_sae=6, k=1)
    fire = torch.tensor([3, 0, 0, 1, 0, 0])
    DictionaryTraining(model)._update_fired({"model": fire}, 100)
    DictionaryTraining(model)._update_fired({"model": torch.tensor([0, 0, 2, 0, 0, 0])}, 50)
    assert model.tokens_since_fired.tolist() == [50, 150, 0, 50, 150, 150]


def test_relu_resampling_rewrites_dead_latents_and_resets_adam(small_file):
    L.seed_everything(0)
    model = ReLUL1SAE(
        d_in=16, d_sae=32, decoder_constraint="unit_norm", l1_coefficient=0.5, lr=1e-3,
        resample_every_steps=20, dead_window_tokens=256 * 10,
    )
    dm = ActivationDataModule(small_file, batch_size=256, block_size=64)
    dm.setup("fit")
    model.initialise_from_data(dm)
    with torch.no_grad():
        model.b_enc[:8] = -50.0  # dead from the start
    before = model.W_dec.detach()[:8].clone()
    quiet_trainer(max_steps=21).fit(DictionaryTraining(model), dm)  # resampled at the start of step 20
    after = model.W_dec.detach()[:8]
    assert (after - before).norm(dim=-1).min() > 0.1  # every dead row moved to a data direction
    assert (model.b_enc.detach()[:8] > -1.0).all()  # b_enc reset to 0 at step 20, then trained one step
    torch.testing.assert_close(after.norm(dim=-1), torch.ones(8))


def test_lr_schedule_warms_up_and_decays():
    model = ReLUL1SAE(d_in=4, d_sae=8, lr=1.0, lr_warmup_fraction=0.1, lr_decay_fraction=0.2)
    training = DictionaryTraining(model)
    training._total_steps = lambda: 100
    scheduler = training.configure_optimizers()["lr_scheduler"]["scheduler"]
    factors = [scheduler.lr_lambdas[0](s) for s in (0, 4, 9, 50, 79, 80, 90, 99)]
    assert factors == pytest.approx([0.1, 0.5, 1.0, 1.0, 1.0, 1.0, 0.5, 0.05])


# ------------------------------------------------------------------ non-finite guards
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
