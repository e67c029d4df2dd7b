"""Export (SAELens layout) and load: the same encode/decode on raw activations."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file


from saelens_reference import sae_lens_forward
from conftest import quiet_trainer
from dictlearn.training import DictionaryTraining, TrainingConfig
from dictlearn import ActivationDataModule, ReLUL1SAE, TopKSAE, load
from dictlearn.export import CFG_NAME, WEIGHTS_NAME, export
from dictlearn.errors import DataError

MODELS = {
    "topk": lambda: TopKSAE(d_in=16, d_sae=48, k=3),
    "relu_l1": lambda: ReLUL1SAE(d_in=16, d_sae=48, l1_coefficient=1.0),  # free decoder norms
    "relu_l1_unit_norm": lambda: ReLUL1SAE(d_in=16, d_sae=48, decoder_constraint="unit_norm"),
}


def _train(kind: str, small_file: str, tmp_path):
    L.seed_everything(0)
    model = MODELS[kind]()
    dm = ActivationDataModule(small_file, batch_size=256, block_size=64)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    quiet_trainer(max_steps=30, enable_checkpointing=True, callbacks=[checkpoint]).fit(
        DictionaryTraining(model, TrainingConfig(lr=3e-3)), dm)
    x = torch.cat([x for x, _ in dm.val_dataloader()])
    return model.eval(), dm, x


@pytest.mark.parametrize("kind", list(MODELS))
def test_export_and_checkpoint_load_to_the_same_raw_unit_dictionary(kind, small_file, tmp_path):
    model, dm, x = _train(kind, small_file, tmp_path)
    assert float(model.input_scale) != pytest.approx(1.0)  # the scale really is folded
    folder = export(model, tmp_path / "export", dm.provenance())
    from_export, from_ckpt = load(folder), load(tmp_path / "ckpt" / "last.ckpt")
    with torch.no_grad():
        z, y = model.encode(x), model(x)
        for other in (from_export, from_ckpt):
            torch.testing.assert_close(other.encode(x), z, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(other(x), y, rtol=1e-4, atol=1e-4)
        z_ref, y_ref = sae_lens_forward(folder, x)
    torch.testing.assert_close(z_ref, z, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(y_ref, y, rtol=1e-4, atol=1e-4)
    # Reported latents are in folded units: each row of the exported decoder has unit norm.
    w = load_file(str(folder / "sae_weights.safetensors"))
    torch.testing.assert_close(w["W_dec"].norm(dim=-1), torch.ones(48))
    assert w["W_enc"].shape == (16, 48) and w["W_dec"].shape == (48, 16)
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["metadata"]["sae_lens_version"] and cfg["normalize_activations"] == "none"
    assert cfg["metadata"]["dictlearn"]["data"]["input_key"] == "acts"


def test_exports_and_checkpoints_of_earlier_releases_still_load(small_file, tmp_path):
    """Earlier releases recorded the training settings (lr, dead_window_tokens, ...) among the
    dictionary's arguments and kept its dead-latent counters in the model: both still load."""
    model, dm, x = _train("topk", small_file, tmp_path)
    folder = export(model, tmp_path / "export", dm.provenance())
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["metadata"]["dictlearn"]["hyper_parameters"] |= {"lr": 3e-3, "dead_window_tokens": 512, "sparse_path": "auto"}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    checkpoint["dictlearn_members"]["model"]["hyper_parameters"]["lr"] = 3e-3
    state = checkpoint["state_dict"]
    counters = state.pop("activity.model.tokens_since_fired")
    state["members.model.tokens_since_fired"] = counters.clone().fill_(7)  # where earlier releases kept them
    torch.save(checkpoint, tmp_path / "old.ckpt")
    with torch.no_grad():
        for old in (load(folder), load(tmp_path / "old.ckpt")):
            torch.testing.assert_close(old.encode(x), model.encode(x), rtol=1e-4, atol=1e-5)
    resumed = DictionaryTraining(TopKSAE(d_in=16, d_sae=48, k=3))  # and it resumes: counters in the new place
    resumed.on_load_checkpoint(checkpoint)
    resumed.load_state_dict(checkpoint["state_dict"])
    assert (resumed.activity["model"].tokens_since_fired == 7).all()


def test_export_shapes_and_cfg_fields_for_topk(small_file, tmp_path):
    model = TopKSAE(d_in=16, d_sae=48, k=3)
    cfg = json.loads((export(model, tmp_path / "e") / "cfg.json").read_text())
    assert (cfg["architecture"], cfg["k"], cfg["d_in"], cfg["d_sae"]) == ("topk", 3, 16, 48)
    assert cfg["apply_b_dec_to_input"] is True
    assert cfg["metadata"]["dictlearn"]["class_path"] == "dictlearn.dictionaries.topk.TopKSAE"


def test_interrupted_export_leaves_nothing(tmp_path, monkeypatch):
    def failing_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("dictlearn.export.save_file", failing_save)
    with pytest.raises(OSError):
        export(TopKSAE(d_in=4, d_sae=8, k=2), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("umask, file_mode, folder_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700),
                                                          (0o002, 0o664, 0o775)])
def test_export_modes_follow_the_umask(tmp_path, umask, file_mode, folder_mode):
    """safetensors creates its file 0600 whatever the umask; the export gets what `open` would."""
    old = os.umask(umask)
    try:
        folder = export(TopKSAE(d_in=4, d_sae=8, k=2), tmp_path / "e")
        export(TopKSAE(d_in=4, d_sae=8, k=2), tmp_path / "e")  # replacing an existing export
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}
    assert modes == {CFG_NAME: file_mode, WEIGHTS_NAME: file_mode}
    assert stat.S_IMODE(folder.stat().st_mode) == folder_mode


def test_loading_an_export_imports_neither_lightning_nor_transformers():
    """`dictlearn.load` is the notebook entry point: it needs torch and safetensors, not the
    training stack (Lightning pulls in torchmetrics, which imports transformers)."""
    code = ("import sys; from dictlearn import load; heavy = {'lightning', 'torchmetrics', 'transformers'}; "
            "assert not heavy & set(sys.modules), sorted(heavy & set(sys.modules))")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_load_rejects_what_is_not_a_dictionary(tmp_path):
    with pytest.raises(DataError, match="no such export"):
        load(tmp_path / "missing")
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match="cfg.json"):
        load(tmp_path / "folder")
    (tmp_path / "bad.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="bad.ckpt"):
        load(tmp_path / "bad.ckpt")


def test_cli_fit_writes_an_export_and_export_command_rewrites_it(small_file, tmp_path):
    from dictlearn.cli import main

    args = [
        "fit", "--config", "recipes/topk.yaml", "--data.path", small_file, "--data.input_key", "acts",
        "--model.d_sae", "32", "--model.k", "3", "--data.batch_size", "256", "--data.block_size", "64",
        "--trainer.max_steps", "12", "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(tmp_path / "run"),
    ]
    assert main(args) == 0
    run = tmp_path / "run" / "lightning_logs" / "version_0"
    assert main(["export", str(run / "checkpoints" / "last.ckpt"), str(tmp_path / "again")]) == 0
    first, again = json.loads((run / "export" / "cfg.json").read_text()), json.loads((tmp_path / "again" / "cfg.json").read_text())
    assert first["metadata"]["dictlearn"]["data"] == again["metadata"]["dictlearn"]["data"]
    assert again["metadata"]["dictlearn"]["data"]["path"].endswith("small.h5")
    a, b = load_file(str(run / "export" / "sae_weights.safetensors")), load_file(str(tmp_path / "again" / "sae_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
