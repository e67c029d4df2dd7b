"""Bad inputs to `dictlearn fit|validate|test`: exit code 2, one `dictlearn: error:` line naming
the culprit, no traceback, and nothing left on disk (docs/conventions.md#reliability).

Each test writes its input file first, snapshots every path under `tmp_path`, runs the CLI
in-process with the working directory and `--trainer.default_root_dir` inside `tmp_path` (the
root does not exist yet, so the run must also remove the folders it made), then compares.
The progress display is on and stderr claims to be a terminal, as a user at a shell has it: a
broken progress callback once turned every error below into a TypeError traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from dictlearn.cli import RECIPES_DIR, main
from dictlearn.data import write_synth_file

ROWS, D = 20_000, 16
BLOCK = 512  # the datamodule's default block size


def _all_paths(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _write_h5(path: Path, array: np.ndarray, key: str = "acts") -> Path:
    with h5py.File(path, "w") as f:
        f.create_dataset(key, data=array)
    return path


def _synth(path: Path) -> Path:
    write_synth_file(path, n_rows=ROWS, d=D, n_features=32, mean_active=3.0, seed=0)
    return path


def _fit_args(tmp_path: Path, data: Path, *extra: str, recipe: str = "topk.yaml", key: str = "acts") -> list[str]:
    args = [
        "fit", "--config", str(RECIPES_DIR / recipe), "--data.path", str(data), "--data.input_key", key,
        "--trainer.max_steps", "5", "--trainer.default_root_dir", str(tmp_path / "runs" / "one"),
        "--trainer.log_every_n_steps", "1",
        "--model.d_sae", "64", "--data.batch_size", "256",
    ]  # fmt: skip
    if recipe == "topk.yaml":
        args += ["--model.k", "4"]
    return args + list(extra)


def _run_expecting_error(tmp_path: Path, capsys, monkeypatch, args: list[str]) -> str:
    """Run the CLI; assert exit 2, one error line, no traceback, no new path. -> the message."""
    monkeypatch.chdir(tmp_path)  # anything written to the working directory is caught too
    before = _all_paths(tmp_path)
    capsys.readouterr()
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)  # draw the tqdm bar
    code = main(args)
    err = capsys.readouterr().err
    error_lines = [line for line in err.splitlines() if line.startswith("dictlearn: error:")]
    assert code == 2, err
    assert len(error_lines) == 1, err
    assert "Traceback" not in err, err
    assert _all_paths(tmp_path) == before, f"left behind: {sorted(_all_paths(tmp_path) - before)}"
    return error_lines[0]


def test_d_in_disagreeing_with_file(tmp_path, capsys, monkeypatch):
    data = _synth(tmp_path / "acts.h5")
    line = _run_expecting_error(tmp_path, capsys, monkeypatch, _fit_args(tmp_path, data, "--model.d_in", "7"))
    assert "--model.d_in" in line and "7" in line and f"width {D}" in line and "acts.h5" in line


@pytest.mark.parametrize("normalize", ["mean_norm_sqrt_d", "none"])
def test_nan_rows(tmp_path, capsys, monkeypatch, normalize):
    # One NaN row in every training block, so the first batch of any block order holds one (the
    # validation tail, the last block, stays clean).
    x = np.random.default_rng(0).standard_normal((ROWS, D)).astype(np.float32)
    x[7 : ROWS - BLOCK : BLOCK] = np.nan
    data = _write_h5(tmp_path / "nan_acts.h5", x)
    args = _fit_args(tmp_path, data, "--data.normalize", normalize)
    line = _run_expecting_error(tmp_path, capsys, monkeypatch, args).lower()
    # Caught on the sampled rows (data scale, b_dec init) before any step; the per-batch check
    # that guards later steps is tested in test_dictionaries.py.
    assert "nan" in line and "nan_acts.h5" in line and "'acts'" in line


def test_empty_dataset(tmp_path, capsys, monkeypatch):
    data = _write_h5(tmp_path / "empty.h5", np.zeros((0, D), np.float32))
    line = _run_expecting_error(tmp_path, capsys, monkeypatch, _fit_args(tmp_path, data))
    assert "empty.h5" in line and "'acts'" in line and "(0, 16)" in line


def test_fewer_rows_than_one_batch(tmp_path, capsys, monkeypatch):
    data = _write_h5(tmp_path / "few.h5", np.ones((100, D), np.float32))
    line = _run_expecting_error(tmp_path, capsys, monkeypatch, _fit_args(tmp_path, data))
    assert "few.h5" in line and "100 rows" in line and "--data.batch_size 256" in line


def test_truncated_file(tmp_path, capsys, monkeypatch):
    data = _synth(tmp_path / "cut.h5")
    raw = data.read_bytes()
    data.write_bytes(raw[: len(raw) // 2])
    line = _run_expecting_error(tmp_path, capsys, monkeypatch, _fit_args(tmp_path, data))
    assert "cut.h5" in line and "truncated" in line


def test_missing_key_lists_available_keys(tmp_path, capsys, monkeypatch):
    data = _synth(tmp_path / "acts.h5")
    line = _run_expecting_error(tmp_path, capsys, monkeypatch, _fit_args(tmp_path, data, key="resid"))
    assert "acts.h5" in line and "'resid'" in line and "'acts'" in line and "'features'" in line


def test_integer_data(tmp_path, capsys, monkeypatch):
    data = _write_h5(tmp_path / "ints.h5", np.arange(ROWS * D, dtype=np.int32).reshape(ROWS, D))
    line = _run_expecting_error(tmp_path, capsys, monkeypatch, _fit_args(tmp_path, data))
    assert "ints.h5" in line and "'acts'" in line and "int32" in line


@pytest.mark.parametrize(
    ("recipe", "flag", "value"),
    [
        ("topk.yaml", "--model.k", "65"),  # > d_sae = 64
        ("topk.yaml", "--model.k", "0"),
        ("topk.yaml", "--model.auxk_alpha", "-0.5"),
        ("relu_l1.yaml", "--model.l1_coefficient", "-1.0"),
    ],
)
def test_model_argument_out_of_range(tmp_path, capsys, monkeypatch, recipe, flag, value):
    data = _synth(tmp_path / "acts.h5")
    args = _fit_args(tmp_path, data, flag, value, recipe=recipe)
    line = _run_expecting_error(tmp_path, capsys, monkeypatch, args)
    assert line.startswith(f"dictlearn: error: {flag} ") and value in line
    assert "Union" not in line and "Namespace" not in line  # not jsonargparse's wrapper


def test_unknown_recipe(tmp_path, capsys, monkeypatch):
    data = _synth(tmp_path / "acts.h5")
    args = _fit_args(tmp_path, data)
    args[args.index("--config") + 1] = "recipes/nope.yaml"
    line = _run_expecting_error(tmp_path, capsys, monkeypatch, args)
    assert "--config recipes/nope.yaml" in line and "topk.yaml" in line and "relu_l1.yaml" in line


# ------------------------------------------------------------------ a matrix of bad command lines
# Each row once ended in a traceback, exit 0 with nothing trained, or a line that named neither
# the flag nor what it wants ("Does not validate against any of the Union subtypes").
BAD_FLAGS = [
    (["--trainer.max_steps", "abc"], "--trainer.max_steps abc: expected a whole number"),
    (["--trainer.max_steps", "1.5"], "--trainer.max_steps 1.5: expected a whole number"),
    (["--trainer.max_steps", "-5"], "--trainer.max_steps -5 with --trainer.max_epochs -1 would never stop"),
    (["--trainer.max_epochs", "abc"], "--trainer.max_epochs abc: expected a whole number"),
    (["--model.d_sae", "abc"], "--model.d_sae abc: expected a whole number"),
    (["--model.k", "2.5"], "--model.k 2.5: expected a whole number"),
    (["--training.lr", "abc"], "--training.lr abc: expected a number"),
    (["--training.lr", "0"], "--training.lr must be > 0, got 0.0"),
    (["--training.sparse_paths", "never"], "unknown flag --training.sparse_paths; did you mean --training.sparse_path?"),
    (["--model.lr", "1e-3"], "--model.lr is a training setting now: use --training.lr"),
    (["--model.init_args.dead_window_tokens", "100"],
     "--model.init_args.dead_window_tokens is a training setting now: use --training.dead_window_tokens"),
    (["--seed_everything", "abc"], "--seed_everything abc: expected true or false or a whole number"),
    (["--data.batch_size", "1.5"], "--data.batch_size 1.5: expected a whole number"),
    (["--trainer.precision", "abc"], "--trainer.precision abc: expected"),
    (["--trainer.accelerator", "nope"], "--trainer: You selected an invalid accelerator name: `accelerator='nope'`"),
    (["--trainer.devices", "0"], "--trainer: `Trainer(devices='0')` value is not a valid input"),
    (["--trainer.max_time", "abc"], "--trainer: `Timer(duration='abc')` is not a valid duration"),
    (["--trainer.val_check_interval", "0"], "--trainer.val_check_interval 0: validate every N steps"),
    (["--trainer.val_check_interval", "1.5"], "--trainer.val_check_interval 1.5: validate every N steps"),
    (["--trainer.accumulate_grad_batches", "0"], "--trainer.accumulate_grad_batches 0: expected a whole number >= 1"),
    (["--trainer.log_every_n_steps", "-1"], "--trainer.log_every_n_steps -1: expected a whole number >= 1"),
    (["--trainer.gradient_clip_val", "-1"], "--trainer.gradient_clip_val -1: expected a number >= 0"),
    (["--trainer.limit_train_batches", "0"], "--trainer.limit_train_batches 0: 0 trains nothing"),
    (["--trainer.check_val_every_n_epoch", "0"], "--trainer.check_val_every_n_epoch 0: expected a whole number >= 1"),
    # refused by Lightning once the run starts (76 training batches < the base recipe's 500)
    (["--trainer.check_val_every_n_epoch", "1"], "--trainer: `val_check_interval` (500) must be less than or equal"),
]


@pytest.mark.parametrize(("flags", "expected"), BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_flag_values_name_the_flag_and_what_it_wants(tmp_path, capsys, monkeypatch, flags, expected):
    args = _fit_args(tmp_path, _synth(tmp_path / "acts.h5"), *flags)
    line = _run_expecting_error(tmp_path, capsys, monkeypatch, args)
    assert line.startswith(f"dictlearn: error: {expected}"), line
    assert "Union" not in line and "Namespace" not in line


KNOWN = "known: BatchTopKSAE, CrossLayerJumpReLU, CrossLayerTopK, GatedSAE, JumpReLUSAE, MatryoshkaBatchTopKSAE, ReLUL1SAE, TopKSAE"


@pytest.mark.parametrize(("value", "expected"), [
    ("NoSuch", f"--model NoSuch: not a dictionary class; {KNOWN}"),
    ("dictlearn.Nope", f"--model dictlearn.Nope: not a dictionary class; {KNOWN}"),
    ("torch.nn.Linear", f"--model torch.nn.Linear: not a dictionary class; {KNOWN}"),
    ("nosuchpackage.SAE", "--model nosuchpackage.SAE: cannot import nosuchpackage"),
])  # fmt: skip
def test_an_unknown_model_class_is_named_with_the_known_ones(tmp_path, capsys, monkeypatch, value, expected):
    args = _fit_args(tmp_path, _synth(tmp_path / "acts.h5"), "--model", value)
    assert _run_expecting_error(tmp_path, capsys, monkeypatch, args).startswith(f"dictlearn: error: {expected}")


def test_an_unknown_class_path_in_a_config_is_named(tmp_path, capsys, monkeypatch):
    config = tmp_path / "mine.yaml"
    config.write_text("model:\n  class_path: dictlearn.TopKSAEE\n  init_args: {d_sae: 64, k: 4}\n")
    args = _fit_args(tmp_path, _synth(tmp_path / "acts.h5"), "--config", str(config))
    line = _run_expecting_error(tmp_path, capsys, monkeypatch, args)
    assert line.startswith(f"dictlearn: error: model.class_path dictlearn.TopKSAEE: not a dictionary class; {KNOWN}")


def test_a_malformed_config_names_the_file_and_line(tmp_path, capsys, monkeypatch):
    config = tmp_path / "mine.yaml"
    config.write_text("model:\n  class_path: dictlearn.TopKSAE\n  init_args: {d_sae: 64\ntrainer:\n  max_steps: 5\n")
    args = _fit_args(tmp_path, _synth(tmp_path / "acts.h5"), "--config", str(config))
    line = _run_expecting_error(tmp_path, capsys, monkeypatch, args)
    # PyYAML places the problem at the ":" of the key after the unclosed mapping (line 4)
    assert line.startswith(f"dictlearn: error: --config {config}: not valid YAML at line 4, column 8"), line


def test_a_config_that_is_not_a_mapping_is_named(tmp_path, capsys, monkeypatch):
    config = tmp_path / "list.yaml"
    config.write_text("- model\n- data\n")
    args = _fit_args(tmp_path, _synth(tmp_path / "acts.h5"), "--config", str(config))
    line = _run_expecting_error(tmp_path, capsys, monkeypatch, args)
    assert line == f"dictlearn: error: --config {config}: expected sections (model:, data:, trainer:), found a list at the top level"


def test_folders_where_files_belong(tmp_path, capsys, monkeypatch):
    data = _synth(tmp_path / "acts.h5")
    (tmp_path / "folder").mkdir()
    for flag in ("--data.path", "--ckpt_path"):
        args = _fit_args(tmp_path, data, flag, str(tmp_path / "folder"))
        line = _run_expecting_error(tmp_path, capsys, monkeypatch, args)
        assert line.startswith(f"dictlearn: error: {flag} {tmp_path / 'folder'}: a folder"), line


@pytest.mark.parametrize("command", ["validate", "test"])
def test_validate_and_test_need_a_checkpoint(tmp_path, capsys, monkeypatch, command):
    """They measured an untrained dictionary, exit 0, and left a run folder."""
    args = [command, *_fit_args(tmp_path, _synth(tmp_path / "acts.h5"))[1:]]
    line = _run_expecting_error(tmp_path, capsys, monkeypatch, args)
    assert line.startswith(f"dictlearn: error: dictlearn {command} needs --ckpt_path CKPT")


@pytest.fixture
def trained(tmp_path, capsys, monkeypatch) -> tuple[Path, Path]:
    """A 5-step fit on the 16-wide file -> (data, its last.ckpt)."""
    data = _synth(tmp_path / "acts.h5")
    monkeypatch.chdir(tmp_path)
    assert main(_fit_args(tmp_path, data)) == 0
    capsys.readouterr()
    return data, next((tmp_path / "runs").rglob("last.ckpt"))


def test_resuming_on_data_of_another_width_is_one_line(trained, tmp_path, capsys, monkeypatch):
    data, ckpt = trained
    wide = tmp_path / "wide.h5"
    write_synth_file(wide, n_rows=ROWS, d=24, n_features=32, mean_active=3.0, seed=0)
    for command in ("fit", "validate"):
        args = [command, *_fit_args(tmp_path, wide, "--ckpt_path", str(ckpt))[1:]]
        line = _run_expecting_error(tmp_path, capsys, monkeypatch, args)
        assert "d_in=16" in line and "d_in=24" in line, line
    args = ["validate", *_fit_args(tmp_path, data, "--ckpt_path", str(ckpt))[1:]]
    assert main(args) == 0  # the same checkpoint on its own data validates


def test_a_checkpoint_that_is_not_one(trained, tmp_path, capsys, monkeypatch):
    data, ckpt = trained
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    (tmp_path / "notes.ckpt").write_text("not a checkpoint")
    for bad in (cut, tmp_path / "notes.ckpt"):
        for command in ("fit", "validate"):
            args = [command, *_fit_args(tmp_path, data, "--ckpt_path", str(bad))[1:]]
            line = _run_expecting_error(tmp_path, capsys, monkeypatch, args)
            assert line.startswith(f"dictlearn: error: --ckpt_path {bad}: not a checkpoint written by dictlearn fit")


# ------------------------------------------------------------------ a dictionary too large for memory
def test_training_bytes_is_a_lower_bound_for_every_mechanism():
    """16 bytes (value, gradient, Adam's two moments) per parameter the formula counts must not
    exceed 16 bytes per parameter the constructed dictionary has, for every mechanism and mapping."""
    from dictlearn.cli.fit_checks import known_dictionaries, training_bytes
    import dictlearn

    for name in known_dictionaries():
        cls = getattr(dictlearn, name)
        for extra in ({}, {"transcoder": True, "d_out": 12}, {"transcoder": True, "d_out": 12, "skip_connection": True}):
            if "skip_connection" in extra and name.startswith("CrossLayer"):
                continue  # a cross-layer transcoder has no skip
            args = {"d_in": 16, "d_sae": 64, **({"k": 4} if "TopK" in name else {}), **extra}
            model = cls(**args)
            fixed, per_latent = training_bytes(args, batch_size=0)
            parameters = sum(p.numel() for p in model.parameters())
            assert fixed + per_latent * 64 <= 16 * parameters, (name, extra)
            # and close: W_enc, W_dec, W_skip hold all but O(d_sae + d_out) of the parameters
            assert 16 * parameters - (fixed + per_latent * 64) <= 16 * 4 * 64 + 16 * 2 * 16, (name, extra)


def test_a_d_sae_too_large_for_memory_is_refused_before_allocating(tmp_path, capsys, monkeypatch):
    """10^11 latents asked torch for 6.4 TB and died in an 80-line traceback."""
    from dictlearn.cli import fit_checks

    args = _fit_args(tmp_path, _synth(tmp_path / "acts.h5"), "--model.d_sae", str(10**11))
    line = _run_expecting_error(tmp_path, capsys, monkeypatch, args)
    need = 16 * (D + D + 1) * 10**11 + 4 * 256 * 10**11 + 16 * D  # W_enc, W_dec, b_enc; pre-acts; b_dec
    assert f"--model.d_sae 100,000,000,000: training needs at least {need / 2**40:,.1f} TiB" in line, line
    assert "of RAM is available" in line and "--model.d_sae up to about" in line

    # With 1 GiB: 1,552 bytes a latent (16 x (16 + 16 + 1) + 4 x 256), so 691,843 latents fit
    monkeypatch.setattr(fit_checks, "available_memory", lambda trainer: (2**30, "of RAM is available"))
    args = _fit_args(tmp_path, _synth(tmp_path / "acts.h5"), "--model.d_sae", "700000")
    line = _run_expecting_error(tmp_path, capsys, monkeypatch, args)
    assert line == (
        "dictlearn: error: --model.d_sae 700,000: training needs at least 1.0 GiB (parameters, gradients, Adam state "
        "and a [batch, d_sae] pre-activation, d_in 16, batch 256) but 1.0 GiB of RAM is available; "
        "--model.d_sae up to about 690,000 would fit"
    )


# ------------------------------------------------------------------ training settings moved out of the model
def test_an_old_recipe_with_training_settings_under_model_names_their_new_place(tmp_path, capsys, monkeypatch):
    """`lr` & co. were dictionary arguments; a recipe or sweep file that still has them there gets
    one line naming the file and the new key, not jsonargparse's 'Does not validate'."""
    data = _synth(tmp_path / "acts.h5")
    old = tmp_path / "old.yaml"
    old.write_text("model:\n  class_path: dictlearn.JumpReLUSAE\n  init_args:\n    d_sae: 64\n    lr: 7.0e-05\n")
    line = _run_expecting_error(tmp_path, capsys, monkeypatch, _fit_args(tmp_path, data, "--config", str(old)))
    assert line == (f"dictlearn: error: --config {old}: model.init_args.lr is a training setting now; move it to a "
                    "top-level `training:` section (training: {lr: ...}) or pass --training.lr")
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("sweep:\n  a:\n    dictionary: {class_path: dictlearn.TopKSAE, init_args: {k: 4, sparse_path: never}}\n")
    args = ["fit", "--config", str(sweep), "--data.path", str(data), "--data.input_key", "acts",
            "--trainer.default_root_dir", str(tmp_path / "runs")]
    line = _run_expecting_error(tmp_path, capsys, monkeypatch, args)
    assert "sweep member 'a': dictionary.init_args.sparse_path is a training setting now" in line
