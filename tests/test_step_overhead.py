"""The training step's overhead cuts keep its numbers (benchmarks/compare_budget.py measures the time)."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dictlearn.dictionaries import ReLUL1SAE


class CountGemms(TorchDispatchMode):
    """Counts the matrix products (mm, addmm) dispatched inside the `with` block."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm):
            self.count += 1
        return func(*args, **(kwargs or {}))


def _relu_sae(dtype=torch.float32) -> ReLUL1SAE:
    torch.manual_seed(0)
    # 64 < 1024 latents: the dense path; the tied pre-encoder bias on
    model = ReLUL1SAE(d_in=16, d_sae=64, l1_coefficient=0.0, apply_b_dec_to_input=True).to(dtype)
    with torch.no_grad():
        model.b_dec.normal_()
        model.b_enc.normal_(std=0.1)
    return model


def test_dense_step_skips_the_tied_bias_input_gradient_gemm():
    # encoder forward, decoder forward, ∂z, ∂W_dec, ∂W_enc: five products. Autograd through
    # x − b_dec adds a sixth, [batch, d_sae] @ [d_sae, d_in], only to sum it into ∂b_dec.
    model, x = _relu_sae(), torch.randn(32, 16)
    with CountGemms() as gemms:
        sum(model.training_losses(x, x).losses.values()).backward()
    assert gemms.count == 5


def test_dense_step_gradients_equal_the_plain_formula_in_float64():
    model, x = _relu_sae(torch.float64), torch.randn(32, 16, dtype=torch.float64)
    model.training_losses(x, x).losses["reconstruction"].backward()
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    z = ((x - params["b_dec"]) @ params["W_enc"] + params["b_enc"]).relu()
    y_hat = z @ params["W_dec"] + params["b_dec"]
    (x - y_hat).pow(2).sum(-1).mean().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, params[name].grad, rtol=1e-11, atol=1e-12, msg=name)


def test_sweep_clipping_from_the_shared_norms_equals_clip_grad_norm_per_member():
    from dictlearn.dictionaries import TopKSAE
    from dictlearn.training import DictionaryTraining

    torch.manual_seed(0)
    module = DictionaryTraining({"a": TopKSAE(d_in=8, d_sae=32, k=4), "b": _relu_sae()})
    for p in module.parameters():
        p.grad = torch.randn_like(p) * (10.0 if p.shape[0] == 16 else 0.01)  # one member clipped, one not
    original = {n: p.grad.clone() for n, p in module.named_parameters()}
    expected = {}
    for name, member in module.members.items():  # what each member alone gets: project, then clip
        member.constrain_gradient()
        torch.nn.utils.clip_grad_norm_(member.parameters(), 1.0)
        expected[name] = {n: p.grad.clone() for n, p in member.named_parameters()}
    for n, p in module.named_parameters():
        p.grad = original[n].clone()
    module.on_before_optimizer_step(None)
    module.configure_gradient_clipping(None, 1.0, "norm")
    for name, member in module.members.items():
        for n, p in member.named_parameters():
            assert torch.equal(p.grad, expected[name][n]), (name, n)  # bitwise: the same arithmetic
