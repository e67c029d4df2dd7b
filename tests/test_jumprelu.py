"""JumpReLU SAE (Rajamanoharan et al. 2024b): forward, STE pseudo-gradients, export, resume and the CLI recipe."""

from __future__ import annotations

import json
import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file

from conftest import quiet_trainer
from saelens_reference import sae_lens_forward
from dictlearn.dictionaries.model import TrainingStep
from dictlearn.training import DictionaryTraining, TrainingConfig
from dictlearn import ActivationDataModule, load
from dictlearn.callbacks import RunGuard
from dictlearn.dictionaries.jumprelu import JumpReLUSAE
from dictlearn.errors import ConfigError, DataError
from dictlearn.export import export


# ------------------------------------------------------------------ constructor
@pytest.mark.parametrize(
    "kwargs, flag",
    [
        (dict(l0_coefficient=-1.0), "--model.l0_coefficient"),
        (dict(bandwidth=0.0), "--model.bandwidth"),
        (dict(bandwidth=float("inf")), "--model.bandwidth"),
        (dict(threshold_init=-0.1), "--model.threshold_init"),
        (dict(pre_act_coefficient=-1e-3), "--model.pre_act_coefficient"),
        (dict(lr=0.0), "lr is a training setting now"),
    ],
)
def test_bad_arguments_name_their_flag(kwargs, flag):
    with pytest.raises(ConfigError, match=flag.replace(".", r"\.")):
        JumpReLUSAE(d_in=4, d_sae=8, **kwargs)


def test_defaults_and_hparams_rebuild_the_same_model():
    model = JumpReLUSAE(d_in=8, d_sae=16, l0_coefficient=0.3, bandwidth=0.1, threshold_init=0.2)
    assert model.apply_b_dec_to_input is False and model.b_dec_init == "zeros"  # Gemma Scope
    settings = DictionaryTraining(model).settings["model"]
    assert settings.adam_betas == (0.0, 0.999) and settings.lr == 7e-5  # paper App. I
    assert model.unit_norm_decoder and model.sae_lens_architecture == "jumprelu"
    torch.testing.assert_close(model.threshold, torch.full((16,), 0.2))
    clone = JumpReLUSAE(**model.hparams)
    assert (clone.l0_coefficient, clone.bandwidth, clone.apply_b_dec_to_input) == (0.3, 0.1, False)
    torch.testing.assert_close(clone.threshold, model.threshold)


# ------------------------------------------------------------------ forward
def _random_model(apply_b_dec_to_input: bool = False) -> JumpReLUSAE:
    torch.manual_seed(0)
    model = JumpReLUSAE(d_in=6, d_sae=10, l0_coefficient=0.7, apply_b_dec_to_input=apply_b_dec_to_input)
    with torch.no_grad():
        model.b_enc.normal_(0.0, 0.5)
        model.b_dec.normal_()
        model.log_threshold.copy_(torch.empty(10).uniform_(-2.0, 0.5))
        model.W_dec.mul_(torch.rand(10, 1) + 0.5)  # unequal row norms: latent_scale varies
        model.input_scale.fill_(2.5)
        model.target_scale.fill_(2.5)
    return model


@pytest.mark.parametrize("apply_b_dec_to_input", [False, True])
def test_forward_and_loss_match_float64_reference(apply_b_dec_to_input):
    model = _random_model(apply_b_dec_to_input)
    x_raw = torch.randn(64, 6)
    W_enc, b_enc, W_dec, b_dec, log_t = (
        p.detach().double() for p in (model.W_enc, model.b_enc, model.W_dec, model.b_dec, model.log_threshold)
    )
    theta = torch.exp(log_t)
    x = x_raw.double() * 2.5
    pre_ref = (x - b_dec if apply_b_dec_to_input else x) @ W_enc + b_enc
    fires = pre_ref > theta
    z_ref = torch.where(fires, pre_ref, torch.zeros(()))
    y_ref = z_ref @ W_dec + b_dec
    assert 0 < fires.float().mean() < 1 and ((pre_ref > 0) & ~fires).any()  # θ really gates
    # Training units.
    pre = model.pre_acts(x_raw * 2.5)
    z = model.activate(pre)
    y_hat = model.decode_scaled(z, x_raw * 2.5)
    torch.testing.assert_close(z.double(), z_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y_hat.double(), y_ref, rtol=1e-5, atol=1e-5)
    # Loss: mean_t ‖x − x̂‖² + λ mean_t #{i : π_ti > θ_i}.
    loss = model.reconstruction_loss(x_raw * 2.5, y_hat) + model.sparsity_losses(x, x, pre, z, y_hat)["l0"]
    loss_ref = ((x - y_ref) ** 2).sum(1).mean() + 0.7 * fires.sum(1).double().mean()
    assert loss.item() == pytest.approx(loss_ref.item(), rel=1e-5)
    # Public API, raw units: reported latents z·‖d_i‖/s_out, reconstruction back in raw units.
    norms = W_dec.norm(dim=1)
    torch.testing.assert_close(model.encode(x_raw).double(), z_ref * norms / 2.5, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model(x_raw).double(), y_ref / 2.5, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ pseudo-gradients
# π = x (W_enc = I, b_enc = 0); θ = (1.0, 0.5, 2.0); ε = 0.2, so the kernel windows are
# |π − θ| < 0.1: (0.9, 1.1), (0.4, 0.6), (1.9, 2.1).
_PRE = [
    [0.95, 0.45, 2.50],  # latent 0 in window (off), latent 1 in window (off), latent 2 on
    [1.05, 0.30, 1.95],  # latent 0 in window (on),  latent 1 off,             latent 2 in window (off)
    [1.50, 0.58, 2.08],  # latent 0 on,              latent 1 in window (on),  latent 2 in window (on)
    [0.20, 0.70, 0.00],  # latent 0 off,             latent 1 on,              latent 2 off
]
_IN_WINDOW = [[1, 1, 0], [1, 0, 1], [0, 1, 1], [0, 0, 0]]
_FIRES = [[0, 0, 1], [1, 0, 0], [1, 1, 1], [0, 1, 0]]
_THETA, _EPS, _LAMBDA = [1.0, 0.5, 2.0], 0.2, 0.3


def test_threshold_and_preactivation_gradients_match_the_ste_formulas():
    """Autograd through the model's loss vs. the paper's pseudo-derivatives (Eq. 11–12) in closed form:
    ∂L/∂θ_i = Σ_t [∂L/∂z_ti · (−θ_i/ε) + (λ/N)(−1/ε)] K_ti,   ∂L/∂log θ_i = θ_i ∂L/∂θ_i,
    ∂L/∂π_ti = ∂L/∂z_ti · H_ti (the L0 term sends nothing to π)."""
    torch.manual_seed(0)
    model = JumpReLUSAE(d_in=3, d_sae=3, l0_coefficient=_LAMBDA, bandwidth=_EPS)
    W_dec = torch.nn.functional.normalize(torch.randn(3, 3), dim=-1)
    b_dec = torch.tensor([0.1, -0.2, 0.3])
    with torch.no_grad():
        model.W_enc.copy_(torch.eye(3))
        model.b_enc.zero_()
        model.W_dec.copy_(W_dec)
        model.b_dec.copy_(b_dec)
        model.log_threshold.copy_(torch.tensor(_THETA).log())
    x = torch.tensor(_PRE)
    y = x + torch.tensor([0.3, -0.5, 0.2])  # a target the reconstruction misses
    pre = model.pre_acts(x)
    pre.retain_grad()
    z = model.activate(pre)
    y_hat = model.decode_scaled(z, x)
    loss = model.reconstruction_loss(y, y_hat) + model.sparsity_losses(x, y, pre, z, y_hat)["l0"]
    loss.backward()

    # Independent float64 closed form, windows and firing pattern written by hand above.
    P, K, H = (torch.tensor(a, dtype=torch.float64) for a in (_PRE, _IN_WINDOW, _FIRES))
    theta = torch.tensor(_THETA, dtype=torch.float64)
    Wd, bd, yd = W_dec.double(), b_dec.double(), y.double()
    n = len(P)
    residual = yd - ((P * H) @ Wd + bd)
    dL_dz = -2.0 / n * residual @ Wd.T  # [N, d_sae]
    dL_dtheta = (dL_dz * (-theta / _EPS) * K).sum(0) + (_LAMBDA / n) * (-1.0 / _EPS) * K.sum(0)
    torch.testing.assert_close(model.log_threshold.grad.double(), theta * dL_dtheta, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(pre.grad.double(), dL_dz * H, rtol=1e-5, atol=1e-7)
    assert (dL_dtheta != 0).all()  # every latent has a pre-activation in its window

    # The L0 term alone: −λ/(Nε) × (number in the window), and nothing to π.
    model.zero_grad()
    pre = model.pre_acts(x)
    pre.retain_grad()
    model.sparsity_losses(x, y, pre, model.activate(pre), y_hat)["l0"].backward()
    expected = theta * (-_LAMBDA / (n * _EPS)) * K.sum(0)
    torch.testing.assert_close(model.log_threshold.grad.double(), expected, rtol=1e-6, atol=1e-9)
    assert pre.grad is None or (pre.grad == 0).all()


def test_l0_pseudo_gradient_estimates_the_true_derivative():
    """Kernel density estimate: for π ~ U[0, 2], E[H(π − θ)] = (2 − θ)/2, so d/dθ = −1/2; the batch
    pseudo-gradient of mean_t H(π_t − θ) converges to it (paper §4)."""
    generator = torch.Generator().manual_seed(0)
    pre = torch.rand(400_000, 1, generator=generator, dtype=torch.float64) * 2
    theta = torch.tensor([0.7], dtype=torch.float64, requires_grad=True)
    from dictlearn.dictionaries.jumprelu import StepFunction

    StepFunction.apply(pre, theta, 0.05).mean().backward()
    assert theta.grad.item() == pytest.approx(-0.5, rel=0.02)


def test_pre_act_loss_pulls_only_dead_latents_toward_their_threshold():
    """Anthropic's pre-act loss: λ_P mean_t Σ_{i dead} ReLU(θ_i − π_ti) ‖d_i‖ (float64 reference),
    with gradient to the dead latents' encoder columns, biases and θ, none to live latents or the
    decoder; off (no term) at λ_P = 0."""
    model = _random_model()
    model.pre_act_coefficient = 0.4
    step = TrainingStep(dead=torch.isin(torch.arange(10), torch.tensor([1, 4, 7])))  # latents 1, 4, 7 dead
    x = torch.randn(64, 6) * 2.5
    pre = model.pre_acts(x)
    z = model.activate(pre)
    loss = model.sparsity_losses(x, x, pre, z, model.decode_scaled(z, x), step=step)["pre_act"]
    W_enc, b_enc, W_dec, log_t = (p.detach().double() for p in (model.W_enc, model.b_enc, model.W_dec, model.log_threshold))
    dead = torch.tensor([1, 4, 7])
    gap = (log_t.exp()[dead] - (x.double() @ W_enc + b_enc)[:, dead]).relu()
    reference = 0.4 * (gap * W_dec.norm(dim=1)[dead]).sum(1).mean()
    assert reference > 0.1 and loss.item() == pytest.approx(reference.item(), rel=1e-6)
    loss.backward()
    live = torch.tensor([i for i in range(10) if i not in (1, 4, 7)])
    assert (model.b_enc.grad[live] == 0).all() and (model.W_enc.grad[:, live] == 0).all()
    assert (model.b_enc.grad[dead] < 0).all() and (model.log_threshold.grad[dead] > 0).all()
    assert model.W_dec.grad is None or (model.W_dec.grad == 0).all()
    model.pre_act_coefficient = 0.0
    assert "pre_act" not in model.sparsity_losses(x, x, pre, z, model.decode_scaled(z, x), step=step)


# ------------------------------------------------------------------ export
def test_export_round_trip_uses_the_folded_threshold(small_file, tmp_path):
    L.seed_everything(0)
    model = JumpReLUSAE(d_in=16, d_sae=48, l0_coefficient=0.5)
    dm = ActivationDataModule(small_file, batch_size=256, block_size=64)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    quiet_trainer(max_steps=30, enable_checkpointing=True, callbacks=[checkpoint]).fit(
        DictionaryTraining(model, TrainingConfig(lr=3e-3)), dm)
    model.eval()
    with torch.no_grad():  # uneven row norms, so the per-latent fold of θ is exercised
        model.W_dec.mul_(torch.linspace(0.5, 2.0, 48)[:, None])
    assert float(model.input_scale) != pytest.approx(1.0)
    x = torch.cat([x for x, _ in dm.val_dataloader()])
    folder = export(model, tmp_path / "export", dm.provenance())

    w = load_file(str(folder / "sae_weights.safetensors"))
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and cfg["apply_b_dec_to_input"] is False
    assert set(w) == {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"}
    ls = model.W_dec.detach().norm(dim=-1) / model.target_scale
    torch.testing.assert_close(w["threshold"], model.threshold.detach() * ls)
    torch.testing.assert_close(w["W_dec"].norm(dim=-1), torch.ones(48))

    z_ref, y_ref = sae_lens_forward(folder, x)  # as SAELens reads it: ReLU, then π > θ
    pre = x @ w["W_enc"] + w["b_enc"]
    gated = ((pre > 0) & (pre <= w["threshold"])).sum().item()
    assert gated > 0, "no latent was held back by its threshold: the test would not see a wrong θ"

    from_export, from_ckpt = load(folder), load(tmp_path / "ckpt" / "last.ckpt")
    with torch.no_grad():
        z, y = model.encode(x), model(x)
        torch.testing.assert_close(z_ref, z, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(y_ref, y, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(from_export.encode(x), z, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(from_export(x), y, rtol=1e-4, atol=1e-4)
    # The checkpoint holds the model as trained (before the row rescale above): same as a fresh fold.
    with torch.no_grad():
        model.W_dec.div_(torch.linspace(0.5, 2.0, 48)[:, None])
        torch.testing.assert_close(from_ckpt.encode(x), model.encode(x), rtol=1e-4, atol=1e-5)
    with pytest.raises(DataError, match="threshold"):
        JumpReLUSAE(d_in=16, d_sae=48).load_folded({k: v for k, v in w.items() if k != "threshold"})


# ------------------------------------------------------------------ resume
def _fit_resumable(small_file, ckpt_dir, crash_at=None, ckpt_path=None):
    class Crash(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == crash_at:
                raise RuntimeError("injected crash")

    L.seed_everything(0)
    model = JumpReLUSAE(d_in=16, d_sae=32, l0_coefficient=0.5)
    dm = ActivationDataModule(small_file, batch_size=256, block_size=64)
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=7, save_top_k=-1)
    callbacks = [checkpoint, RunGuard()] + ([Crash()] if crash_at is not None else [])
    trainer = quiet_trainer(max_steps=25, enable_checkpointing=True, callbacks=callbacks)
    trainer.fit(DictionaryTraining(model, TrainingConfig(lr=3e-3, lr_warmup_fraction=0.1)), dm, ckpt_path=ckpt_path)
    return model


def test_resume_is_bit_identical(small_file, tmp_path):
    reference = _fit_resumable(small_file, tmp_path / "reference")
    with pytest.raises(RuntimeError, match="injected crash"):
        _fit_resumable(small_file, tmp_path / "crashed", crash_at=17)
    resumed = _fit_resumable(small_file, tmp_path / "crashed", ckpt_path=str(tmp_path / "crashed" / "epoch=0-step=14.ckpt"))
    for (name, a), (_, b) in zip(reference.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), f"{name} differs after resume"


def _start(d_sae: int, l0: float, seed: int = 0) -> tuple[JumpReLUSAE, torch.Tensor]:
    """A JumpReLU at its calibrated start on Gaussian rows -> (the model, its sample pre-activations, float64)."""
    model = JumpReLUSAE(d_in=16, d_sae=d_sae)
    model.reset_parameters(seed)
    x = torch.randn(4096, 16, generator=torch.Generator().manual_seed(seed))
    model.start_at_l0(x, l0)
    with torch.no_grad():
        return model, model.pre_acts(x).double()


def test_a_start_near_half_the_width_keeps_a_threshold_log_theta_can_grow_from():
    """1.25 x a target near d_sae/2 or above puts the quantile at or below 0: θ was clamped at 0.001,
    grew ~20-fold in a 1,000-step run and the dictionary trained dense (docs/metrics.md, "JumpReLU on
    ground truth"). The start keeps θ at 0.1 x the pre-activations' standard deviation, and says so."""
    with pytest.warns(UserWarning, match=r"start at L0 25 of d_sae 32 .* no sparse code for JumpReLU"):
        model, pre = _start(32, 25.0)
    floor = 0.1 * pre.std().item()
    assert model.threshold.tolist() == pytest.approx([floor] * 32, rel=1e-5)
    started = (pre > floor).double().sum(1).mean().item()
    assert 0.4 * 32 < started < 25  # about the fraction of a centred spread above 0.1 sigma (46 %)


@pytest.mark.parametrize("l0", [10.0, 20.0, 40.0])
def test_a_start_the_pre_activations_allow_is_the_quantile_as_before(l0):
    """The default compare's JumpReLU starts (1.25 x L0 8, 16, 32 of d_sae 512) lie far above the
    floor: θ is the value l0 / d_sae of the sample's pre-activations exceed (a float64 reference:
    the (r + 1)-th largest, r = l0 / d_sae of the entries), and no warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model, pre = _start(512, l0)
    entries = pre.flatten().sort(descending=True).values
    expected = entries[round(len(entries) * l0 / 512)].item()
    assert expected > 0.1 * pre.std().item() and model.threshold.tolist() == pytest.approx([expected] * 512, rel=1e-5)
