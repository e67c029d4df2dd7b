"""Every recipe trains through `dictlearn fit` and exports (the mechanism-specific recipes are also
checked field by field in test_batchtopk, test_gated, test_jumprelu and test_transcoder)."""

from __future__ import annotations

import pytest
import torch

from conftest import fit_recipe
from dictlearn import load
from dictlearn.cli import RECIPES_DIR

# recipe -> SAELens architecture name written to cfg.json
ARCHITECTURES = {
    "relu_l1": "standard", "topk": "topk", "batchtopk": "jumprelu", "gated": "gated", "jumprelu": "jumprelu",
    "transcoder": "topk_transcoder", "skip_transcoder": "topk_skip_transcoder",
}  # fmt: skip


def test_the_seven_recipes_and_the_example_sweep_stack_on_the_base():
    assert {p.stem for p in RECIPES_DIR.glob("*.yaml")} == {"base", "sweep", *ARCHITECTURES}


@pytest.mark.parametrize("recipe", ["relu_l1", "topk"])
def test_recipe_trains_and_exports(recipe, small_file, tmp_path):
    cfg, folder = fit_recipe(recipe, small_file, tmp_path, "--model.d_sae", "64", steps=10)
    assert (cfg["architecture"], cfg["d_in"], cfg["d_sae"]) == (ARCHITECTURES[recipe], 16, 64)
    model = load(folder)
    x = torch.randn(5, 16)
    assert model(x).shape == (5, 16) and model.encode(x).shape == (5, 64)
