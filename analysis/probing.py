"""Known concepts: sparse-probe ROC-AUC and concept coverage against L0, next to the linear probe.

Drawn when the results carry `probe_auc_k1` (activation files with concept labels, i.e. a
Python corpus harvested by dictlearn). The probe figure puts k = 1 and k = 16 side by side, the
linear probe on the full activation as a dashed line, as SAEBench draws its sparse probing
(Karvonen et al. 2025); the question is Kantamneni et al. 2025's: do probes on a dictionary's
top latents reach a plain linear probe on known concepts? The report's sentences and table
(`summary_blocks`) say, for every architecture, concept and L0 target, whether it matches it
(its 95 % interval, seed spread plus a bootstrap over the test documents, includes the linear
probe's AUC), falls short or lies above: counted per architecture in one table, concept by
concept in another, and in words only for the concepts every dictionary or none reaches.
"""

from __future__ import annotations

import sys
from pathlib import Path

from dictlearn.analysis.cli import module_main
from dictlearn.analysis.metric_plot import MetricFigure, MetricSpec, draw_specs
from dictlearn.analysis.render import Bullets, Paragraph, Table
from dictlearn.analysis.results import series_label, value
from dictlearn.analysis.style import Drawn
from dictlearn.analysis.summary import targets

KS = (1, 16)
LINEAR_LABEL = "linear probe (full activation)"
COVERAGE = MetricSpec("concept_coverage", "concept coverage (F1 ≥ 0.5)", better="higher", percent=True)
F1_MEAN = MetricSpec("concept_f1_mean", "best latent's F1 (concept mean)", better="higher")


def _linear(lines: list[dict]) -> float | None:
    """The baseline of these lines (one file and input: one value; several: their mean)."""
    found = [value(line, "probe_auc_linear") for line in lines if value(line, "probe_auc_linear") is not None]
    return sum(found) / len(found) if found else None


def figures(lines: list[dict]) -> list[MetricFigure]:
    linear = _linear(lines)
    probes = tuple(MetricSpec(f"probe_auc_k{k}", f"probe ROC-AUC, k = {k} latent{'s' if k > 1 else ''}",
                              better="higher", reference=linear, reference_label=LINEAR_LABEL) for k in KS)
    return [
        MetricFigure("l0_probe_auc", probes,
                     "Test ROC-AUC of logistic probes on a dictionary's top k latents (ranked by mean difference "
                     "on the training documents), mean over the probed concepts; dashed: the logistic probe on the "
                     "full activation, same splits. Higher is better."),
        MetricFigure("l0_concept_coverage", (COVERAGE, F1_MEAN),
                     "Left: share of alive latents whose firing matches some concept with F1 ≥ 0.5. Right: per "
                     "concept the best single latent's F1, averaged over concepts (low: the concept is split "
                     "across latents or absorbed). Higher is better."),
    ]


def draw(lines: list[dict], out_dir: Path, notes: list[str], site: tuple[str, str] | None = None) -> list[Drawn]:
    # files without concept labels carry no probe keys: nothing to draw, nothing to note
    if not any(value(line, "probe_auc_k1") is not None for line in lines):
        return []
    return draw_specs(lines, figures(lines), out_dir, notes, site)


# ----------------------------------------------------------------------------- the report's words
# No architecture is picked as "best" on the test AUC (that would be a choice made on the test
# side, and its maximum is biased upwards): every architecture is shown, and each is said to
# match the linear probe only when its interval includes the linear probe's AUC.
Z = 1.959964  # 95 % normal quantile for the probe intervals


def _seed_mean(aucs: list[float], ses: list[float | None]) -> tuple[float, float | None]:
    """(mean, standard error) of one series' AUC over seeds. The seeds share the test documents,
    so their bootstrap errors do not average out: SE² = s²/n (seed spread) + mean(se²), as
    dictlearn.analysis.statistics adds evaluation error to seed variance. None without any se."""
    n = len(aucs)
    mean = sum(aucs) / n
    known = [se for se in ses if se is not None]
    if not known:
        return mean, None
    spread = sum((a - mean) ** 2 for a in aucs) / (n - 1) / n if n > 1 else 0.0
    return mean, (spread + sum(se**2 for se in known) / len(known)) ** 0.5


def _concept_means(lines: list[dict], target) -> dict[str, dict]:
    """{concept: {"linear": AUC, "series": {series: {k: (seed-mean AUC, SE or None)}}}} at one L0 target."""
    at = [line for line in lines if line.get("l0_target") == target and isinstance(line.get("probes"), dict)]
    sums: dict[str, dict] = {}
    for line in at:
        for concept, probe in line["probes"].items():
            if not isinstance(probe, dict) or "linear" not in probe:
                continue
            entry = sums.setdefault(concept, {"linear": [], "series": {}})
            entry["linear"].append(probe["linear"])
            per_k = entry["series"].setdefault(line["_series"], {k: ([], []) for k in KS})
            for k in KS:
                if probe.get(f"k{k}") is not None:
                    per_k[k][0].append(probe[f"k{k}"])
                    per_k[k][1].append(probe.get(f"k{k}_se"))
    return {c: {"linear": sum(e["linear"]) / len(e["linear"]) if e["linear"] else None,
                "series": {s: {k: _seed_mean(*v) if v[0] else None for k, v in ks.items()}
                           for s, ks in e["series"].items()}}
            for c, e in sums.items()}


def _matches(auc: float, se: float | None, linear: float) -> bool | None:
    """Whether the 95 % interval auc ± Z·se includes `linear`; None when no se is known."""
    return None if se is None else abs(auc - linear) <= Z * se


def _outcomes(lines: list[dict]) -> dict[tuple, dict[str, dict[str, str]]]:
    """{(L0 target, k): {series: {concept: "match" | "above" | "short" | "unknown"}}}: each
    sparse probe against the linear probe of its concept, judged by its 95 % interval."""
    judged: dict[tuple, dict[str, dict[str, str]]] = {}
    for target in targets(lines):
        for concept, entry in _concept_means(lines, target).items():
            for series, ks in entry["series"].items():
                for k in KS:
                    if ks[k] is None or entry["linear"] is None:
                        continue
                    match = _matches(*ks[k], entry["linear"])
                    outcome = "unknown" if match is None else "match" if match else (
                        "above" if ks[k][0] > entry["linear"] else "short")
                    judged.setdefault((target, k), {}).setdefault(series, {})[concept] = outcome
    return judged


def probe_sentences(lines: list[dict]) -> list[str]:
    """The linear baseline and the sparse probes' range; then the concepts every dictionary
    reaches at k = 16 and those none reaches (per concept and architecture: `probe_counts` and
    `concept_table`)."""
    linear = _linear(lines)
    if linear is None:
        return []
    means = {k: [value(line, f"probe_auc_k{k}") for line in lines if value(line, f"probe_auc_k{k}") is not None]
             for k in KS}
    spans = "; ".join(f"k = {k} {min(v):.3f}–{max(v):.3f}" for k, v in means.items() if v)
    sentences = [f"Known concepts: the linear probe on the full activation reaches ROC-AUC {linear:.3f} (mean over "
                 f"the probed concepts); the sparse probes, over all dictionaries: {spans}. A sparse probe matches "
                 "the linear one on a concept when its 95 % interval (seed spread and a bootstrap over the test "
                 "documents) includes the linear probe's AUC."]
    judged = _outcomes(lines)
    if judged and all(o == "unknown" for by_series in judged.values() for by_concept in by_series.values()
                      for o in by_concept.values()):
        return sentences + ["No probe result carries an interval (its standard errors were not recorded, e.g. "
                            "results of an older dictlearn evaluate), so nothing here says whether a sparse probe "
                            "matches the linear one; the table shows the AUCs."]
    k16 = [by_series for (_, k), by_series in judged.items() if k == 16]
    concepts = list(dict.fromkeys(c for by_series in k16 for by_concept in by_series.values() for c in by_concept))
    every = [c for c in concepts if all(by_concept.get(c) in ("match", "above")
                                        for by_series in k16 for by_concept in by_series.values())]
    never = [c for c in concepts if all(by_concept.get(c) == "short"
                                        for by_series in k16 for by_concept in by_series.values())]
    if every:
        sentences.append(f"Every dictionary's k = 16 probe matches or beats the linear probe at every L0 target on "
                         f"{len(every)} of {len(concepts)} concepts: {', '.join(every)}.")
    if never:
        sentences.append(f"No dictionary's k = 16 probe reaches the linear probe at any L0 target on {len(never)} "
                         f"of {len(concepts)} concepts: {', '.join(never)}.")
    return sentences


def probe_counts(lines: list[dict]) -> tuple[list[str], list[list[str]]]:
    """One row per architecture; per k and L0 target, on how many of the probed concepts its
    sparse probe matches the linear probe, "(+n above)" where it lies above, "(n no interval)"
    where no standard error was recorded."""
    judged = _outcomes(lines)
    columns = sorted(judged, key=lambda key: (key[1], key[0]))
    series = list(dict.fromkeys(s for by_series in judged.values() for s in by_series))
    header = ["architecture", *[f"k = {k}, L0 {target:g}" for target, k in columns]]
    rows = []
    for s in series:
        cells = []
        for key in columns:
            outcomes = list(judged[key].get(s, {}).values())
            if not outcomes:
                cells.append("–")
                continue
            cell = f"{outcomes.count('match') + outcomes.count('above')} of {len(outcomes)}"
            if outcomes.count("above"):
                cell += f" ({outcomes.count('above')} above)"
            if outcomes.count("unknown"):
                cell += f" ({outcomes.count('unknown')} no interval)"
            cells.append(cell)
        rows.append([series_label(s), *cells])
    return header, rows


def concept_table(lines: list[dict]) -> tuple[list[str], list[list[str]]]:
    """One row per probed concept and L0 target: the linear AUC, then every architecture's
    k = 16 AUC with its 95 % interval and whether that includes the linear AUC."""
    per_target = {target: _concept_means(lines, target) for target in targets(lines)}
    series = list(dict.fromkeys(s for concepts in per_target.values() for e in concepts.values() for s in e["series"]))
    header = ["concept", "L0 target", "linear", *[f"{series_label(s)} k = 16" for s in series]]
    rows = []
    names = list(dict.fromkeys(c for concepts in per_target.values() for c in concepts))
    for concept in names:
        for target, concepts in per_target.items():
            entry = concepts.get(concept)
            if entry is None or entry["linear"] is None:
                continue
            cells = [_cell(entry["series"].get(s, {}).get(16), entry["linear"]) for s in series]
            rows.append([concept, f"{target:g}", f"{entry['linear']:.3f}", *cells])
    return header, rows


def _cell(result: tuple[float, float | None] | None, linear: float) -> str:
    if result is None:
        return "–"
    auc, se = result
    if se is None:
        return f"{auc:.3f}"
    mark = "matches" if _matches(auc, se, linear) else "above" if auc > linear else "short"
    return f"{auc:.3f} [{auc - Z * se:.3f}, {auc + Z * se:.3f}] {mark}"


def summary_blocks(lines: list[dict]) -> list:
    """The report's probing paragraph and per-concept table (nothing without probe results)."""
    sentences = probe_sentences(lines)
    if not sentences:
        return []
    blocks: list = [Bullets(tuple(sentences))]
    header, rows = probe_counts(lines)
    if rows:
        blocks += [Paragraph("Concepts on which each architecture's sparse probe matches the linear probe (its 95 % "
                             "interval includes the linear AUC) or lies above it, of those probed, per k and L0 "
                             "target:"),
                   Table(tuple(header), tuple(map(tuple, rows)), swatch_column=0)]
    header, rows = concept_table(lines)
    if rows:
        blocks += [Paragraph("Per concept and L0 target: the linear probe's test ROC-AUC and every architecture's "
                             "k = 16 sparse probe (seed mean, 95 % interval; `probes` in the results lines)."),
                   Table(tuple(header), tuple(map(tuple, rows)))]
    return blocks


if __name__ == "__main__":
    sys.exit(module_main(draw, __doc__.splitlines()[0]))
