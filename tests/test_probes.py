"""Sparse probes against linear probes on synthetic data with known concepts.

The file holds `dictlearn synth` activations x = sum_i c_i g_i and, as its concept labels,
"true feature j is active" (c_j > 0) for the first features. A dictionary whose decoder rows are
the true features and whose encoder reads them off (MMCS 1) must find each concept in one
latent; a random dictionary must not; a full-width linear probe finds them all.
"""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch

from dictlearn.data.h5 import open_for_write
from dictlearn.data.split import HeldOutSplit
from dictlearn.data.synth import synthesize
from dictlearn.dictionaries.relu_l1 import ReLUL1SAE
from dictlearn.evaluate import Entry, EvaluateOptions, evaluate
from dictlearn.export import export_config
from dictlearn.data.concepts import write_concept_labels
from dictlearn.metrics.probes import ProbeOptions, ProbePool, roc_auc
from dictlearn.metrics.concepts import ProbeCache, interpretation
from dictlearn.metrics import INTERPRETATION_NAMES, mmcs

D, N_FEATURES, N_CONCEPTS, ROWS = 64, 16, 6, 24_576


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """-> (path, features [16, 64], codes [rows, 16]); documents of 100..700 rows."""
    data = synthesize(ROWS, d=D, n_features=N_FEATURES, mean_active=3.0, magnitude="lognormal", seed=0,
                      return_codes=True)
    lengths = np.random.default_rng(1).integers(100, 700, size=ROWS // 100)
    doc_index = np.repeat(np.arange(len(lengths)), lengths)[:ROWS]
    path = tmp_path_factory.mktemp("probes") / "synth.h5"
    with open_for_write(path, {"kind": "synthetic"}) as f:
        f.create_dataset("acts", data=data.acts)
        f.create_dataset("features", data=data.features)
        f.create_dataset("doc_index", data=doc_index.astype(np.int32))
        write_concept_labels(f, [f"feature_{j}" for j in range(N_CONCEPTS)], data.codes[:, :N_CONCEPTS] > 0)
    return path, data.features, data.codes


def _dictionary(w_enc: np.ndarray, w_dec: np.ndarray, b_enc: float = 0.0) -> ReLUL1SAE:
    sae = ReLUL1SAE(d_in=D, d_sae=w_enc.shape[1])
    with torch.no_grad():
        sae.W_enc.copy_(torch.from_numpy(w_enc))
        sae.W_dec.copy_(torch.from_numpy(w_dec))
        sae.b_enc.fill_(b_enc)
        sae.b_dec.zero_()
    return sae.eval()


def recovering(features: np.ndarray) -> ReLUL1SAE:
    """Decoder rows = the true features, encoder = their transposes (z_i = ReLU(g_i . x))."""
    return _dictionary(features.T.copy(), features.copy())


def exact(features: np.ndarray) -> ReLUL1SAE:
    """Latents equal to the true codes: the encoder is the features' pseudo-inverse (16 <= d); a
    bias of -1e-4 keeps float rounding (|error| ~1e-6) of absent features from firing."""
    return _dictionary(np.linalg.pinv(features).astype(np.float32), features.copy(), b_enc=-1e-4)


def random_dictionary(d_sae: int = 32) -> ReLUL1SAE:
    rng = np.random.default_rng(2)
    w_dec = rng.normal(size=(d_sae, D)).astype(np.float32)
    w_dec /= np.linalg.norm(w_dec, axis=1, keepdims=True)
    return _dictionary(w_dec.T.copy(), w_dec)


def test_roc_auc_matches_sklearn_with_ties():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    y = rng.random(500) < 0.3
    scores = np.round(rng.normal(size=500) + y, 1)  # rounded: many ties
    assert roc_auc(scores, y) == pytest.approx(roc_auc_score(y, scores), abs=1e-12)


def test_auc_standard_error_resamples_whole_documents():
    """auc_se against a loop that rebuilds each resample from its documents' rows and scores it
    with sklearn's roc_auc_score (ties included)."""
    from sklearn.metrics import roc_auc_score

    from dictlearn.metrics.probes import auc_se
    from dictlearn.metrics.bootstrap import resample_counts

    rng = np.random.default_rng(1)
    documents = rng.integers(0, 12, 300) * 7  # 12 documents of uneven size
    y = rng.random(300) < 0.4
    scores = np.round(rng.normal(size=300) + y + 0.05 * documents / 7, 1)  # ties; documents shift scores
    ids = np.unique(documents)
    aucs = []
    for row in resample_counts(len(ids), 200, 0):
        chosen = np.concatenate([np.flatnonzero(documents == ids[j]) for j in range(len(ids)) for _ in range(row[j])])
        if 0 < y[chosen].sum() < len(chosen):
            aucs.append(roc_auc_score(y[chosen], scores[chosen]))
    assert auc_se(scores, y, documents, n_boot=200) == pytest.approx(np.std(aucs, ddof=1), rel=1e-9)
    assert np.isnan(auc_se(scores, y, np.zeros(300)))  # one document: nothing to resample


def test_split_is_balanced_and_never_shares_a_document(synth):
    path, _, codes = synth
    pool = ProbePool.draw(path, HeldOutSplit(ROWS), ProbeOptions(min_documents=4))
    assert pool.source == "heldout" or pool.source == "all"
    assert set(pool.splits) == {f"feature_{j}" for j in range(N_CONCEPTS)} and not pool.skipped
    for j, (name, split) in enumerate(pool.splits.items()):
        train_docs, test_docs = set(pool.documents[split.train]), set(pool.documents[split.test])
        assert not train_docs & test_docs
        assert test_docs <= set(pool.test_documents) and not train_docs & set(pool.test_documents)
        assert split.y_train.mean() == 0.5 and split.y_test.mean() == 0.5
        np.testing.assert_array_equal(split.y_train, codes[pool.rows[split.train], j] > 0)  # labels are the file's


def test_pool_uses_the_heldout_tail_when_it_spans_enough_documents(synth):
    path, _, _ = synth
    split = HeldOutSplit(ROWS, val_rows=8192)
    pool = ProbePool.draw(path, split, ProbeOptions(min_documents=4))
    assert pool.source == "heldout" and pool.rows.min() >= split.n_train
    few = ProbePool.draw(path, HeldOutSplit(ROWS, val_rows=512), ProbeOptions(min_documents=4))
    assert few.source == "all"


def test_recovering_dictionary_probes_like_the_linear_probe_and_a_random_one_does_not(synth):
    path, features, _ = synth
    good, bad = recovering(features), random_dictionary()
    assert mmcs(torch.from_numpy(features), good.W_dec.detach()) >= 0.9
    cache = ProbeCache()
    split = HeldOutSplit(ROWS)
    good_keys = interpretation(good, str(path), "acts", split, cache)
    bad_keys = interpretation(bad, str(path), "acts", split, cache)
    for name, probe in good_keys["probes"].items():
        assert probe["k1"] >= 0.95 and probe["linear"] >= 0.95, name
        assert probe["latents"][0] == int(name.split("_")[1])  # the top latent is the feature itself
    assert bad_keys["probe_auc_k1"] < 0.8 < good_keys["probe_auc_k1"]
    assert bad_keys["probe_auc_linear"] == good_keys["probe_auc_linear"]  # one baseline for both
    assert good_keys["probe_auc_k16"] >= 0.95


def test_evaluate_adds_the_keys_and_no_interpret_skips_them(synth, capsys):
    path, features, _ = synth
    entry = Entry(exact(features), export_config(exact(features), {"input_key": "acts"}))
    (record,) = evaluate([entry], path, options=EvaluateOptions(device="cpu", downstream=False))
    assert all(isinstance(record[k], float) for k in INTERPRETATION_NAMES)
    # latent j fires exactly when feature j does: F1 1 for the 6 labelled features; the other 10
    # latents' best F1 is that of an independent feature (~p = 3/16 < 0.5), so coverage is 6/16
    assert record["concept_f1_mean"] == pytest.approx(1.0) and record["concept_coverage"] == pytest.approx(6 / 16)
    assert [record["concepts"][f"feature_{j}"]["latent"] for j in range(N_CONCEPTS)] == list(range(N_CONCEPTS))
    assert record["interpret"]["probed_concepts"] == N_CONCEPTS
    json.dumps(record)  # JSON-able
    (skipped,) = evaluate([entry], path, options=EvaluateOptions(device="cpu", downstream=False, interpret=False))
    assert all(skipped[k] is None for k in (*INTERPRETATION_NAMES, "probes", "concepts", "interpret"))


def test_file_without_labels_gives_null_keys_and_one_note(tmp_path, synth, capsys):
    _, features, _ = synth
    path = tmp_path / "plain.h5"
    with h5py.File(synth[0]) as source, open_for_write(path) as f:
        f.create_dataset("acts", data=source["acts"][:4096])
    cache = ProbeCache()
    for _ in range(2):
        keys = interpretation(recovering(features), str(path), "acts", HeldOutSplit(4096), cache)
        assert all(v is None for v in keys.values())
    assert capsys.readouterr().err.count("no concept labels") == 1


# ----------------------------------------------------------------------------- analysis
def _line(architecture: str, target: int, seed: int, k1: dict, k16: dict, linear: dict, se: float = 0.01) -> dict:
    probes = {c: {"k1": k1[c], "k16": k16[c], "linear": linear[c], "k1_se": se, "k16_se": se} for c in linear}
    return {"architecture": architecture, "name": f"{architecture}_{target}_{seed}", "l0_target": target,
            "l0": float(target), "seed": seed, "probes": probes, "probe_auc_k1": float(np.mean(list(k1.values()))),
            "probe_auc_k16": float(np.mean(list(k16.values()))),
            "probe_auc_linear": float(np.mean(list(linear.values()))), "concept_coverage": 0.1 * seed,
            "concept_f1_mean": 0.5}


def test_analysis_draws_seed_means_with_the_linear_probe_dashed_and_states_the_gaps(tmp_path):
    from dictlearn.analysis.metric_plot import plot_metrics_vs_l0
    from dictlearn.analysis.probing import concept_table, draw, figures, probe_counts, probe_sentences
    from dictlearn.analysis.results import from_records

    linear = {"number": 0.99, "string": 0.90}
    lines = from_records([
        _line("topk", 8, 0, {"number": 0.97, "string": 0.60}, {"number": 0.985, "string": 0.70}, linear),
        _line("topk", 8, 1, {"number": 0.95, "string": 0.64}, {"number": 0.975, "string": 0.72}, linear),
        _line("relu_l1", 8, 0, {"number": 0.90, "string": 0.65}, {"number": 0.90, "string": 0.80}, linear),
    ], str(tmp_path / "results.jsonl"))  # fmt: skip
    probe_figure = figures(lines)[0]
    fig = plot_metrics_vs_l0(lines, list(probe_figure.specs))
    k1_axis = fig.axes[0]
    reference = [l for l in k1_axis.lines if l.get_gid() == "reference"][0]
    assert reference.get_ydata()[0] == pytest.approx(np.mean(list(linear.values())))
    topk = [l for l in k1_axis.lines if l.get_gid() == "probe_auc_k1:topk"][0]
    assert topk.get_ydata()[0] == pytest.approx(np.mean([0.785, 0.795]))  # the two seeds' mean
    # topk number at k = 16: seeds 0.985, 0.975 -> 0.98, SE² = s²/n + se² = 0.00005/2 + 0.0001:
    # SE 0.0112, interval ±0.0219 includes 0.99: matches; topk string 0.71 short. relu_l1 (one
    # seed) number 0.90 ± 0.0196 excludes 0.99: short; string 0.80 short. At k = 1 topk number
    # 0.96 ± 1.96·sqrt(0.01²/2 + 0.01²) = ±0.024 excludes 0.99: short. No architecture is picked.
    header, rows = probe_counts(lines)
    assert header == ["architecture", "k = 1, L0 8", "k = 16, L0 8"]
    assert rows == [["topk", "0 of 2", "1 of 2"], ["relu_l1", "0 of 2", "0 of 2"]]
    sentences = probe_sentences(lines)
    assert sentences[1] == "No dictionary's k = 16 probe reaches the linear probe at any L0 target on 1 of 2 concepts: string."
    assert len(sentences) == 2  # number is reached by topk, not by relu_l1: in neither sentence
    above = from_records([_line("topk", 8, 0, {"number": 0.999}, {"number": 0.999}, {"number": 0.95})],
                         str(tmp_path / "above.jsonl"))
    assert probe_counts(above)[1] == [["topk", "1 of 1 (1 above)", "1 of 1 (1 above)"]]
    assert "at every L0 target on 1 of 1 concepts: number." in probe_sentences(above)[1]
    header, rows = concept_table(lines)
    assert header[3:] == ["topk k = 16", "relu_l1 k = 16"]
    assert rows[0][:3] == ["number", "8", "0.990"] and rows[0][3].startswith("0.980 [0.958, 1.002] matches")
    # without standard errors nothing is said to match
    bare = from_records([_line("topk", 8, 0, {"number": 0.99}, {"number": 0.99}, {"number": 0.99}, se=None)],
                        str(tmp_path / "bare.jsonl"))
    assert probe_sentences(bare)[1].startswith("No probe result carries an interval")
    assert len(probe_sentences(bare)) == 2  # one sentence, not a list per target, k and architecture
    drawn = draw(lines, tmp_path / "figures", [])
    assert {d.stem for d in drawn} == {"l0_probe_auc", "l0_concept_coverage"}


def test_newton_logistic_is_sklearns_minimiser():
    """The sparse probes' solver reaches scikit-learn's L2 logistic solution (run to a tight
    tolerance), including a nearly separable case where full Newton steps overshoot."""
    from sklearn.linear_model import LogisticRegression

    from dictlearn.metrics.probes import newton_logistic

    rng = np.random.default_rng(4)
    for scale, c in ((0.5, 1.0), (6.0, 1.0), (1.0, 0.01)):
        x = rng.normal(size=(400, 8))
        y = (x @ rng.normal(size=8) * scale + rng.normal(size=400)) > 0.3
        theta = newton_logistic(x, y, c)
        reference = LogisticRegression(C=c, tol=1e-12, max_iter=100_000).fit(x, y)
        np.testing.assert_allclose(theta[:-1], reference.coef_[0], rtol=1e-5, atol=1e-6)
        assert theta[-1] == pytest.approx(reference.intercept_[0], rel=1e-5, abs=1e-6)
