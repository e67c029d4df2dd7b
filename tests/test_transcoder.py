"""Transcoders and skip transcoders: synthetic targets, mapping, export (any mechanism)."""

from __future__ import annotations

import json

import h5py
import lightning as L
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import initialise, quiet_trainer
from saelens_reference import sae_lens_forward
from dictlearn.training import DictionaryTraining, Member, TrainingConfig
from dictlearn import ActivationDataModule, ReLUL1SAE, TopKSAE, load
from dictlearn.data import synthesize, write_synth_file
from dictlearn.errors import ConfigError
from dictlearn.export import export


def test_synth_target_is_the_same_codes_through_a_second_dictionary(tmp_path):
    path = tmp_path / "tc.h5"
    write_synth_file(path, n_rows=3000, d=8, n_features=20, mean_active=3.0, seed=4, d_out=5, dense_linear=0.5)
    reference = synthesize(3000, d=8, n_features=20, mean_active=3.0, seed=4, return_codes=True)
    with h5py.File(path) as f:
        acts, target = f["acts"][:], f["target"][:]
        out_features, skip = f["features_out"][:], f["skip_matrix"][:]
        assert f.attrs["kind"] == "synthetic_transcoder" and f.attrs["d_out"] == 5
    np.testing.assert_array_equal(acts, reference.acts)
    np.testing.assert_allclose(np.linalg.norm(out_features, axis=1), 1.0, rtol=1e-5)
    expected = reference.codes.astype(np.float64) @ out_features + 0.5 * acts.astype(np.float64) @ skip.T
    np.testing.assert_allclose(target, expected, rtol=1e-4, atol=1e-5)


def test_transcoder_never_subtracts_b_dec_and_measures_the_target(small_tc_file):
    model = TopKSAE(d_in=16, d_out=12, d_sae=32, k=3, transcoder=True, apply_b_dec_to_input=True)
    assert model.apply_b_dec_to_input is False  # b_dec lives in the output space
    assert model.b_dec.shape == (12,) and model.W_dec.shape == (32, 12)
    L.seed_everything(0)
    dm = ActivationDataModule(small_tc_file, target_key="target", batch_size=256, block_size=64)
    quiet_trainer(max_steps=5).fit(DictionaryTraining(model), dm)
    metrics = quiet_trainer().validate(DictionaryTraining(model), dm, verbose=False)[0]
    x, y = next(iter(dm.val_dataloader()))
    with torch.no_grad():
        y_hat = model(x)
    assert y_hat.shape == y.shape
    val_rows = torch.cat([y for _, y in dm.val_dataloader()]).double()
    y_hats = torch.cat([model(x) for x, _ in dm.val_dataloader()]).double().detach()
    fvu = ((val_rows - y_hats) ** 2).sum() / ((val_rows - val_rows.mean(0)) ** 2).sum()
    assert metrics["val/fvu"] == pytest.approx(fvu.item(), rel=1e-5)  # against the target's variance


def test_target_key_and_transcoder_flag_must_agree(small_tc_file, small_file):
    dm = ActivationDataModule(small_tc_file, target_key="target", batch_size=256, block_size=64)
    with pytest.raises(ConfigError, match="--model.transcoder true"):
        initialise(TopKSAE(d_in=16, d_out=12, d_sae=32, k=3), dm)
    dm = ActivationDataModule(small_file, batch_size=256, block_size=64)
    with pytest.raises(ConfigError, match="--data.target_key"):
        initialise(TopKSAE(d_in=16, d_sae=32, k=3, transcoder=True), dm)
    with pytest.raises(ConfigError, match="--model.skip_connection"):
        TopKSAE(d_in=16, d_sae=32, k=3, skip_connection=True)


@pytest.mark.parametrize("make, architecture", [
    (lambda: Member(ReLUL1SAE(d_in=16, d_out=12, d_sae=32, transcoder=True, skip_connection=True),
                    training=TrainingConfig(lr=3e-3)), "skip_transcoder"),
    (lambda: Member(ReLUL1SAE(d_in=16, d_out=12, d_sae=32, transcoder=True), training=TrainingConfig(lr=3e-3)),
     "transcoder"),
    (lambda: TopKSAE(d_in=16, d_out=12, d_sae=32, k=3, transcoder=True, skip_connection=True), "topk_skip_transcoder"),
])
def test_transcoder_export_round_trip(make, architecture, small_tc_file, tmp_path):
    L.seed_everything(0)
    spec = make()
    model = spec.dictionary if isinstance(spec, Member) else spec
    dm = ActivationDataModule(small_tc_file, target_key="target", batch_size=256, block_size=64)
    quiet_trainer(max_steps=30).fit(DictionaryTraining(spec), dm)
    assert float(model.input_scale) != pytest.approx(float(model.target_scale))  # separate scales
    folder = export(model.eval(), tmp_path / "e", dm.provenance())
    cfg = json.loads((folder / "cfg.json").read_text())
    assert (cfg["architecture"], cfg["d_out"], cfg["apply_b_dec_to_input"]) == (architecture, 12, False)
    x = torch.cat([x for x, _ in dm.val_dataloader()])
    with torch.no_grad():
        torch.testing.assert_close(load(folder)(x), model(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(load(folder).encode(x), model.encode(x), rtol=1e-4, atol=1e-5)
    w = load_file(str(folder / "sae_weights.safetensors"))
    assert ("W_skip" in w) == ("skip" in architecture) and w.get("W_skip", torch.empty(12, 16)).shape == (12, 16)
    _, y_ref = sae_lens_forward(folder, x)  # SAELens semantics, from the files only
    torch.testing.assert_close(y_ref, model(x).detach(), rtol=1e-4, atol=1e-4)


def _fit_transcoder(path: str, **kwargs):
    L.seed_everything(0)
    model = TopKSAE(d_in=64, d_out=64, d_sae=512, k=4, transcoder=True, **kwargs)
    data = ActivationDataModule(path, target_key="target", batch_size=1024)
    trainer = quiet_trainer(max_steps=2000)
    trainer.fit(DictionaryTraining(model), data)
    return model, trainer.validate(DictionaryTraining(model), data, verbose=False)[0]


@pytest.mark.slow
def test_skip_transcoder_captures_a_dense_linear_part(transcoder_files):
    """Target = sparse part + a dense linear map of the input: the skip halves the FVU
    (measured values: benchmarks/RESULTS.md, "Feature recovery: JumpReLU and transcoders")."""
    path = transcoder_files["exponential", 1.0]
    _, plain = _fit_transcoder(path)
    _, skip = _fit_transcoder(path, skip_connection=True)
    print(f"FVU plain {plain['val/fvu']:.3f}, skip {skip['val/fvu']:.3f}")
    assert skip["val/fvu"] < 0.7 * plain["val/fvu"]
