"""Ground truth: Matryoshka BatchTopK on `dictlearn synth --hierarchy` data recovers the parents in
its first prefix and the children after it, and its parent latents keep firing when a child fires
(little absorption).

Data: 64 true features in d = 32, mean 3 active per row, Zipf exponent 0.6 (so a child fires in
~20-40 % of its parent's rows), uniform magnitudes; features 0-7 are parents, each owning 4
children (features 8-39) that fire only with it. Dictionary: d_sae 128, k 6, prefixes 8, 16, 32,
64, 128 (the first prefix holds exactly the 8 parents), lr 3e-3, 1000 steps of 1024 rows.

Matryoshka recovers less of the truth here than BatchTopK at the same budget (parents MMCS 0.75
against 0.94, children 0.67 against 0.90), and that is its objective, not its training: a
BatchTopK solution reordered so that latent i is true feature i has a *higher* Matryoshka loss
(0.367) than the one Matryoshka learns (0.209), and 1000 Matryoshka steps from it move away
from the truth (parents 0.83, children 0.75) to a lower loss (0.206). The first prefix must
reconstruct all 64 features from 8 latents, so its latents fire on 25-41 % of the rows (a
parent on 8-27 %) and mix parents with their children and with frequent independent features;
the later latents hold the corrections. Steps (×6), lr, sum vs mean, AuxK and resampled prefixes
gain at most 0.05 / 0.08; one inner prefix of 64 (the number of true features) reaches 0.93 / 0.83
but no longer puts the parents first (docs/architectures.md, "Matryoshka BatchTopK").
The bounds below sit just under the values measured on this setting (CPU, seed 0).
"""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch

from conftest import quiet_trainer
from dictlearn import ActivationDataModule, MatryoshkaBatchTopKSAE
from dictlearn.data import write_synth_file
from dictlearn.data.synth import synthesize
from dictlearn.training import DictionaryTraining, TrainingConfig

SETTING = dict(d=32, n_features=64, mean_active=3.0, zipf_exponent=0.6, hierarchy=8, children_per_parent=4,
               magnitude="uniform", seed=0)
PARENTS, CHILDREN = range(8), range(8, 40)
# Measured: parents MMCS 0.748 (each >= 0.534), children 0.666 (21 of 32 at >= 0.6), parent
# latents [4, 0, 1, 3, 6, 7, 19, 2] (7 in the first prefix), 28 of 32 children's best latents after
# the first prefix, a parent latent fires on 0.871 of its rows that also hold a child (BatchTopK:
# 0.785, its parent latents [71, 61, 1, 5, 20, 93, 124, 91] unordered).
PARENT_MMCS, PARENT_MIN, CHILD_MMCS, CHILDREN_AT_06, FIRES_WITH_CHILD = 0.72, 0.5, 0.64, 18, 0.84
STEPS = 1000


def _best_matches(features: torch.Tensor, W_dec: torch.Tensor):
    unit = W_dec / W_dec.norm(dim=-1, keepdim=True)
    cos = (features / features.norm(dim=-1, keepdim=True)) @ unit.T
    return cos.max(1)


@pytest.mark.slow
def test_matryoshka_recovers_parents_first_and_children_after(tmp_path):
    path = tmp_path / "hierarchy.h5"
    write_synth_file(path, n_rows=200_000, **SETTING)
    L.seed_everything(0)
    model = MatryoshkaBatchTopKSAE(d_in=32, d_sae=128, k=6, threshold_start_step=STEPS // 5)
    training = DictionaryTraining(model, TrainingConfig(lr=3e-3, lr_decay_fraction=0.2))
    quiet_trainer(max_steps=STEPS).fit(training, ActivationDataModule(str(path), batch_size=1024))
    held = synthesize(20_000, **SETTING, return_codes=True)
    features = torch.from_numpy(held.features)
    best = _best_matches(features, model.W_dec.detach())
    parents, children = best.values[list(PARENTS)], best.values[list(CHILDREN)]
    parent_latents = best.indices[list(PARENTS)]
    with torch.no_grad():
        z = model.encode(torch.from_numpy(held.acts))
    codes = torch.from_numpy(held.codes)
    fires_with_child = []
    for p in PARENTS:
        rows = (codes[:, p] > 0) & (codes[:, 8 + 4 * p : 12 + 4 * p] > 0).any(1)
        fires_with_child.append(float((z[rows, parent_latents[p]] > 0).float().mean()))
    print(f"matryoshka: parents MMCS {parents.mean():.3f} (min {parents.min():.3f}), children {children.mean():.3f} "
          f"({int((children >= 0.6).sum())} of 32 at >= 0.6), parent latents {parent_latents.tolist()}, children's "
          f"latents after the first prefix {int((best.indices[list(CHILDREN)] >= 8).sum())} of 32, a parent latent "
          f"fires on {np.mean(fires_with_child):.3f} of its rows with a child")
    assert (parent_latents < 8).sum() >= 7  # the broad features live in the first prefix ...
    assert (best.indices[list(CHILDREN)] >= 8).sum() >= 28  # ... and the specific ones after it
    assert parents.mean() >= PARENT_MMCS and parents.min() >= PARENT_MIN
    assert children.mean() >= CHILD_MMCS and (children >= 0.6).sum() >= CHILDREN_AT_06
    assert np.mean(fires_with_child) >= FIRES_WITH_CHILD
