"""`dictlearn compare --include`: outside dictionaries checked up front, evaluated on the run's rows,
drawn and reported as not trained by the run, and never given a paired verdict."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
from scipy import stats
from conftest import assert_one_line_cli_error

from dictlearn.analysis.outside import against_series, place, sentences
from dictlearn.analysis.results import from_records, is_outside_series
from dictlearn.cli import main
from dictlearn.compare.include import load_entry, parse_include
from dictlearn.compare.plan import CompareConfig
from dictlearn.data import write_synth_file
from dictlearn.dictionaries.relu_l1 import ReLUL1SAE
from dictlearn.dictionaries.topk import TopKSAE
from dictlearn.errors import ConfigError
from dictlearn.evaluate import EvaluateOptions, evaluate
from dictlearn.export import export


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    """A synthetic file whose 'acts' records hook 'blocks.1' (and 'target', width 32), and exports."""
    root = tmp_path_factory.mktemp("include")
    data = root / "synth.h5"
    write_synth_file(data, n_rows=8192, d=32, n_features=64, mean_active=4.0, seed=0, d_out=32)
    with h5py.File(data, "a") as f:
        f["acts"].attrs["hook_name"] = "blocks.1"
    exports = {
        "good": export(TopKSAE(d_in=32, d_sae=48, k=4), root / "good", {"hook_name": "blocks.1"}),
        "narrow": export(TopKSAE(d_in=16, d_sae=48, k=4), root / "narrow"),
        "other_hook": export(TopKSAE(d_in=32, d_sae=48, k=4), root / "other_hook", {"hook_name": "blocks.5"}),
        "transcoder": export(ReLUL1SAE(d_in=32, d_sae=48, d_out=32, transcoder=True), root / "transcoder"),
    }
    broken = root / "broken"
    broken.mkdir()
    (broken / "cfg.json").write_text("{not json")
    (broken / "sae_weights.safetensors").write_bytes(b"")
    return {"data": str(data), **{k: str(v) for k, v in exports.items()}, "broken": str(broken), "root": root}


# ------------------------------------------------------------------ refused up front, nothing written
@pytest.mark.parametrize("include, words", [
    ("missing", ["--include", "no such file or folder"]),
    ("broken", ["--include", "does not load", "cfg.json"]),
    ("narrow", ["d_in=16", "width 32"]),
    ("other_hook", ["hook 'blocks.5'", "'blocks.1'"]),
    ("transcoder", ["transcoder", "--target-key"]),
    ("good,good", ["name 'good'", "NAME="]),
])  # fmt: skip
def test_bad_include_is_one_line_and_writes_nothing(files, tmp_path, capsys, include, words):
    out = tmp_path / "run"
    paths = ",".join(files.get(name, str(tmp_path / name)) for name in include.split(","))
    code = main(["compare", "--out", str(out), "--data", files["data"], "--input-key", "acts", "--quiet",
                 "--architectures", "topk", "--l0", "4", "--d-sae", "16", "--seeds", "0", "--include", paths])
    assert_one_line_cli_error(code, capsys, words, untouched=out)


def test_before_a_harvest_the_models_hooks_decide(tmp_path, capsys):
    """No activation file yet: the widths come from one forward of the embedded model (d_model 128 at
    transformer.h.2, its default hook), the hook from the run's --layer."""
    fits = export(TopKSAE(d_in=128, d_sae=32, k=4), tmp_path / "fits",
                  {"model_name": "dictlearn/tiny-stdlib", "hook_name": "transformer.h.2"})
    narrow = export(TopKSAE(d_in=64, d_sae=32, k=4), tmp_path / "narrow")
    out = tmp_path / "run"
    for flags, words in ((["--include", str(narrow)], ["d_in=64", "'transformer.h.2' has width 128"]),
                         (["--layer", "1", "--include", str(fits)], ["hook 'transformer.h.2'", "'transformer.h.1'"])):
        assert main(["compare", "--out", str(out), "--quiet", *flags]) == 2
        error = capsys.readouterr().err.strip()
        assert len(error.splitlines()) == 1 and all(word in error for word in words), error
        assert not out.exists()


def test_a_name_the_run_uses_is_refused(files, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["compare", "--out", str(out), "--data", files["data"], "--input-key", "acts", "--quiet",
                 "--architectures", "topk", "--l0", "4", "--d-sae", "16", "--seeds", "0",
                 "--include", f"topk_l0-4_s0={files['good']}"])
    error = capsys.readouterr().err.strip()
    assert code == 2 and "already a dictionary this run trains" in error, error
    assert not out.exists()


def test_names_and_identity(files):
    assert parse_include([files["good"], f"x={files['narrow']}"]) == [("good", Path(files["good"])),
                                                                      ("x", Path(files["narrow"]))]
    with pytest.raises(ConfigError, match="not usable as a file name"):
        parse_include(["bad name=/tmp/x"])
    # a finished run takes new outside dictionaries without counting as another comparison
    a = CompareConfig(l0=[4], device="cpu").resolved()
    b = CompareConfig(l0=[4], device="cpu", include=[files["good"]]).resolved()
    assert a.identity() == b.identity()


# ------------------------------------------------------------------ the report's words on one point
def _line(name, l0, fvu, seed=None, target=None, trained=True):
    line = {"name": name, "architecture": name.split("_")[0], "mapping": "sae", "l0": l0, "fvu": fvu,
            "seed": seed, "l0_target": target, "d_sae": 32}
    return line if trained else {**line, "trained": False, "format": "saelens", "source": "/x/mine"}


def test_an_outside_point_is_placed_against_the_seeds_never_tested():
    """topk at two seeds, each a straight line in log L0; the outside point at L0 = 8 sits between
    targets 4 and 16. The seeds' values there (log-L0 interpolation) and their t interval are
    computed here in float64 and must be what the sentence says."""
    seeds = {0: [(4.0, 0.50), (16.0, 0.30)], 1: [(4.2, 0.54), (15.0, 0.33)], 2: [(3.9, 0.49), (16.5, 0.29)]}
    lines = [_line(f"topk_{t}_{s}", l0, y, seed=s, target=t)
             for s, pts in seeds.items() for t, (l0, y) in zip((4, 16), pts)]
    lines.append(_line("mine", 8.0, 0.20, trained=False))
    lines = from_records(lines, "/runs/a/results.jsonl")
    mine = lines[-1]
    assert is_outside_series(mine["_series"]) and mine["_series"][0] == "mine (saelens, not trained here)"
    lines.insert(0, {**lines[0], "name": "relu_far", "architecture": "relu", "_series": ("relu", ""), "l0": 30.0})
    lines.insert(0, {**lines[1], "name": "relu_far2", "architecture": "relu", "_series": ("relu", ""), "l0": 40.0})
    (unreached, (label, at)) = against_series(mine, lines[:-1], "fvu")
    assert unreached == ("relu", [])  # its curve (L0 30-40) does not reach 8: nothing extrapolated
    expected = []
    for (x0, y0), (x1, y1) in seeds.values():
        w = (math.log(8.0) - math.log(x0)) / (math.log(x1) - math.log(x0))
        expected.append(y0 + w * (y1 - y0))
    assert label == "topk" and at == pytest.approx(expected, rel=1e-12)
    mean, sd = np.mean(expected), np.std(expected, ddof=1)
    half = stats.t.ppf(0.975, 2) * sd / math.sqrt(3)
    said = place(0.20, "topk", at, higher_is_better=False)
    assert said.startswith("better than all 3 topk seeds")
    assert f"[{mean - half:#.3g}, {mean + half:#.3g}]" in said
    inside = place(float(mean), "topk", at, higher_is_better=False)
    assert inside.startswith("within the 95 % interval")
    # two seeds: an interval far wider than their range; below both seeds is said, and that it is inside
    wide = place(0.1, "relu", [0.3, 0.5], higher_is_better=True)
    assert wide.startswith("worse than all 2 relu seeds, within the 95 % interval of their mean"), wide
    sentence, caveat = sentences(lines)
    assert "mine (saelens, not trained here)" in sentence and "`/x/mine`" in sentence
    assert "(Pareto-optimal)" in sentence and caveat.startswith("No paired test is made")
    assert "relu not compared: its curve does not reach this L0" in sentence, sentence


def test_outside_lines_join_no_verdict():
    from dictlearn.analysis.summary import verdicts

    lines = [_line(f"{a}_{t}_{s}", t * (1 + 0.01 * s), 0.5 - 0.01 * t + 0.001 * s * (a == "topk"), seed=s, target=t)
             for a in ("topk", "relu") for t in (4, 16) for s in (0, 1, 2)]
    lines.append(_line("mine", 8.0, 0.2, trained=False))
    document = verdicts(from_records(lines, "/runs/a/results.jsonl"))
    assert document["records"] and all("mine" not in (r["a"], r["b"]) for r in document["records"])
    assert any("not trained by this run" in note and "mine" in note for note in document["notes"])


# ------------------------------------------------------------------ end to end, tiny
PEERS = Path(__file__).parent / "fixtures" / "peers"  # saved by SAELens, sparsify, dictionary_learning (d_in 16)


@pytest.mark.slow
def test_compare_includes_an_export_and_every_format_end_to_end(tmp_path):
    """A dictlearn fit and one dictionary of each outside format beside a tiny run: each is in the
    results (`trained: false`, its format), measured on the run's rows exactly as `dictlearn
    evaluate` measures it alone, drawn on the frontier, named in the report, never in a verdict."""
    from conftest import fit_recipe

    data = tmp_path / "synth.h5"
    write_synth_file(data, n_rows=30_000, d=16, n_features=48, mean_active=4.0, seed=0, d_out=16)
    _, fitted = fit_recipe("topk", str(data), tmp_path / "fit", "--model.d_sae", "48", "--model.k", "6", steps=20)
    outside = {"mine": fitted, "lens": PEERS / "saelens" / "topk", "sp": PEERS / "sparsify" / "run" / "layers.0",
               "dl": PEERS / "dictionary_learning" / "topk"}
    formats = {"mine": "dictlearn", "lens": "saelens", "sp": "sparsify", "dl": "dictionary_learning"}
    out = tmp_path / "run"
    flags = ["compare", "--out", str(out), "--data", str(data), "--input-key", "acts", "--architectures",
             "topk,relu_l1", "--l0", "4,8", "--d-sae", "32", "--seeds", "0,1", "--train-tokens", "5120",
             "--batch-size", "256", "--no-interpret", "--quiet",
             "--include", ",".join(f"{name}={path}" for name, path in outside.items())]
    assert main(flags) == 0
    lines = {line["name"]: line for line in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    own = lines["topk_l0-4_s0"]
    assert own["trained"] is True and own["format"] == "dictlearn" and own["source"] == own["export"]
    svg = (out / "figures" / "l0_fvu.svg").read_text()
    report = (out / "report.md").read_text()
    verdicts = json.loads((out / "verdicts.json").read_text())
    for name, path in outside.items():
        line = lines[name]
        assert line["trained"] is False and line["format"] == formats[name], line["format"]
        assert line["source"] == str(path.resolve()) and line["seed"] is None and line["l0_target"] is None
        assert line["n_rows"] == own["n_rows"] and line["data"] == own["data"]  # the run's held-out rows
        alone = evaluate([load_entry(path)[0]], str(data), options=EvaluateOptions(input_key="acts", downstream=False, interpret=False))[0]
        assert line["fvu"] == alone["fvu"] and line["l0"] == alone["l0"], name  # what `dictlearn evaluate` says
        label = f"{name} ({formats[name]}, not trained here)"
        assert f"fvu:{label}" in svg  # its own series on the frontier figure
        assert f"**{label}** was not trained by this run" in report
        assert f"elsewhere ({formats[name]})" in report  # the table's column
        assert all(name not in (r["a"], r["b"]) for r in verdicts["records"])
    assert lines["mine"]["l0"] == pytest.approx(6.0)
    # the library's own name for each (SAELens' architecture, sparsify's kind, dictionary_learning's class)
    assert [lines[n]["architecture"] for n in ("mine", "lens", "sp", "dl")] == ["topk", "topk", "topk_sae",
                                                                              "AutoEncoderTopK"]
    header = (out / "results.csv").read_text().splitlines()[0].split(",")
    assert {"trained", "source", "format"} <= set(header)
    # rerun: nothing retrained, the included records reused while their files are unchanged
    cached = out / "evaluations" / "included" / "mine.json"
    stamp = os.stat(cached).st_mtime_ns
    assert main(flags) == 0
    assert os.stat(cached).st_mtime_ns == stamp
