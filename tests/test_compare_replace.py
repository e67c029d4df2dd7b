"""`dictlearn compare --replace mlp`: bad input, the report's replacement section on hand-made
results, and (slow) the whole run on the embedded model, interrupted by Ctrl-C and resumed."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import assert_one_line_cli_error
from scipy import stats

from dictlearn.cli import main

HOOKS_IN = [f"transformer.h.{i}.mlp:input" for i in range(4)]
HOOKS_OUT = [f"transformer.h.{i}.mlp" for i in range(4)]


def _file(path: Path, widths: dict[str, int] | None = None, layers=range(4)) -> str:
    """A small activation file with the embedded model's MLP hooks of `layers` (width 128 unless
    `widths` says otherwise)."""
    widths = widths or {}
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        for i in layers:
            for key in (HOOKS_IN[i], HOOKS_OUT[i]):
                f.create_dataset(key, data=rng.standard_normal((64, widths.get(key, 128))).astype(np.float32))
    return str(path)


# ------------------------------------------------------------------ bad input: one line, nothing written
@pytest.mark.parametrize("flags, words", [
    (["--layer", "1"], ["--layer cannot be combined with --replace", "every layer"]),
    (["--tune-lr"], ["--tune-lr cannot be combined with --replace"]),
    (["--include", "somewhere"], ["--include cannot be combined with --replace"]),
    (["--l0", "scan"], ["--l0 scan", "total L0 targets"]),
    (["--no-downstream"], ["--no-downstream cannot be combined with --replace"]),
    (["--devices", "2"], ["--devices 2", "one process"]),
    (["--architectures", "topk"], ["--architectures topk", "topk_clt"]),
    (["--d-sae", "64,128"], ["--d-sae 64,128", "one width"]),
    (["--l0", "30"], ["--l0 30", "multiple of 4"]),
    (["--l0", "256", "--d-sae", "64"], ["--l0 256", "not below --d-sae 64"]),
    (["--input-key", HOOKS_IN[0]], ["--input-key", "--target-key"]),
])  # fmt: skip
def test_bad_flags_are_one_line_and_leave_nothing(tmp_path, capsys, flags, words):
    out = tmp_path / "run"
    assert_one_line_cli_error(main(["compare", "--replace", "mlp", "--out", str(out), "--quiet", *flags]), capsys,
                              words, untouched=out)


def test_a_file_lacking_a_layer_is_refused(tmp_path, capsys):
    data = _file(tmp_path / "three.h5", layers=range(3))  # the model has 4 layers
    out = tmp_path / "run"
    code = main(["compare", "--replace", "mlp", "--out", str(out), "--data", data, "--quiet"])
    assert_one_line_cli_error(code, capsys, ["--input-key", "transformer.h.3.mlp:input", "--layers all"], out)


def test_layers_of_unequal_width_are_refused(tmp_path, capsys):
    data = _file(tmp_path / "wide.h5", widths={HOOKS_IN[2]: 64})
    out = tmp_path / "run"
    code = main(["compare", "--replace", "mlp", "--out", str(out), "--data", data, "--quiet"])
    assert_one_line_cli_error(code, capsys, ["--input-key", HOOKS_IN[2], "width 64", "equal widths"], out)


def test_a_hook_list_out_of_layer_order_is_refused(tmp_path, capsys):
    data = _file(tmp_path / "all.h5")
    out = tmp_path / "run"
    swapped = [HOOKS_IN[1], HOOKS_IN[0], HOOKS_IN[2], HOOKS_IN[3]]
    code = main(["compare", "--replace", "mlp", "--out", str(out), "--data", data, "--input-key", ",".join(swapped),
                 "--target-key", ",".join(HOOKS_OUT), "--quiet"])
    assert_one_line_cli_error(code, capsys, ["--input-key", "not in layer order", "[1, 0, 2, 3]"], out)
    code = main(["compare", "--replace", "mlp", "--out", str(out), "--data", data, "--input-key", ",".join(HOOKS_IN),
                 "--target-key", ",".join(HOOKS_OUT[:3]), "--quiet"])
    assert_one_line_cli_error(code, capsys, ["--target-key", "other layers"], out)
    code = main(["compare", "--replace", "mlp", "--out", str(out), "--data", data, "--input-key", "acts,more",
                 "--target-key", ",".join(HOOKS_OUT[:2]), "--quiet"])
    assert_one_line_cli_error(code, capsys, ["--input-key acts", "not a layer's mlp_in hook"], out)


# ------------------------------------------------------------------ the report's section on hand-made lines
def _line(architecture: str, target: int, seed: int, ce: float, kl: float, l0: float | None = None) -> dict:
    return {"name": f"{architecture}_l0-{target}_s{seed}", "architecture": architecture, "replace": "mlp",
            "mapping": "clt" if "clt" in architecture else "transcoder", "model_name": "m", "l0_target": target,
            "seed": seed, "total_l0": float(target if l0 is None else l0), "replacement_ce_loss_recovered": ce,
            "replacement_kl_div": kl, "d_sae": 64,
            "layers": {str(i): {"fvu": 0.1 * (i + 1) + 0.01 * seed, "l0": target / 4} for i in range(4)}}


def test_replacement_section_ranks_with_intervals_and_tests_over_seeds(tmp_path):
    """A CLT ahead by a constant 0.05 (±0.002 over seeds) is `better`; two set replacements 0.001
    apart with paired noise ±0.002 are not distinguishable; the intervals are the t-intervals of
    the seed means, computed here with scipy."""
    from dictlearn.analysis.report import analyse

    noise = [0.0, 0.02, -0.02]
    lines = []
    for seed in range(3):
        for target in (32, 64):
            base = 0.8 + 0.001 * target + noise[seed]
            lines += [_line("topk_clt", target, seed, base + 0.05 + 0.002 * (seed - 1), 0.1),
                      _line("topk_transcoder", target, seed, base, 0.2 + noise[seed]),
                      _line("topk_skip_transcoder", target, seed, base + 0.001 + 0.1 * noise[(seed + 1) % 3], 0.2)]
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(line) + "\n" for line in lines))
    report = analyse([results], tmp_path / "report", echo=False).read_text()
    document = json.loads((tmp_path / "report" / "verdicts.json").read_text())
    records = [r for r in document["records"] if r["metric"] == "replacement_ce_loss_recovered"
               and r.get("family") == "replacement report"]
    assert {r["l0_target"] for r in records} == {32, 64} and all(r["n_seeds"] == 3 for r in records)
    for r in records:  # leader topk_clt against the runner-up: the paired differences, by hand
        a = [x for x in lines if x["architecture"] == r["a"] and x["l0_target"] == r["l0_target"]]
        b = [x for x in lines if x["architecture"] == r["b"] and x["l0_target"] == r["l0_target"]]
        d = [pa["replacement_ce_loss_recovered"] - pb["replacement_ce_loss_recovered"] for pa, pb in
             zip(sorted(a, key=lambda x: x["seed"]), sorted(b, key=lambda x: x["seed"]))]
        assert r["differences"] == pytest.approx(d)
        assert r["p"] == pytest.approx(stats.ttest_1samp(d, 0.0).pvalue, rel=1e-6)
        assert "topk_clt" in (r["a"], r["b"]) and r["claim"] in ("better", "worse")
    assert "Replacement models" in report
    assert "Replacement models (every MLP replaced at once): 18 (3 replacements × 2 L0 targets × 3 seeds)" in report
    row = next(line for line in report.splitlines() if line.startswith("| 32 | replacement CE loss recovered"))
    clt = [x["replacement_ce_loss_recovered"] for x in lines if x["architecture"] == "topk_clt"
           and x["l0_target"] == 32]
    half = stats.t.ppf(0.975, 2) * np.std(clt, ddof=1) / math.sqrt(3)
    assert f"topk_clt {np.mean(clt):.4g} [{np.mean(clt) - half:.4g}, {np.mean(clt) + half:.4g}]" in row
    assert "**better**" in row
    # the two sets: compared in verdicts.json, never claimed apart
    sets = [r for r in document["records"] if {r["a"], r["b"]} == {"topk_transcoder", "topk_skip_transcoder"}
            and r["metric"] == "replacement_ce_loss_recovered"]
    assert sets and all(r["claim"] == "not distinguishable" for r in sets)
    assert "topk_skip_transcoder is better" not in report and "topk_transcoder **better**" not in report
    for stem in ("replacement_ce_kl", "replacement_layer_fvu"):
        assert (tmp_path / "report" / "figures" / f"{stem}.png").is_file()


def test_a_replacement_off_its_total_target_is_not_ranked_there(tmp_path):
    from dictlearn.analysis.report import analyse

    lines = [_line("topk_clt", t, s, 0.9, 0.1) for t in (32, 64) for s in range(2)]
    lines += [_line("jumprelu_clt", t, s, 0.95, 0.05, l0=t / 3) for t in (32, 64) for s in range(2)]
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(line) + "\n" for line in lines))
    report = analyse([results], tmp_path / "report", echo=False).read_text()
    row = next(line for line in report.splitlines() if line.startswith("| 64 | replacement CE loss recovered"))
    assert "jumprelu_clt: does not reach this L0" in row and "only one replacement" in row
    assert "more than 25 % off its target for 4 of 8 replacements" in report
    # past eight names the sentence says how many it leaves to the table
    more = lines + [_line("jumprelu_clt", t, s, 0.95, 0.05, l0=t / 3) for t in (32, 64) for s in range(2, 5)]
    results.write_text("".join(json.dumps(line) + "\n" for line in more))
    report = analyse([results], tmp_path / "more", echo=False).read_text()
    assert "for 10 of 14 replacements" in report and ", and 2 more (the table below)." in report


# ------------------------------------------------------------------ end to end on the embedded model
TINY = ["--tokens", "12000", "--train-tokens", "5120", "--batch-size", "256", "--d-sae", "16", "--l0", "8",
        "--seeds", "0,1", "--contexts", "2", "--quiet"]


@pytest.mark.slow
def test_replace_run_folder_ctrl_c_and_resume(tmp_path):
    from test_compare import _env, _export_bytes, _wait_for

    from dictlearn.compare.plan import CompareConfig
    from dictlearn.compare.replace_run import load_replacement
    from dictlearn.replacement import mlp_sites, replacement_metrics

    out = tmp_path / "run"
    # one process: the seeds' sweeps one after the other (--workers: test_replace_workers_train_the_same)
    command = [sys.executable, "-m", "dictlearn.cli", "compare", "--replace", "mlp", "--out", str(out), "--workers",
               "1", *TINY]
    process = subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    checkpoints = out / "train" / "seed1" / "checkpoints"
    _wait_for(lambda: checkpoints.is_dir() and any(checkpoints.glob("*.ckpt")), process, timeout=400)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "rerun the same command to resume" in stderr.strip().splitlines()[-1]
    seed0 = sorted(p.name for p in (out / "exports").iterdir())
    kept = {name: _export_bytes(out / "exports" / name) for name in seed0}
    assert len(seed0) == 4 + 4 + 1 + 1 and not (out / "results.jsonl").exists()

    done = subprocess.run(command[:-1], env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "seed1: resuming from" in done.stderr and "seed0: resuming" not in done.stderr
    for name, files in kept.items():
        assert _export_bytes(out / "exports" / name) == files, name
    for entry in ("compare.yaml", "activations.h5", "train", "results.jsonl", "results.csv", "timings.json",
                  "figures/replacement_ce_kl.png", "figures/replacement_layer_fvu.png", "report.md", "report.html",
                  "verdicts.json"):
        assert (out / entry).exists(), entry
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [line["architecture"] for line in lines if line["seed"] == 0] == [
        "topk_transcoder", "topk_skip_transcoder", "topk_clt", "jumprelu_clt"]
    for line in lines:
        assert line["replace"] == "mlp" and line["l0_target"] == 8 and line["layers_replaced"] == [0, 1, 2, 3]
        assert set(line["layers"]) == {"0", "1", "2", "3"}
        assert math.isfinite(line["replacement_ce_loss_recovered"]) and line["replacement_kl_div"] >= 0
        assert line["total_l0"] == pytest.approx(sum(v["l0"] for v in line["layers"].values()))
        assert line["heldout"] == "documents" and line["heldout_rows"] == line["n_rows"] > 0
        if line["mechanism"] == "topk":  # k = 2 per layer: at most 8 in all (the ReLU may zero a few)
            assert line["k"] == 2 and 6 <= line["total_l0"] <= 8
        else:
            assert line["l0_coefficient"] > 0
    # the results line is replacement_metrics of the exported dictionaries on the run's windows
    from dictlearn.downstream import heldout_batches
    from dictlearn.models.loading import load_model

    config = CompareConfig(**json.loads(json.dumps(__import__("yaml").safe_load((out / "compare.yaml").read_text()))))
    from dictlearn.compare.replace_plan import plan_replacements

    lm = load_model(None)
    planned = plan_replacements(config, [0, 1, 2, 3], HOOKS_IN, HOOKS_OUT)
    clt = next(p for p in planned if p.architecture == "topk_clt" and p.seed == 1)
    batches = heldout_batches(lm.tokenizer, None, 256, 2, True, 8, data=str(out / "activations.h5"))
    again = replacement_metrics(lm.model, mlp_sites(lm.model, range(4)), load_replacement(out, clt), batches)
    line = next(line for line in lines if line["name"] == clt.name)
    assert line["replacement_ce_loss_recovered"] == pytest.approx(again["replacement_ce_loss_recovered"], rel=1e-9)
    # jacobian_cos of each layer of a set: its transcoder against that layer's MLP on held-out rows
    import torch

    from dictlearn.export import load
    from dictlearn.metrics.jacobian import frobenius_cosines, module_jacobian, sample_rows, transcoder_jacobian

    skip = next(p for p in planned if p.architecture == "topk_skip_transcoder" and p.seed == 0)
    line = next(line for line in lines if line["name"] == skip.name)
    with h5py.File(out / "activations.h5", "r") as f:
        first, n = int(f["documents"].attrs["heldout_start"]), f[HOOKS_IN[0]].shape[0]
        rows = (first + sample_rows(n - first)).numpy()
        for layer in range(4):
            x = torch.from_numpy(f[HOOKS_IN[layer]][rows]).float()
            tc = load(out / "exports" / skip.members[layer].name)
            want = frobenius_cosines(transcoder_jacobian(tc, x), module_jacobian(lm.model.transformer.h[layer].mlp, x))
            assert line["layers"][str(layer)]["jacobian_cos"] == pytest.approx(float(want.mean()), rel=1e-6)
    assert not any("jacobian_cos" in v for line in lines if line["mapping"] == "clt" for v in line["layers"].values())
    assert "Replacement models" in (out / "report.md").read_text()
    timings = json.loads((out / "timings.json").read_text())
    assert {"train", "evaluate", "total"} <= set(timings["stages"])


@pytest.mark.slow
def test_replace_workers_train_the_same(tmp_path):
    """--workers 2 trains the two seeds' sweeps side by side in worker processes: the exports are
    those of one process, byte for byte, and so are the results (training seconds aside)."""
    from test_compare import _env, _export_bytes

    data = None
    runs = {}
    for workers in ("1", "2"):
        out = tmp_path / f"w{workers}"
        flags = TINY if data is None else [f for f in TINY if f not in ("--tokens", "12000")] + ["--data", data]
        done = subprocess.run([sys.executable, "-m", "dictlearn.cli", "compare", "--replace", "mlp", "--out", str(out),
                               "--workers", workers, *flags], env=_env(), capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        data = data or str(out / "activations.h5")
        timings = json.loads((out / "timings.json").read_text())
        assert timings["machine"]["workers"] == int(workers)
        runs[workers] = out
    exports = [sorted(p.name for p in (runs[w] / "exports").iterdir()) for w in ("1", "2")]
    assert exports[0] == exports[1] and len(exports[0]) == 2 * (4 + 4 + 1 + 1)
    for name in exports[0]:
        assert _export_bytes(runs["1"] / "exports" / name) == _export_bytes(runs["2"] / "exports" / name), name
    lines = [[{k: v for k, v in json.loads(line).items() if k not in ("train_seconds", "export", "data")}
              for line in (runs[w] / "results.jsonl").read_text().splitlines()] for w in ("1", "2")]
    assert lines[0] == lines[1]
