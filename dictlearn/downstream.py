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

import contextlib
import dataclasses
import itertools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from dictlearn.errors import ConfigError, DataError, note
from dictlearn.metrics.bootstrap import per_document, ratio_se
from dictlearn.metrics.downstream import DownstreamMetrics, spliced_token_losses, token_cross_entropy
from dictlearn.models.hooks import HookPoint, capture, run_until_captured, splice
from dictlearn.models.tiny import DEFAULT_CONTEXT

if TYPE_CHECKING:  # loading imports transformers: only where a model is loaded
    from dictlearn.models.loading import LanguageModel

# The mean-ablation vector is the site's mean over this many training rows of the activation file
# (seeded whole blocks): within ~1e-2 σ of the full mean, and the same for every dictionary.
MEAN_SAMPLE_ROWS = 65_536
DOWNSTREAM_STREAM = 17  # seed stream of the windows drawn from held-out documents
CLEAN_LOGITS_BYTES = 1 << 30  # clean logits kept between dictionaries up to this size (`clean_runs`)

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


def run_replaced(model: nn.Module, tokens: Tensor, site: SpliceSite, new: Replacement, keep: Tensor,
                 shortcut: contextlib.AbstractContextManager | None = None) -> Tensor:
    """A causal LM's logits [batch, seq, vocab] with the activation at `site.write` replaced by
    ``new(source, clean)`` where `keep` [batch, seq] is False (a Hugging Face model: `.logits`).

    `source` is the activation at `site.read` (or `site.write`), `clean` the write site's own
    activation; both [batch, seq, d]. Positions where `keep` is True (BOS and document separators
    when special tokens are excluded) keep `clean`, as in harvest, which drops those rows.
    shortcut: a context entered after the hooks are placed (`_from_block`: skip the early blocks).
    """
    write_key = str(HookPoint.parse(site.write))
    keep = keep.unsqueeze(-1)

    def replace(source: Tensor) -> Tensor:
        clean = originals[write_key]
        return torch.where(keep, clean, new(source, clean).to(clean.dtype))

    # capture's hook is registered first, so it records the write site's clean value before
    # splice's hook (same module, later registration: PyTorch runs forward hooks in order)
    # replaces it; a transcoder's replacement needs that value at the kept positions.
    with (capture(model, [site.write]) as originals, splice(model, site.write, replace, read=site.read),
          shortcut or contextlib.nullcontext()):
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


def scored_predictions(special: Tensor) -> Tensor:
    """special: [B, seq] -> [B, seq-1], True where the prediction at t of token t+1 is scored:
    neither position is special (a document boundary or padding)."""
    return ~special[:, :-1] & ~special[:, 1:]


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
    mask = scored_predictions(special)
    metric.update(clean[:, :-1], *(r[:, :-1] for r in runs), tokens[:, 1:], mask)


def downstream_metrics(
    model: nn.Module,
    dictionary: Callable[[Tensor], Tensor],
    site: SpliceSite,
    batches: Iterable[TokenBatch],
    mean_activation: Tensor,
    clean: CleanRuns | None = None,
) -> tuple[dict[str, float], int]:
    """Over `batches` of (tokens [batch, seq], special [batch, seq] bool) on the model's device.

    clean: the dictionary-independent runs of these batches (`clean_runs`; None: computed here).
    The same numbers as `update_from_batch` over the batches (tests/test_downstream.py).
    -> ({key: value} for `DOWNSTREAM_KEYS`, plus `<key>_se` where `clean` knows the windows'
    documents, number of predictions evaluated).
    """
    batches = list(batches)
    clean = clean or clean_runs(model, site, batches, mean_activation)
    return clean.metrics(spliced_losses(model, dictionary, site, batches, clean))


@dataclass
class CleanRuns:
    """What every dictionary at one site is compared against, per batch, computed once: the
    clean logits at the kept predictions [n, vocab], their targets [n], the zero- and
    mean-ablation losses [n] float64, each prediction's document [n] (None: unknown), and the
    residual stream entering block `start` of `blocks` [batch, seq, d] (None: run whole forwards)."""

    logits: list[Tensor]
    targets: list[Tensor]
    ce_zero: list[Tensor]
    ce_mean: list[Tensor]
    documents: list[Tensor] | None
    blocks: str | None = None
    start: int = 0
    entry: list[Tensor] | None = None
    fed: bool = False  # the entry is the site's own activation (an SAE at a block's output): splice it there

    def metrics(self, losses: list[tuple[Tensor, Tensor, Tensor]]) -> tuple[dict[str, float], int]:
        """losses: per batch (ce_clean, ce_spliced, kl) [n] -> (metrics, n predictions)."""
        metric = DownstreamMetrics().to(self.targets[0].device)
        for (ce_clean, ce_spliced, kl), zero, mean in zip(losses, self.ce_zero, self.ce_mean):
            metric.update(losses=(ce_clean, ce_spliced, zero, mean, kl))
        if int(metric.n_tokens) == 0:
            raise ConfigError("downstream metrics: no next-token predictions to evaluate (every position is special)")
        values = {k: float(v) for k, v in metric.compute().items()}
        if self.documents is not None:
            values |= self.standard_errors(losses)
        return values, int(metric.n_tokens)

    def standard_errors(self, losses) -> dict[str, float]:
        """`ce_loss_recovered_se`, `kl_div_se`: bootstrap over the windows' documents (dictlearn.metrics.bootstrap)."""
        ce_clean, ce_spliced, kl = (torch.cat([run[i] for run in losses]) for i in range(3))
        zero, ones = torch.cat(self.ce_zero), torch.ones_like(kl)
        rows = torch.stack([zero - ce_spliced, zero - ce_clean, kl, ones], dim=1)  # [n, 4]
        _, sums = per_document(rows, torch.cat(self.documents))
        sums = sums.cpu().numpy()
        se = ratio_se(sums[:, [0, 2]], sums[:, [1, 3]])
        return {"ce_loss_recovered_se": float(se[0]), "kl_div_se": float(se[1])}


@torch.no_grad()
def clean_runs(model: nn.Module, site: SpliceSite, batches: list[TokenBatch], mean_activation: Tensor,
               documents: list[Tensor] | None = None) -> CleanRuns:
    """The clean, zero-ablated and mean-ablated runs of `batches` (`update_from_batch`'s three
    dictionary-independent passes), and the residual stream where the spliced runs can start.

    documents: per batch [batch, seq] each position's document (-1 at separators), or None.
    """
    blocks, start, fed = _first_block(model, site)
    runs = CleanRuns([], [], [], [], [] if documents is not None else None, blocks, start,
                     [] if blocks is not None else None, fed)
    entry = [f"{blocks}.{start}:input"] if blocks is not None else []
    for b, (tokens, special) in enumerate(batches):
        with capture(model, entry) as acts:
            clean = model(tokens, use_cache=False).logits
        mask = scored_predictions(special)
        target = tokens[:, 1:][mask]
        # kept while all batches' logits fit the budget (a byte vocabulary: a few MB); a 50k
        # vocabulary's would not, and each dictionary reruns the clean forward instead
        keep_logits = clean[:, :-1][mask]
        runs.logits.append(keep_logits if keep_logits.nbytes * len(batches) <= CLEAN_LOGITS_BYTES else None)
        runs.targets.append(target)
        for new, into in ((zero_replacement, runs.ce_zero), (mean_replacement(mean_activation), runs.ce_mean)):
            into.append(token_cross_entropy(run_replaced(model, tokens, site, new, special)[:, :-1][mask], target))
        if documents is not None:  # a prediction belongs to its target's document (a separator: the previous one)
            doc = documents[b].to(tokens.device)
            runs.documents.append(torch.where(doc[:, 1:] >= 0, doc[:, 1:], doc[:, :-1])[mask])
        if runs.entry is not None:
            runs.entry.append(acts[entry[0]].clone())
            if b == 0 and not _starts_cleanly(model, tokens, clean, runs):
                runs.blocks, runs.entry = None, None
    return runs


@torch.no_grad()
def spliced_losses(model: nn.Module, dictionary: Callable[[Tensor], Tensor], site: SpliceSite,
                   batches: list[TokenBatch], clean: CleanRuns) -> list[tuple[Tensor, Tensor, Tensor]]:
    """The spliced run of each batch -> per batch (ce_clean, ce_spliced, kl) [n] float64."""
    out = []
    new = dictionary_replacement(dictionary)
    for b, (tokens, special) in enumerate(batches):
        if clean.fed:  # the dictionary replaces the recorded entry itself, as `run_replaced` would
            hidden, keep = clean.entry[b], special.unsqueeze(-1)
            with _from_block(model, clean, b, torch.where(keep, hidden, new(hidden, hidden).to(hidden.dtype))):
                logits = model(tokens, use_cache=False).logits
        else:
            logits = run_replaced(model, tokens, site, new, special, _from_block(model, clean, b))
        mask = scored_predictions(special)
        clean_logits = clean.logits[b]
        if clean_logits is None:
            clean_logits = model(tokens, use_cache=False).logits[:, :-1][mask]
        out.append(spliced_token_losses(clean_logits, logits[:, :-1][mask], clean.targets[b]))
    return out


# ----------------------------------------------------------------------------- starting mid-model
# A dictionary changes the model only from its site on, so the spliced run need not recompute the
# blocks before it: the residual stream entering the first block the site touches is recorded in
# the clean run and fed to that block while the earlier ones are left out of the block list. The
# shortcut is used only where it gives the clean logits back (checked on the first batch);
# elsewhere (a site outside a block list, a model whose forward indexes its blocks) whole
# forwards run.
def _block_of(model: nn.Module, hook: str) -> tuple[str, int] | None:
    """(path of the nn.ModuleList, index) of the block that holds `hook`'s module, if any."""
    parts = HookPoint.parse(hook).module.split(".")
    for i in range(1, len(parts)):
        if parts[i].isdigit() and isinstance(model.get_submodule(".".join(parts[:i])), nn.ModuleList):
            return ".".join(parts[:i]), int(parts[i])
    return None


def _first_block(model: nn.Module, site: SpliceSite) -> tuple[str | None, int, bool]:
    """(the block list, the first block index the spliced run needs, whether the site is that
    block's input, fed by the dictionary); (None, 0, False) without one. An SAE at a block's
    output starts at the next block, whose input that output is."""
    found = [_block_of(model, hook) for hook in {site.write, site.read or site.write}]
    if any(f is None for f in found) or len({f[0] for f in found}) != 1:
        return None, 0, False
    blocks, start = found[0][0], min(f[1] for f in found)
    at_output = HookPoint.parse(site.write) == HookPoint(f"{blocks}.{start}", "output")
    if site.read is None and at_output and start + 1 < len(model.get_submodule(blocks)):
        return blocks, start + 1, True
    return blocks, start, False


@contextlib.contextmanager
def _from_block(model: nn.Module, clean: CleanRuns, batch: int, hidden: Tensor | None = None):
    """Inside: the model's forward runs blocks[start:] only, block `start` fed `hidden` (default:
    the recorded residual stream of `batch`); a no-op without one."""
    if clean.entry is None:
        yield
        return
    owner_path, _, name = clean.blocks.rpartition(".")
    owner = model.get_submodule(owner_path)
    blocks = getattr(owner, name)
    hidden = clean.entry[batch] if hidden is None else hidden
    # prepend: the splice's own pre-hooks on that block (a site at its input) see the fed value
    handle = blocks[clean.start].register_forward_pre_hook(lambda module, args: (hidden, *args[1:]), prepend=True)
    setattr(owner, name, nn.ModuleList(list(blocks)[clean.start:]))
    try:
        yield
    finally:
        setattr(owner, name, blocks)
        handle.remove()


def _starts_cleanly(model: nn.Module, tokens: Tensor, clean: Tensor, runs: CleanRuns) -> bool:
    """The shortcut, with nothing spliced, reproduces the clean logits [batch, seq, vocab]."""
    try:
        with _from_block(model, runs, 0):
            logits = model(tokens, use_cache=False).logits
    except Exception:  # a forward that needs its whole block list
        return False
    return logits.shape == clean.shape and bool(torch.allclose(logits, clean, rtol=1e-5, atol=1e-5))


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
    """`heldout_windows`' batches."""
    return heldout_windows(tokenizer, corpus, context, count, exclude_special, batch_size, data, seed)[0]


def heldout_windows(
    tokenizer, corpus: str | None, context: int, count: int, exclude_special: bool, batch_size: int,
    data: str | None = None, seed: int = 0,
) -> tuple[list[TokenBatch], list[Tensor]]:
    """`count` held-out windows as batches of (tokens [B, context], special [B, context]), and
    each batch's documents [B, context] (the corpus document of each position, -1 at BOS).

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
        note(f"{where} hold {len(windows)} windows of {context} tokens, "
              f"fewer than the {count} asked for")
    batches, documents = [], []
    for i in range(0, len(windows), batch_size):
        group = windows[i : i + batch_size]
        documents.append(torch.stack([w.doc_index for w in group]))
        batches.append((torch.stack([w.tokens for w in group]), (documents[-1] < 0) & exclude_special))
    return batches, documents


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
    documents: dict[tuple, list[Tensor]] = field(default_factory=dict)  # per key of `windows`
    cleans: dict[tuple, CleanRuns] = field(default_factory=dict)
    shared: dict = field(default_factory=dict)  # evaluate's per-file values (`HeldOutData.memo`)

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
            batches, documents = heldout_windows(lm.tokenizer, corpus, context, count, exclude_special, batch_size,
                                                 data, seed)
            self.windows[key] = [(tokens.to(device), special.to(device)) for tokens, special in batches]
            self.documents[key] = documents
        return self.windows[key]

    def clean(self, lm: LanguageModel, site: SpliceSite, batches: list[TokenBatch], mean: Tensor) -> CleanRuns:
        """`clean_runs` of batches this cache built, at `site` with the mean-ablation vector `mean`
        [d]: once per (model, site, windows, mean), shared by every dictionary there."""
        windows = next(k for k, v in self.windows.items() if v is batches)
        key = (lm.name, site, windows, tuple(mean.tolist()))
        if key not in self.cleans:
            self.cleans[key] = clean_runs(lm.model, site, batches, mean, self.documents.get(windows))
        return self.cleans[key]


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
    cache: DownstreamCache | None = None  # where the clean runs are kept, built on the first `run`

    @property
    def n_contexts(self) -> int:
        return sum(len(tokens) for tokens, _ in self.batches)

    def run(self, dictionary: Callable[[Tensor], Tensor], standard_errors: bool = False
            ) -> tuple[dict[str, float], int]:
        """The dictionary's downstream metrics (with their `_se` when `standard_errors`): one
        spliced forward per batch, the clean and ablated runs computed once."""
        if self.cache is None:
            self.cache = DownstreamCache(str(_device(self.lm)), windows={("given",): self.batches})
        clean = self.cache.clean(self.lm, self.site, self.batches, self.mean_activation)
        clean = clean if standard_errors else dataclasses.replace(clean, documents=None)
        return downstream_metrics(self.lm.model, dictionary, self.site, self.batches, self.mean_activation, clean)

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
    cache = cache or DownstreamCache()
    batches = cache.batches(lm, corpus, context, contexts, exclude_special, batch_size,
                            None if data is None else str(data), seed)
    mean = ablation_mean(ablation_rows).to(_device(lm))
    return SplicedInputs(lm, site, batches, mean, corpus, context, cache)
