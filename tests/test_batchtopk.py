"""BatchTopK SAE: batch selection in training, the global threshold θ at inference, its estimate,
export as a SAELens jumprelu, the recipe, exact resume (dictionaries/batchtopk.py)."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file

from saelens_reference import sae_lens_forward
from conftest import assert_same_state, crash_and_resume, quiet_trainer
from dictlearn.dictionaries.model import TrainingStep
from dictlearn.training import DictionaryTraining, Member, TrainingConfig
from dictlearn import ActivationDataModule, load
from dictlearn.dictionaries.batchtopk import BatchTopKSAE
from dictlearn.errors import ConfigError
from dictlearn.export import export

K, BATCH, STEPS, START, BETA = 3, 256, 80, 30, 0.9


# ------------------------------------------------------------------ constructor
@pytest.mark.parametrize(
    "kwargs, flag",
    [
        (dict(k=65), "--model.k"),
        (dict(threshold_beta=1.0), "--model.threshold_beta"),
        (dict(threshold_beta=-0.1), "--model.threshold_beta"),
        (dict(threshold_start_step=-1), "--model.threshold_start_step"),
    ],
)
def test_bad_arguments_name_their_flag(kwargs, flag):
    with pytest.raises(ConfigError, match=flag.replace(".", r"\.")):
        BatchTopKSAE(d_in=8, d_sae=64, **kwargs)


def test_hparams_rebuild_the_same_model():
    model = BatchTopKSAE(d_in=8, d_sae=32, k=3, threshold_beta=0.5, threshold_start_step=7)
    clone = BatchTopKSAE(**model.hparams)
    assert (clone.k, clone.threshold_beta, clone.threshold_start_step) == (3, 0.5, 7)
    assert clone.recommended_training() == model.recommended_training()  # TopK's lr law, Adam ε


# ------------------------------------------------------------------ formulas
def test_batch_selection_equals_a_float64_sort_reference():
    torch.manual_seed(0)
    model = BatchTopKSAE(d_in=8, d_sae=50, k=4)
    pre = torch.randn(20, 50) * torch.linspace(0.2, 3.0, 20)[:, None]  # rows of unequal scale
    pre[3] = -1.0 - torch.rand(50)  # a row with nothing positive
    z = model.activate(pre, training=True)
    model.sparsity_losses(None, None, pre, z, None, step=TrainingStep(step=0))  # θ ← the batch minimum
    flat = pre.double().clamp_min(0).flatten()
    cutoff = flat.sort(descending=True).values[20 * 4 - 1]  # the (B·k)-th largest value
    reference = torch.where((flat >= cutoff) & (flat > 0), flat, 0.0).view(20, 50)
    assert torch.equal(z.double(), reference)
    per_token = (z != 0).sum(-1)
    assert per_token.sum() == 20 * 4  # mean L0 = k exactly
    assert per_token.unique().numel() > 3 and per_token[3] == 0  # yet it varies per token
    assert model.threshold.dtype == torch.float64
    assert torch.equal(model.threshold, torch.full((50,), cutoff.item(), dtype=torch.float64))
    nothing = model.activate(-torch.rand(20, 50), training=True)
    model.sparsity_losses(None, None, pre, nothing, None, step=TrainingStep(step=0))  # nothing positive kept: θ stays
    assert torch.equal(model.threshold, torch.full((50,), cutoff.item(), dtype=torch.float64))


def test_inference_is_a_global_threshold_independent_of_the_batch():
    torch.manual_seed(1)
    model = BatchTopKSAE(d_in=8, d_sae=40, k=2)
    model.threshold.fill_(0.75)
    pre = torch.randn(30, 40)
    pd = pre.double()
    reference = torch.where(pd > 0.75, pd, 0.0)
    assert torch.equal(model.activate(pre).double(), reference)
    x = torch.randn(30, 8)
    with torch.no_grad():
        whole = model.encode(x)
        one_by_one = torch.cat([model.encode(row[None]) for row in x])
    torch.testing.assert_close(whole, one_by_one, rtol=0, atol=1e-6)


# ------------------------------------------------------------------ a short training run
class _Record(L.Callback):
    """Wraps the training-time `activate` to record, per training batch, the step, the per-token counts of
    active latents and the smallest kept positive value (recomputed here from the latents)."""

    def __init__(self):
        self.steps, self.counts, self.minima = [], [], []

    def on_fit_start(self, trainer, pl_module):
        original = pl_module.dictionary.activate

        def recording(pre, training=False):
            z = original(pre, training)
            if training:
                self.steps.append(trainer.global_step)
                self.counts.append((z != 0).sum(-1))
                self.minima.append(z[z > 0].min().item())
            return z

        pl_module.dictionary.activate = recording


@pytest.fixture(scope="module")
def trained(small_file, tmp_path_factory):
    L.seed_everything(0)
    # The dense path: _Record wraps `activate`, which the sparse path does not call
    # (tests/test_sparse_paths.py checks that both paths select the same latents).
    model = BatchTopKSAE(d_in=16, d_sae=64, k=K, threshold_start_step=START, threshold_beta=BETA)
    dm = ActivationDataModule(small_file, batch_size=BATCH, block_size=64)
    record = _Record()
    folder = tmp_path_factory.mktemp("batchtopk")
    checkpoint = ModelCheckpoint(dirpath=folder / "ckpt", save_last=True)
    trainer = quiet_trainer(max_steps=STEPS, enable_checkpointing=True, callbacks=[record, checkpoint])
    trainer.fit(DictionaryTraining(model, TrainingConfig(lr=3e-3, sparse_path="never")), dm)
    del model.activate  # back to the class method
    metrics = trainer.validate(DictionaryTraining(model), dm, verbose=False)[0]
    x = torch.cat([x for x, _ in dm.val_dataloader()])
    return model.eval(), dm, record, metrics, x, folder


def test_training_keeps_exactly_batch_times_k(trained):
    _, _, record, _, _, _ = trained
    assert record.steps == list(range(STEPS))
    for counts in record.counts:
        assert counts.sum().item() == BATCH * K  # mean L0 = k on every training batch
        assert counts.min() < K < counts.max()  # per-token counts vary


def test_threshold_is_the_ema_of_kept_minima(trained):
    """θ: the latest minimum before START, then θ ← β θ + (1 − β) m (float64 reference)."""
    model, _, record, _, _, _ = trained
    theta = 0.0
    for step, minimum in zip(record.steps, record.minima):
        theta = minimum if step < START else BETA * theta + (1 - BETA) * minimum
    assert model.threshold.unique().numel() == 1
    assert model.threshold[0].item() == pytest.approx(theta, rel=1e-12)


def test_inference_l0_on_held_out_data_is_near_k(trained):
    model, _, _, metrics, x, _ = trained
    with torch.no_grad():
        l0 = (model.encode(x) != 0).sum(-1).double().mean().item()
    assert l0 == pytest.approx(metrics["val/l0"], rel=1e-6)  # validation uses the threshold
    print(f"inference L0 {l0:.3f} for k = {K}")
    assert abs(l0 - K) <= 0.2 * K


def test_export_is_a_jumprelu_with_a_constant_threshold(trained):
    model, dm, _, _, x, folder = trained
    out = export(model, folder / "export", dm.provenance())
    cfg = json.loads((out / "cfg.json").read_text())
    w = load_file(str(out / "sae_weights.safetensors"))
    assert cfg["architecture"] == "jumprelu" and "k" not in cfg and cfg["apply_b_dec_to_input"] is True
    # θ in folded units: θ × ‖d_i‖ / target_scale, the same for every latent (unit decoder rows)
    expected = (model.threshold * model.W_dec.detach().double().norm(dim=-1) / model.target_scale.double()).float()
    assert w["threshold"].shape == (64,) and w["threshold"].dtype == torch.float32
    torch.testing.assert_close(w["threshold"], expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(w["threshold"], w["threshold"].mean().expand(64), rtol=1e-5, atol=0)
    assert float(model.target_scale) != pytest.approx(1.0)  # the scale really is folded
    with torch.no_grad():
        z, y = model.encode(x), model(x)
        for other in (load(out), load(folder / "ckpt" / "last.ckpt")):
            torch.testing.assert_close(other.encode(x), z, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(other(x), y, rtol=1e-4, atol=1e-4)
        z_ref, y_ref = sae_lens_forward(out, x)
    torch.testing.assert_close(z_ref, z, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(y_ref, y, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ exact resume
def test_resume_mid_run_is_bit_identical(small_file, tmp_path):
    # θ's EMA starts at step 10 and AuxK is active (small dead window) across the resume at 14
    def make():
        return Member(BatchTopKSAE(d_in=16, d_sae=48, k=3, threshold_start_step=10),
                      training=TrainingConfig(lr=3e-3, dead_window_tokens=256 * 3))

    reference, resumed, checkpoint = crash_and_resume(make, small_file, tmp_path, steps=24, checkpoint_every=7,
                                                      crash_at=17, resume_step=14)
    assert torch.load(checkpoint, weights_only=False)["state_dict"]["members.model.threshold"].abs().sum() > 0
    assert reference.dictionary.threshold.abs().sum() > 0
    assert_same_state(reference, resumed)
