"""The one registry of mechanisms: every shipped mechanism declares itself once, and a mechanism
written outside dictlearn (the toys below, in this module only) trains through `dictlearn fit` and
runs in `dictlearn compare` without an edit to any dictlearn module."""

from __future__ import annotations

import gc
import inspect
import json
from pathlib import Path

import pytest
import torch
import yaml

import dictlearn
from dictlearn import GatedSAE, JumpReLUSAE, ReLUL1SAE, TopKSAE, load
from dictlearn.analysis.style import ARCHITECTURES, architecture_style
from dictlearn.cli import RECIPES_DIR, main
from dictlearn.compare.plan import OPTIMIZER, SHORT_RUN, CompareConfig, parse_architecture, plan
from dictlearn.data import write_synth_file
from dictlearn.dictionaries import SHIPPED, Dictionary
from dictlearn.dictionaries.latents import Selection
from dictlearn.dictionaries.registry import Mechanism, mechanism_class, mechanism_of, mechanisms
from dictlearn.errors import ConfigError
from dictlearn.training.calibration import calibration_start, coefficient_attribute


class ToyTopKSAE(TopKSAE):
    """TopK without AuxK: a mechanism of its own, set by k."""

    mechanism = Mechanism("toy", short_run={"auxk_alpha": 0.0})

    def sparsity_losses(self, x, y, pre, z, y_hat, latents=None, step=None) -> dict[str, torch.Tensor]:
        return {}


class ToyL1SAE(ReLUL1SAE):
    """ReLU-L1 under another name: a calibrated mechanism that keeps its initialised start."""

    mechanism = Mechanism("toy_l1", coefficient="l1_coefficient", short_run={"decoder_constraint": "unit_norm"})


class ToyScratchSAE(Dictionary):
    """A mechanism on the base class alone, no shipped mechanism under it: the k largest
    pre-activations of each token, through a ReLU, and no loss term of its own."""

    sae_lens_architecture = "topk"
    mechanism = Mechanism("toy_scratch")

    def __init__(self, k: int = 4, **kwargs):
        super().__init__(**kwargs)
        self.k = k

    def select(self, pre: torch.Tensor, training: bool) -> Selection:
        return Selection.of_rows(pre.topk(self.k, dim=-1).indices)

    def activate_entries(self, entries, training: bool) -> torch.Tensor:
        return entries.pre.relu()

    def sparse_l0(self) -> float:
        return self.k

    def export_fields(self) -> dict:
        return {"k": self.k}


SHIPPED_NAMES = {"relu_l1", "topk", "batchtopk", "gated", "jumprelu", "matryoshka"}


def _parameters(cls: type) -> set[str]:
    """Constructor arguments of `cls` and, through **kwargs, of its bases."""
    return {name for klass in cls.__mro__ if "__init__" in vars(klass)
            for name in inspect.signature(klass.__init__).parameters}


# ------------------------------------------------------------------ what the shipped mechanisms declare
def test_the_registry_holds_the_shipped_mechanisms_and_what_they_declare():
    registry = mechanisms()
    assert set(registry) == SHIPPED_NAMES | {"toy", "toy_l1", "toy_scratch"}
    assert {name: cls.__name__ for name, cls in registry.items() if name in SHIPPED_NAMES} == {
        "relu_l1": "ReLUL1SAE", "topk": "TopKSAE", "batchtopk": "BatchTopKSAE", "gated": "GatedSAE",
        "jumprelu": "JumpReLUSAE", "matryoshka": "MatryoshkaBatchTopKSAE"}  # fmt: skip
    calibrated = {name: (cls.mechanism.coefficient, cls.mechanism.calibration_start)
                  for name, cls in registry.items() if cls.mechanism.calibrated and name in SHIPPED_NAMES}
    assert calibrated == {"relu_l1": ("l1_coefficient", 1.0), "gated": ("l1_coefficient", None),
                          "jumprelu": ("l0_coefficient", 1.25)}
    for name, cls in registry.items():  # what compare passes, the constructor takes
        declared = cls.mechanism
        assert set(declared.short_run) | set(declared.short_run_steps) <= _parameters(cls), name
        if declared.calibrated:
            assert declared.coefficient in _parameters(cls), name
    assert set(SHIPPED) == {cls.__name__ for name, cls in registry.items() if name in SHIPPED_NAMES}
    assert mechanism_class("toy") is ToyTopKSAE
    with pytest.raises(ConfigError, match="unknown mechanism 'sparsemax'; known: batchtopk, gated"):
        mechanism_class("sparsemax")


def test_every_shipped_mechanism_has_its_recipe_and_a_style_row():
    for name, cls in mechanisms().items():
        if name not in SHIPPED_NAMES:
            continue
        recipe = yaml.safe_load((RECIPES_DIR / f"{name}.yaml").read_text())
        assert recipe["model"]["class_path"] == f"dictlearn.{cls.__name__}", name
        assert name in ARCHITECTURES, name
    # a mechanism without a row gets a fixed colour and marker, not an error
    assert architecture_style("toy") == architecture_style("toy") and architecture_style("toy") not in ARCHITECTURES.values()


def test_the_public_api_lists_the_shipped_architectures_only():
    assert {"TopKSAE", "MatryoshkaBatchTopKSAE", "Dictionary", "load"} <= set(dictlearn.__all__)
    assert "ToyTopKSAE" not in dictlearn.__all__ and dictlearn.GatedSAE is GatedSAE
    with pytest.raises(AttributeError):
        dictlearn.ToyTopKSAE  # noqa: B018


def test_a_subclass_inherits_its_parents_declaration_without_a_second_entry():
    class WiderKernelJumpReLU(JumpReLUSAE):
        pass

    model = WiderKernelJumpReLU(d_in=8, d_sae=16)
    assert coefficient_attribute(model) == "l0_coefficient" and calibration_start(model) == 1.25
    assert mechanism_of(model) is JumpReLUSAE.mechanism and "WiderKernelJumpReLU" not in {
        cls.__name__ for cls in mechanisms().values()}
    assert coefficient_attribute(ToyTopKSAE(d_in=8, d_sae=16, k=2)) is None
    assert (coefficient_attribute(ToyL1SAE(d_in=8, d_sae=16)), calibration_start(ToyL1SAE)) == ("l1_coefficient", None)


def test_a_name_declared_twice_or_malformed_is_one_line():
    class Impostor(TopKSAE):
        mechanism = Mechanism("topk")

    try:
        with pytest.raises(ConfigError, match="mechanism 'topk' is declared by .*TopKSAE and by .*Impostor"):
            mechanisms()
    finally:
        del Impostor
        gc.collect()  # the registry is whatever is alive: the next tests must not see it
    assert mechanisms()["topk"] is TopKSAE
    for bad in ("TopK", "topk_transcoder", "2k"):
        with pytest.raises(ConfigError, match="lower-case"):
            Mechanism(bad)
    with pytest.raises(ConfigError, match="calibration_start needs a coefficient"):
        Mechanism("toy_k", calibration_start=1.0)


# ------------------------------------------------------------------ compare plans a mechanism from its declaration
def test_compare_plans_a_new_mechanism_from_its_declaration():
    assert parse_architecture("toy_skip_transcoder") == ("toy", "skip_transcoder")
    config = CompareConfig(architectures=["toy", "toy_l1_transcoder"], l0=[4, 8], d_sae=[32], seeds=[0],
                           train_tokens=25_600, batch_size=256, device="cpu").resolved()
    assert config.steps == 100
    toy, toy_l1 = (next(p for p in plan(config) if p.mechanism == m and p.l0_target == 8) for m in ("toy", "toy_l1"))
    assert toy.init_args == {"d_sae": 32, "auxk_alpha": 0.0, "k": 8}
    assert toy.training == {**OPTIMIZER, **SHORT_RUN}  # the training's, not the dictionary's
    assert not toy.calibrated and type(toy.build(16, 16)) is ToyTopKSAE
    assert toy_l1.calibrated and "k" not in toy_l1.init_args and toy_l1.init_args["transcoder"]
    # the YAML's `dictionary:` accepts the new name and overrides its declared defaults
    config = CompareConfig(architectures=["toy"], l0=[4], d_sae=[32], seeds=[0], device="cpu",
                           dictionary={"toy": {"k_aux": 3, "auxk_alpha": 0.5}}).resolved()
    assert {k: plan(config)[0].init_args[k] for k in ("k_aux", "auxk_alpha")} == {"k_aux": 3, "auxk_alpha": 0.5}


def test_batchtopks_threshold_starts_after_a_fifth_of_compares_steps():
    for steps in (1, 4, 5, 99, 100, 391, 1953):
        config = CompareConfig(architectures=["batchtopk", "matryoshka"], l0=[4], d_sae=[32], seeds=[0],
                               train_tokens=steps * 256, batch_size=256, device="cpu").resolved()
        assert [p.init_args["threshold_start_step"] for p in plan(config)] == [max(1, steps // 5)] * 2


# ------------------------------------------------------------------ and trains through fit and compare
@pytest.fixture(scope="module")
def toy_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("toy") / "toy.h5"
    write_synth_file(path, n_rows=16_384, d=16, n_features=32, mean_active=3.0, seed=2)
    return str(path)


@pytest.mark.parametrize("toy", [ToyTopKSAE, ToyScratchSAE])
def test_a_toy_mechanism_trains_through_dictlearn_fit(toy_file, tmp_path, toy):
    recipe = tmp_path / "toy.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"class_path": f"{__name__}.{toy.__name__}",
                                                "init_args": {"d_sae": 32, "k": 3}}}))
    code = main(["fit", "--config", str(recipe), "--data.path", toy_file, "--data.input_key", "acts",
                 "--data.batch_size", "256", "--trainer.max_steps", "10", "--trainer.default_root_dir",
                 str(tmp_path / "runs"), "--trainer.enable_progress_bar", "false"])
    assert code == 0
    (export,) = Path(tmp_path / "runs").rglob("export/cfg.json")
    model = load(export.parent)
    assert type(model) is toy and (model.d_sae, model.k) == (32, 3)
    x = torch.randn(5, 16)
    assert (model.encode(x) > 0).sum(1).le(3).all()


@pytest.mark.slow
def test_a_toy_mechanism_runs_in_dictlearn_compare(toy_file, tmp_path):
    out = tmp_path / "run"
    code = main(["compare", "--out", str(out), "--data", toy_file, "--input-key", "acts",
                 "--architectures", "toy,toy_l1,toy_scratch", "--l0", "4", "--d-sae", "32", "--seeds", "0",
                 "--train-tokens", "5120", "--batch-size", "256", "--no-downstream", "--no-interpret", "--quiet"])
    assert code == 0
    lines = {line["mechanism"]: line for line in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert set(lines) == {"toy", "toy_l1", "toy_scratch"}
    assert lines["toy"]["k"] == 4 and "l1_coefficient" not in lines["toy"]
    assert type(load(lines["toy"]["export"])) is ToyTopKSAE
    scratch = load(lines["toy_scratch"]["export"])  # trained by compare with its k, then evaluated
    assert type(scratch) is ToyScratchSAE and scratch.k == 4 and 0 < lines["toy_scratch"]["l0"] <= 4
    # calibrated: λ moved from its start (the declared 0.1 of relu_l1 is not the toy's; ReLU-L1's own 5.0 is)
    assert lines["toy_l1"]["k"] is None and lines["toy_l1"]["l1_coefficient"] != pytest.approx(5.0)
    assert (out / "report.md").is_file()
