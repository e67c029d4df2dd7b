"""The text around an activating row: token ids and document boundaries from a harvested file.

A file written by `dictlearn harvest` stores, per row, `token_ids` and `doc_index` (docs/data.md);
rows are in corpus order, and consecutive windows continue the same document stream, so the
context of row r is the run of neighbouring rows that share r's `doc_index` (a file without
`doc_index` is cut at `window_index`, else nowhere). A plain h5py file without `token_ids` has no
text: its contexts are row numbers only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import h5py
import numpy as np
import torch
from torch import Tensor


@dataclass
class Context:
    """One activating row and its surroundings."""

    row: int  # the activating row
    first: int  # the context's first row; tokens[i] is row first + i
    tokens: list[str]  # display text of each token (empty when the file has no token ids)
    values: list[float]  # the latent's value at each row of the context
    focus: int  # index of `row` in tokens/values

    @property
    def value(self) -> float:
        return self.values[self.focus]


class TokenRows:
    """Token ids and the document (or window) of each row of a harvested file, read on demand."""

    def __init__(self, path: str):
        self.path = path
        with h5py.File(path, "r") as f:
            self.has_tokens = isinstance(f.get("token_ids"), h5py.Dataset)
            boundary = next((k for k in ("doc_index", "window_index") if isinstance(f.get(k), h5py.Dataset)), None)
        self.boundary_key = boundary

    def span(self, file: h5py.File, row: int, before: int, after: int, n_rows: int) -> tuple[int, int]:
        """[first, stop) around `row`: up to `before` rows before it and `after` after, inside
        [0, n_rows) and inside row's document."""
        first, stop = max(0, row - before), min(n_rows, row + after + 1)
        if self.boundary_key is None:
            return first, stop
        doc = np.asarray(file[self.boundary_key][first:stop])
        offset = row - first
        other = doc != doc[offset]
        before_breaks, after_breaks = np.flatnonzero(other[:offset]), np.flatnonzero(other[offset:])
        start = first + before_breaks[-1] + 1 if len(before_breaks) else first
        end = row + after_breaks[0] if len(after_breaks) else stop
        return int(start), int(end)

    def seen(self, n_rows: int, vocab: int, chunk: int = 1 << 20) -> np.ndarray | None:
        """[vocab] bool: the tokens that occur in rows [0, n_rows) (None without token ids)."""
        if not self.has_tokens:
            return None
        counts = np.zeros(vocab, dtype=np.int64)
        with h5py.File(self.path, "r") as f:
            for start in range(0, n_rows, chunk):
                ids = np.asarray(f["token_ids"][start : min(n_rows, start + chunk)]).astype(np.int64)
                ids = ids[(ids >= 0) & (ids < vocab)]
                counts += np.bincount(ids, minlength=vocab)
        return counts > 0

    def token_ids(self, file: h5py.File, first: int, stop: int) -> list[int]:
        return np.asarray(file["token_ids"][first:stop]).tolist() if self.has_tokens else []


def read_contexts(
    tokens: TokenRows,
    read_rows: Callable[[list[tuple[int, int]]], Tensor],
    latent_values: Callable[[Tensor], Tensor],
    rows: list[int],
    n_rows: int,
    show: Callable[[int], str],
    before: int = 24,
    after: int = 8,
) -> list[Context]:
    """The contexts of `rows` (absolute row numbers), with the latent's value at every token.

    read_rows(slices) -> the activations of those row ranges, concatenated [Σ len, d_in];
    latent_values(x) -> [n] the latent at each of those rows; show(token id) -> display text.
    """
    if not rows:
        return []
    with h5py.File(tokens.path, "r") as f:
        spans = [tokens.span(f, row, before, after, n_rows) for row in rows]
        ids = [tokens.token_ids(f, first, stop) for first, stop in spans]
    values = latent_values(read_rows(spans)).tolist()
    contexts, offset = [], 0
    for row, (first, stop), token_ids in zip(rows, spans, ids):
        length = stop - first
        contexts.append(Context(row, first, [show(t) for t in token_ids], values[offset : offset + length], row - first))
        offset += length
    return contexts


# ----------------------------------------------------------------------------- display text
_CONTROL = {"\n": "↵", "\t": "⇥", "\r": "␍"}


def token_display(tokenizer) -> Callable[[int], str]:
    """token id -> a short printable text: control characters as symbols (↵ for a newline), a byte
    that is not printable ASCII as \\xNN (a byte-level tokenizer's token is one byte), BOS as ⟨BOS⟩;
    without a tokenizer, ⟨id⟩."""
    bos = getattr(tokenizer, "bos_token_id", None)

    def show(token: int) -> str:
        if tokenizer is None:
            return f"⟨{token}⟩"
        if bos is not None and token == bos:
            return "⟨BOS⟩"
        if getattr(tokenizer, "byte_level", False) and 0 <= token < 256:
            char = chr(token)
            return _CONTROL.get(char, char if 32 <= token < 127 else f"\\x{token:02x}")
        text = tokenizer.decode([token])
        return "".join(_CONTROL.get(c, c) for c in text) or f"⟨{token}⟩"

    return show


def latent_column(encode: Callable[[Tensor], Tensor], latent: int, device: str = "cpu",
                  chunk: int = 8192) -> Callable[[Tensor], Tensor]:
    """x [n, d_in] -> z[:, latent] [n] on the CPU, encoded `chunk` rows at a time."""

    def values(x: Tensor) -> Tensor:
        with torch.no_grad():
            return torch.cat([encode(x[i : i + chunk].to(device))[:, latent].cpu() for i in range(0, len(x), chunk)])

    return values
