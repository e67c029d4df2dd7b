"""Every packaged recipe trains through `dictlearn fit`, writes the SAELens architecture it names,
takes its size and sparsity flags, and exports a dictionary that SAELens's reading of the files
(tests/saelens_reference.py) and `dictlearn.load` agree on."""

from __future__ import annotations

from dataclasses import dataclass, field

import h5py
import pytest
import torch
from safetensors.torch import load_file

from conftest import fit_recipe
from dictlearn import load
from dictlearn.cli import RECIPES_DIR
from saelens_reference import sae_lens_forward

PLAIN = {"W_enc", "b_enc", "W_dec", "b_dec"}


@dataclass(frozen=True)
class Recipe:
    architecture: str  # SAELens name written to cfg.json
    class_name: str  # dictlearn class recorded in the export's metadata
    flags: dict = field(default_factory=dict)  # --model.* flags the export must record
    weights: frozenset = frozenset(PLAIN)
    transcoder: bool = False


RECIPES = {
    "relu_l1": Recipe("standard", "relu_l1.ReLUL1SAE", {"l1_coefficient": 0.3}),
    "topk": Recipe("topk", "topk.TopKSAE", {"k": 4}),
    "batchtopk": Recipe("jumprelu", "batchtopk.BatchTopKSAE", {"k": 4}, frozenset(PLAIN | {"threshold"})),
    "matryoshka": Recipe("jumprelu", "matryoshka.MatryoshkaBatchTopKSAE", {"k": 4, "prefix_loss": "sum"},
                         frozenset(PLAIN | {"threshold"})),
    "gated": Recipe("gated", "gated.GatedSAE", {"l1_coefficient": 0.3},
                    frozenset({"W_enc", "b_gate", "r_mag", "b_mag", "W_dec", "b_dec"})),
    "jumprelu": Recipe("jumprelu", "jumprelu.JumpReLUSAE", {"bandwidth": 0.1, "l0_coefficient": 0.5},
                       frozenset(PLAIN | {"threshold"})),
    "transcoder": Recipe("topk_transcoder", "topk.TopKSAE", {"k": 3}, transcoder=True),
    "skip_transcoder": Recipe("topk_skip_transcoder", "topk.TopKSAE", {"k": 3}, frozenset(PLAIN | {"W_skip"}),
                              transcoder=True),
}  # fmt: skip


def test_the_recipes_and_the_example_sweep_stack_on_the_base():
    assert {p.stem for p in RECIPES_DIR.glob("*.yaml")} == {"base", "sweep", "short_run", *RECIPES}


def test_compares_short_run_training_is_a_recipe_that_fit_reads_too(small_file, tmp_path, monkeypatch):
    """recipes/short_run.yaml is where compare's short-run training lives (no Python dict), and
    `dictlearn fit --config topk --config short_run` trains with exactly those settings."""
    import torch
    import yaml

    from dictlearn.compare.plan import OPTIMIZER, SHORT_RUN, SHORT_RUN_DATA

    training = yaml.safe_load((RECIPES_DIR / "short_run.yaml").read_text())["training"]
    assert {**OPTIMIZER, **SHORT_RUN} == training and training["init_scale_from_data"] is True
    assert SHORT_RUN_DATA == yaml.safe_load((RECIPES_DIR / "short_run.yaml").read_text())["data"] == {"block_size": 16}
    monkeypatch.chdir(tmp_path)
    fit_recipe("topk", small_file, tmp_path / "runs", "--config", str(RECIPES_DIR / "short_run.yaml"),
               "--model.d_sae", "64", "--model.k", "4", steps=4)
    checkpoint = torch.load(next((tmp_path / "runs").rglob("last.ckpt")), weights_only=False)
    trained = checkpoint["dictlearn_members"]["model"]["training"]
    assert {key: trained[key] for key in training} == {**training, "adam_betas": tuple(training["adam_betas"])}
    assert checkpoint["datamodule_hyper_parameters"]["block_size"] == SHORT_RUN_DATA["block_size"]  # its data: block


@pytest.mark.parametrize("name", list(RECIPES))
def test_recipe_trains_through_the_cli_and_exports_what_sae_lens_reads(name, small_file, small_tc_file, tmp_path,
                                                                        monkeypatch):
    recipe = RECIPES[name]
    monkeypatch.chdir(tmp_path)  # nothing may land in the working directory
    path = small_tc_file if recipe.transcoder else small_file
    flags = [item for key, value in recipe.flags.items() for item in (f"--model.{key}", str(value))]
    if recipe.transcoder:
        flags += ["--data.target_key", "target", "--data.block_size", "64"]
    cfg, folder = fit_recipe(name, path, tmp_path / "runs", "--model.d_sae", "64", "--trainer.val_check_interval",
                             "10", *flags, steps=20)

    d_out = 12 if recipe.transcoder else 16
    assert (cfg["architecture"], cfg["d_in"], cfg["d_sae"], cfg.get("d_out", 16)) == (recipe.architecture, 16, 64, d_out)
    meta = cfg["metadata"]["dictlearn"]
    assert meta["class_path"] == f"dictlearn.dictionaries.{recipe.class_name}"
    assert {key: meta["hyper_parameters"][key] for key in recipe.flags} == recipe.flags
    weights = load_file(str(folder / "sae_weights.safetensors"))
    assert set(weights) == recipe.weights
    if "threshold" in weights:
        assert weights["threshold"].shape == (64,) and (weights["threshold"] > 0).all()

    with h5py.File(path) as f:
        x = torch.from_numpy(f["acts"][-512:]).float()
    model = load(folder)
    assert type(model).__name__ == recipe.class_name.split(".")[1]
    assert {key: getattr(model.hparams, key) for key in recipe.flags} == recipe.flags
    with torch.no_grad():
        z, y = model.encode(x), model(x)
        z_ref, y_ref = sae_lens_forward(folder, x)
    assert 0 < (z != 0).float().mean() < 1  # neither dead nor dense: the comparison sees the selection
    torch.testing.assert_close(z_ref, z, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(y_ref, y, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", list(RECIPES))
def test_the_cli_builds_the_model_the_recipe_names(name, capsys):
    """LightningCLI fills every argument a class leaves to **kwargs with the base class's default;
    a mechanism that sets its own default there (no pre-encoder bias for JumpReLU, rows of norm 0.1
    for ReLU-L1) would silently lose it through `dictlearn fit`. The model the CLI resolves must be
    the model the recipe's class and arguments build directly."""
    import importlib

    import yaml

    from dictlearn.cli import main

    recipe_path = RECIPES_DIR / f"{name}.yaml"
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", str(recipe_path), "--print_config"])
    assert stop.value.code == 0
    resolved = yaml.safe_load(capsys.readouterr().out)["model"]
    declared = yaml.safe_load(recipe_path.read_text())["model"]
    assert resolved["class_path"] == declared["class_path"]
    module, _, class_name = declared["class_path"].rpartition(".")
    klass = getattr(importlib.import_module(module), class_name)
    through_cli = klass(**{**resolved["init_args"], "d_in": 8})
    direct = klass(**{**declared.get("init_args", {}), "d_in": 8})
    for key in direct.hparams:
        if hasattr(direct, key) and key != "hparams":
            assert getattr(through_cli, key) == getattr(direct, key), key
