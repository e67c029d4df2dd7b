"""Metrics against float64 numpy references written from the docs/metrics.md formulas, closed forms and DDP."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dictlearn.metrics import (
    METRIC_NAMES,
    ReconstructionMetrics,
    SparsityMetrics,
    max_cosine,
    mmcs,
    recovered_fraction,
)
from dictlearn.metrics.reconstruction import TargetStatistics


def reference_reconstruction(y: np.ndarray, y_hat: np.ndarray) -> dict[str, float]:
    """y, y_hat: [N, d] float64, all tokens at once."""
    err = ((y - y_hat) ** 2).sum()
    fvu = err / ((y - y.mean(axis=0)) ** 2).sum()
    y_norm, y_hat_norm = np.linalg.norm(y, axis=1), np.linalg.norm(y_hat, axis=1)
    dot = (y * y_hat).sum(axis=1)
    return {
        "mse": err / len(y),
        "fvu": fvu,
        "explained_variance": 1 - fvu,
        "cos_sim": np.mean(dot / (y_norm * y_hat_norm)),
        "l2_ratio": np.mean(y_hat_norm / y_norm),
        "rel_reconstruction_bias": (y_hat_norm**2).sum() / dot.sum(),
    }


def reference_sparsity(z: np.ndarray, dense_threshold: float) -> dict[str, float]:
    """z: [N, d_sae] float64."""
    density = (z != 0).mean(axis=0)
    return {
        "l0": (z != 0).sum(axis=1).mean(),
        "l1": np.abs(z).sum(axis=1).mean(),
        "dead_fraction": np.mean(density == 0),
        "dense_fraction": np.mean(density > dense_threshold),
    }


def feed(metric, chunks, *tensors):
    start = 0
    for size in chunks:
        metric.update(*(t[start : start + size] for t in tensors))
        start += size
    assert start == len(tensors[0])
    return {k: v.item() for k, v in metric.compute().items()}


def test_metric_names_cover_compute_keys():
    metric, sparsity = ReconstructionMetrics(), SparsityMetrics(4)
    metric.update(torch.randn(5, 3), torch.randn(5, 3))
    sparsity.update(torch.randn(5, 4))
    keys = set(metric.compute()) | set(sparsity.compute()) | {"mmcs"}
    assert keys <= set(METRIC_NAMES)
    assert {"ce_loss_recovered", "kl_div", "delta_ce", "probe_auc_k16", "concept_coverage"} <= set(METRIC_NAMES)
    assert len(set(METRIC_NAMES)) == len(METRIC_NAMES)


# Per-token reductions run in the inputs' precision, totals in float64: float64 inputs match the
# float64 reference to 1e-10, float32 inputs to float32's per-token rounding.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-6}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("d_known", [True, False])
def test_reconstruction_streamed_equals_reference_on_all_rows(d_known, dtype):
    g = torch.Generator().manual_seed(0)
    # Non-zero mean (3 per dim vs unit spread), token norms and shrinkage that vary together, and
    # an error scale that varies 100x: the uncentred FVU and per-token-ratio means (of FVU and of
    # gamma) all differ from the centred ratios of totals.
    y = (torch.randn(140, 8, generator=g) + 3.0) * torch.logspace(-0.5, 0.5, 140).unsqueeze(1)
    shrink = torch.linspace(0.5, 1.0, 140).unsqueeze(1)
    y_hat = shrink * y + 0.1 * torch.logspace(-1, 1, 140).unsqueeze(1) * torch.randn(140, 8, generator=g)
    y, y_hat = y.to(dtype), y_hat.to(dtype)
    metric = ReconstructionMetrics(d=8 if d_known else None)
    got = feed(metric, [7, 100, 33], y, y_hat)
    yr, yhr = y.double().numpy(), y_hat.double().numpy()
    want = reference_reconstruction(yr, yhr)
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=TOLERANCE[dtype], abs=1e-12), key
    assert metric.n_tokens.item() == 140 and metric.n_tokens.dtype == torch.int64
    # The data discriminates the known pitfalls (docs/metrics.md#fvu): variance about zero, per-token ratios.
    err = ((yr - yhr) ** 2).sum(axis=1)
    uncentred = err.sum() / (yr**2).sum()
    per_token = np.mean(err / ((yr - yr.mean(0)) ** 2).sum(axis=1))
    assert abs(uncentred / want["fvu"] - 1) > 0.5
    assert abs(per_token / want["fvu"] - 1) > 0.2
    per_token_gamma = np.mean((yhr**2).sum(1) / (yr * yhr).sum(1))
    assert abs(per_token_gamma - want["rel_reconstruction_bias"]) > 0.02


def test_reconstruction_leading_dims_are_tokens():
    y = torch.randn(3, 5, 4) + 1.0
    y_hat = y + 0.2 * torch.randn(3, 5, 4)
    got = feed(ReconstructionMetrics(), [1, 2], y, y_hat)
    want = reference_reconstruction(y.reshape(15, 4).double().numpy(), y_hat.reshape(15, 4).double().numpy())
    assert got == pytest.approx(want, rel=TOLERANCE[torch.float32])


def test_shrunk_reconstruction_closed_form():
    y = torch.randn(50, 6) + 0.5
    got = feed(ReconstructionMetrics(d=6), [20, 30], y, 0.8 * y)
    assert got["rel_reconstruction_bias"] == pytest.approx(0.8, rel=1e-7)
    assert got["l2_ratio"] == pytest.approx(0.8, rel=1e-7)
    assert got["cos_sim"] == pytest.approx(1.0, rel=1e-7)


def test_zero_norm_tokens_are_guarded():
    y = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    got = feed(ReconstructionMetrics(), [2], y, torch.tensor([[0.0, 0.0], [0.0, 0.0]]))
    assert got["cos_sim"] == 0.0 and got["l2_ratio"] == 0.0


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="differ in shape"):
        ReconstructionMetrics().update(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="width 4"):
        ReconstructionMetrics(d=3).update(torch.zeros(2, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="width 5"):
        SparsityMetrics(4).update(torch.zeros(2, 5))


def test_float64_states_survive_dtype_cast_and_forward_keeps_no_graph():
    metric, sparsity = ReconstructionMetrics(d=3), SparsityMetrics(3)
    metric.to(torch.bfloat16)  # what Lightning's bf16-true precision does to the whole module
    sparsity.to(torch.bfloat16)
    assert metric.sum_sq_error.dtype == torch.float64 and metric.sum_target.dtype == torch.float64
    assert sparsity.sum_abs.dtype == torch.float64 and sparsity.fire_counts.dtype == torch.int64
    y_hat = torch.randn(4, 3, requires_grad=True)
    metric(torch.randn(4, 3), y_hat)
    sparsity(torch.relu(y_hat))
    assert metric.sum_sq_error.grad_fn is None and sparsity.sum_abs.grad_fn is None


def sparse_latents(n: int, d_sae: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.relu(torch.randn(n, d_sae, generator=g) - 1.0)
    z[:, 0] = 0.0  # dead
    z[:, 1] = 0.0
    z[5, 1] = -0.7  # fires once, inside the first chunk only, and negative: != 0 counts
    z[:, 2] = torch.rand(n, generator=g) + 0.01  # always fires: dense
    return z


def test_sparsity_streamed_equals_reference():
    n, d_sae = 997, 64  # prime n keeps log10 densities off the histogram edges
    z = sparse_latents(n, d_sae)
    metric = SparsityMetrics(d_sae, dense_threshold=0.1)
    got = feed(metric, [7, 900, 90], z)
    zr = z.double().numpy()
    want = reference_sparsity(zr, 0.1)
    assert got["l0"] == want["l0"]
    assert got["l1"] == pytest.approx(want["l1"], rel=1e-6)  # rows summed in float32 (by design)
    assert got["dead_fraction"] == want["dead_fraction"] == 1 / 64  # latent 1 fired once: alive
    assert got["dense_fraction"] == want["dense_fraction"]
    density = (zr != 0).mean(axis=0)
    np.testing.assert_allclose(metric.feature_density().numpy(), density, rtol=1e-15)
    counts, edges = metric.log10_density_histogram(bins=50)
    ref_edges = np.linspace(-10.0, 0.0, 51)
    ref_counts, _ = np.histogram(np.clip(np.log10(density + 1e-10), -10.0, 0.0), bins=ref_edges)
    np.testing.assert_allclose(edges.numpy(), ref_edges, rtol=1e-12)
    assert counts.dtype == torch.int64 and counts.tolist() == ref_counts.tolist()
    assert counts[0] == 1 and counts.sum() == d_sae


def test_sparsity_leading_dims_and_dense_threshold():
    z = sparse_latents(120, 16, seed=1).reshape(4, 30, 16)
    zr = z.reshape(120, 16).double().numpy()
    for threshold in (0.01, 0.3):
        got = feed(SparsityMetrics(16, dense_threshold=threshold), [1, 3], z)
        want = reference_sparsity(zr, threshold)
        assert got == pytest.approx(want, rel=1e-6)


def test_counts_are_int64_past_float32_range():
    metric = SparsityMetrics(1)
    n = 2**24 + 1  # float32 counters saturate here: 2**24 + 1 == 2**24 in float32
    metric.update(torch.ones(1, 1).expand(n, 1))
    metric.update(torch.ones(1, 1))
    assert metric.n_tokens.dtype == metric.fire_counts.dtype == torch.int64
    assert metric.n_tokens.item() == metric.fire_counts.item() == n + 1
    assert metric.compute()["l0"].item() == 1.0
    assert metric.compute()["l1"].item() == 1.0


def test_state_dict_continues_the_window():
    z = sparse_latents(300, 32, seed=2)
    first = SparsityMetrics(32)
    first.update(z[:100])
    state = first.state_dict()
    assert {"fire_counts", "n_tokens", "sum_abs"} <= set(state)
    resumed = SparsityMetrics(32)
    resumed.load_state_dict(state)
    resumed.update(z[100:])
    got = {k: v.item() for k, v in resumed.compute().items()}
    assert got == pytest.approx(reference_sparsity(z.double().numpy(), 0.1), rel=1e-6)
    assert resumed.n_tokens.item() == 300


def test_mmcs_permuted_rescaled_copy_is_one():
    g = torch.Generator().manual_seed(3)
    features = torch.randn(40, 16, generator=g)
    learned = features[torch.randperm(40, generator=g)] * (torch.rand(40, 1, generator=g) * 5 + 0.1)
    learned = torch.cat([learned, torch.randn(25, 16, generator=g)])  # extra learned rows do not matter
    assert mmcs(features, learned) == pytest.approx(1.0, abs=1e-6)
    assert recovered_fraction(features, learned, threshold=0.99) == 1.0


def test_mmcs_closed_form_and_chunking():
    # True features e_0..e_4 in R^8; learned row k = cos(t_k) e_k + sin(t_k) e_7 has cosine cos(t_k)
    # with e_k and 0 with every other e_j; a row -e_0 checks the match is signed, not |cos|.
    angles = torch.tensor([0.0, 0.3, 0.6, 1.0, 1.4], dtype=torch.float64)
    true = torch.eye(8, dtype=torch.float64)[:5]
    learned = torch.zeros(6, 8, dtype=torch.float64)
    learned[torch.arange(5), torch.arange(5)] = torch.cos(angles)
    learned[:5, 7] = torch.sin(angles)
    learned[5, 0] = -1.0
    assert mmcs(true, learned) == pytest.approx(torch.cos(angles).mean().item(), rel=1e-12)
    np.testing.assert_allclose(max_cosine(true, learned, chunk=2).numpy(), torch.cos(angles).numpy(), rtol=1e-12)
    assert recovered_fraction(true, learned, threshold=0.9) == pytest.approx(2 / 5)  # cos 1, 0.955


def test_max_cosine_chunked_equals_unchunked():
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(37, 12, generator=g), torch.randn(53, 12, generator=g)
    full = max_cosine(a, b, chunk=1000)
    an = a.double() / a.double().norm(dim=1, keepdim=True)
    bn = b.double() / b.double().norm(dim=1, keepdim=True)
    np.testing.assert_allclose(full.numpy(), (an @ bn.T).max(dim=1).values.numpy(), rtol=1e-6)
    for chunk in (1, 5, 16):
        # float32 block products round differently, so equal only to float32 precision
        torch.testing.assert_close(max_cosine(a, b, chunk=chunk), full, rtol=1e-6, atol=1e-7)


def test_ddp_matches_single_process(tmp_path):
    script = Path(__file__).with_name("ddp_metrics_script.py")
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], timeout=120, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads((tmp_path / "results.json").read_text())
    data = torch.load(tmp_path / "data.pt")
    y, y_hat = data["target"].double().numpy(), data["reconstruction"].double().numpy()
    z = data["latents"].double().numpy()
    n = len(z)
    assert got["n_tokens_global"] == n and got["n_tokens_local"] == got["recon_n_tokens_local"] < n
    for key, value in reference_reconstruction(y, y_hat).items():
        assert got[key] == pytest.approx(value, rel=TOLERANCE[data["target"].dtype]), key
    want = reference_sparsity(z, 0.1)
    assert got["l0"] == want["l0"] and got["l1"] == pytest.approx(want["l1"], rel=1e-6)
    assert got["dead_fraction"] == want["dead_fraction"] == 0.1  # latent 3 fired only on rank 1
    assert got["dense_fraction"] == want["dense_fraction"]
    density = (z != 0).mean(axis=0)
    np.testing.assert_allclose(got["feature_density"], density, rtol=1e-15)
    ref_counts, _ = np.histogram(np.clip(np.log10(density + 1e-10), -10, 0), bins=np.linspace(-10, 0, 21))
    assert got["histogram_counts"] == ref_counts.tolist()


def test_zero_targets_are_left_out_of_per_token_ratios():
    """A zero target row (nothing active) has no cosine or norm ratio; it must not count as 0 or 1e8."""
    torch.manual_seed(5)
    y = torch.randn(40, 6, dtype=torch.float64)
    y[::4] = 0.0
    y_hat = y * 0.5 + 0.1 * torch.randn_like(y)
    metric = ReconstructionMetrics(6)
    metric.update(y.float(), y_hat.float())
    out = metric.compute()
    keep = y.norm(dim=1) > 0
    cos = torch.nn.functional.cosine_similarity(y[keep], y_hat[keep], dim=1).mean()
    ratio = (y_hat[keep].norm(dim=1) / y[keep].norm(dim=1)).mean()
    assert out["cos_sim"].item() == pytest.approx(cos.item(), rel=1e-6)
    assert out["l2_ratio"].item() == pytest.approx(ratio.item(), rel=1e-6)
    assert out["mse"].item() == pytest.approx((y - y_hat).pow(2).sum(1).mean().item(), rel=1e-6)


@pytest.mark.parametrize("zero_rows", [False, True])
def test_shared_target_statistics_give_the_same_states(zero_rows):
    """A sweep computes one `TargetStatistics` per batch for every member reading that target: each
    member's states must be those it gets alone (bit for bit), with and without zero target rows
    (which the per-token ratios compact away); statistics of another tensor are not used."""
    torch.manual_seed(6)
    y = torch.randn(64, 6)
    if zero_rows:
        y[::5] = 0.0
    shared = TargetStatistics(y)
    alone, together = [ReconstructionMetrics(6) for _ in range(3)], [ReconstructionMetrics(6) for _ in range(3)]
    for step in range(2):
        for a, b in zip(alone, together):
            y_hat = y * 0.7 + 0.1 * torch.randn_like(y)
            a.update(y, y_hat)
            b.update(y, y_hat, shared)
    stale = ReconstructionMetrics(6)
    stale.update(y.clone(), y * 0.5, TargetStatistics(torch.zeros_like(y)))  # not this target's: recomputed
    reference = ReconstructionMetrics(6)
    reference.update(y.clone(), y * 0.5)
    for a, b in [*zip(alone, together), (reference, stale)]:
        assert a.update_count == b.update_count
        for state in a._defaults:
            assert torch.equal(getattr(a, state), getattr(b, state)), state


def test_sparsity_statistics_count_what_count_nonzero_counts():
    """Fire counts per latent: negative values, NaN and inf fire, −0.0 does not; int64 like
    `torch.count_nonzero`, over any leading dims."""
    z = torch.randn(3, 50, 24).relu_() * (torch.rand(3, 50, 24) < 0.2)
    z[0, 0, :4] = torch.tensor([-1.5, float("nan"), float("inf"), -0.0])
    stats = SparsityMetrics.statistics(z)
    assert stats["fire_counts"].dtype == torch.int64 and stats["n_tokens"] == 150
    assert torch.equal(stats["fire_counts"], torch.count_nonzero(z.reshape(-1, 24), dim=0))
    assert stats["fire_counts"][3] == torch.count_nonzero(z[..., 3])  # −0.0 is zero
