"""`DictionaryTraining`: the one LightningModule that trains one or many dictionaries (a sweep).

Every member reads the same batch (one HDF5 read per step for all of them) and is otherwise
independent: its own Adam parameter group (learning rate, betas, eps), LR and sparsity schedules,
gradient clipping, decoder constraint, dead-latent counters, metrics and export. A member's
gradients come from its own loss only, so a member trained in a sweep is bit-identical to the same
member trained alone on the same batches and seed (tests/test_sweep.py).

    one member:      logs train/fvu, val/l0, ...            export: <log_dir>/export
    several members: logs <name>/train/fvu, <name>/val/l0   exports: <log_dir>/exports/<name>
"""

from __future__ import annotations

from collections.abc import Mapping

import lightning as L
import torch
from torch import Tensor, nn

from dictlearn.dictionaries.init import warmup_decay_factor
from dictlearn.dictionaries.model import Dictionary, TrainingStep
from dictlearn.errors import ConfigError
from dictlearn.metrics.reconstruction import TargetStatistics
from dictlearn.training.calibration import coefficient_attribute
from dictlearn.training.checkpoints import check_and_upgrade, save_members
from dictlearn.training.config import DEAD_WINDOW_TOKENS, TrainingConfig, dead_window_for, resolve
from dictlearn.training.guards import check_batch_finite, check_gradients_finite, raise_nonfinite_loss
from dictlearn.training.initialise import SharedSample, initialise_from_data
from dictlearn.training.members import LatentActivity, Member, MemberMetrics, as_members, update_activity
from dictlearn.training.optimiser import adam_with_schedules, clip_members, fused_adam_possible, split, total_steps
from dictlearn.training.resample import resample_dead_latents
from dictlearn.training.stack import stack_key, stacked_training_losses, stacks

class DictionaryTraining(L.LightningModule):
    """Trains `members` (a Dictionary, a Member, or {name: Dictionary | Member}) on the same
    batches, each with `training` (the run's `TrainingConfig`) overridden by its Member's own;
    `stack`: members of one mechanism and shape as one stacked computation (training/stack.py)."""

    def __init__(self, members: Dictionary | Member | Mapping[str, Dictionary | Member],
                 training: TrainingConfig | None = None, stack: bool = False):
        super().__init__()
        #: train members of one mechanism and shape as one stacked computation (training/stack.py);
        #: each member's results are those it gets alone
        self.stack = stack
        specs = as_members(members)
        self.members = nn.ModuleDict({name: spec.dictionary for name, spec in specs.items()})
        #: each member's resolved training settings (training/config.py)
        self.settings = {name: resolve(spec.dictionary, training, spec.training) for name, spec in specs.items()}
        self.activity = nn.ModuleDict({name: LatentActivity(d.d_sae) for name, d in self.members.items()})
        # tokens without firing after which a latent is dead; a run-long default set at fit start
        self.dead_windows = {name: s.dead_window_tokens or DEAD_WINDOW_TOKENS for name, s in self.settings.items()}
        self.member_keys = {name: (spec.input_key, spec.target_key) for name, spec in specs.items()}
        self.metrics = nn.ModuleDict({name: MemberMetrics(d.d_sae, d.d_out) for name, d in self.members.items()})
        self.last_step_l0: dict[str, Tensor] = {}
        self._train_row: dict = {}  # a sweep's train values of the step, written as one row
        self.validated_at_step: int | None = None  # the training step the last validation ran at
        for spec in specs.values():
            if spec.seed is not None:
                spec.dictionary.reset_parameters(spec.seed)

    # ----------------------------------------------------------------- members and their data
    @property
    def dictionary(self) -> Dictionary:
        """The one member of a single-dictionary run."""
        if len(self.members) != 1:
            raise ConfigError(f"this run trains {len(self.members)} dictionaries; pick one of {list(self.members)}")
        return next(iter(self.members.values()))

    def prefix(self, name: str) -> str:
        """Log-key prefix of member `name`: none for a single dictionary, `<name>/` in a sweep."""
        return "" if len(self.members) == 1 else f"{name}/"

    def _label(self, name: str) -> str:
        return "" if len(self.members) == 1 else f"member '{name}': "

    def data_keys(self, name: str, datamodule) -> tuple[str, str | None]:
        """(input key, target key or None) of member `name` in `datamodule`."""
        input_key, target_key = self.member_keys[name]
        if target_key is None and self.members[name].transcoder:
            target_key = datamodule.target_key
        return input_key or datamodule.input_key, target_key

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        if datamodule is None:
            raise ConfigError("a dictionary trains from an ActivationDataModule (--data); none was given")
        keys = [key for name in self.members for key in self.data_keys(name, datamodule) if key is not None]
        datamodule.require_keys(keys)

    def _datamodule(self):
        return getattr(self._trainer, "datamodule", None)

    def _member_batch(self, name: str, batch) -> tuple[Tensor, Tensor]:
        """Member `name`'s (x, y) raw tensors from a batch of the data module's keys (y is x: SAE);
        without a data module (a loop of its own), the batch is (x, y)."""
        datamodule = self._datamodule()
        if datamodule is None:
            return batch[0], batch[1]
        input_key, target_key = self.data_keys(name, datamodule)
        x = batch[datamodule.batch_index(input_key)]
        return x, (x if target_key is None else batch[datamodule.batch_index(target_key)])

    def _check_batch(self, batch, batch_idx: int, stage: str = "") -> None:
        """Every tensor of the batch is finite, else one line naming the file and key."""
        datamodule = self._datamodule()
        names = [f"{datamodule.path}['{key}']" for key in datamodule.batch_keys] if datamodule else ["input", "target"]
        seen: set[int] = set()
        for name, tensor in zip(names, batch):
            if id(tensor) not in seen:
                seen.add(id(tensor))
                check_batch_finite(tensor, f"{name}{stage}", self.global_step, batch_idx)

    # ----------------------------------------------------------------- training
    def training_step(self, batch, batch_idx: int) -> Tensor:
        self._check_batch(batch, batch_idx)
        results, loss = {}, 0
        for group in self._stacks():
            inputs = {}
            for name in group:
                member = self.members[name]
                x_raw, y_raw = self._member_batch(name, batch)
                step = self._training_step(name, x_raw, y_raw)
                x = x_raw * member.input_scale
                inputs[name] = (x_raw, y_raw, x, x if y_raw is x_raw else y_raw * member.target_scale, step)
            for name, result in zip(group, self._group_losses(group, inputs)):
                member_loss = sum(result.losses.values())
                results[name] = (inputs[name][1], result, member_loss)
                loss = loss + member_loss
        if not torch.isfinite(loss):  # one check (a device sync) for all members; name the first bad one
            labelled = {self._label(name): r for name, r in results.items()}
            raise_nonfinite_loss({label: r[2] for label, r in labelled.items()},
                                 {label: r[1].losses for label, r in labelled.items()}, self.global_step, batch_idx)
        with torch.no_grad():
            # this step's training L0 per member, a 0-d tensor (read by sparsity controllers)
            self.last_step_l0 = {name: r[1].fire_counts.sum() / len(batch[0]) for name, r in results.items()}
            # int64 once per member: the dead counters and both sparsity metrics add it as int64
            counts = {name: r[1].fire_counts.to(torch.int64) for name, r in results.items()}
            self._update_fired(counts, len(batch[0]))
            targets: dict[int, TargetStatistics] = {}  # members reading one target share its statistics
            for name, (y_raw, result, member_loss) in results.items():
                if id(y_raw) not in targets:
                    targets[id(y_raw)] = TargetStatistics(y_raw)
                self._log_train(name, y_raw, result, len(batch[0]), member_loss, counts[name], targets[id(y_raw)])
            self._write_train_row()
        return loss

    def _stacks(self) -> list[list[str]]:
        """The members in training groups: a stack of several trains as one computation
        (training/stack.py), a group of one alone. Without `stack`, every member alone."""
        if not self.stack or torch.is_autocast_enabled(self.device.type):
            return [[name] for name in self.members]
        return stacks({name: stack_key(member, self.settings[name].sparse_path)
                       for name, member in self.members.items()})

    def _group_losses(self, group: list[str], inputs: dict) -> list:
        """Each member's StepResult of a training group (`_stacks`) from its (x_raw, y_raw, x, y, step)."""
        if len(group) == 1:
            _, _, x, y, step = inputs[group[0]]
            return [self.members[group[0]].training_losses(x, y, step)]
        columns = list(zip(*(inputs[name] for name in group)))
        return stacked_training_losses([self.members[name] for name in group], *columns[2:])

    def _training_step(self, name: str, x_raw: Tensor, y_raw: Tensor) -> TrainingStep:
        """What member `name` is told about this step, after resampling its dead latents when
        this is a resampling step (training/resample.py)."""
        settings, activity, step = self.settings[name], self.activity[name], self.global_step
        dead = activity.dead(self.dead_windows[name])
        every = settings.resample_every_steps
        if every and step > 0 and step % every == 0 and dead.any():
            resample_dead_latents(self.members[name], x_raw, y_raw, dead, step, settings.resample_encoder_scale,
                                  self._optimizer_state(), self._broadcast)
            activity.tokens_since_fired[dead] = 0
            dead = activity.dead(self.dead_windows[name])
        return TrainingStep(step, self.sparsity_scale(name), dead, settings.sparse_path)

    def sparsity_scale(self, name: str) -> float:
        """Member `name`'s sparsity-coefficient warm-up factor at this step, in [0, 1]
        (docs/conventions.md#schedules)."""
        total = self._total_steps()
        return warmup_decay_factor(self.global_step, total, self.settings[name].sparsity_warmup_fraction * total)

    def _update_fired(self, fire_counts: dict[str, Tensor], n_tokens: int) -> None:
        """Every member's dead-latent counters (members.py `update_activity`)."""
        update_activity(self.activity, fire_counts, n_tokens)

    def _log_train(self, name: str, y_raw: Tensor, result, n_tokens: int, loss: Tensor, fire_counts: Tensor,
                   target_statistics: TargetStatistics) -> None:
        """Member `name`'s train metrics of this step; `fire_counts` [d_sae] int64, `target_statistics`
        y_raw's (shared by the members that read it)."""
        member, metrics, prefix = self.members[name], self.metrics[name], self.prefix(name)
        metrics.train_reconstruction.update(y_raw, result.y_hat / member.target_scale, target_statistics)
        counts = dict(fire_counts=fire_counts, n_tokens=n_tokens, sum_abs=result.sum_abs)
        metrics.train_sparsity.update(**counts)
        metrics.train_density.update(**counts)
        every = getattr(self._trainer, "log_every_n_steps", 1)
        log_step = every > 0 and (self.global_step + 1) % every == 0
        values: dict = {}
        # A step's losses reach the logger at log steps only; a sweep skips the other steps' (~60 for
        # 21 members). One dictionary logs every step: its progress bar shows the loss.
        if log_step or len(self.members) == 1:
            values[f"{prefix}train/loss"] = loss
            values.update({f"{prefix}train/loss_{term}": value for term, value in result.losses.items()})
        if log_step:
            values.update(self._metric_values(f"{prefix}train", metrics.train_reconstruction, metrics.train_sparsity,
                                              dense=False))
            attribute = coefficient_attribute(member)
            if attribute is not None:  # λ, which calibration moves and a warm-up scales
                values[f"{prefix}train/{attribute}"] = float(getattr(member, attribute)) * self.sparsity_scale(name)
        if metrics.train_density.n_tokens >= self.dead_windows[name]:
            density = metrics.train_density.compute()
            values[f"{prefix}train/dead_fraction"] = density["dead_fraction"]
            values[f"{prefix}train/dense_fraction"] = density["dense_fraction"]
            metrics.train_density.reset()
        if len(self.members) == 1:
            for key, value in values.items():
                self.log(key, value, prog_bar=key == "train/loss")
        else:
            self._train_row.update(values)

    def _write_train_row(self) -> None:
        """A sweep's train values of this step as one row of each logger, at the step and with the
        epoch Lightning gives its own rows. Not through `self.log`: it costs ~0.4 ms a key (its
        result records), and a sweep's log step has ~230 keys (benchmarks/RESULTS.md)."""
        row, self._train_row = self._train_row, {}
        if row:
            row = {key: float(value) for key, value in row.items()} | {"epoch": self.current_epoch}
            for logger in self.loggers:  # flushed at once, as Lightning flushes its own rows
                logger.log_metrics(row, step=self.global_step)
                logger.save()

    def _metric_values(self, stage: str, recon, sparsity, dense: bool = True) -> dict[str, float]:
        """{stage/name: value} of a reconstruction and a sparsity metric, which are then reset."""
        values = {**recon.compute(), **sparsity.compute()}
        if not dense:  # dead/dense over a short log interval would mislead; logged per window
            values.pop("dead_fraction"), values.pop("dense_fraction")
        recon.reset(), sparsity.reset()
        return {f"{stage}/{k}": float(v) for k, v in values.items()}

    def _log_metrics(self, stage: str, recon, sparsity, dense: bool = True) -> None:
        self.log_dict(self._metric_values(stage, recon, sparsity, dense), prog_bar=False)

    def _optimizer_state(self) -> dict:
        trainer = self._trainer
        return trainer.optimizers[0].state if trainer is not None and trainer.optimizers else {}

    def _broadcast(self, tensor: Tensor) -> Tensor:
        """Rank 0's copy of `tensor` (every rank must write the same resampled rows)."""
        return self.trainer.strategy.broadcast(tensor, src=0) if self.trainer.world_size > 1 else tensor

    def on_before_optimizer_step(self, optimizer) -> None:
        for member in self.members.values():
            member.constrain_gradient()
        # Every gradient's norm in one foreach call: the finite check for all members (one
        # sync) and, reused by `configure_gradient_clipping`, each member's clipping norm.
        grads = [[p.grad for p in m.parameters() if p.grad is not None] for m in self.members.values()]
        norms = torch._foreach_norm([g for member_grads in grads for g in member_grads], 2.0)
        self._grad_norms = list(zip(grads, split(norms, [len(g) for g in grads])))
        if norms and not torch.isfinite(torch.stack(norms).sum()):
            for name, member in self.members.items():
                check_gradients_finite(member.named_parameters(), self.global_step, self._label(name))

    def optimizer_step(self, *args, **kwargs) -> None:
        # Renormalise right after the step, before any callback (a checkpoint, say) sees W_dec.
        super().optimizer_step(*args, **kwargs)
        for member in self.members.values():
            member.constrain_parameters()

    # ----------------------------------------------------------------- validation / test
    def validation_step(self, batch, batch_idx: int) -> None:
        self._check_batch(batch, batch_idx, " (validation)")
        for name, member in self.members.items():
            x, y = self._member_batch(name, batch)
            z = member.encode(x)
            self.metrics[name].val_reconstruction.update(y, member.decode(z, x))
            self.metrics[name].val_sparsity.update(z)

    def on_validation_epoch_end(self) -> None:
        stage = "test" if self.trainer.testing else "val"
        if stage == "val":
            self.validated_at_step = self.global_step
        for name, metrics in self.metrics.items():
            if metrics.val_reconstruction.update_count:
                self._log_metrics(f"{self.prefix(name)}{stage}", metrics.val_reconstruction, metrics.val_sparsity)

    test_step = validation_step
    on_test_epoch_end = on_validation_epoch_end

    # ----------------------------------------------------------------- data-dependent init
    def on_fit_start(self) -> None:
        # ddp_spawn leaves metric states in memory shared between ranks: give each rank its own
        # copy, keeping the values (they may come from a checkpoint).
        for metrics in self.metrics.values():
            for metric in (metrics.train_reconstruction, metrics.train_sparsity, metrics.train_density):
                for state in metric._defaults:
                    setattr(metric, state, getattr(metric, state).clone())
        datamodule = self.trainer.datamodule
        if hasattr(datamodule, "check_heldout_finite"):
            datamodule.check_heldout_finite()
        run_tokens = self._total_steps() * datamodule.batch_size * self.trainer.world_size
        shared = SharedSample()
        for name, member in self.members.items():
            if self.settings[name].dead_window_tokens is None:
                self.dead_windows[name] = dead_window_for(run_tokens)
            if not bool(member.data_initialised):
                view = datamodule.view(*self.data_keys(name, datamodule))
                initialise_from_data(member, view, self.settings[name], shared)

    # ----------------------------------------------------------------- optimiser and schedule
    def _total_steps(self) -> int:
        return total_steps(self._trainer)

    def configure_optimizers(self):
        """One Adam, one parameter group per member (its lr, betas, eps), one LR factor each."""
        precision = str(getattr(self._trainer, "precision", "32-true"))
        return adam_with_schedules(self.members, self.settings, self._total_steps(),
                                   fused=fused_adam_possible(self.parameters(), precision))

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        # Each member is clipped by its own gradient norm, as it would be alone (training/optimiser.py).
        norms, self._grad_norms = getattr(self, "_grad_norms", None), None
        clip_members(self.members.values(), norms, gradient_clip_val, gradient_clip_algorithm)

    # ----------------------------------------------------------------- checkpoints (training/checkpoints.py)
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        save_members(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        check_and_upgrade(self, checkpoint)
