"""Latents of one batch, dense or sparse, behind one set of operations.

A mechanism writes its activation and its loss terms once, against a latents object; the training
step hands it either the dense reference (every (token, latent) entry) or the sparse path (only
the entries the step needs: sparse.py). What a mechanism may ask of either:

    latents.pre              pre-activations at the entries, with gradient   dense [batch, d_sae] | [nnz]
    latents.full_pre         all pre-activations, no gradient (to choose further entries: AuxK)
    latents.at(p)            a per-latent parameter p [d_sae] aligned with the entries
    latents.decode(v, W)     Σ over each token's entries of v · W[latent]     -> [batch, d_out]
    latents.decode_prefixes(v, W, widths)  the same over latents < w, each w -> [len(widths), batch, d_out]
    latents.column_sums(v)   Σ over each latent's entries                     -> [d_sae]
    latents.total(v)         Σ over all entries                               -> scalar
    latents.fire_counts(v)   entries with v != 0, per latent                  -> [d_sae] int32
    latents.at_rows(idx)     the latents of other entries (idx [batch, k] latent indices)

Which of the two a step uses is this module's choice (`training_latents`), not the model's or the
mechanism's: the constants it reads are measured in docs/performance.md.

A `Selection` is the mechanism's rule for which entries are active in a batch: k per token
(TopK), the top B·k of the batch (BatchTopK) or a mask (ReLU, gated, JumpReLU). The dense path
applies it with gathers or a mask; the sparse path turns it into a `Support`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from dictlearn.dictionaries.sparse import Support, dense_affine, sparse_affine, sparse_decode


class TrainingStep(NamedTuple):
    """What the trainer tells a dictionary about one training step (nothing else reaches it)."""

    step: int = 0  # the optimiser step about to be taken (BatchTopK's θ warm-up)
    sparsity_scale: float = 1.0  # the sparsity coefficient's warm-up factor in [0, 1]
    dead: Tensor | None = None  # [d_sae] bool: latents that fired in none of the last window's tokens
    sparse_path: str = "auto"  # "auto", "always" or "never" (docs/performance.md)


class StepResult(NamedTuple):
    """One training step's forward, in training (scaled) units."""

    y_hat: Tensor  # [batch, d_out]
    losses: dict[str, Tensor]  # weighted loss terms by name; the loss is their sum
    fire_counts: Tensor  # [d_sae] int32: tokens on which each latent fired
    sum_abs: Tensor  # scalar: Σ |z| in reported (folded) units, for the L1 metric


class DenseLatents:
    """Every entry of a [batch, d_sae] pre-activation matrix (the reference path)."""

    def __init__(self, pre: Tensor):
        self.pre, self.full_pre = pre, pre.detach()
        self.n_rows, self.n_cols = pre.shape

    def at(self, param: Tensor) -> Tensor:
        return param  # broadcasts over the batch

    def decode(self, values: Tensor, W: Tensor) -> Tensor:
        return values @ W

    def decode_prefixes(self, values: Tensor, W: Tensor, widths: tuple[int, ...]) -> Tensor:
        """values [batch, d_sae] -> [len(widths), batch, d_out]: Σ_{i < w} values_i W[i] per width
        (strictly increasing), as running sums of disjoint blocks: one decode's work in all."""
        sizes = [b - a for a, b in zip((0, *widths), widths)]
        # split, not one slice per block: its backward is one concatenation, not a zero-filled
        # [batch, d_sae] gradient per block
        parts = zip(values[:, : widths[-1]].split(sizes, 1), W[: widths[-1]].split(sizes, 0))
        return _running_sums([v @ w for v, w in parts])

    def column_sums(self, values: Tensor) -> Tensor:
        return values.sum(0, dtype=torch.promote_types(values.dtype, torch.float32))

    def total(self, values: Tensor) -> Tensor:
        return values.sum()

    def fire_counts(self, values: Tensor) -> Tensor:
        return (values != 0).sum(0, dtype=torch.int32)  # int32 counts: 1.5× faster than int64

    def at_rows(self, indices: Tensor) -> GatheredLatents:
        return GatheredLatents(self.pre, rows=indices)


class GatheredLatents(DenseLatents):
    """Chosen entries of a dense [batch, d_sae] pre-activation matrix, gathered: `rows` [batch, k]
    latent indices per token, or `flat` [m] indices into the flattened matrix."""

    def __init__(self, pre: Tensor, rows: Tensor | None = None, flat: Tensor | None = None):
        self.dense_pre, self.full_pre, self.rows, self.flat = pre, pre.detach(), rows, flat
        self.n_rows, self.n_cols = pre.shape
        self.pre = pre.gather(1, rows) if rows is not None else pre.flatten()[flat]

    def _cols(self) -> Tensor:
        return self.rows if self.rows is not None else self.flat % self.n_cols

    def at(self, param: Tensor) -> Tensor:
        return param[self._cols()]

    def to_dense(self, values: Tensor) -> Tensor:
        """values at the entries -> [batch, d_sae] with zeros elsewhere."""
        if self.rows is not None:
            return torch.zeros_like(self.dense_pre, dtype=values.dtype).scatter(1, self.rows, values)
        flat = torch.zeros(self.dense_pre.numel(), dtype=values.dtype, device=values.device)
        return flat.scatter(0, self.flat, values).view_as(self.dense_pre)

    def decode(self, values: Tensor, W: Tensor) -> Tensor:
        return self.to_dense(values) @ W

    def decode_prefixes(self, values: Tensor, W: Tensor, widths: tuple[int, ...]) -> Tensor:
        return super().decode_prefixes(self.to_dense(values), W, widths)

    def column_sums(self, values: Tensor) -> Tensor:
        return super().column_sums(self.to_dense(values))

    def fire_counts(self, values: Tensor) -> Tensor:
        return super().fire_counts(self.to_dense(values))

    def at_rows(self, indices: Tensor) -> GatheredLatents:
        return GatheredLatents(self.dense_pre, rows=indices)


class SparseLatents:
    """The entries of a `Support`; `values_at(support)` computes pre-activations with the sparse
    encoder backward (sparse.py `sparse_affine`)."""

    def __init__(self, support: Support, full_pre: Tensor, values_at: Callable[[Support], Tensor]):
        self.support, self.full_pre, self.values_at = support, full_pre, values_at
        self.n_rows, self.n_cols = support.n_rows, support.n_cols
        self.pre = values_at(support)

    def at(self, param: Tensor) -> Tensor:
        return param.index_select(0, self.support.cols)

    def decode(self, values: Tensor, W: Tensor) -> Tensor:
        return sparse_decode(self.support, values, W)

    def decode_prefixes(self, values: Tensor, W: Tensor, widths: tuple[int, ...]) -> Tensor:
        """values [nnz] -> [len(widths), batch, d_out]. Each entry below the last width goes to the
        bag (row, block), block = the first width above its latent; one sparse decode of that
        [batch · blocks, d_sae] support, then running sums over the blocks."""
        support, n_blocks = self.support, len(widths)
        keep = (support.cols < widths[-1]).nonzero().squeeze(1)
        cols = support.cols[keep]
        block = torch.bucketize(cols, torch.tensor(widths, device=cols.device), right=True)
        order = (support.rows[keep] * n_blocks + block).sort(stable=True)
        bags = Support(order.values, cols[order.indices], support.n_rows * n_blocks, support.n_cols)
        blocks = sparse_decode(bags, values[keep[order.indices]], W).view(support.n_rows, n_blocks, -1)
        return _running_sums(blocks.unbind(1))

    def column_sums(self, values: Tensor) -> Tensor:
        return self.support.column_sums(values)

    def total(self, values: Tensor) -> Tensor:
        return values.sum()

    def fire_counts(self, values: Tensor) -> Tensor:
        return self.support.fire_counts(values)

    def at_rows(self, indices: Tensor) -> SparseLatents:
        return SparseLatents(Support.from_indices(indices, self.n_cols), self.full_pre, self.values_at)


def _running_sums(blocks) -> Tensor:
    """[a, b, c, …] -> stacked [a, a + b, a + b + c, …] (CPU cumsum over a short leading axis,
    and its flipped backward, cost more than these adds)."""
    sums = [blocks[0]]
    for block in blocks[1:]:
        sums.append(sums[-1] + block)
    return torch.stack(sums)


class Selection:
    """A mechanism's rule for the active entries of one batch, from pre-activations without
    gradient. Build with `rows` (k latents per token), `flat` (any m entries of the batch) or
    `mask` (a lazily computed bool [batch, d_sae]; `implied` when the activation is zero off it
    anyway, so the dense path need not apply it)."""

    def __init__(self, rows: Tensor | None = None, flat: Tensor | None = None,
                 mask: Callable[[], Tensor] | None = None, implied: bool = False, ordered: bool = False):
        self.rows, self.flat, self._mask, self.implied, self.ordered = rows, flat, mask, implied, ordered
        self._mask_value: Tensor | None = None

    @classmethod
    def of_rows(cls, indices: Tensor) -> Selection:
        return cls(rows=indices)

    @classmethod
    def of_flat(cls, indices: Tensor, ordered: bool = False) -> Selection:
        """`ordered`: the indices come ascending (`flat_topk_indices`'), so no sort is needed."""
        return cls(flat=indices, ordered=ordered)

    @classmethod
    def of_mask(cls, mask: Callable[[], Tensor], implied: bool = False) -> Selection:
        return cls(mask=mask, implied=implied)

    @property
    def mask(self) -> Tensor:
        if self._mask_value is None:
            self._mask_value = self._mask()
        return self._mask_value

    def dense_entries(self, pre: Tensor) -> DenseLatents:
        """The entries for a dense activation of `pre` (with gradient)."""
        if self.rows is not None or self.flat is not None:
            return GatheredLatents(pre, rows=self.rows, flat=self.flat)
        return DenseLatents(pre)

    def to_dense(self, entries: DenseLatents, values: Tensor) -> Tensor:
        """Activated values at `dense_entries` -> latents [batch, d_sae], zero off the selection."""
        if isinstance(entries, GatheredLatents):
            return entries.to_dense(values)
        if self._mask is None or self.implied:
            return values
        if values.device.type == "cpu":
            # a multiply by the mask: ~4× faster than torch.where on CPU at [1024, 512], forward and
            # backward. The same values: off the mask a value v ≥ 0 (every mechanism's, after its
            # ReLU) gives +0 as where does (a negative one -0.0, equal to 0), on it v × 1 = v.
            # (the bool mask read as uint8 and cast: 3× faster than a bool operand, the same 0/1)
            return values * self.mask.view(torch.uint8).to(values.dtype)
        return torch.where(self.mask, values, torch.zeros((), dtype=values.dtype, device=values.device))

    def support(self, n_rows: int, n_cols: int, max_density: float | None) -> Support | None:
        """The selection as a Support; None when a mask is denser than `max_density` (None: any)."""
        if self.rows is not None:
            return Support.from_indices(self.rows, n_cols)
        if self.flat is not None:
            return Support.from_flat(self.flat, n_rows, n_cols, ordered=self.ordered)
        mask = self.mask
        if max_density is not None and int(torch.count_nonzero(mask)) > max_density * mask.numel():
            return None
        return Support.from_mask(mask)


def training_latents(model, x: Tensor, sparse_path: str = "auto"):
    """One training step's latents of `model` on scaled x [batch, d_in] -> (latents, values at
    their entries): the sparse path's (`SparseLatents`, values [nnz]) when it gains, else the dense
    reference (`DenseLatents`, values [batch, d_sae]). `sparse_path`: "auto", "always" or "never"."""
    if not _tries_sparse_path(model, sparse_path):
        return _dense(model, x)
    with torch.no_grad():
        pre = model.pre_acts(x)
    max_density = None if sparse_path == "always" else sparse_cutoff(model)
    selection = model.select(pre, training=True)
    support = selection.support(pre.shape[0], model.d_sae, max_density)
    if support is None:  # a per-batch mechanism found this batch too dense: dense, reusing `pre` and its selection
        return _dense(model, x, dense_affine(x, *model.encoder_affine(), pre), selection)
    latents = SparseLatents(support, pre, lambda s: sparse_affine(x, *model.encoder_affine(), pre, s))
    return latents, model.activate_entries(latents, training=True)


def _dense(model, x: Tensor, pre: Tensor | None = None, selection: Selection | None = None):
    """The reference path over all d_sae latents. In full precision the encoder's backward is
    `dense_affine`'s: the tied b_dec's gradient is −W_enc ∂b_enc, not the sum of a [batch, d_in]
    gradient of x − b_dec (one [batch, d_sae] @ [d_sae, d_in] GEMM less, ~1/6 of a dense step).
    Under autocast, autograd's own backward keeps the encoder's gradient GEMM in low precision."""
    if pre is None and not torch.is_autocast_enabled(x.device.type):
        with torch.no_grad():
            pre = model.pre_acts(x)
        pre = dense_affine(x, *model.encoder_affine(), pre)
    pre = model.pre_acts(x) if pre is None else pre
    if selection is None:
        return DenseLatents(pre), model.activate(pre, training=True)
    return DenseLatents(pre), model.activate(pre, training=True, selection=selection)


def _tries_sparse_path(model, sparse_path: str) -> bool:
    """Whether the step tries the sparse path (a per-batch mechanism may still fall back)."""
    if sparse_path in ("never", "always"):
        return sparse_path == "always"
    if model.d_sae < model.sparse_min_latents:
        return False
    # a GPU step under bf16/fp16 autocast: the dense GEMMs run on tensor cores, the sparse path's
    # gathers gain nothing from the low precision (docs/performance.md)
    tensor_cores = model.device.type == "cuda" and torch.is_autocast_enabled("cuda")
    if tensor_cores and not model.sparse_beats_tensor_cores:
        return False
    l0 = model.sparse_l0()  # None: decided per batch from the selection's density
    return l0 is None or l0 / model.d_sae <= sparse_cutoff(model)


def sparse_cutoff(model) -> float:
    """The active fraction up to which `auto` takes the sparse path: wider where d_sae is small
    (up to `sparse_narrow_latents`), whose dense GEMMs gain little from a second thread."""
    return model.sparse_cutoff_narrow if model.d_sae <= model.sparse_narrow_latents else model.sparse_cutoff
