"""Held-out documents: harvest spreads over the corpus and holds whole documents out; every reader
(data module, evaluate's split, downstream windows, probes) keeps them apart from training rows.

The rules are restated here independently: the order is ``default_rng([seed, 1]).permutation``
of the split's sorted files, the 10th, 20th, ... document of it is held out, each excerpt is a
contiguous slice of at most 2 windows' worth of the document's bytes.
"""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from dictlearn.data import ActivationDataModule
from dictlearn.data.split import HeldOutSplit, check_documents
from dictlearn.downstream import _drawn_windows, _heldout_excerpts, heldout_batches
from dictlearn.errors import DataError
from dictlearn.harvest import harvest, plan_harvest
from dictlearn.metrics.probes import ProbeOptions, ProbePool
from dictlearn.models.corpus import iter_documents, iter_windows, split_files
from dictlearn.models.loading import LanguageModel
from dictlearn.models.tiny import ByteTokenizer

BOS = ByteTokenizer.bos_token_id
CONTEXT = 32
HOOK = "transformer.h.0"
TOKENS = 3000


@pytest.fixture(scope="module")
def lm() -> LanguageModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=257, n_positions=64, n_embd=16, n_layer=2, n_head=2, bos_token_id=BOS,
                        eos_token_id=BOS, dictlearn_tokenizer="byte")
    return LanguageModel(GPT2LMHeadModel(config).eval(), ByteTokenizer(), "test/random-gpt2", "r1")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """80 Python files of 40 to ~600 bytes: most longer than the 2-window cap (62 bytes)."""
    folder = tmp_path_factory.mktemp("corpus")
    for i in range(80):
        body = "".join(f"def f{i}_{j}(x):\n    return x + {j}  # c\n" for j in range(1 + i % 17))
        (folder / f"m{i:02d}.py").write_text(body)
    return folder


@pytest.fixture(scope="module")
def harvested(lm, corpus, tmp_path_factory):
    path = tmp_path_factory.mktemp("h") / "acts.h5"
    harvest(lm, [HOOK], path, TOKENS, CONTEXT, corpus=corpus, split="all", progress=False, seed=3)
    with h5py.File(path, "a") as f:  # a row-aligned copy of doc_index as activations: batches show documents
        f["ids"] = f["doc_index"][()].astype(np.float32)[:, None]
    return path


def _record(path):
    with h5py.File(path, "r") as f:
        g = f["documents"]
        return ({k: g[k][()] for k in ("index", "start", "stop", "rows", "heldout")} | {"name": g["name"].asstr()[()]},
                dict(g.attrs), f["doc_index"][()], f["token_ids"][()])


def test_documents_follow_the_seeded_order_and_every_tenth_is_held_out(harvested, corpus):
    record, attrs, doc_index, token_ids = _record(harvested)
    names = [name for name, _ in split_files(corpus, "all")]
    order = np.random.default_rng([3, 1]).permutation(len(names)).tolist()
    position = np.array([order.index(i) for i in record["index"]])
    # the documents read are a prefix of the seeded order (bar the last of each side), sides by position
    assert sorted(position.tolist())[: len(position) - 2] == list(range(len(position) - 2))
    np.testing.assert_array_equal(record["heldout"], position % 10 == 9)
    train, held = position[~record["heldout"]], position[record["heldout"]]
    assert list(train) == sorted(train) and list(held) == sorted(held)  # file order: training side, then held out
    assert (~record["heldout"]).sum() >= 30 and record["heldout"].sum() >= 3
    assert attrs["seed"] == 3 and attrs["heldout_every"] == 10 and attrs["windows_per_document"] == 2
    for i, name, start, stop, rows in zip(record["index"], record["name"], record["start"], record["stop"],
                                          record["rows"]):
        data = (corpus / name).read_bytes()
        assert name == names[i] and stop - start == min(len(data), 2 * (CONTEXT - 1))
        at = np.flatnonzero(doc_index == i)  # the document's rows: its excerpt's bytes, in order
        assert len(at) == rows and bytes(token_ids[at].astype(np.uint8)) == data[start:start + rows]
    assert (record["start"] > 0).mean() > 0.5  # excerpts start at seeded offsets, not at the headers


def test_heldout_rows_are_the_files_end_and_share_no_document_with_training(harvested):
    record, attrs, doc_index, _ = _record(harvested)
    start = attrs["heldout_start"]
    held = set(record["index"][record["heldout"]].tolist())
    assert held and not held & set(doc_index[:start].tolist())
    assert set(doc_index[start:].tolist()) - {-1} == held
    assert check_documents(str(harvested)) == {
        "train_rows": start, "heldout_rows": TOKENS - start,
        "train_documents": int((~record["heldout"]).sum()), "heldout_documents": len(held)}


def test_data_module_batches_never_read_heldout_documents(harvested):
    record, attrs, _, _ = _record(harvested)
    held = set(record["index"][record["heldout"]].tolist())
    data = ActivationDataModule(str(harvested), input_key="ids", batch_size=64, block_size=32, normalize="none")
    assert data.heldout_summary() == {"heldout": "documents", "heldout_rows": TOKENS - attrs["heldout_start"],
                                      "heldout_documents": len(held), "train_rows": attrs["heldout_start"],
                                      "train_documents": int((~record["heldout"]).sum())}
    trained = np.concatenate([x[:, 0].numpy() for x, _ in data._train_loader(0, 1)]).astype(int)
    validated = np.concatenate([x[:, 0].numpy() for x, _ in data._eval_loader(0, 1)]).astype(int)
    assert not held & set(trained.tolist()) and set(validated.tolist()) - {-1} == held
    assert len(validated) == TOKENS - attrs["heldout_start"]
    x, _ = data.sample_rows(10_000)  # normalisation/initialisation samples: training rows only
    assert not held & set(x[:, 0].int().tolist())


def test_plain_and_older_files_fall_back_to_the_tail_and_say_so(harvested, tmp_path):
    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as f:
        f["acts"] = np.zeros((4000, 2), np.float32)
    data = ActivationDataModule(str(plain), batch_size=64, normalize="none")
    assert data.heldout_summary() == {"heldout": "tail", "heldout_rows": 512, "heldout_documents": None,
                                      "train_rows": 3488, "train_documents": None}
    older = tmp_path / "older.h5"  # harvested before documents/ was recorded: doc_index, no record
    shutil.copy(harvested, older)
    with h5py.File(older, "a") as f:
        del f["documents"]
        tail_documents = len(set(f["doc_index"][TOKENS - 512:].tolist()) - {-1})
    split = HeldOutSplit.from_file(str(older), TOKENS, 512)
    assert split.summary()["heldout"] == "tail" and split.heldout == (TOKENS - 512, TOKENS)
    assert split.summary()["heldout_documents"] == tail_documents
    with pytest.raises(DataError, match="records no held-out documents"):
        check_documents(str(older))


def test_check_documents_names_the_row_that_breaks_the_split(harvested, tmp_path):
    moved = tmp_path / "moved.h5"
    shutil.copy(harvested, moved)
    with h5py.File(moved, "a") as f:
        start = int(f["documents"].attrs["heldout_start"])
        f["documents"].attrs["heldout_start"] = start - 40  # 40 training rows now on the held-out side
    with pytest.raises(DataError, match=rf"row {start - 40} .* held-out side of row {start - 40}"):
        check_documents(str(moved))


def test_val_rows_takes_the_first_heldout_rows_and_training_still_skips_them(harvested):
    split = HeldOutSplit.from_file(str(harvested), TOKENS, 32, val_rows=50)
    start = split.n_train
    assert split.heldout == (start, start + 50) and split.kind == "documents"
    assert HeldOutSplit.from_file(str(harvested), TOKENS, 32, val_rows=0).n_train == start
    assert split.val_slices(20, 0, 2) + split.val_slices(20, 1, 2) == [(start, start + 12), (start + 12, start + 25),
                                                                        (start + 25, start + 37), (start + 37, start + 50)]


def test_downstream_windows_are_drawn_from_heldout_documents(lm, harvested, corpus):
    excerpts = _heldout_excerpts(str(harvested))
    held = {index for index, *_ in excerpts}
    everything = _drawn_windows(excerpts, lm.tokenizer, corpus, CONTEXT, 10_000, seed=0)
    drawn = _drawn_windows(excerpts, lm.tokenizer, corpus, CONTEXT, 4, seed=0)
    assert len(everything) >= 6 and len(drawn) == 4
    for window in everything:
        ids = set(window.doc_index.tolist()) - {-1}
        assert ids and ids <= held
    positions = [next(i for i, w in enumerate(everything) if torch.equal(w.tokens, d.tokens)) for d in drawn]
    assert positions == sorted(positions) and positions != list(range(4))  # at random, kept in order
    assert positions != [next(i for i, w in enumerate(everything) if torch.equal(w.tokens, d.tokens))
                         for d in _drawn_windows(excerpts, lm.tokenizer, corpus, CONTEXT, 4, seed=1)]
    batches = heldout_batches(lm.tokenizer, str(corpus), CONTEXT, 4, True, 3, data=str(harvested))
    assert [len(t) for t, _ in batches] == [3, 1]
    torch.testing.assert_close(batches[0][0], torch.stack([w.tokens for w in drawn[:3]]))
    assert torch.equal(batches[0][1], torch.stack([w.doc_index for w in drawn[:3]]) < 0)


def test_downstream_without_a_record_keeps_the_corpus_heldout_split(lm, corpus, tmp_path):
    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as f:
        f["acts"] = np.zeros((10, 2), np.float32)
    batches = heldout_batches(lm.tokenizer, str(corpus), CONTEXT, 2, True, 2, data=str(plain))
    first = list(iter_windows(iter_documents(str(corpus), "heldout"), lm.tokenizer, CONTEXT))[:2]
    assert torch.equal(batches[0][0], torch.stack([w.tokens for w in first]))


def test_probe_test_side_is_the_heldout_documents(harvested):
    split = HeldOutSplit.from_file(str(harvested), TOKENS)
    pool = ProbePool.draw(str(harvested), split, ProbeOptions(min_per_class=3))
    record, _, doc_index, _ = _record(harvested)
    held = set(record["index"][record["heldout"]].tolist())
    assert pool is not None and pool.source == "documents" and pool.splits
    assert set(pool.test_documents.tolist()) == held
    for concept in pool.splits.values():
        assert (pool.rows[concept.test] >= split.n_train).all() and (pool.rows[concept.train] < split.n_train).all()
        assert set(doc_index[pool.rows[concept.test]].tolist()) <= held


def test_few_documents_record_none_held_out_and_readers_use_the_tail(lm, corpus, tmp_path, capsys):
    path = harvest(lm, [HOOK], tmp_path / "few.h5", 300, CONTEXT, corpus=corpus, split="all", progress=False)
    assert "too few to hold out whole ones" in capsys.readouterr().err
    assert HeldOutSplit.from_file(str(path), 300, 64).kind == "tail"


def test_a_few_long_documents_widen_the_cap_until_the_budget_fits(tmp_path):
    for i in range(3):
        (tmp_path / f"long{i}.txt").write_text("abcdefgh" * 200)  # 1600 bytes each
    files = split_files(tmp_path, "all")
    plan = plan_harvest(files, ByteTokenizer(), CONTEXT, 3000, True, 0)
    assert plan.rows == 3000 and plan.windows_per_document == 64  # 2 -> 4 -> ... -> 64 windows of 31
    with pytest.raises(DataError, match="fewer than --tokens 5000"):
        plan_harvest(files, ByteTokenizer(), CONTEXT, 5000, True, 0)


@pytest.mark.parametrize("tokens", [250_000, 400_000])  # compare's and harvest's defaults
def test_default_corpus_spans_hundreds_of_documents(tokens):
    plan = plan_harvest(split_files(None, "train"), ByteTokenizer(), 256, tokens, True, 0)
    assert len(plan.train) >= 100 and len(plan.heldout) >= 20
    assert 0.05 <= 1 - plan.heldout_start / plan.rows <= 0.15


@pytest.mark.slow
def test_default_harvest_file_spans_100_training_and_20_heldout_documents(tmp_path):
    from dictlearn.harvest import default_hooks
    from dictlearn.models.loading import load_model

    lm = load_model(None)
    path = harvest(lm, default_hooks(lm.model)[:1], tmp_path / "acts.h5", 250_000, 256, progress=False)
    counts = check_documents(str(path))
    assert counts["train_documents"] >= 100 and counts["heldout_documents"] >= 20
    assert counts["heldout_rows"] >= 10_000


def test_excerpt_labels_equal_the_whole_files_up_to_the_excerpts_end():
    from dictlearn.harvest.concepts import document_labels, excerpt_labels
    from dictlearn.models.corpus import Document

    tricky = Document("t.py", b'def f(x):\n    """Doc\nflush left inside the string\n"""\n    return (x +\n1)\ny = 2\n')
    documents = [tricky, *list(iter_documents(None, "train"))[::60]]
    rng = np.random.default_rng(0)
    for document in documents:
        whole = document_labels(document, ByteTokenizer())
        for stop in {1, len(document.data), *rng.integers(1, len(document.data) + 1, 5).tolist()}:
            values, labelled, _ = excerpt_labels(document, stop, ByteTokenizer())
            np.testing.assert_array_equal(values[:stop], whole[0][:stop], err_msg=f"{document.name} {stop}")
            np.testing.assert_array_equal(labelled[:stop], whole[1][:stop], err_msg=f"{document.name} {stop}")


def test_compare_sweeps_validate_on_heldout_documents_only(harvested, monkeypatch):
    """compare's sweeps validate on the first VALIDATION_ROWS held-out rows (the curves); with a
    tail split they keep evaluate's held-out tail, so evaluate never scores a row that was trained on."""
    from pathlib import Path

    from dictlearn.compare import sweeps
    from dictlearn.compare.plan import CompareConfig

    monkeypatch.setattr(sweeps, "VALIDATION_ROWS", 7)
    config = CompareConfig(data=str(harvested), input_key="ids", l0=[2], d_sae=[8], device="cpu").resolved()
    data = sweeps.sweep_data(config, sweeps.Source(Path(harvested), ("ids", None), None), seed=0)
    data.setup("fit")
    split = HeldOutSplit.from_file(str(harvested), TOKENS)
    assert data.n_val == 7 and data.n_train == split.n_train
