"""Synthetic cross-layer data (dictlearn.data.crosslayer): the file is the generative model.

References: the inputs and outputs rebuilt in float64 here from the codes and the stored
directions; the write-everywhere decoders are nonzero exactly at layers ℓ and ℓ+1.
"""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from dictlearn.data.crosslayer import input_key, iter_crosslayer, output_key, write_crosslayer_file
from dictlearn.errors import ConfigError

L, D, F = 3, 16, 24


def test_chunks_are_the_generative_model():
    reads, decoders, p, chunks = iter_crosslayer(3000, n_layers=L, d=D, n_features=F, mean_active=2.0,
                                                 cross_scale=0.5, seed=3)
    inputs, outputs, codes = next(chunks)
    assert inputs.shape == (L, 3000, D) and outputs.shape == (L, 3000, D) and codes.shape == (L, 3000, F)
    c = codes.astype(np.float64)
    for layer in range(L):
        np.testing.assert_allclose(inputs[layer], c[layer] @ reads[layer].astype(np.float64), rtol=1e-5, atol=1e-5)
        expected = np.zeros((3000, D))
        for source in (layer - 1, layer):
            if source >= 0:
                expected += c[source] @ decoders[source][:, layer * D:(layer + 1) * D].astype(np.float64)
        np.testing.assert_allclose(outputs[layer], expected, rtol=1e-5, atol=1e-5)
        norms = np.linalg.norm(decoders[layer].reshape(F, L, D), axis=-1)  # [F, L]: per target layer
        want = np.zeros(L)
        want[layer] = 1.0
        if layer + 1 < L:
            want[layer + 1] = 0.5
        np.testing.assert_allclose(norms, np.broadcast_to(want, (F, L)), rtol=1e-6, atol=1e-7)
        # each layer's features fire as asked: mean_active per row
        assert (codes[layer] > 0).sum(1).mean() == pytest.approx(2.0, rel=0.05)
    # layers are independent draws
    assert not np.array_equal(codes[0] > 0, codes[1] > 0)


def test_file_holds_the_chunks(tmp_path):
    path = tmp_path / "cl.h5"
    write_crosslayer_file(path, 20_000, n_layers=L, d=D, n_features=F, seed=1)
    reads, decoders, _, chunks = iter_crosslayer(20_000, n_layers=L, d=D, n_features=F, seed=1)
    parts = list(chunks)
    assert len(parts) == 2  # streamed in chunks
    with h5py.File(path) as f:
        assert f.attrs["kind"] == "synthetic_crosslayer" and f.attrs["complete"]
        for layer in range(L):
            np.testing.assert_array_equal(f[input_key(layer)][()], np.concatenate([p[0][layer] for p in parts]))
            np.testing.assert_array_equal(f[output_key(layer)][()], np.concatenate([p[1][layer] for p in parts]))
            np.testing.assert_array_equal(f[f"decoders.{layer}"][()], decoders[layer])
            np.testing.assert_array_equal(f[f"features_in.{layer}"][()], reads[layer])


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_layers=1), "at least 2 layers"),
    (dict(cross_scale=-1.0), "cross_scale"),
    (dict(cross_scale=float("nan")), "cross_scale"),
    (dict(mean_active=0.0), "mean_active"),
])  # fmt: skip
def test_bad_parameters_are_one_line(tmp_path, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        write_crosslayer_file(tmp_path / "x.h5", 100, **kwargs)
    assert list(tmp_path.iterdir()) == []
