"""The plain Dictionary model shared by every mechanism: constructor checks, the data-dependent
initialisation (dictionaries/model.py, dictionaries/init.py, training/initialise.py), the training
settings kept apart from it (training/config.py)."""

from __future__ import annotations

import pytest
import torch

from conftest import initialise
from dictlearn import ReLUL1SAE
from dictlearn.dictionaries.init import geometric_median
from dictlearn.errors import ConfigError
from dictlearn.training import DictionaryTraining, Member, TrainingConfig


@pytest.mark.parametrize(
    "make, flag",
    [
        (lambda: ReLUL1SAE(d_in=8, d_sae=0), "--model.d_sae"),
        (lambda: DictionaryTraining(ReLUL1SAE(d_in=8, d_sae=16), TrainingConfig(lr=0.0)), "--training.lr"),
        (lambda: DictionaryTraining(Member(ReLUL1SAE(d_in=8, d_sae=16), training=TrainingConfig(lr_decay_fraction=1.5))),
         "--training.lr_decay_fraction"),
        (lambda: ReLUL1SAE(d_in=8, d_sae=16, lr=1e-3), "lr is a training setting now; give it to the training"),
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


@pytest.mark.parametrize("name", ["relu_l1", "gated", "jumprelu"])
def test_initial_l0_starts_the_run_at_that_many_latents(small_file, name):
    """`initial_l0`: the data-dependent start fires that many latents per token on the data
    (ReLU-L1 and gated: every latent on the same fraction; JumpReLU: one shared θ). Gated's
    magnitude path is untouched, so a latent that fires keeps the value it had."""
    from dictlearn import GatedSAE, JumpReLUSAE
    from dictlearn.data import ActivationDataModule

    make = {"relu_l1": ReLUL1SAE, "gated": GatedSAE, "jumprelu": JumpReLUSAE}[name]
    data = ActivationDataModule(small_file, batch_size=256)
    data.setup("fit")
    plain, started = make(d_in=16, d_sae=64), make(d_in=16, d_sae=64)
    started.load_state_dict(plain.state_dict())
    initialise(plain, data)
    initialise(started, data, initial_l0=6.0)
    x = data.sample_rows(8192)[0] * started.input_scale
    with torch.no_grad():
        z, z_plain = started.activate(started.pre_acts(x)), plain.activate(plain.pre_acts(x))
    fired = (z > 0).double()
    assert (z_plain > 0).double().sum(1).mean() > 20  # the plain start is dense (about half of 64)
    assert fired.sum(1).mean().item() == pytest.approx(6.0, rel=0.05)
    if name == "jumprelu":
        assert len(set(started.log_threshold.tolist())) == 1
    else:
        assert fired.mean(0).numpy() == pytest.approx(6.0 / 64, abs=0.01)  # every latent alike
    if name == "gated":
        assert torch.equal(started.b_mag, plain.b_mag)
        both = (z > 0) & (z_plain > 0)
        assert torch.allclose(z[both], z_plain[both])


def test_initial_l0_is_refused_where_k_sets_the_l0():
    from dictlearn import TopKSAE

    with pytest.raises(ConfigError, match="initial_l0: TopKSAE sets its L0 by k"):
        DictionaryTraining(TopKSAE(d_in=8, d_sae=32, k=4), TrainingConfig(initial_l0=4.0))
    for bad in (0.0, 32.0):
        with pytest.raises(ConfigError, match="initial_l0 must be in"):
            DictionaryTraining(ReLUL1SAE(d_in=8, d_sae=32), TrainingConfig(initial_l0=bad))


def test_training_settings_resolve_member_over_run_over_mechanism_over_defaults():
    from dictlearn import JumpReLUSAE

    jump = JumpReLUSAE(d_in=8, d_sae=32)
    training = DictionaryTraining({
        "paper": jump,
        "run": Member(ReLUL1SAE(d_in=8, d_sae=32)),
        "own": Member(ReLUL1SAE(d_in=8, d_sae=32), training=TrainingConfig(lr=1e-2, adam_eps=1e-6)),
    }, TrainingConfig(lr=1e-3, dead_window_tokens=100))
    paper, run, own = (training.settings[name] for name in ("paper", "run", "own"))
    assert (paper.adam_betas, paper.lr_warmup_fraction) == ((0.0, 0.999), 0.01)  # JumpReLU's (paper App. I)
    assert paper.lr == run.lr == 1e-3 and own.lr == 1e-2  # the run's over the mechanism's, the member's over both
    assert (run.adam_eps, own.adam_eps) == (1e-8, 1e-6)
    assert run.sparsity_warmup_fraction == 0.05 and {s.dead_window_tokens for s in (paper, run, own)} == {100}
    assert "lr" not in jump.hparams  # the model records what it is, not how it is trained
