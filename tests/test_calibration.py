"""`SparsityCalibration`: the controller on log λ reaches a target L0, freezes, and resumes exactly."""

from __future__ import annotations

import math
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from dictlearn import GatedSAE, JumpReLUSAE, ReLUL1SAE, TopKSAE
from dictlearn.data import ActivationDataModule
from dictlearn.errors import ConfigError
from conftest import initialise
from dictlearn.training import DictionaryTraining, Member, TrainingConfig
from dictlearn.training.config import resolve
from dictlearn.training.calibration import SparsityCalibration, coefficient_attribute, start_at_target


class FakeSweep:
    """Members whose training L0 is a known function of their coefficient: L0 = c / λ."""

    def __init__(self, members: dict, constants: dict) -> None:
        self.members, self.constants, self.last_step_l0 = members, constants, {}
        self.settings = {name: resolve(m) for name, m in members.items()}  # each member's training

    def step(self) -> None:
        self.last_step_l0 = {
            name: torch.tensor(self.constants[name] / getattr(m, coefficient_attribute(m)))
            for name, m in self.members.items()
        }


def _trainer(step: int, total: int):
    return SimpleNamespace(global_step=step, max_steps=total, world_size=1)


def _drive(callback: SparsityCalibration, sweep: FakeSweep, first: int, last: int, total: int) -> list[dict]:
    history = []
    for step in range(first, last):
        callback.on_train_batch_start(_trainer(step, total), sweep, None, step)
        sweep.step()
        callback.on_train_batch_end(_trainer(step + 1, total), sweep, None, None, step)
        history.append(callback.coefficients())
    return history


def _members():
    return {"relu": ReLUL1SAE(d_in=8, d_sae=16, l1_coefficient=1.0),
            "gated": GatedSAE(d_in=8, d_sae=16, l1_coefficient=1.0),
            "jump": JumpReLUSAE(d_in=8, d_sae=16, l0_coefficient=1.0)}


def test_coefficient_attributes():
    members = _members()
    assert [coefficient_attribute(m) for m in members.values()] == ["l1_coefficient", "l1_coefficient", "l0_coefficient"]
    assert coefficient_attribute(TopKSAE(d_in=8, d_sae=16, k=2)) is None


def test_controller_reaches_the_closed_form_coefficient_and_freezes():
    # L0 = c / λ: the coefficient that gives target t is exactly c / t.
    constants, targets = {"relu": 40.0, "gated": 3.0, "jump": 500.0}, {"relu": 8.0, "gated": 16.0, "jump": 32.0}
    sweep = FakeSweep(_members(), constants)
    # a short average (8 steps): the frozen value is then the converged one, not the approach's mean
    callback = SparsityCalibration(targets, start_fraction=0.1, control_fraction=0.5, gain=0.2, horizon=0.0,
                                   average_fraction=0.02)
    callback.on_fit_start(_trainer(0, 400), sweep)
    history = _drive(callback, sweep, 0, 400, 400)
    assert history[39] == {name: 1.0 for name in targets}  # untouched for the first 10% of steps
    for name, target in targets.items():
        expected = constants[name] / target
        assert history[199][name] == pytest.approx(expected, rel=1e-3), name
        assert history[-1][name] == history[200][name]  # frozen after half the steps
        member = sweep.members[name]
        attribute = coefficient_attribute(member)
        assert getattr(member, attribute) == history[-1][name]
        assert member.hparams[attribute] == history[-1][name]  # the export records λ reached
        assert sweep.settings[name].sparsity_warmup_fraction == 0.0


class LaggingSweep(FakeSweep):
    """L0 heads for c / λ but, like a trained dictionary, moves at most `rate` in log units per step."""

    def __init__(self, members, constants, rate: float = 0.02) -> None:
        super().__init__(members, constants)
        self.rate, self.log_l0 = rate, {name: math.log(64.0) for name in members}

    def step(self) -> None:
        for name, m in self.members.items():
            goal = math.log(self.constants[name] / getattr(m, coefficient_attribute(m)))
            move = max(-self.rate, min(self.rate, goal - self.log_l0[name]))
            self.log_l0[name] += move
        self.last_step_l0 = {name: torch.tensor(math.exp(v)) for name, v in self.log_l0.items()}


def test_look_ahead_avoids_the_overshoot_of_a_plain_integral_controller():
    undershoot = {}
    for horizon in (0.0, 0.1):
        sweep = LaggingSweep({"relu": ReLUL1SAE(d_in=8, d_sae=16, l1_coefficient=1.0)}, {"relu": 40.0})
        callback = SparsityCalibration({"relu": 8.0}, start_fraction=0.0, control_fraction=1.0, horizon=horizon)
        callback.on_fit_start(_trainer(0, 300), sweep)
        l0 = []
        for step in range(300):
            callback.on_train_batch_start(_trainer(step, 300), sweep, None, step)
            sweep.step()
            l0.append(math.exp(sweep.log_l0["relu"]))
            callback.on_train_batch_end(_trainer(step + 1, 300), sweep, None, None, step)
        undershoot[horizon] = min(l0)
        final = l0[-1]
    assert undershoot[0.0] < 0.5 * 8.0  # the plain controller winds up: L0 falls far below target
    assert undershoot[0.1] > 0.8 * 8.0 and final == pytest.approx(8.0, rel=0.05)


def test_one_step_is_bounded_and_scale_free():
    # A member 4x over target and one 4x under move log λ by the same amount, opposite ways.
    sweep = FakeSweep({"a": ReLUL1SAE(d_in=8, d_sae=16, l1_coefficient=1.0),
                       "b": ReLUL1SAE(d_in=8, d_sae=16, l1_coefficient=1.0)}, {"a": 32.0, "b": 2.0})
    callback = SparsityCalibration({"a": 8.0, "b": 8.0}, start_fraction=0.0, gain=0.05, max_log_step=0.1)
    callback.on_fit_start(_trainer(0, 100), sweep)
    _drive(callback, sweep, 0, 1, 100)
    step = 0.05 * math.log(4.0)
    assert math.log(callback.coefficients()["a"]) == pytest.approx(step)
    assert math.log(callback.coefficients()["b"]) == pytest.approx(-step)
    sweep.constants = {"a": 1e6, "b": 1e6}  # far off: clamped to max_log_step
    before = math.log(callback.coefficients()["a"])
    _drive(callback, sweep, 1, 2, 100)
    assert math.log(callback.coefficients()["a"]) - before == pytest.approx(0.1)


class SwingingSweep(FakeSweep):
    """L0 = c / λ times a factor that alternates ×2, ×½ every 10 steps: λ swings around c / t."""

    def step(self) -> None:
        super().step()
        self.calls = getattr(self, "calls", 0) + 1
        swing = 2.0 if (self.calls // 10) % 2 else 0.5
        self.last_step_l0 = {name: value * swing for name, value in self.last_step_l0.items()}


def test_the_frozen_coefficient_is_the_average_not_the_last_value():
    total, control = 200, 0.8
    sweep = SwingingSweep({"relu": ReLUL1SAE(d_in=8, d_sae=16, l1_coefficient=1.0)}, {"relu": 40.0})
    callback = SparsityCalibration({"relu": 8.0}, start_fraction=0.0, control_fraction=control, gain=0.2,
                                   horizon=0.0, average_fraction=0.1)
    callback.on_fit_start(_trainer(0, total), sweep)
    logs, average = [], None
    for step in range(int(control * total)):  # the controller's own steps, then the EMA by hand
        callback.on_train_batch_start(_trainer(step, total), sweep, None, step)
        sweep.step()
        callback.on_train_batch_end(_trainer(step + 1, total), sweep, None, None, step)
        logs.append(math.log(callback.coefficients()["relu"]))
    controlled = [math.log(h["relu"]) for h in _drive(callback, sweep, int(control * total), total, total)]
    # replay: the EMA of the unfrozen values (the last step's is the one replaced by the average)
    replay = SparsityCalibration({"relu": 8.0}, start_fraction=0.0, control_fraction=1.0, gain=0.2, horizon=0.0)
    replay_sweep = SwingingSweep({"relu": ReLUL1SAE(d_in=8, d_sae=16, l1_coefficient=1.0)}, {"relu": 40.0})
    replay.on_fit_start(_trainer(0, total), replay_sweep)
    raw = [math.log(h["relu"]) for h in _drive(replay, replay_sweep, 0, int(control * total), total)]
    for value in raw:
        average = value if average is None else average + (value - average) / (0.1 * total)
    assert logs[-1] == pytest.approx(average, abs=1e-12) and controlled == [logs[-1]] * len(controlled)
    assert max(raw[-40:]) - min(raw[-40:]) > 0.3  # it did swing, and the last raw value is off the average
    assert abs(raw[-1] - average) > 0.05 and average == pytest.approx(math.log(40.0 / 8.0), abs=0.15)


def test_start_at_target_sets_the_starting_l0(small_file):
    """ReLU-L1: each latent fires on target/d_sae of the sample; JumpReLU: one θ where the sample's
    L0 is the target; gated and TopK are left alone."""
    data = ActivationDataModule(small_file, batch_size=256)
    data.setup("fit")
    members = {"relu": ReLUL1SAE(d_in=16, d_sae=64, decoder_constraint="unit_norm"),
               "jump": JumpReLUSAE(d_in=16, d_sae=64), "gated": GatedSAE(d_in=16, d_sae=64),
               "topk": TopKSAE(d_in=16, d_sae=64, k=4)}
    for member in members.values():
        initialise(member, data)
    before = {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in members.items()}
    for member in members.values():
        start_at_target(member, 6.0, data, ("acts", None))
    x = data.view("acts", None).sample_rows(8192)[0] * members["relu"].input_scale
    with torch.no_grad():
        fired = (members["relu"].activate(members["relu"].pre_acts(x)) > 0).double()
        assert fired.sum(1).mean().item() == pytest.approx(6.0, rel=0.02)
        assert fired.mean(0).numpy() == pytest.approx(6.0 / 64, abs=1.0 / 8192 + 1e-12)  # every latent alike
        jump = members["jump"]
        jump_fired = (jump.pre_acts(x * jump.input_scale / members["relu"].input_scale) > jump.threshold).double()
        assert jump_fired.sum(1).mean().item() == pytest.approx(6.0, rel=0.02)
        assert len(set(jump.log_threshold.tolist())) == 1
    for name in ("gated", "topk"):
        assert all(torch.equal(v, before[name][k]) for k, v in members[name].state_dict().items()), name


def test_the_controlled_start_puts_jumprelu_above_its_target(small_file):
    """The callback's start: ReLU-L1 at its target, JumpReLU at 1.25× (its controller can only lower L0)."""
    data = ActivationDataModule(small_file, batch_size=256)
    data.setup("fit")
    members = {"relu": ReLUL1SAE(d_in=16, d_sae=64, decoder_constraint="unit_norm"),
               "jump": JumpReLUSAE(d_in=16, d_sae=64)}
    for member in members.values():
        initialise(member, data)
    sweep = SimpleNamespace(members=members, data_keys=lambda name, datamodule: ("acts", None))
    trainer = SimpleNamespace(global_step=0, datamodule=data)
    SparsityCalibration({"relu": 6.0, "jump": 6.0}).on_train_start(trainer, sweep)
    x = data.view("acts", None).sample_rows(8192)[0]
    with torch.no_grad():
        l0 = {name: (m.activate(m.pre_acts(x * m.input_scale)) != 0).double().sum(1).mean().item()
              for name, m in members.items()}
    assert l0["relu"] == pytest.approx(6.0, rel=0.02)
    assert l0["jump"] == pytest.approx(7.5, rel=0.02)


def test_state_dict_round_trip_continues_identically():
    constants, targets = {"relu": 40.0, "gated": 3.0, "jump": 500.0}, {"relu": 8.0, "gated": 16.0, "jump": 32.0}
    whole = SparsityCalibration(targets, control_fraction=0.8)
    sweep = FakeSweep(_members(), constants)
    whole.on_fit_start(_trainer(0, 100), sweep)
    expected = _drive(whole, sweep, 0, 100, 100)

    first = SparsityCalibration(targets, control_fraction=0.8)
    sweep = FakeSweep(_members(), constants)
    first.on_fit_start(_trainer(0, 100), sweep)
    _drive(first, sweep, 0, 37, 100)
    second = SparsityCalibration(targets, control_fraction=0.8)
    second.load_state_dict(first.state_dict())
    sweep = FakeSweep(_members(), constants)  # freshly built members, as a resumed process has
    second.on_fit_start(_trainer(37, 100), sweep)
    assert _drive(second, sweep, 37, 100, 100) == expected[37:]


def test_bad_arguments_are_one_line_errors():
    with pytest.raises(ConfigError, match="must be > 0"):
        SparsityCalibration({"a": 0})
    with pytest.raises(ConfigError, match="start_fraction < control_fraction"):
        SparsityCalibration({"a": 4}, start_fraction=0.5, control_fraction=0.5)
    callback = SparsityCalibration({"topk": 4})
    with pytest.raises(ConfigError, match="no sparsity coefficient"):
        callback.on_fit_start(_trainer(0, 10), FakeSweep({"topk": TopKSAE(d_in=8, d_sae=16, k=2)}, {}))
    with pytest.raises(ConfigError, match="targets differ"):
        SparsityCalibration({"a": 4}).load_state_dict({"log_coefficient": {"a": 0.0}, "targets": {"a": 8.0}})


# ------------------------------------------------------------------ in a real sweep, through a resume
def _fit(data: str, root, steps: int, ckpt_path=None, callbacks=()):
    module = DictionaryTraining({
        "relu": Member(ReLUL1SAE(d_sae=64, d_in=16, l1_coefficient=1.0), seed=0),
        "jump": Member(JumpReLUSAE(d_sae=64, d_in=16, l0_coefficient=0.3), seed=1),
    }, TrainingConfig(lr=1e-3))
    calibration = SparsityCalibration({"relu": 6.0, "jump": 6.0}, control_fraction=0.75, gain=0.1)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, use_distributed_sampler=False, callbacks=[calibration, *callbacks],
                        default_root_dir=str(root))
    trainer.fit(module, ActivationDataModule(data, batch_size=256, val_rows=0), ckpt_path=ckpt_path)
    return trainer, module, calibration


class StopAt(L.Callback):
    def __init__(self, step: int, path) -> None:
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)
            trainer.should_stop = True


@pytest.mark.slow
def test_resumed_sweep_is_bit_identical(small_file, tmp_path):
    _, whole, whole_calibration = _fit(small_file, tmp_path / "a", 40)
    ckpt = tmp_path / "half.ckpt"
    _fit(small_file, tmp_path / "b", 40, callbacks=[StopAt(17, ckpt)])
    _, resumed, resumed_calibration = _fit(small_file, tmp_path / "c", 40, ckpt_path=str(ckpt))
    assert resumed_calibration.log_coefficient == whole_calibration.log_coefficient
    assert whole_calibration.coefficients()["relu"] != 1.0  # it moved
    for name in ("relu", "jump"):
        for (key, a), b in zip(whole.members[name].state_dict().items(), resumed.members[name].state_dict().values()):
            assert torch.equal(a, b), (name, key)


def test_a_sweep_with_nothing_to_calibrate_trains(small_file):
    """Every member has a k (e.g. `dictlearn compare --architectures topk,topk_transcoder`): the
    callback has no target and must leave the run alone."""
    from conftest import quiet_trainer

    module = DictionaryTraining({"topk": Member(TopKSAE(d_in=16, d_sae=32, k=4), "acts")})
    calibration = SparsityCalibration({})
    quiet_trainer(max_steps=5, callbacks=[calibration]).fit(module, ActivationDataModule(small_file, batch_size=256))
    assert calibration.coefficients() == {} and module.global_step == 5
