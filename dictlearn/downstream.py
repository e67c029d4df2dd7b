"""Downstream (spliced-model) runs: the inputs prepared once, then four forward passes per batch.

A dictionary enters the language model at a `SpliceSite`. On the same held-out corpus windows the
model runs four ways: clean; spliced (the site's activation replaced by the dictionary's output);
zero-ablated; mean-ablated. `DownstreamMetrics` (dictlearn.metrics.downstream) turns the four sets
of logits into `ce_loss_recovered`, `kl_div`, ... (definitions: docs/evaluate.md).

`prepare` builds what every dictionary at one site shares — the loaded model, the site, the
held-out token batches on the model's device (windows drawn at random from the activation file's
held-out documents, `heldout_batches`) and the mean-ablation vector — for both
`dictlearn evaluate` and `DownstreamMetricsCallback`:

    lm = load_model("runs/model")
    inputs = prepare(lm, SpliceSite("transformer.h.2"), file_attrs, target_rows, contexts=64, batch_size=8)
    metrics, n_tokens = inputs.run(dictionary)

An SAE reads and writes one site; a transcoder reads the MLP input and writes the MLP output
(``SpliceSite("transformer.h.2.mlp", read="transformer.h.2.mlp:input")``).
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from dictlearn.errors import ConfigError, DataError
from dictlearn.metrics.downstream import DownstreamMetrics
from dictlearn.models.hooks import HookPoint, capture, run_until_captured, splice
from dictlearn.models.tiny import DEFAULT_CONTEXT

if TYPE_CHECKING:  # loading imports transformers: only where a model is loaded
    from dictlearn.models.loading import LanguageModel

# The mean-ablation vector is the site's mean over this many training rows of the activation file
# (seeded whole blocks): within ~1e-2 σ of the full mean, and the same for every dictionary.
MEAN_SAMPLE_ROWS = 65_536
DOWNSTREAM_STREAM = 17  # seed stream of the windows drawn from held-out documents

TokenBatch = tuple[Tensor, Tensor]  # (tokens [batch, context], special [batch, context] bool)
Replacement = Callable[[Tensor, Tensor], Tensor]


# ----------------------------------------------------------------------------- where and how
@dataclass(frozen=True)
class SpliceSite:
    """Where a dictionary enters the model: it reads `read` (None: `write` itself, an SAE) and
    its output replaces the activation at `write` (an SAE's hook; a transcoder's MLP output)."""

    write: str
    read: str | None = None

    @classmethod
    def from_metadata(cls, hook_name: str | None, hook_name_out: str | None, transcoder: bool) -> SpliceSite:
        """The site recorded in an export (cfg.json metadata.hook_name / hook_name_out)."""
        if not hook_name:
            raise ConfigError("the export records no metadata.hook_name, so it cannot be spliced into a model")
        if not transcoder:
            return cls(hook_name)
        if not hook_name_out:
            raise ConfigError(
                f"transcoder reads {hook_name!r} but its export records no metadata.hook_name_out (the site it writes)"
            )
        return cls(hook_name_out, read=hook_name)


def run_replaced(model: nn.Module, tokens: Tensor, site: SpliceSite, new: Replacement, keep: Tensor) -> Tensor:
    """A causal LM's logits [batch, seq, vocab] with the activation at `site.write` replaced by
    ``new(source, clean)`` where `keep` [batch, seq] is False (a Hugging Face model: `.logits`).

    `source` is the activation at `site.read` (or `site.write`), `clean` the write site's own
    activation; both [batch, seq, d]. Positions where `keep` is True (BOS and document separators
    when special tokens are excluded) keep `clean`, as in harvest, which drops those rows.
    """
    write_key = str(HookPoint.parse(site.write))
    keep = keep.unsqueeze(-1)

    def replace(source: Tensor) -> Tensor:
        clean = originals[write_key]
        return torch.where(keep, clean, new(source, clean).to(clean.dtype))

    # capture's hook is registered first, so it records the write site's clean value before
    # splice's hook (same module, later registration: PyTorch runs forward hooks in order)
    # replaces it; a transcoder's replacement needs that value at the kept positions.
    with capture(model, [site.write]) as originals, splice(model, site.write, replace, read=site.read):
        return model(tokens, use_cache=False).logits


def dictionary_replacement(dictionary: Callable[[Tensor], Tensor]) -> Replacement:
    """`new(source, clean)` = dictionary(source) on rows [n, d_in], in the dictionary's dtype."""
    parameters = list(dictionary.parameters()) if isinstance(dictionary, nn.Module) else []
    dtype = parameters[0].dtype if parameters else torch.float32

    def new(source: Tensor, clean: Tensor) -> Tensor:
        flat = source.reshape(-1, source.shape[-1]).to(dtype)
        return dictionary(flat).reshape(*clean.shape[:-1], -1)

    return new


def zero_replacement(source: Tensor, clean: Tensor) -> Tensor:
    return torch.zeros_like(clean)


def mean_replacement(mean: Tensor) -> Replacement:
    """`new` that writes the per-dimension mean activation [d] at every replaced position."""

    def new(source: Tensor, clean: Tensor) -> Tensor:
        return mean.to(clean.device, clean.dtype).expand_as(clean)

    return new


def ablation_mean(rows: Tensor) -> Tensor:
    """The mean-ablation vector: rows [n, d] of the site's activation -> [d] float32, summed in float64."""
    return rows.double().mean(0).float()


# ----------------------------------------------------------------------------- the four passes
@torch.no_grad()
def update_from_batch(
    metric: DownstreamMetrics,
    model: nn.Module,
    dictionary: Callable[[Tensor], Tensor],
    site: SpliceSite,
    tokens: Tensor,
    special: Tensor,
    mean_activation: Tensor,
) -> None:
    """Run the four passes on tokens [batch, seq] and add their next-token losses to `metric`.

    special [batch, seq] bool: positions that keep their clean activation (BOS, separators). A
    prediction counts when its own position was replaced and its target is not special: the
    logits at a kept position are the same in every run (causal attention), and predicting a
    document separator is not the text's loss.
    """
    clean = model(tokens, use_cache=False).logits
    runs = [
        run_replaced(model, tokens, site, new, special)
        for new in (dictionary_replacement(dictionary), zero_replacement, mean_replacement(mean_activation))
    ]
    mask = ~special[:, :-1] & ~special[:, 1:]
    metric.update(clean[:, :-1], *(r[:, :-1] for r in runs), tokens[:, 1:], mask)


def downstream_metrics(
    model: nn.Module,
    dictionary: Callable[[Tensor], Tensor],
    site: SpliceSite,
    batches: Iterable[TokenBatch],
    mean_activation: Tensor,
) -> tuple[dict[str, float], int]:
    """Over `batches` of (tokens [batch, seq], special [batch, seq] bool) on the model's device.

    -> ({key: value} for `DOWNSTREAM_KEYS`, number of predictions evaluated).
    """
    metric = DownstreamMetrics()
    for tokens, special in batches:
        metric = metric.to(tokens.device)  # states beside the logits (a no-op after the first batch)
        update_from_batch(metric, model, dictionary, site, tokens, special, mean_activation)
    if int(metric.n_tokens) == 0:
        raise ConfigError("downstream metrics: no next-token predictions to evaluate (every position is special)")
    return {k: float(v) for k, v in metric.compute().items()}, int(metric.n_tokens)


# ----------------------------------------------------------------------------- the windows
def recorded_corpus(recorded: str | None) -> str | None:
    """The corpus argument for a `corpus` provenance attribute (`corpus_name`'s output)."""
    recorded = str(recorded or "")
    if not recorded or recorded.startswith("python-stdlib"):
        return None  # the standard library, of this interpreter
    if not Path(recorded).exists():
        raise ConfigError(f"corpus {recorded} (recorded in the data file) does not exist here; pass --corpus PATH")
    return recorded


def heldout_batches(
    tokenizer, corpus: str | None, context: int, count: int, exclude_special: bool, batch_size: int,
    data: str | None = None, seed: int = 0,
) -> list[TokenBatch]:
    """`count` held-out windows as (tokens [B, context], special [B, context]).

    When the activation file `data` records held-out documents (`dictlearn harvest`): `count`
    windows drawn at random (seeded by `seed`, kept in order) from the windows of those documents'
    excerpts, packed as harvest packed them. Otherwise: the first `count` windows of the corpus's
    ``heldout`` split. special: the BOS positions (first token, document separators: the rows
    harvest drops) when `exclude_special`, else all False.
    """
    from dictlearn.models.corpus import corpus_name, iter_documents, iter_windows

    excerpts = _heldout_excerpts(data)
    if excerpts is not None:
        windows = _drawn_windows(excerpts, tokenizer, corpus, context, count, seed)
        where = f"the held-out documents of {data}"
    else:
        windows = list(itertools.islice(iter_windows(iter_documents(corpus, "heldout"), tokenizer, context), count))
        where = "the held-out corpus"
    if not windows:
        raise DataError(f"corpus {corpus_name(corpus)}: no whole held-out window of {context} tokens in {where}; "
                        "lower --context or pass a larger --corpus")
    if len(windows) < count:
        print(f"dictlearn: note: {where} hold {len(windows)} windows of {context} tokens, "
              f"fewer than the {count} asked for", file=sys.stderr)
    batches = []
    for i in range(0, len(windows), batch_size):
        group = windows[i : i + batch_size]
        special = torch.stack([w.doc_index for w in group]) < 0
        batches.append((torch.stack([w.tokens for w in group]), special & exclude_special))
    return batches


def _heldout_excerpts(data: str | None) -> list[tuple[int, str, int, int]] | None:
    """(doc_index, name, start, stop) of the held-out documents `data` records, in file order;
    None when there is no file or it records none (docs/data.md, "Which documents")."""
    if not data or not Path(data).is_file():
        return None
    import h5py

    with h5py.File(data, "r") as f:
        group = f.get("documents")
        if not isinstance(group, h5py.Group) or "heldout_start" not in group.attrs:
            return None
        heldout = group["heldout"][()]
        columns = (group["index"][()], group["name"].asstr()[()], group["start"][()], group["stop"][()])
    return [(int(i), str(n), int(a), int(b)) for i, n, a, b, h in zip(*columns, heldout) if h]


def _drawn_windows(excerpts, tokenizer, corpus: str | None, context: int, count: int, seed: int) -> list:
    """`count` of the held-out excerpts' windows at random (seeded), in order; the excerpts are
    re-read from `corpus`, whose files must be the ones harvested."""
    from dictlearn.models.corpus import Document, corpus_name, document_tokens, pack_windows, split_files

    files = {name: path for name, path in split_files(corpus, "all")}
    pieces = []
    for index, name, start, stop in excerpts:
        ids = document_tokens(Document(name, files[name].read_bytes()), tokenizer) if name in files else None
        if ids is None or len(ids) < stop:
            raise ConfigError(f"corpus {corpus_name(corpus)}: held-out document {name!r} is missing or shorter than "
                              "when it was harvested; pass the harvested --corpus (and its tokenizer's model)")
        pieces.append((index, ids[start:stop]))
    windows = list(pack_windows(pieces, tokenizer.bos_token_id, context))
    chosen = np.random.default_rng([seed, DOWNSTREAM_STREAM]).permutation(len(windows))[:count]
    return [windows[i] for i in np.sort(chosen)]


@dataclass
class DownstreamCache:
    """Language models and held-out token batches loaded once and shared by several dictionaries
    (the exports of one `dictlearn evaluate` run, or of several `evaluate()` calls)."""

    device: str = "cpu"
    models: dict[str, LanguageModel] = field(default_factory=dict)
    windows: dict[tuple, list[TokenBatch]] = field(default_factory=dict)

    def model(self, name: str) -> LanguageModel:
        """`load_model(name)` on this cache's device, loaded on first use."""
        if name not in self.models:
            from dictlearn.models.loading import load_model

            self.models[name] = load_model(name, device=self.device)
        return self.models[name]

    def batches(self, lm: LanguageModel, corpus: str | None, context: int, count: int, exclude_special: bool,
                batch_size: int, data: str | None = None, seed: int = 0) -> list[TokenBatch]:
        """`heldout_batches` on the model's device, built on first use."""
        device = _device(lm)
        key = (lm.name, corpus, context, count, exclude_special, batch_size, str(device), data, seed)
        if key not in self.windows:
            batches = heldout_batches(lm.tokenizer, corpus, context, count, exclude_special, batch_size, data, seed)
            self.windows[key] = [(tokens.to(device), special.to(device)) for tokens, special in batches]
        return self.windows[key]


def _device(lm: LanguageModel) -> torch.device:
    return next(lm.model.parameters()).device


# ----------------------------------------------------------------------------- prepared once
@dataclass
class SplicedInputs:
    """What every dictionary at one site is measured on: `run(dictionary)` -> (metrics, n_tokens)."""

    lm: LanguageModel
    site: SpliceSite
    batches: list[TokenBatch]
    mean_activation: Tensor  # [d_out], on the model's device
    corpus: str | None  # None: the standard library
    context: int

    @property
    def n_contexts(self) -> int:
        return sum(len(tokens) for tokens, _ in self.batches)

    def run(self, dictionary: Callable[[Tensor], Tensor]) -> tuple[dict[str, float], int]:
        return downstream_metrics(self.lm.model, dictionary, self.site, self.batches, self.mean_activation)

    def check_widths(self, d_in: int, d_out: int, what: object) -> None:
        """The model's activations at the site have widths `d_in`/`d_out` (else: another model)."""
        check_site_widths(self.lm, self.site, self.batches[0][0][:1], d_in, d_out, what)


def check_site_widths(lm: LanguageModel, site: SpliceSite, tokens: Tensor, d_in: int, d_out: int, what: object) -> None:
    """One forward of `tokens` [1, n] up to the site: its read and write activations have widths
    `d_in`/`d_out`, or a one-line ConfigError (the dictionary was trained on another model)."""
    read = site.read or site.write
    with torch.no_grad(), capture(lm.model, [read, site.write], stop_after=True) as acts:
        run_until_captured(lm.model, tokens, use_cache=False)
    for hook, expected, role in ((read, d_in, "d_in"), (site.write, d_out, "d_out")):
        width = acts[str(HookPoint.parse(hook))].shape[-1]
        if width != expected:
            raise ConfigError(f"model {lm.name}: hook {hook!r} has width {width} but {what} has "
                              f"{role}={expected}; it was trained on another model — pass --model")


def prepare(
    lm: LanguageModel,
    site: SpliceSite,
    provenance: Mapping[str, object],
    ablation_rows: Tensor,
    *,
    contexts: int,
    batch_size: int,
    corpus: str | None = None,
    context: int | None = None,
    cache: DownstreamCache | None = None,
    data: str | None = None,
    seed: int = 0,
) -> SplicedInputs:
    """The spliced runs' inputs on `lm`'s device.

    provenance: the activation file's attributes (`corpus`, `context_size`, `exclude_special`;
    a data module's also `path`, the file). ablation_rows [n, d_out]: sampled training rows of
    the site's activation (the target, for a transcoder), whose mean is the mean-ablation vector.
    `corpus`/`context` override the file's. data: the activation file (default: provenance's
    `path`); when it records held-out documents, the windows are `contexts` of theirs drawn at
    random with `seed`, else the first `contexts` windows of the corpus's held-out split
    (`heldout_batches`); `batch_size` per forward pass.
    """
    context = int(context or provenance.get("context_size") or DEFAULT_CONTEXT)
    limit = getattr(getattr(lm.model, "config", None), "max_position_embeddings", None)
    if limit is not None and context > limit:
        raise ConfigError(f"--context {context}: model {lm.name} takes at most {limit} tokens")
    corpus = corpus or recorded_corpus(provenance.get("corpus"))
    exclude_special = bool(provenance.get("exclude_special", True))
    data = data or provenance.get("path")
    batches = (cache or DownstreamCache()).batches(lm, corpus, context, contexts, exclude_special, batch_size,
                                                   None if data is None else str(data), seed)
    mean = ablation_mean(ablation_rows).to(_device(lm))
    return SplicedInputs(lm, site, batches, mean, corpus, context)
