"""Text corpora for harvesting and for the embedded model: documents, a held-out split, windows.

A corpus is the Python standard library's ``.py`` files (the default: they exist wherever Python
does), one text file, or a folder of text files. Each file is one `Document`. The held-out split
is by file and depends only on the file's path relative to the corpus root, so it is the same on
every machine, in every run, for every consumer (the embedded model's training, harvest,
evaluation). It lives with the models, not with the HDF5 data: it is the text the language models
read, and the embedded model's training, harvest and evaluation all import it from here without
the data stage ever importing a model.

This split (the corpus's ``train`` / ``heldout`` files) is the *language model's*: the embedded
model never read the ``heldout`` files. The *dictionaries'* held-out documents are another, seeded
choice that harvest makes among the documents it reads and records in the activation file
(`dictlearn.harvest.plan`, docs/data.md).

Windows follow the SAELens convention: the documents' tokens are concatenated into one stream,
separated by the BOS token, and each window is ``[BOS] + the next context - 1 tokens``.

    docs = iter_documents(None, "heldout")
    for window in iter_windows(docs, ByteTokenizer(), context=256):
        window.tokens, window.doc_index   # [256] each; doc_index is -1 at BOS positions
    pack_windows([(7, ids_a), (3, ids_b)], bos=256, context=256)   # excerpts: (doc_index, token ids)
"""

from __future__ import annotations

import hashlib
import os
import sys
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import torch

from dictlearn.errors import ConfigError, DataError

Split = Literal["train", "heldout", "all"]
SPLITS = ("train", "heldout", "all")

# 1 file in 20 is held out: enough held-out text for evaluation (~1.7 MB of the 3.11 stdlib)
# while the model trains on the rest.
HELDOUT_PER_10000 = 500
# Skipped anywhere under the root: installed third-party packages and bytecode caches are not
# the standard library's source, and hidden folders (.git, .venv) are not a corpus's text.
SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
# git's binary test: a NUL byte in the first 8000 bytes.
SNIFF_BYTES = 8000


@dataclass(frozen=True)
class Document:
    """One source file: `name` is its path relative to the corpus root (posix), `data` its bytes."""

    name: str
    data: bytes


@dataclass
class Window:
    """One model input: `tokens` [context] and, per position, the index of the document it came
    from in the order `iter_windows` received them (`doc_index` [context], -1 at BOS positions)."""

    tokens: torch.LongTensor
    doc_index: torch.LongTensor


class Tokenizer(Protocol):
    """What `iter_windows` needs: ids without special tokens added, and the BOS id (or None)."""

    bos_token_id: int | None

    def encode(self, text: str) -> list[int]: ...


def stdlib_root() -> Path:
    """The folder holding this interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_name(corpus: str | os.PathLike | None) -> str:
    """The name recorded in provenance attributes: ``python-stdlib-3.11`` or an absolute path."""
    if corpus is None:
        return f"python-stdlib-{sys.version_info.major}.{sys.version_info.minor}"
    return str(Path(corpus).expanduser().resolve())


def is_heldout(name: str) -> bool:
    """Whether the file at relative path `name` belongs to the held-out split (about 5%).

    A hash of the path, not of the contents, so editing a file never moves it between splits.
    """
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 10_000 < HELDOUT_PER_10000


def iter_documents(corpus: str | os.PathLike | None = None, split: Split = "all") -> Iterator[Document]:
    """The corpus's documents in a fixed order (sorted relative paths), restricted to `split`.

    corpus: None for the standard library's ``.py`` files, a file for that one file, a folder
    for its text files (recursively; hidden entries, bytecode caches, binary files and empty files
    skipped). Files are listed and split now, so a missing or empty corpus fails here, not at the
    first read; their contents are read lazily.
    """
    return (Document(name, path.read_bytes()) for name, path in split_files(corpus, split))


def split_files(corpus: str | os.PathLike | None = None, split: Split = "all") -> list[tuple[str, Path]]:
    """The split's files as (relative posix name, path), sorted by name: entry i is the document
    `iter_documents` yields i-th, whose rows a harvested file marks ``doc_index = i``."""
    if split not in SPLITS:
        raise ConfigError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
    root, paths = _list_files(corpus)
    chosen = [(name, path) for name, path in paths if split == "all" or is_heldout(name) == (split == "heldout")]
    if not chosen:
        where = corpus_name(corpus) if corpus is None else str(corpus)
        raise DataError(f"corpus {where}: its {split!r} split holds no files (the split is by file, "
                        f"1 in 20 held out); pass a folder with more files or use split 'all'")
    return chosen


def _list_files(corpus: str | os.PathLike | None) -> tuple[Path, list[tuple[str, Path]]]:
    """-> (root, [(relative posix name, path)]) sorted by name; raises DataError if none."""
    if corpus is None:
        root = stdlib_root()
        found = [p for p in _walk(root) if p.suffix == ".py"]
    else:
        root = Path(corpus).expanduser()
        if root.is_file():
            found, root = [root], root.parent
        elif root.is_dir():
            found = [p for p in _walk(root) if _is_text(p)]
        else:
            raise DataError(f"corpus {corpus}: no such file or folder; pass a text file or a folder of text files")
    files = sorted((p.relative_to(root).as_posix(), p) for p in found if p.stat().st_size > 0)
    if not files:
        where = corpus_name(corpus) if corpus is None else str(corpus)
        raise DataError(f"corpus {where}: no non-empty text files found; pass a text file or a folder of text files")
    return root, files


def _walk(root: Path) -> Iterator[Path]:
    """Regular files under `root`, never descending into skipped or hidden folders (the stdlib's
    site-packages can hold far more files than the standard library itself)."""
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if d not in SKIPPED_DIRS and not d.startswith(".")]
        for name in names:
            path = Path(folder) / name
            if not name.startswith(".") and path.is_file():
                yield path


def _is_text(path: Path) -> bool:
    with open(path, "rb") as f:
        return b"\0" not in f.read(SNIFF_BYTES)


def iter_windows(documents: Iterable[Document], tokenizer: Tokenizer, context: int) -> Iterator[Window]:
    """Pack the documents into fixed-length windows, in order; the last partial window is dropped.

    The stream is doc0, BOS, doc1, BOS, doc2, ... and each window is [BOS] + the next
    context - 1 stream tokens, so every position sees a BOS as its first token (SAELens
    convention). A tokenizer without BOS gets plain context-token slices of doc0 doc1 ....
    A tokenizer with ``byte_level = True`` receives each document's raw bytes (exact for files
    that are not UTF-8); any other tokenizer receives the text decoded as UTF-8 (invalid bytes
    replaced).
    """
    pieces = ((index, document_tokens(document, tokenizer)) for index, document in enumerate(documents))
    return pack_windows(pieces, tokenizer.bos_token_id, context)


def document_tokens(document: Document, tokenizer: Tokenizer) -> torch.LongTensor:
    """A document's token ids [n] as windows hold them (raw bytes for a ``byte_level`` tokenizer,
    else its text decoded as UTF-8 with invalid bytes replaced)."""
    text = document.data if getattr(tokenizer, "byte_level", False) else document.data.decode("utf-8", "replace")
    return torch.tensor(tokenizer.encode(text), dtype=torch.long)


def pack_windows(pieces: Iterable[tuple[int, torch.Tensor]], bos: int | None, context: int) -> Iterator[Window]:
    """Pack (doc_index, token ids [n]) pieces into windows, in order (see `iter_windows`): the
    stream is piece0 BOS piece1 BOS ..., each window [BOS] + the next context - 1 stream tokens;
    empty pieces are skipped and the last partial window is dropped."""
    if context < 2:
        raise ConfigError(f"context {context}: must be at least 2 tokens")
    take = context - 1 if bos is not None else context
    tokens, docs = torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)
    first = True
    for index, ids in pieces:
        if len(ids) == 0:
            continue
        segment, segment_docs = _segment(ids, index, bos, separate=not first)
        first = False
        tokens, docs = torch.cat([tokens, segment]), torch.cat([docs, segment_docs])
        n_full = len(tokens) // take
        for start in range(0, n_full * take, take):
            yield _window(tokens[start:start + take], docs[start:start + take], bos)
        tokens, docs = tokens[n_full * take:], docs[n_full * take:]


def _segment(ids: torch.Tensor, index: int, bos: int | None, separate: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One piece's stream tokens, preceded by the BOS separator unless it is the first.
    -> (tokens [n], doc_index [n]) with doc_index -1 at the separator."""
    docs = torch.full_like(ids, index)
    if separate and bos is not None:
        ids = torch.cat([torch.tensor([bos]), ids])
        docs = torch.cat([torch.tensor([-1]), docs])
    return ids, docs


def _window(tokens: torch.Tensor, docs: torch.Tensor, bos: int | None) -> Window:
    """[take] stream slice -> Window [context], with the leading BOS when the tokenizer has one."""
    if bos is None:
        return Window(tokens.clone(), docs.clone())
    return Window(torch.cat([torch.tensor([bos]), tokens]), torch.cat([torch.tensor([-1]), docs]))
