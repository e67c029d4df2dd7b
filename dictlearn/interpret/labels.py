"""Concept labels of Python source: one boolean per byte and concept, from the stdlib `tokenize`.

    labels = label_source(b"def f(x):\\n    return x  # done\\n")
    labels.values[:, CONCEPTS.index("keyword")]      # bool [n_bytes]: the bytes of `def`, `return`
    read_concept_labels("acts.h5")                     # what `dictlearn harvest` stored, or None
    write_concept_labels(f, names, values)             # your own labels into an open h5py file

The concepts (`CONCEPTS`; children name their parent in `PARENTS`, and a child's bytes are
always a subset of its parent's):

- ``keyword``: a NAME token that `keyword.iskeyword` accepts (hard keywords, True/False/None;
  soft keywords such as ``match`` are identifiers). Children ``def``, ``return``, ``import``,
  ``if`` (that exact keyword).
- ``identifier``: any other NAME token. Child ``self``: the name ``self`` (an identifier in
  Python, not a keyword, so it is filed under identifier).
- ``string``: a STRING token, every byte of it including prefix and quotes; an f-string is one
  string from its prefix to its closing quote, replacement fields included (as Python 3.11's
  tokenize reports it). Child ``docstring``: a string that is the first statement of the module,
  a class or a function (only plain string literals, possibly implicitly concatenated, as
  `ast.get_docstring` sees them; not f-strings or bytes).
- ``comment``: a COMMENT token, from ``#`` to the end of the line (not the newline).
- ``number``: a NUMBER token.
- ``bracket``: the bytes ``( ) [ ] { }`` of OP tokens (not inside strings or comments).
- ``operator``: every other OP token (``=``, ``+``, ``.``, ``,``, ``:``, ``->``, ...).
- ``inside_brackets``: bracket depth >= 1: every byte strictly between an opening bracket and its
  matching closing one (the outermost pair itself is not inside; nested brackets are).
- ``indentation``: the spaces, tabs and form feeds at the start of a line (blank lines and
  continuation lines included) that are not part of a string.
- ``line_start``: the first byte of every line (byte 0 and each byte after a newline).

**Files that do not tokenize** (an unterminated triple-quoted string, an inconsistent dedent,
a stray ``$``) are labelled up to the last token that did: `SourceLabels.labelled` is False from
there on and `error` says why. Nothing is dropped; a consumer counts such bytes as unlabelled.

**Bytes.** Source is decoded as UTF-8 with ``surrogateescape`` (an invalid byte is one
character), labelled per character, and each character's labels repeated over its UTF-8 bytes,
so `values` has exactly one row per byte of the file.
"""

from __future__ import annotations

import json
import keyword
import tokenize
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from dictlearn.errors import DataError

CONCEPTS = (
    "keyword", "identifier", "string", "docstring", "comment", "number", "operator", "bracket",
    "inside_brackets", "indentation", "line_start", "def", "return", "import", "if", "self",
)  # fmt: skip
PARENTS = {"def": "keyword", "return": "keyword", "import": "keyword", "if": "keyword", "self": "identifier",
           "docstring": "string"}
SPECIFIC_NAMES = ("def", "return", "import", "if", "self")
PYTHON_SUFFIXES = (".py", ".pyw", ".pyi")
GROUP = "concepts"  # the HDF5 group `dictlearn harvest` writes (docs/data.md, "Concept labels")
_COLUMN = {name: i for i, name in enumerate(CONCEPTS)}
_OPENING, _CLOSING = "([{", ")]}"
_INDENT_CHARS = " \t\f"


@dataclass
class SourceLabels:
    """values: bool [n, len(CONCEPTS)]; labelled: bool [n] (False past a tokenize failure);
    error: why tokenizing stopped early, None when the whole file tokenized. n counts bytes
    (`label_source`) or characters (`label_text`)."""

    values: np.ndarray
    labelled: np.ndarray
    error: str | None = None


# ----------------------------------------------------------------------------- labelling
def label_source(data: bytes) -> SourceLabels:
    """One file's bytes -> labels per byte (see the module docstring)."""
    text = data.decode("utf-8", "surrogateescape")
    labels = label_text(text)
    if len(text) == len(data):  # ASCII: one byte per character
        return labels
    widths = np.fromiter((len(c.encode("utf-8", "surrogateescape")) for c in text), np.int64, len(text))
    return SourceLabels(np.repeat(labels.values, widths, axis=0), np.repeat(labels.labelled, widths), labels.error)


def label_text(text: str) -> SourceLabels:
    """Python source as text -> labels per character."""
    lines = text.split("\n")
    lines = [line + "\n" for line in lines[:-1]] + ([lines[-1]] if lines[-1] else [])
    starts = np.concatenate([[0], np.cumsum([len(line) for line in lines])]).astype(np.int64)
    walker = _TokenWalker(len(text), starts)
    error = None
    try:
        for token in tokenize.generate_tokens(iter(lines).__next__):
            if not walker.add(token):
                error = f"line {token.start[0]}: cannot tokenize {token.string!r}"
                break
    except (tokenize.TokenError, SyntaxError) as failure:  # IndentationError is a SyntaxError
        error = f"{type(failure).__name__}: {failure.args[0]}"
    until = len(text) if error is None else walker.labelled_until
    values = walker.finish(until)
    _mark_line_starts(values, starts, until)
    _mark_indentation(values, lines, starts, until)
    labelled = np.zeros(len(text), dtype=bool)
    labelled[:until] = True
    return SourceLabels(values, labelled, error)


@dataclass
class _TokenWalker:
    """Labels the spans of the tokens it is given, in order; tracks brackets and docstrings."""

    n: int
    starts: np.ndarray  # character offset of each line's start (1 past the last line: n)
    values: np.ndarray = field(init=False)
    labelled_until: int = 0
    depth: int = 0
    outer_open: int = -1  # offset of the outermost open bracket
    first_name: str | None = None  # first NAME of the logical line ('async' skipped)
    header_colon: bool = False  # a depth-0 ':' ended a def/class header on this logical line
    block_pending: bool = False  # a def/class header line ended: its INDENT may bring a docstring
    expect_docstring: bool = True  # the next significant token may start a docstring (module start)
    docstring: list[tuple[int, int]] | None = None  # candidate docstring spans, until its statement ends

    def __post_init__(self) -> None:
        self.values = np.zeros((self.n, len(CONCEPTS)), dtype=bool)

    def offset(self, position: tuple[int, int]) -> int:
        row, col = position
        return int(min(self.starts[min(row - 1, len(self.starts) - 1)] + col, self.n))

    def mark(self, concept: str, start: int, stop: int) -> None:
        self.values[start:stop, _COLUMN[concept]] = True

    def add(self, token: tokenize.TokenInfo) -> bool:
        """Label one token; False (nothing labelled) for an ERRORTOKEN: the file stops tokenizing."""
        kind, text = token.type, token.string
        start, stop = self.offset(token.start), self.offset(token.end)
        if kind == tokenize.ERRORTOKEN and not text.isspace():
            return False
        if kind == tokenize.COMMENT:
            self.mark("comment", start, stop)
        elif kind not in (tokenize.NL, tokenize.ENCODING, tokenize.ERRORTOKEN):
            self._significant(kind, text, start, stop)
        self.labelled_until = max(self.labelled_until, stop)
        return True

    def _significant(self, kind: int, text: str, start: int, stop: int) -> None:
        plain_string = kind == tokenize.STRING and not set(_prefix(text)) & set("fFbB")
        if self.docstring is not None:
            if plain_string:  # implicit concatenation: "a" "b" is one docstring
                self.docstring.append((start, stop))
            else:
                if kind in (tokenize.NEWLINE, tokenize.ENDMARKER) or text == ";":
                    for span in self.docstring:
                        self.mark("docstring", *span)
                self.docstring = None
        elif self.expect_docstring and plain_string:
            self.docstring = [(start, stop)]
        self.expect_docstring = (kind == tokenize.INDENT and self.block_pending) or self._ends_header(kind, text)
        if kind == tokenize.INDENT:
            self.block_pending = False
        self._label(kind, text, start, stop)
        self._track_line(kind, text)

    def _ends_header(self, kind: int, text: str) -> bool:
        """This token is the depth-0 ':' that ends a def or class header."""
        return kind == tokenize.OP and text == ":" and self.depth == 0 and self.first_name in ("def", "class")

    def _label(self, kind: int, text: str, start: int, stop: int) -> None:
        if kind == tokenize.NAME:
            self.mark("keyword" if keyword.iskeyword(text) else "identifier", start, stop)
            if text in SPECIFIC_NAMES:
                self.mark(text, start, stop)
        elif kind == tokenize.NUMBER:
            self.mark("number", start, stop)
        elif kind == tokenize.STRING:
            self.mark("string", start, stop)
        elif kind == tokenize.OP and text in _OPENING + _CLOSING:
            self.mark("bracket", start, stop)
            self._bracket(text, start)
        elif kind == tokenize.OP:
            self.mark("operator", start, stop)

    def _bracket(self, text: str, start: int) -> None:
        if text in _OPENING:
            if self.depth == 0:
                self.outer_open = start
            self.depth += 1
        elif self.depth > 0:  # a stray closer at depth 0 changes nothing
            self.depth -= 1
            if self.depth == 0:
                self.mark("inside_brackets", self.outer_open + 1, start)

    def _track_line(self, kind: int, text: str) -> None:
        if kind == tokenize.NEWLINE:
            self.block_pending = self.header_colon
            self.first_name, self.header_colon = None, False
        elif kind == tokenize.NAME and self.first_name is None and text != "async":
            self.first_name = text
        elif kind == tokenize.OP and self.first_name is None:
            self.first_name = text  # '@' of a decorator, '(' of an expression: not a header
        if self._ends_header(kind, text):
            self.header_colon = True

    def finish(self, until: int) -> np.ndarray:
        """The labels with everything from `until` on cleared (an unclosed bracket runs to there)."""
        if self.depth > 0:
            self.mark("inside_brackets", self.outer_open + 1, until)
        self.values[until:] = False
        return self.values


def _prefix(string_token: str) -> str:
    """The letters before the opening quote of a STRING token ('rb' of rb'...')."""
    return string_token[: len(string_token) - len(string_token.lstrip("rRbBuUfF"))]


def _mark_line_starts(values: np.ndarray, starts: np.ndarray, until: int) -> None:
    """starts: the offset of every line (and the text's length last)."""
    line_starts = starts[:-1]
    values[line_starts[line_starts < until], _COLUMN["line_start"]] = True


def _mark_indentation(values: np.ndarray, lines: list[str], starts: np.ndarray, until: int) -> None:
    column, string = _COLUMN["indentation"], _COLUMN["string"]
    for line, start in zip(lines, starts.tolist()):
        if start >= until:
            break
        width = len(line) - len(line.lstrip(_INDENT_CHARS))
        stop = min(start + width, until)
        values[start:stop, column] = ~values[start:stop, string]


# ----------------------------------------------------------------------------- reading
@dataclass
class ConceptLabels:
    """Concept labels of an activation file's rows.

    names: the concepts, one column each; parents: child -> parent (e.g. "def" -> "keyword");
    values: bool [n_rows, n_concepts], row-aligned with the file's activation rows (or with the
    rows asked for); labelled: bool [n_rows], False where a row has no labels (a BOS position, a
    non-Python document, the part of a file past a tokenize failure) — its values are all False
    and it is neither a positive nor a negative; attrs: the group's attributes (class balance,
    documents that failed to tokenize, the token rule).
    """

    names: list[str]
    parents: dict[str, str]
    values: np.ndarray
    labelled: np.ndarray
    attrs: dict = field(default_factory=dict)

    def column(self, name: str) -> np.ndarray:
        """bool [n_rows] of one concept."""
        return self.values[:, self.names.index(name)]


def read_concept_labels(path: str | Path, rows=None) -> ConceptLabels | None:
    """The ``concepts/`` group of an activation file, or None when the file has none.

    rows: None for every row, a slice, or an int array of row indices (any order; the result
    follows it). Raises a one-line DataError for a damaged group.
    """
    with h5py.File(path, "r") as f:
        group = f.get(GROUP)
        if group is None:
            return None
        if not isinstance(group, h5py.Group) or "values" not in group or "labelled" not in group:
            raise DataError(f"{path}: '{GROUP}' is not a concept-label group (needs datasets 'values' and "
                            "'labelled'); re-harvest the file or delete the group")
        names = [str(n) for n in json.loads(group.attrs["names"])]
        values_ds, labelled_ds = group["values"], group["labelled"]
        if values_ds.ndim != 2 or values_ds.shape[1] != len(names) or labelled_ds.shape != values_ds.shape[:1]:
            raise DataError(f"{path}: '{GROUP}/values' is {values_ds.shape} for {len(names)} names and "
                            f"'{GROUP}/labelled' is {labelled_ds.shape}; re-harvest the file")
        values, labelled = _read_rows(values_ds, rows), _read_rows(labelled_ds, rows)
        attrs = {k: _attr(v) for k, v in group.attrs.items() if k not in ("names", "parents")}
        parents = {str(k): str(v) for k, v in json.loads(group.attrs.get("parents", "{}")).items()}
    return ConceptLabels(names, parents, values.astype(bool), labelled.astype(bool), attrs)


def write_concept_labels(f: h5py.File, names: list[str], values: np.ndarray, labelled: np.ndarray | None = None,
                         parents: dict[str, str] | None = None, **attrs) -> h5py.Group:
    """Your own labels into an open, writable activation file (`dictlearn.data.open_for_write`):
    values bool [rows, len(names)] row-aligned with its activations; labelled bool [rows]
    (None: every row). Writes the layout `read_concept_labels` reads; `attrs` are added as-is."""
    values = np.asarray(values, dtype=bool)
    labelled = np.ones(len(values), bool) if labelled is None else np.asarray(labelled, dtype=bool)
    if values.ndim != 2 or values.shape[1] != len(names) or labelled.shape != values.shape[:1]:
        raise DataError(f"concept labels: values {values.shape} and labelled {labelled.shape} do not fit "
                        f"{len(names)} names; pass values [rows, {len(names)}] and labelled [rows]")
    group = f.create_group(GROUP)
    group.create_dataset("values", data=values)
    group.create_dataset("labelled", data=labelled)
    group.attrs["names"] = json.dumps(list(names))
    group.attrs["parents"] = json.dumps(parents or {})
    group.attrs["positive_rows"] = values[labelled].sum(0)
    group.attrs["labelled_rows"] = int(labelled.sum())
    for key, value in attrs.items():
        group.attrs[key] = value
    return group


def _read_rows(dataset: h5py.Dataset, rows) -> np.ndarray:
    if rows is None:
        return dataset[()]
    if isinstance(rows, slice):
        return dataset[rows]
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size and (rows.min() < 0 or rows.max() >= dataset.shape[0]):
        raise DataError(f"concept rows {int(rows.min())}..{int(rows.max())} outside the file's "
                        f"{dataset.shape[0]} rows")
    unique, inverse = np.unique(rows, return_inverse=True)
    return _read_sorted(dataset, unique)[inverse]


def _read_sorted(dataset: h5py.Dataset, unique: np.ndarray) -> np.ndarray:
    """Rows at sorted unique indices, read as the contiguous span that holds them when that is
    not much larger (h5py's point selection is ~50x slower than a slice per row)."""
    if unique.size == 0:
        return dataset[0:0]
    first, last = int(unique[0]), int(unique[-1]) + 1
    if last - first <= 64 * unique.size:
        return dataset[first:last][unique - first]
    return dataset[unique]


def _attr(value):
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value
