"""The plain Dictionary model shared by every mechanism: constructor checks, the data-dependent
initialisation (dictionaries/model.py, dictionaries/init.py)."""

from __future__ import annotations

import pytest
import torch

from dictlearn import ReLUL1SAE
from dictlearn.dictionaries.init import geometric_median
from dictlearn.errors import ConfigError


@pytest.mark.parametrize(
    "make, flag",
    [
        (lambda: ReLUL1SAE(d_in=8, d_sae=0), "--model.d_sae"),
        (lambda: ReLUL1SAE(d_in=8, d_sae=16, lr=0.0), "--model.lr"),
        (lambda: ReLUL1SAE(d_in=8, d_sae=16, lr_decay_fraction=1.5), "--model.lr_decay_fraction"),
    ],
)
def test_bad_arguments_name_their_flag(make, flag):
    with pytest.raises(ConfigError, match=flag.replace(".", r"\.")):
        make()


def test_geometric_median_minimises_the_sum_of_distances():
    torch.manual_seed(3)
    points = torch.randn(501, 5) * torch.tensor([1.0, 2.0, 0.5, 3.0, 1.0]) + 4.0
    points[:20] += 100.0  # outliers pull the mean, not the median
    median = geometric_median(points).double()
    p = points.double()
    grad = ((median - p) / (median - p).norm(dim=1, keepdim=True)).sum(0)
    assert grad.norm().item() < 1e-2  # first-order optimality of Σ‖p − m‖
    cost = lambda m: (p - m).norm(dim=1).sum()
    assert cost(median) < cost(p.mean(0))
    # Collinear odd set: the median is the middle point.
    line = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [10.0, 10.0]])
    torch.testing.assert_close(geometric_median(line), torch.tensor([2.0, 2.0]), atol=1e-3, rtol=0)


def test_reset_parameters_gives_one_start_per_seed_and_width():
    """Same seed and shape: the same start (mechanisms compared from one initialisation); another
    width: no shared rows, or feature splitting across sizes would match the initialisation."""
    from dictlearn import BatchTopKSAE, TopKSAE

    small, same, wide = TopKSAE(d_in=8, d_sae=16, k=2), BatchTopKSAE(d_in=8, d_sae=16, k=2), TopKSAE(d_in=8, d_sae=32, k=2)
    with torch.no_grad():
        for model in (small, same, wide):
            model.reset_parameters(3)
    assert torch.equal(small.W_dec, same.W_dec) and torch.equal(small.W_enc, same.W_enc)
    cosines = small.W_dec @ wide.W_dec.T  # unit rows
    assert cosines.abs().max() < 0.99
