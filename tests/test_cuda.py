"""The same checks on a CUDA device: sparse step == dense step, bf16 autocast, training through
Lightning with every mechanism (fp32 and bf16-mixed), and the embedded model's harvest → fit →
evaluate. Skipped where torch sees no GPU (CI); run by hand on a GPU machine:

    python -m pytest -q tests/test_cuda.py

`DICTLEARN_TEST_DEVICE=cpu` runs the module on the CPU instead (to check the tests themselves).
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch

from conftest import quiet_trainer
from dictlearn.dictionaries.latents import _tries_sparse_path
from dictlearn.training import DictionaryTraining, TrainingConfig
from dictlearn import ActivationDataModule
from dictlearn.dictionaries import BatchTopKSAE, GatedSAE, JumpReLUSAE, ReLUL1SAE, TopKSAE
from dictlearn.dictionaries.sparse import Support, _gathered_dot, topk_indices
from test_sparse_paths import MECHANISMS, MODES, _randomised, _step, assert_steps_agree

DEVICE = os.environ.get("DICTLEARN_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(
    DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device"
)


def _on_device(mechanism: str, mode: str):
    model, x, y = _randomised(mechanism, mode, torch.float32)
    return model.to(DEVICE), x.to(DEVICE), y.to(DEVICE)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("mechanism", list(MECHANISMS))
def test_sparse_step_equals_dense_step_on_the_device(mechanism, mode):
    """fp32 on the device (TF32 off, torch's default for matmuls), against the device's dense step."""
    model, x, y = _on_device(mechanism, mode)
    dense = _step(copy.deepcopy(model), x, y, sparse=False)
    sparse = _step(copy.deepcopy(model), x, y, sparse=True)
    assert sparse[4]["W_dec"].device.type == DEVICE
    assert_steps_agree(dense, sparse, tol=2e-5)


@pytest.mark.parametrize("mechanism", ["topk", "batchtopk", "relu_l1", "gated", "jumprelu"])
def test_sparse_step_under_bf16_autocast_on_the_device(mechanism):
    """bf16 chooses the support; values, losses and gradients stay float32."""
    model, x, y = _on_device(mechanism, "sae")
    reference = _step(copy.deepcopy(model), x, y, sparse=True)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        got = _step(copy.deepcopy(model), x, y, sparse=True)
    for name in reference[1]:
        assert got[1][name].dtype == torch.float32
        assert got[1][name].item() == pytest.approx(reference[1][name].item(), rel=0.05), name
    for name, grad in got[4].items():
        assert grad.dtype == torch.float32 and torch.isfinite(grad).all(), name


def test_device_selections_and_gathers():
    g = torch.Generator().manual_seed(0)
    pre = torch.randn(300, 4096, generator=g).to(DEVICE)
    got = topk_indices(pre, 32).sort(-1).values
    assert torch.equal(got, pre.topk(32, dim=-1).indices.sort(-1).values)
    left, right = torch.randn(300, 24, generator=g).to(DEVICE), torch.randn(4096, 24, generator=g).to(DEVICE)
    support = Support.from_indices(topk_indices(pre, 32), 4096)
    expected = (left[support.rows] * right[support.cols]).sum(-1)
    torch.testing.assert_close(_gathered_dot(support, left, right), expected)


TRAINERS = {
    "topk": lambda **kw: TopKSAE(k=16, **kw),
    "batchtopk": lambda **kw: BatchTopKSAE(k=16, threshold_start_step=5, **kw),
    "relu_l1": lambda **kw: ReLUL1SAE(**kw),
    "gated": lambda **kw: GatedSAE(**kw),
    "jumprelu": lambda **kw: JumpReLUSAE(**kw),
}


def test_auto_path_under_autocast_on_the_device():
    """On a GPU under bf16 autocast TopK, BatchTopK and ReLU-L1 take the dense path (tensor cores
    outrun the gathers); gated and JumpReLU keep their sparse path (measured faster there). On the
    CPU, AMX or not, every mechanism keeps it."""
    models = {name: make(d_in=16, d_sae=4096).to(DEVICE) for name, make in TRAINERS.items()}
    assert all(_tries_sparse_path(model, "auto") for model in models.values())
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        sparse = {name for name, model in models.items() if _tries_sparse_path(model, "auto")}
    assert sparse == ({"gated", "jumprelu"} if DEVICE == "cuda" else set(TRAINERS))


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("mechanism", list(TRAINERS))
def test_training_on_the_device(mechanism, precision, small_file):
    """20 steps through Lightning on the sparse path: the loss falls, weights stay finite and on
    the device, unit-norm decoder rows stay unit-norm."""
    torch.manual_seed(0)
    model = TRAINERS[mechanism](d_in=16, d_sae=1024)
    losses, devices = [], set()

    class Record(__import__("lightning").Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))
            devices.add(pl_module.dictionary.W_dec.device.type)  # (Lightning moves the model back to the CPU at the end)

    accelerator = "gpu" if DEVICE == "cuda" else "cpu"
    trainer = quiet_trainer(accelerator=accelerator, max_steps=20, precision=precision, callbacks=[Record()])
    trainer.fit(DictionaryTraining(model, TrainingConfig(lr=3e-3, sparse_path="always")),
                ActivationDataModule(small_file, batch_size=256, block_size=64))
    assert trainer.global_step == 20
    assert devices == {DEVICE} and model.W_dec.dtype == torch.float32
    assert all(torch.isfinite(p).all() for p in model.parameters())
    if model.unit_norm_decoder:  # (the April ReLU-L1 recipe weights L1 by free decoder norms)
        torch.testing.assert_close(model.W_dec.norm(dim=-1), torch.ones(1024), rtol=0, atol=1e-5)
    assert sum(losses[-5:]) < sum(losses[:5])


@pytest.mark.slow
def test_embedded_model_harvest_fit_evaluate_on_the_device(tmp_path, capsys):
    """The quickstart's path on the device: harvest the embedded model, train a TopK SAE on the
    GPU, evaluate the spliced-in loss there."""
    from dictlearn.cli import RECIPES_DIR, main

    acts = tmp_path / "acts.h5"
    assert main(["harvest", "--tokens", "40000", "--out", str(acts), "--device", DEVICE]) == 0
    accelerator = "gpu" if DEVICE == "cuda" else "cpu"
    assert main([
        "fit", "--config", str(RECIPES_DIR / "topk.yaml"), "--data.path", str(acts),
        "--data.input_key", "transformer.h.2", "--model.d_sae", "1024", "--model.k", "16",
        "--data.batch_size", "1024", "--trainer.max_steps", "150", "--trainer.accelerator", accelerator,
        "--trainer.precision", "bf16-mixed", "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(tmp_path / "run"),
    ]) == 0  # fmt: skip
    export = next((tmp_path / "run").rglob("export/cfg.json")).parent
    capsys.readouterr()
    assert main(["evaluate", str(export), "--data", str(acts), "--device", DEVICE]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["ce_loss_recovered"] > 0.8 and result["fvu"] < 0.5
