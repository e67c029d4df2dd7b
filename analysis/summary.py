"""The report's automatic summary, written from the numbers of one (model, hook) group.

Who leads is decided at equal *measured* L0, never at a nominal target: at each L0 target every
series' metric is interpolated along log L0 between its own measured points, seed by seed
(nothing is extrapolated: a curve that does not reach the target is not ranked there), and the
best seed mean leads. Whether the lead is real comes from `verdicts.json`
(dictlearn.analysis.verdicts): every pair of series of a mapping (SAEs, transcoders), metric and L0
target, a paired t-test over seeds, Holm-corrected over every cell of the report. Then: settings
off their L0 target, dead and dense latents, shrinkage. Thresholds are module constants, so the
docs and the sentences cannot drift apart.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from dictlearn.analysis.aggregate import Point, aggregate
from dictlearn.analysis import outside
from dictlearn.analysis.results import group_by_site, is_outside, series_label, site, value
from dictlearn.analysis.statistics import claims, holm
from dictlearn.analysis.verdicts import L0_TOLERANCE, build_verdicts, interpolate_at_l0

#: (metric, name in sentences, True when higher is better)
FRONTIER_METRICS = (("fvu", "FVU", False), ("ce_loss_recovered", "CE loss recovered", True), ("kl_div", "KL", False))
DEAD_THRESHOLD = 0.10  # dead fraction worth a sentence
DENSE_THRESHOLD = 0.01  # dense fraction worth a sentence
SHRINK_THRESHOLD = 0.90  # γ (rel_reconstruction_bias) "well below 1"
L0_SHOWN = L0_TOLERANCE  # a measured L0 this far (relative) from its target is marked wherever it is shown


def mapping_group(line: dict) -> str:
    """What a line is compared within: SAEs reconstruct their input, transcoders (plain or skip)
    predict the MLP output, so their FVUs measure different targets."""
    return "SAEs" if line.get("mapping") in (None, "sae") else "transcoders"


def verdicts(lines: list[dict]) -> dict:
    """The verdicts.json document of a report's lines (every site): a record for each pair of
    series within a (site, mapping group), frontier metric and L0 target.

    The report claims one thing per (site, mapping group, metric, L0 target): whether the leader
    is ahead of the runner-up. Those records are the report's family (`family: "report"`), and
    Holm corrects over them alone, so the chance of any false claim in the report is at most
    alpha. Every other pair keeps the correction over all pairs (`family: "all pairs"`), stricter,
    for a reader who looks further in the file."""
    directions = {metric: "higher" if higher else "lower" for metric, _, higher in FRONTIER_METRICS}
    left_out = sorted(str(line.get("name")) for line in lines if is_outside(line))
    lines = [line for line in lines if not is_outside(line)]  # no seeds to pair (dictlearn.analysis.outside)
    document = build_verdicts(lines, directions, series=lambda line: series_label(line["_series"]), group=group_key)
    if left_out:
        document["notes"].append(f"not trained by this run, so in no paired comparison: {', '.join(left_out)}")
    records = document["records"]
    family = {id(lead.record) for site_lines in group_by_site(lines).values()
              for metric, _, higher in FRONTIER_METRICS
              for lead in leads(site_lines, [r for r in records if record_group(r)[:2] == list(site(site_lines[0]))],
                                metric, higher) if lead.record is not None}
    chosen = [r for r in records if id(r) in family and r.get("p") is not None]
    adjusted = holm([r["p"] for r in chosen]) if chosen else []
    for r in records:
        r["family"] = "report" if id(r) in family else "all pairs"
    for r, p in zip(chosen, adjusted):
        r["p_holm"] = float(p)
        r["claim"] = claims([r["mean_difference"]], [p], r["direction"], document["alpha"])[0]
    document["report_family_size"] = len(chosen)
    return document


def group_key(line: dict) -> str:
    """The verdicts' group of a line, as JSON text: `["model", "hook", "SAEs"]`."""
    return json.dumps([*site(line), mapping_group(line)])


def record_group(record: dict) -> list:
    """A verdicts.json record's group key back as [model, hook, mapping group]."""
    return json.loads(record["group"]) if isinstance(record.get("group"), str) else []


@dataclass(frozen=True)
class Ranked:
    """One series at one L0 target: its seed mean interpolated at that L0, over `n_seeds` seeds."""

    label: str
    y: float
    n_seeds: int


@dataclass(frozen=True)
class Lead:
    """The ranking of one (target, metric, mapping group), and the verdict on leader vs runner-up."""

    target: float
    group: str
    ranked: tuple[Ranked, ...]  # best first
    unreached: tuple[str, ...]  # series whose curves do not reach the target
    record: dict | None  # the verdicts.json record of the leader and the runner-up
    claim: str | None  # the leader's claim against the runner-up: better | not distinguishable | ...

    def cells(self) -> list[str]:
        """[best, runner-up, verdict] for the frontier table."""
        best = f"**{self.ranked[0].label}** {_number(self.ranked[0].y)}"
        if len(self.ranked) < 2:
            return [best, "–", "only one series reaches this L0"]
        return [best, f"{self.ranked[1].label} {_number(self.ranked[1].y)}", self.verdict()]

    def verdict(self) -> str:
        record = self.record
        if record is None or record.get("l0") is None or not record.get("seeds"):
            return f"not compared: {record.get('reason') if record else 'no record'}"
        n = record.get("n_seeds") or 0
        if record.get("p_holm") is None:
            return f"not distinguishable with {n} seed{'s' * (n != 1)} ({record.get('reason')})"
        sign = 1.0 if record["a"] == self.ranked[0].label else -1.0
        low, high = sorted(sign * x for x in record["interval"])
        difference = (f"Δ {_signed(sign * record['mean_difference'])} [{_signed(low)}, {_signed(high)}] at L0 "
                      f"{record['l0']:.3g}, Holm p {_p(record['p_holm'])}")
        if self.claim == "better":
            return f"**better**: {difference}"
        return f"not distinguishable with {n} seeds: {difference}"


def _number(x: float) -> str:
    return f"{x:#.3g}" if 1e-3 <= abs(x) < 1000 else f"{x:.3g}"


def _signed(x: float) -> str:
    return f"{x:.3g}".replace("-", "−")


def _p(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"= {p:.2g}"


def targets(lines: list[dict]) -> list:
    return sorted({line["l0_target"] for line in lines if isinstance(value(line, "l0_target"), float)})


def ranked_at(lines: list[dict], target: float, metric: str, higher_is_better: bool) -> tuple[list[Ranked], list[str]]:
    """Every series' seed mean of `metric` interpolated at L0 = target (best first), and the series
    whose seeds' curves do not reach it."""
    curves: dict[str, dict] = {}
    for line in lines:
        l0, y = value(line, "l0"), value(line, metric)
        if l0 is not None and y is not None and value(line, "l0_target") is not None:
            curves.setdefault(series_label(line["_series"]), {}).setdefault(line.get("seed"), []).append((l0, y))
    ranked, unreached = [], []
    for label, seeds in curves.items():
        at = [interpolate_at_l0([p[0] for p in pts], [p[1] for p in pts], target)[0] for pts in seeds.values()]
        at = [y for y in at if math.isfinite(y)]
        if at:
            ranked.append(Ranked(label, sum(at) / len(at), len(at)))
        else:
            unreached.append(label)
    ranked.sort(key=lambda r: -r.y if higher_is_better else r.y)
    return ranked, sorted(unreached)


def _record(records: list[dict], metric: str, target: float, a: str, b: str) -> dict | None:
    for record in records:
        if record["metric"] == metric and record.get("l0_target") == target and {record["a"], record["b"]} == {a, b}:
            return record
    return None


def _claim(record: dict | None, leader: str) -> str | None:
    """The leader's claim against the other series of `record` (records are oriented a vs b)."""
    if record is None or record.get("claim") is None:
        return None
    if record["a"] == leader or record["claim"] == "not distinguishable":
        return record["claim"]
    return {"better": "worse", "worse": "better"}[record["claim"]]


def leads(lines: list[dict], records: list[dict], metric: str, higher_is_better: bool) -> list[Lead]:
    """One Lead per (L0 target, mapping group) that has a series with the metric."""
    out = []
    for group in sorted({mapping_group(line) for line in lines}):
        members = [line for line in lines if mapping_group(line) == group]
        grouped = [r for r in records if record_group(r)[-1:] == [group]]
        for target in targets(members):
            ranked, unreached = ranked_at(members, target, metric, higher_is_better)
            if not ranked:
                continue
            record = _record(grouped, metric, target, ranked[0].label, ranked[1].label) if len(ranked) > 1 else None
            out.append(Lead(target, group, tuple(ranked), tuple(unreached), record, _claim(record, ranked[0].label)))
    return out


def frontier_table(lines: list[dict], records: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: one row per L0 target, frontier metric and mapping group."""
    several = len({mapping_group(line) for line in lines}) > 1
    header = ["L0", "metric"] + (["among"] if several else []) + ["best (seed mean at this L0)", "runner-up",
                                                                  "leader vs runner-up"]
    rows = []
    for metric, name, higher in FRONTIER_METRICS:
        for lead in leads(lines, records, metric, higher):
            rows.append([f"{lead.target:g}", f"{name} ({'higher' if higher else 'lower'} is better)"]
                        + ([lead.group] if several else []) + lead.cells())
    rows.sort(key=lambda row: float(row[0]))
    return header, rows


def leader_sentences(lines: list[dict], records: list[dict]) -> list[str]:
    """Per frontier metric and mapping group: who leads at which L0, and whether a paired,
    Holm-corrected test separates the leader from the runner-up there."""
    sentences = []
    several = len({mapping_group(line) for line in lines}) > 1
    for metric, name, higher in FRONTIER_METRICS:
        by_group: dict[str, list[Lead]] = {}
        for lead in leads(lines, records, metric, higher):
            by_group.setdefault(lead.group, []).append(lead)
        for group, found in by_group.items():
            by_winner: dict[str, list] = {}
            alone: dict[str, list] = {}
            for lead in found:
                (by_winner if len(lead.ranked) > 1 else alone).setdefault(lead.ranked[0].label, []).append(lead.target)
            parts = [f"**{label}** at L0 {_targets(ts)}" for label, ts in by_winner.items()]
            parts += [f"{label} alone at L0 {_targets(ts)} (no other series reaches it)" for label, ts in alone.items()]
            ahead = [lead.target for lead in found if lead.claim == "better"]
            tied = [lead.target for lead in found if len(lead.ranked) > 1 and lead.claim != "better"]
            tail = []
            if ahead:
                tail.append(f"ahead of the runner-up by a paired test over seeds (Holm-corrected) at L0 {_targets(ahead)}")
            if tied:
                counts = sorted({lead.record.get("n_seeds") or 0 for lead in found if lead.target in tied and lead.record})
                n = "/".join(map(str, counts)) or "0"
                tail.append(f"not distinguishable from the runner-up with {n} seed{'s' * (n != '1')} at L0 {_targets(tied)}")
            among = f" among {group}" if several else ""
            sentences.append(f"Best {name}{among} at equal L0: {', '.join(parts)}"
                             + (f"; {'; '.join(tail)}" if tail else "") + ".")
            unreached = {label: [] for lead in found for label in lead.unreached}
            for lead in found:
                for label in lead.unreached:
                    unreached[label].append(lead.target)
            if unreached and metric == "fvu":
                sentences.append("Not ranked where their measured L0s do not reach the target (no extrapolation): "
                                 + "; ".join(f"{label} at L0 {_targets(ts)}" for label, ts in unreached.items()) + ".")
    return sentences


def claims_sentence(document: dict) -> list[str]:
    """How many claims the report tested and made (every record is in verdicts.json). With several
    sites each summary gets its site's records, while Holm ran over the whole report's cells:
    the sentence says both counts."""
    records = document.get("records", [])
    family = [r for r in records if r.get("family") == "report"]
    if not family:
        return []
    tested = [r for r in family if r.get("p_holm") is not None]
    claimed = [r for r in tested if r.get("claim") in ("better", "worse")]
    everywhere = document.get("report_family_size", len(tested))
    holm = "Holm over those cells" if everywhere == len(tested) else \
        f"Holm over all {everywhere} tested cells of the report, every site's"
    untested = "" if len(tested) == len(family) else \
        f" (of {len(family)}; the others have too few seeds or no common L0)"
    return [f"The table below tests {len(tested)} leader-against-runner-up cells{untested} and {len(claimed)} "
            f"differ{'s' * (len(claimed) == 1)} at a family-wise α = "
            f"{document.get('alpha', 0.05):g} (paired t over seeds, {holm}). Every pair of series is in "
            f"`verdicts.json` ({len(records)} records here; pairs beyond the report's claims are corrected over all "
            "pairs)."]


def _targets(values: list) -> str:
    words = [v if isinstance(v, str) else f"{v:g}" for v in values]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _at(p: Point) -> str:
    """The setting's L0 target, or its measured L0 when it has no target."""
    return f"{p.setting:g}" if isinstance(p.setting, (int, float)) else f"≈ {_number(p.l0)}"


def per_setting(lines: list[dict], metric: str) -> list[Point]:
    return [p for pts in aggregate(lines, metric).values() for p in pts]


def missed_targets(lines: list[dict]) -> list[str]:
    """Settings whose mean measured L0 is more than L0_SHOWN (relative) from their target: they are
    compared at the L0 they reached (interpolated), not at the target's name."""
    missed = [p for p in per_setting([l for l in lines if value(l, "l0_target")], "l0_target")
              if abs(p.l0 - p.y) > L0_SHOWN * p.y]
    if not missed:
        return []
    items = ", ".join(f"{series_label(p.series)} {_number(p.l0)} for {p.y:g}" for p in missed)
    return [f"Measured L0 more than {L0_SHOWN:.0%} off the target (marked † in the table; the rankings above "
            f"interpolate every series to the same L0 instead): {items}."]


def threshold_sentence(lines: list[dict], metric: str, threshold: float, found: str, none: str) -> list[str]:
    """Name, per series, every setting whose seed-mean `metric` is above `threshold` (dead, dense)."""
    points = per_setting(lines, metric)
    if not points:
        return []
    hits: dict[str, list[Point]] = {}
    for p in points:
        if p.y > threshold:
            hits.setdefault(series_label(p.series), []).append(p)
    if not hits:
        return [none]
    items = [f"{label} at L0 {_targets_with(pts)}" for label, pts in hits.items()]
    return [found + "; ".join(items) + "."]


def _targets_with(points: list[Point]) -> str:
    """"8 (19%) and 16 (13%)": each setting with its value."""
    return _targets([f"{_at(p)} ({p.y:.0%})" for p in points])


def shrinkage_sentence(lines: list[dict]) -> list[str]:
    """Settings whose mean γ (`rel_reconstruction_bias`, Σ‖ŷ‖² / Σ⟨y, ŷ⟩) is below SHRINK_THRESHOLD:
    γ < 1 is the systematic underestimate of magnitudes; `l2_ratio` < 1 can also be angular error."""
    points = per_setting(lines, "rel_reconstruction_bias")
    if not points:
        return []
    shrinking: dict[str, list[Point]] = {}
    for p in points:
        if p.y < SHRINK_THRESHOLD:
            shrinking.setdefault(series_label(p.series), []).append(p)
    if not shrinking:
        return [f"No architecture shrinks: every mean γ (`rel_reconstruction_bias`) is at least {SHRINK_THRESHOLD:g}."]
    items = [f"**{label}** (γ {_number(min(p.y for p in pts))}–{_number(max(p.y for p in pts))} "
             f"at L0 {', '.join(_at(p) for p in pts)})" for label, pts in shrinking.items()]
    return [f"Shrinkage (mean γ, `rel_reconstruction_bias`, below {SHRINK_THRESHOLD:g}): " + ", ".join(items) + "."]


def mapping_sentence(lines: list[dict]) -> list[str]:
    """SAEs and transcoders in one group: their FVUs measure different targets."""
    mappings = sorted({str(line.get("mapping")) for line in lines if line.get("mapping")})
    if len(mappings) < 2:
        return []
    return [f"Mappings differ ({', '.join(mappings)}): an SAE's FVU is measured on its input, a transcoder's on the "
            "MLP output, so the rankings and tests above stay within SAEs and within transcoders (plain and skip); "
            "CE loss recovered and KL can be read across them in the figures."]


def summarise(lines: list[dict], document: dict | None = None) -> list[str]:
    """The summary's sentences for one (model, hook) group, in reading order; `document` is the
    report's verdicts.json (computed from `lines` alone when not given)."""
    document = verdicts(lines) if document is None else document
    records = document.get("records", [])
    sentences = leader_sentences(lines, records) + claims_sentence(document) + mapping_sentence(lines)
    sentences += outside.sentences(lines)
    if not targets(lines):
        sentences.append("No line has an `l0_target`: no per-target comparison "
                         "(the figures still ring the Pareto-optimal points).")
    sentences += missed_targets(lines)
    sentences += threshold_sentence(
        lines, "dead_fraction", DEAD_THRESHOLD, f"Dead latents (more than {DEAD_THRESHOLD:.0%} never fire): ",
        f"No setting has more than {DEAD_THRESHOLD:.0%} dead latents.")
    sentences += threshold_sentence(
        lines, "dense_fraction", DENSE_THRESHOLD,
        f"Dense latents (more than {DENSE_THRESHOLD:.0%} of latents fire on > 10% of tokens): ",
        f"No setting has more than {DENSE_THRESHOLD:.0%} dense latents.")
    return sentences + shrinkage_sentence(lines)
