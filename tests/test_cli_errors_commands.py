"""Bad inputs to every command but fit/validate/test: exit 2, one `dictlearn: error:` line naming
the culprit, no traceback, and no path under `tmp_path` created or deleted (tests/test_cli_errors.py
does the same for fit). Outputs a person named never cost them a file: an export over a folder of
theirs is refused, not swapped in (dictlearn.io.check_replaceable).

Each case runs `dictlearn.cli.main` in-process with the working directory in `tmp_path`, whose
only contents are a folder holding a person's file, an empty folder and a plain file.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from dictlearn.cli import main
from dictlearn.data import write_synth_file
from dictlearn.dictionaries import TopKSAE
from dictlearn.errors import ConfigError, DataError
from dictlearn.export import export

D, ROWS = 16, 4096
UNWRITABLE = "/proc/dictlearn-no-such-folder"  # no file can be created under /proc, root or not


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """Inputs outside tmp_path: a synthetic file, a one-row file, an export and a checkpoint."""
    folder = tmp_path_factory.mktemp("inputs")
    write_synth_file(folder / "acts.h5", n_rows=ROWS, d=D, n_features=32, mean_active=3.0, seed=0)
    with h5py.File(folder / "one.h5", "w") as f:
        f.create_dataset("acts", data=np.ones((1, D), np.float32))
    torch.manual_seed(0)
    model = TopKSAE(d_in=D, d_sae=32, k=4)
    export(model, folder / "export", {"path": str(folder / "acts.h5"), "input_key": "acts"})
    torch.save({"dictlearn_class": "dictlearn.dictionaries.topk.TopKSAE", "hyper_parameters": dict(model.hparams),
                "state_dict": model.state_dict(), "dictlearn_data": {"input_key": "acts"}}, folder / "model.ckpt")
    return {"data": str(folder / "acts.h5"), "one": str(folder / "one.h5"), "export": str(folder / "export"),
            "ckpt": str(folder / "model.ckpt")}


@pytest.fixture
def place(tmp_path) -> Path:
    """tmp_path with a person's folder (a file inside), an empty folder and a plain file."""
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    (tmp_path / "empty").mkdir()
    (tmp_path / "plain.txt").write_text("a file")
    return tmp_path


def _all_paths(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def run_expecting_error(root: Path, capsys, monkeypatch, args: list) -> str:
    """Run the CLI in `root`; assert exit 2, one error line, no traceback, no path created or
    deleted, and the person's file intact. -> the error line."""
    monkeypatch.chdir(root)
    before = _all_paths(root)
    capsys.readouterr()
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("dictlearn: error:")]
    assert code == 2, err
    assert len(errors) == 1, err
    assert "Traceback" not in err, err
    assert _all_paths(root) == before, f"created {_all_paths(root) - before}, deleted {before - _all_paths(root)}"
    if (root / "mine").exists():
        assert (root / "mine" / "notes.txt").read_text() == "keep me"
    return errors[0]


# ----------------------------------------------------------------------------- the matrix
# (id, arguments built from the input files f and the folder t, text the error line must hold)
TINY_COMPARE = ["--input-key", "acts", "--architectures", "topk", "--l0", "4", "--d-sae", "32", "--seeds", "0",
                "--train-tokens", "1024", "--batch-size", "256", "--no-downstream", "--no-interpret", "--quiet"]
CASES = [
    # export CKPT OUT
    ("export-over-a-persons-folder", lambda f, t: ["export", f["ckpt"], t / "mine"], "notes.txt"),
    ("export-over-a-file", lambda f, t: ["export", f["ckpt"], t / "plain.txt"], "a file is in the way"),
    ("export-empty-out", lambda f, t: ["export", f["ckpt"], ""], "empty"),
    ("export-out-is-cwd", lambda f, t: ["export", f["ckpt"], "."], "current folder"),
    ("export-ckpt-is-a-folder", lambda f, t: ["export", f["export"], t / "out"], "not a checkpoint file"),
    ("export-missing-ckpt", lambda f, t: ["export", t / "none.ckpt", t / "out"], "no such"),
    ("export-ckpt-not-torch", lambda f, t: ["export", f["data"], t / "out"], "cannot read checkpoint"),
    ("export-unwritable", lambda f, t: ["export", f["ckpt"], f"{UNWRITABLE}/out"], "cannot write"),
    ("export-new-parents-on-failure", lambda f, t: ["export", t / "none.ckpt", t / "a" / "b" / "out"], "no such"),
    # synth
    ("synth-out-folder", lambda f, t: ["synth", "--out", t / "mine"], "is a folder"),
    ("synth-out-empty-folder", lambda f, t: ["synth", "--out", t / "empty"], "is a folder"),
    ("synth-out-empty", lambda f, t: ["synth", "--out", ""], "empty"),
    ("synth-out-unwritable", lambda f, t: ["synth", "--out", f"{UNWRITABLE}/x.h5"], "cannot write"),
    ("synth-out-under-a-file", lambda f, t: ["synth", "--out", t / "plain.txt" / "x.h5"], "is a file"),
    ("synth-rows-0", lambda f, t: ["synth", "--out", t / "new" / "x.h5", "--rows", "0"], "--rows must be > 0"),
    ("synth-rows-negative", lambda f, t: ["synth", "--out", "x.h5", "--rows", "-5"], "--rows"),
    ("synth-rows-float", lambda f, t: ["synth", "--out", "x.h5", "--rows", "1.5"], "--rows"),
    ("synth-d-0", lambda f, t: ["synth", "--out", "x.h5", "--d", "0"], "--d must be > 0"),
    ("synth-features-0", lambda f, t: ["synth", "--out", "x.h5", "--features", "0"], "--features must be > 0"),
    ("synth-mean-active-0", lambda f, t: ["synth", "--out", "x.h5", "--mean-active", "0"], "--mean-active"),
    ("synth-mean-active-too-many", lambda f, t: ["synth", "--out", "x.h5", "--mean-active", "1000"], "--features=256"),
    ("synth-mean-active-nan", lambda f, t: ["synth", "--out", "x.h5", "--mean-active", "nan"], "finite"),
    ("synth-zipf-negative", lambda f, t: ["synth", "--out", "x.h5", "--zipf", "-1"], "--zipf"),
    ("synth-zipf-inf", lambda f, t: ["synth", "--out", "x.h5", "--zipf", "inf"], "finite"),
    ("synth-magnitude-mean-0", lambda f, t: ["synth", "--out", "x.h5", "--magnitude-mean", "0"], "--magnitude-mean"),
    ("synth-magnitude-mean-nan", lambda f, t: ["synth", "--out", "x.h5", "--magnitude-mean", "nan"], "finite"),
    ("synth-noise-negative", lambda f, t: ["synth", "--out", "x.h5", "--noise", "-1"], "--noise"),
    ("synth-noise-nan", lambda f, t: ["synth", "--out", "x.h5", "--noise", "nan"], "finite"),
    ("synth-correlation-2", lambda f, t: ["synth", "--out", "x.h5", "--correlation", "2"], "--correlation"),
    ("synth-hierarchy-negative", lambda f, t: ["synth", "--out", "x.h5", "--hierarchy", "-1"], "--hierarchy"),
    ("synth-hierarchy-too-big", lambda f, t: ["synth", "--out", "x.h5", "--hierarchy", "100"], "--features is 256"),
    ("synth-d-out-negative", lambda f, t: ["synth", "--out", "x.h5", "--d-out", "-1"], "--d-out"),
    ("synth-dense-linear-alone", lambda f, t: ["synth", "--out", "x.h5", "--dense-linear", "1"], "--d-out > 0"),
    ("synth-dense-linear-nan", lambda f, t: ["synth", "--out", "x.h5", "--d-out", "4", "--dense-linear", "nan"],
     "finite"),
    ("synth-seed-negative", lambda f, t: ["synth", "--out", "x.h5", "--seed", "-1"], "--seed"),
    ("harvest-windows-zero", lambda f, t: ["harvest", "--out", "x.h5", "--windows-per-document", "0"],
     "--windows-per-document"),
    # harvest (all refused before the model loads, but the last)
    ("harvest-out-unwritable", lambda f, t: ["harvest", "--out", f"{UNWRITABLE}/a.h5"], "cannot write"),
    ("harvest-out-folder", lambda f, t: ["harvest", "--out", t / "mine"], "is a folder"),
    ("harvest-out-empty", lambda f, t: ["harvest", "--out", ""], "empty"),
    ("harvest-tokens-0", lambda f, t: ["harvest", "--out", "a.h5", "--tokens", "0"], "--tokens"),
    ("harvest-batch-size-0", lambda f, t: ["harvest", "--out", "a.h5", "--batch-size", "0"], "--batch-size"),
    ("harvest-device-absent", lambda f, t: ["harvest", "--out", "a.h5", "--device", "cuda:99"], "--device cuda:99"),
    ("harvest-device-unknown", lambda f, t: ["harvest", "--out", "a.h5", "--device", "gpu0"], "not a torch device"),
    ("harvest-layer-and-hooks", lambda f, t: ["harvest", "--out", "a.h5", "--hooks", "x", "--layer", "1"], "--layer"),
    ("harvest-corpus-missing", lambda f, t: ["harvest", "--out", "a.h5", "--corpus", t / "none.txt"], "none.txt"),
    # evaluate
    ("evaluate-one-row", lambda f, t: ["evaluate", f["export"], "--data", f["one"]], "at least 2"),
    ("evaluate-val-rows-past-the-file", lambda f, t: ["evaluate", f["export"], "--data", f["data"], "--val-rows",
                                                      "100000"], f"at most {ROWS - 512:,} rows fit"),
    ("evaluate-val-rows-the-whole-file", lambda f, t: ["evaluate", f["export"], "--data", f["data"], "--val-rows",
                                                       str(ROWS)], "--val-rows 4096"),
    ("evaluate-block-past-the-file", lambda f, t: ["evaluate", f["export"], "--data", f["data"], "--block-size",
                                                   "100000"], "--block-size 100000"),
    ("evaluate-val-rows-0", lambda f, t: ["evaluate", f["export"], "--data", f["data"], "--val-rows", "0"],
     "--val-rows 0"),
    ("evaluate-val-rows-negative", lambda f, t: ["evaluate", f["export"], "--data", f["data"], "--val-rows", "-1"],
     "--val-rows"),
    ("evaluate-density-rows-negative", lambda f, t: ["evaluate", f["export"], "--data", f["data"], "--density-rows",
                                                     "-1"], "--density-rows"),
    ("evaluate-out-folder", lambda f, t: ["evaluate", f["export"], "--data", f["data"], "--out", t / "mine"],
     "is a folder"),
    ("evaluate-out-empty", lambda f, t: ["evaluate", f["export"], "--data", f["data"], "--out", ""], "empty"),
    ("evaluate-out-unwritable", lambda f, t: ["evaluate", f["export"], "--data", f["data"], "--out",
                                              f"{UNWRITABLE}/r.jsonl"], "cannot write"),
    ("evaluate-device-absent", lambda f, t: ["evaluate", f["export"], "--data", f["data"], "--device", "cuda:99"],
     "cuda:99"),
    ("evaluate-device-unknown", lambda f, t: ["evaluate", f["export"], "--data", f["data"], "--device", "gpu0"],
     "not a torch device"),
    ("evaluate-export-empty", lambda f, t: ["evaluate", "", "--data", f["data"]], "empty"),
    ("evaluate-data-empty", lambda f, t: ["evaluate", f["export"], "--data", ""], "empty"),
    ("evaluate-export-missing", lambda f, t: ["evaluate", t / "none", "--data", f["data"]], "no such"),
    ("evaluate-export-a-persons-folder", lambda f, t: ["evaluate", t / "mine", "--data", f["data"]], "cfg.json"),
    ("evaluate-data-missing", lambda f, t: ["evaluate", f["export"], "--data", t / "none.h5"], "no such file"),
    ("evaluate-key-missing", lambda f, t: ["evaluate", f["export"], "--data", f["data"], "--input-key", "nope"],
     "'nope' not found"),
    # inspect
    ("inspect-out-folder", lambda f, t: ["inspect", f["export"], "--data", f["data"], "--out", t / "mine"],
     "is a folder"),
    ("inspect-out-empty", lambda f, t: ["inspect", f["export"], "--data", f["data"], "--out", ""], "empty"),
    ("inspect-out-unwritable", lambda f, t: ["inspect", f["export"], "--data", f["data"], "--out",
                                             f"{UNWRITABLE}/a.html"], "cannot write"),
    ("inspect-device-absent", lambda f, t: ["inspect", f["export"], "--data", f["data"], "--device", "cuda:99"],
     "cuda:99"),
    ("inspect-device-unknown", lambda f, t: ["inspect", f["export"], "--data", f["data"], "--device", "gpu0"],
     "not a torch device"),
    ("inspect-cards-0", lambda f, t: ["inspect", f["export"], "--data", f["data"], "--cards", "0"], "--cards"),
    ("inspect-rows-0", lambda f, t: ["inspect", f["export"], "--data", f["data"], "--rows", "0"], "--rows"),
    ("inspect-features-text", lambda f, t: ["inspect", f["export"], "--data", f["data"], "--features", "a"],
     "--features"),
    ("inspect-features-out-of-range", lambda f, t: ["inspect", f["export"], "--data", f["data"], "--features", "99"],
     "latents 0..31"),
    ("inspect-data-missing", lambda f, t: ["inspect", f["export"], "--data", t / "none.h5"], "no such file"),
    ("inspect-export-missing", lambda f, t: ["inspect", t / "none", "--data", f["data"]], "no such"),
    # steer
    ("steer-empty-prompt", lambda f, t: ["steer", f["export"], "--feature", "0", "--scale", "5", "--prompt", ""],
     "--prompt is empty"),
    ("steer-nan-scale", lambda f, t: ["steer", f["export"], "--feature", "0", "--scale", "nan", "--prompt", "def "],
     "--scale"),
    ("steer-inf-scale", lambda f, t: ["steer", f["export"], "--feature", "0", "--scale", "inf", "--prompt", "def "],
     "--scale"),
    ("steer-device-absent", lambda f, t: ["steer", f["export"], "--feature", "0", "--scale", "5", "--prompt", "d",
                                          "--device", "cuda:99"], "cuda:99"),
    ("steer-feature-out-of-range", lambda f, t: ["steer", f["export"], "--feature", "99", "--scale", "5", "--prompt",
                                                 "d"], "latents 0..31"),
    ("steer-tokens-0", lambda f, t: ["steer", f["export"], "--feature", "0", "--scale", "5", "--prompt", "d",
                                     "--tokens", "0"], "--tokens"),
    ("steer-no-model", lambda f, t: ["steer", f["export"], "--feature", "0", "--scale", "5", "--prompt", "d"],
     "--model"),
    ("steer-export-missing", lambda f, t: ["steer", t / "none", "--feature", "0", "--scale", "5", "--prompt", "d"],
     "no such"),
    # compare (tiny settings; every case stops before compare.yaml is written)
    ("compare-device-absent", lambda f, t: ["compare", "--out", t / "run", "--data", f["data"], *TINY_COMPARE,
                                            "--device", "cuda:99"], "cuda:99"),
    ("compare-device-unknown", lambda f, t: ["compare", "--out", t / "run", "--data", f["data"], *TINY_COMPARE,
                                             "--device", "gpu0"], "not a torch device"),
    ("compare-out-empty", lambda f, t: ["compare", "--out", "", "--data", f["data"], *TINY_COMPARE], "empty"),
    ("compare-out-a-persons-folder", lambda f, t: ["compare", "--out", t / "mine", "--data", f["data"],
                                                   *TINY_COMPARE], "not empty"),
    ("compare-out-a-file", lambda f, t: ["compare", "--out", t / "plain.txt", "--data", f["data"], *TINY_COMPARE],
     "is a file"),
    ("compare-config-missing", lambda f, t: ["compare", "--out", t / "run", "--config", t / "none.yaml"],
     "none.yaml"),
    ("compare-config-a-folder", lambda f, t: ["compare", "--out", t / "run", "--config", t / "mine"], "--config"),
]


@pytest.mark.parametrize("build, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_touches_nothing(files, place, capsys, monkeypatch, build, expected):
    line = run_expecting_error(place, capsys, monkeypatch, build(files, place))
    assert expected in line, line


# ----------------------------------------------------------------------------- outputs
def test_export_replaces_a_previous_export_and_its_recorded_statistics(files, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["export", files["ckpt"], str(out)]) == 0
    (out / "latent_statistics.safetensors").write_bytes(b"stale")  # what inspect writes beside the weights
    assert main(["export", files["ckpt"], str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no .old or .tmp left beside it


def test_export_refuses_a_previous_export_holding_a_persons_file(files, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    assert main(["export", files["ckpt"], str(out)]) == 0
    (out / "notes.txt").write_text("mine")
    line = run_expecting_error(tmp_path, capsys, monkeypatch, ["export", files["ckpt"], out])
    assert "notes.txt" in line and (out / "notes.txt").read_text() == "mine"


def test_compare_device_check_runs_before_compare_yaml_through_the_library(files, tmp_path):
    from dictlearn.compare import CompareConfig, compare

    config = CompareConfig(out=str(tmp_path / "run"), data=files["data"], input_key="acts", device="cuda:99")
    with pytest.raises(ConfigError, match="cuda:99"):
        compare(config)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- library-level messages
def test_synth_library_errors_name_its_own_arguments(tmp_path):
    """The CLI names --rows; the function names n_rows (its caller passed n_rows)."""
    with pytest.raises(ConfigError, match=r"^n_rows must be > 0 \(got 0\)$"):
        write_synth_file(tmp_path / "x.h5", n_rows=0)
    with pytest.raises(ConfigError, match="^noise_std must be >= 0"):
        write_synth_file(tmp_path / "x.h5", n_rows=10, noise_std=float("nan"))
    assert list(tmp_path.iterdir()) == []


def test_steer_refuses_nan_scale_and_empty_prompt_before_loading(tmp_path):
    from dictlearn.interpret.steer import steer_export

    # the export does not exist: the request is checked first, so the error is about the request
    with pytest.raises(ConfigError, match="--scale nan"):
        steer_export(tmp_path / "none", 0, float("nan"), "def ")
    with pytest.raises(ConfigError, match="--prompt is empty"):
        steer_export(tmp_path / "none", 0, 5.0, "")


def test_evaluate_val_rows_past_the_held_out_documents(tmp_path):
    """A file with held-out documents: --val-rows may take at most the rows after heldout_start."""
    from dictlearn.data.split import HeldOutSplit
    from dictlearn.evaluate import check_split

    check_split("f.h5", HeldOutSplit(1000, val_rows=200, heldout_start=800))  # fits exactly
    with pytest.raises(DataError, match=r"--val-rows 201: f.h5 holds out 200 rows .*at most 200"):
        check_split("f.h5", HeldOutSplit(1000, val_rows=201, heldout_start=800))
    with pytest.raises(DataError, match="1 held-out row; .*at least 2"):
        check_split("f.h5", HeldOutSplit(1000, val_rows=1, heldout_start=800))


# ----------------------------------------------------------------------------- --help
HELP_COMMANDS = ("export", "synth", "harvest", "evaluate", "compare", "inspect", "steer")


def test_help_imports_no_training_stack():
    """`dictlearn COMMAND --help` answers without torch, Lightning or transformers (compare's took
    19 s on a loaded machine before)."""
    code = f"""
import sys
from dictlearn.cli import main
heavy = {{}}
for command in {HELP_COMMANDS!r}:
    try:
        main([command, "--help"])
    except SystemExit:
        pass
    heavy[command] = sorted(m for m in ("torch", "lightning", "transformers", "h5py") if m in sys.modules)
    for name in [m for m in sys.modules if m.startswith(("torch", "lightning", "transformers", "h5py", "dictlearn."))
                 and not m.startswith(("dictlearn.cli", "dictlearn.errors"))]:
        del sys.modules[name]
print(heavy)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    heavy = eval(result.stdout.strip().splitlines()[-1])  # noqa: S307  (our own printed dict)
    assert {command: mods for command, mods in heavy.items() if mods} == {}, heavy


def test_help_defaults_are_the_librarys():
    from dictlearn.cli import evaluate as cli_evaluate
    from dictlearn.cli import harvest as cli_harvest
    from dictlearn.cli import inspect as cli_inspect
    from dictlearn.cli import steer as cli_steer
    from dictlearn.evaluate import DEFAULT_BATCH_SIZE, DEFAULT_CONTEXTS, DENSITY_ROWS
    from dictlearn.harvest import activations
    from dictlearn.interpret import dashboard, steer
    from dictlearn.models.corpus import SPLITS

    assert (cli_harvest.DEFAULT_TOKENS, cli_harvest.DEFAULT_BATCH_SIZE) == (activations.DEFAULT_TOKENS,
                                                                            activations.DEFAULT_BATCH_SIZE)
    assert cli_harvest.DTYPES == tuple(activations.DTYPES) and cli_harvest.SPLITS == SPLITS
    assert cli_harvest.WINDOWS_PER_DOCUMENT == activations.WINDOWS_PER_DOCUMENT
    assert (cli_evaluate.DEFAULT_CONTEXTS, cli_evaluate.DEFAULT_BATCH_SIZE, cli_evaluate.DENSITY_ROWS) == (
        DEFAULT_CONTEXTS, DEFAULT_BATCH_SIZE, DENSITY_ROWS)
    options = dashboard.InspectOptions()
    assert (cli_inspect.DEFAULT_ROWS, cli_inspect.CARDS, cli_inspect.EXTREMES) == (
        dashboard.DEFAULT_ROWS, options.cards, options.extremes)
    assert cli_steer.DEFAULT_TOKENS == steer.DEFAULT_TOKENS
