"""Gated SAE (dictionaries/gated.py): forward and loss against float64 formulas, the frozen-decoder
aux term, the SAELens `gated` export, the recipe through the CLI, exact resume."""

from __future__ import annotations


import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file

from saelens_reference import sae_lens_forward
from conftest import assert_same_state, crash_and_resume, initialise, quiet_trainer
from dictlearn.dictionaries.model import TrainingStep
from dictlearn.training import DictionaryTraining, Member, TrainingConfig
from dictlearn import ActivationDataModule, load
from dictlearn.dictionaries.gated import GatedSAE
from dictlearn.errors import ConfigError
from dictlearn.export import export


def _randomised(**kwargs) -> GatedSAE:
    """A small model with every parameter away from its (zero / unit) init."""
    torch.manual_seed(0)
    model = GatedSAE(d_in=6, d_sae=10, **kwargs)
    with torch.no_grad():
        model.W_enc.normal_(0, 0.5)
        model.W_dec.mul_(torch.rand(10, 1) + 0.5)  # unequal row norms
        for p in (model.b_enc, model.b_dec, model.b_mag):
            p.normal_(0, 0.3)
        model.r_mag.normal_(0, 0.5)
    return model


def _reference(model: GatedSAE, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Paper §3.1-3.2 in float64, from the parameters alone (scaled units)."""
    W_gate, b_gate, r_mag, b_mag, W_dec, b_dec = (
        p.detach().double() for p in (model.W_enc, model.b_enc, model.r_mag, model.b_mag, model.W_dec, model.b_dec)
    )
    x = x.double()
    x_bar = x - b_dec if model.apply_b_dec_to_input else x
    pi_gate = x_bar @ W_gate + b_gate
    W_mag = W_gate * r_mag.exp()[None, :]  # column i scaled by exp(r_mag[i])
    pi_mag = x_bar @ W_mag + b_mag
    z = (pi_gate > 0).double() * pi_mag.clamp_min(0)
    y_hat = z @ W_dec + b_dec
    gate = pi_gate.clamp_min(0)
    l1_weights = torch.ones(len(W_dec), dtype=torch.float64) if model.unit_norm_decoder else W_dec.norm(dim=1)
    return dict(
        pi_gate=pi_gate, pi_mag=pi_mag, z=z, y_hat=y_hat,
        reconstruction=((x - y_hat) ** 2).sum(1).mean(),
        l1=model.l1_coefficient * (gate * l1_weights).sum(1).mean(),
        aux_reconstruction=((x - (gate @ W_dec + b_dec)) ** 2).sum(1).mean(),
    )  # fmt: skip


def _terms(model: GatedSAE, x: torch.Tensor, step: TrainingStep = TrainingStep()) -> dict[str, torch.Tensor]:
    pre = model.pre_acts(x)
    z = model.activate(pre, training=True)
    y_hat = model.decode_scaled(z, x)
    terms = dict(z=z, y_hat=y_hat, reconstruction=model.reconstruction_loss(x, y_hat))
    return terms | model.sparsity_losses(x, x, pre, z, y_hat, step=step)


# ------------------------------------------------------------------ constructor
@pytest.mark.parametrize(
    "kwargs, flag",
    [
        (dict(l1_coefficient=-1.0), "--model.l1_coefficient"),
        (dict(decoder_constraint="free"), "--model.decoder_constraint"),
        (dict(lr=0.0), "lr is a training setting now"),
    ],
)
def test_bad_arguments_name_their_flag(kwargs, flag):
    with pytest.raises(ConfigError, match=flag.replace(".", r"\.")):
        GatedSAE(d_in=8, d_sae=16, **kwargs)


def test_defaults_and_hparams_rebuild():
    model = GatedSAE(d_in=8, d_sae=32, l1_coefficient=2.5)
    settings = DictionaryTraining(model).settings["model"]
    assert (settings.lr, settings.adam_betas) == (5e-5, (0.0, 0.999))  # dictionary_learning gdm.py
    assert model.unit_norm_decoder and model.sae_lens_architecture == "gated"
    assert (model.r_mag == 0).all() and (model.b_mag == 0).all() and (model.b_gate == 0).all()
    clone = GatedSAE(**model.hparams)
    assert (clone.l1_coefficient, clone.d_sae) == (2.5, 32)
    assert not GatedSAE(d_in=8, d_sae=32, decoder_constraint="norm_weighted_l1").unit_norm_decoder


# ------------------------------------------------------------------ formulas
@pytest.mark.parametrize("decoder_constraint", ["unit_norm", "norm_weighted_l1"])
@pytest.mark.parametrize("apply_b_dec_to_input", [True, False])
def test_forward_and_losses_match_float64_formula(decoder_constraint, apply_b_dec_to_input):
    model = _randomised(
        l1_coefficient=0.7, decoder_constraint=decoder_constraint,
        apply_b_dec_to_input=apply_b_dec_to_input,
    )  # fmt: skip
    x = torch.randn(64, 6)
    ours, ref = _terms(model, x), _reference(model, x)
    gate_open, magnitude_positive = ref["pi_gate"] > 0, ref["pi_mag"] > 0
    # every combination occurs, so neither path alone would reproduce z
    assert (gate_open & ~magnitude_positive).any() and (~gate_open & magnitude_positive).any()
    assert (gate_open & magnitude_positive).any()
    torch.testing.assert_close(ours["z"].double(), ref["z"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours["y_hat"].double(), ref["y_hat"], rtol=1e-5, atol=1e-5)
    for name in ("reconstruction", "l1", "aux_reconstruction"):
        assert ours[name].item() == pytest.approx(ref[name].item(), rel=1e-5), name
    # raw-activation encode: scales and decoder norms folded into reported latents
    model.input_scale.fill_(2.0)
    model.target_scale.fill_(2.0)
    scaled_ref = _reference(model, 2.0 * x)
    expected = scaled_ref["z"] * model.W_dec.detach().double().norm(dim=1) / 2.0
    torch.testing.assert_close(model.encode(x).detach().double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model(x).detach().double(), scaled_ref["y_hat"] / 2.0, rtol=1e-5, atol=1e-5)


def test_gate_decides_and_magnitude_sets_the_value():
    """Closed form on hand-set parameters: the gate opens at π_gate > 0, the value is ReLU(π_mag)."""
    model = GatedSAE(d_in=2, d_sae=3, apply_b_dec_to_input=False)
    with torch.no_grad():
        model.W_enc.copy_(torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]))
        model.b_enc.copy_(torch.tensor([-1.0, 0.5, 0.5]))  # b_gate
        model.r_mag.copy_(torch.tensor([0.0, 2.0, 0.0]))
        model.b_mag.copy_(torch.tensor([0.0, 1.0, -3.0]))
    z = model.activate(model.pre_acts(torch.tensor([[0.5, 9.0], [2.0, 9.0]])))
    e2 = torch.tensor(2.0).exp()
    expected = torch.tensor([
        [0.0, 0.5 * e2 + 1.0, 0.0],  # latent 0: gate 0.5 − 1 < 0; latent 2: gate open, π_mag −2.5 < 0
        [2.0, 2.0 * e2 + 1.0, 0.0],
    ])  # fmt: skip
    torch.testing.assert_close(z.detach(), expected)


def _grads(model: GatedSAE, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(params.items(), grads)}


def test_aux_loss_does_not_move_the_decoder():
    """The aux term reaches the gate path (W_gate, b_gate) and nothing through the decoder.

    Without a pre-encoder bias its gradient w.r.t. W_dec and b_dec is exactly zero. With one
    (x̄ = x − b_dec, the default) b_dec is also the encoder's input offset; its aux gradient is then
    exactly the encoder-input path, −W_gate Σ_t ∂L_aux/∂π_gate (paper §3.2 / gdm.py detach only the
    decoder), checked against float64.
    """
    for apply_b_dec_to_input in (False, True):
        model = _randomised(apply_b_dec_to_input=apply_b_dec_to_input)
        x = torch.randn(64, 6)
        grads = _grads(model, _terms(model, x)["aux_reconstruction"])
        assert torch.equal(grads["W_dec"], torch.zeros_like(model.W_dec))
        assert torch.equal(grads["r_mag"], torch.zeros(10)) and torch.equal(grads["b_mag"], torch.zeros(10))
        assert grads["W_enc"].abs().max() > 1e-3 and grads["b_enc"].abs().max() > 1e-3
        if not apply_b_dec_to_input:
            assert torch.equal(grads["b_dec"], torch.zeros(6))
            continue
        ref = _reference(model, x)
        W_gate, W_dec, b_dec = (p.detach().double() for p in (model.W_enc, model.W_dec, model.b_dec))
        gate = ref["pi_gate"].clamp_min(0)
        d_gate = -2.0 / len(x) * (x.double() - gate @ W_dec - b_dec) @ W_dec.T  # ∂L_aux/∂ReLU(π_gate)
        d_pi_gate = d_gate * (ref["pi_gate"] > 0)
        torch.testing.assert_close(grads["b_dec"].double(), -W_gate @ d_pi_gate.sum(0), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(grads["b_enc"].double(), d_pi_gate.sum(0), rtol=1e-4, atol=1e-6)


def test_aux_loss_of_a_skip_transcoder_includes_the_frozen_skip():
    model = _randomised(transcoder=True, skip_connection=True)  # no pre-encoder bias
    with torch.no_grad():
        model.W_skip.normal_(0, 0.3)
    x = torch.randn(32, 6)
    aux = _terms(model, x)["aux_reconstruction"]
    W_gate, b_gate, W_dec, b_dec, W_skip = (
        p.detach().double() for p in (model.W_enc, model.b_enc, model.W_dec, model.b_dec, model.W_skip)
    )
    xd = x.double()
    y_gate = (xd @ W_gate + b_gate).clamp_min(0) @ W_dec + b_dec + xd @ W_skip.T
    assert aux.item() == pytest.approx(((xd - y_gate) ** 2).sum(1).mean().item(), rel=1e-5)
    assert torch.equal(_grads(model, aux)["W_skip"], torch.zeros(6, 6))


def test_transcoder_init_centres_both_paths(tmp_path):
    """As the base does for b_enc (sparsify): at init π_gate and π_mag have mean 0 over the sample."""
    from dictlearn.data import write_synth_file

    path = tmp_path / "tc.h5"
    write_synth_file(path, n_rows=2048, d=8, n_features=20, mean_active=3.0, seed=4, d_out=5)
    dm = ActivationDataModule(str(path), target_key="target", batch_size=256, block_size=64)
    dm.setup("fit")
    model = GatedSAE(d_in=8, d_out=5, d_sae=16, transcoder=True)
    with torch.no_grad():
        model.r_mag.fill_(0.0)
        initialise(model, dm, init_sample_rows=2048)
        x, _ = dm.sample_rows(2048)
        pre = model.pre_acts(x * model.input_scale)
        gate_mean, magnitude_mean = model.gate_pre_acts(pre).mean(0), model.magnitude_pre_acts(pre).mean(0)
    assert model.b_gate.abs().max() > 0.1  # the data is not centred: there was something to do
    torch.testing.assert_close(gate_mean, torch.zeros(16), atol=1e-5, rtol=0)
    torch.testing.assert_close(magnitude_mean, torch.zeros(16), atol=1e-5, rtol=0)


def test_reconstruction_trains_the_magnitude_path_only():
    """The Heaviside gate passes no gradient: the main loss never reaches b_gate."""
    model = _randomised()
    grads = _grads(model, _terms(model, torch.randn(64, 6))["reconstruction"])
    assert torch.equal(grads["b_enc"], torch.zeros(10))
    assert grads["r_mag"].abs().max() > 1e-3 and grads["b_mag"].abs().max() > 1e-3


def test_l1_warms_up_with_the_sparsity_schedule(monkeypatch):
    model = _randomised(l1_coefficient=1.0)
    training = DictionaryTraining(model, TrainingConfig(sparsity_warmup_fraction=0.5))
    monkeypatch.setattr(training, "_total_steps", lambda: 100)
    x = torch.randn(16, 6)
    full = _reference(model, x)["l1"].item()
    for step, factor in ((0, 1 / 50), (24, 0.5), (60, 1.0)):
        monkeypatch.setattr(type(training), "global_step", property(lambda self, s=step: s))
        scale = training.sparsity_scale("model")
        assert scale == pytest.approx(factor)
        assert _terms(model, x, TrainingStep(step, scale))["l1"].item() == pytest.approx(factor * full, rel=1e-5)


# ------------------------------------------------------------------ export
@pytest.mark.parametrize("decoder_constraint", ["unit_norm", "norm_weighted_l1"])
def test_export_round_trip_and_sae_lens_forward(decoder_constraint, small_file, tmp_path):
    L.seed_everything(0)
    model = GatedSAE(d_in=16, d_sae=48, l1_coefficient=0.5, decoder_constraint=decoder_constraint)
    dm = ActivationDataModule(small_file, batch_size=256, block_size=64)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    quiet_trainer(max_steps=30, enable_checkpointing=True, callbacks=[checkpoint]).fit(
        DictionaryTraining(model, TrainingConfig(lr=3e-3)), dm)
    model.eval()
    norms = model.W_dec.detach().norm(dim=-1)
    if decoder_constraint == "unit_norm":
        torch.testing.assert_close(norms, torch.ones(48))
    else:  # free norms: the fold must scale b_gate and b_mag, not r_mag
        assert (norms - 1).abs().max() > 1e-3
    assert float(model.input_scale) != pytest.approx(1.0)
    x = torch.cat([x for x, _ in dm.val_dataloader()])
    folder = export(model, tmp_path / "export", dm.provenance())
    weights = load_file(str(folder / "sae_weights.safetensors"))
    assert set(weights) == {"W_enc", "b_gate", "r_mag", "b_mag", "W_dec", "b_dec"}
    torch.testing.assert_close(weights["r_mag"], model.r_mag.detach())
    torch.testing.assert_close(weights["W_dec"].norm(dim=-1), torch.ones(48))
    with torch.no_grad():
        z, y = model.encode(x), model(x)
        assert 0 < (z > 0).float().mean() < 1
        for other in (load(folder), load(tmp_path / "ckpt" / "last.ckpt")):
            assert isinstance(other, GatedSAE)
            torch.testing.assert_close(other.encode(x), z, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(other(x), y, rtol=1e-4, atol=1e-4)
        z_ref, y_ref = sae_lens_forward(folder, x)
    torch.testing.assert_close(z_ref, z, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(y_ref, y, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ exact resume
def test_resume_is_bit_identical(small_file, tmp_path):
    def make():  # λ and LR warm-ups span the resume
        return Member(GatedSAE(d_in=16, d_sae=48, l1_coefficient=0.5), training=TrainingConfig(lr=3e-3))

    reference, resumed, _ = crash_and_resume(make, small_file, tmp_path, steps=24, checkpoint_every=7,
                                             crash_at=17, resume_step=14)
    assert_same_state(reference, resumed)
