"""`dictlearn compare`: the run folder, resume after a kill, matched sparsity, bad input, DDP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import assert_one_line_cli_error

import dictlearn
from dictlearn.cli import main
from dictlearn.compare.plan import CompareConfig, parse_architecture, plan
from dictlearn.data import write_synth_file
from dictlearn.evaluate import METRIC_KEYS

SRC_ROOT = str(Path(dictlearn.__file__).resolve().parents[1])
LINE_KEYS = ("name", "architecture", "mechanism", "mapping", "l0_target", "d_sae", "seed", "train_tokens",
             "train_seconds", "export", "log_dir", "member", "batch_size")
# A test-size budget on the embedded model: 12k harvested tokens, 40 steps of 256 tokens, d_sae 32.
TINY = ["--tokens", "12000", "--train-tokens", "10240", "--batch-size", "256", "--d-sae", "32", "--l0", "4,8",
        "--seeds", "0,1", "--contexts", "2", "--architectures", "topk,relu_l1,topk_transcoder", "--workers", "1",
        "--quiet"]  # one process: its sweeps in turn (tests/test_compare_workers.py runs them side by side)


def _env() -> dict:
    pythonpath = os.pathsep.join(p for p in (SRC_ROOT, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def synth_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("compare_synth") / "synth.h5"
    write_synth_file(path, n_rows=120_000, d=32, n_features=128, mean_active=6.0, seed=0, d_out=32)
    return str(path)


# ------------------------------------------------------------------ the plan
def test_architecture_names_and_plan():
    assert parse_architecture("relu_l1") == ("relu_l1", "sae")
    assert parse_architecture("topk_transcoder") == ("topk", "transcoder")
    assert parse_architecture("gated_skip_transcoder") == ("gated", "skip_transcoder")
    config = CompareConfig(architectures=["topk", "jumprelu", "topk_skip_transcoder"], l0=[8, 16], d_sae=[64],
                           seeds=[0, 1], device="cpu").resolved()
    planned = plan(config)
    assert len(planned) == 3 * 2 * 2 and len({p.name for p in planned}) == 12
    topk = next(p for p in planned if p.architecture == "topk" and p.l0_target == 16)
    assert topk.init_args["k"] == 16 and not topk.calibrated
    skip = next(p for p in planned if p.mapping == "skip_transcoder")
    assert skip.init_args["transcoder"] and skip.init_args["skip_connection"]
    jump = next(p for p in planned if p.architecture == "jumprelu" and p.l0_target == 8)
    assert "k" not in jump.init_args and jump.calibrated


def test_every_architecture_gets_the_same_optimiser():
    """Equal treatment: the mechanisms' own papers differ (JumpReLU and gated: beta1 0 and a warm-up),
    a comparison does not; an `optimizer:` override applies to every architecture at once."""
    config = CompareConfig(architectures=["relu_l1", "topk", "batchtopk", "gated", "jumprelu", "topk_transcoder"],
                           l0=[8], d_sae=[64], seeds=[0], device="cpu", optimizer={"lr": 2e-3}).resolved()
    from dictlearn.training import DictionaryTraining, Member, TrainingConfig

    settings = set()
    for p in plan(config):
        s = DictionaryTraining(Member(p.build(16, 16), training=TrainingConfig(**p.training))).settings["model"]
        settings.add((s.lr, tuple(s.adam_betas), s.adam_eps, s.lr_warmup_fraction, s.lr_decay_fraction,
                      s.init_scale_from_data))
    assert settings == {(2e-3, (0.9, 0.999), 1e-8, 0.0, 0.3, True)}
    assert all("lr" not in p.init_args for p in plan(config))  # the dictionary is the model, not its training
    with pytest.raises(dictlearn.errors.ConfigError, match="optimizer: unknown key 'beta'"):
        CompareConfig(l0=[8], optimizer={"beta": 0.9}, device="cpu").resolved()


def test_a_seed_sets_the_data_order(synth_file):
    """Same seed: the same batches for every architecture (paired differences); another seed: others."""
    from dictlearn.compare.run import Source, sweep_data

    config = CompareConfig(data=synth_file, input_key="acts", l0=[4], d_sae=[32], device="cpu").resolved()
    source = Source(Path(synth_file), ("acts", None), None)

    def first_batch(seed: int):
        data = sweep_data(config, source, seed)
        data.setup("fit")
        return next(iter(data.train_dataloader()))[0]

    a, b = first_batch(0), first_batch(0)
    assert a.equal(b) and not a.equal(first_batch(1))


# ------------------------------------------------------------------ bad input: one line, exit 2, nothing written
@pytest.mark.parametrize("flags, words", [
    (["--architectures", "topk,sparsemax"], ["--architectures sparsemax", "use one of"]),
    (["--l0", "0"], ["--l0", "positive"]),
    (["--l0", "8,64", "--d-sae", "64"], ["--l0 64", "below d_sae", "--d-sae"]),
    (["--architectures", "topk_transcoder"], ["--target-key", "topk_transcoder"]),
    (["--input-key", "missing"], ["--input-key missing", "not found"]),
    (["--target-key", "nope", "--architectures", "topk_transcoder"], ["--target-key nope"]),
    (["--seeds", "0,0"], ["--seeds", "distinct"]),
    (["--train-tokens", "100", "--batch-size", "1024"], ["--train-tokens 100", "less than one step"]),
])  # fmt: skip
def test_bad_input_is_one_line_and_leaves_nothing(synth_file, tmp_path, capsys, flags, words):
    out = tmp_path / "run"
    keys = [] if "--input-key" in flags else ["--input-key", "acts"]
    code = main(["compare", "--out", str(out), "--data", synth_file, "--quiet", *keys, *flags])
    assert_one_line_cli_error(code, capsys, words, untouched=out)


def test_missing_data_file_is_named_before_its_flags(tmp_path, capsys):
    # a wrong path first: asking for --input-key of a file that is not there would not help
    out = tmp_path / "run"
    code = main(["compare", "--out", str(out), "--data", str(tmp_path / "none.h5"), "--quiet"])
    assert_one_line_cli_error(code, capsys, ["--data", "none.h5", "no such file"], untouched=out)


def test_out_holding_another_comparison_is_refused(synth_file, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "compare.yaml").write_text(CompareConfig(out=str(out), data=synth_file, input_key="acts",
                                                    l0=[4], device="cpu").resolved().to_yaml())
    before = sorted(p.name for p in out.iterdir())
    code = main(["compare", "--out", str(out), "--data", synth_file, "--input-key", "acts", "--l0", "8", "--quiet"])
    error = capsys.readouterr().err.strip()
    assert code == 2 and len(error.splitlines()) == 1
    assert f"--out {out} holds a different comparison" in error and "l0" in error
    assert sorted(p.name for p in out.iterdir()) == before
    (out / "compare.yaml").unlink()
    (out / "notes.txt").write_text("someone else's")
    assert main(["compare", "--out", str(out), "--data", synth_file, "--input-key", "acts", "--quiet"]) == 2
    assert "not empty" in capsys.readouterr().err


def test_bad_harvest_input_leaves_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    for flags, words in ((["--layer", "99"], "--layer 99"), (["--corpus", str(tmp_path / "none")], "--corpus")):
        assert main(["compare", "--out", str(out), "--quiet", *flags]) == 2
        error = capsys.readouterr().err.strip()
        assert len(error.splitlines()) == 1 and words in error, error
        assert not out.exists()


# ------------------------------------------------------------------ the default pipeline, killed and resumed
def _wait_for(predicate, process, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert process.poll() is None, process.stderr.read() if process.stderr else "exited early"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _export_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_compare_writes_the_run_folder_and_resumes_after_a_kill(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "dictlearn.cli", "compare", "--out", str(out), *TINY]
    process = subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seed0 = [p.name for p in plan(CompareConfig(**_config_values(out))) if p.seed == 0]
    checkpoints = out / "train" / "seed1" / "checkpoints"
    # Kill in the second sweep, once the first sweep's exports are whole and a checkpoint exists.
    _wait_for(lambda: all((out / "exports" / n / "cfg.json").is_file() for n in seed0)
              and checkpoints.is_dir() and any(checkpoints.glob("*.ckpt")), process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    kept = {name: _export_bytes(out / "exports" / name) for name in seed0}
    assert not (out / "results.jsonl").exists()
    assert not list((out / "exports").glob(".*"))  # no half-written export folder

    done = subprocess.run(command[:-1], env=_env(), capture_output=True, text=True, timeout=400)  # not --quiet
    assert done.returncode == 0, done.stderr[-3000:]
    assert "seed1: resuming from interrupted-step=" in done.stderr and "seed0: resuming" not in done.stderr
    for name, files in kept.items():  # the first sweep's exports were not rewritten
        assert _export_bytes(out / "exports" / name) == files, name

    for entry in ("compare.yaml", "activations.h5", "results.jsonl", "results.csv", "timings.json", "report.md",
                  "report.html", "figures"):
        assert (out / entry).exists(), entry
    assert any((out / "figures").glob("*.png")) and any((out / "figures").glob("*.svg"))
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    names = [p.name for p in plan(CompareConfig(**_config_values(out)))]
    assert [line["name"] for line in lines] == names and len(names) == 3 * 2 * 2
    for line in lines:
        assert set(METRIC_KEYS) | set(LINE_KEYS) <= set(line), set(METRIC_KEYS) | set(LINE_KEYS) - set(line)
        assert (Path(line["export"]) / "sae_weights.safetensors").is_file()
        assert line["ce_loss_recovered"] is not None and line["fvu"] is not None
        assert line["train_tokens"] == 40 * 256
        assert line["optimizer"]["lr"] == 3e-3 and line["lr_tuned"] is False
        if line["mechanism"] == "topk":
            assert line["k"] == line["l0_target"] and 0.5 * line["k"] < line["l0"] <= line["k"]  # ReLU may zero a few
        else:
            assert line["l1_coefficient"] > 0 and line["k"] is None
    transcoder = next(line for line in lines if line["mapping"] == "transcoder")
    assert transcoder["hook_name_out"] and transcoder["target_key"]
    assert (out / "results.csv").read_text().count("\n") == len(lines) + 1
    timings = json.loads((out / "timings.json").read_text())
    assert {"train", "evaluate", "report", "total"} <= set(timings["stages"]) and timings["machine"]["fp32_matmul_gflops"] > 0
    assert timings["complete"] is True  # rewritten after the report, which saw `complete: false`
    assert "fp32_matmul_gflops" in (out / "report.md").read_text()
    # the resolved config reruns the same comparison: everything is done, nothing retrained
    again = main(["compare", "--config", str(out / "compare.yaml"), "--quiet"])
    assert again == 0
    for name, files in kept.items():
        assert _export_bytes(out / "exports" / name) == files


def _config_values(out: Path) -> dict:
    import yaml

    path = out / "compare.yaml"
    deadline = time.monotonic() + 120
    while not path.is_file():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return yaml.safe_load(path.read_text())


# ------------------------------------------------------------------ matched sparsity on synthetic data
@pytest.mark.slow
def test_calibrated_architectures_land_on_two_targets(synth_file, tmp_path):
    out = tmp_path / "run"
    code = main(["compare", "--out", str(out), "--data", synth_file, "--input-key", "acts",
                 "--architectures", "relu_l1,gated,jumprelu", "--l0", "4,12", "--d-sae", "128", "--seeds", "0",
                 "--train-tokens", "307200", "--batch-size", "512", "--no-downstream", "--quiet"])  # fmt: skip
    assert code == 0
    lines = {(line["architecture"], line["l0_target"]): line
             for line in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert len(lines) == 6
    for (architecture, target), line in lines.items():
        assert line["mmcs"] is not None  # the file holds the true features
        key = "l0_coefficient" if architecture == "jumprelu" else "l1_coefficient"
        assert line[key] > 0 and line["k"] is None
        # the evaluated L0 on held-out rows, within ±20 % of the target
        assert line["l0"] == pytest.approx(target, rel=0.2), (line["name"], line["l0"])
    for architecture, key in (("relu_l1", "l1_coefficient"), ("gated", "l1_coefficient"), ("jumprelu", "l0_coefficient")):
        assert lines[(architecture, 4)][key] > lines[(architecture, 12)][key]  # lower target, stronger penalty


# ------------------------------------------------------------------ DDP: 2 gloo ranks on CPU
@pytest.mark.slow
def test_compare_under_ddp_two_processes(synth_file, tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "dictlearn.cli", "compare", "--out", str(out), "--data", synth_file,
               "--input-key", "acts", "--target-key", "target", "--architectures", "topk,relu_l1,topk_transcoder",
               "--l0", "4", "--d-sae", "32", "--seeds", "0", "--train-tokens", "10240", "--batch-size", "256",
               "--device", "cpu", "--devices", "2", "--no-downstream", "--quiet"]  # fmt: skip
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [line["architecture"] for line in lines] == ["topk", "relu_l1", "topk_transcoder"]
    import torch

    final = torch.load(out / "train" / "seed0" / "final.ckpt", map_location="cpu", weights_only=False)
    assert final["global_step"] == 40 // 2  # each rank took half of the batches: 20 steps of 2 × 256 tokens


# ------------------------------------------------------------------ one training path
@pytest.mark.slow
def test_dictlearn_fit_reproduces_a_compare_sweep_from_its_written_config(synth_file, tmp_path):
    """compare writes each seed's sweep as DIR/train/seed<N>.yaml; `dictlearn fit --config` on it
    trains the same members, bit-identical to compare's (trainer settings from recipes/base.yaml
    in both, each member's training, the calibration callback, the data module's arguments)."""
    import torch
    import yaml

    out = tmp_path / "run"
    assert main(["compare", "--out", str(out), "--data", synth_file, "--input-key", "acts",
                 "--architectures", "topk,relu_l1", "--l0", "4", "--d-sae", "64", "--seeds", "0",
                 "--train-tokens", "10240", "--batch-size", "256", "--no-downstream", "--no-interpret",
                 "--quiet"]) == 0  # fmt: skip
    written = out / "train" / "seed0.yaml"
    sweep = yaml.safe_load(written.read_text())["sweep"]
    assert sweep["relu_l1_l0-4_s0"]["training"]["lr"] == 3e-3 and "lr" not in sweep["topk_l0-4_s0"]["dictionary"]
    assert yaml.safe_load(written.read_text())["data"]["block_size"] == 16  # recipes/short_run.yaml's data: block
    assert main(["fit", "--config", str(written), "--trainer.default_root_dir", str(tmp_path / "fit"),
                 "--trainer.enable_progress_bar", "false"]) == 0
    again = next((tmp_path / "fit").rglob("last.ckpt"))
    ours, theirs = (torch.load(p, weights_only=False)["state_dict"] for p in (out / "train" / "seed0" / "final.ckpt", again))
    members = [k for k in ours if k.startswith(("members.", "activity."))]
    assert members and all(torch.equal(ours[k], theirs[k]) for k in members), [k for k in members if not torch.equal(ours[k], theirs[k])]
