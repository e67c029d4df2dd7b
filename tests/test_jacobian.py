"""Transcoder faithfulness (dictlearn/metrics/jacobian.py): the analytic Jacobian equals autograd's
for every mechanism as transcoder and skip transcoder; an exactly linear transcoder equal to a
linear MLP gets jacobian_cos 1; the MLP Jacobian of the embedded GPT-2 equals its closed form."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dictlearn.dictionaries import (
    BatchTopKSAE, GatedSAE, JumpReLUSAE, MatryoshkaBatchTopKSAE, ReLUL1SAE, TopKSAE,
)  # fmt: skip
from dictlearn.metrics.jacobian import (
    frobenius_cosines, jacobian_cosines, module_jacobian, sample_rows, transcoder_jacobian,
)  # fmt: skip

D_IN, D_SAE, D_OUT = 6, 24, 5
MECHANISMS = {
    "topk": lambda **kw: TopKSAE(k=4, **kw),
    "batchtopk": lambda **kw: BatchTopKSAE(k=4, **kw),
    "matryoshka": lambda **kw: MatryoshkaBatchTopKSAE(k=4, prefix_fractions=[0.25, 0.5, 1.0], **kw),
    "relu_l1": lambda **kw: ReLUL1SAE(**kw),
    "gated": lambda **kw: GatedSAE(**kw),
    "jumprelu": lambda **kw: JumpReLUSAE(threshold_init=0.2, **kw),
}


def _transcoder(mechanism: str, skip: bool):
    """Every parameter random, unequal data scales, float64."""
    torch.manual_seed(0)
    model = MECHANISMS[mechanism](d_in=D_IN, d_sae=D_SAE, d_out=D_OUT, transcoder=True, skip_connection=skip)
    model = model.double().eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.3 * torch.randn_like(param))
        model.input_scale.fill_(1.7)
        model.target_scale.fill_(0.4)
        if hasattr(model, "threshold") and model.threshold.dtype == torch.float64 and not hasattr(model, "log_threshold"):
            model.threshold.fill_(0.3)  # BatchTopK's global θ
    return model


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("mechanism", list(MECHANISMS))
def test_analytic_jacobian_equals_autograd_on_random_inputs(mechanism, skip):
    model = _transcoder(mechanism, skip)
    x = torch.randn(30, D_IN, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2
    expected = torch.stack([torch.autograd.functional.jacobian(lambda v: model(v[None])[0], row) for row in x])
    active = (model.encode(x) != 0).sum(-1)
    assert (active > 0).all() and (active < D_SAE).all()  # each token has a proper active set
    got = transcoder_jacobian(model, x)
    assert got.shape == (30, D_OUT, D_IN)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_an_exactly_linear_transcoder_equal_to_a_linear_mlp_gets_one():
    """A ReLU transcoder whose latents are all active on the inputs is the linear map
    (s_in/s_out) W_decᵀ W_encᵀ + W_skip; a linear MLP with that weight has the same Jacobian."""
    model = _transcoder("relu_l1", skip=True)
    with torch.no_grad():
        model.b_enc.fill_(50.0)  # every pre-activation positive on these inputs
    x = torch.randn(40, D_IN, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert (model.encode(x) > 0).all()
    weight = (model.W_dec.T @ model.W_enc.T + model.W_skip) * (1.7 / 0.4)
    mlp = nn.Linear(D_IN, D_OUT).double()
    with torch.no_grad():
        mlp.weight.copy_(weight)
        offset = model(x) - mlp(x)  # the same affine map up to a constant
        torch.testing.assert_close(offset, offset[:1].expand(40, -1))
    cosines = jacobian_cosines(model, mlp, x, chunk=7)
    torch.testing.assert_close(cosines, torch.ones(40, dtype=torch.float64), rtol=0, atol=1e-12)
    with torch.no_grad():
        mlp.weight.mul_(-3.0)  # the opposite map: -1 whatever the scale
    torch.testing.assert_close(jacobian_cosines(model, mlp, x), -torch.ones(40, dtype=torch.float64), rtol=0, atol=1e-12)


def test_a_skip_transcoder_with_no_active_latent_is_its_skip():
    model = _transcoder("topk", skip=True)
    with torch.no_grad():
        model.b_enc.fill_(-100.0)  # TopK keeps 4 latents, but their ReLU is 0
    x = torch.randn(10, D_IN, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert (model.encode(x) == 0).all()
    torch.testing.assert_close(transcoder_jacobian(model, x), (model.W_skip * 1.7 / 0.4).expand(10, -1, -1))
    mlp = nn.Sequential(nn.Linear(D_IN, 16), nn.GELU(), nn.Linear(16, D_OUT)).double()
    skip = (model.W_skip.detach() * 1.7 / 0.4).flatten()
    expected = []
    for row in x:  # per token, the cosine written out from autograd's Jacobian of the MLP
        J = torch.autograd.functional.jacobian(lambda v: mlp(v[None])[0], row).flatten()
        expected.append(float(J @ skip / (J.norm() * skip.norm())))
    cosines = jacobian_cosines(model, mlp, x, chunk=3)
    torch.testing.assert_close(cosines, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)
    assert (cosines.abs() < 0.99).all()


def test_gpt2_mlp_jacobian_equals_its_closed_form():
    """The embedded model's MLP: J = W_projᵀ diag(gelu_new'(h)) W_fcᵀ, h = x W_fc + b_fc (Conv1D
    layout: weight [in, out]), written out with the tanh-GELU derivative in float64."""
    from dictlearn.models.tiny import load_tiny

    mlp = load_tiny().transformer.h[1].mlp.double()
    x = torch.randn(8, 128, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    W_fc, b_fc, W_proj = mlp.c_fc.weight, mlp.c_fc.bias, mlp.c_proj.weight  # [128, 512], [512], [512, 128]
    h = x @ W_fc + b_fc
    c = math.sqrt(2 / math.pi)
    u = c * (h + 0.044715 * h**3)
    gelu_prime = 0.5 * (1 + torch.tanh(u)) + 0.5 * h * (1 - torch.tanh(u) ** 2) * c * (1 + 3 * 0.044715 * h**2)
    expected = torch.einsum("io,ni,di->nod", W_proj, gelu_prime, W_fc)
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), torch.nn.functional.gelu(h, approximate="tanh") @ W_proj + mlp.c_proj.bias)
    torch.testing.assert_close(module_jacobian(mlp, x), expected, rtol=1e-10, atol=1e-12)


def test_frobenius_cosines_and_the_token_sample():
    a = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [0.0, 0.0]]])
    b = torch.tensor([[[2.0, 0.0], [0.0, 2.0]], [[0.0, 1.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 0.0]]])
    torch.testing.assert_close(frobenius_cosines(a, b), torch.tensor([1.0, 2 / math.sqrt(30), 0.0], dtype=torch.float64))
    assert sample_rows(10, 4).tolist() == [0, 3, 6, 9] and sample_rows(3, 256).tolist() == [0, 1, 2]
