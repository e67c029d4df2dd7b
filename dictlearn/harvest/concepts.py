"""Concept labels for harvested rows: the ``concepts/`` group, row-aligned with the activations.

`dictlearn harvest` calls `ConceptRows` beside the activation writer when the corpus holds Python
files (`has_python`): each row's token gets the labels of `dictlearn.harvest.labels` for its
document. Layout (docs/data.md, "Concept labels"):

    concepts/values    bool [rows, n_concepts]   the labels (all False where not labelled)
    concepts/labelled  bool [rows]               False at BOS positions, in non-Python documents
                                                 and past the point where a file stopped tokenizing
    attrs: names, parents (JSON), positive_rows [n_concepts] and labelled_rows (class balance),
           documents, python_documents, failed_documents (+ the first failed_names), token_rule

**Tokens and bytes.** With a byte-level tokenizer (the embedded model) a token is a byte and its
labels are that byte's. With any other tokenizer a token takes the labels of its *last*
character, found through the tokenizer's offset mapping (a transformers "fast" tokenizer): the
model has read the whole token there. A tokenizer without offsets gets no labels (a note says so).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import h5py
import numpy as np

from dictlearn.errors import DataError, note
from dictlearn.data.concepts import GROUP
from dictlearn.harvest.labels import CONCEPTS, PARENTS, PYTHON_SUFFIXES, label_source, label_text
from dictlearn.models.corpus import Document

FAILED_NAMES_KEPT = 20  # names of documents that did not tokenize, kept in the attributes
TOKEN_RULE_BYTES = "byte-level tokens: a token's labels are its byte's"
TOKEN_RULE_LAST = "a token's labels are its last character's (tokenizer offset mapping)"


def has_python(documents: Iterable[Document]) -> bool:
    """Whether any document is a Python file (by suffix: .py, .pyw, .pyi)."""
    return any(d.name.endswith(PYTHON_SUFFIXES) for d in documents)


def supports(tokenizer) -> bool:
    """Whether tokens can be mapped to characters: byte-level, or a fast HF tokenizer's offsets."""
    if getattr(tokenizer, "byte_level", False):
        return True
    return bool(getattr(getattr(tokenizer, "hf", None), "is_fast", False))


def document_labels(document: Document, tokenizer) -> tuple[np.ndarray, np.ndarray, str | None]:
    """One document -> (values bool [n_tokens, n_concepts], labelled bool [n_tokens], error or None),
    its tokens as `iter_windows` makes them."""
    if getattr(tokenizer, "byte_level", False):
        labels = label_source(document.data)
        return labels.values, labels.labelled, labels.error
    text = document.data.decode("utf-8", "replace")
    encoded = tokenizer.hf(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    ends = np.array([end for _, end in encoded["offset_mapping"]], dtype=np.int64)
    labels = label_text(text)
    last = np.clip(ends - 1, 0, max(len(text) - 1, 0))
    if len(text) == 0:
        return np.zeros((len(ends), len(CONCEPTS)), bool), np.zeros(len(ends), bool), labels.error
    return labels.values[last], labels.labelled[last] & (ends > 0), labels.error


def excerpt_labels(document: Document, stop: int, tokenizer) -> tuple[np.ndarray, np.ndarray, str | None]:
    """`document_labels` exact for tokens `[0, stop)`, reading as little of the document as it can.

    With a byte-level tokenizer the source is labelled up to a line start past byte `stop`: first
    the next line that does not look like a continuation, then the next top-level statement. A
    prefix that tokenizes cleanly ends outside every bracket, string and statement, so each of its
    tokens, and their labels, are the whole file's (a harvest reads short excerpts of long files;
    labelling them whole tripled the default harvest's labelling time). If neither prefix
    tokenizes, and for other tokenizers, the whole document is labelled. Bytes past the prefix
    come back unlabelled.
    """
    data = document.data
    if getattr(tokenizer, "byte_level", False):
        for cut in sorted({_line_start(data, stop), _statement_start(data, stop)}):
            if cut >= len(data):
                break
            labels = label_source(data[:cut])
            if labels.error is None:
                values = np.zeros((len(data), len(CONCEPTS)), bool)
                labelled = np.zeros(len(data), bool)
                values[:cut], labelled[:cut] = labels.values, labels.labelled
                return values, labelled, None
    return document_labels(document, tokenizer)


def _line_start(data: bytes, stop: int) -> int:
    """The first non-blank line at or after `stop` whose previous line does not end in an open
    bracket, a comma or a backslash (so it likely starts a statement); len(data) when none."""
    position = max(stop, 1)
    while (newline := data.find(b"\n", position - 1)) != -1:
        line_start = newline + 1
        previous = data[data.rfind(b"\n", 0, newline) + 1:newline].rstrip()
        if data[line_start:line_start + 1].strip() and not previous.endswith((b",", b"(", b"[", b"{", b"\\")):
            return line_start
        position = newline + 2
    return len(data)


def _statement_start(data: bytes, stop: int) -> int:
    """The offset of the first line at or after `stop` (a line start) whose first byte begins a
    top-level statement; len(data) when there is none."""
    position = max(stop, 1)
    while (newline := data.find(b"\n", position - 1)) != -1:
        following = data[newline + 1:newline + 2]
        if following and following not in b" \t\r\n\f#":
            return newline + 1
        position = newline + 2
    return len(data)


class ConceptRows:
    """Labels for the harvested rows, in row order, one document at a time.

    excerpts: (doc_index, name, path, first token, end token) of each document in the order its rows come
    in the file (`dictlearn.harvest.plan`); each document appears once. `take(doc_index)` labels
    the next rows; rows of document d follow d's tokens in order from its first token, so a
    cursor per current document is enough. A document is read and labelled only when its rows
    come.
    """

    def __init__(self, excerpts: Iterator[tuple[int, str, Path, int, int]], tokenizer) -> None:
        self.excerpts, self.tokenizer = excerpts, tokenizer
        self.index, self.cursor = -1, 0
        self.values = np.zeros((0, len(CONCEPTS)), bool)
        self.labelled = np.zeros(0, bool)
        self.python_documents, self.failed, self.documents_seen = 0, [], 0

    def take(self, doc_index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """doc_index [n] (-1 at BOS) -> (values bool [n, n_concepts], labelled bool [n])."""
        values = np.zeros((len(doc_index), len(CONCEPTS)), bool)
        labelled = np.zeros(len(doc_index), bool)
        for start, stop, doc in _runs(doc_index):
            if doc < 0:
                continue
            self._advance_to(doc)
            span = slice(self.cursor, self.cursor + stop - start)
            values[start:stop], labelled[start:stop] = self.values[span], self.labelled[span]
            self.cursor += stop - start
        return values, labelled

    def _advance_to(self, doc: int) -> None:
        if self.index == doc:
            return
        for index, name, path, start, stop in self.excerpts:
            if index == doc:
                break
        else:
            raise DataError(f"document {doc}: its rows come after the documents planned; re-run the harvest")
        document = Document(name, path.read_bytes())
        self.index, self.cursor, self.documents_seen = doc, start, self.documents_seen + 1
        if document.name.endswith(PYTHON_SUFFIXES):
            self.values, self.labelled, error = excerpt_labels(document, stop, self.tokenizer)
            self.python_documents += 1
            if error is not None:
                self.failed.append(document.name)
        n = _token_count(document, self.tokenizer)
        if not document.name.endswith(PYTHON_SUFFIXES):
            self.values, self.labelled = np.zeros((n, len(CONCEPTS)), bool), np.zeros(n, bool)
        elif len(self.labelled) != n:  # the offsets disagree with the tokenizer's encode
            raise DataError(f"{document.name}: the tokenizer's offset mapping gives {len(self.labelled)} "
                            f"tokens but encode gives {n}; harvest with concepts=False")


def _token_count(document: Document, tokenizer) -> int:
    """How many tokens `iter_windows` makes of the document (one per byte for a byte-level tokenizer)."""
    if getattr(tokenizer, "byte_level", False):
        return len(document.data)
    return len(tokenizer.encode(document.data.decode("utf-8", "replace")))


def _runs(doc_index: np.ndarray) -> Iterator[tuple[int, int, int]]:
    """Maximal runs of equal values: (start, stop, value)."""
    if len(doc_index) == 0:
        return
    cuts = np.flatnonzero(np.diff(doc_index)) + 1
    bounds = np.concatenate([[0], cuts, [len(doc_index)]])
    for start, stop in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        yield start, stop, int(doc_index[start])


class ConceptWriter:
    """Creates the ``concepts/`` group of an open file and fills it batch by batch."""

    def __init__(self, f: h5py.File, rows: int, documents: Iterator[tuple[int, str, Path, int, int]],
                 tokenizer) -> None:
        self.group = f.create_group(GROUP)
        self.group.create_dataset("values", shape=(rows, len(CONCEPTS)), dtype=bool)
        self.group.create_dataset("labelled", shape=(rows,), dtype=bool)
        self.source = ConceptRows(documents, tokenizer)
        self.byte_level = bool(getattr(tokenizer, "byte_level", False))
        self.positives = np.zeros(len(CONCEPTS), np.int64)
        self.labelled_rows = 0

    def write(self, rows: slice, doc_index: np.ndarray) -> None:
        values, labelled = self.source.take(doc_index)
        self.group["values"][rows] = values
        self.group["labelled"][rows] = labelled
        self.positives += values[labelled].sum(0)
        self.labelled_rows += int(labelled.sum())

    def finish(self) -> None:
        """The attributes: names, parents, class balance, documents that failed to tokenize."""
        source, attrs = self.source, self.group.attrs
        attrs["names"] = json.dumps(list(CONCEPTS))
        attrs["parents"] = json.dumps(PARENTS)
        attrs["positive_rows"] = self.positives
        attrs["labelled_rows"] = self.labelled_rows
        attrs["documents"] = source.documents_seen
        attrs["python_documents"] = source.python_documents
        attrs["failed_documents"] = len(source.failed)
        attrs["failed_names"] = json.dumps(source.failed[:FAILED_NAMES_KEPT])
        attrs["token_rule"] = TOKEN_RULE_BYTES if self.byte_level else TOKEN_RULE_LAST
        if source.failed:
            note(f"{len(source.failed)} of {source.python_documents} Python files did not "
                  f"tokenize to the end (first: {source.failed[0]}); labelled up to the failure")
