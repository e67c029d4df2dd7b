"""Matryoshka BatchTopK (dictionaries/matryoshka.py): every prefix's loss against an independent
float64 computation, prefix gradients confined to their prefix, mean vs sum, the inference-time
prefix reconstructions, the export (a SAELens jumprelu), and the constructor's checks. Sparse ==
dense is tests/test_sparse_paths.py (its MECHANISMS table); recovery on hierarchical data is
tests/test_matryoshka_recovery.py."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from dictlearn import load
from dictlearn.dictionaries import MatryoshkaBatchTopKSAE
from dictlearn.dictionaries.matryoshka import prefix_widths
from dictlearn.dictionaries.model import TrainingStep
from dictlearn.errors import ConfigError
from dictlearn.export import export
from saelens_reference import sae_lens_forward

D_IN, D_SAE, D_OUT, BATCH, K = 12, 64, 10, 40, 5
WIDTHS = (4, 8, 16, 32, 64)
MODES = {
    "sae": dict(d_in=D_IN),
    "transcoder": dict(d_in=D_IN, d_out=D_OUT, transcoder=True),
    "skip_transcoder": dict(d_in=D_IN, d_out=D_OUT, transcoder=True, skip_connection=True),
}


def _randomised(mode: str, **kwargs):
    """Every parameter random, the first 20 latents dead (AuxK runs), a batch in training units."""
    torch.manual_seed(0)
    model = MatryoshkaBatchTopKSAE(d_sae=D_SAE, k=K, k_aux=6, **MODES[mode], **kwargs)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.3 * torch.randn_like(param))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, D_IN, generator=g) * 2
    y = x if mode == "sae" else torch.randn(BATCH, D_OUT, generator=g) * 2
    return model, x, y


def _step(model, x, y, sparse: bool):
    step = TrainingStep(dead=torch.arange(model.d_sae) < 20, sparse_path="always" if sparse else "never")
    return model.training_losses(x, y, step)


def _reference(model, x, y) -> dict[str, torch.Tensor]:
    """The loss terms written out in float64 from the parameters alone: one batch top-(B·k) of
    ReLU(π) by a full sort, ŷ_m from the first m latents and decoder rows, FVU per prefix with the
    target's variance, mean over the M prefixes; AuxK from the k_aux largest dead pre-activations."""
    p = {name: t.detach().double().requires_grad_() for name, t in model.named_parameters()}
    xd, yd = x.double(), y.double()
    pre = (xd if model.transcoder else xd - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    a = pre.relu()
    cutoff = a.detach().flatten().sort(descending=True).values[BATCH * K - 1]
    z = torch.where(a.detach() >= cutoff, a, 0.0)
    base = p["b_dec"] + (xd @ p["W_skip"].T if "W_skip" in p else 0.0)
    variance = ((yd - yd.mean(0)) ** 2).sum()
    terms = {}
    for m in WIDTHS:
        y_m = z[:, :m] @ p["W_dec"][:m] + base
        terms["reconstruction" if m == D_SAE else f"prefix_{m}"] = ((yd - y_m) ** 2).sum() / variance / len(WIDTHS)
    residual = (yd - (z @ p["W_dec"] + base)).detach()
    dead = torch.arange(D_SAE) < 20
    aux = pre.masked_fill(~dead, -torch.inf).topk(6, dim=-1)
    z_aux = torch.zeros_like(pre).scatter(1, aux.indices, aux.values.relu())
    terms["auxk"] = ((residual - z_aux @ p["W_dec"]) ** 2).sum() / ((residual - residual.mean(0)) ** 2).sum() / 32
    return terms, p


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("mode", list(MODES))
def test_every_prefix_loss_and_gradient_matches_a_float64_reference(mode, sparse):
    model, x, y = _randomised(mode)
    assert model.prefix_widths == WIDTHS
    expected, p = _reference(model, x, y)
    losses = _step(model, x, y, sparse).losses
    assert set(losses) == set(expected)
    for name, value in expected.items():
        assert losses[name].item() == pytest.approx(value.item(), rel=2e-5), name
    sum(losses.values()).backward()
    grads = torch.autograd.grad(sum(expected.values()), list(p.values()))
    for (name, param), e in zip(model.named_parameters(), grads):
        torch.testing.assert_close(param.grad.double(), e, rtol=0, atol=2e-5 * e.abs().max(), msg=name)


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("mode", ["sae", "skip_transcoder"])
def test_a_prefix_loss_reaches_only_its_prefix(mode, sparse):
    """∂L_m/∂W_dec is zero on rows ≥ m, and so are the encoder columns ≥ m (their latents are not
    in ŷ_m); rows < m that fired get a gradient."""
    model, x, y = _randomised(mode)
    for m in WIDTHS[:-1]:
        fresh = copy.deepcopy(model)
        step = _step(fresh, x, y, sparse)
        W_dec, W_enc, b_enc = (dict(fresh.named_parameters())[n] for n in ("W_dec", "W_enc", "b_enc"))
        loss = step.losses[f"prefix_{m}"]
        g_dec, g_enc, g_b = torch.autograd.grad(loss, [W_dec, W_enc, b_enc])
        assert torch.equal(g_dec[m:], torch.zeros_like(g_dec[m:])), m
        assert torch.equal(g_enc[:, m:], torch.zeros_like(g_enc[:, m:])), m
        assert torch.equal(g_b[m:], torch.zeros_like(g_b[m:])), m
        fired = step.fire_counts[:m] > 0
        assert fired.any() and (g_dec[:m][fired].abs().sum(-1) > 0).all(), m


def test_sum_weights_every_prefix_by_one_and_mean_by_one_over_m():
    mean_model, x, y = _randomised("sae")
    sum_model, _, _ = _randomised("sae", prefix_loss="sum")
    mean, total = _step(mean_model, x, y, False).losses, _step(sum_model, x, y, False).losses
    for name in mean:
        factor = 1.0 if name == "auxk" else len(WIDTHS)
        assert total[name].item() == pytest.approx(factor * mean[name].item(), rel=1e-6), name


def test_prefix_reconstructions_at_inference_use_the_threshold_and_end_at_forward():
    model, x, _ = _randomised("skip_transcoder")
    model.threshold.fill_(0.5)
    with torch.no_grad():
        model.input_scale.fill_(1.7)
        model.target_scale.fill_(0.6)
        prefixes = model.prefix_reconstructions(x)
        z = model.encode(x)  # reported units: z_i ‖d_i‖ / target_scale
        d = model.W_dec / model.W_dec.norm(dim=-1, keepdim=True)  # unit rows, raw units
        base = (model.b_dec + (x * 1.7) @ model.W_skip.T) / 0.6
        for m, y_m in zip(WIDTHS, prefixes):
            torch.testing.assert_close(y_m, z[:, :m] @ d[:m] + base, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(prefixes[-1], model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode, architecture", [("sae", "jumprelu"), ("transcoder", "jumprelu_transcoder"),
                                                ("skip_transcoder", "jumprelu_skip_transcoder")])
def test_export_is_a_sae_lens_jumprelu_that_loads_back(mode, architecture, tmp_path):
    model, x, _ = _randomised(mode)
    model.threshold.fill_(0.8)
    with torch.no_grad():  # an SAE's input and target are one activation: one scale
        model.input_scale.fill_(1.3)
        model.target_scale.fill_(1.3 if mode == "sae" else 0.7)
    folder = export(model, tmp_path / "e")
    cfg = json.loads((folder / "cfg.json").read_text())
    weights = load_file(str(folder / "sae_weights.safetensors"))
    assert cfg["architecture"] == architecture and "k" not in cfg
    assert weights["threshold"].shape == (D_SAE,)
    loaded = load(folder)
    assert isinstance(loaded, MatryoshkaBatchTopKSAE) and loaded.prefix_widths == WIDTHS
    with torch.no_grad():
        z, y_hat = model.encode(x), model(x)
        z_ref, y_ref = sae_lens_forward(folder, x)
        assert 0 < (z != 0).float().mean() < 1
        torch.testing.assert_close(z_ref, z, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(y_ref, y_hat, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(loaded.prefix_reconstructions(x), model.prefix_reconstructions(x),
                                   rtol=1e-4, atol=1e-4)


def test_default_prefixes_are_d_over_16_to_d():
    assert MatryoshkaBatchTopKSAE(d_in=8, d_sae=4096).prefix_widths == (256, 512, 1024, 2048, 4096)
    assert prefix_widths([0.3, 1.0], 10) == (3, 10)
    clone = MatryoshkaBatchTopKSAE(**MatryoshkaBatchTopKSAE(d_in=8, d_sae=64, prefix_fractions=[0.5, 1.0]).hparams)
    assert clone.prefix_widths == (32, 64)


@pytest.mark.parametrize("kwargs, message", [
    (dict(prefix_fractions=[0.25, 0.5]), "last prefix must be the whole dictionary"),
    (dict(prefix_fractions=[0.5, 0.25, 1.0]), "increase strictly"),
    (dict(prefix_fractions=[0.001, 1.0]), "from at least 1"),
    (dict(prefix_fractions=[]), "last prefix"),
    (dict(prefix_loss="max"), r"--model\.prefix_loss"),
])  # fmt: skip
def test_bad_prefixes_name_their_flag(kwargs, message):
    with pytest.raises(ConfigError, match=message) as error:
        MatryoshkaBatchTopKSAE(d_in=8, d_sae=64, **kwargs)
    assert "--model.prefix_" in str(error.value) and "\n" not in str(error.value)
