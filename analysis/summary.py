"""The report's automatic summary, written from the numbers of one (model, hook) group.

At each L0 target, for each frontier metric, the architecture with the best seed mean wins;
the lead is "separable" when the winner's seed range (min..max) does not overlap the runner-up's,
"not separable" when it does, and unknown with a single seed. Then: settings that missed their
L0 target, where dead latents appear, which architectures shrink. Thresholds are module
constants, so the docs and the sentences cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass

from dictlearn.analysis.aggregate import Point, aggregate, ranges_overlap
from dictlearn.analysis.results import series_label, value

#: (metric, name in sentences, True when higher is better)
FRONTIER_METRICS = (("fvu", "FVU", False), ("ce_loss_recovered", "CE loss recovered", True), ("kl_div", "KL", False))
DEAD_THRESHOLD = 0.10  # dead fraction worth a sentence
DENSE_THRESHOLD = 0.01  # dense fraction worth a sentence
SHRINK_THRESHOLD = 0.90  # γ (rel_reconstruction_bias) "well below 1"
L0_MISS = 0.20  # achieved L0 this far (relative) from its target: compare with care
L0_SHOWN = 0.05  # ... this far: the frontier table shows the achieved L0 beside the value


@dataclass(frozen=True)
class Lead:
    """The best point at one target for one metric, the runner-up, and whether seeds separate them."""

    winner: Point
    runner_up: Point | None
    separable: bool | None  # None: a single point or a single seed

    def cells(self) -> list[str]:
        """[best, runner-up, verdict] for the frontier table."""
        best = f"**{series_label(self.winner.series)}** {_number(self.winner.y)}{_off_target(self.winner)}"
        if self.runner_up is None:
            return [best, "–", "only one architecture"]
        runner_up = f"{series_label(self.runner_up.series)} {_number(self.runner_up.y)}{_off_target(self.runner_up)}"
        verdict = {True: "separable", False: "not separable", None: "one seed: spread unknown"}[self.separable]
        return [best, runner_up, verdict]


def _off_target(p: Point) -> str:
    """" (L0 36.1)" when the measured L0 is more than L0_SHOWN off the target, else ""."""
    if isinstance(p.setting, (int, float)) and abs(p.l0 - p.setting) > L0_SHOWN * p.setting:
        return f" (L0 {p.l0:.1f})"
    return ""


def _number(x: float) -> str:
    return f"{x:#.3g}" if 1e-3 <= abs(x) < 1000 else f"{x:.3g}"


def targets(lines: list[dict]) -> list:
    return sorted({line["l0_target"] for line in lines if isinstance(value(line, "l0_target"), float)})


def lead_at(lines: list[dict], target, metric: str, higher_is_better: bool) -> Lead | None:
    """The ranking of the series' seed means at one L0 target; None when no series has the metric."""
    points = [p for pts in aggregate([l for l in lines if l.get("l0_target") == target], metric).values() for p in pts]
    if not points:
        return None
    points.sort(key=lambda p: -p.y if higher_is_better else p.y)
    winner, runner_up = points[0], points[1] if len(points) > 1 else None
    if runner_up is None or min(winner.n_seeds, runner_up.n_seeds) < 2:
        return Lead(winner, runner_up, None)
    return Lead(winner, runner_up, not ranges_overlap(winner, runner_up))


def frontier_table(lines: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: one row per L0 target and frontier metric that any line has."""
    header = ["L0 target", "metric", "best (seed mean)", "runner-up", "seed ranges"]
    rows = []
    for target in targets(lines):
        for metric, name, higher in FRONTIER_METRICS:
            lead = lead_at(lines, target, metric, higher)
            if lead is not None:
                rows.append([f"{target:g}", f"{name} ({'higher' if higher else 'lower'} is better)"] + lead.cells())
    return header, rows


def leader_sentences(lines: list[dict]) -> list[str]:
    """One sentence per frontier metric: who leads at which targets, and where it is within noise."""
    sentences = []
    for metric, name, higher in FRONTIER_METRICS:
        leads = {t: lead_at(lines, t, metric, higher) for t in targets(lines)}
        leads = {t: lead for t, lead in leads.items() if lead is not None}
        if not leads:
            continue
        by_winner: dict[str, list] = {}
        for target, lead in leads.items():
            by_winner.setdefault(series_label(lead.winner.series), []).append(target)
        parts = [f"**{label}** at L0 {_targets(ts)}" for label, ts in by_winner.items()]
        close = [t for t, lead in leads.items() if lead.separable is False]
        tail = f"; within the seeds' spread (not separable) at L0 {_targets(close)}" if close else ""
        off = [t for t, lead in leads.items() if _off_target(lead.winner)]
        if off:
            tail += f"; the winner's measured L0 is more than {L0_SHOWN:.0%} off the target at L0 {_targets(off)}"
        sentences.append(f"Best {name}: {', '.join(parts)}{tail}.")
    return sentences


def _targets(values: list) -> str:
    words = [v if isinstance(v, str) else f"{v:g}" for v in values]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _at(p: Point) -> str:
    """The setting's L0 target, or its measured L0 when it has no target."""
    return f"{p.setting:g}" if isinstance(p.setting, (int, float)) else f"≈ {_number(p.l0)}"


def per_setting(lines: list[dict], metric: str) -> list[Point]:
    return [p for pts in aggregate(lines, metric).values() for p in pts]


def missed_targets(lines: list[dict]) -> list[str]:
    """Settings whose mean achieved L0 is more than L0_MISS (relative) from their target."""
    missed = [p for p in per_setting([l for l in lines if value(l, "l0_target")], "l0_target")
              if abs(p.l0 - p.y) > L0_MISS * p.y]
    if not missed:
        return []
    items = ", ".join(f"{series_label(p.series)} {_number(p.l0)} for {p.y:g}" for p in missed)
    return [f"Off their L0 target by more than {L0_MISS:.0%} (compare these with care): {items}."]


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
            "MLP output, so compare FVU within a mapping; CE loss recovered and KL compare across them."]


def summarise(lines: list[dict]) -> list[str]:
    """The summary's sentences for one (model, hook) group, in reading order."""
    sentences = leader_sentences(lines) + mapping_sentence(lines)
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
