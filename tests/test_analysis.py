"""analysis/ (installed as dictlearn.analysis): figures read back from their artists, seed aggregation,
Pareto marking, the report's table and summary, and bad input, all on hand-written results lines."""

from __future__ import annotations

import json
import re
import runpy
import struct
import sys
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from dictlearn.analysis import curves, density
from dictlearn.analysis.aggregate import aggregate, pareto
from dictlearn.analysis.cli import module_main
from dictlearn.analysis.frontier import FIGURES, FVU
from dictlearn.analysis.metric_plot import MetricSpec, plot_metric_vs_l0, plot_metrics_vs_l0
from dictlearn.analysis.report import analyse, write_report
from dictlearn.analysis.results import AnalysisError, from_records, load_results
from dictlearn.analysis.style import ARCHITECTURES, DPI, WIDTH_IN
from dictlearn.analysis.summary import frontier_table, summarise
from dictlearn.analysis.summary import verdicts as summary_verdicts
from dictlearn.cli import main as dictlearn_main


def analyse_command(*args) -> int:
    """`dictlearn analyse ARGS...` in-process -> its exit status."""
    return dictlearn_main(["analyse", *map(str, args)])

MODEL, HOOK = "dictlearn/tiny-stdlib", "transformer.h.2"


def line(architecture, l0_target, seed, **metrics) -> dict:
    """A results line; L0 defaults to its target, the other metrics to plausible constants."""
    base = dict(name=f"{architecture}_l0-{l0_target}_seed{seed}", architecture=architecture, mapping="sae",
                l0_target=l0_target, d_sae=256, seed=seed, model_name=MODEL, hook_name=HOOK, l0=float(l0_target),
                fvu=0.3, cos_sim=0.9, l2_ratio=0.97, rel_reconstruction_bias=1.0, dead_fraction=0.01,
                dense_fraction=0.0, ce_loss_recovered=0.95, kl_div=0.05, train_tokens=1_000_000, train_seconds=10.0)
    return {**base, **metrics}


def write(path: Path, lines: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
    return path


def xy(artist) -> tuple[np.ndarray, np.ndarray]:
    """A Line2D's data as floats (errorbar keeps it as an object array)."""
    return np.asarray(artist.get_xdata(), dtype=float), np.asarray(artist.get_ydata(), dtype=float)


def series_container(fig, label, axis=0):
    """The ErrorbarContainer of one series in one panel."""
    found = [c for c in fig.axes[axis].containers if c.get_label() == label]
    assert len(found) == 1, [c.get_label() for c in fig.axes[axis].containers]
    return found[0]


# Two seeds per setting; topk wins at L0 8 by more than the seeds' spread, batchtopk at 16 within it.
WINNER_CHANGES = [
    line("topk", 8, 0, fvu=0.40, ce_loss_recovered=0.91), line("topk", 8, 1, fvu=0.42, ce_loss_recovered=0.93),
    line("batchtopk", 8, 0, fvu=0.45, ce_loss_recovered=0.90), line("batchtopk", 8, 1, fvu=0.47, ce_loss_recovered=0.92),
    line("topk", 16, 0, fvu=0.33, ce_loss_recovered=0.95), line("topk", 16, 1, fvu=0.35, ce_loss_recovered=0.96),
    line("batchtopk", 16, 0, fvu=0.30, ce_loss_recovered=0.97), line("batchtopk", 16, 1, fvu=0.34, ce_loss_recovered=0.98),
]


def test_points_sit_at_the_seed_means_with_confidence_bars():
    lines = from_records([
        line("relu_l1", 16, 0, l0=14.0, fvu=0.50), line("relu_l1", 16, 1, l0=20.0, fvu=0.44),
        line("relu_l1", 8, 0, l0=9.0, fvu=0.61), line("relu_l1", 8, 1, l0=7.0, fvu=0.65),
        line("relu_l1", 8, 2, l0=8.0, fvu=0.60),
    ])
    fig = plot_metrics_vs_l0(lines, [FVU])
    container = series_container(fig, "relu_l1")
    data_line, _, (x_bars, y_bars) = container.lines
    x, y = xy(data_line)
    np.testing.assert_allclose(x, [8.0, 17.0])  # sorted by mean L0
    np.testing.assert_allclose(y, [(0.61 + 0.65 + 0.60) / 3, 0.47])
    # FVU bars: the 95 % t-interval of the seed mean, mean ± t(0.975, n-1) s / sqrt(n), with the
    # quantiles written out (t(0.975, 2) = 4.3027, t(0.975, 1) = 12.706); L0 bars: the seeds' range
    def interval(values, t):
        mean, sd = np.mean(values), np.std(values, ddof=1)
        return [mean - t * sd / np.sqrt(len(values)), mean + t * sd / np.sqrt(len(values))]

    expected = [interval([0.61, 0.65, 0.60], 4.302652729749464), interval([0.50, 0.44], 12.706204736174704)]
    np.testing.assert_allclose([seg[:, 1] for seg in y_bars.get_segments()], expected, rtol=1e-9)
    np.testing.assert_allclose([seg[:, 0] for seg in x_bars.get_segments()], [[7.0, 9.0], [14.0, 20.0]])
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and "L0" in ax.get_xlabel() and "FVU" in ax.get_ylabel()
    points = aggregate(lines, "fvu")[("relu_l1", "")]
    assert [p.n_seeds for p in points] == [3, 2]


def test_pareto_on_a_hand_made_case():
    lines = from_records([
        line("topk", 8, 0, fvu=0.50), line("batchtopk", 8, 0, fvu=0.40),  # batchtopk dominates topk at 8
        line("topk", 16, 0, fvu=0.45),  # worse than batchtopk 8 with more L0: dominated
        line("batchtopk", 16, 0, fvu=0.30), line("topk", 32, 0, fvu=0.30),  # tie in FVU: fewer L0 wins
        line("topk", 64, 0, fvu=0.20),
    ])
    best = pareto([p for pts in aggregate(lines, "fvu").values() for p in pts])
    assert sorted((p.series[0], p.l0) for p in best) == [("batchtopk", 8.0), ("batchtopk", 16.0), ("topk", 64.0)]
    rings = [l for l in plot_metrics_vs_l0(lines, [FVU]).axes[0].lines if l.get_gid() == "pareto"][0]
    assert sorted(zip(*xy(rings))) == [(8.0, 0.40), (16.0, 0.30), (64.0, 0.20)]
    # higher is better: the ranking flips
    flipped = from_records([line("topk", 8, 0, ce_loss_recovered=0.9), line("batchtopk", 8, 0, ce_loss_recovered=0.8),
                            line("batchtopk", 16, 0, ce_loss_recovered=0.85)])
    best = pareto([p for pts in aggregate(flipped, "ce_loss_recovered").values() for p in pts], higher_is_better=True)
    assert [(p.series[0], p.l0) for p in best] == [("topk", 8.0)]


def test_one_style_per_architecture_in_every_figure(tmp_path):
    lines = from_records(WINNER_CHANGES)
    fvu = plot_metrics_vs_l0(lines, [FVU])
    dead = plot_metric_vs_l0(lines, "dead_fraction", "dead", percent=True)
    for fig in (fvu, dead):
        for architecture in ("topk", "batchtopk"):
            data_line = series_container(fig, architecture).lines[0]
            assert (data_line.get_color(), data_line.get_marker()) == ARCHITECTURES[architecture]
    legend_labels = [t.get_text() for t in fvu.legends[0].get_texts()]
    assert legend_labels == ["topk", "batchtopk", "Pareto-optimal"]  # the table's order, reference last


def test_training_curves_read_the_member_column_against_tokens(tmp_path):
    log = tmp_path / "logs" / "version_0"
    log.mkdir(parents=True)
    (log / "metrics.csv").write_text("epoch,step,topk_a/val/fvu,topk_b/val/fvu,train/loss\n"
                                     "0,10,,,1.0\n0,100,0.8,0.9,\n0,200,0.5,0.7,\n")
    lines = [line("topk", 8, 0, name="topk_b", log_dir="logs/version_0", batch_size=512),
             line("topk", 16, 0, name="topk_a", log_dir=str(log / "metrics.csv"))]  # no batch size
    lines = load_results([write(tmp_path / "results.jsonl", lines)])
    assert curves.read_curve(lines[0]) == ([100.0, 200.0], [0.9, 0.7], 512.0)
    # tokens per step from train_tokens / last step when the line has no batch size
    assert curves.read_curve(lines[1]) == ([100.0, 200.0], [0.8, 0.5], 1_000_000 / 200)
    fig = curves.plot_curves(curves.collect(lines, []))
    plotted = {l.get_gid(): (list(l.get_xdata()), list(l.get_ydata())) for ax in fig.axes for l in ax.lines}
    assert plotted["curve:topk_b"] == ([100 * 512 / 1e6, 200 * 512 / 1e6], [0.9, 0.7])
    notes = []
    curves.collect([{**lines[0], "log_dir": "nowhere", "name": "lost"}], notes)
    assert notes and "lost" in notes[0] and "metrics.csv" in notes[0]


def test_density_histogram_counts_fractions_of_latents_and_dead_ones():
    rng = np.random.default_rng(0)
    values = np.concatenate([10 ** rng.uniform(-4, -1, 90), np.zeros(10)])
    lines = from_records([line("topk", 16, 1, feature_density=list(rng.permutation(values))),
                          line("topk", 16, 0, feature_density=list(values)),
                          line("gated", 32, 0, feature_density=list(values))])
    fig = density.plot_density(lines)  # 16: the target with most architectures... both have one: middle = 16
    (stairs,) = fig.axes[0].patches
    counts, edges, _ = stairs.get_data()
    expected, _ = np.histogram(np.log10(values[values > 0]), bins=edges)
    np.testing.assert_allclose(counts, expected / 100)
    assert edges[0] == -4 and edges[-1] == 0
    assert stairs.get_label() == "topk (dead 10.0%)"


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run folder with every optional input: densities, a training log, compare.yaml, timings."""
    folder = tmp_path_factory.mktemp("run")
    (folder / "log").mkdir()
    (folder / "log" / "metrics.csv").write_text("step,val/fvu\n100,0.6\n200,0.45\n")
    rng = np.random.default_rng(1)
    lines = [{**l, "feature_density": list(10 ** rng.uniform(-3, -1, 32)), "log_dir": "log", "batch_size": 64}
             for l in WINNER_CHANGES]
    lines[0]["dead_fraction"], lines[1]["dead_fraction"] = 0.2, 0.3  # topk at 8: 25% dead
    lines[2]["rel_reconstruction_bias"], lines[3]["rel_reconstruction_bias"] = 0.80, 0.82  # batchtopk at 8 shrinks
    lines[0]["l2_ratio"] = 0.5  # an l2_ratio below 1 alone (angular error) is not shrinkage
    write(folder / "results.jsonl", lines)
    (folder / "compare.yaml").write_text("architectures: [topk, batchtopk]\nl0: [8, 16]\n")
    (folder / "timings.json").write_text(json.dumps({"stages": {"harvest": 12.5, "train": 300.0}, "machine": "2 CPUs"}))
    report = analyse([folder / "results.jsonl"], folder, echo=False)
    return folder, report


def test_every_figure_is_a_png_of_paper_size_and_a_parsing_svg(run_dir):
    folder, _ = run_dir
    stems = {p.stem for p in (folder / "figures").iterdir()}
    assert stems == {"l0_fvu", "l0_ce_loss_recovered", "l0_kl_div", "l0_dead_dense", "l0_shrinkage", "density", "curves"}
    for stem in stems:
        width, height = png_size(folder / "figures" / f"{stem}.png")
        assert width == round(WIDTH_IN * DPI) and 2.5 * DPI < height < 4 * DPI
        assert ET.parse(folder / "figures" / f"{stem}.svg").getroot().tag.endswith("svg")
    assert not [p for p in folder.rglob("*.tmp")]  # atomic writes leave no temporary file behind


def test_report_table_and_summary_agree_with_the_lines(run_dir):
    folder, report = run_dir
    text = report.read_text()
    for l in WINNER_CHANGES:  # every dictionary's row, with its numbers
        row = f"| {l['name']} | {l['architecture']} | {l['l0_target']} | {l['seed']} | {l['l0']:.1f} | {l['fvu']:.4f} |"
        assert row in text
    # two seeds whose ranges do not overlap at L0 8 were called "separable"; a paired test says otherwise
    assert ("Best FVU at equal L0: **topk** at L0 8, **batchtopk** at L0 16; not distinguishable from the runner-up "
            "with 2 seeds at L0 8 and 16.") in text
    assert "| 8 | FVU (lower is better) | **topk** 0.410 | batchtopk 0.460 | not distinguishable with 2 seeds (" in text
    assert ("| 16 | FVU (lower is better) | **batchtopk** 0.320 | topk 0.340 | not distinguishable with 2 seeds: "
            "Δ −0.02 [−0.147, 0.107] at L0 16, Holm p = 0.3 |") in text
    assert "separable" not in text
    document = json.loads((folder / "verdicts.json").read_text())
    assert {(r["a"], r["b"], r["metric"], r["l0_target"]) for r in document["records"]} == {
        ("batchtopk", "topk", metric, target) for metric in ("fvu", "ce_loss_recovered", "kl_div") for target in (8, 16)}
    assert "Dead latents (more than 10% never fire): topk at L0 8 (25%)." in text
    assert ("Shrinkage (mean γ, `rel_reconstruction_bias`, below 0.9): **batchtopk** (γ 0.810–0.810 at L0 8)."
            in text)
    assert "Machine: 2 CPUs" in text and "| train | 300.0 |" in text and "l0: [8, 16]" in text
    html = (folder / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 7 and 'src="figures' not in html  # self-contained
    assert ARCHITECTURES["topk"][0] in html  # the figures' colour beside the name


def test_summary_says_when_one_seed_cannot_separate_and_when_l0_is_missed():
    lines = from_records([line("topk", 8, 0, fvu=0.4), line("gated", 8, 0, fvu=0.5, l0=12.0)])
    header, rows = frontier_table(lines, summary_verdicts(lines)["records"])
    # gated measured L0 12 only: it is not read at L0 8 (no extrapolation), so topk has no runner-up
    assert rows[0] == ["8", "FVU (lower is better)", "**topk** 0.400", "–", "only one series reaches this L0"]
    assert ("Measured L0 more than 5% off the target (marked † in the table; the rankings above interpolate every "
            "series to the same L0 instead): gated 12.0 for 8.") in summarise(lines)
    assert any("No setting has more than 10% dead" in s for s in summarise(from_records(WINNER_CHANGES)))


def test_missing_metric_skips_its_figure_with_a_note(tmp_path, capsys):
    lines = [{k: v for k, v in l.items() if k != "kl_div"} for l in WINNER_CHANGES]
    lines[0]["ce_loss_recovered"] = None  # one line without it: drawn without that line, named
    report = analyse([write(tmp_path / "results.jsonl", lines)], tmp_path / "out")
    figures = {p.name for p in (tmp_path / "out" / "figures").iterdir()}
    assert "l0_kl_div.png" not in figures and "l0_fvu.png" in figures and "l0_ce_loss_recovered.png" in figures
    err = capsys.readouterr().err
    assert "analysis: note: l0_kl_div: no line has both `kl_div` and `l0`; skipped" in err
    assert "1 of 8 lines lack `ce_loss_recovered`" in err and "topk_l0-8_seed0" in err
    assert "l0_kl_div: no line has both" in report.read_text()


def test_mixed_models_are_grouped_and_said(tmp_path, capsys):
    other = [{**l, "model_name": "gpt2"} for l in WINNER_CHANGES[:4]]
    report = analyse([write(tmp_path / "results.jsonl", WINNER_CHANGES + other)], tmp_path)
    assert "analysis: note: the results hold 2 (model, hook) sites" in capsys.readouterr().err
    text = report.read_text()
    assert "**These results hold 2 different (model, hook) sites.**" in text
    assert "### gpt2, `transformer.h.2`" in text and f"### {MODEL}, `transformer.h.2`" in text
    figures = {p.name for p in (tmp_path / "figures").iterdir()}
    assert {"l0_fvu__gpt2__transformer.h.2.png", "l0_fvu__dictlearn-tiny-stdlib__transformer.h.2.png"} <= figures


@pytest.mark.parametrize("content, message", [
    ([], "{path}: no results lines"),
    ([json.dumps(line("topk", 8, 0)), "{not json"], "{path}:2: not a JSON object"),
    (["[1, 2]"], "{path}:1: not a JSON object (a list)"),
    ([json.dumps({"fvu": 0.3})], "{path}:1: no 'architecture'"),
    (None, "{path}: cannot read (No such file or directory)"),
])
def test_bad_input_is_one_line_naming_file_and_line(tmp_path, capsys, content, message):
    path = tmp_path / "results.jsonl" if content is None else write(tmp_path / "results.jsonl", content)
    with pytest.raises(AnalysisError, match=re.escape(message.format(path=path))):
        load_results([path])
    assert analyse_command(path, "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"dictlearn: error: {message.format(path=path)}") and "\n" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("out", ["taken.md", "taken.md/sub"])
def test_out_naming_a_file_is_one_line_and_the_file_is_kept(tmp_path, capsys, out):
    results = write(tmp_path / "run" / "results.jsonl", WINNER_CHANGES)
    (tmp_path / "taken.md").write_text("mine")
    assert analyse_command(results, "--out", tmp_path / out) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"dictlearn: error: --out {tmp_path / out}: {tmp_path / 'taken.md'} is a file, not a folder")
    assert "\n" not in err and (tmp_path / "taken.md").read_text() == "mine"
    with pytest.raises(AnalysisError, match="is a file, not a folder"):  # the library says it too
        analyse([results], tmp_path / out, echo=False)
    assert module_main(curves.draw, "curves", [str(results), "--out", str(tmp_path / out)]) == 2
    assert capsys.readouterr().err.startswith(f"analysis: error: {tmp_path / out}: ")


def test_usage_errors_are_one_line(tmp_path, capsys):
    assert analyse_command() == 2
    assert capsys.readouterr().err.strip() == ("dictlearn: error: analyse: the following arguments are required: "
                                              "results; see dictlearn analyse --help")
    assert analyse_command(tmp_path, "--out", tmp_path / "out") == 2  # a folder is not a results file
    assert capsys.readouterr().err.strip().startswith(f"dictlearn: error: {tmp_path}: cannot read")


def test_analyse_writes_figures_and_report_into_out(tmp_path, capsys):
    results = write(tmp_path / "run" / "results.jsonl", WINNER_CHANGES)
    assert analyse_command(results, "--out", tmp_path / "out") == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "out" / "report.md")
    assert (tmp_path / "out" / "report.html").is_file() and (tmp_path / "out" / "figures" / "l0_fvu.png").is_file()
    assert analyse_command(results) == 0  # one results file: its own folder, as compare wrote it
    assert (tmp_path / "run" / "report.md").is_file()


def test_several_runs_compare_as_distinct_series(tmp_path):
    a = write(tmp_path / "a" / "results.jsonl", WINNER_CHANGES[:4])
    b = write(tmp_path / "b" / "results.jsonl", [{**l, "fvu": l["fvu"] - 0.1} for l in WINNER_CHANGES[:4]])
    lines = load_results([a, b])
    fig = plot_metrics_vs_l0(lines, [FVU])
    np.testing.assert_allclose(xy(series_container(fig, "topk (b)").lines[0])[1], [0.31])
    styles = {label: series_container(fig, label).lines[0].get_linestyle() for label in ("topk (a)", "topk (b)")}
    assert styles["topk (a)"] != styles["topk (b)"]
    assert analyse_command(a, b) == 2  # several runs need --out
    text = analyse([a, b], tmp_path / "both", echo=False).read_text()
    assert "### Run `a`" in text and "### Run `b`" in text and "| topk_l0-8_seed0 | topk (b) | b |" in text


def test_module_entry_points(tmp_path, monkeypatch, capsys):
    path = write(tmp_path / "results.jsonl", WINNER_CHANGES)
    assert module_main(curves.draw, "curves", [str(path), "--out", str(tmp_path / "c")]) == 0
    assert "no line has `log_dir`" in capsys.readouterr().err  # nothing to draw is a note, not an error
    monkeypatch.setattr(sys, "argv", ["dictlearn.analysis.shrinkage", str(path), "--out", str(tmp_path / "s")])
    with pytest.raises(SystemExit) as exit_, warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # in-process, the module was imported before
        runpy.run_module("dictlearn.analysis.shrinkage", run_name="__main__")
    assert exit_.value.code == 0 and (tmp_path / "s" / "l0_shrinkage.svg").stat().st_size > 0


def test_write_report_from_records_in_memory(tmp_path):
    (tmp_path / "timings.json").write_text("{oops")
    lines = [{**l, "mmcs": 0.5 + l["l0_target"] / 100} for l in WINNER_CHANGES]
    report = write_report(tmp_path, lines, echo=False)
    assert report == tmp_path / "report.md" and (tmp_path / "figures" / "l0_mmcs.png").exists()
    assert "timings.json: not readable JSON" in report.read_text()  # a note, not a failed report
    assert len(FIGURES) == 3 and MetricSpec("probe_auc_k1", "probe AUC", "higher").better == "higher"


def test_timings_written_before_the_report_leave_out_its_own_stage(tmp_path):
    """compare writes timings.json just before the report (`complete: false`): the report's own
    stage is not over, so the table must not show its partial seconds nor call that sum the total."""
    stages = {"harvest": 12.4, "train": 309.9, "report": 0.0, "total": 390.0}
    (tmp_path / "timings.json").write_text(json.dumps({"stages": stages, "machine": "2 CPUs", "complete": False}))
    text = write_report(tmp_path, list(WINNER_CHANGES), echo=False).read_text()
    rows = [line for line in text.splitlines() if line.startswith("|")]
    assert any("total before the report" in row and "390.0" in row for row in rows)
    assert not any(row.split("|")[1].strip() in ("report", "total") for row in rows)
    stages["report"], stages["total"] = 6.4, 396.4  # the file compare writes at its end
    (tmp_path / "timings.json").write_text(json.dumps({"stages": stages, "machine": "2 CPUs", "complete": True}))
    rows = [line for line in write_report(tmp_path, list(WINNER_CHANGES), echo=False).read_text().splitlines()
            if line.startswith("|")]
    assert any(row.split("|")[1].strip() == "total" and "396.4" in row for row in rows)


def test_long_outside_labels_wrap_and_leave_the_axes_their_width():
    """An outside dictionary's legend label ("name (format, not trained here) (dead …, L0 …)")
    once took the figure's width, squeezing the density axes to a sliver and clipping the x label."""
    rng = np.random.default_rng(0)
    lines = [{"name": f"{a}_16", "architecture": a, "mapping": "sae", "l0": 16, "fvu": 0.1, "seed": 0,
              "l0_target": 16, "feature_density": list(10 ** rng.uniform(-4, -0.5, 64))} for a in ("topk", "gated")]
    lines.append({"name": "dictionary_learning_batchtopk", "architecture": "batchtopk", "mapping": "sae", "l0": 16.3,
                  "fvu": 0.1, "trained": False, "format": "dictionary_learning", "source": "/x",
                  "feature_density": list(10 ** rng.uniform(-4, -0.5, 64))})
    fig = density.plot_density(from_records(lines, "results.jsonl"), 16)
    fig.canvas.draw()
    (legend,) = fig.legends
    assert max(len(line) for t in legend.get_texts() for line in t.get_text().splitlines()) <= 34
    assert fig.axes[0].get_position().width > 0.45  # 0.03 before the labels wrapped


def _three_seed_lines(gap: float, noise: float = 0.002, rng_seed: int = 0) -> list[dict]:
    """topk and relu_l1 at L0 8, 16, 32 over 3 seeds; relu_l1's FVU is `gap` above topk's and lands
    10 % above each target (so the ranking must interpolate); seed effects shared by both series."""
    rng = np.random.default_rng(rng_seed)
    lines = []
    for seed in range(3):
        shared = rng.normal(0, 0.01)  # what the seed's batches do to both
        for target in (8, 16, 32):
            base = 0.7 - 0.1 * np.log2(target) + shared
            lines.append(line("topk", target, seed, fvu=base + rng.normal(0, noise)))
            l0 = 1.1 * target
            lines.append(line("relu_l1", target, seed, l0=l0, fvu=0.7 - 0.1 * np.log2(l0) + shared + gap
                              + rng.normal(0, noise)))
    return lines


def test_a_true_gap_is_claimed_and_identical_series_are_not(tmp_path):
    """A/B through the report's own path: a gap of 0.1 FVU at equal L0 is claimed (better, with the
    right leader) at every target; A/A (no gap) claims nothing; ranking at the same measured L0."""
    lines = from_records(_three_seed_lines(gap=0.1))
    text = "\n".join(summarise(lines))
    # relu_l1's lowest L0 is 8.8: it does not reach 8, so it is not ranked there
    assert ("Best FVU at equal L0: **topk** at L0 16 and 32, topk alone at L0 8 (no other series reaches it); "
            "ahead of the runner-up by a paired test over seeds (Holm-corrected) at L0 16 and 32.") in text
    assert "(no extrapolation): relu_l1 at L0 8." in text
    header, rows = frontier_table(lines, summary_verdicts(lines)["records"])
    fvu_16 = next(row for row in rows if row[0] == "16" and row[1].startswith("FVU"))
    assert fvu_16[2].startswith("**topk**") and fvu_16[4].startswith("**better**: Δ −0.1")
    # A/A: the same curve under two names; over 200 reports at most 5 % may claim anything (Holm's
    # family-wise rate): 10 expected at 5 %, 16 is 2.5 binomial standard deviations above it, and
    # tests without the correction claim in ~10 % (two cells) to ~37 % (nine) of reports
    false_reports = sum(
        any(r["claim"] != "not distinguishable"
            for r in summary_verdicts(from_records(_three_seed_lines(gap=0.0, rng_seed=1 + i)))["records"])
        for i in range(200))
    assert false_reports <= 16


def test_each_sites_summary_counts_its_cells_and_names_the_reports_holm_family(tmp_path):
    """Two sites: Holm runs over both sites' leader-against-runner-up cells, and each site's
    sentence says how many of them its own table tests."""
    from dictlearn.analysis.report import _site_document
    from dictlearn.analysis.summary import claims_sentence

    both = _three_seed_lines(gap=0.1) + [{**l, "hook_name": "transformer.h.1"} for l in _three_seed_lines(gap=0.1)]
    lines = from_records(both)
    document = summary_verdicts(lines)
    assert document["report_family_size"] == 4  # FVU at L0 16 and 32 per site; L0 8 has one series
    for hook in (HOOK, "transformer.h.1"):
        (sentence,) = claims_sentence(_site_document(document, (MODEL, hook)))
        assert sentence.startswith("The table below tests 2 leader-against-runner-up cells (of 6; the others")
        assert "Holm over all 4 tested cells of the report, every site's" in sentence
    (alone,) = claims_sentence(summary_verdicts(from_records(_three_seed_lines(gap=0.1))))
    assert "tests 2 leader-against-runner-up cells" in alone and "(paired t over seeds, Holm over those cells)" in alone


def test_one_seed_or_one_point_says_what_it_cannot_conclude():
    one_seed = from_records([l for l in _three_seed_lines(gap=0.1) if l["seed"] == 0])
    text = "\n".join(summarise(one_seed))
    assert "not distinguishable from the runner-up with 1 seed" in text and "ahead of" not in text
    one_point = from_records([l for l in _three_seed_lines(gap=0.1) if l["l0_target"] == 16])
    records = summary_verdicts(one_point)["records"]
    assert records and all(r["claim"] in (None, "not distinguishable") for r in records)
    summarise(from_records([line("topk", 8, 0)]))  # a single dictionary: no pair, no crash


@pytest.mark.parametrize("split, expected", [
    (dict(heldout="documents", heldout_rows=24_546, heldout_documents=53),
     "Held-out rows: 24,546 from 53 held-out documents that no training row shares"),
    (dict(heldout="tail", heldout_rows=2_560, heldout_documents=None),
     "Held-out rows: 2,560, the block tail of the file (it records no held-out documents): they may share"),
    ({}, "Held-out rows: not recorded"),
])
def test_setup_names_the_split_the_metrics_used(tmp_path, split, expected):
    lines = [line(a, t, s, **split) for a in ("topk", "jumprelu") for t in (8, 16) for s in (0, 1)]
    report = write_report(tmp_path, lines, echo=False).read_text()
    setup = report[report.index("## Setup"):]
    assert expected in setup and setup.count("Held-out rows:") == 1


def _five_identical(rng_seed: int) -> list[dict]:
    """Five architectures drawn from one curve (3 seeds × L0 8, 16, 32, measured L0 jittered 3 %)."""
    rng = np.random.default_rng(rng_seed)
    lines = []
    for seed in range(3):
        shared = rng.normal(0, 0.01)  # what the seed's batches do to every architecture
        for target in (8, 16, 32):
            for architecture in ("topk", "batchtopk", "gated", "jumprelu", "relu_l1"):
                l0 = target * (1 + rng.normal(0, 0.03))
                lines.append(line(architecture, target, seed, l0=l0,
                                  fvu=0.7 - 0.1 * np.log2(l0) + shared + rng.normal(0, 0.004),
                                  ce_loss_recovered=0.9 + shared + rng.normal(0, 0.004),
                                  kl_div=0.1 + rng.normal(0, 0.004)))
    return lines


def test_leader_against_runner_up_keeps_the_family_wise_rate_among_five_identical_series():
    """The report's family is the leader against the runner-up per cell, picked on the same numbers
    it tests: over 200 A/A reports of five identical series at most 5 % may claim anything (this
    fixed stream: 3 %; 16 of 200 is the bound, as above)."""
    false_reports = 0
    for i in range(200):
        records = summary_verdicts(from_records(_five_identical(i)))["records"]
        assert sum(r["family"] == "report" for r in records) <= 9  # one per L0 target and metric (where two reach it)
        false_reports += any(r["claim"] != "not distinguishable" for r in records if r["family"] == "report")
    assert false_reports <= 16
