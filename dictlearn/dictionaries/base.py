"""The one LightningModule every sparse dictionary shares.

A dictionary maps an input x [batch, d_in] to latents z [batch, d_sae] and back to an output
ŷ [batch, d_out]. The mapping is an autoencoder (target y = x), a transcoder (y = another
activation, e.g. an MLP's output) or a skip transcoder (adds a linear skip x W_skipᵀ). The sparsity
mechanism is a subclass that overrides `activate` and adds its loss terms; everything else
(initialisation, optimiser and schedules, the unit-norm decoder constraint, dead-latent
bookkeeping, non-finite guards, metrics, logging) lives here, once.

Units: the module holds two scalars, `input_scale` and `target_scale`, estimated on the training
data (SPEC §1.1). Training runs on scaled data; the public `forward`/`encode`/`decode` take and
return *raw* activations, so a checkpoint and its export behave the same.
"""

from __future__ import annotations

import math
from functools import partial

import lightning as L
import torch
import torch.distributed as dist
from torch import Tensor, nn

from dictlearn.dictionaries.init import geometric_median, warmup_decay_factor
from dictlearn.dictionaries.guards import check_batch_finite, check_gradients_finite
from dictlearn.dictionaries.sparse import Support, dense_affine, sparse_affine, sparse_decode
from dictlearn.errors import ConfigError, DataError, NonFiniteError
from dictlearn.metrics import ReconstructionMetrics, SparsityMetrics


class Dictionary(L.LightningModule):
    """Base class: an encoder into d_sae latents, a sparsity mechanism, a decoder back.

    Subclasses set the class attributes below and override `activate` (inference activation),
    optionally `train_activate` (training-time activation) and `sparsity_losses`.
    """

    #: name of the architecture in the SAELens export layout
    sae_lens_architecture: str = "standard"
    #: keep decoder rows at unit norm (gradient projection + renormalisation, SPEC §1.3)
    unit_norm_decoder: bool = True
    #: every latent is >= 0 (true of ReLU, TopK-ReLU, JumpReLU, gated); lets L1 skip an abs pass
    nonnegative_latents: bool = True
    #: how the mechanism's sparse training path is chosen (docs/performance.md): None (no sparse
    #: path), "fixed" (a known L0: sparse when that L0 / d_sae <= `sparse_cutoff`) or "per_batch"
    #: (sparse when the batch's active fraction <= `sparse_cutoff`, decided every step)
    sparse_selection: str | None = None
    #: active fraction of the latents below which the sparse path is faster (measured, see docs)
    sparse_cutoff: float = 0.05
    #: below this many latents the dense step is cheap and the sparse path's fixed costs dominate
    sparse_min_latents: int = 1024
    #: on a GPU under bf16/fp16 autocast, whether `auto` still takes the sparse path. Measured on
    #: an H100 (d_in 768, d_sae 24576, L0 ≈ 32, bf16), dense / sparse tokens/s: TopK 505k / 290k,
    #: BatchTopK 438k / 328k, ReLU-L1 525k / 299k, so False here; gated and JumpReLU, whose dense
    #: steps make more passes over [batch, d_sae], set it (220k / 266k and 252k / 286k).
    sparse_beats_tensor_cores: bool = False

    def __init__(
        self,
        d_in: int = 0,
        d_sae: int = 4096,
        d_out: int | None = None,
        transcoder: bool = False,
        skip_connection: bool = False,
        apply_b_dec_to_input: bool = True,
        b_dec_init: str = "geometric_median",
        decoder_init_norm: float = 1.0,
        lr: float = 2e-4,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
        lr_warmup_fraction: float = 0.0,
        lr_decay_fraction: float = 0.0,
        sparsity_warmup_fraction: float = 0.0,
        dead_window_tokens: int = 10_000_000,
        init_sample_rows: int = 32_768,
        sparse_path: str = "auto",
    ):
        """
        Args:
            d_in: input width; linked from the data file by the CLI.
            d_sae: number of latents.
            d_out: output width; None means d_in (an autoencoder). Linked from the data file.
            transcoder: the target is another activation (`--data.target_key`), not the input:
                b_dec lives in the output space and is never subtracted from the input.
            skip_connection: add a zero-initialised linear skip `W_skip [d_out, d_in]`
                (skip transcoder, Paulo et al. 2025).
            apply_b_dec_to_input: subtract b_dec from x before encoding (tied pre-encoder bias);
                ignored (off) for transcoders, whose b_dec is in the output space.
            b_dec_init: "geometric_median", "mean" or "zeros", computed on the scaled target.
            decoder_init_norm: norm of the random initial decoder rows (W_enc = W_decᵀ).
            lr, adam_betas, adam_eps: Adam settings.
            lr_warmup_fraction: linear LR warm-up over this fraction of the run.
            lr_decay_fraction: linear LR decay to 0 over this final fraction of the run.
            sparsity_warmup_fraction: linear warm-up of the sparsity coefficient over this
                fraction of the run.
            dead_window_tokens: a latent that has not fired for this many tokens is dead.
            init_sample_rows: rows sampled from the data for b_dec initialisation.
            sparse_path: "auto" (decode and encoder backward over the active latents only when
                the mechanism's L0 is small enough to gain; docs/performance.md), "always" or
                "never". Results are equal either way up to float rounding.
        """
        super().__init__()
        d_out = d_in if d_out is None else d_out
        _check_positive(d_sae=d_sae, lr=lr, dead_window_tokens=dead_window_tokens)
        _check_positive(decoder_init_norm=decoder_init_norm, init_sample_rows=init_sample_rows)
        for name, value in dict(
            lr_warmup_fraction=lr_warmup_fraction,
            lr_decay_fraction=lr_decay_fraction,
            sparsity_warmup_fraction=sparsity_warmup_fraction,
        ).items():
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"--model.{name} must be in [0, 1], got {value}")
        if lr_warmup_fraction + lr_decay_fraction > 1.0:
            raise ConfigError("--model.lr_warmup_fraction + --model.lr_decay_fraction must be <= 1")
        if b_dec_init not in ("geometric_median", "mean", "zeros"):
            raise ConfigError(
                f"--model.b_dec_init must be geometric_median, mean or zeros, got {b_dec_init!r}"
            )
        if sparse_path not in ("auto", "always", "never"):
            raise ConfigError(f"--model.sparse_path must be auto, always or never, got {sparse_path!r}")
        if skip_connection and not transcoder:
            raise ConfigError("--model.skip_connection needs --model.transcoder true (an autoencoder's skip would learn the identity)")
        if d_in < 0 or d_out < 0:
            raise ConfigError(f"--model.d_in/d_out must be positive, got {d_in}/{d_out}")
        # hparams hold the raw constructor arguments (of the subclass too) so `load` can rebuild
        # the class; behaviour reads the resolved attributes below, never hparams.
        self.save_hyperparameters()
        self.d_in, self.d_sae, self.d_out = d_in, d_sae, d_out
        self.transcoder, self.skip_connection, self.b_dec_init = transcoder, skip_connection, b_dec_init
        self.apply_b_dec_to_input = apply_b_dec_to_input and not transcoder
        self.lr, self.adam_betas, self.adam_eps = lr, tuple(adam_betas), adam_eps
        self.lr_warmup_fraction, self.lr_decay_fraction = lr_warmup_fraction, lr_decay_fraction
        self.sparsity_warmup_fraction = sparsity_warmup_fraction
        self.dead_window_tokens, self.init_sample_rows = dead_window_tokens, init_sample_rows
        self.sparse_path = sparse_path
        self._build_parameters(decoder_init_norm)
        self._build_state()

    # ----------------------------------------------------------------- construction
    def _build_parameters(self, decoder_init_norm: float) -> None:
        """W_dec: random signed directions of a fixed norm; W_enc = W_decᵀ (tied init, Gao §2.4)."""
        W_dec = torch.randn(self.d_sae, self.d_out)
        W_dec = W_dec / W_dec.norm(dim=-1, keepdim=True) * decoder_init_norm
        W_enc = W_dec.T.clone() if self.d_out == self.d_in else _random_rows(self.d_in, self.d_sae)
        self.W_enc = nn.Parameter(W_enc.contiguous())
        self.b_enc = nn.Parameter(torch.zeros(self.d_sae))
        self.W_dec = nn.Parameter(W_dec)
        self.b_dec = nn.Parameter(torch.zeros(self.d_out))
        self.W_skip = (
            nn.Parameter(torch.zeros(self.d_out, self.d_in)) if self.skip_connection else None
        )

    def _build_state(self) -> None:
        """Checkpointed buffers: data scales, init flag, dead-latent counters, the λ schedule."""
        self.register_buffer("input_scale", torch.tensor(1.0))
        self.register_buffer("target_scale", torch.tensor(1.0))
        self.register_buffer("data_initialised", torch.tensor(False))
        self.register_buffer("tokens_since_fired", torch.zeros(self.d_sae, dtype=torch.long))
        self.train_reconstruction = ReconstructionMetrics(self.d_out or None)
        self.train_sparsity = SparsityMetrics(self.d_sae)
        # Dead/dense fractions need a long window of tokens (SPEC §1.5), logged once per window.
        self.train_density = SparsityMetrics(self.d_sae)
        self.val_reconstruction = ReconstructionMetrics(self.d_out or None)
        self.val_sparsity = SparsityMetrics(self.d_sae)

    # ----------------------------------------------------------------- the mapping
    def pre_acts(self, x: Tensor) -> Tensor:
        """x: [batch, d_in] (scaled) -> pre-activations [batch, d_sae]."""
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        return torch.addmm(self.b_enc, x, self.W_enc)  # the bias in the GEMM: one pass less over [batch, d_sae]

    def activate(self, pre: Tensor) -> Tensor:
        """pre-activations [batch, d_sae] -> latents [batch, d_sae] at inference."""
        raise NotImplementedError

    def train_activate(self, pre: Tensor) -> Tensor:
        """Training-time activation; differs from `activate` only for batch-level mechanisms."""
        return self.activate(pre)

    def decode_scaled(self, z: Tensor, x: Tensor | None = None) -> Tensor:
        """z: [batch, d_sae], x: [batch, d_in] (scaled, for the skip) -> ŷ [batch, d_out] (scaled)."""
        y_hat = z @ self.W_dec + self.b_dec
        if self.W_skip is not None:
            y_hat = y_hat + x @ self.W_skip.T
        return y_hat

    def latent_scale(self) -> Tensor:
        """[d_sae]: factor from training-unit latents to reported ones, ‖d_i‖ / target_scale.

        Reported latents are those of the folded dictionary (SPEC §1.4): unit decoder rows, raw
        activation units. A folded (exported) dictionary has latent_scale == 1.
        """
        return self.W_dec.norm(dim=-1).clamp_min(1e-12) / self.target_scale

    def encode(self, x: Tensor) -> Tensor:
        """Raw activations x: [batch, d_in] -> reported latents z: [batch, d_sae]."""
        return self.activate(self.pre_acts(x * self.input_scale)) * self.latent_scale()

    def decode(self, z: Tensor, x: Tensor | None = None) -> Tensor:
        """Reported latents z: [batch, d_sae] (+ raw x for a skip) -> raw output ŷ: [batch, d_out]."""
        x_scaled = None if x is None else x * self.input_scale
        return self.decode_scaled(z / self.latent_scale(), x_scaled) / self.target_scale

    def forward(self, x: Tensor) -> Tensor:
        """Raw x: [batch, d_in] -> raw ŷ: [batch, d_out]."""
        return self.decode(self.encode(x), x)

    # ----------------------------------------------------------------- losses
    def reconstruction_loss(self, y: Tensor, y_hat: Tensor) -> Tensor:
        """Squared error summed over dims, mean over tokens (SPEC §3.3 training convention)."""
        return (y - y_hat).pow(2).sum(-1).mean()

    def sparsity_losses(self, x: Tensor, y: Tensor, pre: Tensor, z: Tensor, y_hat: Tensor) -> dict[str, Tensor]:
        """Mechanism-specific loss terms (already weighted), by name. Scaled units."""
        return {}

    @property
    def sparsity_coefficient_scale(self) -> float:
        """Linear warm-up factor in [0, 1] for the sparsity coefficient (SPEC §1.6)."""
        total = self._total_steps()
        return warmup_decay_factor(self.global_step, total, self.sparsity_warmup_fraction * total)

    @property
    def dead_mask(self) -> Tensor:
        """[d_sae] bool: latents that have not fired in the last `dead_window_tokens` tokens."""
        return self.tokens_since_fired >= self.dead_window_tokens

    # ----------------------------------------------------------------- training
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x_raw, y_raw = batch
        check_batch_finite(x_raw, self._data_name("input"), self.global_step, batch_idx)
        if y_raw is not x_raw:
            check_batch_finite(y_raw, self._data_name("target"), self.global_step, batch_idx)
        x = x_raw * self.input_scale
        y = x if y_raw is x_raw else y_raw * self.target_scale
        step = self._sparse_step(x, y) if self._tries_sparse_path() else None
        y_hat, losses, fire_counts, sum_abs = step or self._dense_step(x, y)
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise NonFiniteError(
                f"step {self.global_step} (batch {batch_idx}): loss is {loss.item()} "
                f"({', '.join(f'{k}={v.item():.4g}' for k, v in losses.items())}); "
                "lower --model.lr or check the data scale; no checkpoint was written for this step"
            )
        with torch.no_grad():
            self._update_fired(fire_counts, len(x))
            self._log_train(y_raw, y_hat / self.target_scale, fire_counts, len(x), sum_abs, losses, loss)
        return loss

    def _dense_step(self, x: Tensor, y: Tensor, pre: Tensor | None = None):
        """The reference path over all d_sae latents. -> (ŷ, losses, fire_counts, Σ folded |z|)."""
        pre = self.pre_acts(x) if pre is None else pre
        z = self.train_activate(pre)
        y_hat = self.decode_scaled(z, x)
        losses = {"reconstruction": self.reconstruction_loss(y, y_hat)}
        losses.update(self.sparsity_losses(x, y, pre, z, y_hat))
        with torch.no_grad():
            # Once per step, feeding dead bookkeeping and metrics (int32 counts: 1.5× faster).
            fire_counts = (z != 0).sum(0, dtype=torch.int32)
            # L1 in folded units (SPEC §3.2), like evaluation's encode(); |z| = z when z >= 0.
            magnitudes = z if self.nonnegative_latents else z.abs()
            sum_abs = (magnitudes.sum(0, dtype=torch.promote_types(z.dtype, torch.float32)) * self.latent_scale()).sum()
        return y_hat, losses, fire_counts, sum_abs

    def _tries_sparse_path(self) -> bool:
        if self.sparse_selection is None or self.sparse_path == "never":
            return False
        if self.sparse_path == "always":
            return True
        if self.d_sae < self.sparse_min_latents:
            return False
        if self._tensor_core_step() and not self.sparse_beats_tensor_cores:
            return False
        return self.sparse_selection == "per_batch" or self.sparse_l0() / self.d_sae <= self.sparse_cutoff

    def _tensor_core_step(self) -> bool:
        """A GPU step under bf16/fp16 autocast: the dense GEMMs run on tensor cores, the sparse
        path's gathers gain nothing from the low precision (docs/performance.md)."""
        return self.device.type == "cuda" and torch.is_autocast_enabled("cuda")

    def _sparse_enough(self, active: Tensor) -> bool:
        """Per-batch rule: active [batch, d_sae] bool is sparse enough for the sparse path."""
        return self.sparse_path == "always" or int(torch.count_nonzero(active)) <= self.sparse_cutoff * active.numel()

    def _sparse_step(self, x: Tensor, y: Tensor):
        """The same step over the active latents only (sparse.py); falls back to the dense step,
        reusing the pre-activations, when a per-batch mechanism finds the batch too dense."""
        with torch.no_grad():
            pre = self.pre_acts(x)
        support = self.train_support(pre)
        if support is None:
            shift, W, b = self.encoder_affine()
            return self._dense_step(x, y, dense_affine(x, shift, W, b, pre))
        pre_values = self.sparse_pre_acts(x, pre, support)
        z = self.sparse_activate(pre_values, support)
        y_hat = self.sparse_decode_scaled(support, z, x)
        losses = {"reconstruction": self.reconstruction_loss(y, y_hat)}
        losses.update(self.sparse_sparsity_losses(x, y, pre, support, pre_values, z, y_hat))
        with torch.no_grad():  # bookkeeping from the support: no pass over [batch, d_sae]
            fire_counts = support.fire_counts(z)
            magnitudes = z if self.nonnegative_latents else z.abs()
            # (a·b).sum(), not a @ b: autocast would run the dot in bf16
            sum_abs = (support.column_sums(magnitudes.detach()) * self.latent_scale()).sum()
        return y_hat, losses, fire_counts, sum_abs

    # Hooks of the sparse path; a mechanism with `sparse_selection` set implements the first three.
    def sparse_l0(self) -> float:
        """Active latents per token a "fixed" mechanism will select (its k)."""
        raise NotImplementedError

    def train_support(self, pre: Tensor) -> Support | None:
        """pre [batch, d_sae] (no gradient) -> the entries the training step needs (every non-zero
        latent and every entry with a gradient), or None for the dense path on this batch."""
        raise NotImplementedError

    def sparse_activate(self, pre_values: Tensor, support: Support) -> Tensor:
        """pre-activations [nnz] at `support` -> latents [nnz]; `train_activate` on the support."""
        raise NotImplementedError

    def sparse_sparsity_losses(self, x, y, pre, support: Support, pre_values, z, y_hat) -> dict[str, Tensor]:
        """`sparsity_losses` from the support: pre [batch, d_sae] without gradient, pre_values and
        z [nnz] with it."""
        return {}

    def encoder_affine(self) -> tuple[Tensor | None, Tensor, Tensor | None]:
        """(shift, W, b) with pre_acts(x) = (x − shift) W + b; None for an absent term."""
        return (self.b_dec if self.apply_b_dec_to_input else None), self.W_enc, self.b_enc

    def sparse_pre_acts(self, x: Tensor, pre: Tensor, support: Support) -> Tensor:
        """pre_acts(x) at `support` [nnz], with the sparse encoder backward; `pre` is its value."""
        return sparse_affine(x, *self.encoder_affine(), pre, support)

    def sparse_decode_scaled(self, support: Support, z: Tensor, x: Tensor | None = None) -> Tensor:
        """`decode_scaled` of latents z [nnz] at `support` -> ŷ [batch, d_out] (scaled)."""
        y_hat = sparse_decode(support, z, self.W_dec) + self.b_dec
        if self.W_skip is not None:
            y_hat = y_hat + x @ self.W_skip.T
        return y_hat

    def _data_name(self, role: str) -> str:
        """`file['key'] (input)` for error messages, from the attached data module if any."""
        hparams = getattr(getattr(self._trainer, "datamodule", None), "hparams", {})
        key = hparams.get("target_key" if role == "target" else "input_key")
        return f"{hparams['path']}['{key}'] ({role})" if "path" in hparams and key else role

    def _update_fired(self, fire_counts: Tensor, n_tokens: int) -> None:
        """Dead-latent counters in tokens; a latent that fired on any rank fired (SPEC §1.5)."""
        fire_counts = fire_counts.clone()
        n_tokens = torch.tensor(n_tokens, device=fire_counts.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(fire_counts)
            dist.all_reduce(n_tokens)
        self.tokens_since_fired += n_tokens
        self.tokens_since_fired[fire_counts > 0] = 0

    def _log_train(self, y, y_hat, fire_counts, n_tokens, sum_abs, losses: dict, loss: Tensor) -> None:
        self.train_reconstruction.update(y, y_hat)
        counts = dict(fire_counts=fire_counts, n_tokens=n_tokens, sum_abs=sum_abs)
        self.train_sparsity.update(**counts)
        self.train_density.update(**counts)
        self.log("train/loss", loss, prog_bar=True)
        for name, value in losses.items():
            self.log(f"train/loss_{name}", value)
        if (self.global_step + 1) % max(1, self.trainer.log_every_n_steps) == 0:
            self._log_metrics("train", self.train_reconstruction, self.train_sparsity, dense=False)
        if self.train_density.n_tokens >= self.dead_window_tokens:
            density = self.train_density.compute()
            self.log("train/dead_fraction", density["dead_fraction"])
            self.log("train/dense_fraction", density["dense_fraction"])
            self.train_density.reset()

    def _log_metrics(self, stage: str, recon, sparsity, dense: bool = True) -> dict:
        values = {**recon.compute(), **sparsity.compute()}
        if not dense:  # dead/dense over a short log interval would mislead; logged per window
            values.pop("dead_fraction"), values.pop("dense_fraction")
        self.log_dict({f"{stage}/{k}": float(v) for k, v in values.items()}, prog_bar=False)
        recon.reset(), sparsity.reset()
        return values

    def on_before_optimizer_step(self, optimizer) -> None:
        check_gradients_finite(self.named_parameters(), self.global_step)
        if self.unit_norm_decoder and self.W_dec.grad is not None:
            _project_out_parallel(self.W_dec.grad, self.W_dec.data)

    def optimizer_step(self, *args, **kwargs) -> None:
        # Renormalise right after the step, before any callback (a checkpoint, say) sees W_dec.
        super().optimizer_step(*args, **kwargs)
        if self.unit_norm_decoder:
            self.normalise_decoder()

    @torch.no_grad()
    def normalise_decoder(self) -> None:
        """Rescale every decoder row to unit norm (dim=-1 of W_dec [d_sae, d_out], SPEC §0)."""
        assert self.W_dec.shape == (self.d_sae, self.d_out)
        self.W_dec.data /= self.W_dec.data.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    # ----------------------------------------------------------------- validation / test
    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        check_batch_finite(x, self._data_name("validation input"), self.global_step, batch_idx)
        z = self.encode(x)
        self.val_reconstruction.update(y, self.decode(z, x))
        self.val_sparsity.update(z)

    def on_validation_epoch_end(self) -> None:
        if self.val_reconstruction.update_count:
            stage = "test" if self.trainer.testing else "val"
            self._log_metrics(stage, self.val_reconstruction, self.val_sparsity)

    test_step = validation_step
    on_test_epoch_end = on_validation_epoch_end

    # ----------------------------------------------------------------- data-dependent init
    def on_fit_start(self) -> None:
        # ddp_spawn leaves metric states in memory shared between ranks (ECOSYSTEM §2): give each
        # rank its own copy, keeping the values (they may come from a checkpoint).
        for metric in (self.train_reconstruction, self.train_sparsity, self.train_density):
            for name in metric._defaults:
                setattr(metric, name, getattr(metric, name).clone())
        if not bool(self.data_initialised):
            self.initialise_from_data(self.trainer.datamodule)

    @torch.no_grad()
    def initialise_from_data(self, datamodule) -> None:
        """Set the data scales and b_dec from a sample of the training data (once per run)."""
        if datamodule is None:
            raise ConfigError("a dictionary trains from an ActivationDataModule (--data); none was given")
        if (datamodule.d_in, datamodule.d_out) != (self.d_in, self.d_out):
            raise DataError(
                f"{datamodule.hparams.path}: data has d_in={datamodule.d_in}, d_out={datamodule.d_out} "
                f"but the model expects d_in={self.d_in}, d_out={self.d_out}; drop --model.d_in/d_out "
                "(they are read from the file) or pick a matching file"
            )
        has_target = getattr(datamodule, "target_key", None) is not None
        if has_target != self.transcoder:
            raise ConfigError(
                "--data.target_key is set but the model is not a transcoder: use recipes/transcoder.yaml "
                "or --model.transcoder true" if has_target else
                "--model.transcoder true needs a target: pass --data.target_key (e.g. the MLP output)"
            )
        input_scale, target_scale = datamodule.estimate_scales()
        self.input_scale.fill_(input_scale)
        self.target_scale.fill_(target_scale)
        x, y = datamodule.sample_rows(self.init_sample_rows)
        y = y.to(self.device) * self.target_scale
        if self.transcoder:  # centre the pre-activations: no b_dec is subtracted (sparsify, SPEC §1.2)
            self.b_enc.data.copy_(-(x.to(self.device) * self.input_scale).mean(0) @ self.W_enc)
        if self.b_dec_init == "geometric_median":
            self.b_dec.data.copy_(geometric_median(y))
        elif self.b_dec_init == "mean":
            self.b_dec.data.copy_(y.mean(0))
        self.data_initialised.fill_(True)

    # ----------------------------------------------------------------- optimiser and schedule
    def _total_steps(self) -> int:
        trainer = self._trainer
        if trainer is None:
            return 1
        steps = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else trainer.estimated_stepping_batches
        return max(1, int(steps)) if math.isfinite(steps) else 1

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(
            self.parameters(), lr=self.lr, betas=self.adam_betas, eps=self.adam_eps, fused=self._fused_adam() or None
        )
        total = self._total_steps()
        lr_factor = partial(
            warmup_decay_factor, total=total,
            warmup=self.lr_warmup_fraction * total, decay=self.lr_decay_fraction * total,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _fused_adam(self) -> bool:
        """Fused Adam: one kernel per parameter instead of ~8 passes (~5× less time on CPU;
        deterministic). Not under fp16 `16-mixed`, whose loss scaler must unscale the gradients
        before clipping (a fused optimizer unscales inside its step)."""
        precision = str(getattr(self._trainer, "precision", "32-true"))
        return precision != "16-mixed" and all(
            p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in self.parameters()
        )

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        # Lightning's mixed-precision plugin refuses to clip for any optimizer that unscales its
        # own gradients (fused Adam says it does), even under bf16-mixed, which has no loss
        # scaler and so nothing to unscale: clip directly there, as Lightning itself would.
        no_scaler = getattr(self.trainer.precision_plugin, "scaler", None) is None
        if gradient_clip_val and no_scaler and getattr(optimizer, "_step_supports_amp_scaling", False):
            if gradient_clip_algorithm == "value":
                torch.nn.utils.clip_grad_value_(self.parameters(), gradient_clip_val)
            else:
                torch.nn.utils.clip_grad_norm_(self.parameters(), gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # ----------------------------------------------------------------- export
    def export_fields(self) -> dict:
        """Architecture-specific cfg.json fields (SAELens layout), e.g. TopK's k."""
        return {}

    def adapt_export_tensors(self, tensors: dict[str, Tensor], latent_scale: Tensor) -> dict[str, Tensor]:
        """Architecture-specific export tensors: add or rename entries of the folded `tensors`
        (W_enc, b_enc, W_dec, b_dec[, W_skip]); `latent_scale` [d_sae] is the per-latent factor
        already folded into W_enc and b_enc (thresholds need it too). `load_folded` must accept
        the result."""
        return tensors

    @torch.no_grad()
    def load_folded(self, tensors: dict[str, Tensor]) -> None:
        """Load exported (folded) weights: raw-activation units, unit decoder rows, scales 1."""
        own = dict(self.named_parameters()) | dict(self.named_buffers())
        for name, value in tensors.items():
            if name not in own or own[name].shape != value.shape:
                raise DataError(
                    f"export tensor {name} {tuple(value.shape)} does not fit {type(self).__name__} "
                    f"(expects {tuple(own[name].shape) if name in own else 'no such tensor'})"
                )
            own[name].copy_(value)
        self.input_scale.fill_(1.0)
        self.target_scale.fill_(1.0)
        self.data_initialised.fill_(True)

    # ----------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        cls = type(self)
        checkpoint["dictlearn_class"] = f"{cls.__module__}.{cls.__qualname__}"
        datamodule = self._trainer.datamodule if self._trainer is not None else None
        if hasattr(datamodule, "provenance"):  # where the data came from, for the export
            checkpoint["dictlearn_data"] = datamodule.provenance()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("hyper_parameters", {})
        for name in ("d_in", "d_out", "d_sae"):
            mine, theirs = getattr(self, name), saved.get(name, getattr(self, name))
            if name == "d_out" and theirs is None:
                theirs = saved.get("d_in")
            if theirs != mine:
                raise DataError(
                    f"checkpoint was trained with {name}={theirs} but this run has {name}={mine}; "
                    "resume with the same data file and --model sizes"
                )


# --------------------------------------------------------------------- helpers
def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ConfigError(f"--model.{name} must be > 0, got {value}")


def _random_rows(n_rows: int, n_cols: int) -> Tensor:
    """Random signed matrix [n_rows, n_cols] with unit-norm columns (encoder when d_in != d_out)."""
    W = torch.randn(n_rows, n_cols)
    return W / W.norm(dim=0, keepdim=True)


def _project_out_parallel(grad: Tensor, W_dec: Tensor) -> None:
    """In place: remove from each row's gradient its component along that (unit) row (SPEC §1.3)."""
    unit = W_dec / W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    grad -= (grad * unit).sum(-1, keepdim=True) * unit
