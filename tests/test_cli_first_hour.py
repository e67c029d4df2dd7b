"""What a new user meets in the first hour of `dictlearn fit`: bad input gets one line (exit 2,
nothing left behind), a run shows one progress bar, validates its final model and ends with a
summary, and `dictlearn` itself answers at once."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from test_cli_errors import _fit_args, _run_expecting_error, _synth
from dictlearn.cli import main


@pytest.mark.parametrize("recipe, value", [("topk.yaml", "0"), ("topk.yaml", "-5"), ("batchtopk.yaml", "0"),
                                           ("relu_l1.yaml", "0"), ("gated.yaml", "-5"), ("jumprelu.yaml", "0")])
def test_a_non_positive_d_sae_is_one_line_for_every_mechanism(recipe, value, tmp_path, capsys, monkeypatch):
    args = _fit_args(tmp_path, _synth(tmp_path / "acts.h5"), recipe=recipe)
    args[args.index("--model.d_sae") + 1] = value
    line = _run_expecting_error(tmp_path, capsys, monkeypatch, args)
    assert "--model.d_sae must be > 0" in line


@pytest.mark.parametrize("flag, suggestion", [("--model.dsae", "--model.d_sae"), ("--data.bach_size", "--data.batch_size"),
                                              ("--trainer.max_step", "--trainer.max_steps")])
def test_a_misspelled_flag_gets_did_you_mean(flag, suggestion, tmp_path, capsys, monkeypatch):
    args = _fit_args(tmp_path, _synth(tmp_path / "acts.h5"), flag, "10")
    line = _run_expecting_error(tmp_path, capsys, monkeypatch, args)
    assert line == f"dictlearn: error: unknown flag {flag}; did you mean {suggestion}?"


def test_a_missing_checkpoint_is_one_line_and_leaves_no_run_folder(tmp_path, capsys, monkeypatch):
    args = _fit_args(tmp_path, _synth(tmp_path / "acts.h5"), "--ckpt_path", "missing.ckpt")
    assert "--ckpt_path missing.ckpt: no such checkpoint file" in _run_expecting_error(tmp_path, capsys, monkeypatch, args)


def test_zero_steps_are_refused(tmp_path, capsys, monkeypatch):
    args = _fit_args(tmp_path, _synth(tmp_path / "acts.h5"))
    args[args.index("--trainer.max_steps") + 1] = "0"
    assert "--trainer.max_steps 0 trains nothing" in _run_expecting_error(tmp_path, capsys, monkeypatch, args)


def test_an_unwritable_log_folder_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    data = _synth(tmp_path / "acts.h5")
    (tmp_path / "blocker").write_text("a file where a folder should be")
    args = _fit_args(tmp_path, data)
    args[args.index("--trainer.default_root_dir") + 1] = str(tmp_path / "blocker" / "runs")
    assert "--trainer.default_root_dir" in _run_expecting_error(tmp_path, capsys, monkeypatch, args)


def test_synth_and_export_refuse_an_unwritable_target(tmp_path, capsys, monkeypatch):
    (tmp_path / "blocker").write_text("a file")
    line = _run_expecting_error(tmp_path, capsys, monkeypatch, ["synth", "--out", str(tmp_path / "blocker" / "x.h5")])
    assert line.startswith(f"dictlearn: error: --out {tmp_path / 'blocker' / 'x.h5'}: ")


def test_nan_in_a_held_out_row_is_found_before_training_and_names_the_file_row(tmp_path, capsys, monkeypatch):
    rows = np.random.default_rng(0).standard_normal((20_000, 16)).astype(np.float32)
    rows[19_990, 3] = np.nan  # in the validation tail, which the training sample never reads
    with h5py.File(tmp_path / "acts.h5", "w") as f:
        f.create_dataset("acts", data=rows)
    line = _run_expecting_error(tmp_path, capsys, monkeypatch, _fit_args(tmp_path, tmp_path / "acts.h5"))
    assert "NaN/Inf in held-out row 19990" in line and "'acts'" in line


def test_a_short_run_validates_its_final_model_shows_progress_and_ends_with_a_summary(tmp_path, capsys):
    data = _synth(tmp_path / "acts.h5")
    args = _fit_args(tmp_path, data)
    assert main(args + ["--trainer.val_check_interval", "500"]) == 0  # 5 steps: no scheduled validation
    err = capsys.readouterr().err
    assert "dictlearn fit" in err and "5/5" in err  # one bar over the run: step / max_steps
    summary = err[err.index("dictlearn: trained 5 steps"):]
    assert "held out fvu" in summary and "metrics.csv" in summary
    for noise in ("GPU available", "Seed set to", "litlogger", "Total params", "LeafSpec", "max_steps=5` reached"):
        assert noise not in err, noise
    run = next((tmp_path / "runs" / "one").rglob("metrics.csv"))
    with open(run, newline="") as f:
        validated = [row for row in csv.DictReader(f) if row.get("val/fvu")]
    assert len(validated) == 1 and int(validated[0]["step"]) == 5
    assert f"fvu {float(validated[0]['val/fvu']):.4f}" in summary


def test_dictlearn_itself_answers_without_loading_torch():
    for argv, code in (([], 2), (["--help"], 0), (["--version"], 0)):
        done = subprocess.run([sys.executable, "-c", "import sys; from dictlearn.cli import main; r = main(sys.argv[1:]); "
                               "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(r)", *argv],
                              capture_output=True, text=True)
        assert done.returncode == code, done.stderr
    assert "fit" in done.stdout or "dictlearn" in done.stdout


def test_fit_help_names_the_size_flags(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    out = capsys.readouterr().out
    assert "--model.d_sae N" in out and "--model.k K" in out and "--data.batch_size B" in out


def test_a_loaded_dictionary_builds_no_graph_unless_the_input_asks(tmp_path):
    import torch

    import dictlearn
    from dictlearn.export import export

    model = dictlearn.TopKSAE(d_in=8, d_sae=32, k=4)
    export(model, tmp_path / "export")
    loaded = dictlearn.load(tmp_path / "export")
    x = torch.randn(5, 8)
    assert not loaded.encode(x).requires_grad and not loaded(x).requires_grad
    x.requires_grad_()
    loaded(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_without_a_terminal_progress_is_a_plain_line_every_tenth_of_the_run(tmp_path, capsys, monkeypatch, recwarn):
    """stderr to a file: a tqdm bar redrew every step (157 KB for the quickstart's 600 steps).
    2,048-row batches: 9 per epoch, fewer than the base recipe's log_every_n_steps 50, which made
    Lightning warn although dictlearn logs by global step (rows at 50 and 100 below)."""
    monkeypatch.chdir(tmp_path)
    args = _fit_args(tmp_path, _synth(tmp_path / "acts.h5"), "--data.batch_size", "2048", "--trainer.max_steps", "100",
                     "--trainer.log_every_n_steps", "50")
    assert main(args) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("dictlearn fit: step ")]
    assert [int(re.match(r"dictlearn fit: step (\d+)/100 \((\d+) %\)", line).group(1)) for line in lines] == list(
        range(10, 101, 10)), err
    assert "\r" not in err and len(err) < 2_000, err
    assert not [w for w in recwarn if "logging interval" in str(w.message)]
    run = next((tmp_path / "runs" / "one").rglob("metrics.csv"))
    with open(run, newline="") as f:
        assert [int(row["step"]) for row in csv.DictReader(f) if row.get("train/fvu")] == [49, 99]


def test_the_summary_counts_dead_latents_over_the_training_tokens_it_names(tmp_path, capsys, monkeypatch):
    """The held-out tail (512 rows here, 2,048 in the quickstart) is too short a census: the
    quickstart's summary said 26.6 % dead where `dictlearn evaluate` counts 0.2 % over 65,536 rows."""
    import torch

    monkeypatch.chdir(tmp_path)
    args = _fit_args(tmp_path, _synth(tmp_path / "acts.h5"), "--trainer.max_steps", "30", "--model.d_sae", "256")
    assert main(args) == 0
    err = capsys.readouterr().err
    found = re.search(r"dead (\d+\.\d) % of latents \(none fired in the last ([\d,]+) training tokens\)", err)
    assert found, err
    window = int(found.group(2).replace(",", ""))
    assert window == 30 * 256 // 3  # a third of the run's 7,680 tokens (dead_window_for)
    checkpoint = torch.load(next(tmp_path.rglob("last.ckpt")), map_location="cpu", weights_only=False)
    since = checkpoint["state_dict"]["activity.model.tokens_since_fired"]  # the training's dead-latent counters
    assert float(found.group(1)) == round(100 * (since >= window).double().mean().item(), 1)
    assert since.max() <= 30 * 256 and (since < window).any()


def test_the_quickstart_writes_under_runs_and_refuses_a_folder_it_did_not_write(tmp_path):
    script = Path(__file__).resolve().parents[1] / "examples" / "quickstart.sh"
    text = script.read_text()
    assert "out=${1:-runs/quickstart}" in text
    user = tmp_path / "mine"
    (user / "sweep").mkdir(parents=True)
    (user / "sweep" / "notes.txt").write_text("the user's")
    done = subprocess.run(["bash", str(script), str(user)], capture_output=True, text=True,
                          env={**os.environ, "PATH": "/usr/bin:/bin"})  # no dictlearn: nothing may run
    assert done.returncode == 2, done.stderr
    assert "already holds files that a quickstart did not write" in done.stderr
    assert (user / "sweep" / "notes.txt").read_text() == "the user's"
    assert sorted(p.name for p in user.rglob("*")) == ["notes.txt", "sweep"]
