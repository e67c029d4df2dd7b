"""Concept labels of Python source: one boolean per byte and concept, from the stdlib `tokenize`.

    labels = label_source(b"def f(x):\\n    return x  # done\\n")
    labels.values[:, CONCEPTS.index("keyword")]      # bool [n_bytes]: the bytes of `def`, `return`

`dictlearn harvest` writes them per row into the activation file (dictlearn.harvest.concepts);
`dictlearn.data.concepts` reads and writes that group.

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

import keyword
import tokenize
from dataclasses import dataclass, field

import numpy as np

CONCEPTS = (
    "keyword", "identifier", "string", "docstring", "comment", "number", "operator", "bracket",
    "inside_brackets", "indentation", "line_start", "def", "return", "import", "if", "self",
)  # fmt: skip
PARENTS = {"def": "keyword", "return": "keyword", "import": "keyword", "if": "keyword", "self": "identifier",
           "docstring": "string"}
SPECIFIC_NAMES = ("def", "return", "import", "if", "self")
PYTHON_SUFFIXES = (".py", ".pyw", ".pyi")
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
