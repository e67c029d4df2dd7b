"""Concept coverage: F1 counts against a brute-force loop, and the closed-form extremes — latents
that equal the true features cover every concept, random latents almost none."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dictlearn.data.synth import synthesize
from dictlearn.metrics.coverage import ConceptCoverage


def brute_force_f1(fires: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """float64 [d_sae, n_concepts], one pair at a time."""
    out = np.zeros((fires.shape[1], labels.shape[1]))
    for i in range(fires.shape[1]):
        for j in range(labels.shape[1]):
            tp = fp = fn = 0
            for f, y in zip(fires[:, i], labels[:, j]):
                tp += bool(f and y)
                fp += bool(f and not y)
                fn += bool(y and not f)
            out[i, j] = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    return out


def test_f1_matches_brute_force_over_uneven_batches():
    rng = np.random.default_rng(0)
    fires = rng.random((700, 9)) < rng.random(9)  # latents of different densities
    fires[:, 4] = False  # a dead latent
    labels = rng.random((700, 5)) < [0.05, 0.2, 0.5, 0.0, 0.9]  # concept 3 never present
    labels[:, 1] |= fires[:, 2]  # a latent that implies a concept
    metric = ConceptCoverage(9, 5)
    for start, stop in ((0, 1), (1, 333), (333, 700)):  # numpy and torch inputs, uneven batches
        part = slice(start, stop)
        metric.update(fires[part] if start else torch.from_numpy(fires[part]), labels[part])
    result = metric.compute()
    expected = brute_force_f1(fires, labels)
    np.testing.assert_allclose(result.f1, expected, rtol=0, atol=1e-12)
    alive = fires.any(0)
    best = expected.max(1)
    assert result.concept_coverage(0.3) == pytest.approx((best[alive] >= 0.3).mean())
    assert result.concept_f1_mean() == pytest.approx(expected[:, labels.any(0)].max(0).mean())
    details = result.per_concept([f"c{j}" for j in range(5)], threshold=0.3)
    assert details["c3"]["f1"] is None and details["c1"]["latent"] == int(expected[:, 1].argmax())
    owners = alive & (best >= 0.3)
    assert sum(d["latents"] for d in details.values()) == owners.sum()
    assert details["c2"]["positive_fraction"] == pytest.approx(labels[:, 2].mean())


@pytest.fixture(scope="module")
def synth():
    return synthesize(20_000, d=32, n_features=24, mean_active=3.0, magnitude="lognormal", seed=3,
                      return_codes=True)


def _coverage(z: np.ndarray, concepts: np.ndarray):
    metric = ConceptCoverage(z.shape[1], concepts.shape[1])
    metric.update(z > 0, concepts)
    return metric.compute()


def test_latents_equal_to_the_features_cover_every_concept(synth):
    concepts = synth.codes > 0  # concept j: true feature j is active
    z = np.maximum(synth.acts @ np.linalg.pinv(synth.features) - 1e-4, 0)  # the codes, up to rounding
    result = _coverage(z, concepts)
    assert result.concept_coverage() == pytest.approx(1.0)
    assert result.concept_f1_mean() == pytest.approx(1.0)
    np.testing.assert_array_equal(result.best_concept, np.arange(24))


def test_random_latents_cover_almost_nothing(synth):
    concepts = synth.codes > 0
    rng = np.random.default_rng(4)
    z = np.maximum(synth.acts @ rng.normal(size=(32, 48)), 0)  # random directions, fire ~half the time
    result = _coverage(z, concepts)
    assert result.concept_coverage() <= 0.05
    assert result.concept_f1_mean() < 0.45
