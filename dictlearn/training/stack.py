"""Members of a sweep trained as one stacked computation (issue 30).

A compare sweep trains many small members (d 128 × 512), each with its own ~40 kernels per step;
issue 30 asks whether one computation for several members pays. Members that
share a mechanism and a shape run their GEMMs as one computation over stacked tensors: the
encoders as one `baddbmm` over [members, batch, d_in] × [members, d_in, d_sae], the decoders as
one `bmm`, the weight gradients as one `bmm` each; between them each member selects and activates
its latents on its own slice, with its own k, threshold or coefficient. The parameters stay each
member's own `Dictionary` (its optimiser group, clipping, checkpoint and export are untouched):
they are stacked for the step (`torch.stack`, a copy of ~0.25 MB per member and matrix) and
autograd hands each member its slice of the stacked gradient.

Measured (docs/performance.md): on CPU at compare's shape this saves no time yet: the GEMMs are
the same arithmetic and the per-member work between them remains. It is off by default.

The guarantee: a stacked member's step is bit-identical (CPU, fp32) to the same member's dense
step alone. It holds because every operation is either elementwise, a per-slice reduction along
the same axis as alone (column sums, norms), a batched GEMM whose slices round as the solo GEMM
(`bmm`/`baddbmm` call the same kernel per slice on CPU; checked by tests/test_stack.py, which
would catch a kernel that does not), or, where a stacked reduction rounds differently (a sum over
all of a member's entries, a matrix-vector product), a per-member loop over slices. What a member
is told (its k, its dead latents, its warm-up, its coefficient) is its own: nothing is reduced
across the stack.

Which members stack (`stack_key`): those of one mechanism among TopK (SAEs, transcoders, skip
transcoders), BatchTopK, ReLU-L1 and JumpReLU, of one shape, on the dense step, on CPU. Gated
SAEs (an encoder of their own), the sparse path, autocast steps and GPUs (where cuBLAS may pick another kernel for a batched GEMM than for the solo one, so the
rounding would differ: not yet checked) train alone, as before.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dictlearn.dictionaries.latents import DenseLatents, StepResult, TrainingStep, _tries_sparse_path
from dictlearn.dictionaries.batchtopk import BatchTopKSAE
from dictlearn.dictionaries.jumprelu import JumpReLUSAE
from dictlearn.dictionaries.relu_l1 import ReLUL1SAE
from dictlearn.dictionaries.topk import TopKSAE

#: mechanisms whose dense training step `stacked_training_losses` computes: those whose encoder is
#: the shared affine map (exact types: a subclass may change it)
STACKABLE = (TopKSAE, BatchTopKSAE, ReLUL1SAE, JumpReLUSAE)


def stack_key(dictionary, sparse_path: str) -> tuple | None:
    """Members with equal keys can train as one stack; None: this member trains alone."""
    if type(dictionary) not in STACKABLE or _tries_sparse_path(dictionary, sparse_path):
        return None
    if dictionary.device.type != "cpu":  # the per-slice rounding of batched GEMMs is checked on CPU only
        return None
    d = dictionary
    return (type(d), d.d_in, d.d_sae, d.d_out, d.apply_b_dec_to_input, d.skip_connection, d.W_enc.device,
            d.W_enc.dtype)


def stacks(keys: dict[str, tuple | None]) -> list[list[str]]:
    """Member names grouped by equal key, in the members' order; a None key is a group of one."""
    groups: dict[object, list[str]] = {}
    for name, key in keys.items():
        groups.setdefault(key if key is not None else ("alone", name), []).append(name)
    return list(groups.values())


class _StackedAffine(torch.autograd.Function):
    """π [m, batch, n] = (x − shift) W + b per member, forward taken from an already computed π,
    the backward of `dense_affine` per slice: the tied bias's gradient is −W ∂b, never the
    [batch, d_in] input gradient."""

    @staticmethod
    def forward(ctx, x_bar, shift, W, b, pre):
        ctx.save_for_backward(x_bar, W)
        ctx.has_shift = shift is not None
        return pre.view_as(pre)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x_bar, W = ctx.saved_tensors
        grad_W = torch.bmm(x_bar.transpose(1, 2), grad)
        column_grad = grad.sum(1)
        # a matrix-vector product per member: a batched one rounds differently from the solo `W @ v`
        grad_shift = torch.stack([-(w @ c) for w, c in zip(W, column_grad)]) if ctx.has_shift else None
        return None, grad_shift, grad_W, column_grad, None


def stacked_training_losses(members: list, xs: list[Tensor], ys: list[Tensor],
                            steps: list[TrainingStep]) -> list[StepResult]:
    """Each member's `training_losses(x, y, step)` on the dense path, as one computation.

    members: TopK dictionaries of one `stack_key`; xs[i]: [batch, d_in], ys[i]: [batch, d_out]
    (scaled, member i's) -> member i's StepResult, equal to its own dense step's."""
    first = members[0]
    W_enc = torch.stack([m.W_enc for m in members])  # [m, d_in, d_sae]
    b_enc = torch.stack([m.b_enc for m in members])
    W_dec = torch.stack([m.W_dec for m in members])  # [m, d_sae, d_out]
    b_dec = torch.stack([m.b_dec for m in members])
    x, y = torch.stack(xs), torch.stack(ys)
    shift = b_dec if first.apply_b_dec_to_input else None
    with torch.no_grad():
        x_bar = x if shift is None else x - shift[:, None, :]
        pre = torch.baddbmm(b_enc[:, None, :], x_bar, W_enc)
    pre = _StackedAffine.apply(x_bar, shift, W_enc, b_enc, pre)
    # each member's own selection and activation on its slice (unbind: one backward for all slices,
    # not a zero-filled [m, batch, d_sae] gradient per slice)
    pres = pre.unbind(0)
    z = torch.stack([m.activate(p, training=True) for m, p in zip(members, pres)])
    y_hat = torch.bmm(z, W_dec) + b_dec[:, None, :]
    if first.W_skip is not None:
        y_hat = y_hat + torch.bmm(x, torch.stack([m.W_skip for m in members]).transpose(1, 2))
    squared = (y - y_hat).pow(2)
    with torch.no_grad():
        centred = (y - y.mean(1, keepdim=True)).pow(2)
        magnitudes = z if first.nonnegative_latents else z.abs()
        fire_counts = (z != 0).sum(1, dtype=torch.int32)
        scales = W_dec.norm(dim=-1).clamp_min(1e-12) / torch.stack([m.target_scale for m in members])[:, None]
        column_sums = magnitudes.sum(1, dtype=torch.promote_types(z.dtype, torch.float32)) * scales
    results = []
    for i, (member, p, z_i, y_hat_i, squared_i) in enumerate(zip(members, pres, z.unbind(0), y_hat.unbind(0),
                                                                  squared.unbind(0))):
        # per member: a sum over all of a member's entries rounds differently when stacked
        if type(member).reconstruction_loss is TopKSAE.reconstruction_loss:  # the normalised MSE
            losses = {"reconstruction": squared_i.sum() / centred[i].sum().clamp_min(1e-12)}
        else:
            losses = {"reconstruction": member.reconstruction_loss(ys[i], y_hat_i)}
        losses.update(member.sparsity_losses(xs[i], ys[i], p.detach(), z_i, y_hat_i, DenseLatents(p), steps[i]))
        results.append(StepResult(y_hat_i, losses, fire_counts[i], column_sums[i].sum()))
    return results

