"""`dictlearn evaluate`: keys, the rows and windows used, numbers against references, bad inputs.

A random byte-level GPT-2 (2 blocks, width 32) saved as a folder, a small corpus folder (stdlib
sources under names chosen so that some files are held out), and a harvest of block 0's residual
stream and MLP input/output: the same path as the embedded model, in a couple of seconds.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import h5py
import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2LMHeadModel

from conftest import initialise, quiet_trainer
from dictlearn.training import DictionaryTraining, TrainingConfig
from dictlearn import ActivationDataModule, ReLUL1SAE, TopKSAE, load
from dictlearn.cli import main
from dictlearn.data import write_synth_file
from dictlearn.models.corpus import is_heldout, iter_documents, iter_windows
from dictlearn.harvest import harvest
from dictlearn.downstream import DownstreamCache
from dictlearn.evaluate import METRIC_KEYS, RECORD_KEYS, Entry, EvaluateOptions, evaluate
from dictlearn.export import export
from dictlearn.metrics import INTERPRETATION_NAMES, mmcs
from dictlearn.metrics.downstream import DOWNSTREAM_KEYS
from dictlearn.models.loading import load_model
from dictlearn.models.tiny import tiny_config

RESID, MLP_IN, MLP_OUT = "transformer.h.0", "transformer.h.0.mlp:input", "transformer.h.0.mlp"
CONTEXT, WIDTH = 32, 32
SOURCES = ["textwrap.py", "json/encoder.py", "string.py", "heapq.py", "shlex.py", "glob.py", "calendar.py",
           "fnmatch.py"]


def _save_model(folder: Path, width: int, seed: int) -> Path:
    torch.manual_seed(seed)
    config = tiny_config(n_layer=2, n_embd=width, n_head=2, context=64)
    config.initializer_range = 0.1
    GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


def _corpus(folder: Path) -> Path:
    """Stdlib sources under names of which the first two are held out (the split hashes the name);
    the first held-out file is cut to 120 bytes, so a document separator falls inside window 4."""
    heldout = [n for n in (f"held{i}.py" for i in range(2000)) if is_heldout(n)][:2]
    train = [n for n in (f"train{i}.py" for i in range(100)) if not is_heldout(n)][: len(SOURCES) - 2]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    folder.mkdir()
    for name, source in zip(heldout + train, SOURCES):
        shutil.copy(stdlib / source, folder / name)
    short = folder / heldout[0]
    short.write_bytes(short.read_bytes()[:120])
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """-> dict(model=folder, corpus=folder, data=file, sae=export, transcoder=export, root=tmp)."""
    root = tmp_path_factory.mktemp("evaluate")
    model_dir = _save_model(root / "model", WIDTH, seed=0)
    corpus = _corpus(root / "corpus")
    data = harvest(load_model(str(model_dir)), [RESID, MLP_IN, MLP_OUT], root / "acts.h5", tokens=4000,
                   context=CONTEXT, corpus=corpus, progress=False)
    L.seed_everything(0)
    sae_data = ActivationDataModule(str(data), RESID, batch_size=256)
    sae = TopKSAE(d_in=WIDTH, d_sae=64, k=4)
    initialise(sae, sae_data)
    tc_data = ActivationDataModule(str(data), MLP_IN, MLP_OUT, batch_size=256)
    transcoder = TopKSAE(d_in=WIDTH, d_sae=64, k=4, transcoder=True, b_dec_init="mean")
    initialise(transcoder, tc_data)
    return dict(
        root=root, model=model_dir, corpus=corpus, data=data,
        sae=export(sae, root / "sae", sae_data.provenance()),
        transcoder=export(transcoder, root / "transcoder", tc_data.provenance()),
    )  # fmt: skip


def _evaluate(capsys, *args: str) -> tuple[int, list[dict], str]:
    capsys.readouterr()
    code = main(["evaluate", *map(str, args)])
    captured = capsys.readouterr()
    lines = [json.loads(line) for line in captured.out.splitlines() if line.startswith("{")]
    return code, lines, captured.err


def _fast(setup) -> list[str]:
    return ["--data", setup["data"], "--contexts", "6", "--batch-size", "4", "--device", "cpu"]


def test_one_line_per_export_with_the_documented_keys(setup, capsys):
    code, lines, err = _evaluate(capsys, setup["sae"], setup["transcoder"], *_fast(setup))
    assert code == 0, err
    assert len(lines) == 2
    for line in lines:
        assert tuple(line) == RECORD_KEYS
        untyped = ("mmcs", "nth_decoder_projection_n", *INTERPRETATION_NAMES,
                   *(() if line["target_key"] else ("jacobian_cos",)))
        assert all(isinstance(line[k], float) for k in METRIC_KEYS if k not in untyped)
        assert line["nth_decoder_projection_n"] == round(line["d_sae"] / 4)
        assert (line["jacobian_cos"] is None) == (line["target_key"] is None)  # transcoders only
        assert line["mmcs"] is None  # a harvested file has no true features
        # 4000 rows of two documents: too few to probe (tests/test_probes.py checks these keys)
        assert all(line[k] is None or isinstance(line[k], float) for k in INTERPRETATION_NAMES)
        assert line["model"] == str(setup["model"].resolve()) and line["n_contexts"] == 6
    sae, transcoder = lines
    assert (sae["architecture"], sae["hook_name"], sae["input_key"], sae["target_key"]) == ("topk", RESID, RESID, None)
    assert (transcoder["hook_name"], transcoder["hook_name_out"]) == (MLP_IN, MLP_OUT)
    assert (transcoder["input_key"], transcoder["target_key"], transcoder["k"]) == (MLP_IN, MLP_OUT, 4)
    assert transcoder["class_path"] == "dictlearn.dictionaries.topk.TopKSAE"
    assert transcoder["hyper_parameters"]["transcoder"] is True
    for line in lines:  # an untrained dictionary: the spliced model measurably differs (a random
        # model is near-uniform, so its loss may move either way)
        assert abs(line["ce_spliced"] - line["ce_clean"]) > 1e-3 and line["kl_div"] > 1e-4
        assert line["ce_clean"] == pytest.approx(sae["ce_clean"], rel=1e-12)  # the same windows


def test_reconstruction_uses_the_validation_tail(setup, capsys):
    _, (line,), _ = _evaluate(capsys, setup["transcoder"], *_fast(setup))
    data = ActivationDataModule(str(setup["data"]), MLP_IN, MLP_OUT, batch_size=1)
    assert line["n_rows"] == data.n_val == 512  # 1% of 4000 rows, rounded to one block
    with h5py.File(setup["data"]) as f:
        x = torch.from_numpy(f[MLP_IN][data.n_train :])
        y = f[MLP_OUT][data.n_train :].astype(np.float64)
    dictionary = load(setup["transcoder"])
    with torch.no_grad():
        z = dictionary.encode(x)
        y_hat = dictionary.decode(z, x).double().numpy()
    err = ((y - y_hat) ** 2).sum()
    assert line["mse"] == pytest.approx(err / len(y), rel=1e-6)
    assert line["fvu"] == pytest.approx(err / ((y - y.mean(0)) ** 2).sum(), rel=1e-6)
    assert line["l0"] == pytest.approx((z != 0).sum(1).double().mean().item(), rel=1e-12)
    assert "feature_density" not in line  # only when asked: one number per latent
    (record,) = evaluate([setup["transcoder"]], setup["data"],
                         options=EvaluateOptions(downstream=False, interpret=False, feature_density=True,
                                                 density_rows=0))
    assert record["density_rows"] == 512
    np.testing.assert_allclose(record["feature_density"], (z != 0).double().mean(0).numpy(), rtol=1e-15)


def test_dead_fraction_counts_over_more_rows_than_the_tail(setup):
    """dead/dense fractions and feature densities over the tail plus seeded training blocks: a
    brute-force count over the same rows (the whole file when it is smaller than density_rows)."""
    dictionary = load(setup["transcoder"])
    with h5py.File(setup["data"]) as f:
        x_all = torch.from_numpy(f[MLP_IN][:])
    split = ActivationDataModule(str(setup["data"]), MLP_IN, MLP_OUT, batch_size=1).split
    picked = split.sample_slices(512, seed=0)  # the one training block a 1024-row census adds to the tail
    for density_rows, rows in ((10**6, x_all), (1024, torch.cat([x_all[split.n_train:]] + [x_all[a:b] for a, b in picked]))):
        (record,) = evaluate([setup["transcoder"]], setup["data"],
                             options=EvaluateOptions(downstream=False, interpret=False, feature_density=True,
                                                     density_rows=density_rows))
        with torch.no_grad():
            fired = (dictionary.encode(rows) != 0).double()
        assert record["density_rows"] == len(rows)
        np.testing.assert_allclose(record["feature_density"], fired.mean(0).numpy(), rtol=1e-12)
        assert record["dead_fraction"] == pytest.approx((fired.sum(0) == 0).double().mean().item(), abs=1e-12)
        assert record["dense_fraction"] == pytest.approx((fired.mean(0) > 0.1).double().mean().item(), abs=1e-12)
        assert record["n_rows"] == 512  # reconstruction and l0 stay on the held-out tail


def test_downstream_windows_are_heldout_windows(setup, capsys):
    """ce_clean by hand: the first held-out windows of the recorded corpus, BOS positions and
    separator targets excluded, float64 cross-entropy."""
    _, (line,), _ = _evaluate(capsys, setup["sae"], *_fast(setup))
    lm = load_model(str(setup["model"]))
    stream = iter_windows(iter_documents(setup["corpus"], "heldout"), lm.tokenizer, CONTEXT)
    windows = [window for _, window in zip(range(6), stream)]
    tokens = torch.stack([w.tokens for w in windows])
    special = torch.stack([w.doc_index for w in windows]) < 0
    with torch.no_grad():
        logits = lm.model(tokens).logits[:, :-1].double()
    mask = ~special[:, :-1] & ~special[:, 1:]
    ce = F.cross_entropy(logits[mask], tokens[:, 1:][mask])
    assert special[:, 0].all() and special[:, 1:].any()  # BOS, and a document separator inside
    assert line["n_tokens"] == int(mask.sum())
    assert line["ce_clean"] == pytest.approx(ce.item(), rel=1e-6)
    assert line["context_size"] == CONTEXT and line["corpus"] == str(setup["corpus"].resolve())


def _without_timings(record: dict) -> dict:
    """A record less its wall-clock fields (`interpret.seconds`, `baseline_seconds`), which differ
    between two evaluations of the same export."""
    interpret = {k: v for k, v in (record.get("interpret") or {}).items() if not k.endswith("seconds")}
    return {**record, "interpret": interpret}


def test_out_is_written_atomically_and_stdout_stays_clean(setup, capsys):
    out = setup["root"] / "results" / "r.jsonl"
    code, lines, _ = _evaluate(capsys, setup["sae"], setup["sae"], *_fast(setup), "--out", out)
    assert code == 0 and lines == []
    written = [_without_timings(json.loads(line)) for line in out.read_text().splitlines()]
    assert len(written) == 2 and written[0] == written[1]
    assert sorted(p.name for p in out.parent.iterdir()) == ["r.jsonl"]  # no temp file left


def test_checkpoint_evaluates_like_its_export(setup, capsys, tmp_path):
    L.seed_everything(1)
    data = ActivationDataModule(str(setup["data"]), RESID, batch_size=256, block_size=64)
    model = TopKSAE(d_in=WIDTH, d_sae=64, k=4)
    trainer = quiet_trainer(max_steps=5)
    trainer.fit(DictionaryTraining(model, TrainingConfig(lr=1e-2)), data)
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    folder = export(model, tmp_path / "export", data.provenance())
    code, (from_ckpt, from_export), err = _evaluate(
        capsys, tmp_path / "run.ckpt", folder, *_fast(setup), "--block-size", "64")
    assert code == 0, err
    for key in METRIC_KEYS:
        if from_export[key] is not None:
            assert from_ckpt[key] == pytest.approx(from_export[key], rel=1e-5, abs=1e-7), key
    assert from_ckpt["n_rows"] == data.n_val and from_ckpt["hook_name"] == RESID


def test_callback_logs_what_evaluate_measures(setup, capsys, tmp_path):
    from dictlearn.callbacks import DownstreamMetricsCallback

    L.seed_everything(2)
    data = ActivationDataModule(str(setup["data"]), RESID, batch_size=256)
    model = TopKSAE(d_in=WIDTH, d_sae=64, k=4)
    callback = DownstreamMetricsCallback(every_n_steps=1, contexts=6, batch_size=4)
    trainer = quiet_trainer(max_steps=4, val_check_interval=4, callbacks=[callback])
    trainer.fit(DictionaryTraining(model, TrainingConfig(lr=1e-2)), data)
    metrics = trainer.callback_metrics
    logged = {k[4:]: v.item() for k, v in metrics.items() if k.startswith("val/ce") or k == "val/kl_div"}
    folder = export(model, tmp_path / "export", data.provenance())
    _, (line,), _ = _evaluate(capsys, folder, *_fast(setup))
    assert set(logged) == {k for k in METRIC_KEYS if k.startswith("ce_")} | {"kl_div"}
    for key, value in logged.items():
        assert value == pytest.approx(line[key], rel=1e-4, abs=1e-6), key


def test_synthetic_file_mmcs_and_no_model(tmp_path, capsys):
    path = tmp_path / "synth.h5"
    write_synth_file(path, n_rows=4096, d=16, n_features=24, mean_active=2.0, seed=0)
    sae = ReLUL1SAE(d_in=16, d_sae=32)
    folder = export(sae, tmp_path / "synth_sae", ActivationDataModule(str(path), "acts", batch_size=64).provenance())
    code, (line,), err = _evaluate(capsys, folder, "--data", path, "--device", "cpu")
    assert code == 0
    assert "downstream metrics skipped" in err
    assert all(line[k] is None for k in ("ce_clean", "ce_loss_recovered", "kl_div", "model", "n_tokens"))
    with h5py.File(path) as f:
        features = torch.from_numpy(f["features"][:])
    assert line["mmcs"] == pytest.approx(mmcs(features, load(folder).W_dec.detach()), rel=1e-9)
    assert 0 < line["mmcs"] < 1
    # a plain file: the block tail, no documents, so no evaluation standard errors
    assert (line["heldout"], line["heldout_documents"], line["fvu_se"], line["l0_se"]) == ("tail", None, None, None)
    assert line["heldout_rows"] == line["n_rows"]


def test_fvu_and_l0_standard_errors_resample_whole_documents():
    """DocumentErrors against a loop that rebuilds each resample from its documents' rows in
    float64, FVU's denominator about the mean of all rows (as fvu itself)."""
    from dictlearn.evaluate import DocumentErrors
    from dictlearn.metrics.bootstrap import resample_counts

    g = torch.Generator().manual_seed(0)
    documents = torch.repeat_interleave(torch.tensor([4, 9, 2, 7, 11, 3]), torch.tensor([5, 40, 12, 30, 8, 25]))
    y = torch.randn(len(documents), 6, generator=g) + documents[:, None] * 0.1  # documents differ in mean
    y_hat = y + (0.2 + 0.1 * (documents[:, None] % 3)) * torch.randn(len(documents), 6, generator=g)
    z = torch.relu(torch.randn(len(documents), 10, generator=g) + 0.05 * documents[:, None])
    errors = DocumentErrors(documents, 6)
    for rows in (slice(0, 33), slice(33, 90), slice(90, None)):  # three reads
        errors.update(rows, y[rows], y_hat[rows], z[rows])
    got = errors.compute()
    y64, err, active = y.double().numpy(), (y.double() - y_hat.double()).numpy(), (z != 0).sum(1).numpy()
    mean, ids = y64.mean(0), np.unique(documents.numpy())
    fvus, l0s = [], []
    for row in resample_counts(len(ids)):
        chosen = np.concatenate([np.flatnonzero(documents.numpy() == ids[j]) for j in range(len(ids))
                                 for _ in range(row[j])])
        fvus.append((err[chosen] ** 2).sum() / ((y64[chosen] - mean) ** 2).sum())
        l0s.append(active[chosen].mean())
    assert got["fvu_se"] == pytest.approx(np.std(fvus, ddof=1), rel=1e-9)
    assert got["l0_se"] == pytest.approx(np.std(l0s, ddof=1), rel=1e-9)
    assert got["fvu_se"] > 0 and got["l0_se"] > 0


def _bad_export(setup, name: str, d_in: int, **attrs) -> Path:
    """An export of `d_in` whose provenance is the harvested file's, with `attrs` changed."""
    folder = setup["root"] / name
    if not folder.exists():
        provenance = ActivationDataModule(str(setup["data"]), RESID, batch_size=64).provenance()
        export(TopKSAE(d_in=d_in, d_sae=32, k=2), folder, provenance | attrs)
    return folder


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing_export", "no such export folder"),
        ("missing_data", "no such file"),
        ("wrong_key", "'nope' not found.*--input-key"),
        ("d_in_mismatch", "width 32 but .* d_in=16"),
        ("hook_mismatch", r"trained on hook_name 'transformer.h.0' but .*\['transformer.h.0.mlp'\] holds"),
        ("model_mismatch", "width 16 but .* d_in=32.*--model"),
        ("file_model_mismatch", "model 'gpt2' but .* was harvested from"),
        ("sae_with_target", "is an SAE"),
        ("bad_flag", "--contexts"),
    ],
)
def test_bad_inputs_exit_2_with_one_line(setup, capsys, case, expected, tmp_path):
    out = tmp_path / "out.jsonl"
    args = {
        "missing_export": [tmp_path / "nothing", *_fast(setup)],
        "missing_data": [setup["sae"], "--data", tmp_path / "none.h5"],
        "wrong_key": [setup["sae"], *_fast(setup), "--input-key", "nope"],
        "d_in_mismatch": [_bad_export(setup, "narrow", 16), *_fast(setup)],
        "hook_mismatch": [setup["sae"], *_fast(setup), "--input-key", MLP_OUT],
        "model_mismatch": [setup["sae"], *_fast(setup), "--model", _narrow_model(setup)],
        "file_model_mismatch": [_bad_export(setup, "other_model", WIDTH, model_name="gpt2"), *_fast(setup)],
        "sae_with_target": [setup["sae"], *_fast(setup), "--target-key", MLP_OUT],
        "bad_flag": [setup["sae"], *_fast(setup), "--contexts", "0"],
    }[case]
    code, lines, err = _evaluate(capsys, *args, "--out", out)
    errors = [line for line in err.splitlines() if line.startswith("dictlearn: error:")]
    assert code == 2 and len(errors) == 1, err
    assert "Traceback" not in err
    assert re.search(expected, errors[0]), errors[0]
    assert list(tmp_path.iterdir()) == []  # no --out file, no temp file


def _narrow_model(setup) -> Path:
    folder = setup["root"] / "narrow_model"
    if not folder.exists():
        _save_model(folder, 16, seed=1)
    return folder


def _errors(err: str) -> list[str]:
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("dictlearn: error:")]


def test_python_api_gives_the_cli_records(setup, capsys):
    _, cli, _ = _evaluate(capsys, setup["sae"], setup["transcoder"], *_fast(setup))
    options = EvaluateOptions(contexts=6, batch_size=4, device="cpu")
    cache = DownstreamCache("cpu")
    records = evaluate([setup["sae"], str(setup["transcoder"])], setup["data"], options=options, cache=cache)
    assert [_without_timings(r) for r in json.loads(json.dumps(records, default=str))] == list(map(_without_timings, cli))
    # a dictionary already in memory, with its cfg: the same numbers, no export path; its
    # train/eval mode is restored, and the cache's model and windows are reused
    dictionary = load(setup["sae"]).train()
    cfg = json.loads((setup["sae"] / "cfg.json").read_text())
    (in_memory,) = evaluate([Entry(dictionary, cfg)], setup["data"], options=options, cache=cache)
    assert in_memory["export"] is None and dictionary.training
    assert {k: in_memory[k] for k in METRIC_KEYS} == {k: cli[0][k] for k in METRIC_KEYS}
    assert len(cache.models) == 1 and len(cache.windows) == 1
    (off,) = evaluate([setup["sae"]], setup["data"], options=dataclasses.replace(options, downstream=False))
    assert all(off[k] is None for k in DOWNSTREAM_KEYS) and off["model"] is None
    assert off["fvu"] == cli[0]["fvu"] and off["l0"] == cli[0]["l0"]


def test_unwritable_out_fails_before_any_work(setup, capsys, tmp_path, monkeypatch):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")

    def no_work(*args, **kwargs):
        raise AssertionError("evaluate ran before --out was checked")

    monkeypatch.setattr("dictlearn.evaluate.evaluate", no_work)  # the CLI imports it after its checks
    for out, expected in ((blocker / "r.jsonl", "is a file, not a folder"),
                          (blocker / "sub" / "r.jsonl", "is a file, not a folder"),
                          (tmp_path, "is a folder")):  # fmt: skip
        code, lines, err = _evaluate(capsys, setup["sae"], *_fast(setup), "--out", out)
        errors = _errors(err)
        assert code == 2 and len(errors) == 1 and lines == [], err
        assert f"--out {out}" in errors[0] and expected in errors[0]
    assert [p.name for p in tmp_path.iterdir()] == ["blocker"]
    assert blocker.read_text() == "a file where a folder should be"


def test_read_only_out_folder_fails_before_any_work(setup, capsys, tmp_path, monkeypatch):
    folder = tmp_path / "ro"
    folder.mkdir(mode=0o555)
    if os.geteuid() == 0:  # root writes into a 0555 folder: refuse the probe as a read-only mount would

        def refuse(*args, **kwargs):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr("tempfile.TemporaryFile", refuse)
    try:
        code, _, err = _evaluate(capsys, setup["sae"], *_fast(setup), "--out", folder / "r.jsonl")
    finally:
        folder.chmod(0o755)
    errors = _errors(err)
    assert code == 2 and len(errors) == 1 and "cannot write" in errors[0]
    assert list(folder.iterdir()) == []


def test_truncated_export_is_one_line_naming_the_file(setup, capsys, tmp_path):
    damaged = Path(shutil.copytree(setup["sae"], tmp_path / "damaged"))
    weights = damaged / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    code, lines, err = _evaluate(capsys, damaged, *_fast(setup))
    errors = _errors(err)
    assert code == 2 and lines == [] and len(errors) == 1
    assert str(weights) in errors[0] and "truncated" in errors[0]


def test_no_heldout_rows_is_one_line(setup, capsys):
    code, _, err = _evaluate(capsys, setup["sae"], *_fast(setup), "--val-rows", "0")
    errors = _errors(err)
    assert code == 2 and len(errors) == 1 and "--val-rows 0" in errors[0]


def test_evaluate_imports_no_model_loading():
    """Language models (and transformers' model classes) load only when downstream metrics run."""
    code = "import sys, dictlearn.evaluate; assert 'dictlearn.models.loading' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.slow
def test_trained_sae_on_the_embedded_model_recovers_most_of_the_loss(tmp_path, capsys):
    """Harvest the embedded model's middle residual stream, train a small TopK SAE, evaluate:
    the spliced loss lies strictly between the clean and the zero-ablated loss."""
    from dictlearn.harvest import default_hooks
    from dictlearn.models.tiny import TINY_DIR, WEIGHTS_FILE

    if not (TINY_DIR / WEIGHTS_FILE).is_file():
        pytest.skip("the embedded model's weights are not built yet")
    lm = load_model(None)
    hook = default_hooks(lm.model)[0]
    path = harvest(lm, [hook], tmp_path / "tiny.h5", tokens=40_000, context=256, progress=False)
    L.seed_everything(0)
    data = ActivationDataModule(str(path), hook, batch_size=512)
    sae = TopKSAE(d_in=data.d_in, d_sae=512, k=16)
    quiet_trainer(max_steps=200).fit(DictionaryTraining(sae), data)
    folder = export(sae, tmp_path / "export", data.provenance())
    code, (line,), err = _evaluate(capsys, folder, "--data", path, "--contexts", "16", "--device", "cpu")
    assert code == 0, err
    print(f"{hook}: FVU {line['fvu']:.3f}, L0 {line['l0']:.1f}, CE clean {line['ce_clean']:.3f} spliced "
          f"{line['ce_spliced']:.3f} zero {line['ce_zero_ablation']:.3f} mean {line['ce_mean_ablation']:.3f}, "
          f"recovered {line['ce_loss_recovered']:.3f} (mean-ablation variant {line['ce_loss_recovered_mean']:.3f}), "
          f"KL {line['kl_div']:.4f}")
    assert line["ce_zero_ablation"] > line["ce_spliced"] > line["ce_clean"]
    assert 0 < line["ce_loss_recovered"] < 1


def test_a_transcoders_jacobian_cos_is_the_mean_cosine_with_the_mlp_it_replaces(setup, capsys):
    """Recomputed here per token from autograd Jacobians of the export and of the model's MLP on the
    held-out input rows evaluate samples (256 evenly spaced rows of the tail)."""
    from dictlearn.data.split import HeldOutSplit
    from dictlearn.metrics.jacobian import sample_rows

    code, (line,), err = _evaluate(capsys, setup["transcoder"], *_fast(setup))
    assert code == 0, err
    mlp = load_model(str(setup["model"])).model.transformer.h[0].mlp
    dictionary = load(setup["transcoder"])
    with h5py.File(setup["data"]) as f:
        x_all = torch.from_numpy(f[MLP_IN][:]).float()
    first, n_rows = HeldOutSplit(len(x_all), EvaluateOptions().block_size, EvaluateOptions().val_rows).heldout
    x = x_all[first + sample_rows(n_rows - first)]
    cosines = []
    for row in x:
        a = torch.autograd.functional.jacobian(lambda v: dictionary(v[None])[0], row).flatten().double()
        b = torch.autograd.functional.jacobian(lambda v: mlp(v[None])[0], row).flatten().double()
        cosines.append(float(a @ b / (a.norm() * b.norm())))
    assert len(cosines) == 256
    assert line["jacobian_cos"] == pytest.approx(sum(cosines) / len(cosines), abs=1e-5)


def test_rows_shared_between_dictionaries_leave_each_record_as_alone(setup):
    """The per-file rows and mean-ablation vector kept in one cache (`HeldOutData.memo`) serve an
    SAE and a transcoder of the same file, in any order, with the numbers each gets alone: a key
    that missed the input or target dataset would hand the transcoder the SAE's rows."""
    options = EvaluateOptions(contexts=6, batch_size=4, device="cpu", interpret=False, feature_density=True)
    alone = [evaluate([path], setup["data"], options=options)[0] for path in (setup["transcoder"], setup["sae"])]
    cache = DownstreamCache("cpu")
    shared = evaluate([setup["transcoder"], setup["sae"], setup["transcoder"]], setup["data"], options=options,
                      cache=cache)
    assert [_without_timings(r) for r in shared] == [_without_timings(r) for r in alone + alone[:1]]
    assert len(cache.shared) == 6  # per dataset pair: held-out rows, census rows, the ablation mean


def test_zero_latent_output_is_decode_of_zeros_bit_for_bit():
    from dictlearn.evaluate import _zero_latent_output

    torch.manual_seed(0)
    for transcoder, skip in ((False, False), (True, False), (True, True)):
        dictionary = TopKSAE(d_in=8, d_sae=16, k=2, transcoder=transcoder, skip_connection=skip)
        with torch.no_grad():
            for p in dictionary.parameters():
                p.normal_()
        x = torch.randn(37, 8)
        z = dictionary.encode(x)
        y = torch.randn(37, dictionary.d_out)
        assert torch.equal(y - _zero_latent_output(dictionary, z, x), y - dictionary.decode(torch.zeros_like(z), x))


def test_the_l0_proxy_reads_the_rows_minus_b_dec_at_three_n(setup):
    """evaluate's `nth_decoder_projection` (n = d_sae / 4) and its eighth and half keys against a
    float64 reference from the definition on the held-out rows minus b_dec: the transcoder's b_dec
    is the target mean (far from 0), so the raw target rows give other numbers."""
    (record,) = evaluate([setup["transcoder"]], setup["data"],
                         options=EvaluateOptions(downstream=False, interpret=False, density_rows=0))
    dictionary = load(setup["transcoder"])
    n_train = ActivationDataModule(str(setup["data"]), MLP_IN, MLP_OUT, batch_size=1).n_train
    with h5py.File(setup["data"]) as f:
        y = f[MLP_OUT][n_train:].astype(np.float64)
    W = dictionary.W_dec.detach().double().numpy()
    unit = W / np.linalg.norm(W, axis=1, keepdims=True)
    b_dec = dictionary.b_dec.detach().double().numpy()

    def reference(rows: np.ndarray, n: int) -> float:  # one block: 512 held-out rows < 4096
        return float(np.sort((rows @ unit.T).ravel())[::-1][n * len(rows)])

    d_sae = dictionary.d_sae
    for key, n in (("nth_decoder_projection_eighth", 8), ("nth_decoder_projection", 16),
                   ("nth_decoder_projection_half", 32)):
        assert n == round(d_sae * {8: 1 / 8, 16: 1 / 4, 32: 1 / 2}[n])
        assert record[key] == pytest.approx(reference(y - b_dec, n), abs=1e-5), key
        assert abs(record[key] - reference(y, n)) > 1e-3, key  # raw rows: another number (>= 2e-3 here)
    assert record["nth_decoder_projection_n"] == 16
