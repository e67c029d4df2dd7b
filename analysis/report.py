"""The run report: figures into `OUT/figures/`, then `OUT/report.md` and `OUT/report.html`.

`analyse(paths, out)` is what `dictlearn analyse` runs; `write_report(run_dir, results)`
is the same for lines already in memory (as `dictlearn compare` holds them at its end). Sections:
setup (with `--tune-lr`'s learning-rate search), summary (analysis.summary, learning rates), figures,
every dictionary's metrics, notes.
"""

from __future__ import annotations

import json
from pathlib import Path

from dictlearn.analysis import (curves, density, frontier, l0_scan, l0_scan_text, learning_rates, probing, recovery,
                                replacement, shrinkage, sparsity, splitting)
from dictlearn.analysis.cli import checked_folder, draw_groups, print_notes
from dictlearn.analysis.render import (Bullets, Code, Heading, Image, Legend, Links, Paragraph, Table, html_page,
                                       markdown)
from dictlearn.analysis.results import from_records, group_by_site, is_outside, load_results, series_label, value
from dictlearn.analysis.style import Drawn, architecture_style, outside_styles, series_order
from dictlearn.analysis.summary import L0_SHOWN, frontier_table, record_group, summarise, verdicts
from dictlearn.io import atomic_write_text

#: every figure family, in report order; each has draw(lines, out_dir, notes, site) -> [Drawn]
FAMILIES = (frontier, sparsity, shrinkage, recovery, probing, l0_scan, density, curves, splitting)

#: (key, column title, format); a column shows only when some line has the key
COLUMNS = (
    ("l0_target", "L0 target", "g"), ("seed", "seed", "d"), ("d_sae", "d_sae", "d"), ("l0", "L0", ".1f"),
    ("fvu", "FVU", ".4f"), ("cos_sim", "cos sim", ".4f"), ("l2_ratio", "L2 ratio", ".3f"),
    ("rel_reconstruction_bias", "γ", ".3f"), ("dead_fraction", "dead", "%"), ("dense_fraction", "dense", "%"),
    ("ce_loss_recovered", "CE recovered", ".4f"), ("kl_div", "KL", ".4f"), ("delta_ce", "ΔCE", ".4f"),
    ("jacobian_cos", "Jacobian cos", ".3f"),
    ("mmcs", "MMCS", ".3f"), ("probe_auc_k1", "probe AUC k=1", ".3f"), ("probe_auc_k16", "probe AUC k=16", ".3f"),
    ("concept_coverage", "concept coverage", "%"), ("nth_decoder_projection", "s_n^dec", ".4f"),
    ("train_seconds", "train s", ".0f"),
)


def draw_all(lines: list[dict], figures_dir: Path, notes: list[str]) -> list[Drawn]:
    drawn = []
    for family in FAMILIES:
        drawn += draw_groups(lines, family.draw, figures_dir, notes)
    return drawn


def analyse(paths: list[str | Path], out_dir: str | Path, echo: bool = True) -> Path:
    """Results files -> figures and report under `out_dir`; -> the report.md path."""
    out_dir = checked_folder(Path(out_dir))
    return _write(load_results(paths), out_dir, echo)


def write_report(run_dir: str | Path, results: list[dict], out_dir: str | Path | None = None, echo: bool = True) -> Path:
    """In-memory results lines of the run in `run_dir` -> figures and report there (or in
    `out_dir`); compare.yaml and timings.json are read from `run_dir`. -> report.md's path."""
    run_dir = Path(run_dir)
    return _write(from_records(results, str(run_dir / "results.jsonl")), Path(out_dir or run_dir), echo)


def _write(lines: list[dict], out_dir: Path, echo: bool) -> Path:
    notes: list[str] = []
    replaced = [line for line in lines if replacement.is_replacement(line)]  # --replace: their own section
    lines = [line for line in lines if not replacement.is_replacement(line)]
    outside_styles(series_label(line["_series"]) for line in lines if is_outside(line))  # one colour each
    sites = group_by_site(lines)
    if len(sites) > 1:
        notes.append(f"the results hold {len(sites)} (model, hook) sites: "
                     + "; ".join(f"{model}, {hook}" for model, hook in sites) + "; each is drawn and summarised apart")
    drawn = draw_all(lines, out_dir / "figures", notes)
    document = verdicts(lines) if lines else None  # every claim of the report comes from here
    extra: list = []
    if replaced:
        extra, document = _replacement_section(replaced, out_dir, notes, document, len(drawn))
    atomic_write_text(out_dir / "verdicts.json", json.dumps(document, indent=1) + "\n")
    if lines:
        blocks = report_blocks(lines, drawn, notes, document)
        at = next((i for i, b in enumerate(blocks) if b == Heading(2, "Notes")), len(blocks))
        blocks = blocks[:at] + extra + blocks[at:]
    else:
        blocks = setup_blocks(replaced, notes) + extra + ([Heading(2, "Notes"), Bullets(tuple(notes))] if notes else [])
    blocks += dashboard_blocks(out_dir)
    if echo:
        print_notes(notes)
    title = "dictlearn comparison: " + ", ".join(sorted({str(line["_run"]) for line in lines}))
    atomic_write_text(out_dir / "report.md", markdown([Heading(1, title)] + blocks, out_dir))
    atomic_write_text(out_dir / "report.html", html_page([Heading(1, title)] + blocks, title))
    return out_dir / "report.md"


def _replacement_section(replaced: list[dict], out_dir: Path, notes: list[str], document: dict | None,
                         figures_before: int) -> tuple[list, dict]:
    """The replacement models' blocks, and the verdicts document with their records added
    (dictlearn.analysis.replacement)."""
    drawn = replacement.draw(replaced, out_dir / "figures", notes)
    found = replacement.verdicts(replaced)
    if document is None:
        document = found
    else:
        document = {**document, "records": document["records"] + found["records"],
                    "notes": document["notes"] + found["notes"],
                    "replacement_report_family_size": found["report_family_size"]}
    return replacement.blocks(replaced, drawn, found, first_figure=figures_before + 1), document


def report_blocks(lines: list[dict], drawn: list[Drawn], notes: list[str], document: dict | None = None) -> list:
    document = verdicts(lines) if document is None else document
    groups = group_by_site(lines)
    several = len(groups) > 1
    blocks = setup_blocks(lines, notes)
    if several:
        blocks.append(Paragraph(f"**These results hold {len(groups)} different (model, hook) sites.** Dictionaries of "
                                "different sites are never compared: each site has its own summary, figures and table."))
    numbered = {d.png: n for n, d in enumerate(drawn, start=1)}
    for title, make in (("Summary", summary_blocks), ("Figures", None), ("Dictionaries", table_blocks)):
        blocks.append(Heading(2, title))
        if make is None:
            blocks.append(Paragraph(FIGURE_KEY))
        for site, members in groups.items():
            if several:
                blocks.append(Heading(3, f"{site[0]}, `{site[1]}`"))
            if make is summary_blocks:
                blocks += summary_blocks(members, _site_document(document, site))
            elif make is not None:
                blocks += make(members)
            else:
                blocks += [Image(d.png, d.caption, numbered[d.png]) for d in drawn if d.site == (site if several else None)]
    if notes:
        blocks += [Heading(2, "Notes"), Bullets(tuple(notes))]
    return blocks


def dashboard_blocks(out_dir: Path) -> list:
    """Links to the feature dashboards `dictlearn compare` wrote into `out_dir/dashboards/`."""
    pages = sorted((out_dir / "dashboards").glob("*.html"), key=lambda p: series_order((p.stem, "")))
    if not pages:
        return []
    return [Heading(2, "Feature dashboards"),
            Paragraph("One `dictlearn inspect` page per architecture (its middle L0 target, first seed): every alive "
                      "latent's density and maximum, and cards with top and interval contexts, histogram, logit lens "
                      "and nearest latents."),
            Links(tuple((p.stem, f"dashboards/{p.name}") for p in pages))]


FIGURE_KEY = ("In the figures against L0, a marker is the mean over seeds; its vertical bar is the 95 % confidence "
              "interval of the metric's seed mean (Student t over seeds; one seed draws none) and its horizontal bar "
              "the seeds' range of measured L0. Black "
              "rings mark the Pareto-optimal settings over all architectures. The L0 axis is logarithmic, as SAEBench "
              "draws it (Karvonen et al. 2025).")

VERDICT_KEY = ("At each L0 every series is read at that same L0, interpolated along log L0 between its own measured "
               "points seed by seed (never extrapolated), and the best seed mean leads. **better**: a paired t-test "
               "over seeds (seed s of one series against seed s of the other: same initial-weight seed, same batches) "
               "rejects equality after Holm's correction over the report's leader-against-runner-up cells, every table's "
               "(family-wise α = 0.05); "
               "Δ is leader minus runner-up with its 95 % interval, at the L0 the pair is compared at (the interval is "
               "not widened for the correction, so it can exclude 0 where the corrected test does not reject). Otherwise "
               "the two are **not distinguishable** with these seeds, whatever the gap between the means. "
               "docs/compare.md, \"How to read a verdict\".")


def _site_document(document: dict, site: tuple[str, str]) -> dict:
    """The verdicts.json document restricted to one (model, hook) site."""
    records = [r for r in document.get("records", []) if record_group(r)[:2] == list(site)]
    return {**document, "records": records}


def summary_blocks(lines: list[dict], document: dict | None = None) -> list:
    document = verdicts(lines) if document is None else document
    blocks: list = [Bullets(tuple(summarise(lines, document) + learning_rates.sentences(lines)))]
    header, rows = frontier_table(lines, document.get("records", []))
    if rows:
        blocks += [Paragraph(VERDICT_KEY), Table(tuple(header), tuple(map(tuple, rows)))]
    return blocks + probing.summary_blocks(lines) + l0_scan_text.summary_blocks(lines)


def table_blocks(lines: list[dict]) -> list:
    columns = [c for c in COLUMNS if any(value(line, c[0]) is not None for line in lines)]
    # a width every line shares is in the setup; a column of one number would only widen the table
    columns = [c for c in columns if c[0] != "d_sae" or len({value(line, "d_sae") for line in lines}) > 1]
    runs = len({line["_run"] for line in lines}) > 1
    outside = any(is_outside(line) for line in lines)  # a column saying which dictionaries the run trained
    header = (("name", "architecture") + (("run",) if runs else ()) + (("trained by",) if outside else ())
              + tuple(title for _, title, _ in columns))
    ordered = sorted(lines, key=lambda l: (series_order(l["_series"]), value(l, "l0_target") or 0, value(l, "seed") or 0))
    rows = []
    for line in ordered:
        cells = [str(line.get("name") or "–"), series_label(line["_series"])] + ([str(line["_run"])] if runs else [])
        if outside:
            cells.append(f"elsewhere ({line.get('format') or '?'})" if is_outside(line) else "this run")
        values = [_cell(value(line, key), fmt) + (" †" if key == "l0" and _off_target(line) else "")
                  for key, _, fmt in columns]
        rows.append(tuple(cells + values))
    if any(_off_target(line) for line in lines):
        return [Table(header, tuple(rows), swatch_column=1),
                Paragraph(f"†: measured L0 more than {L0_SHOWN:.0%} off its target.")]
    return [Table(header, tuple(rows), swatch_column=1)]


def _off_target(line: dict) -> bool:
    l0, target = value(line, "l0"), value(line, "l0_target")
    return l0 is not None and bool(target) and abs(l0 - target) > L0_SHOWN * target


def _cell(x: float | None, fmt: str) -> str:
    if x is None:
        return "–"
    if fmt == "%":
        return f"{100 * x:.1f}%"
    return f"{int(x)}" if fmt == "d" else format(x, fmt)


def _distinct(lines: list[dict], key: str) -> list:
    found = {line.get(key) for line in lines if line.get(key) is not None}
    return sorted(found, key=lambda v: (not isinstance(v, (int, float)), v if isinstance(v, (int, float)) else str(v)))


def setup_blocks(lines: list[dict], notes: list[str]) -> list:
    """What was compared, on what, and how long it took; one part per run folder."""
    blocks: list = [Heading(2, "Setup")]
    folders = sorted({line["_folder"] for line in lines})
    for folder in folders:
        members = [line for line in lines if line["_folder"] == folder]
        if len(folders) > 1:
            blocks.append(Heading(3, f"Run `{members[0]['_run']}` ({folder})"))
        blocks += _run_setup(members, Path(folder), notes)
    return blocks


def _run_setup(lines: list[dict], folder: Path, notes: list[str]) -> list:
    join = lambda key: ", ".join(f"`{v}`" if isinstance(v, str) else f"{v:,}" if isinstance(v, int) else str(v)
                                  for v in _distinct(lines, key)) or "not recorded"
    outside = [line for line in lines if is_outside(line)]
    lines = [line for line in lines if not is_outside(line)] or lines
    architectures = sorted({line["architecture"] for line in lines}, key=lambda a: series_order((a, "")))
    replaced = any(replacement.is_replacement(line) for line in lines)
    counts = [len(architectures), len(_distinct(lines, "l0_target")), len(_distinct(lines, "seed"))]
    shape = ""
    if counts[0] * counts[1] * counts[2] == len(lines):
        shape = f" ({counts[0]} architectures × {counts[1]} L0 targets × {counts[2]} seeds)"
    items = [f"Model: {join('model_name')}; hook: {join('hook_name')}"
             + (f" → {join('hook_name_out')}" if _distinct(lines, "hook_name_out") else ""),
             f"Activations: {join('data')}",
             _split_line(lines),
             f"Dictionaries: {len(lines)}{shape}; d_sae {join('d_sae')}" if not replaced else
             f"Replacement models (every MLP replaced at once): {len(lines)}"
             f"{shape.replace('architectures', 'replacements')}; latents per layer {join('d_sae')}; "
             "L0 targets are totals over layers",
             f"Architectures: {', '.join(architectures)}",
             f"L0 targets: {join('l0_target')}; seeds: {join('seed')}",
             f"Training tokens per dictionary: {join('train_tokens')}"]
    if outside:
        items.append("Included, not trained by this run (evaluated on the same rows, no seeds): " + "; ".join(
            f"{line.get('name')} ({line.get('format')}, {line.get('architecture')}, `{line.get('source')}`)"
            for line in outside))
    seconds = [value(line, "train_seconds") for line in lines if value(line, "train_seconds") is not None]
    if seconds:
        items.append(f"Training time: {sum(seconds):,.0f} s over all dictionaries (sum of `train_seconds`)")
    machine, stages = read_timings(folder, notes)
    if machine:
        items.append(f"Machine: {machine}")
    shown = architectures + [series_label(line["_series"]) for line in outside]
    blocks: list = [Bullets(tuple(items)), Legend(tuple((a, *architecture_style(a)) for a in shown))]
    if stages:
        rows = tuple((stage, f"{seconds:,.1f}") for stage, seconds in stages.items())
        blocks += [Paragraph("Wall time per stage (`timings.json`):"), Table(("stage", "seconds"), rows)]
    blocks += learning_rates.search_blocks(folder, notes)
    config = folder / "compare.yaml"
    if config.is_file():
        blocks.append(Code(config.read_text(encoding="utf-8", errors="replace"), "The resolved sweep, `compare.yaml`:"))
    return blocks


def _split_line(lines: list[dict]) -> str:
    """Which rows every metric was measured on (the results' `heldout`, `heldout_rows`, `heldout_documents`)."""
    kinds = _distinct(lines, "heldout")
    if not kinds:
        return "Held-out rows: not recorded (results from before the split was recorded)"
    rows = ", ".join(f"{v:,}" for v in _distinct(lines, "heldout_rows"))
    documents = ", ".join(f"{v:,}" for v in _distinct(lines, "heldout_documents") if v is not None)
    if kinds == ["documents"]:
        plural = "" if documents == "1" else "s"
        return f"Held-out rows: {rows} from {documents} held-out document{plural} that no training row shares"
    return (f"Held-out rows: {rows}, the block tail of the file (it records no held-out documents"
            + (f"; {documents} documents there" if documents else "") + "): they may share documents with the "
            "last training rows, and their standard errors are not known")


def read_timings(folder: Path, notes: list[str]) -> tuple[str | None, dict[str, float]]:
    """`timings.json` -> (machine description, {stage: seconds}). Accepted: {"stages": {stage:
    seconds}, "machine": str or object} or a flat {stage: seconds, "machine": ...}. A file that
    does not parse is a note: the report is worth having without it."""
    path = folder / "timings.json"
    if not path.is_file():
        return None, {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        notes.append(f"{path}: not readable JSON ({getattr(error, 'msg', error)}); timings left out")
        return None, {}
    if not isinstance(raw, dict):
        notes.append(f"{path}: not an object of stage -> seconds; timings left out")
        return None, {}
    machine = raw.get("machine")
    if isinstance(machine, dict):
        machine = ", ".join(f"{k}: {v}" for k, v in machine.items())
    stages = raw.get("stages") if isinstance(raw.get("stages"), dict) else raw
    stages = {str(k): float(v) for k, v in stages.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if raw.get("complete") is False:  # written by compare just before this report: its own stage is not over
        stages.pop("report", None)
        if "total" in stages:
            stages["total before the report"] = stages.pop("total")
    return (str(machine) if machine else None), stages

