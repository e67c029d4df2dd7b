"""Corpus: documents, the held-out split, window packing, the byte tokenizer."""

from __future__ import annotations

import hashlib
import sys

import pytest
import torch

from dictlearn.models.corpus import Document, corpus_name, is_heldout, iter_documents, iter_windows, stdlib_root
from dictlearn.errors import ConfigError, DataError
from dictlearn.models.tiny import ByteTokenizer

BOS = 256


def names(corpus, split):
    return [document.name for document in iter_documents(corpus, split)]


@pytest.fixture(scope="module")
def stdlib_split():
    return {split: names(None, split) for split in ("train", "heldout", "all")}


def test_stdlib_documents_are_sorted_py_sources_only(stdlib_split):
    everything = stdlib_split["all"]
    assert everything == sorted(everything) and len(everything) > 500
    assert all(name.endswith(".py") for name in everything)
    assert not any("site-packages" in name or "__pycache__" in name for name in everything)
    assert "json/decoder.py" in everything
    first = next(iter_documents(None))
    assert first.data == (stdlib_root() / first.name).read_bytes()


def test_heldout_split_is_disjoint_deterministic_and_about_5_percent(stdlib_split):
    train, heldout, everything = stdlib_split["train"], stdlib_split["heldout"], stdlib_split["all"]
    assert not set(train) & set(heldout)
    assert sorted(train + heldout) == everything
    assert names(None, "heldout") == heldout  # a second listing: the same files
    assert 0.03 <= len(heldout) / len(everything) <= 0.07


def test_heldout_rule_is_a_hash_of_the_relative_path():
    # Independent restatement of the rule: first 8 bytes of sha256, big-endian, mod 10000 < 500.
    rule = [int(hashlib.sha256(f"dir/file_{i}.py".encode()).hexdigest()[:16], 16) % 10_000 < 500 for i in range(20_000)]
    assert [is_heldout(f"dir/file_{i}.py") for i in range(20_000)] == rule
    assert abs(sum(rule) / len(rule) - 0.05) < 0.005


def test_folder_corpus_reads_text_files_recursively_and_splits_by_the_same_rule(tmp_path):
    texts = {f"f{i:03d}.txt": f"text number {i}\n" for i in range(60)}
    texts["sub/deeper/é.txt"] = "non-ASCII name, contents ✓\n"
    for name, text in texts.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text, encoding="utf-8")
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "image.bin").write_bytes(b"PNG\0\1\2")
    (tmp_path / ".hidden.txt").write_text("hidden")
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "x.txt").write_text("cache")

    documents = list(iter_documents(tmp_path))
    assert documents == [Document(name, texts[name].encode()) for name in sorted(texts)]
    heldout = names(tmp_path, "heldout")
    assert heldout == sorted(name for name in texts if is_heldout(name)) and heldout
    assert sorted(names(tmp_path, "train") + heldout) == sorted(texts)


def test_single_file_corpus_is_one_document_named_by_its_file_name(tmp_path):
    name = next(f"notes{i}.txt" for i in range(100) if not is_heldout(f"notes{i}.txt"))
    (tmp_path / name).write_bytes(b"caf\xc3\xa9\n\xff")
    assert list(iter_documents(tmp_path / name)) == [Document(name, b"caf\xc3\xa9\n\xff")]
    assert names(tmp_path / name, "train") == [name]
    with pytest.raises(DataError, match=r"'heldout' split holds no files"):
        iter_documents(tmp_path / name, "heldout")


def test_missing_or_empty_corpus_raises_naming_the_path(tmp_path):
    with pytest.raises(DataError, match=f"corpus {tmp_path / 'nope'}: no such file or folder"):
        iter_documents(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blob.bin").write_bytes(b"\0\0")
    with pytest.raises(DataError, match=f"corpus {tmp_path / 'empty'}: no non-empty text files"):
        iter_documents(tmp_path / "empty")
    with pytest.raises(ConfigError, match="split 'test'"):
        iter_documents(None, "test")


def test_corpus_name():
    assert corpus_name(None) == f"python-stdlib-{sys.version_info.major}.{sys.version_info.minor}"
    assert corpus_name("some/rel/path").startswith("/") and corpus_name("some/rel/path").endswith("some/rel/path")


def test_window_packing_matches_a_hand_computed_example():
    documents = [Document("a", b"abc"), Document("b", b"de"), Document("c", b"fghijk")]
    windows = list(iter_windows(documents, ByteTokenizer(), context=4))
    # stream: a b c BOS d e BOS f g h i j k (13 tokens); 3 stream tokens per window after the
    # window's own BOS; the 13th token (k) does not fill a window and is dropped.
    a, b, c, d, e, f, g, h, i, j = range(97, 107)
    assert [w.tokens.tolist() for w in windows] == [
        [BOS, a, b, c], [BOS, BOS, d, e], [BOS, BOS, f, g], [BOS, h, i, j]]
    assert [w.doc_index.tolist() for w in windows] == [
        [-1, 0, 0, 0], [-1, -1, 1, 1], [-1, -1, 2, 2], [-1, 2, 2, 2]]
    assert all(w.tokens.dtype == torch.long and w.doc_index.dtype == torch.long for w in windows)


class CharTokenizer:
    """A text tokenizer without BOS: one id per character; records what it was given."""

    bos_token_id = None

    def __init__(self):
        self.seen = []

    def encode(self, text):
        self.seen.append(text)
        return [ord(ch) for ch in text]


def test_windows_without_bos_are_plain_slices_and_text_tokenizers_get_decoded_text():
    tokenizer = CharTokenizer()
    documents = [Document("a", "aé".encode()), Document("b", b"cd\xff")]
    windows = list(iter_windows(documents, tokenizer, context=2))
    assert tokenizer.seen == ["aé", "cd\ufffd"]
    assert [w.tokens.tolist() for w in windows] == [[ord("a"), ord("é")], [ord("c"), ord("d")]]
    assert [w.doc_index.tolist() for w in windows] == [[0, 0], [1, 1]]
    with pytest.raises(ConfigError, match="context 1"):
        next(iter_windows(documents, tokenizer, context=1))


def test_windows_are_deterministic_on_the_stdlib():
    first = [w.tokens for _, w in zip(range(50), iter_windows(iter_documents(None, "heldout"), ByteTokenizer(), 64))]
    again = [w.tokens for _, w in zip(range(50), iter_windows(iter_documents(None, "heldout"), ByteTokenizer(), 64))]
    assert len(first) == 50 and all(torch.equal(x, y) for x, y in zip(first, again))


def test_byte_tokenizer_round_trip_including_non_ascii():
    tokenizer = ByteTokenizer()
    text = "naïve — ✓ 𝔘 def f(): return '日本'\n"
    ids = tokenizer.encode(text)
    assert ids == list(text.encode("utf-8")) and len(ids) > len(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.encode(text.encode("utf-8")) == ids
    assert tokenizer.decode([BOS, *ids, BOS]) == text  # BOS never decodes to text
    assert tokenizer.decode([0x66, 0xFF]) == "f\ufffd"
    assert (tokenizer.vocab_size, tokenizer.bos_token_id) == (257, 256)
