"""Synthetic multi-layer transcoder data with known cross-layer structure (ground truth for CLTs).

Each of `n_layers` layers has its own `n_features` sparse features, sampled as in
`dictlearn.data.synth` (firing probabilities summing to `mean_active` per layer, non-negative
magnitudes), independently per layer and row. Feature i of layer ℓ is *read* at layer ℓ along a
unit direction e^ℓ_i ∈ R^d and *writes* to the MLP outputs of layer ℓ and of layer ℓ+1 along unit
directions h^{ℓ→ℓ}_i and `cross_scale` · h^{ℓ→ℓ+1}_i (the last layer's features write to it only):

    x_ℓ = Σ_i c^ℓ_i e^ℓ_i + noise                                   (the MLP input of layer ℓ)
    y_ℓ' = Σ_{ℓ ∈ {ℓ'-1, ℓ'}} Σ_i c^ℓ_i W^{ℓ→ℓ'}_i + noise          (its output)

with W^{ℓ→ℓ} = h^{ℓ→ℓ} and W^{ℓ→ℓ+1} = cross_scale · h^{ℓ→ℓ+1}. A cross-layer transcoder
(dictlearn.dictionaries.crosslayer) can represent this exactly: one latent per feature at its
read layer, with decoders to ℓ and ℓ+1. A per-layer transcoder at ℓ+1 sees only x_{ℓ+1} and
cannot write layer ℓ's features there; its latents carry only the h^{ℓ→ℓ} half of a feature's
write-everywhere decoder [W^{ℓ→ℓ}, W^{ℓ→ℓ+1}] (cosine ≤ 1/√(1 + cross_scale²) with it).

File layout (`write_crosslayer_file`): per layer ℓ the datasets ``mlp_in.ℓ`` [rows, d] and
``mlp_out.ℓ`` [rows, d], ``features_in.ℓ`` [F, d] (e^ℓ) and ``decoders.ℓ`` [F, n_layers·d] (the
true write-everywhere decoders [W^{ℓ→0} … W^{ℓ→L-1}], zero before ℓ and past ℓ+1), and
``feature_probability`` [F]; root attributes hold the parameters and ``kind="synthetic_crosslayer"``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np

from dictlearn.data.h5 import open_for_write
from dictlearn.data.synth import CHUNK_ROWS, _parents, check_parameters, feature_probabilities, random_features, \
    sample_codes
from dictlearn.errors import ConfigError

_IN_STREAM, _OUT_STREAM, _CODE_STREAM, _NOISE_STREAM = 11, 12, 13, 14


def input_key(layer: int) -> str:
    return f"mlp_in.{layer}"


def output_key(layer: int) -> str:
    return f"mlp_out.{layer}"


def crosslayer_features(n_layers: int, d: int, n_features: int, cross_scale: float, seed: int
                        ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(read directions [F, d] per layer, write-everywhere decoders [F, n_layers * d] per layer)."""
    reads, decoders = [], []
    for layer in range(n_layers):
        reads.append(random_features(n_features, d, np.random.default_rng([seed, _IN_STREAM, layer])))
        dec = np.zeros((n_features, n_layers * d), np.float32)
        rng = np.random.default_rng([seed, _OUT_STREAM, layer])
        for target, scale in ((layer, 1.0), (layer + 1, cross_scale)):
            if target < n_layers:
                dec[:, target * d:(target + 1) * d] = scale * random_features(n_features, d, rng)
        decoders.append(dec)
    return reads, decoders


def iter_crosslayer(n_rows: int, n_layers: int = 3, d: int = 32, n_features: int = 64, mean_active: float = 3.0,
                    cross_scale: float = 1.0, noise_std: float = 0.0, magnitude_mean: float = 1.0, seed: int = 0):
    """-> (reads, decoders, p [F], chunks); chunks yields (inputs [L, rows, d], outputs [L, rows, d],
    codes [L, rows, F]), at most `CHUNK_ROWS` rows each."""
    if n_layers < 2:
        raise ConfigError(f"n_layers {n_layers}: cross-layer data needs at least 2 layers")
    if not (cross_scale >= 0 and np.isfinite(cross_scale)):
        raise ConfigError(f"cross_scale {cross_scale}: must be >= 0 and finite")
    check_parameters(n_rows=n_rows, d=d, n_features=n_features, mean_active=mean_active, magnitude_mean=magnitude_mean,
                     noise_std=noise_std, seed=seed)
    reads, decoders = crosslayer_features(n_layers, d, n_features, cross_scale, seed)
    p = feature_probabilities(n_features, mean_active)
    parent = _parents(n_features, 0, 1)

    def chunks() -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        code_rng = np.random.default_rng([seed, _CODE_STREAM])
        noise_rng = np.random.default_rng([seed, _NOISE_STREAM])
        for start in range(0, n_rows, CHUNK_ROWS):
            rows = min(CHUNK_ROWS, n_rows - start)
            codes = [sample_codes(rows, p, parent, code_rng, correlation=0.0, magnitude="exponential",
                                  magnitude_mean=magnitude_mean) for _ in range(n_layers)]
            inputs = np.stack([c @ r for c, r in zip(codes, reads)])
            outputs = sum(c @ dec for c, dec in zip(codes, decoders)).reshape(rows, n_layers, d).transpose(1, 0, 2)
            if noise_std > 0:
                inputs += (noise_std * noise_rng.standard_normal(inputs.shape)).astype(np.float32)
                outputs = outputs + (noise_std * noise_rng.standard_normal(outputs.shape)).astype(np.float32)
            yield inputs.astype(np.float32), np.ascontiguousarray(outputs, dtype=np.float32), np.stack(codes)

    return reads, decoders, p, chunks()


def write_crosslayer_file(path: str | os.PathLike, n_rows: int, n_layers: int = 3, d: int = 32,
                          n_features: int = 64, mean_active: float = 3.0, cross_scale: float = 1.0,
                          noise_std: float = 0.0, magnitude_mean: float = 1.0, seed: int = 0) -> None:
    """Write the module docstring's layout to `path`, atomically, chunk by chunk."""
    params = dict(n_rows=n_rows, n_layers=n_layers, d=d, n_features=n_features, mean_active=mean_active,
                  cross_scale=cross_scale, noise_std=noise_std, magnitude_mean=magnitude_mean, seed=seed)
    reads, decoders, p, chunks = iter_crosslayer(**params)
    with open_for_write(path, {"kind": "synthetic_crosslayer", **params}) as f:
        f.create_dataset("feature_probability", data=p.astype(np.float32))
        for layer in range(n_layers):
            f.create_dataset(f"features_in.{layer}", data=reads[layer])
            f.create_dataset(f"decoders.{layer}", data=decoders[layer])
            f.create_dataset(input_key(layer), shape=(n_rows, d), dtype=np.float32)
            f.create_dataset(output_key(layer), shape=(n_rows, d), dtype=np.float32)
        start = 0
        for inputs, outputs, _ in chunks:
            rows = slice(start, start + inputs.shape[1])
            for layer in range(n_layers):
                f[input_key(layer)][rows] = inputs[layer]
                f[output_key(layer)][rows] = outputs[layer]
            start += inputs.shape[1]
