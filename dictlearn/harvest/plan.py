"""Which text a harvest reads: documents in a seeded order, a capped excerpt of each, held-out documents.

    plan = plan_harvest(split_files(None, "train"), tokenizer, context=256, tokens=250_000,
                        exclude_special=True, seed=0)
    plan.train, plan.heldout        # Excerpts in file order: training documents first
    plan.windows, plan.rows          # windows to run, rows to write

The rules (docs/data.md, "Which documents"):

- **Order.** The split's documents are permuted with a generator seeded by `seed`; the harvest
  walks that order until it has `tokens` rows, so any budget spreads over the whole corpus
  instead of reading the first files in path order.
- **Cap.** Each document gives one contiguous excerpt of at most `windows_per_document` windows'
  worth of tokens (``windows_per_document * (context - 1)``), starting at a seeded random
  offset, so no long file fills the budget and files are sampled past their headers. When the
  capped excerpts of the whole split cannot fill the budget (a corpus of a few long files), the
  cap doubles until they can; the file records the cap used. ``tokens="all"`` reads every
  document whole.
- **Held-out documents.** Every `HELDOUT_EVERY`-th document of the seeded order (the 10th, 20th,
  ...) is held out: a seeded, uniform choice of whole documents, one in ten of any budget's. Each
  side is packed into windows on its own (`pack_windows`), so no window mixes the two, and the
  file holds the training windows first and the held-out ones after them: the held-out rows are
  one range at the end of the file, `[heldout_start, rows)`. A harvest that reads fewer than 10
  documents has none held out (its readers fall back to the tail split).
- **Exact rows.** The walk stops once both sides' whole windows hold `tokens` rows; the last
  held-out window is cut short (the file holds exactly `tokens` rows). Counting needs only each
  document's token count, so this pass runs no model.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dictlearn.errors import DataError
from dictlearn.models.corpus import Document, document_tokens, pack_windows

WINDOWS_PER_DOCUMENT = 2  # ~500 documents in the default 250k-row comparison file (docs/data.md)
HELDOUT_EVERY = 10  # 1 document in 10 held out: ~10 % of rows, >= 20 documents in the default files
_ORDER_STREAM, _OFFSET_STREAM = 1, 2  # seed streams: document order, excerpt offsets


@dataclass(frozen=True)
class Excerpt:
    """Tokens `[start, stop)` of document `index` (its position in the split's sorted listing,
    the rows' ``doc_index``), named `name`, on the `heldout` side or the training side."""

    index: int
    name: str
    start: int
    stop: int
    heldout: bool


@dataclass
class _Side:
    """One side's stream: excerpts, their BOS separators and the rows its whole windows hold."""

    take: int  # stream tokens per window
    bos: bool  # whether excerpts are separated by BOS (and windows start with one)
    excerpts: list[Excerpt] = field(default_factory=list)
    length: int = 0  # stream tokens so far
    separators: list[int] = field(default_factory=list)  # stream positions of the BOS separators

    def add(self, excerpt: Excerpt) -> None:
        if self.excerpts and self.bos:
            self.separators.append(self.length)
            self.length += 1
        self.excerpts.append(excerpt)
        self.length += excerpt.stop - excerpt.start

    @property
    def windows(self) -> int:
        return self.length // self.take

    def rows(self, windows: int, exclude_special: bool) -> int:
        """Rows the first `windows` windows give: every position, or all but the BOS ones."""
        if not exclude_special:
            return windows * (self.take + self.bos)
        return windows * self.take - int(np.searchsorted(self.separators, windows * self.take))

    def windows_for(self, rows: int, exclude_special: bool) -> int:
        """The fewest windows holding at least `rows` rows (at most the whole windows)."""
        low, high = 0, self.windows
        while low < high:
            middle = (low + high) // 2
            if self.rows(middle, exclude_special) >= rows:
                high = middle
            else:
                low = middle + 1
        return low


@dataclass
class Plan:
    """What to harvest: the excerpts of each side (file order), how many windows of each to run,
    the rows to write and `heldout_start`, the first held-out row (= training rows)."""

    train: list[Excerpt]
    heldout: list[Excerpt]
    train_windows: int
    heldout_windows: int
    rows: int
    heldout_start: int
    seed: int
    cap_tokens: int | None  # tokens per document (None: whole documents)
    windows_per_document: int | None

    @property
    def windows(self) -> int:
        return self.train_windows + self.heldout_windows


def plan_harvest(files: list[tuple[str, Path]], tokenizer, context: int, tokens: int | None,
                 exclude_special: bool, seed: int, windows_per_document: int | None = WINDOWS_PER_DOCUMENT,
                 where: str = "corpus") -> Plan:
    """The plan for `tokens` rows (None: every document whole) of the split's `files` (sorted).

    Token counts are computed once per document visited (the byte tokenizer's is the file size);
    `where` names the corpus and split in errors.
    """
    if context < 2:
        raise DataError(f"context {context}: must be at least 2 tokens")
    bos = tokenizer.bos_token_id is not None
    take = context - 1 if bos else context
    order = np.random.default_rng([seed, _ORDER_STREAM]).permutation(len(files))
    lengths: dict[int, int] = {}
    cap = None if tokens is None or not windows_per_document else windows_per_document * take
    while True:
        sides = _walk(files, order, lengths, tokenizer, take, bos, cap, tokens, exclude_special, seed)
        total = sum(side.rows(side.windows, exclude_special) for side in sides)
        if tokens is None or total >= tokens:
            break
        if cap is None or cap >= max(lengths.values()):
            windows = sum(side.windows for side in sides)
            raise DataError(f"{where} has {total} tokens to harvest in {windows} whole windows of {context}, fewer "
                            f"than --tokens {tokens}; lower --tokens, use --split all, or pass --tokens all")
        cap *= 2  # a few long documents: widen every excerpt until the split can fill the budget
    return _finish(sides, tokens, exclude_special, context, seed, cap, take, where)


def _walk(files, order, lengths, tokenizer, take, bos, cap, tokens, exclude_special, seed) -> tuple[_Side, _Side]:
    """(training side, held-out side) after walking `order` until both hold `tokens` rows."""
    sides = (_Side(take, bos), _Side(take, bos))
    for position, index in enumerate(order.tolist()):
        name, path = files[index]
        if index not in lengths:
            lengths[index] = _token_count(name, path, tokenizer)
        length = lengths[index]
        n = length if cap is None else min(length, cap)
        if n == 0:
            continue
        start = int(np.random.default_rng([seed, _OFFSET_STREAM, index]).integers(0, length - n + 1))
        heldout = position % HELDOUT_EVERY == HELDOUT_EVERY - 1
        sides[heldout].add(Excerpt(index, name, start, start + n, heldout))
        if tokens is not None and sum(s.rows(s.windows, exclude_special) for s in sides) >= tokens:
            break
    return sides


def _finish(sides, tokens, exclude_special, context, seed, cap, take, where) -> Plan:
    """Windows to run on each side: all whole training windows (fewer when they alone fill the
    budget), then held-out ones up to the budget."""
    train, heldout = sides
    train_rows = train.rows(train.windows, exclude_special)
    if tokens is None:
        rows = train_rows + heldout.rows(heldout.windows, exclude_special)
        train_windows, heldout_windows = train.windows, heldout.windows
        if rows == 0:
            raise DataError(f"{where}: no whole window of {context} tokens; lower --context or pass more text")
    else:
        rows = tokens
        train_windows = train.windows_for(min(train_rows, tokens), exclude_special)
        train_rows = min(train_rows, tokens)
        heldout_windows = heldout.windows_for(tokens - train_rows, exclude_special)
    per_document = None if cap is None else math.ceil(cap / take)
    return Plan(train.excerpts, heldout.excerpts, train_windows, heldout_windows, rows, train_rows, seed, cap,
                per_document)


def _token_count(name: str, path: Path, tokenizer) -> int:
    """Tokens of one document: its size for a byte-level tokenizer (no read), else encoded."""
    if getattr(tokenizer, "byte_level", False):
        return path.stat().st_size
    return len(document_tokens(Document(name, path.read_bytes()), tokenizer))


def excerpt_tokens(excerpt: Excerpt, path: Path, tokenizer) -> torch.Tensor:
    """The excerpt's token ids [stop - start], read from the document at `path` (a byte-level
    tokenizer's are its bytes: only those are encoded)."""
    data = path.read_bytes()
    if getattr(tokenizer, "byte_level", False):
        return document_tokens(Document(excerpt.name, data[excerpt.start:excerpt.stop]), tokenizer)
    return document_tokens(Document(excerpt.name, data), tokenizer)[excerpt.start:excerpt.stop]


def planned_windows(plan: Plan, files: list[tuple[str, Path]], tokenizer, context: int) -> Iterator:
    """The plan's windows in file order (`Window`s): its training windows, then its held-out ones."""
    bos = tokenizer.bos_token_id
    for excerpts, count in ((plan.train, plan.train_windows), (plan.heldout, plan.heldout_windows)):
        pieces = ((e.index, excerpt_tokens(e, files[e.index][1], tokenizer)) for e in excerpts)
        produced = 0
        for window in itertools.islice(pack_windows(pieces, bos, context), count):
            produced += 1
            yield window
        if produced != count:  # the corpus changed since the plan counted its tokens
            raise DataError(f"corpus: {produced} windows where the plan counted {count}; was it modified "
                            "during the harvest? re-run")


# ----------------------------------------------------------------------------- the record
GROUP = "documents"  # docs/data.md, "Which documents": read back by dictlearn.data.split


def write_plan(f, plan: Plan, document_rows: np.ndarray) -> int:
    """The ``documents/`` group of an open file: every document with rows in it, in file order.

    document_rows: int [documents in the split], rows written per doc_index. Datasets ``index``
    (its doc_index), ``name`` (path in the corpus), ``start``/``stop`` (its excerpt, in tokens),
    ``rows``, ``heldout``; attributes ``seed``, ``heldout_every``, ``windows_per_document`` (0:
    whole documents), ``train_windows``, ``heldout_windows`` and, when some document is held
    out, ``heldout_start`` (the first held-out row). -> the number of held-out documents.
    """
    import h5py

    excerpts = [e for e in plan.train + plan.heldout if document_rows[e.index] > 0]
    group = f.create_group(GROUP)
    group.create_dataset("index", data=np.array([e.index for e in excerpts], np.int32))
    group.create_dataset("name", data=[e.name for e in excerpts], dtype=h5py.string_dtype())
    for key in ("start", "stop"):
        group.create_dataset(key, data=np.array([getattr(e, key) for e in excerpts], np.int64))
    group.create_dataset("rows", data=np.array([document_rows[e.index] for e in excerpts], np.int64))
    group.create_dataset("heldout", data=np.array([e.heldout for e in excerpts], bool))
    attrs = group.attrs
    attrs["seed"], attrs["heldout_every"] = plan.seed, HELDOUT_EVERY
    attrs["windows_per_document"] = plan.windows_per_document or 0
    attrs["train_windows"], attrs["heldout_windows"] = plan.train_windows, plan.heldout_windows
    n_heldout = sum(e.heldout for e in excerpts)
    if n_heldout:
        attrs["heldout_start"] = plan.heldout_start
    return n_heldout
