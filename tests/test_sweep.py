"""Sweeps: several dictionaries trained on the same batches by one `DictionaryTraining`.

A member trained in a sweep must be bit-identical (CPU, fp32) to the same member trained alone on
the same batches and seed; a sweep resumes exactly; a member that goes non-finite stops the run
naming it, before any checkpoint holds the bad values; the CLI runs a sweep file.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

import dictlearn
from conftest import assert_same_state, crash_and_resume, quiet_trainer
from dictlearn import ActivationDataModule, BatchTopKSAE, GatedSAE, JumpReLUSAE, ReLUL1SAE, TopKSAE
from dictlearn.data import write_synth_file
from dictlearn.errors import NonFiniteError
from dictlearn.training import DictionaryTraining, Member, TrainingConfig

D, D_OUT, D_SAE, STEPS = 16, 12, 48, 25
COMMON = dict(d_in=D, d_sae=D_SAE)
TRAINING = TrainingConfig(lr=3e-3, dead_window_tokens=512)  # the run's; "topk_sparse" adds its own
TRANSCODER = dict(COMMON, d_out=D_OUT, transcoder=True)

# name -> (constructor, member seed, target key)
MEMBERS = {
    "topk": (lambda: TopKSAE(k=3, **COMMON), 0, None),
    "topk_sparse": (lambda: TopKSAE(k=3, **COMMON), 1, None),
    "relu_l1": (lambda: ReLUL1SAE(l1_coefficient=0.5, **COMMON), 2, None),
    "batchtopk": (lambda: BatchTopKSAE(k=3, threshold_start_step=5, **COMMON), 3, None),
    "gated": (lambda: GatedSAE(l1_coefficient=0.5, **COMMON), 4, None),
    "jumprelu": (lambda: JumpReLUSAE(threshold_init=0.3, bandwidth=0.2, **COMMON), 5, None),
    "topk_transcoder": (lambda: TopKSAE(k=3, **TRANSCODER), 6, "target"),
    "topk_skip_transcoder": (lambda: TopKSAE(k=3, skip_connection=True, **TRANSCODER), 0, "target"),
}


@pytest.fixture(scope="module")
def pair_file(tmp_path_factory):
    """Input 'acts' [d 16] and a row-aligned target 'target' [d 12] from the same codes."""
    path = tmp_path_factory.mktemp("sweep") / "pair.h5"
    write_synth_file(path, n_rows=16_384, d=D, n_features=32, mean_active=3.0, seed=2, d_out=D_OUT)
    return str(path)


def _data(path: str, target_key: str | None = None) -> ActivationDataModule:
    return ActivationDataModule(path, input_key="acts", target_key=target_key, batch_size=256, block_size=64)


def _member_training(name: str) -> TrainingConfig | None:
    return TrainingConfig(sparse_path="always") if name == "topk_sparse" else None


def _train(members, data: ActivationDataModule, **trainer_kwargs) -> DictionaryTraining:
    L.seed_everything(123)  # the members' seeds, not this one, decide their initial weights
    training = DictionaryTraining(members, TRAINING)
    quiet_trainer(max_steps=STEPS, **trainer_kwargs).fit(training, data)
    return training


def test_every_member_of_a_sweep_equals_the_same_member_trained_alone(pair_file):
    sweep = _train({name: Member(make(), target_key=key, seed=seed, training=_member_training(name))
                    for name, (make, seed, key) in MEMBERS.items()}, _data(pair_file))
    for name, (make, seed, key) in MEMBERS.items():
        alone = _train(Member(make(), seed=seed, training=_member_training(name)), _data(pair_file, target_key=key))
        assert_same_state(alone.dictionary, sweep.members[name])
        assert_same_state(alone.activity["model"], sweep.activity[name])
        assert int(sweep.activity[name].tokens_since_fired.min()) == 0, name  # it trained
    assert sweep.settings["topk_sparse"].sparse_path == "always" and sweep.settings["topk"].sparse_path == "auto"
    topk, other_seed = sweep.members["topk"], sweep.members["topk_sparse"]
    assert not torch.equal(topk.W_dec, other_seed.W_dec)


def test_members_reading_the_same_datasets_share_one_sample_and_one_median(pair_file, monkeypatch):
    """The data-dependent starts read one sample per pair of datasets and compute one geometric
    median per target (the test above proves the values are each member's own)."""
    import dictlearn.training.initialise as initialise

    reads, medians = [], []
    sample_pair, median = ActivationDataModule._sample_pair, initialise.geometric_median
    monkeypatch.setattr(ActivationDataModule, "_sample_pair",
                        lambda self, x, y, n: reads.append((x.key, y and y.key)) or sample_pair(self, x, y, n))
    monkeypatch.setattr(initialise, "geometric_median", lambda y: medians.append(y.shape) or median(y))
    members = {name: Member(make(), target_key=key, seed=seed) for name, (make, seed, key) in MEMBERS.items()}
    L.seed_everything(0)
    quiet_trainer(max_steps=1).fit(DictionaryTraining(members, TRAINING), _data(pair_file))
    assert len(reads) == 2 and set(reads) == {("acts", None), ("acts", "target")}
    wanted = {(MEMBERS[name][2], m.dictionary.b_dec_init) for name, m in members.items()}
    assert sorted(width for _, width in medians) == sorted(D if key is None else D_OUT for key, start in wanted
                                                         if start == "geometric_median")


def test_members_seeds_decide_their_initial_weights():
    torch.manual_seed(0)
    a = DictionaryTraining(Member(TopKSAE(k=3, **COMMON), seed=7)).dictionary
    torch.randn(1000)  # whatever the process drew before
    b = DictionaryTraining(Member(TopKSAE(k=3, **COMMON), seed=7)).dictionary
    c = DictionaryTraining(Member(TopKSAE(k=3, **COMMON), seed=8)).dictionary
    assert torch.equal(a.W_enc, b.W_enc) and torch.equal(a.W_dec, b.W_dec)
    assert not torch.equal(a.W_dec, c.W_dec)
    torch.testing.assert_close(a.W_dec.norm(dim=-1), torch.ones(D_SAE))


def test_a_sweep_resumes_bit_identically(small_file, tmp_path):
    def make():
        kwargs = dict(d_in=16, d_sae=32)
        return DictionaryTraining({
            "topk": Member(TopKSAE(k=3, **kwargs), seed=0),
            "batchtopk": Member(BatchTopKSAE(k=3, threshold_start_step=4, **kwargs), seed=1),
            "relu": Member(ReLUL1SAE(l1_coefficient=0.5, **kwargs), seed=2),
        }, TrainingConfig(lr=3e-3, dead_window_tokens=256))

    reference, resumed, _ = crash_and_resume(make, small_file, tmp_path, steps=20, checkpoint_every=6,
                                             crash_at=9, resume_step=6)
    assert_same_state(reference, resumed)


class _Poison(L.Callback):
    """Puts a NaN into one member's decoder at the start of step `at`."""

    def __init__(self, member: str, at: int):
        self.member, self.at = member, at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at:
            with torch.no_grad():
                pl_module.members[self.member].W_dec[0, 0] = float("nan")


def test_a_member_going_non_finite_stops_the_sweep_naming_it(small_file, tmp_path):
    members = {"good": Member(TopKSAE(d_in=16, d_sae=32, k=3), seed=0),
               "bad": Member(ReLUL1SAE(d_in=16, d_sae=32), seed=1)}
    checkpoints = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1)
    with pytest.raises(NonFiniteError, match=r"member 'bad': step 5 .*loss is nan"):
        _train(members, _data(small_file), enable_checkpointing=True, callbacks=[checkpoints, _Poison("bad", 5)])
    saved = sorted(tmp_path.glob("*.ckpt"))
    assert [p.name for p in saved] == [f"epoch=0-step={s}.ckpt" for s in range(1, 6)]
    for path in saved:  # the step that met the NaN wrote nothing; what was written is finite
        state = torch.load(path, weights_only=False)["state_dict"]
        assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point()), path


def test_a_single_member_logs_and_names_as_before(small_file, tmp_path):
    training = DictionaryTraining(TopKSAE(d_in=16, d_sae=32, k=3))
    assert training.prefix("model") == "" and training.dictionary is training.members["model"]
    two = DictionaryTraining({"a": TopKSAE(d_in=16, d_sae=32, k=3), "b": TopKSAE(d_in=16, d_sae=32, k=3)})
    assert two.prefix("a") == "a/"
    with pytest.raises(dictlearn.errors.ConfigError, match="trains 2 dictionaries"):
        two.dictionary
    with pytest.raises(dictlearn.errors.ConfigError, match="member name 'a.b'"):
        DictionaryTraining({"a.b": TopKSAE(d_in=16, d_sae=32, k=3)})


# ------------------------------------------------------------------ the CLI
SWEEP_YAML = """
training:
  dead_window_tokens: 1024
sweep:
  topk:
    dictionary: {class_path: dictlearn.TopKSAE, init_args: {d_sae: 48, k: 3}}
  relu:
    dictionary: {class_path: dictlearn.ReLUL1SAE, init_args: {d_sae: 48, l1_coefficient: 0.5}}
    seed: 3
    training: {lr: 1.0e-3, lr_decay_fraction: 0.0}
  transcoder:
    dictionary: {class_path: dictlearn.TopKSAE, init_args: {d_sae: 48, k: 3, transcoder: true}}
    target_key: target
"""


def _fit_sweep(config: Path, data: str, root: Path, *flags: str) -> int:
    from dictlearn.cli import main

    return main([
        "fit", "--config", str(config), "--data.path", data, "--data.input_key", "acts",
        "--data.batch_size", "256", "--trainer.max_steps", "12", "--trainer.val_check_interval", "12",
        "--trainer.log_every_n_steps", "4", "--trainer.default_root_dir", str(root),
        "--trainer.enable_progress_bar", "false", *flags,
    ])  # fmt: skip


def test_cli_trains_a_sweep_file_with_one_export_and_log_prefix_per_member(pair_file, tmp_path):
    config = tmp_path / "sweep.yaml"
    config.write_text(SWEEP_YAML)
    assert _fit_sweep(config, pair_file, tmp_path / "runs") == 0
    run = tmp_path / "runs" / "lightning_logs" / "version_0"
    for name in ("topk", "relu", "transcoder"):
        cfg = json.loads((run / "exports" / name / "cfg.json").read_text())
        assert cfg["d_sae"] == 48
    assert json.loads((run / "exports" / "transcoder" / "cfg.json").read_text())["metadata"]["dictlearn"][
        "hyper_parameters"]["d_out"] == D_OUT
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    columns = set(rows[0])
    assert {"topk/train/fvu", "relu/val/l0", "transcoder/val/fvu"} <= columns
    assert "train/fvu" not in columns
    # a sweep writes its train values itself (not through self.log): one row per log step (every
    # 4th of 12), at Lightning's step and epoch, every member's losses and metrics in it
    train_rows = [row for row in rows if row["topk/train/fvu"]]
    assert [int(row["step"]) for row in train_rows] == [3, 7, 11]
    for row in train_rows:
        assert row["epoch"] == "0"
        for name in ("topk", "relu", "transcoder"):
            assert all(row[f"{name}/train/{key}"] for key in ("loss", "fvu", "l0", "dead_fraction")), name
        assert row["relu/train/l1_coefficient"] and not row["relu/val/fvu"]
    # a sweep checkpoint loads member by member, and asks which one otherwise
    checkpoint = run / "checkpoints" / "last.ckpt"
    relu = dictlearn.load(checkpoint, member="relu")
    exported = dictlearn.load(run / "exports" / "relu")
    x = torch.randn(32, D)
    torch.testing.assert_close(relu(x), exported(x), rtol=1e-4, atol=1e-5)
    with pytest.raises(dictlearn.errors.DataError, match="a sweep of 3 dictionaries; name one"):
        dictlearn.load(checkpoint)
    # each member trained with the run's `training:` and its own on top, as its checkpoint records
    trained = torch.load(checkpoint, weights_only=False)["dictlearn_members"]
    assert trained["relu"]["training"]["lr"] == 1e-3 and trained["relu"]["training"]["lr_decay_fraction"] == 0.0
    assert trained["relu"]["training"]["sparsity_warmup_fraction"] == 0.05  # ReLU-L1's own (April 2024)
    assert {trained[name]["training"]["dead_window_tokens"] for name in trained} == {1024}
    assert trained["topk"]["training"]["lr"] == pytest.approx(2e-4 / (48 / 2**14) ** 0.5)  # TopK's lr law


def test_cli_member_trained_in_a_sweep_equals_a_recipe_run(pair_file, tmp_path):
    """The CLI's `model:` run is a sweep of one seeded by seed_everything, like a member."""
    from dictlearn.cli import RECIPES_DIR

    config = tmp_path / "sweep.yaml"
    config.write_text(SWEEP_YAML)
    assert _fit_sweep(config, pair_file, tmp_path / "sweep") == 0
    assert _fit_sweep(RECIPES_DIR / "topk.yaml", pair_file, tmp_path / "solo", "--model.d_sae", "48",
                      "--model.k", "3", "--training.dead_window_tokens", "1024") == 0
    sweep = dictlearn.load(tmp_path / "sweep" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt", "topk")
    solo = dictlearn.load(tmp_path / "solo" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt")
    assert_same_state(solo, sweep)


def test_cli_rejects_a_sweep_and_a_model_together_and_a_transcoder_without_target(pair_file, tmp_path, capsys):
    from dictlearn.cli import RECIPES_DIR

    config = tmp_path / "sweep.yaml"
    config.write_text(SWEEP_YAML)
    assert _fit_sweep(config, pair_file, tmp_path / "a", "--config", str(RECIPES_DIR / "topk.yaml")) == 2
    assert "either --model" in capsys.readouterr().err
    config.write_text(SWEEP_YAML.replace("    target_key: target\n", ""))
    assert _fit_sweep(config, pair_file, tmp_path / "b") == 2
    assert "sweep member 'transcoder' is a transcoder: give it a target_key" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
