"""Synthetic activations with known sparse features (ground truth for feature recovery).

Generative model, one row at a time:

- **Features** ``g_i``: `n_features` random unit vectors in R^d (Gaussian, normalised).
- **Firing** of feature ``i`` with marginal probability ``p_i ∝ (i+1)^(-zipf_exponent)``, scaled
  so that ``sum(p) = mean_active``. Probabilities above 1 are clipped to 1 and the excess is
  spread over the rest (water-filling), so ``sum(p) = mean_active`` still holds exactly.
- **Correlation** (``correlation = c``, 0 = independent): features after the hierarchy parents
  are grouped in consecutive pairs ``(j, j+1)``. In each row, with probability ``c`` a pair is
  driven by one shared uniform draw (its members fire together as far as their probabilities
  allow), else by independent draws. Each member's uniform stays uniform, so every marginal
  ``p_i`` is unchanged.
- **Hierarchy** (``hierarchy = h`` parents): features ``0..h-1`` are parents; parent ``k`` owns
  children ``h + k*C .. h + (k+1)*C - 1`` (``C = children_per_parent``). A child fires only when
  its parent fires, with conditional probability ``min(1, p_child / p_parent)``, so its marginal
  is ``min(p_child, p_parent)`` — exactly ``p_child``, since p is non-increasing in the index.
- **Magnitudes** of firing features, non-negative with mean `magnitude_mean`:
  ``"exponential"`` Exp(mean m); ``"uniform"`` U[0, 2m]; ``"lognormal"`` LogNormal with sigma 0.5
  and mu chosen so the mean is m.
- **Activations** ``x = sum_i c_i g_i + noise``, noise N(0, noise_std^2) per dimension.
- **Transcoder mode** (``d_out > 0``, `write_synth_file` only): a target built from the *same*
  codes through a second known dictionary, ``y = sum_i c_i h_i + dense_linear * x A^T``, with
  ``h_i`` random unit vectors in R^d_out and ``A [d_out, d]`` Gaussian / sqrt(d) (the dense linear
  part a skip transcoder's ``W_skip`` can capture; 0 = none). Stored as `target`, `features_out`
  and, when used, `skip_matrix`.

Everything is a function of `seed` and the parameters: features, codes and noise come from
separate ``numpy.random.default_rng([seed, stream])`` streams, generated in chunks of
`CHUNK_ROWS` rows, so 10M rows never need all codes in memory and `synthesize` equals the file
`write_synth_file` writes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping
from typing import Literal, NamedTuple

import numpy as np

from dictlearn.data.h5 import open_for_write
from dictlearn.errors import ConfigError

CHUNK_ROWS = 16384
LOGNORMAL_SIGMA = 0.5
Magnitude = Literal["exponential", "uniform", "lognormal"]
_FEATURE_STREAM, _CODE_STREAM, _NOISE_STREAM, _OUT_FEATURE_STREAM, _SKIP_STREAM = 1, 2, 3, 4, 5


class SynthData(NamedTuple):
    """`acts [n_rows, d]`, `features [n_features, d]` (unit rows), `feature_probability
    [n_features]` (marginal firing probabilities), `codes [n_rows, n_features]` or None."""

    acts: np.ndarray
    features: np.ndarray
    feature_probability: np.ndarray
    codes: np.ndarray | None


def feature_probabilities(n_features: int, mean_active: float, zipf_exponent: float = 0.0) -> np.ndarray:
    """Marginal firing probabilities `[n_features]`, ``∝ (i+1)^-zipf_exponent``, summing to mean_active."""
    if not 0 < mean_active <= n_features:
        raise ConfigError(f"mean_active must be in (0, n_features={n_features}] (got {mean_active})")
    weights = np.arange(1, n_features + 1, dtype=np.float64) ** -float(zipf_exponent)
    p = np.zeros(n_features)
    capped = np.zeros(n_features, dtype=bool)
    while True:  # water-filling: cap at 1, rescale the rest to the remaining mass
        free = ~capped
        p[free] = weights[free] * (mean_active - capped.sum()) / weights[free].sum()
        p[capped] = 1.0
        if not (p[free] > 1.0).any():
            return p
        capped |= p > 1.0


def random_features(n_features: int, d: int, rng: np.random.Generator) -> np.ndarray:
    """Random unit vectors: `[n_features, d]` float32, rows normalised in float64."""
    g = rng.standard_normal((n_features, d))
    return (g / np.linalg.norm(g, axis=1, keepdims=True)).astype(np.float32)


def _magnitudes(kind: str, mean: float, n: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "exponential":
        return rng.exponential(mean, n)
    if kind == "uniform":
        return rng.uniform(0.0, 2.0 * mean, n)
    # lognormal: E = exp(mu + sigma^2 / 2) = mean
    return rng.lognormal(np.log(mean) - LOGNORMAL_SIGMA**2 / 2, LOGNORMAL_SIGMA, n)


def _parents(n_features: int, hierarchy: int, children_per_parent: int) -> np.ndarray:
    """Parent index of each feature, -1 for roots: `[n_features]`."""
    parent = np.full(n_features, -1)
    n_children = hierarchy * children_per_parent
    parent[hierarchy : hierarchy + n_children] = np.repeat(np.arange(hierarchy), children_per_parent)
    return parent


def _uniforms(n_rows: int, n_features: int, first_paired: int, correlation: float, rng) -> np.ndarray:
    """Per-entry uniforms `[n_rows, n_features]`; pairs from `first_paired` share one w.p. correlation."""
    u = rng.random((n_rows, n_features))
    if correlation > 0:
        n_pairs = (n_features - first_paired) // 2
        lead = first_paired + 2 * np.arange(n_pairs)
        shared = rng.random((n_rows, n_pairs)) < correlation
        u[:, lead + 1] = np.where(shared, u[:, lead], u[:, lead + 1])
    return u


def sample_codes(n_rows: int, p: np.ndarray, parent: np.ndarray, rng: np.random.Generator, *,
                 correlation: float, magnitude: str, magnitude_mean: float) -> np.ndarray:
    """Sparse non-negative codes `[n_rows, n_features]` float32 with marginal firing `p`."""
    is_child = parent >= 0
    threshold = p.copy()  # a child's conditional probability given its parent fired
    threshold[is_child] = np.minimum(1.0, p[is_child] / np.maximum(p[parent[is_child]], 1e-300))
    first_paired = int(parent.max()) + 1  # parents (0..h-1) are never paired; 0 without hierarchy
    fire = _uniforms(n_rows, len(p), first_paired, correlation, rng) < threshold
    fire[:, is_child] &= fire[:, parent[is_child]]
    codes = np.zeros((n_rows, len(p)), dtype=np.float32)
    rows, cols = np.nonzero(fire)
    codes[rows, cols] = _magnitudes(magnitude, magnitude_mean, len(rows), rng)
    return codes


def check_parameters(names: Mapping[str, str] | None = None, **params) -> None:
    """Raise a one-line ConfigError for the first generation parameter out of range (those given,
    as keyword arguments of `write_synth_file`). Messages name each parameter by `names` (the CLI
    passes its flags, e.g. {"n_rows": "--rows"}), else by its argument name."""
    name = lambda field: (names or {}).get(field, field)
    for field in ("n_rows", "d", "n_features"):
        if field in params and not params[field] > 0:
            raise ConfigError(f"{name(field)} must be > 0 (got {params[field]})")
    for field in ("zipf_exponent", "noise_std", "correlation", "hierarchy", "children_per_parent", "seed", "d_out",
                  "dense_linear"):  # `not >= 0` also refuses NaN
        if field in params and not (params[field] >= 0 and math.isfinite(params[field])):
            raise ConfigError(f"{name(field)} must be >= 0 and finite (got {params[field]})")
    p = params  # the checks below read several parameters at once
    if "magnitude" in p and p["magnitude"] not in ("exponential", "uniform", "lognormal"):
        raise ConfigError(f"{name('magnitude')} must be 'exponential', 'uniform' or 'lognormal' (got {p['magnitude']!r})")
    if "magnitude_mean" in p and not (0 < p["magnitude_mean"] < math.inf):
        raise ConfigError(f"{name('magnitude_mean')} must be a finite number > 0 (got {p['magnitude_mean']})")
    if "mean_active" in p and not 0 < p["mean_active"] <= p.get("n_features", math.inf):
        raise ConfigError(f"{name('mean_active')} must be in (0, {name('n_features')}={p.get('n_features')}] "
                          f"(got {p['mean_active']})")
    if p.get("correlation", 0) > 1:
        raise ConfigError(f"{name('correlation')} must be in [0, 1] (got {p['correlation']})")
    hierarchy, children = p.get("hierarchy", 0), p.get("children_per_parent", 4)
    if hierarchy * (1 + children) > p.get("n_features", math.inf):
        raise ConfigError(f"{name('hierarchy')} {hierarchy} parents with {children} children each need "
                          f"{hierarchy * (1 + children)} features; {name('n_features')} is {p['n_features']}")
    if p.get("dense_linear", 0) > 0 and p.get("d_out", 0) == 0:
        raise ConfigError(f"{name('dense_linear')} {p['dense_linear']} needs a target: give {name('d_out')} > 0")


def iter_synth(n_rows: int, d: int = 64, n_features: int = 256, mean_active: float = 4.0,
               zipf_exponent: float = 0.0, magnitude: Magnitude = "exponential", magnitude_mean: float = 1.0,
               noise_std: float = 0.0, correlation: float = 0.0, hierarchy: int = 0,
               children_per_parent: int = 4, seed: int = 0,
               ) -> tuple[np.ndarray, np.ndarray, Iterator[tuple[np.ndarray, np.ndarray]]]:
    """`(features [F, d], p [F], chunks)`; chunks yields `(acts [<=CHUNK_ROWS, d], codes [.., F])`."""
    check_parameters(d=d, n_features=n_features, mean_active=mean_active, zipf_exponent=zipf_exponent,
                     magnitude=magnitude, magnitude_mean=magnitude_mean, noise_std=noise_std, correlation=correlation,
                     hierarchy=hierarchy, children_per_parent=children_per_parent, seed=seed)
    features = random_features(n_features, d, np.random.default_rng([seed, _FEATURE_STREAM]))
    p = feature_probabilities(n_features, mean_active, zipf_exponent)
    parent = _parents(n_features, hierarchy, children_per_parent)

    def chunks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        code_rng = np.random.default_rng([seed, _CODE_STREAM])
        noise_rng = np.random.default_rng([seed, _NOISE_STREAM])
        for start in range(0, n_rows, CHUNK_ROWS):
            rows = min(CHUNK_ROWS, n_rows - start)
            codes = sample_codes(rows, p, parent, code_rng, correlation=correlation,
                                 magnitude=magnitude, magnitude_mean=magnitude_mean)
            acts = codes @ features
            if noise_std > 0:
                acts += (noise_std * noise_rng.standard_normal((rows, d))).astype(np.float32)
            yield acts, codes

    return features, p, chunks()


def synthesize(n_rows: int, d: int = 64, n_features: int = 256, mean_active: float = 4.0,
               zipf_exponent: float = 0.0, magnitude: Magnitude = "exponential", magnitude_mean: float = 1.0,
               noise_std: float = 0.0, correlation: float = 0.0, hierarchy: int = 0,
               children_per_parent: int = 4, seed: int = 0, return_codes: bool = False) -> SynthData:
    """In-memory synthetic data (see the module docstring); codes only if `return_codes`."""
    features, p, chunks = iter_synth(n_rows, d, n_features, mean_active, zipf_exponent, magnitude,
                                     magnitude_mean, noise_std, correlation, hierarchy,
                                     children_per_parent, seed)
    acts = np.empty((n_rows, d), dtype=np.float32)
    codes = np.empty((n_rows, n_features), dtype=np.float32) if return_codes else None
    start = 0
    for acts_chunk, codes_chunk in chunks:
        acts[start : start + len(acts_chunk)] = acts_chunk
        if codes is not None:
            codes[start : start + len(codes_chunk)] = codes_chunk
        start += len(acts_chunk)
    return SynthData(acts, features, p.astype(np.float32), codes)


def write_synth_file(path: str | os.PathLike, n_rows: int, d: int = 64, n_features: int = 256,
                     mean_active: float = 4.0, zipf_exponent: float = 0.0,
                     magnitude: Magnitude = "exponential", magnitude_mean: float = 1.0,
                     noise_std: float = 0.0, correlation: float = 0.0, hierarchy: int = 0,
                     children_per_parent: int = 4, seed: int = 0, d_out: int = 0,
                     dense_linear: float = 0.0) -> None:
    """Write `acts [n_rows, d]`, `features [n_features, d]`, `feature_probability [n_features]`,
    and in transcoder mode (`d_out > 0`) `target [n_rows, d_out]`, `features_out`, `skip_matrix`.

    Streams chunk by chunk into a temp file beside `path`; root attributes hold every generation
    parameter, ``kind="synthetic"`` and ``complete=True`` (last). Nothing appears at `path` if
    generation fails.
    """
    params = dict(n_rows=n_rows, d=d, n_features=n_features, mean_active=mean_active,
                  zipf_exponent=zipf_exponent, magnitude=magnitude, magnitude_mean=magnitude_mean,
                  noise_std=noise_std, correlation=correlation, hierarchy=hierarchy,
                  children_per_parent=children_per_parent, seed=seed)
    check_parameters(**params, d_out=d_out, dense_linear=dense_linear)
    features, p, chunks = iter_synth(**params)
    out_features, skip = _transcoder_parts(n_features, d, d_out, dense_linear, seed)
    attrs = {"kind": "synthetic_transcoder" if d_out else "synthetic", **params}
    if d_out:
        attrs.update(d_out=d_out, dense_linear=dense_linear)
    with open_for_write(path, attrs) as f:
        f.create_dataset("features", data=features)
        f.create_dataset("feature_probability", data=p.astype(np.float32))
        acts = f.create_dataset("acts", shape=(n_rows, d), dtype=np.float32)  # contiguous
        if d_out:
            f.create_dataset("features_out", data=out_features)
            target = f.create_dataset("target", shape=(n_rows, d_out), dtype=np.float32)
            if skip is not None:
                f.create_dataset("skip_matrix", data=skip)
        start = 0
        for acts_chunk, codes_chunk in chunks:
            rows = slice(start, start + len(acts_chunk))
            acts[rows] = acts_chunk
            if d_out:
                target_chunk = codes_chunk @ out_features
                if skip is not None:
                    target_chunk += dense_linear * (acts_chunk @ skip.T)
                target[rows] = target_chunk
            start += len(acts_chunk)


def _transcoder_parts(n_features: int, d: int, d_out: int, dense_linear: float, seed: int):
    """-> (output features [F, d_out] or None, skip matrix A [d_out, d] or None)."""
    if d_out == 0:
        return None, None
    out_features = random_features(n_features, d_out, np.random.default_rng([seed, _OUT_FEATURE_STREAM]))
    if dense_linear == 0:
        return out_features, None
    rng = np.random.default_rng([seed, _SKIP_STREAM])
    return out_features, (rng.standard_normal((d_out, d)) / np.sqrt(d)).astype(np.float32)
