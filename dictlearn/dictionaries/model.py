"""The plain model every sparse dictionary shares: parameters, data scales, encode/decode.

A dictionary maps an input x [batch, d_in] to latents z [batch, d_sae] and back to an output
ŷ [batch, d_out]: an autoencoder (y = x), a transcoder (y = another activation) or a skip
transcoder (+ x W_skipᵀ). A sparsity mechanism is a subclass that says which entries are active
(`select`), what they are worth (`activate_entries`) and adds its loss terms. It imports neither
Lightning nor the metrics and knows nothing of how it is trained: optimiser, schedules, dead-latent
window, data-dependent start and resampling are `dictlearn.training` (`TrainingConfig`).

Units: the module holds two scalars, `input_scale` and `target_scale`, estimated on the training
data (docs/conventions.md). Training runs on scaled data; the public `forward`/`encode`/`decode`
take and return *raw* activations, so a checkpoint and its export behave the same.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dictlearn.dictionaries.arguments import MOVED_TO_TRAINING, RecordsArguments, model_arguments
from dictlearn.dictionaries.init import firing_quantile
from dictlearn.dictionaries.inputs import as_rows, skip_rows
from dictlearn.dictionaries.latents import Selection, StepResult, TrainingStep, training_latents
from dictlearn.errors import ConfigError, DataError

__all__ = ["Dictionary", "StepResult", "TrainingStep", "MOVED_TO_TRAINING", "firing_quantile", "model_arguments"]


class Dictionary(RecordsArguments):
    """Base class: an encoder into d_sae latents, a sparsity mechanism, a decoder back.

    A mechanism subclass declares `mechanism = Mechanism(...)` (registry.py), defines `select` and
    `activate_entries`, optionally `sparsity_losses`, `reconstruction_loss`, `sparse_l0`,
    `start_at_l0` and `recommended_training` (docs/architectures.md, "Adding a mechanism").
    """

    #: name of the architecture in the SAELens export layout
    sae_lens_architecture: str = "standard"
    #: keep decoder rows at unit norm (gradient projection + renormalisation, docs/conventions.md#unit-norm-decoder)
    unit_norm_decoder: bool = True
    #: every latent is >= 0 (true of ReLU, TopK-ReLU, JumpReLU, gated); lets L1 skip an abs pass
    nonnegative_latents: bool = True
    # What `training_latents` (latents.py) reads to choose the sparse or the dense path, measured
    # in docs/performance.md: the active fraction below which the sparse path is faster (two
    # threads, d_sae 4096: 6-10 %; up to d_sae 1024, where the dense GEMMs are small, to 20 % at
    # one thread, compare's workers, and about even there at two), the width below which the
    # dense step is cheap anyway (d_sae 256: the sparse step still 0.4-0.8x the dense one, 128:
    # 0.5-0.96x at one thread, not measured at two), and whether the sparse path
    # still wins on a GPU under bf16/fp16 autocast (H100: not for TopK, BatchTopK, ReLU-L1; yes for
    # gated, JumpReLU). The rule depends on shapes only, never on the thread count, so a
    # dictionary trains the same whatever process runs it (`dictlearn compare --workers N`).
    sparse_cutoff: float = 0.1
    sparse_cutoff_narrow: float = 0.2
    sparse_narrow_latents: int = 1024
    sparse_min_latents: int = 256
    sparse_beats_tensor_cores: bool = False

    def __init__(self, d_in: int = 0, d_sae: int = 4096, d_out: int | None = None, transcoder: bool = False,
                 skip_connection: bool = False, apply_b_dec_to_input: bool = True,
                 b_dec_init: str = "geometric_median", decoder_init_norm: float = 1.0):
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
            b_dec_init: "geometric_median", "mean" or "zeros", computed on the scaled target when
                training starts (dictlearn/training/initialise.py).
            decoder_init_norm: norm of the random initial decoder rows (W_enc = W_decᵀ).
        """
        super().__init__()
        d_out = d_in if d_out is None else d_out
        for name, value in dict(d_sae=d_sae, decoder_init_norm=decoder_init_norm).items():
            if not value > 0:
                raise ConfigError(f"--model.{name} must be > 0, got {value}")
        if b_dec_init not in ("geometric_median", "mean", "zeros"):
            raise ConfigError(f"--model.b_dec_init must be geometric_median, mean or zeros, got {b_dec_init!r}")
        if skip_connection and not transcoder:
            raise ConfigError("--model.skip_connection needs --model.transcoder true (an autoencoder's skip would learn the identity)")
        if d_in < 0 or d_out < 0:
            raise ConfigError(f"--model.d_in/d_out must be positive, got {d_in}/{d_out}")
        self.d_in, self.d_sae, self.d_out = d_in, d_sae, d_out
        self.transcoder, self.skip_connection, self.b_dec_init = transcoder, skip_connection, b_dec_init
        self.apply_b_dec_to_input = apply_b_dec_to_input and not transcoder
        self.decoder_init_norm = decoder_init_norm
        W_enc, W_dec = self._initial_weights()
        self.W_enc = nn.Parameter(W_enc)
        self.b_enc = nn.Parameter(torch.zeros(self.d_sae))
        self.W_dec = nn.Parameter(W_dec)
        self.b_dec = nn.Parameter(torch.zeros(self.d_out))
        self.W_skip = nn.Parameter(torch.zeros(self.d_out, self.d_in)) if self.skip_connection else None
        # data scales and whether they (and b_dec) were set from the training data
        self.register_buffer("input_scale", torch.tensor(1.0))
        self.register_buffer("target_scale", torch.tensor(1.0))
        self.register_buffer("data_initialised", torch.tensor(False))

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
        """Redraw the random initial weights from `seed` and the width alone (a sweep member's seed):
        members of one seed and shape start equal (a fair comparison); the width picks its own
        stream, or matching latents across sizes (feature splitting) would find the initialisation."""
        W_enc, W_dec = self._initial_weights(torch.Generator().manual_seed(seed * 1_000_003 + self.d_sae))
        self.W_enc.copy_(W_enc)
        self.W_dec.copy_(W_dec)

    # ----------------------------------------------------------------- what a mechanism defines
    def select(self, pre: Tensor, training: bool) -> Selection:
        """pre [batch, d_sae] (no gradient) -> the active entries of this batch: every non-zero
        latent and, in training, every entry that needs a gradient."""
        raise NotImplementedError

    def activate_entries(self, entries, training: bool) -> Tensor:
        """Latent values at the selected entries from `entries.pre` (and per-latent parameters
        through `entries.at`); one elementwise rule for the dense and the sparse path."""
        raise NotImplementedError

    def sparsity_losses(self, x: Tensor, y: Tensor, pre: Tensor, z: Tensor, y_hat: Tensor, latents=None,
                        step: TrainingStep = TrainingStep()) -> dict[str, Tensor]:
        """Mechanism-specific loss terms (already weighted), by name, in scaled units. `latents`
        (dense or sparse, latents.py) holds the step's entries, `z` their values; without it, `pre`
        and `z` are dense [batch, d_sae]. `step` carries the warm-up factor and the dead latents."""
        return {}

    def reconstruction_loss(self, y: Tensor, y_hat: Tensor) -> Tensor:
        """Squared error summed over dims, mean over tokens (docs/conventions.md#training-losses)."""
        return (y - y_hat).pow(2).sum(-1).mean()

    def sparse_l0(self) -> float | None:
        """Active latents per token when fixed (TopK's k), else None (the path is chosen per batch)."""
        return None

    def start_at_l0(self, x: Tensor, l0: float) -> None:
        """Move the thresholds so that `l0` latents fire per token on the scaled sample x [n, d_in].
        Mechanisms with a threshold (ReLU-L1, gated, JumpReLU) override this."""
        raise ConfigError(f"{type(self).__name__} sets its L0 by k, not by a threshold")

    def initialise_from_sample(self, x: Tensor, y: Tensor) -> None:
        """A mechanism's own data-dependent initialisation on the scaled sample x [n, d_in],
        y [n, d_out], after b_dec and before a start at an L0 and the encoder scaling (none here)."""

    def recommended_training(self) -> dict:
        """The training settings its paper trains it with (`TrainingConfig` fields); what a run
        does not set itself. None here: `TrainingConfig`'s defaults."""
        return {}

    # ----------------------------------------------------------------- the forward, in training units
    def pre_acts(self, x: Tensor) -> Tensor:
        """x: [batch, d_in] (scaled) -> pre-activations [batch, d_sae]."""
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        return torch.addmm(self.b_enc, x, self.W_enc)  # the bias in the GEMM: one pass less over [batch, d_sae]

    def encoder_affine(self) -> tuple[Tensor | None, Tensor, Tensor | None]:
        """(shift, W, b) with pre_acts(x) = (x − shift) W + b; None for an absent term."""
        return (self.b_dec if self.apply_b_dec_to_input else None), self.W_enc, self.b_enc

    def activate(self, pre: Tensor, training: bool = False, selection: Selection | None = None) -> Tensor:
        """pre-activations [batch, d_sae] -> latents [batch, d_sae] (`training`: the training-time
        selection, which differs for batch-level mechanisms such as BatchTopK; `selection`: this
        `pre`'s, when the caller already made it)."""
        selection = selection if selection is not None else self.select(pre.detach(), training)
        entries = selection.dense_entries(pre)
        return selection.to_dense(entries, self.activate_entries(entries, training))

    def training_losses(self, x: Tensor, y: Tensor, step: TrainingStep = TrainingStep()) -> StepResult:
        """One training step's forward on scaled x [batch, d_in], y [batch, d_out] (y is x for an
        SAE): select and activate the latents, decode, the loss terms, the step's bookkeeping.

        The latents are every [batch, d_sae] entry or only the selected ones, whichever is faster
        (`training_latents`, docs/performance.md); the results are equal up to float rounding."""
        latents, z = training_latents(self, x, step.sparse_path)
        y_hat = latents.decode(z, self.W_dec) + self.b_dec
        if self.W_skip is not None:
            y_hat = y_hat + x @ self.W_skip.T
        losses = {"reconstruction": self.reconstruction_loss(y, y_hat)}
        losses.update(self.sparsity_losses(x, y, latents.full_pre, z, y_hat, latents, step))
        with torch.no_grad():  # once per step, feeding dead bookkeeping and metrics
            fire_counts = latents.fire_counts(z)
            magnitudes = z if self.nonnegative_latents else z.abs()
            # L1 in reported (folded) units, like evaluation's encode(); (a·b).sum(), not a @ b,
            # which autocast would run in bf16
            sum_abs = (latents.column_sums(magnitudes.detach()) * self.latent_scale()).sum()
        return StepResult(y_hat, losses, fire_counts, sum_abs)

    def decode_scaled(self, z: Tensor, x: Tensor | None = None) -> Tensor:
        """z: [batch, d_sae], x: [batch, d_in] (scaled, for the skip) -> ŷ [batch, d_out] (scaled)."""
        y_hat = z @ self.W_dec + self.b_dec
        if self.W_skip is not None:
            y_hat = y_hat + x @ self.W_skip.T
        return y_hat

    def latent_scale(self) -> Tensor:
        """[d_sae]: factor from training-unit latents to reported ones, ‖d_i‖ / target_scale.

        Reported latents are those of the folded dictionary (docs/conventions.md#reported-latents):
        unit decoder rows, raw activation units. A folded (exported) dictionary has latent_scale == 1."""
        return self.W_dec.norm(dim=-1).clamp_min(1e-12) / self.target_scale

    # ----------------------------------------------------------------- constraints
    @torch.no_grad()
    def constrain_gradient(self) -> None:
        """Before the optimiser step: keep unit-norm decoder rows on the sphere (remove each row
        gradient's component along its row; Bricken et al. 2023)."""
        if self.unit_norm_decoder and self.W_dec.grad is not None:
            unit = self.W_dec / self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            self.W_dec.grad -= (self.W_dec.grad * unit).sum(-1, keepdim=True) * unit

    @torch.no_grad()
    def constrain_parameters(self) -> None:
        """After the optimiser step: renormalise unit-norm decoder rows (dim=-1 of W_dec [d_sae, d_out])."""
        if self.unit_norm_decoder:
            self.W_dec.data /= self.W_dec.data.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def scale_encoder(self, scale: float) -> None:
        """Multiply every pre-activation by `scale` > 0: each of `encoder_parameters()` by
        `scale` (a mechanism's thresholds, which override this, follow)."""
        for parameter in self.encoder_parameters():
            parameter.mul_(scale)

    def encoder_parameters(self) -> list[nn.Parameter]:
        """What `scale_encoder` multiplies: W_enc, b_enc (and a mechanism's extra encoder biases)."""
        return [self.W_enc, self.b_enc]

    @property
    def device(self) -> torch.device:
        return self.W_dec.device

    # ----------------------------------------------------------------- the public mapping, raw units
    # The public entry points take a user's tensor: [..., d] or one vector [d], any floating dtype
    # (computed in the parameters' dtype, returned in the input's), on the dictionary's device;
    # an InputError line otherwise (inputs.py). Training calls `training_losses`, never these.
    def encode(self, x: Tensor) -> Tensor:
        """Raw activations x: [..., d_in] -> reported latents z: [..., d_sae], in x's dtype."""
        rows = as_rows(x, self.d_in, "x", self._where("encode"), self.W_enc)
        return rows.restore(self._encode_rows(rows.rows))

    def decode(self, z: Tensor, x: Tensor | None = None) -> Tensor:
        """Reported latents z: [..., d_sae] (+ the raw input x: [..., d_in] it came from, which a
        skip transcoder needs and other dictionaries ignore) -> raw output ŷ: [..., d_out], in z's dtype."""
        where = self._where("decode")
        latents = as_rows(z, self.d_sae, "z", where, self.W_dec)
        skip = skip_rows(x, latents.lead, where, self.d_in, self.W_enc) if self.W_skip is not None else None
        return latents.restore(self._decode_rows(latents.rows, skip))

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

    def _where(self, method: str) -> str:
        return f"{type(self).__name__}.{method}"

    # ----------------------------------------------------------------- export
    def export_fields(self) -> dict:
        """Architecture-specific cfg.json fields (SAELens layout), e.g. TopK's k."""
        return {}

    def adapt_export_tensors(self, tensors: dict[str, Tensor], latent_scale: Tensor) -> dict[str, Tensor]:
        """Add or rename entries of the folded `tensors` (W_enc, b_enc, W_dec, b_dec[, W_skip]);
        `latent_scale` [d_sae] is already folded into W_enc, b_enc (thresholds need it too).
        `load_folded` must accept the result."""
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
