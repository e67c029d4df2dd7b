"""Sparse training paths (dictionaries/sparse.py): exact top-k selections, the sparse primitives
against float64 autograd, every mechanism's sparse step against its dense step (forward, each loss,
bookkeeping, every parameter gradient; SAE, transcoder and skip transcoder), an independent
float64 TopK + AuxK reference, the selection rule, and exact resume on the sparse path."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch

from conftest import assert_same_state, crash_and_resume, quiet_trainer
from dictlearn.dictionaries.latents import _tries_sparse_path
from dictlearn.dictionaries.model import TrainingStep
from dictlearn.training import DictionaryTraining, Member, TrainingConfig
from dictlearn.training.optimiser import fused_adam_possible
from dictlearn import ActivationDataModule
from dictlearn.dictionaries import BatchTopKSAE, GatedSAE, JumpReLUSAE, MatryoshkaBatchTopKSAE, ReLUL1SAE, TopKSAE
from dictlearn.dictionaries.sparse import (
    Support, _gathered_dot, _largest, _sampled_dot, dense_affine, flat_topk_indices, sparse_affine, sparse_decode,
    topk_indices,
)
from dictlearn.errors import ConfigError

D_IN, D_SAE, D_OUT, BATCH = 16, 64, 24, 48

MECHANISMS = {
    "topk": lambda **kw: TopKSAE(k=4, k_aux=6, **kw),
    "batchtopk": lambda **kw: BatchTopKSAE(k=4, k_aux=6, **kw),
    "matryoshka": lambda **kw: MatryoshkaBatchTopKSAE(k=4, k_aux=6, **kw),
    "relu_l1": lambda **kw: ReLUL1SAE(l1_coefficient=0.7, **kw),
    "relu_l1_unit_norm": lambda **kw: ReLUL1SAE(l1_coefficient=0.7, decoder_constraint="unit_norm", **kw),
    "gated": lambda **kw: GatedSAE(l1_coefficient=0.7, **kw),
    "gated_norm_weighted": lambda **kw: GatedSAE(l1_coefficient=0.7, decoder_constraint="norm_weighted_l1", **kw),
    "jumprelu": lambda **kw: JumpReLUSAE(l0_coefficient=0.3, bandwidth=0.4, threshold_init=0.6, **kw),
    "jumprelu_pre_act": lambda **kw: JumpReLUSAE(l0_coefficient=0.3, bandwidth=0.4, threshold_init=0.6,
                                                 pre_act_coefficient=0.2, **kw),
}
MODES = {
    "sae": dict(d_in=D_IN, d_sae=D_SAE),
    "transcoder": dict(d_in=D_IN, d_sae=D_SAE, d_out=D_OUT, transcoder=True),
    "skip_transcoder": dict(d_in=D_IN, d_sae=D_SAE, d_out=D_OUT, transcoder=True, skip_connection=True),
}


# ------------------------------------------------------------------ top-k selections
@pytest.mark.parametrize("n, k", [(512, 8), (512, 32), (4096, 32), (100, 7), (64, 40)])  # groups of 8, of 4, fallback
def test_topk_indices_select_the_k_largest_of_each_row(n, k):
    pre = torch.randn(300, n, generator=torch.Generator().manual_seed(n))
    got = topk_indices(pre, k).sort(-1).values
    assert torch.equal(got, pre.topk(k, dim=-1).indices.sort(-1).values)


@pytest.mark.parametrize("relu", [False, True])  # ReLU'd: most values tie at 0
def test_flat_topk_indices_select_the_k_largest_of_the_batch(relu):
    values = torch.randn(256, 512, generator=torch.Generator().manual_seed(1)) - 2.0
    values = values.relu() if relu else values
    k = 256 * 16
    got = flat_topk_indices(values, k)
    assert got.unique().numel() == k
    expected = values.flatten().topk(k).values.sort().values
    assert torch.equal(values.flatten()[got].sort().values, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_largest_selects_as_torch_topk_with_nan_as_largest(dtype):
    """The CPU row selection (numpy's introselect) picks torch.topk's set, NaN counted as largest."""
    pre = torch.randn(50, 40, generator=torch.Generator().manual_seed(3), dtype=dtype)
    pre[7, 5] = torch.nan
    got = _largest(pre, 6)
    assert got.dtype == torch.int64 and got.shape == (50, 6) and got.is_contiguous()
    assert torch.equal(got.sort(-1).values, pre.topk(6, dim=-1).indices.sort(-1).values)
    assert 5 in got[7].tolist()


@pytest.mark.parametrize("case", ["distinct", "ties"])
def test_largest_paths_pick_k_per_row(case):
    """Distinct values: each row's k-th value bounds its k largest (ascending columns); a tie at
    some row's k-th value (more than k at or above it) falls back to argpartition, still k."""
    pre = torch.randn(64, 128, generator=torch.Generator().manual_seed(5))
    if case == "ties":
        pre = pre.round(decimals=1)
    got = _largest(pre, 16)
    assert got.shape == (64, 16) and all(row.unique().numel() == 16 for row in got)
    assert torch.equal(pre.gather(1, got).sort(-1).values, pre.topk(16, dim=-1).values.sort(-1).values)
    assert torch.equal(got, got.sort(-1).values) == (case == "distinct")


@pytest.mark.parametrize("case", ["distinct", "ties", "sample_misses"])
def test_flat_topk_indices_paths_are_exact_and_ascending(case):
    """Every path of the batch-wide selection returns the k largest, ascending: the sampled bound
    (distinct values), ties at the k-th value, and a sample that sets the bound too high (its
    positions hold the largest values: the grouped fallback)."""
    values = torch.randn(64, 512, generator=torch.Generator().manual_seed(4))
    k = 64 * 8
    if case == "ties":
        values = values.round(decimals=1)
    if case == "sample_misses":
        k = len(values.flatten()) // 10
        values.view(-1)[::17] += 100.0  # the sampled positions: the bound lands among them, fewer than k above it
    got = flat_topk_indices(values, k)
    assert got.numel() == k and torch.equal(got, got.sort().values) and got.unique().numel() == k
    flat = values.flatten()
    expected = flat.topk(k).values.sort().values
    assert torch.equal(flat[got].sort().values, expected)


def test_support_groups_entries_by_row():
    support = Support.from_indices(torch.tensor([[5, 1], [0, 3]]), n_cols=6)
    assert support.rows.tolist() == [0, 0, 1, 1] and support.cols.tolist() == [5, 1, 0, 3]
    assert support.row_offsets.tolist() == [0, 2] and support.col_order.tolist() == [2, 1, 3, 0]
    assert support.col_offsets.tolist() == [0, 1, 2, 2, 3, 3]
    flat = Support.from_flat(torch.tensor([9, 1, 6]), n_rows=2, n_cols=6)
    assert flat.rows.tolist() == [0, 1, 1] and flat.cols.tolist() == [1, 0, 3]
    mask = Support.from_mask(torch.tensor([[False, True], [True, True]]))
    assert mask.rows.tolist() == [0, 1, 1] and mask.cols.tolist() == [1, 0, 1]
    assert mask.to_dense(torch.tensor([1.0, 2.0, 3.0])).tolist() == [[0.0, 1.0], [2.0, 3.0]]
    assert mask.fire_counts(torch.tensor([1.0, 0.0, 3.0])).tolist() == [0, 2]
    assert mask.fire_counts(torch.tensor([1.0, 0.0, 3.0])).dtype == torch.int32
    assert support.rows_by_col.tolist() == [1, 0, 1, 0] and support.flat.tolist() == [5, 1, 6, 9]


# ------------------------------------------------------------------ primitives vs float64 autograd
@pytest.mark.parametrize("shift, bias", [(True, True), (False, True), (True, False)])
def test_sparse_affine_and_decode_gradients_match_autograd(shift, bias):
    """Every input's gradient (x too) through gather → ReLU → decode, against dense autograd."""
    g = torch.Generator().manual_seed(0)
    f64 = dict(dtype=torch.float64)

    def leaf(*shape):
        return torch.randn(*shape, generator=g, **f64).requires_grad_()

    x, s, W, b, W_dec = leaf(BATCH, D_IN), leaf(D_IN), leaf(D_IN, D_SAE), leaf(D_SAE), leaf(D_SAE, D_OUT)
    s, b = (s if shift else None), (b if bias else None)
    grad_y = torch.randn(BATCH, D_OUT, generator=g, **f64)
    inputs = [t for t in (x, s, W, b, W_dec) if t is not None]

    pre = (x if s is None else x - s) @ W + (0 if b is None else b)
    indices = pre.topk(5, dim=-1).indices
    z = torch.zeros_like(pre).scatter(1, indices, pre.gather(1, indices).relu())
    expected = torch.autograd.grad(((z @ W_dec) * grad_y).sum(), inputs, retain_graph=True)

    support = Support.from_indices(indices, D_SAE)
    values = sparse_affine(x, s, W, b, pre.detach(), support).relu()
    y = sparse_decode(support, values, W_dec)
    torch.testing.assert_close(y, z @ W_dec, rtol=0, atol=1e-12)
    got = torch.autograd.grad((y * grad_y).sum(), inputs)
    for name, e, a in zip("x s W b W_dec".split(), expected, got):
        torch.testing.assert_close(a, e, rtol=0, atol=1e-12, msg=name)

    dense = dense_affine(x, s, W, b, pre.detach())
    got = torch.autograd.grad((dense * pre.detach()).sum(), inputs[:-1])
    for e, a in zip(torch.autograd.grad((pre * pre.detach()).sum(), inputs[:-1]), got):
        torch.testing.assert_close(a, e, rtol=1e-13, atol=1e-12)


def test_the_gather_fallback_of_the_sampled_product_matches_the_csr_kernel():
    """CUDA and half precision use plain gathers instead of the CPU CSR kernel."""
    g = torch.Generator().manual_seed(4)
    left, right = torch.randn(BATCH, D_OUT, generator=g), torch.randn(D_SAE, D_OUT, generator=g)
    support = Support.from_indices(torch.randn(BATCH, D_SAE, generator=g).topk(7, dim=-1).indices, D_SAE)
    expected = (left[support.rows] * right[support.cols]).sum(-1)
    torch.testing.assert_close(_sampled_dot(support, left, right), expected)
    torch.testing.assert_close(_gathered_dot(support, left, right), expected)
    low = _gathered_dot(support, left.bfloat16(), right.bfloat16())
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, expected, rtol=2e-2, atol=5e-2)


def test_low_precision_pre_activations_only_choose_the_support():
    """Under bf16 autocast π selects the entries; their values are recomputed in float32."""
    g = torch.Generator().manual_seed(3)
    x, s = torch.randn(BATCH, D_IN, generator=g), torch.randn(D_IN, generator=g)
    W, b = torch.randn(D_IN, D_SAE, generator=g), torch.randn(D_SAE, generator=g)
    exact = (x - s) @ W + b
    low = exact.bfloat16()
    support = Support.from_indices(topk_indices(low.float(), 5), D_SAE)
    values = sparse_affine(x, s, W, b, low, support)
    assert values.dtype == torch.float32
    expected = exact.flatten()[support.rows * D_SAE + support.cols]
    torch.testing.assert_close(values, expected, rtol=1e-5, atol=1e-5)
    assert (low.float().flatten()[support.rows * D_SAE + support.cols] - expected).abs().max() > 1e-3


# ------------------------------------------------------------------ sparse step == dense step
def _randomised(mechanism: str, mode: str, dtype: torch.dtype):
    """A model with every parameter random (biases, skip, r_mag, decoder norms != 1) and the
    first 20 latents dead, so AuxK runs; plus a batch (x, y) in training units."""
    torch.manual_seed(0)
    model = MECHANISMS[mechanism](**MODES[mode]).to(dtype)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.3 * torch.randn_like(param))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, D_IN, generator=g).to(dtype) * 2
    y = x if mode == "sae" else torch.randn(BATCH, D_OUT, generator=g).to(dtype) * 2
    return model, x, y


def _step(model, x, y, sparse: bool):
    """One training forward and backward on the sparse or the dense path, the first 20 latents dead."""
    step = TrainingStep(dead=torch.arange(model.d_sae, device=x.device) < 20, sparse_path="always" if sparse else "never")
    y_hat, losses, fire_counts, sum_abs = model.training_losses(x, y, step)
    sum(losses.values()).backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    return y_hat.detach(), {k: v.detach() for k, v in losses.items()}, fire_counts, sum_abs, grads, buffers


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("mechanism", list(MECHANISMS))
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-11), (torch.float32, 2e-5)])
def test_sparse_step_equals_dense_step(mechanism, mode, dtype, tol):
    model, x, y = _randomised(mechanism, mode, dtype)
    dense = _step(copy.deepcopy(model), x, y, sparse=False)
    sparse = _step(copy.deepcopy(model), x, y, sparse=True)
    assert dense[2].sum() > 0 and set(dense[1]) == set(sparse[1])
    if mechanism in ("topk", "batchtopk", "matryoshka"):
        assert "auxk" in dense[1]
    if mechanism == "jumprelu_pre_act":
        assert dense[1]["pre_act"] > 0
    if mechanism == "matryoshka":
        assert {"prefix_4", "prefix_8", "prefix_16", "prefix_32"} <= set(dense[1])
    assert_steps_agree(dense, sparse, tol)


def assert_steps_agree(dense: tuple, sparse: tuple, tol: float) -> None:
    """Two `_step` results agree: output, each loss, fire counts, L1 sum, every gradient (each one
    exercised) and buffer (BatchTopK's θ update included), to `tol` relative to each one's scale."""
    (y_d, loss_d, fire_d, abs_d, grad_d, buf_d), (y_s, loss_s, fire_s, abs_s, grad_s, buf_s) = dense, sparse
    torch.testing.assert_close(y_s, y_d, rtol=0, atol=tol * y_d.abs().max())
    for name in loss_d:
        torch.testing.assert_close(loss_s[name], loss_d[name], rtol=tol, atol=tol, msg=name)
    assert torch.equal(fire_s, fire_d)
    torch.testing.assert_close(abs_s, abs_d, rtol=tol, atol=0)
    assert set(grad_s) == set(grad_d)
    for name in grad_d:
        assert grad_d[name].abs().max() > 0, name
        assert grad_s[name].device == grad_d[name].device, name
        torch.testing.assert_close(grad_s[name], grad_d[name], rtol=0, atol=tol * grad_d[name].abs().max(), msg=name)
    for name in buf_d:
        torch.testing.assert_close(buf_s[name], buf_d[name], rtol=tol, atol=0, msg=name)


@pytest.mark.parametrize("mode", list(MODES))
def test_topk_sparse_step_matches_an_independent_float64_reference(mode):
    """TopK + AuxK written out here in float64: FVU + α · normalised MSE of the residual from the
    k_aux largest dead pre-activations; the sparse float32 step must agree."""
    model, x, y = _randomised("topk", mode, torch.float32)
    p = {name: t.detach().double().requires_grad_() for name, t in model.named_parameters()}
    xd, yd = x.double(), y.double()
    pre = (xd if model.transcoder else xd - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    top = pre.topk(4, dim=-1)
    z = torch.zeros_like(pre).scatter(1, top.indices, top.values.relu())
    y_hat = z @ p["W_dec"] + p["b_dec"] + (xd @ p["W_skip"].T if "W_skip" in p else 0)
    fvu = ((yd - y_hat) ** 2).sum() / ((yd - yd.mean(0)) ** 2).sum()
    residual = (yd - y_hat).detach()
    dead = torch.arange(D_SAE) < 20
    aux_top = pre.masked_fill(~dead, -torch.inf).topk(6, dim=-1)
    z_aux = torch.zeros_like(pre).scatter(1, aux_top.indices, aux_top.values.relu())
    auxk = ((residual - z_aux @ p["W_dec"]) ** 2).sum() / ((residual - residual.mean(0)) ** 2).sum() / 32
    expected = torch.autograd.grad(fvu + auxk, list(p.values()))

    _, losses, _, _, grads, _ = _step(model, x, y, sparse=True)
    assert losses["reconstruction"].item() == pytest.approx(fvu.item(), rel=1e-5)
    assert losses["auxk"].item() == pytest.approx(auxk.item(), rel=1e-5)
    for (name, _), e in zip(p.items(), expected):
        torch.testing.assert_close(grads[name].double(), e, rtol=0, atol=2e-5 * e.abs().max(), msg=name)


@pytest.mark.parametrize("mechanism", ["topk", "batchtopk", "matryoshka", "relu_l1", "gated", "jumprelu"])
def test_sparse_step_runs_under_bf16_autocast(mechanism):
    """bf16 only chooses the support: every loss term stays float32 (a vector `@` would not)."""
    model, x, y = _randomised(mechanism, "sae", torch.float32)
    reference = _step(copy.deepcopy(model), x, y, sparse=True)[1]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = _step(copy.deepcopy(model), x, y, sparse=True)[1]
    for name in reference:
        assert losses[name].dtype == torch.float32
        assert losses[name].item() == pytest.approx(reference[name].item(), rel=0.05), name


# ------------------------------------------------------------------ the selection rule
def test_auto_selects_the_sparse_path_for_small_fixed_l0_on_large_dictionaries():
    def tries(sparse_path="auto", **kwargs):
        return _tries_sparse_path(TopKSAE(d_in=8, **kwargs), sparse_path)

    cutoff = TopKSAE.sparse_cutoff
    assert tries(d_sae=4096, k=32)
    assert not tries(d_sae=4096, k=int(4096 * cutoff) + 1)
    assert not tries(d_sae=TopKSAE.sparse_min_latents // 2, k=1)  # small: dense is cheap
    narrow = TopKSAE.sparse_narrow_latents  # up to here the wider cutoff
    assert tries(d_sae=narrow, k=int(narrow * TopKSAE.sparse_cutoff_narrow))
    assert not tries(d_sae=narrow, k=int(narrow * TopKSAE.sparse_cutoff_narrow) + 1)
    assert not tries(d_sae=2 * narrow, k=int(2 * narrow * cutoff) + 1)
    assert not tries(d_sae=4096, k=32, sparse_path="never") and tries(d_sae=64, k=32, sparse_path="always")
    with pytest.raises(ConfigError, match=r"--training\.sparse_path"):
        DictionaryTraining(TopKSAE(d_in=8, d_sae=64), TrainingConfig(sparse_path="sometimes"))


def test_per_batch_mechanisms_choose_the_path_from_the_batch_density():
    model = ReLUL1SAE(d_in=8, d_sae=2048)
    assert _tries_sparse_path(model, "auto")

    def support(pre):
        return model.select(pre, training=True).support(16, 2048, model.sparse_cutoff)

    pre = torch.full((16, 2048), -1.0)
    pre[:, : int(2048 * model.sparse_cutoff)] = 1.0  # exactly at the cutoff: sparse
    assert support(pre).nnz == 16 * int(2048 * model.sparse_cutoff)
    pre[:, : int(2048 * model.sparse_cutoff) + 1] = 1.0
    assert support(pre) is None


# ------------------------------------------------------------------ training through Lightning
class _SawDead(L.Callback):
    """Records whether any latent was dead at the start of some step (so AuxK ran)."""

    seen = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen |= bool(pl_module.activity["model"].dead(pl_module.dead_windows["model"]).any())


def _make(mechanism, sparse_path="always") -> Member:
    kwargs = dict(d_in=16, d_sae=48)
    model = {"topk": lambda: TopKSAE(k=3, **kwargs), "jumprelu": lambda: JumpReLUSAE(threshold_init=0.3, **kwargs),
             "batchtopk": lambda: BatchTopKSAE(k=3, threshold_start_step=5, **kwargs)}[mechanism]()
    return Member(model, training=TrainingConfig(lr=3e-3, sparse_path=sparse_path, dead_window_tokens=256))


@pytest.mark.parametrize("mechanism", ["topk", "batchtopk", "jumprelu"])
def test_sparse_training_resumes_bit_identically(mechanism, small_file, tmp_path):
    saw_dead = _SawDead()
    reference, resumed, _ = crash_and_resume(lambda: _make(mechanism), small_file, tmp_path, steps=20,
                                             checkpoint_every=6, crash_at=9, resume_step=6, callbacks=[saw_dead])
    assert saw_dead.seen or mechanism != "topk"  # AuxK ran (TopK; BatchTopK fires every latent here)
    assert_same_state(reference, resumed)


def _fit(mechanism, small_file, sparse_path, steps=5):
    L.seed_everything(0)
    training = DictionaryTraining(_make(mechanism, sparse_path))
    quiet_trainer(max_steps=steps).fit(training, ActivationDataModule(small_file, batch_size=256, block_size=64))
    return training


def test_sparse_and_dense_training_agree_over_steps(small_file, tmp_path):
    sparse = _fit("topk", small_file, sparse_path="always")
    dense = _fit("topk", small_file, sparse_path="never")
    for (name, a), (_, b) in zip(sparse.state_dict().items(), dense.state_dict().items()):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
        else:
            assert torch.equal(a, b), name


class _GradNorm(L.Callback):
    """Records, after each step, the total norm of the gradients Adam used (clipped ones)."""

    def __init__(self):
        self.norms = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        grads = [p.grad.norm() for p in pl_module.parameters() if p.grad is not None]
        self.norms.append(torch.stack(grads).norm().item())


def test_bf16_mixed_training_clips_with_fused_adam(small_file):
    """Lightning refuses clipping with a fused optimizer under mixed precision; under bf16-mixed
    (no loss scaler) the module clips itself, so Adam stays fused and the norm is clipped."""
    L.seed_everything(0)
    model = TopKSAE(d_in=16, d_sae=48, k=3)
    norms = _GradNorm()
    trainer = quiet_trainer(max_steps=3, precision="bf16-mixed", gradient_clip_val=1e-3, callbacks=[norms])
    trainer.fit(DictionaryTraining(model, TrainingConfig(lr=3e-3, sparse_path="always")),
                ActivationDataModule(small_file, batch_size=256, block_size=64))
    assert trainer.global_step == 3
    assert fused_adam_possible(trainer.lightning_module.parameters(), str(trainer.precision))
    assert trainer.optimizers[0].defaults["fused"]
    assert max(norms.norms) <= 1e-3 * (1 + 1e-5)
    assert model.W_dec.dtype == torch.float32 and torch.isfinite(model.W_dec).all()
