"""Ground truth for the L0 diagnostic: on synthetic data with a known mean active count and
correlated features, TopK and BatchTopK SAEs trained across k, read by `nth_decoder_projection`
(its default n = d_sae / 4) and the indicated-L0 rule (analysis/indicated_l0.py), against the true
mean L0 — and against "pick the best FVU", which keeps improving past it. Asserted within ±25 %:
BatchTopK at true L0 6 and 16, TopK at 16; TopK at 6 (+28 to +30 % on seeds 0, 1, 2) is an xfail:
for TopK the minimum marks TopK's own least-mixing k, above a widely spread true count. TopK at 16
passes at these 1,000 steps and on this grid only: after 2,000 steps its minimum on a grid of every
integer k is 22.4, 22.5, 17.0 (seeds 0, 1, 2). docs/metrics.md, "Which L0?", has the seeds, the
integer grid, other n and 2,000 steps.

Data, as in the toy model of Chanin & Garriga-Alonso 2025 (no superposition, orthogonal true
features): `dictlearn synth` codes (Zipf exponent 0.5, features firing in pairs with probability
0.8, log-normal magnitudes) written along orthonormal directions — 32 features in d = 48 at a true
mean L0 of 6, 64 features in d = 64 at 16; d_sae = the number of true features. With synth's own
random (non-orthogonal) directions at d ≈ n_features, the interference of the active features on
every other direction swamps the hedging the proxy reads: at true L0 16 the proxy still fell at
k = 32 (docs/metrics.md, "Which L0?", has the measurements).

Training: dictlearn's own TopKSAE / BatchTopKSAE and their training step (`training_losses`, the
decoder constraints; no AuxK is needed this early) in a plain Adam loop, 1,000 steps of 256 rows
(300 were too few at true L0 16: FVU 0.22 at k = 16 and the proxy rising with k), b_dec at the data
mean, the LR decayed over the last 30 % — the LightningModule adds logging and schedules this test
does not need, at a cost the slow CI cannot spare for 28 dictionaries.
"""

from __future__ import annotations

import pytest
import torch

from dictlearn import TopKSAE
from dictlearn.analysis.indicated_l0 import minimum
from dictlearn.data.synth import synthesize
from dictlearn.dictionaries.batchtopk import BatchTopKSAE
from dictlearn.dictionaries.latents import TrainingStep
from dictlearn.metrics.decoder_projection import NthDecoderProjection
from dictlearn.training.initialise import scale_to_data

SETTING = dict(zipf_exponent=0.5, correlation=0.8, magnitude="lognormal")
WIDTHS = {6: dict(d=48, n_features=32), 16: dict(d=64, n_features=64)}  # true L0 -> data shape
GRID = {6: (3, 4, 5, 6, 8, 10, 12), 16: (8, 10, 13, 16, 20, 25, 32)}  # k, about x1.25 around the truth
ARCHITECTURES = {"topk": TopKSAE, "batchtopk": BatchTopKSAE}
STEPS, BATCH, LR = 1000, 256, 3e-3


def orthogonal_rows(true_l0: float, seed: int = 0) -> torch.Tensor:
    """-> activations [68,192, d]: synth codes [rows, n_features] @ orthonormal directions [n_features, d]."""
    shape = WIDTHS[true_l0]
    codes = synthesize(68_192, mean_active=true_l0, seed=seed, return_codes=True, **shape, **SETTING).codes
    gaussian = torch.randn(shape["d"], shape["n_features"], generator=torch.Generator().manual_seed(seed),
                           dtype=torch.float64)
    directions = torch.linalg.qr(gaussian).Q.T  # [n_features, d], orthonormal rows
    return (torch.from_numpy(codes).double() @ directions).float()


def train(architecture: str, k: int, data: torch.Tensor, d_sae: int, seed: int = 0):
    """data: [rows, d] -> a TopK or BatchTopK SAE of d_sae latents."""
    extra = {"threshold_start_step": STEPS // 5} if architecture == "batchtopk" else {}  # compare's short run
    model = ARCHITECTURES[architecture](d_in=data.shape[1], d_sae=d_sae, k=k, **extra)
    model.reset_parameters(seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sample = data[torch.randint(0, len(data), (4096,), generator=generator)]
        model.b_dec.copy_(sample.mean(0))
        scale_to_data(model, sample, sample)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8)
    for step in range(STEPS):
        x = data[torch.randint(0, len(data), (BATCH,), generator=generator)]
        # no latent is declared dead within 256,000 tokens (the 10M-token window): no AuxK term
        result = model.training_losses(x, x, TrainingStep(step=step))
        optimizer.zero_grad()
        sum(result.losses.values()).backward()
        model.constrain_gradient()
        optimizer.step()
        model.constrain_parameters()
        for group in optimizer.param_groups:  # constant, then linear decay to 0 over the last 30 %
            group["lr"] = LR * min(1.0, (STEPS - step) / (0.3 * STEPS))
    return model.eval()


def scan(architecture: str, true_l0: float, seed: int = 0) -> list[tuple[float, float, float]]:
    """-> (measured L0, FVU, nth_decoder_projection) per k of the grid, on held-out rows; `seed`
    draws the data, the directions, the initialisation and the batches (the test runs 0)."""
    rows = orthogonal_rows(true_l0, seed)
    data, held = rows[:60_000], rows[60_000:]  # the same true features for every k; the last rows held out
    found = []
    for k in GRID[true_l0]:
        model = train(architecture, k, data, WIDTHS[true_l0]["n_features"], seed)
        with torch.no_grad():
            z = model.encode(held)
            error = (held - model.decode(z)).square().sum() / (held - held.mean(0)).square().sum()
            proxy = NthDecoderProjection(model.W_dec)
            proxy.update(held - model.decode(torch.zeros_like(z)))
        found.append((float((z != 0).float().sum(1).mean()), float(error), proxy.compute()["nth_decoder_projection"]))
    return found


# TopK fires exactly k latents per row while the true count varies (sd 2.8 at mean 6, 40 % of rows
# above 6): its proxy minimum reads 7.70, 7.78, 7.71 on seeds 0, 1, 2 (+28 to +30 %), 8.0-8.6 on a
# grid of every integer k, ~10 after 2,000 steps; BatchTopK lands on the mean (docs/metrics.md)
TOPK_AT_6 = pytest.mark.xfail(strict=False, reason="TopK's minimum lies above a widely spread true L0 (docs/metrics.md)")
CASES = [pytest.param(6, "topk", marks=TOPK_AT_6), (6, "batchtopk"), (16, "topk"), (16, "batchtopk")]


@pytest.fixture
def one_thread():
    """[256, 64] matrices: a second intra-op thread only adds synchronisation (and on a loaded CPU
    multiplies the time); the documented numbers were measured with one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.parametrize(("true_l0", "architecture"), CASES)
def test_the_proxy_points_at_the_true_l0_and_fvu_does_not(architecture, true_l0, one_thread):
    rows = scan(architecture, true_l0)
    for (l0, fvu, proxy), k in zip(rows, GRID[true_l0]):
        print(f"{architecture} true L0 {true_l0}: k {k}, L0 {l0:.2f}, fvu {fvu:.4f}, nth_decoder_projection {proxy:.4f}")
    indicated, edge = minimum([r[0] for r in rows], [r[2] for r in rows])
    best_fvu_l0 = min(rows, key=lambda r: r[1])[0]
    print(f"{architecture} true L0 {true_l0}: indicated {indicated} ({edge}), best-FVU L0 {best_fvu_l0:.1f}")
    assert indicated is not None and abs(indicated - true_l0) <= 0.25 * true_l0
    # reconstruction keeps improving past the truth (for BatchTopK at 16, FVU is ~0.01 from the truth on
    # and its lowest point is noise: this holds on seeds 0 and 1, not 2; docs/metrics.md)
    assert best_fvu_l0 > 1.2 * true_l0
