"""`dictlearn compare --tune-lr`: validation documents apart from training and test documents, the
choice rule against closed forms, a too-small LR rejected on synthetic data, the record, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from dictlearn.cli import main
from dictlearn.compare.plan import OPTIMIZER, CompareConfig, plan
from dictlearn.compare.tune import choose, fvu_bound, search_runs, validation_documents
from dictlearn.data import ActivationDataModule, write_synth_file
from dictlearn.errors import ConfigError, DataError

N_ROWS = 40_000


def _add_documents(path: Path, seed: int = 0) -> None:
    """doc_index and a `documents/` group as `dictlearn harvest` writes them: documents of uneven
    length (so a cut falls inside one), every 10th held out, their rows after all training rows."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(60, 400, size=N_ROWS // 60)
    lengths = lengths[: int(np.searchsorted(np.cumsum(lengths), N_ROWS)) + 1]
    lengths[-1] -= lengths.sum() - N_ROWS
    heldout = np.arange(len(lengths)) % 10 == 9
    order = np.concatenate([np.flatnonzero(~heldout), np.flatnonzero(heldout)])
    with h5py.File(path, "a") as f:
        f["doc_index"] = np.repeat(order, lengths[order]).astype(np.int32)
        group = f.create_group("documents")
        group["index"], group["heldout"], group["rows"] = order, heldout[order], lengths[order]
        group.attrs["heldout_start"] = int(lengths[~heldout].sum())


@pytest.fixture(scope="module")
def documents_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tune") / "docs.h5"
    write_synth_file(path, n_rows=N_ROWS, d=32, n_features=128, mean_active=6.0, seed=0, d_out=32)
    _add_documents(path)
    return path


@pytest.fixture(scope="module")
def plain_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tune_plain") / "plain.h5"
    write_synth_file(path, n_rows=20_000, d=32, n_features=128, mean_active=6.0, seed=0)
    return path


def _ids(doc: np.ndarray) -> set[int]:
    return set(np.unique(doc[doc >= 0]).tolist())


# ------------------------------------------------------------------ the split
def test_validation_documents_share_no_document_with_training_or_test_rows(documents_file):
    documents = validation_documents(str(documents_file), N_ROWS)
    with h5py.File(documents_file, "r") as f:
        doc, heldout_start = f["doc_index"][()], int(f["documents"].attrs["heldout_start"])
    assert documents.stop == heldout_start  # the test documents (what the report scores) start there
    train, validation, test = doc[: documents.start], doc[documents.start: documents.stop], doc[documents.stop:]
    assert not _ids(train) & _ids(validation) and not _ids(validation) & _ids(test) and not _ids(train) & _ids(test)
    assert documents.documents == len(_ids(validation)) >= 2 and documents.train_documents == len(_ids(train))
    # about a tenth of the training rows; the cut fell inside a document, which stayed on the training side
    cut = heldout_start - round(0.1 * heldout_start)
    assert cut < documents.start and doc[documents.start - 1] == doc[cut] != doc[documents.start]
    assert heldout_start - cut - 400 < documents.stop - documents.start < heldout_start - cut  # less one document


def test_search_data_trains_before_the_validation_documents_and_validates_on_them(documents_file):
    documents = validation_documents(str(documents_file), N_ROWS)
    data = ActivationDataModule(str(documents_file), batch_size=256, val_rows=None)
    data.use_split(documents.split(data.block_size))
    loader = data._train_loader(0, 1)
    read = [s for b in range(len(loader.dataset)) for s in loader.dataset.batch_slices(0, b)]
    assert max(stop for _, stop in read) <= documents.start  # no training row of a validation document
    assert sum(stop - start for start, stop in read) == (documents.start // 256) * 256
    validated = data.val_slices()
    assert validated[0][0] == documents.start and validated[-1][1] == documents.stop


def test_a_file_without_documents_is_refused(plain_file):
    with pytest.raises(DataError, match="records no held-out documents.*--tune-lr"):
        validation_documents(str(plain_file), 20_000)


# ------------------------------------------------------------------ the choice
def test_the_choice_is_the_lowest_fvu_bound_at_the_target():
    assert fvu_bound(0.5, 12, 8) == pytest.approx(0.75) and fvu_bound(0.6, 6, 8) == pytest.approx(0.6)

    def row(lr, fvu, l0, architecture="a", target=8):
        return {"architecture": architecture, "lr": lr, "score": fvu_bound(fvu, l0, target)}

    # 3e-3 reaches the lowest FVU only by using 12 latents for a target of 8: 0.5 x 1.5 = 0.75 > 0.6
    assert choose([row(1e-3, 0.6, 8), row(3e-3, 0.5, 12), row(1e-4, 0.9, 8)]) == {"a": 1e-3}
    # below the target the FVU itself bounds it: 0.55 at L0 6 beats 0.6 at L0 8
    assert choose([row(1e-3, 0.6, 8), row(3e-3, 0.55, 6)]) == {"a": 3e-3}
    # per architecture, non-finite runs (a diverged LR) left out
    rows = [row(1e-3, 0.4, 8, "b"), row(3e-3, float("nan"), 8, "b"), row(1e-3, 0.7, 8), row(3e-3, 0.3, 8)]
    assert choose(rows) == {"b": 1e-3, "a": 3e-3}
    with pytest.raises(DataError, match="every search run of a"):
        choose([row(1e-3, float("inf"), 8)])


def test_the_grid_and_the_chosen_lrs_reach_the_plan():
    config = CompareConfig(architectures=["topk", "relu_l1"], l0=[4, 8, 16], d_sae=[32, 64], seeds=[3, 4],
                           device="cpu", tune_lr=True).resolved()
    assert config.lr_grid == pytest.approx([OPTIMIZER["lr"] / 3, OPTIMIZER["lr"], OPTIMIZER["lr"] * 3])
    assert config.lr_grid == pytest.approx([1e-3, 3e-3, 9e-3])  # centred on recipes/short_run.yaml's lr 3e-3
    moved = CompareConfig(l0=[4], device="cpu", tune_lr=True, optimizer={"lr": 2e-3}).resolved()
    assert moved.lr_grid == pytest.approx([2e-3 / 3, 2e-3, 6e-3])  # the grid follows the common LR
    runs = search_runs(config)
    for architecture, pairs in runs.items():  # the middle target, first seed, first width, one run per LR
        assert [(p.l0_target, p.seed, p.d_sae) for _, p in pairs] == [(8, 3, 32)] * 3
        assert [p.training["lr"] for _, p in pairs] == [lr for lr, _ in pairs] == config.lr_grid
    lrs = {p.architecture: p.training["lr"] for p in plan(config, {"topk": 9e-3})}
    assert lrs == {"topk": 9e-3, "relu_l1": OPTIMIZER["lr"]}
    assert CompareConfig(l0=[4], device="cpu", tune_lr=True, lr_grid=["3e-4", 1e-3]).resolved().lr_grid == [3e-4, 1e-3]


# ------------------------------------------------------------------ bad input: one line, nothing written
@pytest.mark.parametrize("flags, words", [
    (["--tune-lr", "--lr-grid", ""], ["--lr-grid", "at least one"]),
    (["--tune-lr", "--lr-grid", "1e-3,0"], ["--lr-grid 0.001,0.0", "0.0 is not a positive"]),
    (["--tune-lr", "--lr-grid", "1e-3,-1"], ["-1.0 is not a positive"]),
    (["--tune-lr", "--lr-grid", "1e-3,1e-3"], ["given twice"]),
    (["--lr-grid", "1e-3"], ["--lr-grid", "add --tune-lr"]),
    (["--tune-lr", "--lr-grid", "fast"], ["--lr-grid", "numbers"]),
    (["--tune-lr"], ["records no held-out documents", "--tune-lr"]),
])  # fmt: skip
def test_bad_input_is_one_line_and_leaves_nothing(plain_file, tmp_path, capsys, flags, words):
    out = tmp_path / "run"
    code = main(["compare", "--out", str(out), "--data", str(plain_file), "--input-key", "acts", "--quiet", *flags])
    error = capsys.readouterr().err.strip()
    assert code == 2 and len(error.splitlines()) == 1, error
    for word in words:
        assert word in error, error
    assert not out.exists()


def test_bad_grid_in_python_is_one_line():
    with pytest.raises(ConfigError, match="--lr-grid"):
        CompareConfig(l0=[4], device="cpu", tune_lr=True, lr_grid=[]).resolved()


# ------------------------------------------------------------------ end to end on synthetic data
def _fvu64(checkpoint: Path, member: str, path: Path, start: int, stop: int) -> float:
    """FVU in float64, written here: Σ‖y − ŷ‖² / Σ‖y − mean(y)‖² over rows [start, stop)."""
    from dictlearn.export import load

    dictionary = load(checkpoint, member=member)
    with h5py.File(path, "r") as f:
        x = torch.from_numpy(f["acts"][start:stop])
    with torch.no_grad():
        y_hat = dictionary.decode(dictionary.encode(x), x).double()
    y = x.double()
    return float(((y - y_hat) ** 2).sum() / ((y - y.mean(0)) ** 2).sum())


@pytest.mark.slow
def test_the_search_rejects_a_too_small_lr_and_the_comparison_trains_with_the_choice(documents_file, tmp_path):
    """An LR of 1e-6 cannot train a dictionary in 300 steps (ground truth: its weights barely move):
    the search must pick another for both architectures, a reversed rule would pick it."""
    out = tmp_path / "run"
    argv = ["compare", "--out", str(out), "--data", str(documents_file), "--input-key", "acts",
            "--architectures", "topk,relu_l1", "--l0", "4", "--d-sae", "32", "--seeds", "0",
            "--train-tokens", "76800", "--batch-size", "256", "--no-downstream", "--no-interpret", "--quiet",
            "--tune-lr", "--lr-grid", "1e-6,3e-3"]  # fmt: skip
    assert main(argv) == 0
    record = json.loads((out / "lr_search.json").read_text())
    table, chosen = record["table"], record["chosen"]
    assert len(table) == 4 and set(chosen) == {"topk", "relu_l1"}
    documents = validation_documents(str(documents_file), N_ROWS)
    assert record["validation"]["documents"] == documents.documents
    for architecture in chosen:
        rows = [r for r in table if r["architecture"] == architecture]
        assert chosen[architecture] != 1e-6
        assert max(rows, key=lambda r: r["score"])["lr"] == 1e-6  # what "highest" would have chosen
        assert [r["lr"] for r in rows if r["chosen"]] == [chosen[architecture]]
        for r in rows:  # scored on the validation documents' rows, not the training or test rows
            checkpoint = out / "train" / f"lr_{architecture}" / "final.ckpt"
            fvu = _fvu64(checkpoint, r["name"], documents_file, documents.start, documents.stop)
            assert r["validation_fvu"] == pytest.approx(fvu, rel=1e-5)
            assert abs(_fvu64(checkpoint, r["name"], documents_file, documents.stop, N_ROWS) - fvu) > 1e-4
            assert r["score"] == pytest.approx(r["validation_fvu"] * max(1, r["l0"] / 4))
    relu = [r for r in table if r["architecture"] == "relu_l1" and r["lr"] == chosen["relu_l1"]][0]
    assert relu["l0"] == pytest.approx(4, rel=0.35)  # calibrated in the search run too
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {(l["architecture"], l["optimizer"]["lr"], l["lr_tuned"]) for l in lines} == {
        (a, lr, True) for a, lr in chosen.items()}
    report = (out / "report.md").read_text()
    assert "### Learning-rate search" in report and "on **validation documents**" in report
    for architecture, lr in chosen.items():
        assert f"{architecture} {lr:.3g}" in report
    # resume: the same --out trains no search run again
    scores = out / "train" / "lr_topk" / "scores.json"
    stamps = {p: p.stat().st_mtime_ns for p in (scores, scores.with_name("final.ckpt"))}
    assert main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert json.loads((out / "lr_search.json").read_text())["chosen"] == chosen


def test_the_report_says_which_lr_each_architecture_got_and_how(tmp_path):
    from dictlearn.analysis.learning_rates import at_grid_edge, search_blocks, sentences

    def line(architecture, lr, tuned):
        return {"architecture": architecture, "optimizer": {"lr": lr, "adam_betas": [0.9, 0.999]}, "lr_tuned": tuned}

    tuned = sentences([line("topk", 3e-3, True), line("relu_l1", 1e-3, True), line("topk", 3e-3, True)])
    assert len(tuned) == 1 and "relu_l1 0.001, topk 0.003" in tuned[0] and "**validation documents**" in tuned[0]
    shared = sentences([line("topk", 1e-3, False), line("gated", 1e-3, False)])
    assert "same optimiser and learning rate (0.001)" in shared[0]
    assert "not chosen by a search" in sentences([line("topk", 1e-3, False), line("gated", 2e-3, False)])[0]
    assert sentences([{"architecture": "topk"}]) == []
    notes = []
    assert search_blocks(tmp_path, notes) == [] and notes == []  # no search in this run
    table = [{"architecture": a, "lr": lr, "chosen": lr == best} for a, best in (("topk", 3e-3), ("gated", 1e-3))
             for lr in (3e-4, 1e-3, 3e-3)] + [{"architecture": "jumprelu", "lr": 1e-3, "chosen": True}]
    assert at_grid_edge(table) == ["topk (the largest)"]  # gated in the middle; one LR has no edge
    (tmp_path / "lr_search.json").write_text('{"table": [{"architecture": "topk"}]}')
    assert search_blocks(tmp_path, notes) == [] and len(notes) == 1 and "lr_search.json" in notes[0]
