"""The L0 diagnostic (dictlearn/metrics/decoder_projection.py) against float64 references written
here from the definition: the (n·B)-th largest projection (counting from 0) of B rows onto unit
decoder rows (Chanin & Garriga-Alonso 2025; the authors' `nth_decoder_projection`), and the mean
|cos| over pairs of decoder rows."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from dictlearn.metrics.decoder_projection import (NthDecoderProjection, decoder_pairwise_cosine, default_n,
                                                  nth_projection, nth_projections)


def _reference(residual: np.ndarray, W_dec: np.ndarray, n: int) -> float:
    unit = W_dec / np.sqrt((W_dec**2).sum(1, keepdims=True))
    projections = sorted((residual @ unit.T).ravel().tolist(), reverse=True)
    return projections[n * len(residual)]


def test_nth_projection_is_the_nth_largest_per_row_on_average():
    rng = np.random.default_rng(0)
    W_dec = rng.normal(size=(6, 4)) * rng.uniform(0.2, 3.0, size=(6, 1))  # row norms must not matter
    residual = rng.normal(size=(5, 4))
    for n in range(6):
        got = nth_projection(torch.from_numpy(residual), torch.nn.functional.normalize(torch.from_numpy(W_dec), dim=-1), n)
        assert got == pytest.approx(_reference(residual, W_dec, n), abs=1e-6), n
    # n = 0 is the largest projection of all; n = d_sae - 1 the B-th largest (the smallest with B = 1)
    one = residual[:1]
    unit = W_dec / np.linalg.norm(W_dec, axis=1, keepdims=True)
    assert _reference(one, W_dec, 5) == pytest.approx((one @ unit.T).min())


def test_blocks_are_averaged_by_their_rows():
    rng = np.random.default_rng(1)
    W_dec = rng.normal(size=(8, 3)) * rng.uniform(0.2, 3.0, size=(8, 1))  # the metric must normalise the rows
    residual = rng.normal(size=(11, 3))
    metric = NthDecoderProjection(torch.from_numpy(W_dec), n=3, block_rows=4)
    metric.update(torch.from_numpy(residual[:7]))  # blocks restart in each update: 4 + 3, then 4
    metric.update(torch.from_numpy(residual[7:]))
    blocks = [residual[:4], residual[4:7], residual[7:]]

    def expected(decoder: np.ndarray, n: int) -> float:
        return sum(_reference(b, decoder, n) * len(b) for b in blocks) / 11

    result = metric.compute()
    assert result["nth_decoder_projection"] == pytest.approx(expected(W_dec, 3), abs=1e-6)
    assert result["nth_decoder_projection_n"] == 3
    # the data are such that each mistake the metric could make gives another number: this test
    # catches n off by one, raw (unnormalised) rows, columns normalised instead of rows, and a
    # plain mean over blocks instead of one weighted by their rows
    unit_columns = W_dec / np.linalg.norm(W_dec, axis=0, keepdims=True)
    wrong = {"n - 1": expected(W_dec, 2), "n + 1": expected(W_dec, 4),
             "raw rows": sum(_raw(b, W_dec, 3) * len(b) for b in blocks) / 11,
             "unit columns": sum(_raw(b, unit_columns, 3) * len(b) for b in blocks) / 11,
             "unweighted blocks": sum(_reference(b, W_dec, 3) for b in blocks) / 3}
    for mistake, value in wrong.items():
        assert abs(value - result["nth_decoder_projection"]) > 1e-3, mistake


def test_three_n_from_one_pass_match_each_alone():
    """The default metric reads n = d_sae/4 (unchanged key) and d_sae/8, d_sae/2 from the same
    projections: each against the float64 reference, blocks weighted by rows as above."""
    rng = np.random.default_rng(3)
    W_dec = rng.normal(size=(16, 5)) * rng.uniform(0.2, 3.0, size=(16, 1))
    residual = rng.normal(size=(13, 5))
    metric = NthDecoderProjection(torch.from_numpy(W_dec), block_rows=5)
    metric.update(torch.from_numpy(residual))
    result = metric.compute()
    blocks = [residual[:5], residual[5:10], residual[10:]]
    for key, n in (("nth_decoder_projection_eighth", 2), ("nth_decoder_projection", 4),
                   ("nth_decoder_projection_half", 8)):
        expected = sum(_reference(b, W_dec, n) * len(b) for b in blocks) / 13
        assert result[key] == pytest.approx(expected, abs=1e-6), key
    assert result["nth_decoder_projection_n"] == 4
    assert len({result[k] for k in ("nth_decoder_projection_eighth", "nth_decoder_projection",
                                    "nth_decoder_projection_half")}) == 3  # three different numbers
    unit = torch.nn.functional.normalize(torch.from_numpy(W_dec), dim=-1)
    block = torch.from_numpy(residual[:5])
    assert nth_projections(block, unit, [8, 2, 4, 2]) == [nth_projection(block, unit, n) for n in (8, 2, 4, 2)]
    # a chosen n is read alone: the fractions are relative to the default
    assert set(NthDecoderProjection(torch.from_numpy(W_dec), n=3).compute()) == {"nth_decoder_projection",
                                                                                 "nth_decoder_projection_n"}


def _raw(residual: np.ndarray, W_dec: np.ndarray, n: int) -> float:
    """The same order statistic on the rows as given (no normalisation)."""
    return sorted((residual @ W_dec.T).ravel().tolist(), reverse=True)[n * len(residual)]


def test_default_n_and_its_bounds():
    assert default_n(32768) == 8192 and default_n(512) == 128 and default_n(2) == 1
    assert default_n(512, 1 / 8) == 64 and default_n(512, 1 / 2) == 256 and default_n(4, 1 / 8) == 1
    with pytest.raises(ValueError, match="n must be in"):
        NthDecoderProjection(torch.ones(4, 2), n=4)
    assert NthDecoderProjection(torch.ones(4, 2)).compute()["nth_decoder_projection"] is None  # no rows


def test_decoder_pairwise_cosine_matches_the_pairs():
    rng = np.random.default_rng(2)
    W_dec = rng.normal(size=(7, 5))
    unit = W_dec / np.linalg.norm(W_dec, axis=1, keepdims=True)
    pairs = [abs(unit[i] @ unit[j]) for i, j in itertools.combinations(range(7), 2)]
    assert decoder_pairwise_cosine(torch.from_numpy(W_dec), chunk=3) == pytest.approx(np.mean(pairs), abs=1e-6)
    orthogonal = torch.eye(4) * torch.tensor([1.0, 2.0, 3.0, 4.0])[:, None]
    assert decoder_pairwise_cosine(orthogonal) == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("case", ["normal", "ties", "constant", "nan", "tiny", "skewed"])
def test_the_bracketed_order_statistic_is_np_partitions(case):
    """`_order_statistic` returns exactly `np.partition(values, k)[k]` at every rank tried: ties at
    the brackets, one repeated value, NaN (largest), fewer values than the sample, a heavy tail;
    and where the bracket misses (forced here by a sample from other data) the fallback's."""
    from dictlearn.metrics.decoder_projection import _order_statistic, _sorted_sample

    rng = np.random.default_rng(7)
    values = {
        "normal": rng.normal(size=200_003).astype(np.float32),
        "ties": rng.integers(-5, 6, size=100_000).astype(np.float32),
        "constant": np.full(50_000, 0.25, np.float32),
        "nan": np.where(rng.random(80_000) < 0.01, np.nan, rng.normal(size=80_000)).astype(np.float32),
        "tiny": rng.normal(size=37).astype(np.float32),
        "skewed": rng.lognormal(sigma=3.0, size=120_000).astype(np.float32),
    }[case]
    n = values.size
    sample = _sorted_sample(values)
    for k in sorted({0, 1, n // 8, n // 4, n // 2, 3 * n // 4, n - 2, n - 1}):
        expected = np.partition(values, k)[k]
        got = _order_statistic(values, k, sample)
        assert (np.isnan(expected) and np.isnan(got)) or got == expected, (case, k)
    wrong = np.sort(rng.normal(loc=100.0, size=1000).astype(np.float32))  # brackets far from every value
    assert _order_statistic(values, n // 3, wrong) == np.partition(values, n // 3)[n // 3]


def test_the_brackets_hold_the_rank_on_a_block_of_latents_with_their_own_scales():
    """Projections come as a flattened [rows, d_sae] block whose columns differ in scale; the
    sample must see every latent, or the bracket misses and the whole block is partitioned (a
    stride of N // 16384 = 128 saw 4 of 512 latents)."""
    from dictlearn.metrics.decoder_projection import _bracketed, _sorted_sample

    rng = np.random.default_rng(3)
    block = (rng.normal(size=(4096, 512)) * np.linspace(0.1, 3.0, 512) + np.linspace(-1, 1, 512)).astype(np.float32)
    values = block.ravel()
    sample = _sorted_sample(values)
    for n in (64, 128, 256):
        k = 4096 * (512 - n) - 1
        assert _bracketed(values, k, sample) == np.partition(values, k)[k], n
