"""Synthetic ground-truth features (dictlearn/data/synth.py)."""

import os

import h5py
import numpy as np
import pytest

from dictlearn.data import H5Array, feature_probabilities, synthesize, write_synth_file
from dictlearn.data import synth as synth_module
from dictlearn.errors import ConfigError

SMALL = dict(d=16, n_features=64, mean_active=4.0)


def _active(codes):
    return codes > 0


def test_probabilities_follow_zipf_and_sum_to_mean_active():
    p = feature_probabilities(100, 5.0, zipf_exponent=1.0)
    assert p.sum() == pytest.approx(5.0, rel=1e-12)
    np.testing.assert_allclose(p[:5] / p[0], 1.0 / np.arange(1, 6), rtol=1e-12)
    np.testing.assert_allclose(feature_probabilities(10, 2.5), np.full(10, 0.25))


def test_probabilities_clip_at_one_and_keep_the_sum():
    p = feature_probabilities(10, 5.0, zipf_exponent=2.0)
    assert p.max() == 1.0 and p.sum() == pytest.approx(5.0, rel=1e-12)
    assert np.all(np.diff(p) <= 0)
    rank = np.flatnonzero(p < 1) + 1.0  # the uncapped tail keeps the Zipf shape
    np.testing.assert_allclose(p[p < 1] / p[p < 1][0], (rank[0] / rank) ** 2, rtol=1e-12)
    with pytest.raises(ConfigError):
        feature_probabilities(10, 11.0)


def test_mean_active_and_zipf_profile():
    data = synthesize(20000, **SMALL, zipf_exponent=1.0, seed=3, return_codes=True)
    active = _active(data.codes)
    assert active.sum(1).mean() == pytest.approx(4.0, rel=0.03)
    frequency = active.mean(0)
    np.testing.assert_allclose(frequency, data.feature_probability, atol=0.015)
    assert frequency[:8].mean() > 3 * frequency[-32:].mean()


def test_features_are_unit_rows_and_acts_are_codes_times_features():
    data = synthesize(500, **SMALL, seed=1, return_codes=True)
    assert data.acts.shape == (500, 16) and data.features.shape == (64, 16) and data.codes.shape == (500, 64)
    assert data.acts.dtype == data.features.dtype == data.codes.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(data.features.astype(np.float64), axis=1), 1.0, atol=1e-6)
    reference = data.codes.astype(np.float64) @ data.features.astype(np.float64)
    np.testing.assert_allclose(data.acts, reference, rtol=1e-5, atol=1e-5)


def test_noise_is_gaussian_with_the_given_std():
    data = synthesize(4000, **SMALL, noise_std=0.1, seed=2, return_codes=True)
    residual = data.acts.astype(np.float64) - data.codes.astype(np.float64) @ data.features
    assert residual.std() == pytest.approx(0.1, rel=0.03) and abs(residual.mean()) < 0.005


def test_reproducible_from_seed():
    a, b = synthesize(300, **SMALL, seed=5), synthesize(300, **SMALL, seed=5)
    np.testing.assert_array_equal(a.acts, b.acts)
    np.testing.assert_array_equal(a.features, b.features)
    assert not np.array_equal(a.acts, synthesize(300, **SMALL, seed=6).acts)


@pytest.mark.parametrize("kind", ["exponential", "uniform", "lognormal"])
def test_magnitudes_have_the_given_mean(kind):
    codes = synthesize(20000, **SMALL, magnitude=kind, magnitude_mean=2.0, return_codes=True).codes
    values = codes[codes > 0]
    assert values.mean() == pytest.approx(2.0, rel=0.03) and values.min() >= 0
    if kind == "uniform":
        assert values.max() <= 4.0
    if kind == "exponential":  # Exp: std == mean; lognormal sigma 0.5: std/mean = sqrt(e^0.25 - 1)
        assert values.std() == pytest.approx(2.0, rel=0.05)
    if kind == "lognormal":
        assert values.std() / values.mean() == pytest.approx(np.sqrt(np.exp(0.25) - 1), rel=0.05)


@pytest.mark.parametrize("correlation", [0.0, 0.5, 1.0])
def test_correlated_pairs_keep_marginals(correlation):
    kw = dict(d=8, n_features=16, mean_active=4.0)  # p = 0.25 for every feature
    active = _active(synthesize(40000, **kw, correlation=correlation, seed=4, return_codes=True).codes)
    np.testing.assert_allclose(active.mean(0), 0.25, atol=0.012)
    both = (active[:, 0::2] & active[:, 1::2]).mean()
    expected = correlation * 0.25 + (1 - correlation) * 0.25**2  # shared draw: fire together
    assert both == pytest.approx(expected, abs=0.006)


def test_hierarchy_children_fire_only_with_parent():
    kw = dict(d=8, n_features=40, mean_active=6.0, zipf_exponent=0.7)
    data = synthesize(30000, **kw, hierarchy=2, children_per_parent=3, correlation=0.5, seed=7,
                      return_codes=True)
    active = _active(data.codes)
    for parent, children in ((0, [2, 3, 4]), (1, [5, 6, 7])):
        assert not (active[:, children] & ~active[:, [parent]]).any()
    np.testing.assert_allclose(active.mean(0), data.feature_probability, atol=0.012)
    assert active.sum(1).mean() == pytest.approx(6.0, rel=0.03)
    with pytest.raises(ConfigError, match="hierarchy"):
        synthesize(10, d=4, n_features=8, hierarchy=3, children_per_parent=4)
    with pytest.raises(ConfigError, match="magnitude"):
        synthesize(10, d=4, n_features=8, magnitude="gamma")


def test_write_synth_file_matches_synthesize(tmp_path, monkeypatch):
    monkeypatch.setattr(synth_module, "CHUNK_ROWS", 700)  # several chunks, last one partial
    kw = dict(**SMALL, zipf_exponent=0.5, magnitude="uniform", noise_std=0.01, seed=9)
    write_synth_file(tmp_path / "s.h5", 2000, **kw)
    data = synthesize(2000, **kw)
    with h5py.File(tmp_path / "s.h5", "r") as f:
        np.testing.assert_array_equal(f["acts"][:], data.acts)
        np.testing.assert_array_equal(f["features"][:], data.features)
        np.testing.assert_array_equal(f["feature_probability"][:], data.feature_probability)
        attrs = dict(f.attrs)
    assert attrs["kind"] == "synthetic" and bool(attrs["complete"]) and attrs["n_rows"] == 2000
    stored = (attrs["zipf_exponent"], attrs["magnitude"], attrs["noise_std"], attrs["seed"])
    assert stored == (0.5, "uniform", 0.01, 9)
    assert {"d", "n_features", "mean_active", "correlation", "hierarchy", "children_per_parent"} <= set(attrs)
    assert H5Array(tmp_path / "s.h5", "acts").n_rows == 2000


def test_failed_synth_leaves_no_file(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(synth_module, "sample_codes", broken)
    with pytest.raises(RuntimeError, match="interrupted"):
        write_synth_file(tmp_path / "s.h5", 100, **SMALL)
    assert os.listdir(tmp_path) == []
