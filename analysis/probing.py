"""Known concepts: sparse-probe ROC-AUC and concept coverage against L0, next to the linear probe.

Drawn when the results carry `probe_auc_k1` (activation files with concept labels, i.e. a
Python corpus harvested by dictlearn). The probe figure puts k = 1 and k = 16 side by side, the
linear probe on the full activation as a dashed line, as SAEBench draws its sparse probing
(Karvonen et al. 2025); the question is Kantamneni et al. 2025's: do probes on a dictionary's
top latents reach a plain linear probe on known concepts? The report's sentences and table
(`summary_blocks`) say, from the numbers, for which concepts and L0 targets they match it (within
`MATCH_MARGIN` AUC) or fall short.
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

MATCH_MARGIN = 0.02  # a sparse probe within this AUC of the linear one "matches" it
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
def _concept_means(lines: list[dict], target) -> dict[str, dict]:
    """{concept: {"linear": AUC, series: {k: seed-mean AUC}}} at one L0 target."""
    at = [line for line in lines if line.get("l0_target") == target and isinstance(line.get("probes"), dict)]
    sums: dict[str, dict] = {}
    for line in at:
        for concept, probe in line["probes"].items():
            if not isinstance(probe, dict) or "linear" not in probe:
                continue
            entry = sums.setdefault(concept, {"linear": [], "series": {}})
            entry["linear"].append(probe["linear"])
            per_k = entry["series"].setdefault(line["_series"], {k: [] for k in KS})
            for k in KS:
                if probe.get(f"k{k}") is not None:
                    per_k[k].append(probe[f"k{k}"])
    mean = lambda xs: sum(xs) / len(xs) if xs else None
    return {c: {"linear": mean(e["linear"]), "series": {s: {k: mean(v) for k, v in ks.items()}
                                                        for s, ks in e["series"].items()}}
            for c, e in sums.items()}


def _best(entry: dict, k: int) -> tuple[object, float] | None:
    """(series, AUC) of the best seed-mean sparse probe at k, or None."""
    scored = [(s, ks[k]) for s, ks in entry["series"].items() if ks.get(k) is not None]
    return max(scored, key=lambda item: item[1]) if scored else None


def probe_sentences(lines: list[dict]) -> list[str]:
    """Per L0 target and k: the concepts where the best dictionary's probe matches the linear
    probe and those where it falls short (with both AUCs)."""
    sentences = []
    linear = _linear(lines)
    if linear is None:
        return []
    means = {k: [value(line, f"probe_auc_k{k}") for line in lines if value(line, f"probe_auc_k{k}") is not None]
             for k in KS}
    spans = "; ".join(f"k = {k} {min(v):.3f}–{max(v):.3f}" for k, v in means.items() if v)
    sentences.append(f"Known concepts: the linear probe on the full activation reaches ROC-AUC {linear:.3f} (mean over "
                     f"the probed concepts); the sparse probes, over all dictionaries: {spans}.")
    for target in targets(lines):
        concepts = _concept_means(lines, target)
        for k in KS:
            matched, short = [], []  # short: (gap, concept, series, AUC, linear AUC)
            for concept, entry in concepts.items():
                best = _best(entry, k)
                if best is None or entry["linear"] is None:
                    continue
                if best[1] >= entry["linear"] - MATCH_MARGIN:
                    matched.append(concept)
                else:
                    short.append((entry["linear"] - best[1], concept, best[0], best[1], entry["linear"]))
            if matched or short:
                sentences.append(_verdict(target, k, matched, short))
    return sentences


def _verdict(target, k: int, matched: list[str], short: list[tuple]) -> str:
    parts = [f"match the linear probe (within {MATCH_MARGIN} AUC) on {', '.join(matched) or 'no concept'}"]
    if short:
        gap, concept, series, auc, linear = max(short)
        parts.append(f"fall short on {', '.join(s[1] for s in short)} (widest gap: {concept}, "
                     f"{series_label(series)} {auc:.2f} against {linear:.2f})")
    return f"At L0 {target:g}, the best k = {k} probes {'; '.join(parts)}."


def concept_table(lines: list[dict]) -> tuple[list[str], list[list[str]]]:
    """One row per probed concept and L0 target: linear AUC, best k = 1 and k = 16, verdict."""
    header = ["concept", "L0 target", "linear", "best k = 1", "best k = 16", f"k = 16 vs linear (±{MATCH_MARGIN})"]
    rows = []
    per_target = {target: _concept_means(lines, target) for target in targets(lines)}
    names = list(dict.fromkeys(c for concepts in per_target.values() for c in concepts))
    for concept in names:
        for target, concepts in per_target.items():
            entry = concepts.get(concept)
            if entry is None or entry["linear"] is None:
                continue
            best = {k: _best(entry, k) for k in KS}
            cells = [f"{series_label(b[0])} {b[1]:.3f}" if b else "–" for b in best.values()]
            verdict = "–"
            if best[16] is not None:
                gap = best[16][1] - entry["linear"]
                verdict = "matches" if gap >= -MATCH_MARGIN else f"short by {-gap:.3f}"
            rows.append([concept, f"{target:g}", f"{entry['linear']:.3f}", *cells, verdict])
    return header, rows


def summary_blocks(lines: list[dict]) -> list:
    """The report's probing paragraph and per-concept table (nothing without probe results)."""
    sentences = probe_sentences(lines)
    if not sentences:
        return []
    header, rows = concept_table(lines)
    blocks: list = [Bullets(tuple(sentences))]
    if rows:
        blocks += [Paragraph("Per concept and L0 target: the linear probe's test ROC-AUC and the best "
                             "architecture's sparse probes (seed means; `probes` in the results lines)."),
                   Table(tuple(header), tuple(map(tuple, rows)))]
    return blocks


if __name__ == "__main__":
    sys.exit(module_main(draw, __doc__.splitlines()[0]))
