"""Harvesting: a language model's activations at named hooks over a corpus -> one HDF5 file.

    lm = load_model(None)                                   # dictlearn.models.loading: the embedded model
    hooks = default_hooks(lm.model)                         # resid, mlp:input, mlp of the middle layer
    harvest(lm, hooks, "acts.h5", tokens=200_000, context=256)

Rows are tokens. `dictlearn.harvest.plan` picks the text: the split's documents in a seeded order,
a capped excerpt of each, every 10th document held out; each side's excerpts are packed into
windows of `context` tokens, ``[BOS] + the next context - 1 tokens`` of the stream, training
windows first. The windows go through the model `batch_size` at a time, each forward stopping
after the deepest hook.

- **Rows.** Row ``r`` is token ``position[r]`` of window ``window_index[r]``; rows are in window
  order, then position order. ``exclude_special`` (default) drops every BOS position — the first
  token of each window, an attention-sink outlier, and the separators between documents — as
  SAELens and SAEBench evaluations do (docs/metrics.md#tokens); ``doc_index`` is -1 exactly at BOS positions, so these
  are the rows dropped. The file holds exactly `tokens` rows (the last window may be cut short).
- **Too little text.** The windows needed are counted before anything is written; a corpus
  with fewer tokens than asked is a one-line DataError, never a silently shorter file.
  ``tokens="all"`` harvests every whole window of the corpus split instead.
- **Bounded memory.** Datasets are created once at their final size (contiguous, uncompressed:
  the fastest layout to read, docs/data.md) at the first batch, then filled one batch at a time.
- **No half files.** The file is written through `open_for_write`: a temp name beside `out`,
  ``complete`` set last, fsync, rename. An exception, Ctrl-C or (through `dictlearn.cli.harvest`) SIGTERM leaves
  nothing at `out` and no temp file. Non-finite activations (or float16 overflow) stop it too.

Layout (docs/data.md, "Harvested files"): one ``[rows, d]`` dataset per hook, keyed by the hook
name exactly as given, with attribute ``hook_name``; ``token_ids``, ``doc_index``,
``window_index`` int32 and ``position`` int16 (int32 past 32767) per row; root attributes
``model_name``, ``model_revision``, ``corpus``, ``split``, ``context_size``, ``tokens``,
``exclude_special``, ``seed``, ``dtype``, ``windows``, ``prepend_bos`` (+ ``dictlearn_version``,
``complete``); the ``documents/`` group records every document read and which are held out
(`dictlearn.harvest.plan.write_plan`). A Python corpus adds the ``concepts/`` group of per-row
concept labels (`dictlearn.harvest.concepts`).
"""

from __future__ import annotations

import itertools
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

import h5py
import numpy as np
import torch
from torch import nn

from dictlearn.data.h5 import BF16_ATTR, open_for_write
from dictlearn.errors import ConfigError, DataError, note
from dictlearn.harvest.concepts import ConceptWriter, has_python, supports
from dictlearn.harvest.plan import (
    HELDOUT_EVERY, WINDOWS_PER_DOCUMENT, Plan, plan_harvest, planned_windows, write_plan,
)  # fmt: skip
from dictlearn.models.corpus import SPLITS, Document, corpus_name, split_files
from dictlearn.models.hooks import HookPoint, capture, resolve_module, run_until_captured, standard_hooks
from dictlearn.models.loading import LanguageModel

# About a minute for the embedded model's default hooks on 2 free CPU cores (measured speeds:
# benchmarks/RESULTS.md, "Harvest speed"); 400k float32 rows x 3 hooks x d 128 = 620 MB.
DEFAULT_TOKENS = 400_000
DEFAULT_BATCH_SIZE = 16
Dtype = Literal["float32", "float16", "bfloat16"]
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ----------------------------------------------------------------------------- model facts
def n_layers(model: nn.Module) -> int | None:
    """The number of transformer blocks from the HF config (None when the model has no config)."""
    return getattr(getattr(model, "config", None), "num_hidden_layers", None)


def max_positions(model: nn.Module) -> int | None:
    """The longest input the model accepts (GPT-2 ``n_positions``), or None when unknown."""
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def default_hooks(model: nn.Module, layer: int | None = None) -> list[str]:
    """`standard_hooks` of `layer` (default: the middle block) as [resid, mlp_in, mlp_out]."""
    count = n_layers(model)
    if layer is None:
        if count is None:
            raise ConfigError("the model has no config.num_hidden_layers to pick a middle layer;"
                              " pass --layer or --hooks")
        layer = count // 2
    if count is not None and not 0 <= layer < count:
        raise ConfigError(f"--layer {layer}: the model has layers 0..{count - 1}")
    hooks = standard_hooks(model, layer)
    return [hooks["resid"], hooks["mlp_in"], hooks["mlp_out"]]


def layer_hooks(model: nn.Module, layers: str | list[int]) -> list[str]:
    """`standard_hooks` of every listed layer ("all": every block), layer by layer, each as
    [resid, mlp_in, mlp_out] — the file a cross-layer transcoder or a replacement model reads.

    layers: "all" or indices in increasing order; a layer the model lacks is a one-line error.
    """
    count = n_layers(model)
    if layers == "all":
        if count is None:
            raise ConfigError("--layers all: the model has no config.num_hidden_layers; list the layers (--layers 0,1)")
        layers = list(range(count))
    if not layers:
        raise ConfigError("--layers: no layers given; e.g. --layers all or --layers 0,1")
    if any(b <= a for a, b in zip(layers, layers[1:])):
        raise ConfigError(f"--layers {','.join(map(str, layers))}: give each layer once, in increasing order")
    for layer in layers:
        if layer < 0 or (count is not None and layer >= count):
            raise ConfigError(f"--layers: the model has no layer {layer} (it has layers 0..{(count or 0) - 1})")
    return [hook for layer in layers for hook in default_hooks(model, layer)]


def check_hooks(model: nn.Module, hooks: list[str]) -> None:
    """Every hook parses and names a module; no site is given twice (e.g. ``m`` and ``m:output``)."""
    if not hooks:
        raise ConfigError("--hooks: no hook names given; e.g. --hooks transformer.h.2,transformer.h.2.mlp:input")
    seen: dict[str, str] = {}
    for name in hooks:
        point = HookPoint.parse(name)
        resolve_module(model, point.module)
        if str(point) in seen:
            raise ConfigError(f"--hooks: {seen[str(point)]!r} and {name!r} are the same site; give it once")
        seen[str(point)] = name


# ----------------------------------------------------------------------------- planning
def _kept(doc_index: torch.Tensor, exclude_special: bool) -> torch.Tensor:
    """Boolean mask of the positions that become rows: `[..., context]`."""
    return doc_index >= 0 if exclude_special else torch.ones_like(doc_index, dtype=torch.bool)


def _batches(plan: Plan, files, tokenizer, context: int,
             batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The plan's windows in file order, in groups: (tokens [B, context], doc_index [B, context])."""
    stream = planned_windows(plan, files, tokenizer, context)
    while batch := list(itertools.islice(stream, batch_size)):
        yield torch.stack([w.tokens for w in batch]), torch.stack([w.doc_index for w in batch])


# ----------------------------------------------------------------------------- writing
def _to_storage(acts: torch.Tensor, dtype: str, hook: str, first_window: int) -> np.ndarray:
    """[n, d] activations -> the array stored for `dtype` (bf16 as uint16 bits), refusing non-finite."""
    stored = acts.to(DTYPES[dtype])
    if not torch.isfinite(stored).all():
        if torch.isfinite(acts).all():
            peak = float(acts.abs().max())
            raise DataError(f"hook {hook!r}: activations up to {peak:.4g} overflow {dtype} (windows from"
                            f" {first_window}); use --dtype bfloat16 or float32")
        raise DataError(f"hook {hook!r}: the model produced NaN/Inf activations (windows from {first_window});"
                        " nothing was written; check the model's weights")
    if dtype == "bfloat16":
        return stored.view(torch.int16).numpy().view(np.uint16)
    return stored.numpy()


class _Writer:
    """Fills an open file's datasets batch by batch, in row order, up to `rows` rows."""

    def __init__(self, f: h5py.File, hooks: list[str], rows: int, dtype: str, exclude_special: bool,
                 concepts: ConceptWriter | None = None, documents: int = 0):
        self.f, self.hooks, self.rows, self.dtype, self.exclude_special = f, hooks, rows, dtype, exclude_special
        self.concepts = concepts  # the concepts/ group's writer, when the corpus is Python
        self.row = self.window = 0  # next row to write; index of the batch's first window
        self.document_rows = np.zeros(documents, np.int64)  # rows written per doc_index

    def create(self, widths: list[int], context: int) -> None:
        """Every dataset at its final size: contiguous, uncompressed (fastest to read; docs/data.md)."""
        bf16 = self.dtype == "bfloat16"
        for hook, d in zip(self.hooks, widths):
            ds = self.f.create_dataset(hook, shape=(self.rows, d), dtype=np.uint16 if bf16 else self.dtype)
            ds.attrs["hook_name"] = hook
            if bf16:
                ds.attrs["dtype"] = BF16_ATTR
        for key in ("token_ids", "doc_index", "window_index"):
            self.f.create_dataset(key, shape=(self.rows,), dtype=np.int32)
        position = np.int16 if context <= np.iinfo(np.int16).max else np.int32
        self.f.create_dataset("position", shape=(self.rows,), dtype=position)

    def write(self, acts: list[torch.Tensor], tokens: torch.Tensor, doc_index: torch.Tensor) -> int:
        """One batch: acts [B, context, d] per hook, tokens and doc_index [B, context]; -> rows written.

        The kept positions go to the next rows, window by window; the last batch stops at `rows`.
        """
        keep = _kept(doc_index, self.exclude_special)
        n = min(int(keep.sum()), self.rows - self.row)
        windows, positions = keep.nonzero(as_tuple=True)  # row-major: window order, then position
        rows = slice(self.row, self.row + n)
        for hook, captured in zip(self.hooks, acts):
            kept = captured[keep.to(captured.device)][:n].cpu()
            self.f[hook][rows] = _to_storage(kept, self.dtype, hook, self.window)
        self.f["token_ids"][rows] = tokens[keep][:n].numpy()
        written = doc_index[keep][:n].numpy()
        self.f["doc_index"][rows] = written
        self.document_rows += np.bincount(written[written >= 0], minlength=len(self.document_rows))
        self.f["window_index"][rows] = (windows[:n] + self.window).numpy()
        self.f["position"][rows] = positions[:n].numpy()
        if self.concepts is not None:
            self.concepts.write(rows, written)
        self.row, self.window = self.row + n, self.window + len(tokens)
        return n


def _run(model: nn.Module, hooks: list[str], batches, writer: _Writer, context: int, device: str, bar,
         should_stop: Callable[[], bool]) -> None:
    """Forward each batch up to the deepest hook and hand the activations to `writer`."""
    sites = [str(HookPoint.parse(h)) for h in hooks]  # capture's keys ("m:output" is "m")
    with torch.inference_mode(), capture(model, hooks, stop_after=True) as acts:
        for tokens, doc_index in batches:
            if should_stop():
                raise _Terminated
            acts.clear()  # a site missed in this forward must not keep the last batch's values
            run_until_captured(model, tokens.to(device), use_cache=False)
            missing = [h for h, site in zip(hooks, sites) if site not in acts]
            if missing:
                raise ConfigError(f"hook {missing[0]!r}: its module never ran in the forward pass; pick another hook")
            if writer.row == 0 and writer.window == 0:
                writer.create([acts[site].shape[-1] for site in sites], context)
            bar.update(writer.write([acts[site] for site in sites], tokens, doc_index))


def _progress_bar(total: int, enabled: bool):
    from tqdm import tqdm  # installed with lightning

    return tqdm(total=total, unit="tok", unit_scale=True, desc="harvest", file=sys.stderr,
                disable=not (enabled and sys.stderr.isatty()), dynamic_ncols=True)


def harvest(
    lm: LanguageModel,
    hooks: list[str],
    out: str | os.PathLike,
    tokens: int | Literal["all"],
    context: int,
    corpus: str | os.PathLike | None = None,
    split: Literal["train", "heldout", "all"] = "train",
    batch_size: int = DEFAULT_BATCH_SIZE,
    dtype: Dtype = "float32",
    exclude_special: bool = True,
    device: str = "cpu",
    progress: bool = True,
    seed: int = 0,
    should_stop: Callable[[], bool] = lambda: False,
    concepts: bool | None = None,
    windows_per_document: int | None = WINDOWS_PER_DOCUMENT,
) -> Path:
    """Write the activations of `lm` at `hooks` on `tokens` corpus tokens to `out`; -> its path.

    tokens: rows to write (> 0), or "all" for every document of the split, whole. context:
    window length (<= the model's maximum). `seed` orders the documents, places each excerpt and
    picks the held-out documents; `windows_per_document` caps each document's excerpt (None or
    0: no cap) — `dictlearn.harvest.plan`. `should_stop` is asked before each batch; True
    abandons the file (``_Terminated``). `lm.model` is moved to `device`. See the module
    docstring for the file layout.
    concepts: write the ``concepts/`` labels (`dictlearn.harvest.concepts`); None: when the
    split holds Python files and the tokenizer maps tokens to characters.
    """
    out = Path(out)
    _check_args(lm.model, hooks, out, tokens, context, split, batch_size, dtype, windows_per_document)
    model = lm.model.to(device).eval()
    files = split_files(corpus, split)
    where = f"corpus {corpus_name(corpus)} ({split} split)"
    plan = plan_harvest(files, lm.tokenizer, context, None if tokens == "all" else int(tokens), exclude_special,
                        seed, windows_per_document, where)
    attrs = dict(
        model_name=lm.name, model_revision=lm.revision or "", corpus=corpus_name(corpus), split=split,
        context_size=context, tokens=plan.rows, exclude_special=exclude_special, seed=seed, dtype=dtype,
        windows=plan.windows, prepend_bos=lm.tokenizer.bos_token_id is not None,
    )
    batches = _batches(plan, files, lm.tokenizer, context, batch_size)
    label = _wants_concepts(concepts, files, lm.tokenizer)
    with open_for_write(out, attrs) as f, _progress_bar(plan.rows, progress) as bar:
        excerpts = ((e.index, e.name, files[e.index][1], e.start, e.stop) for e in plan.train + plan.heldout)
        labels = ConceptWriter(f, plan.rows, excerpts, lm.tokenizer) if label else None
        writer = _Writer(f, hooks, plan.rows, dtype, exclude_special, labels, len(files))
        _run(model, hooks, batches, writer, context, device, bar, should_stop)
        if labels is not None:
            labels.finish()
        if writer.row != plan.rows:  # the corpus changed between the counting pass and this one
            raise DataError(f"corpus {corpus_name(corpus)}: yielded {writer.row} rows, {plan.rows} counted before;"
                            " was it modified during the harvest? re-run")
        if not write_plan(f, plan, writer.document_rows):
            note(f"{where}: the harvest read {len(plan.train) + len(plan.heldout)} documents, too "
                  f"few to hold out whole ones (1 in {HELDOUT_EVERY}); readers hold out the file's tail")
    return out


def _wants_concepts(concepts: bool | None, files: list[tuple[str, Path]], tokenizer) -> bool:
    """Whether to label: as asked, or (None) when the split has Python files and the tokenizer
    maps tokens to characters. Asking for labels that cannot be made is a one-line error."""
    if concepts is False:
        return False
    if not supports(tokenizer):
        if concepts:
            raise ConfigError(f"concepts: the tokenizer {tokenizer!r} gives no character offsets; harvest without "
                              "concept labels (--no-concepts) or use a fast (Rust) tokenizer")
        return False
    if concepts is None:
        return has_python(Document(name, b"") for name, _ in files)
    return True


def _check_args(model: nn.Module, hooks: list[str], out: Path, tokens, context: int, split: str,
                batch_size: int, dtype: str, windows_per_document: int | None) -> None:
    """Everything that can be checked before reading the corpus, each as a one-line error."""
    if tokens != "all" and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens <= 0):
        raise ConfigError(f"--tokens {tokens}: must be a positive number of tokens or 'all'")
    if windows_per_document is not None and windows_per_document < 0:
        raise ConfigError(f"--windows-per-document {windows_per_document}: must be >= 0 (0: whole documents)")
    limit = max_positions(model)
    if context < 2 or (limit is not None and context > limit):
        most = f"the model's maximum, {limit}" if limit is not None else "the model's maximum"
        raise ConfigError(f"--context {context}: must be at least 2 and at most {most}")
    if batch_size <= 0:
        raise ConfigError(f"--batch-size {batch_size}: must be a positive number of windows")
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
    if split not in SPLITS:
        raise ConfigError(f"--split {split}: expected one of {', '.join(SPLITS)}")
    check_hooks(model, hooks)
    _check_out(out)


def _check_out(out: Path) -> None:
    """`out` can be created: not a folder, and its nearest existing parent is a writable folder."""
    if out.is_dir():
        raise ConfigError(f"--out {out}: is a folder; give a file name such as {out / 'acts.h5'}")
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out}: cannot create a file under {parent} (not a writable folder);"
                          " choose another --out")


class _Terminated(BaseException):  # raised when `should_stop()` says so
    """SIGTERM turned into an exception, so the temp file is removed on the way out (a
    BaseException, like KeyboardInterrupt, so that no `except Exception` on the way swallows it)."""
