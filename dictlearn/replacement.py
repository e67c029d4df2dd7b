"""Replacement models: every MLP of a language model replaced at once by a set of transcoders.

A *replacement* maps each replaced layer's MLP input to that layer's MLP output through sparse
latents. Per-layer transcoders (Dunefsky et al. 2024) read and write one layer each; a
cross-layer transcoder (Ameisen et al. 2025, "Circuit Tracing") reads every layer's MLP input and
writes each layer's MLP output from the latents of that layer and all earlier ones. Both expose
the same two calls, so one splice serves both:

    encode_layer(i, x_i) -> a_i                  x_i [n, d_in] raw MLP input of layer i -> a_i [n, d_sae_i]
    decode_layer(i, a[:i+1], x[:i+1]) -> y_i     y_i [n, d_out], the replacement of layer i's MLP output

(i indexes `layers`, the replaced blocks in model order). In the *replacement model* the MLPs
are spliced together: layer i's input is the residual stream that the replaced layers before it
produced, so errors compound down the model, which is what a circuit built on the replacement
inherits. `replacement_metrics` measures it (docs/replacement.md):

- `replacement_ce_loss_recovered`, `replacement_kl_div` (and the other downstream keys with the
  `replacement_` prefix): the whole replacement against the clean model, the zero ablation
  being every replaced MLP's output set to 0 (the mean ablation: each set to its mean output);
- `total_l0`: latents firing per token, summed over layers;
- `layers`: per layer, `fvu` and `l0` on the clean run's activations (as a single-layer
  evaluation measures them), and `ce_loss_recovered` / `kl_div` with only that layer's MLP
  replaced — every other layer keeping its error term, i.e. its true output.

With error terms at every layer (Ameisen et al.'s local replacement model; SAELens
`use_error_term`) the spliced model *is* the clean model, so those numbers are 1 and 0 by
construction and are not reported; `replaced(..., errors=True)` exists to check that.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dictlearn.downstream import TokenBatch, scored_predictions
from dictlearn.errors import ConfigError
from dictlearn.metrics.downstream import DownstreamMetrics, spliced_token_losses, token_cross_entropy
from dictlearn.metrics.reconstruction import ReconstructionMetrics
from dictlearn.models.hooks import HookPoint, capture, resolve_module, standard_hooks


@dataclass(frozen=True)
class MLPSite:
    """One replaced MLP: its block index, the hook it reads (input) and the hook it writes (output)."""

    layer: int
    read: str
    write: str


def mlp_sites(model: nn.Module, layers: Sequence[int]) -> list[MLPSite]:
    """The standard MLP hooks of `layers` (increasing order; `dictlearn.models.hooks.standard_hooks`)."""
    if not layers or any(b <= a for a, b in zip(layers, layers[1:])):
        raise ConfigError(f"layers {list(layers)}: give each replaced layer once, in increasing order")
    sites = []
    for layer in layers:
        hooks = standard_hooks(model, layer)
        sites.append(MLPSite(layer, hooks["mlp_in"], hooks["mlp_out"]))
    return sites


class TranscoderSet(nn.Module):
    """Per-layer transcoders (or skip transcoders) as one replacement: layer i's output is the
    i-th dictionary applied to layer i's input, ``decode(encode(x_i), x_i)``."""

    def __init__(self, dictionaries: Sequence[nn.Module]):
        super().__init__()
        self.dictionaries = nn.ModuleList(dictionaries)

    def encode_layer(self, i: int, x: Tensor) -> Tensor:
        """x [n, d_in] -> a [n, d_sae] (raw units, as `Dictionary.encode`)."""
        return self.dictionaries[i].encode(x)

    def decode_layer(self, i: int, latents: Sequence[Tensor], inputs: Sequence[Tensor]) -> Tensor:
        """-> y_i [n, d_out] from layer i's own latents (and input, for a skip transcoder)."""
        return self.dictionaries[i].decode(latents[i], inputs[i])


def _dtype(replacement: object) -> torch.dtype:
    parameters = list(replacement.parameters()) if isinstance(replacement, nn.Module) else []
    return parameters[0].dtype if parameters else torch.float32


@contextlib.contextmanager
def replaced(model: nn.Module, sites: Sequence[MLPSite], replacement, keep: Tensor | None = None,
             only: Sequence[int] | None = None, errors: Sequence[Tensor] | None = None,
             record: dict | None = None) -> Iterator[None]:
    """Inside the block, each site's MLP output is the replacement's output for its layer.

    keep [batch, seq] bool: positions that keep the MLP's own output (BOS, separators: the rows
    harvest drops). only: indices into `sites` whose output is replaced (None: all); the others
    keep the true MLP output (their error term), but every layer is still encoded, as a
    cross-layer transcoder's later outputs read earlier latents. errors: per site
    [batch, seq, d_out] added to the replacement's output (the error terms of a clean run).
    record: filled with per-site "latents" and "outputs" [batch*seq, ·] of this forward.
    """
    dtype = _dtype(replacement)
    latents: list[Tensor] = []
    inputs: list[Tensor] = []
    handles = []
    replace = set(range(len(sites))) if only is None else set(only)

    def read(i: int, args: tuple) -> None:
        x = args[0]
        if i == 0:  # a new forward
            inputs.clear(), latents.clear()
        if len(inputs) != i:
            raise ConfigError(f"replacement: {sites[i].read} ran out of layer order; the sites must follow the forward")
        flat = _rows(x).to(dtype)
        inputs.append(flat)
        latents.append(replacement.encode_layer(i, flat))

    def write(i: int, output: Tensor) -> Tensor:
        if len(inputs) != i + 1:
            raise ConfigError(f"replacement: {sites[i].write} ran before its input {sites[i].read} was read")
        new = replacement.decode_layer(i, latents, inputs).reshape(output.shape).to(output.dtype)
        if record is not None:
            record.setdefault("latents", []).append(latents[i])
            record.setdefault("outputs", []).append(new)
        if errors is not None:
            new = new + errors[i]
        if i not in replace:
            return output
        return new if keep is None else torch.where(keep.unsqueeze(-1), output, new)

    try:
        for i, site in enumerate(sites):
            if HookPoint.parse(site.read) != HookPoint(HookPoint.parse(site.write).module, "input"):
                raise ConfigError(f"replacement: {site.read} is not the input of {site.write}")
            module = resolve_module(model, HookPoint.parse(site.write).module)
            handles.append(module.register_forward_pre_hook(lambda m, args, i=i: read(i, args)))
            handles.append(module.register_forward_hook(lambda m, args, out, i=i: write(i, out)))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def ablated(model: nn.Module, sites: Sequence[MLPSite], values: Sequence[Tensor | None], keep: Tensor | None):
    """Inside the block, each site's MLP output is `values[i]` ([d_out], broadcast; None: zero)."""
    def write(i: int, output: Tensor) -> Tensor:
        value = torch.zeros_like(output) if values[i] is None else values[i].to(output).expand_as(output)
        return value if keep is None else torch.where(keep.unsqueeze(-1), output, value)

    handles = [resolve_module(model, HookPoint.parse(s.write).module)
               .register_forward_hook(lambda m, args, out, i=i: write(i, out)) for i, s in enumerate(sites)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _rows(a: Tensor) -> Tensor:
    return a.reshape(-1, a.shape[-1])


def _logits(model: nn.Module, tokens: Tensor) -> Tensor:
    return model(tokens, use_cache=False).logits


@dataclass
class Reference:
    """What every replacement of one model is measured against on the same batches, computed once
    (`reference`): per batch the clean logits, the zero- and mean-ablated CE per prediction and,
    when small enough to keep (`KEEP_ACTS_BYTES`), the MLP inputs and outputs of the clean run
    (else each replacement's evaluation captures them again); each site's mean MLP output."""

    cleans: list[Tensor]
    zero: list[Tensor]
    mean: list[Tensor]
    acts: list[dict[str, Tensor]] | None
    means: list[Tensor]
    n_rows: int


KEEP_ACTS_BYTES = 1 << 28  # 256 MiB of clean MLP inputs and outputs kept between replacements


def _kept(special: Tensor) -> Tensor:
    return ~special.reshape(-1)


def _masked(tokens: Tensor, special: Tensor) -> tuple[Tensor, Tensor]:
    """(mask [B, seq-1] of predictions scored: neither position special, their targets [N])."""
    mask = scored_predictions(special)
    return mask, tokens[:, 1:][mask]


@torch.no_grad()
def reference(model: nn.Module, sites: Sequence[MLPSite], batches: Sequence[TokenBatch]) -> Reference:
    """The clean and ablated runs of `batches` that `replacement_metrics` compares every replacement
    with (class docstring): two passes, as the mean ablation needs the means of every batch."""
    hooks = [s.read for s in sites] + [s.write for s in sites]
    cleans, acts, sums, n_rows, size = [], [], None, 0, 0
    for tokens, special in batches:
        with capture(model, hooks) as captured:
            cleans.append(_logits(model, tokens))
        kept = _kept(special)
        batch_sums = [_rows(captured[str(HookPoint.parse(s.write))])[kept].double().sum(0) for s in sites]
        sums = batch_sums if sums is None else [a + b for a, b in zip(sums, batch_sums)]
        n_rows += int(kept.sum())
        size += sum(t.numel() * t.element_size() for t in captured.values())
        acts.append(dict(captured) if size <= KEEP_ACTS_BYTES else {})
    if n_rows == 0:
        raise ConfigError("replacement metrics: every position is special; nothing to evaluate")
    means = [m / n_rows for m in sums]
    zero, mean = [], []
    for tokens, special in batches:
        mask, target = _masked(tokens, special)
        with ablated(model, sites, [None] * len(sites), special):
            zero.append(token_cross_entropy(_logits(model, tokens)[:, :-1][mask], target))
        with ablated(model, sites, means, special):
            mean.append(token_cross_entropy(_logits(model, tokens)[:, :-1][mask], target))
    return Reference(cleans, zero, mean, acts if size <= KEEP_ACTS_BYTES else None, means, n_rows)


@torch.no_grad()
def replacement_metrics(model: nn.Module, sites: Sequence[MLPSite], replacement,
                        batches: Sequence[TokenBatch], per_layer: bool = True, ref: Reference | None = None) -> dict:
    """The replacement model's metrics (module docstring) over `batches` of (tokens [B, seq],
    special [B, seq] bool) on the model's device. per_layer: also the one-layer-replaced runs
    (one forward per layer and batch). ref: `reference(model, sites, batches)`, computed here when
    None (pass it to evaluate several replacements on the same batches: the clean and ablated runs
    are then made once). -> {"replacement_<downstream key>", "total_l0", "layers": {str(layer):
    {...}}, "n_tokens", "n_rows"}."""
    ref = reference(model, sites, batches) if ref is None else ref
    mlp_reads = [s.read for s in sites] + [s.write for s in sites]
    recon = [ReconstructionMetrics() for _ in sites]
    fired = torch.zeros(len(sites), dtype=torch.float64)
    whole, alone = DownstreamMetrics(), [DownstreamMetrics() for _ in sites]
    for b, (tokens, special) in enumerate(batches):
        acts = ref.acts[b] if ref.acts is not None else None
        if acts is None:  # not kept (too large): the clean run again
            with capture(model, mlp_reads) as acts:
                _logits(model, tokens)
        kept = _kept(special)
        outs = [acts[str(HookPoint.parse(s.write))] for s in sites]
        xs = [_rows(acts[str(HookPoint.parse(s.read))]).to(_dtype(replacement)) for s in sites]
        latents = [replacement.encode_layer(i, x) for i, x in enumerate(xs)]
        for i in range(len(sites)):  # per-layer reconstruction on the clean run
            y_hat = replacement.decode_layer(i, latents, xs)
            recon[i].update(_rows(outs[i])[kept].double(), y_hat[kept].double())
            fired[i] += (latents[i][kept] != 0).sum().double()
        mask, target = _masked(tokens, special)
        clean_kept = ref.cleans[b][:, :-1][mask]

        def losses(logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            return spliced_token_losses(clean_kept, logits[:, :-1][mask], target)

        with replaced(model, sites, replacement, special):
            ce_clean, ce_spliced, kl = losses(_logits(model, tokens))
        whole.update(losses=(ce_clean, ce_spliced, ref.zero[b], ref.mean[b], kl))
        for i in range(len(sites) if per_layer else 0):
            with ablated(model, sites[i:i + 1], [None], special):
                zero_i = token_cross_entropy(_logits(model, tokens)[:, :-1][mask], target)
            with replaced(model, sites, replacement, special, only=[i]):
                ce_clean, ce_spliced, kl = losses(_logits(model, tokens))
            alone[i].update(losses=(ce_clean, ce_spliced, zero_i, ref.mean[b], kl))
    return _results(sites, whole, alone if per_layer else None, recon, fired / ref.n_rows, ref.n_rows)


def _results(sites, whole: DownstreamMetrics, alone, recon, l0: Tensor, n_rows: int) -> dict:
    out = {f"replacement_{k}": float(v) for k, v in whole.compute().items()}
    out["total_l0"] = float(l0.sum())
    layers = {}
    for i, site in enumerate(sites):
        values = recon[i].compute()
        entry = {"fvu": float(values["fvu"]), "l0": float(l0[i])}
        if alone is not None:
            computed = alone[i].compute()
            entry |= {"ce_loss_recovered": float(computed["ce_loss_recovered"]),
                      "kl_div": float(computed["kl_div"])}
        layers[str(site.layer)] = entry
    out["layers"] = layers
    out["n_tokens"] = int(whole.n_tokens)
    out["n_rows"] = n_rows
    return out
