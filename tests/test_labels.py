"""Concept labels: every byte of hand-written snippets against labels written out by hand, and the
harvested ``concepts/`` group row-aligned with the activations.

The expected labels are built here without tokenize: each concept's spans are given as the
substrings that hold them (found left to right), line starts and indentation with regular
expressions.
"""

from __future__ import annotations

import re
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from dictlearn.harvest import harvest
from dictlearn.harvest import labels as labels_module
from dictlearn.data.concepts import read_concept_labels
from dictlearn.harvest.labels import CONCEPTS, PARENTS, label_source
from dictlearn.models.corpus import iter_documents
from dictlearn.models.loading import LanguageModel
from dictlearn.models.tiny import ByteTokenizer


def expected(src: str, spans: dict[str, list[str]], until: int | None = None) -> np.ndarray:
    """bool [len(src) bytes, n_concepts]: each concept True on its listed substrings (each found
    after the previous one of the same concept; words whole), line_start and indentation from
    regexes."""
    until = len(src) if until is None else until
    out = np.zeros((len(src), len(CONCEPTS)), bool)
    for concept, pieces in spans.items():
        position = 0
        for piece in pieces:  # a word is found whole: "f" is not the f of "def"
            pattern = rf"\b{re.escape(piece)}\b" if piece.isidentifier() else re.escape(piece)
            start = re.compile(pattern).search(src, position).start()
            out[start:start + len(piece), CONCEPTS.index(concept)] = True
            position = start + len(piece)
    for match in re.finditer(r"^", src, re.M):
        if match.start() < until:
            out[match.start(), CONCEPTS.index("line_start")] = True
    string = out[:, CONCEPTS.index("string")]
    for match in re.finditer(r"^[ \t\f]+", src, re.M):
        for i in range(match.start(), match.end()):
            out[i, CONCEPTS.index("indentation")] = not string[i]
    out[until:] = False
    return out


def assert_labels(src: str, spans: dict[str, list[str]], until: int | None = None) -> None:
    got = label_source(src.encode())
    want = expected(src, spans, until)
    for j, name in enumerate(CONCEPTS):
        wrong = np.flatnonzero(got.values[:, j] != want[:, j])
        assert wrong.size == 0, f"{name}: bytes {wrong.tolist()} ({src[wrong[0]]!r}...) differ"
    labelled = np.arange(len(src)) < (len(src) if until is None else until)
    np.testing.assert_array_equal(got.labelled, labelled)
    assert (got.error is None) == (until is None)


def test_keywords_names_numbers_comments():
    src = "import os\nif x >= 10:  # big\n    self.y = 0x1F\n"
    assert_labels(src, {
        "keyword": ["import", "if"], "import": ["import"], "if": ["if"],
        "identifier": ["os", "x", "self", "y"], "self": ["self"],
        "number": ["10", "0x1F"], "operator": [">=", ":", ".", "="], "comment": ["# big"],
    })  # fmt: skip


def test_strings_fstrings_and_docstrings():
    src = ('"""Module doc."""\n'
           "def f(a):\n"
           "    # a comment first\n"
           "    'Doc' \"more\"\n"
           "    return f\"{a!r:>{w}}\" + b'x' + r'\\d'\n"
           "class C: \"one-line doc\"\n"
           "x = 'not a doc'\n")  # fmt: skip
    strings = ['"""Module doc."""', "'Doc'", '"more"', 'f"{a!r:>{w}}"', "b'x'", "r'\\d'", '"one-line doc"',
               "'not a doc'"]
    assert_labels(src, {
        "string": strings, "docstring": ['"""Module doc."""', "'Doc'", '"more"', '"one-line doc"'],
        "keyword": ["def", "return", "class"], "def": ["def"], "return": ["return"],
        "identifier": ["f", "a", "C", "x"], "bracket": ["(", ")"], "inside_brackets": ["a"],
        "operator": [":", "+", "+", ":", "="], "comment": ["# a comment first"],
    })  # fmt: skip


def test_nested_brackets_span_lines():
    src = "y = g([1, {2: (3)}],\n      z)\n"
    inside = '[1, {2: (3)}],\n      z'
    assert_labels(src, {
        "identifier": ["y", "g", "z"], "operator": ["=", ",", ":", ",", ],
        "number": ["1", "2", "3"], "bracket": ["(", "[", "{", "(", ")", "}", "]", ")"],
        "inside_brackets": [inside],
    })  # fmt: skip


def test_multiline_string_keeps_its_leading_spaces_out_of_indentation():
    src = 'def f():\n    s = """a\n    b"""\n    return s\n'
    assert_labels(src, {
        "keyword": ["def", "return"], "def": ["def"], "return": ["return"], "identifier": ["f", "s", "s"],
        "bracket": ["(", ")"], "operator": [":", "="], "string": ['"""a\n    b"""'],
    })  # fmt: skip
    values = label_source(src.encode()).values
    second = src.index("    b")
    assert not values[second:second + 4, CONCEPTS.index("indentation")].any()
    assert values[second, CONCEPTS.index("line_start")]


def test_unterminated_string_is_labelled_up_to_the_failure():
    src = 'x = 1\ns = """never closed\nmore\n'
    got = label_source(src.encode())
    until = src.index('= """') + 1  # the end of the last token that tokenized
    assert_labels(src, {"identifier": ["x", "s"], "operator": ["=", "="], "number": ["1"]}, until=until)
    assert "multi-line string" in got.error


def test_bad_dedent_and_stray_character_stop_the_labels():
    dedent = "if x:\n        a = 1\n    b = 2\n"
    got = label_source(dedent.encode())
    assert got.error is not None and got.labelled.sum() < len(dedent)
    assert got.values[: dedent.index("a")].any() and not got.values[~got.labelled].any()
    stray = "a = 1\n$ b\n"
    assert_labels(stray, {"identifier": ["a"], "operator": ["="], "number": ["1"]}, until=stray.index("$"))


def test_non_ascii_bytes_repeat_their_characters_labels():
    src = "s = 'é'  # ü\n".encode() + b"t = b'\xff'\n"  # \xff: not UTF-8, one byte
    got = label_source(src)
    assert got.values.shape == (len(src), len(CONCEPTS))
    string = got.values[:, CONCEPTS.index("string")]
    comment = got.values[:, CONCEPTS.index("comment")]
    assert string[src.index("'".encode()):src.index("'".encode()) + 4].all()  # ' + 2 bytes of é + '
    assert comment[src.index(b"#"):src.index(b"\n")].all()


def test_children_are_subsets_of_their_parents():
    src = Path(labels_module.__file__).read_bytes()  # real code with every child concept
    values = label_source(src).values
    for child, parent in PARENTS.items():
        c, p = values[:, CONCEPTS.index(child)], values[:, CONCEPTS.index(parent)]
        assert c.any() and not (c & ~p).any(), child


# ----------------------------------------------------------------------------- harvested files
@pytest.fixture(scope="module")
def lm() -> LanguageModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=257, n_positions=64, n_embd=16, n_layer=2, n_head=2, bos_token_id=256,
                        eos_token_id=256, dictlearn_tokenizer="byte")
    return LanguageModel(GPT2LMHeadModel(config).eval(), ByteTokenizer(), "test/random-gpt2", "r1")


@pytest.fixture(scope="module")
def mixed_corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    (folder / "a.py").write_text("def f(x):\n    return x  # id\n" * 20)
    (folder / "b.txt").write_text("plain text, not Python. " * 20)
    (folder / "c.py").write_text("x = [1, 2]\ns = '''open\n" + "more text\n" * 10)  # does not tokenize
    (folder / "d.py").write_text('"""Doc."""\nimport os\n' * 15)
    return folder


@pytest.mark.parametrize("exclude_special", [True, False])
def test_harvested_rows_carry_their_bytes_labels(lm, mixed_corpus, tmp_path, exclude_special):
    out = harvest(lm, ["transformer.h.0"], tmp_path / "acts.h5", tokens="all", context=32, corpus=mixed_corpus,
                  split="all", progress=False, exclude_special=exclude_special)
    labels = read_concept_labels(out)
    with h5py.File(out) as f:
        doc_index, token_ids = f["doc_index"][:], f["token_ids"][:]
    documents = list(iter_documents(mixed_corpus, "all"))
    assert labels.names == list(CONCEPTS) and labels.parents == PARENTS
    assert not labels.labelled[doc_index < 0].any() and not labels.values[doc_index < 0].any()
    for d, document in enumerate(documents):
        rows = np.flatnonzero(doc_index == d)
        assert bytes(token_ids[rows].astype(np.uint8)) == document.data[: len(rows)]
        if document.name.endswith(".py"):
            reference = label_source(document.data)
            np.testing.assert_array_equal(labels.values[rows], reference.values[: len(rows)])
            np.testing.assert_array_equal(labels.labelled[rows], reference.labelled[: len(rows)])
        else:
            assert not labels.labelled[rows].any()
    attrs = labels.attrs
    assert attrs["python_documents"] == 3 and attrs["failed_documents"] == 1 and "c.py" in attrs["failed_names"]
    np.testing.assert_array_equal(attrs["positive_rows"], labels.values[labels.labelled].sum(0))
    assert attrs["labelled_rows"] == labels.labelled.sum()


def test_read_rows_in_any_order(lm, mixed_corpus, tmp_path):
    out = harvest(lm, ["transformer.h.0"], tmp_path / "acts.h5", tokens=600, context=32, corpus=mixed_corpus,
                  split="all", progress=False)
    full = read_concept_labels(out)
    rows = np.array([500, 3, 3, 77, 0, 599])
    picked = read_concept_labels(out, rows)
    np.testing.assert_array_equal(picked.values, full.values[rows])
    np.testing.assert_array_equal(picked.labelled, full.labelled[rows])
    np.testing.assert_array_equal(read_concept_labels(out, slice(10, 20)).values, full.values[10:20])


def test_plain_text_corpus_has_no_labels_and_still_harvests(lm, tmp_path):
    corpus = tmp_path / "texts"
    corpus.mkdir()
    (corpus / "a.txt").write_text("hello world. " * 50)
    out = harvest(lm, ["transformer.h.0"], tmp_path / "acts.h5", tokens=300, context=32, corpus=corpus,
                  split="all", progress=False)
    assert read_concept_labels(out) is None
    with h5py.File(out) as f:
        assert f["transformer.h.0"].shape == (300, 16)
    out = harvest(lm, ["transformer.h.0"], tmp_path / "no.h5", tokens=300, context=32, split="all",
                  progress=False, concepts=False)
    assert read_concept_labels(out) is None


def test_subword_tokens_take_their_last_characters_labels():
    """A transformers fast tokenizer (byte-level BPE trained here): each token's labels are those
    of the last character its offset mapping covers."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from dictlearn.harvest.concepts import document_labels, supports
    from dictlearn.harvest.labels import label_text
    from dictlearn.models.corpus import Document
    from dictlearn.models.loading import HFTokenizer

    src = 'def f(x):\n    """Doc."""\n    return x + 1  # é\n'
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator([src] * 3, trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = HFTokenizer(PreTrainedTokenizerFast(tokenizer_object=bpe))
    assert supports(tokenizer)
    values, labelled, error = document_labels(Document("a.py", src.encode()), tokenizer)
    offsets = tokenizer.hf(src, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    assert len(values) == len(tokenizer.encode(src)) == len(offsets) and error is None and labelled.all()
    chars = label_text(src).values
    for (start, end), row in zip(offsets, values):
        np.testing.assert_array_equal(row, chars[end - 1], err_msg=repr(src[start:end]))
    assert values[:, CONCEPTS.index("keyword")].any() and values[:, CONCEPTS.index("docstring")].any()
