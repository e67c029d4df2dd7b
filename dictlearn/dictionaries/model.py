"""The plain model every sparse dictionary shares: parameters, data scales, encode/decode.

A dictionary maps an input x [batch, d_in] to latents z [batch, d_sae] and back to an output
ŷ [batch, d_out]. The mapping is an autoencoder (target y = x), a transcoder (y = another
activation, e.g. an MLP's output) or a skip transcoder (adds a linear skip x W_skipᵀ). The sparsity
mechanism is a subclass that overrides `activate` and adds its loss terms. This module is what
`dictlearn.load`, export, evaluation and the interpretability tools use; it imports neither
Lightning nor the metrics. Training (optimiser, schedules, clipping, logging, one or many
dictionaries on the same batches) is `dictlearn.training.DictionaryTraining`.

Units: the module holds two scalars, `input_scale` and `target_scale`, estimated on the training
data (docs/conventions.md). Training runs on scaled data; the public `forward`/`encode`/`decode`
take and return *raw* activations, so a checkpoint and its export behave the same.
"""

from __future__ import annotations

import inspect
from typing import NamedTuple

import torch
from torch import Tensor, nn

from dictlearn.dictionaries.init import geometric_median, warmup_decay_factor
from dictlearn.dictionaries.inputs import as_rows
from dictlearn.dictionaries.latents import DenseLatents, Selection, SparseLatents
from dictlearn.dictionaries.sparse import Support, dense_affine, sparse_affine
from dictlearn.errors import ConfigError, DataError, InputError


#: the dead-latent window of long runs (Gao et al. 2024; sparsify, OpenAI)
DEAD_WINDOW_TOKENS = 10_000_000


def dead_window_for(run_tokens: int) -> int:
    """The dead-latent window of a run of `run_tokens` training tokens: 10M tokens, or a third of
    the run when that is shorter, so that short runs (a comparison trains dozens of them) see
    their dead latents declared dead, and revived by AuxK, at all.

    Why a third, not less: a shorter window also declares rare latents dead, and AuxK then pulls
    them towards the residual. Measured (dead fraction over 65,536 rows, one seed each): the
    quickstart's TopK transcoder (1,024 latents, 600 steps) 4.0 % with no AuxK (10M window),
    10.7 % with a tenth of the run, 3.9 % with a third; `dictlearn compare`'s BatchTopK at L0 8
    33 %, 24 %, 21 % (benchmarks/RESULTS.md, 2026-12-02)."""
    return max(1, min(DEAD_WINDOW_TOKENS, run_tokens // 3))


class StepResult(NamedTuple):
    """One training step's forward, in training (scaled) units."""

    y_hat: Tensor  # [batch, d_out]
    losses: dict[str, Tensor]  # weighted loss terms by name; the loss is their sum
    fire_counts: Tensor  # [d_sae] int32: tokens on which each latent fired
    sum_abs: Tensor  # scalar: Σ |z| in reported (folded) units, for the L1 metric


class Arguments(dict):
    """Constructor arguments by name, also readable as attributes (`model.hparams.k`)."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class Dictionary(nn.Module):
    """Base class: an encoder into d_sae latents, a sparsity mechanism, a decoder back.

    Subclasses set the class attributes below and override `activate` (inference activation),
    optionally `train_activate` (training-time activation) and `sparsity_losses`.
    """

    #: name of the architecture in the SAELens export layout
    sae_lens_architecture: str = "standard"
    #: keep decoder rows at unit norm (gradient projection + renormalisation, docs/conventions.md#unit-norm-decoder)
    unit_norm_decoder: bool = True
    #: every latent is >= 0 (true of ReLU, TopK-ReLU, JumpReLU, gated); lets L1 skip an abs pass
    nonnegative_latents: bool = True
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
        dead_window_tokens: int | None = None,
        init_sample_rows: int = 32_768,
        sparse_path: str = "auto",
        init_scale_from_data: bool = False,
        initial_l0: float | None = None,
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
            dead_window_tokens: a latent that has not fired for this many tokens is dead. None:
                10M tokens (Gao et al. 2024), or a third of the run when the run is shorter than
                30M tokens (`dead_window_for`), set when training starts.
            init_scale_from_data: at the data-dependent initialisation, scale the encoder by s so
                the first reconstructions have about the target's norm (see `scale_to_data`). Off
                by default: it rescues short runs (`dictlearn compare` turns it on) but lowered
                long-run feature recovery (BatchTopK MMCS 0.92 -> 0.85, benchmarks/RESULTS.md).
            initial_l0: at the data-dependent initialisation, move the thresholds (ReLU-L1's and
                gated's encoder biases, JumpReLU's θ) so that this many latents fire per token on
                the sample (`start_at_l0`); None keeps the papers' start, where about half of the
                latents fire and the run is dense until the sparsity penalty has moved them.
                Mechanisms whose L0 is set by k refuse it.
            init_sample_rows: rows sampled from the data for b_dec initialisation.
            sparse_path: "auto" (decode and encoder backward over the active latents only when
                the mechanism's L0 is small enough to gain; docs/performance.md), "always" or
                "never". Results are equal either way up to float rounding.
        """
        super().__init__()
        d_out = d_in if d_out is None else d_out
        _check_positive(d_sae=d_sae, lr=lr, dead_window_tokens=dead_window_tokens or DEAD_WINDOW_TOKENS)
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
        if initial_l0 is not None and not 0 < initial_l0 < d_sae:
            raise ConfigError(f"--model.initial_l0 must be in (0, d_sae = {d_sae}), got {initial_l0}")
        if initial_l0 is not None and type(self).start_at_l0 is Dictionary.start_at_l0:
            raise ConfigError(f"--model.initial_l0: {type(self).__name__} sets its L0 by k; drop the flag")
        if d_in < 0 or d_out < 0:
            raise ConfigError(f"--model.d_in/d_out must be positive, got {d_in}/{d_out}")
        # hparams hold the raw constructor arguments (of the subclass too) so `load` can rebuild
        # the class; behaviour reads the resolved attributes below, never hparams.
        self.hparams = _constructor_arguments(self, inspect.currentframe())
        # the training step and run length, set by the trainer before each step (schedules)
        self.step, self.total_steps = 0, 1
        self.d_in, self.d_sae, self.d_out = d_in, d_sae, d_out
        self.transcoder, self.skip_connection, self.b_dec_init = transcoder, skip_connection, b_dec_init
        self.apply_b_dec_to_input = apply_b_dec_to_input and not transcoder
        self.lr, self.adam_betas, self.adam_eps = lr, tuple(adam_betas), adam_eps
        self.lr_warmup_fraction, self.lr_decay_fraction = lr_warmup_fraction, lr_decay_fraction
        self.sparsity_warmup_fraction = sparsity_warmup_fraction
        self.dead_window_tokens = dead_window_tokens or DEAD_WINDOW_TOKENS
        self.dead_window_follows_run = dead_window_tokens is None
        self.init_sample_rows, self.init_scale_from_data = init_sample_rows, init_scale_from_data
        self.sparse_path, self.initial_l0 = sparse_path, initial_l0
        self._build_parameters(decoder_init_norm)
        self._build_state()

    # ----------------------------------------------------------------- construction
    def _build_parameters(self, decoder_init_norm: float) -> None:
        self.decoder_init_norm = decoder_init_norm
        W_enc, W_dec = self._initial_weights()
        self.W_enc = nn.Parameter(W_enc)
        self.b_enc = nn.Parameter(torch.zeros(self.d_sae))
        self.W_dec = nn.Parameter(W_dec)
        self.b_dec = nn.Parameter(torch.zeros(self.d_out))
        self.W_skip = (
            nn.Parameter(torch.zeros(self.d_out, self.d_in)) if self.skip_connection else None
        )

    def _initial_weights(self, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """(W_enc, W_dec): random signed decoder directions of a fixed norm, W_enc = W_decᵀ (tied
        init, Gao et al. 2024 §2.4). From torch's global generator unless one is given."""
        W_dec = torch.randn(self.d_sae, self.d_out, generator=generator)
        W_dec = W_dec / W_dec.norm(dim=-1, keepdim=True) * self.decoder_init_norm
        if self.d_out == self.d_in:
            W_enc = W_dec.T.clone()
        else:  # unit-norm random columns
            W_enc = torch.randn(self.d_in, self.d_sae, generator=generator)
            W_enc = W_enc / W_enc.norm(dim=0, keepdim=True)
        return W_enc.contiguous(), W_dec

    @torch.no_grad()
    def reset_parameters(self, seed: int) -> None:
        """Redraw the random initial weights from `seed` and the width alone (a sweep member's own
        seed), so the start does not depend on what the process drew before. Members of one seed
        and shape start equal (a fair comparison of mechanisms); the width picks its own stream,
        or a 1024-wide dictionary would start with the 512-wide one's rows as its first half and
        matching latents across sizes (feature splitting) would find the initialisation."""
        W_enc, W_dec = self._initial_weights(torch.Generator().manual_seed(seed * 1_000_003 + self.d_sae))
        self.W_enc.copy_(W_enc)
        self.W_dec.copy_(W_dec)

    def _build_state(self) -> None:
        """Checkpointed buffers: data scales, init flag, dead-latent counters, the λ schedule."""
        self.register_buffer("input_scale", torch.tensor(1.0))
        self.register_buffer("target_scale", torch.tensor(1.0))
        self.register_buffer("data_initialised", torch.tensor(False))
        self.register_buffer("tokens_since_fired", torch.zeros(self.d_sae, dtype=torch.long))

    # ----------------------------------------------------------------- the mapping
    def pre_acts(self, x: Tensor) -> Tensor:
        """x: [batch, d_in] (scaled) -> pre-activations [batch, d_sae]."""
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        return torch.addmm(self.b_enc, x, self.W_enc)  # the bias in the GEMM: one pass less over [batch, d_sae]

    # What a mechanism defines (docs/architectures.md, "Adding a mechanism"): `select` and
    # `activate_entries`, optionally `sparsity_losses`, `reconstruction_loss`, `sparse_l0`.
    def select(self, pre: Tensor, training: bool) -> Selection:
        """pre [batch, d_sae] (no gradient) -> the active entries of this batch: every non-zero
        latent and, in training, every entry that needs a gradient."""
        raise NotImplementedError

    def activate_entries(self, entries, training: bool) -> Tensor:
        """Latent values at the selected entries from `entries.pre` (and per-latent parameters
        through `entries.at`); one elementwise rule for the dense and the sparse path."""
        raise NotImplementedError

    def activate(self, pre: Tensor) -> Tensor:
        """pre-activations [batch, d_sae] -> latents [batch, d_sae] at inference."""
        return self._activate_dense(pre, training=False)

    def train_activate(self, pre: Tensor) -> Tensor:
        """The training-time activation (differs from `activate` for batch-level selections)."""
        return self._activate_dense(pre, training=True)

    def _activate_dense(self, pre: Tensor, training: bool) -> Tensor:
        selection = self.select(pre.detach(), training)
        entries = selection.dense_entries(pre)
        return selection.to_dense(entries, self.activate_entries(entries, training))

    def decode_scaled(self, z: Tensor, x: Tensor | None = None) -> Tensor:
        """z: [batch, d_sae], x: [batch, d_in] (scaled, for the skip) -> ŷ [batch, d_out] (scaled)."""
        y_hat = z @ self.W_dec + self.b_dec
        if self.W_skip is not None:
            y_hat = y_hat + x @ self.W_skip.T
        return y_hat

    def latent_scale(self) -> Tensor:
        """[d_sae]: factor from training-unit latents to reported ones, ‖d_i‖ / target_scale.

        Reported latents are those of the folded dictionary (docs/conventions.md#reported-latents): unit decoder rows, raw
        activation units. A folded (exported) dictionary has latent_scale == 1.
        """
        return self.W_dec.norm(dim=-1).clamp_min(1e-12) / self.target_scale

    # The public entry points take a user's tensor: [..., d] or one vector [d], any floating dtype
    # (computed in the parameters' dtype, returned in the input's), on the dictionary's device;
    # an InputError line otherwise (inputs.py). Training calls `training_losses`, never these.
    def encode(self, x: Tensor) -> Tensor:
        """Raw activations x: [..., d_in] -> reported latents z: [..., d_sae], in x's dtype."""
        rows = as_rows(x, self.d_in, "x", self._where("encode"), self.W_enc)
        return rows.restore(self._encode_rows(rows.rows))

    def decode(self, z: Tensor, x: Tensor | None = None) -> Tensor:
        """Reported latents z: [..., d_sae] (+ the raw input x: [..., d_in] it came from, which a
        skip transcoder needs and other dictionaries ignore) -> raw output ŷ: [..., d_out], in z's
        dtype."""
        where = self._where("decode")
        latents = as_rows(z, self.d_sae, "z", where, self.W_dec)
        return latents.restore(self._decode_rows(latents.rows, self._skip_rows(x, latents.lead, where)))

    def forward(self, x: Tensor) -> Tensor:
        """Raw x: [..., d_in] -> raw ŷ: [..., d_out], in x's dtype."""
        rows = as_rows(x, self.d_in, "x", self._where("forward"), self.W_enc)
        return rows.restore(self._decode_rows(self._encode_rows(rows.rows), rows.rows))

    def _encode_rows(self, x: Tensor) -> Tensor:
        """Raw x: [batch, d_in] (checked) -> reported latents [batch, d_sae]."""
        return self.activate(self.pre_acts(x * self.input_scale)) * self.latent_scale()

    def _decode_rows(self, z: Tensor, x: Tensor | None) -> Tensor:
        """Reported z: [batch, d_sae], raw x: [batch, d_in] or None (checked) -> raw ŷ [batch, d_out]."""
        x_scaled = None if x is None else x * self.input_scale
        return self.decode_scaled(z / self.latent_scale(), x_scaled) / self.target_scale

    def _skip_rows(self, x: Tensor | None, lead: tuple[int, ...], where: str) -> Tensor | None:
        """decode's x as [batch, d_in] rows when the skip uses it (None otherwise), matching z's
        leading dims `lead`."""
        if self.W_skip is None:
            return None
        if x is None:
            raise InputError(f"{where}: a skip transcoder's output needs its input; pass decode(z, x) with x "
                             f"[..., d_in] with d_in={self.d_in}, the x that z was encoded from")
        rows = as_rows(x, self.d_in, "x", where, self.W_enc)
        if rows.lead != lead:
            raise InputError(f"{where}: x has shape {tuple(x.shape)} but z has leading dims {lead}; "
                             "pass the x that z was encoded from")
        return rows.rows

    def _where(self, method: str) -> str:
        return f"{type(self).__name__}.{method}"

    # ----------------------------------------------------------------- losses
    def reconstruction_loss(self, y: Tensor, y_hat: Tensor) -> Tensor:
        """Squared error summed over dims, mean over tokens (docs/conventions.md#training-losses)."""
        return (y - y_hat).pow(2).sum(-1).mean()

    def sparsity_losses(self, x: Tensor, y: Tensor, pre: Tensor, z: Tensor, y_hat: Tensor,
                        latents=None) -> dict[str, Tensor]:
        """Mechanism-specific loss terms (already weighted), by name, in scaled units. `latents`
        (dense or sparse, latents.py) holds the step's entries, `z` their values; without it, `pre`
        and `z` are dense [batch, d_sae] (DenseLatents(pre))."""
        return {}

    @property
    def sparsity_coefficient_scale(self) -> float:
        """Linear warm-up factor in [0, 1] for the sparsity coefficient (docs/conventions.md#schedules)."""
        total = self.total_steps
        return warmup_decay_factor(self.step, total, self.sparsity_warmup_fraction * total)

    @property
    def dead_mask(self) -> Tensor:
        """[d_sae] bool: latents that have not fired in the last `dead_window_tokens` tokens."""
        return self.tokens_since_fired >= self.dead_window_tokens

    # ----------------------------------------------------------------- one training step
    def training_losses(self, x: Tensor, y: Tensor) -> StepResult:
        """One step's forward on scaled x [batch, d_in], y [batch, d_out] (y is x for an SAE):
        the sparse path when it gains (docs/performance.md), else the dense reference."""
        step = self._sparse_step(x, y) if self._tries_sparse_path() else None
        return step or self._dense_step(x, y)

    def _dense_step(self, x: Tensor, y: Tensor, pre: Tensor | None = None) -> StepResult:
        """The reference path over all d_sae latents. In full precision the encoder's backward is
        `dense_affine`'s: the tied b_dec's gradient is −W_enc ∂b_enc, not the sum of a [batch, d_in]
        gradient of x − b_dec (one [batch, d_sae] @ [d_sae, d_in] GEMM less, ~1/6 of a dense step).
        Under autocast, autograd's own backward keeps the encoder's gradient GEMM in low precision."""
        if pre is None and not torch.is_autocast_enabled(x.device.type):
            with torch.no_grad():
                pre = self.pre_acts(x)
            pre = dense_affine(x, *self.encoder_affine(), pre)
        pre = self.pre_acts(x) if pre is None else pre
        return self._step(x, y, DenseLatents(pre), self.train_activate(pre))

    def _sparse_step(self, x: Tensor, y: Tensor) -> StepResult:
        """The same step over the selected entries only (sparse.py); the dense step, reusing the
        pre-activations, when a per-batch mechanism finds the batch too dense."""
        with torch.no_grad():
            pre = self.pre_acts(x)
        support = self.train_support(pre)
        if support is None:
            return self._dense_step(x, y, dense_affine(x, *self.encoder_affine(), pre))
        latents = SparseLatents(support, pre, lambda s: sparse_affine(x, *self.encoder_affine(), pre, s))
        return self._step(x, y, latents, self.activate_entries(latents, training=True))

    def _step(self, x: Tensor, y: Tensor, latents, z: Tensor) -> StepResult:
        """Decode, losses and bookkeeping of latents z (values at `latents`' entries)."""
        y_hat = latents.decode(z, self.W_dec) + self.b_dec
        if self.W_skip is not None:
            y_hat = y_hat + x @ self.W_skip.T
        losses = {"reconstruction": self.reconstruction_loss(y, y_hat)}
        losses.update(self.sparsity_losses(x, y, latents.full_pre, z, y_hat, latents))
        with torch.no_grad():  # once per step, feeding dead bookkeeping and metrics
            fire_counts = latents.fire_counts(z)
            magnitudes = z if self.nonnegative_latents else z.abs()
            # L1 in reported (folded) units, like evaluation's encode(); (a·b).sum(), not a @ b,
            # which autocast would run in bf16
            sum_abs = (latents.column_sums(magnitudes.detach()) * self.latent_scale()).sum()
        return StepResult(y_hat, losses, fire_counts, sum_abs)

    # The choice of path, in one place: constants measured in docs/performance.md.
    def _tries_sparse_path(self) -> bool:
        if self.sparse_path == "never":
            return False
        if self.sparse_path == "always":
            return True
        if self.d_sae < self.sparse_min_latents:
            return False
        if self._tensor_core_step() and not self.sparse_beats_tensor_cores:
            return False
        l0 = self.sparse_l0()  # None: decided per batch from the selection's density
        return l0 is None or l0 / self.d_sae <= self.sparse_cutoff

    def _tensor_core_step(self) -> bool:
        """A GPU step under bf16/fp16 autocast: the dense GEMMs run on tensor cores, the sparse
        path's gathers gain nothing from the low precision (docs/performance.md)."""
        return self.device.type == "cuda" and torch.is_autocast_enabled("cuda")

    def sparse_l0(self) -> float | None:
        """Active latents per token the mechanism selects when that is fixed (TopK's k), else
        None: the sparse path is then chosen per batch, from the selection's density."""
        return None

    def train_support(self, pre: Tensor) -> Support | None:
        """pre [batch, d_sae] (no gradient) -> the training selection as a Support, or None when
        the batch is too dense for the sparse path to gain (the per-batch rule)."""
        max_density = None if self.sparse_path == "always" else self.sparse_cutoff
        return self.select(pre, training=True).support(pre.shape[0], self.d_sae, max_density)

    def encoder_affine(self) -> tuple[Tensor | None, Tensor, Tensor | None]:
        """(shift, W, b) with pre_acts(x) = (x − shift) W + b; None for an absent term."""
        return (self.b_dec if self.apply_b_dec_to_input else None), self.W_enc, self.b_enc

    # ----------------------------------------------------------------- bookkeeping, constraints
    @torch.no_grad()
    def update_fired(self, fire_counts: Tensor, n_tokens: int) -> None:
        """Dead-latent counters in tokens: fire_counts [d_sae] over n_tokens tokens (summed over
        DDP ranks by the caller: a latent that fired on any rank fired)."""
        self.tokens_since_fired += n_tokens
        self.tokens_since_fired.masked_fill_(fire_counts > 0, 0)  # not a boolean index: no device sync

    @torch.no_grad()
    def constrain_gradient(self) -> None:
        """Before the optimiser step: keep unit-norm decoder rows on the sphere (remove each row
        gradient's component along its row; Bricken et al. 2023)."""
        if self.unit_norm_decoder and self.W_dec.grad is not None:
            _project_out_parallel(self.W_dec.grad, self.W_dec.data)

    @torch.no_grad()
    def constrain_parameters(self) -> None:
        """After the optimiser step: renormalise unit-norm decoder rows."""
        if self.unit_norm_decoder:
            self.normalise_decoder()

    def before_step(self, x_raw: Tensor, y_raw: Tensor, optimizer_state: dict, broadcast) -> None:
        """Called at the start of each training step, before the forward (ReLU-L1 resampling).
        `optimizer_state` maps this model's parameters to Adam's state; `broadcast(t)` returns
        rank 0's copy of a tensor under DDP."""

    @torch.no_grad()
    def normalise_decoder(self) -> None:
        """Rescale every decoder row to unit norm (dim=-1 of W_dec [d_sae, d_out])."""
        assert self.W_dec.shape == (self.d_sae, self.d_out)
        self.W_dec.data /= self.W_dec.data.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    # ----------------------------------------------------------------- data-dependent init
    @torch.no_grad()
    def initialise_from_data(self, datamodule) -> None:
        """Set the data scales and b_dec from a sample of the training data (once per run).

        `datamodule` offers `d_in`, `d_out`, `target_key`, `path`, `estimate_scales()`
        and `sample_rows(n)` (an `ActivationDataModule` or one of its `view`s)."""
        if datamodule is None:
            raise ConfigError("a dictionary trains from an ActivationDataModule (--data); none was given")
        if (datamodule.d_in, datamodule.d_out) != (self.d_in, self.d_out):
            raise DataError(
                f"{datamodule.path}: data has d_in={datamodule.d_in}, d_out={datamodule.d_out} "
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
        x, y = x.to(self.device) * self.input_scale, y.to(self.device) * self.target_scale
        if self.transcoder:  # centre the pre-activations: no b_dec is subtracted (as sparsify does)
            self.b_enc.data.copy_(-x.mean(0) @ self.W_enc)
        if self.b_dec_init == "geometric_median":
            self.b_dec.data.copy_(geometric_median(y))
        elif self.b_dec_init == "mean":
            self.b_dec.data.copy_(y.mean(0))
        self.initialise_from_sample(x, y)
        if self.initial_l0 is not None:  # a [rows, d_sae] pre-activation sample of at most 256 MiB
            self.start_at_l0(x[: max(1024, 2**26 // self.d_sae)], self.initial_l0)
        if self.init_scale_from_data:
            self.scale_to_data(x, y)
        self.data_initialised.fill_(True)

    def initialise_from_sample(self, x: Tensor, y: Tensor) -> None:
        """A mechanism's own data-dependent initialisation on the scaled sample x [n, d_in],
        y [n, d_out], after b_dec and before `initial_l0` and the encoder scaling (none here)."""

    def start_at_l0(self, x: Tensor, l0: float) -> None:
        """Move the thresholds so that `l0` latents fire per token on the scaled sample x [n, d_in].
        Mechanisms with a threshold (ReLU-L1, gated, JumpReLU) override this."""
        raise ConfigError(f"{type(self).__name__} sets its L0 by k, not by a threshold")

    @torch.no_grad()
    def scale_to_data(self, x: Tensor, y: Tensor) -> float:
        """Scale the encoder by s so that, on the sample x [n, d_in], y [n, d_out] (scaled units),
        the first reconstructions have about the target's norm: mean ‖ŷ − b_dec‖ = mean ‖y − b_dec‖.

        Unit-norm decoder rows with k (or half of d_sae) latents active would otherwise start at
        several times the input's norm. Every mechanism's activation is positively homogeneous in
        (encoder weights, encoder biases, thresholds), so the latents, and ŷ − b_dec, scale by s
        exactly (`scale_encoder`). -> s."""
        z = self.activate(self.pre_acts(x))
        produced = (z @ self.W_dec).norm(dim=-1).mean()
        wanted = (y - self.b_dec).norm(dim=-1).mean()
        if not (produced > 0 and torch.isfinite(produced) and wanted > 0):
            return 1.0  # nothing fires on the sample (or a degenerate target): leave the init
        scale = float(wanted / produced)
        self.scale_encoder(scale)
        return scale

    @torch.no_grad()
    def scale_encoder(self, scale: float) -> None:
        """Multiply every pre-activation by `scale` > 0: each of `encoder_parameters()` by
        `scale` (a mechanism's thresholds, which override this, follow)."""
        for parameter in self.encoder_parameters():
            parameter.mul_(scale)

    def encoder_parameters(self) -> list[nn.Parameter]:
        """The parameters that `scale_encoder` multiplies: W_enc, b_enc (and a mechanism's extra
        encoder biases). Adam moves each by about lr per step whatever its size, so after a scale
        s < 1 they move 1/s times faster relative to their size (benchmarks/RESULTS.md, session
        of 2026-12-02: the cause of the scaling's cost to feature recovery)."""
        return [self.W_enc, self.b_enc]

    @property
    def device(self) -> torch.device:
        return self.W_dec.device

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

# --------------------------------------------------------------------- helpers
def firing_quantile(values: Tensor, fraction: float) -> Tensor:
    """values [n, m] -> [m]: per column, the value it exceeds on `fraction` of the rows (its
    (r + 1)-th largest, r = that many rows, at least one). kthvalue, not topk: a JumpReLU start
    passes every entry of the sample as one column (67M rows), where topk's output would not fit."""
    n = values.shape[0]
    kept = min(n - 1, max(1, round(n * fraction)))
    return values.kthvalue(n - kept, dim=0).values


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ConfigError(f"--model.{name} must be > 0, got {value}")


def _constructor_arguments(model: nn.Module, frame) -> Arguments:
    """The arguments of each `__init__` of `model`'s class chain, read from the call frames up
    from `frame` (Dictionary's own), outer classes' values winning, `**kwargs` spread out."""
    arguments: dict = {}
    while frame is not None and frame.f_code.co_name == "__init__" and frame.f_locals.get("self") is model:
        info = inspect.getargvalues(frame)
        local = {name: info.locals[name] for name in info.args if name != "self"}
        if info.keywords:
            local.update(info.locals[info.keywords])
        arguments.update(local)
        frame = frame.f_back
    return Arguments(arguments)


def _project_out_parallel(grad: Tensor, W_dec: Tensor) -> None:
    """In place: remove from each row's gradient its component along that (unit) row (Bricken et al. 2023)."""
    unit = W_dec / W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    grad -= (grad * unit).sum(-1, keepdim=True) * unit
