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

The three-n check of `dictlearn compare --l0 scan` (analysis/indicated_l0.py) on the same seed-0
dictionaries: n = d_sae/8 lies below the true L0 and is left out; at d_sae/2 BatchTopK's curve is
lowest at the smallest k, so the check stays "unbracketed" where d_sae/4 reads the truth. And the
authors' own toy data rebuilt (`authors_rows`: 50 features in d = 100, firing correlated across
70 % of the pairs, true mean L0 10.95), BatchTopK at d_sae 50: d_sae/4 within ±25 % (11.3), and at
d_sae/2 a floor past the truth instead of a minimum (docs/metrics.md, "At three n"). JumpReLU on
the authors' data: d_sae/4 within ±25 % (12.2 at seed 0), no target trained dense (below, and
docs/metrics.md, "JumpReLU on ground truth").

Training: dictlearn's own TopKSAE / BatchTopKSAE / JumpReLUSAE and their training step
(`training_losses`, the decoder constraints; no AuxK is needed this early; JumpReLU's coefficient
steered by compare's `SparsityCalibration`) in a plain Adam loop, 1,000 steps of 256 rows
(300 were too few at true L0 16: FVU 0.22 at k = 16 and the proxy rising with k), b_dec at the data
mean, the LR decayed over the last 30 % — the LightningModule adds logging and schedules this test
does not need, at a cost the slow CI cannot spare for 28 dictionaries.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

from dictlearn import TopKSAE
from dictlearn.analysis.indicated_l0 import indicated, minimum
from dictlearn.data.synth import synthesize
from dictlearn.dictionaries.batchtopk import BatchTopKSAE
from dictlearn.dictionaries.jumprelu import JumpReLUSAE
from dictlearn.dictionaries.latents import TrainingStep
from dictlearn.metrics.decoder_projection import NthDecoderProjection
from dictlearn.training.calibration import SparsityCalibration, calibration_start
from dictlearn.training.initialise import scale_to_data

SETTING = dict(zipf_exponent=0.5, correlation=0.8, magnitude="lognormal")
WIDTHS = {6: dict(d=48, n_features=32), 16: dict(d=64, n_features=64)}  # true L0 -> data shape
GRID = {6: (3, 4, 5, 6, 8, 10, 12), 16: (8, 10, 13, 16, 20, 25, 32)}  # k, about x1.25 around the truth
ARCHITECTURES = {"topk": TopKSAE, "batchtopk": BatchTopKSAE, "jumprelu": JumpReLUSAE}
STEPS, BATCH, LR = 1000, 256, 3e-3


def orthogonal_rows(true_l0: float, seed: int = 0) -> torch.Tensor:
    """-> activations [68,192, d]: synth codes [rows, n_features] @ orthonormal directions [n_features, d]."""
    shape = WIDTHS[true_l0]
    codes = synthesize(68_192, mean_active=true_l0, seed=seed, return_codes=True, **shape, **SETTING).codes
    gaussian = torch.randn(shape["d"], shape["n_features"], generator=torch.Generator().manual_seed(seed),
                           dtype=torch.float64)
    directions = torch.linalg.qr(gaussian).Q.T  # [n_features, d], orthonormal rows
    return (torch.from_numpy(codes).double() @ directions).float()


AUTHORS = dict(d=100, n_features=50)  # the toy model of Chanin & Garriga-Alonso's reference code
AUTHORS_GRID = (5, 7, 9, 11, 14, 18, 22)  # k around its true mean L0, ratio ~1.27
AUTHORS_L0 = 0.345 * 49 / 2 + 0.05 * 50  # = sum of the firing probabilities, 10.9525 (magnitude 0: p < 1e-10)


def authors_correlation(generator: torch.Generator, n_features: int = 50) -> torch.Tensor:
    """-> [n_features, n_features]: their `generate_random_correlation_matrix` (sparsity 0.3,
    strengths 0.3-0.9, positive_ratio 0.5) rebuilt: 70 % of the pairs drawn, |r| uniform in
    [0.3, 0.9], the first half of them positive; eigenvalues clipped at 1e-6, unit diagonal again."""
    i, j = torch.triu_indices(n_features, n_features, 1)
    chosen = torch.randperm(len(i), generator=generator)[: len(i) - int(0.3 * len(i))]
    strength = 0.3 + 0.6 * torch.rand(len(chosen), generator=generator, dtype=torch.float64)
    sign = torch.where(torch.arange(len(chosen)) < len(chosen) // 2, 1.0, -1.0).double()
    matrix = torch.eye(n_features, dtype=torch.float64)
    matrix[i[chosen], j[chosen]] = matrix[j[chosen], i[chosen]] = sign * strength
    values, vectors = torch.linalg.eigh(matrix)
    matrix = vectors @ torch.diag(values.clamp(min=1e-6)) @ vectors.T
    scale = matrix.diagonal().sqrt()
    return matrix / scale[:, None] / scale[None, :]


def authors_rows(seed: int = 0, rows: int = 68_192) -> torch.Tensor:
    """-> activations [rows, 100]: 50 features firing with probabilities falling linearly from
    0.388 to 0.05 (true mean L0 10.95, sd 3.1), jointly through a thresholded Gaussian with
    `authors_correlation`, magnitudes relu(1 + 0.15 N(0, 1)), along orthonormal directions."""
    generator = torch.Generator().manual_seed(seed)
    n, d = AUTHORS["n_features"], AUTHORS["d"]
    p = 0.345 * (n - 1 - torch.arange(n, dtype=torch.float64)) / n + 0.05
    values, vectors = torch.linalg.eigh(authors_correlation(generator, n))
    root = vectors * values.clamp(min=0).sqrt()  # root @ root.T = the correlation matrix
    gaussian = torch.randn(rows, n, generator=generator, dtype=torch.float64) @ root.T
    fires = gaussian > torch.distributions.Normal(0.0, 1.0).icdf(1 - p)
    magnitude = (1 + 0.15 * torch.randn(rows, n, generator=generator, dtype=torch.float64)).relu()
    directions = torch.linalg.qr(torch.randn(d, n, generator=generator, dtype=torch.float64)).Q.T
    return ((fires * magnitude) @ directions).float()


class _Loop:
    """What `SparsityCalibration` reads of Lightning's trainer and module, for a plain loop of one
    member: the run's steps, the steps taken, the member and its last step's training L0."""

    world_size = 1

    def __init__(self, member):
        self.members, self.max_steps, self.global_step, self.last_step_l0 = {"member": member}, STEPS, 0, {}


def _initialised(architecture: str, k: int, data: torch.Tensor, d_sae: int, seed: int, generator):
    """-> the SAE at its data-dependent start. TopK / BatchTopK: raw units, b_dec at the data mean.
    JumpReLU as `dictlearn compare` starts it: its short-run arguments (`Mechanism.short_run`), data
    scaled to E‖x‖ = sqrt(d) (its ε and θ are in those units), b_dec 0 (its `b_dec_init`), the
    encoder scaled to the data, then every θ where L0 is 1.25 × k (training/calibration.py)."""
    if architecture == "jumprelu":
        model = JumpReLUSAE(d_in=data.shape[1], d_sae=d_sae, **JumpReLUSAE.mechanism.short_run)
    else:
        extra = {"threshold_start_step": STEPS // 5} if architecture == "batchtopk" else {}  # compare's short run
        model = ARCHITECTURES[architecture](d_in=data.shape[1], d_sae=d_sae, k=k, **extra)
    model.reset_parameters(seed)
    with torch.no_grad():
        sample = data[torch.randint(0, len(data), (4096,), generator=generator)]
        if architecture == "jumprelu":
            model.input_scale.fill_(data.shape[1] ** 0.5 / float(sample.norm(dim=1).mean()))
            model.target_scale.copy_(model.input_scale)
            sample = sample * model.input_scale
        else:
            model.b_dec.copy_(sample.mean(0))
        scale_to_data(model, sample, sample)
        if architecture == "jumprelu":
            model.start_at_l0(sample, calibration_start(model) * k)
    return model


def train(architecture: str, k: int, data: torch.Tensor, d_sae: int, seed: int = 0):
    """data: [rows, d] -> an SAE of d_sae latents: TopK or BatchTopK at k, or JumpReLU with its
    L0 coefficient steered towards an L0 of k by compare's controller (`SparsityCalibration`, from
    5 % to 80 % of the steps, then frozen); its measured L0 is not k."""
    generator = torch.Generator().manual_seed(seed)
    model = _initialised(architecture, k, data, d_sae, seed, generator)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8)
    loop, calibration = _Loop(model), None
    if architecture == "jumprelu":
        calibration = SparsityCalibration({"member": k})
        calibration.log_coefficient["member"] = math.log(model.l0_coefficient)  # compare's start, no warm-up
    for step in range(STEPS):
        x = data[torch.randint(0, len(data), (BATCH,), generator=generator)] * model.input_scale
        if calibration is not None:
            calibration.on_train_batch_start(loop, loop, None, step)
        # no latent is declared dead within 256,000 tokens (the 10M-token window): no AuxK term
        result = model.training_losses(x, x, TrainingStep(step=step))
        optimizer.zero_grad()
        sum(result.losses.values()).backward()
        model.constrain_gradient()
        optimizer.step()
        model.constrain_parameters()
        for group in optimizer.param_groups:  # constant, then linear decay to 0 over the last 30 %
            group["lr"] = LR * min(1.0, (STEPS - step) / (0.3 * STEPS))
        if calibration is not None:
            loop.global_step, loop.last_step_l0["member"] = step + 1, result.fire_counts.sum() / BATCH
            calibration.on_train_batch_end(loop, loop, None, None, step)
    return model.eval()


def _grid_and_width(true_l0: float | str) -> tuple[tuple[int, ...], int]:
    """-> (the k grid, d_sae = the number of true features) of a case."""
    if true_l0 == "authors":
        return AUTHORS_GRID, AUTHORS["n_features"]
    return GRID[true_l0], WIDTHS[true_l0]["n_features"]


def scan(architecture: str, true_l0: float, seed: int = 0) -> list[tuple[float, float, float, dict]]:
    """-> (measured L0, FVU, nth_decoder_projection, every proxy key) per k of the grid, on held-out
    rows; `seed` draws the data, the directions, the initialisation and the batches (the test runs
    0). `true_l0` "authors" is `authors_rows` on `AUTHORS_GRID`."""
    rows = authors_rows(seed) if true_l0 == "authors" else orthogonal_rows(true_l0, seed)
    data, held = rows[:60_000], rows[60_000:]  # the same true features for every k; the last rows held out
    grid, d_sae = _grid_and_width(true_l0)
    found = []
    for k in grid:
        model = train(architecture, k, data, d_sae, seed)
        with torch.no_grad():
            z = model.encode(held)
            error = (held - model.decode(z)).square().sum() / (held - held.mean(0)).square().sum()
            proxy = NthDecoderProjection(model.W_dec)
            proxy.update(held - model.decode(torch.zeros_like(z)))
        scores = proxy.compute()
        found.append((float((z != 0).float().sum(1).mean()), float(error), scores["nth_decoder_projection"], scores))
    return found


@functools.cache
def scanned(architecture: str, true_l0: float | str) -> tuple:
    """`scan` at seed 0, trained once per module run: the proxy test and the three-n test read the
    same dictionaries (the slow CI cannot afford training them twice)."""
    return tuple(scan(architecture, true_l0))


def three_n_record(architecture: str, true_l0: float | str) -> dict:
    """The scan's record (analysis/indicated_l0.indicated) of the seed-0 dictionaries, as
    `dictlearn compare --l0 scan` would write it into l0_scan.json."""
    grid, d_sae = _grid_and_width(true_l0)
    (record,) = indicated([{"architecture": architecture, "d_sae": d_sae, "l0_target": k, "seed": 0, "l0": l0, **scores}
                           for k, (l0, _, _, scores) in zip(grid, scanned(architecture, true_l0))])
    return record


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
    rows = scanned(architecture, true_l0)
    for (l0, fvu, proxy, _), k in zip(rows, GRID[true_l0]):
        print(f"{architecture} true L0 {true_l0}: k {k}, L0 {l0:.2f}, fvu {fvu:.4f}, nth_decoder_projection {proxy:.4f}")
    indicated, edge = minimum([r[0] for r in rows], [r[2] for r in rows])
    best_fvu_l0 = min(rows, key=lambda r: r[1])[0]
    print(f"{architecture} true L0 {true_l0}: indicated {indicated} ({edge}), best-FVU L0 {best_fvu_l0:.1f}")
    assert indicated is not None and abs(indicated - true_l0) <= 0.25 * true_l0
    # reconstruction keeps improving past the truth (for BatchTopK at 16, FVU is ~0.01 from the truth on
    # and its lowest point is noise: this holds on seeds 0 and 1, not 2; docs/metrics.md)
    assert best_fvu_l0 > 1.2 * true_l0


# n = d_sae/8 (4; 8) lies below the true L0 (6; 16): its n-th projection is an active latent's, the
# curve falls to the largest k, and the check leaves it out. At n = d_sae/2 BatchTopK's curve is
# lowest at the smallest k on seeds 0, 1, 2 (monotone, -0.024 to +0.008 at true L0 6), so on this
# pair-correlated data the check cannot agree where d_sae/4 reads the truth (docs/metrics.md, "At
# three n"); with one seed a bracketed pair can say no more than "one seed"
THREE_N = {(6, "topk"): "one seed", (6, "batchtopk"): "unbracketed", (16, "topk"): "one seed",
           (16, "batchtopk"): "unbracketed"}


@pytest.mark.slow
@pytest.mark.parametrize(("true_l0", "architecture"), list(THREE_N))
def test_the_three_n_check_leaves_out_n_below_the_true_l0(architecture, true_l0, one_thread):
    record = three_n_record(architecture, true_l0)  # the dictionaries of the test above
    eighth, quarter, half = record["by_n"]
    print(f"{architecture} true L0 {true_l0}: {record['n_agreement']}, "
          f"{[(r['n'], r['indicated_l0'], r['proxy_lowest_at'], r['left_out']) for r in record['by_n']]}")
    assert eighth["n"] < true_l0 and eighth["left_out"] and record["n_left_out"] == ["d_sae/8"]
    assert quarter["left_out"] is None and quarter["bracketed"]
    if architecture == "batchtopk":
        assert half["proxy_lowest_at"] == "smallest"
    assert record["n_agreement"] == THREE_N[(true_l0, architecture)]


@pytest.mark.slow
def test_on_the_authors_toy_data(one_thread):
    """BatchTopK on the toy data of the authors' code (true mean L0 10.95, firing correlated across
    70 % of the feature pairs): n = d_sae/4 = 12 reads the true L0 within ±25 % (11.30, 11.55, 11.38
    on seeds 0, 1, 2), n = d_sae/8 = 6 is left out, and at n = d_sae/2 = 25 the curve has no
    minimum to read past the truth — it falls to a floor near 0 there and stays, so which k is
    lowest is noise (seed 0: the largest; seeds 1, 2: 12.2, 12.0)."""
    record = three_n_record("batchtopk", "authors")
    eighth, quarter, half = record["by_n"]
    print(f"authors' data: {record['n_agreement']}, measured L0 {record['measured_l0']}, "
          f"{[(r['n'], r['indicated_l0'], r['proxy_lowest_at'], r['values']) for r in record['by_n']]}")
    assert eighth["left_out"] and quarter["left_out"] is None and half["left_out"] is None
    assert quarter["indicated_l0"] is not None and abs(quarter["indicated_l0"] - AUTHORS_L0) <= 0.25 * AUTHORS_L0
    below = [v for v, l0 in zip(half["values"], record["measured_l0"]) if l0 < 0.9 * AUTHORS_L0]
    above = [v for v, l0 in zip(half["values"], record["measured_l0"]) if l0 >= 0.9 * AUTHORS_L0]
    assert max(abs(v) for v in above) < 0.5 * min(below)  # the floor: below the truth hedging shows, above it not


# JumpReLU, trained towards each k of the grid by compare's controller, on seed 0 of the authors'
# data: the measured L0 stops following the target at the truth (targets 14, 18 and 22 land at
# 12.0, 11.8 and 13.3: the controller can only lower L0, and once the features are found nothing
# raises it). Target 22 trained dense (L0 49.9 of 50) while its start's θ was clamped at 0.001
# (1.25 x 22 is above d_sae/2, and log θ moves ~lr per step); with θ started no lower than 0.1 x
# the pre-activations' spread (JumpReLUSAE.start_at_l0) it lands at the pile, and the seed-0
# reading at d_sae/4 is 12.2 (it was 22.6, the parabola running from the pile toward the dense
# point); seeds 1, 2: 12.0, 10.3 (docs/metrics.md, "JumpReLU on ground truth")
@pytest.mark.slow
def test_jumprelu_on_the_authors_toy_data(one_thread):
    record = three_n_record("jumprelu", "authors")
    quarter = record["by_n"][1]
    print(f"JumpReLU, authors' data: measured L0 {[round(v, 2) for v in record['measured_l0']]}, "
          f"{[(r['n'], r['indicated_l0'], r['proxy_lowest_at']) for r in record['by_n']]}")
    assert quarter["indicated_l0"] is not None and abs(quarter["indicated_l0"] - AUTHORS_L0) <= 0.25 * AUTHORS_L0
    assert max(record["measured_l0"]) < AUTHORS["n_features"] / 2  # no target trained dense (22 did: L0 49.9 of 50)
