"""Results lines in: read, check, group by (model, hook), name each line's series.

A results file is JSON Lines, one object per trained dictionary (the keys in docs/evaluate.md and
docs/analysis.md). Every line keeps where it came from (`_source`, "file:line") so a figure or
the report can name it; `_folder` is the results file's folder (relative paths in a line are
read from there), `_run` the run's label, `_series` the curve it belongs to.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

from dictlearn.errors import DictLearnError

#: What identifies a curve: its architecture, and a variant when a group holds several runs or
#: several widths (else the variant is empty and the legend shows the architecture alone).
Series = tuple[str, str]


class AnalysisError(DictLearnError, ValueError):
    """Results that cannot be analysed; the message names the file and line."""


def value(line: dict, key: str) -> float | None:
    """A metric as a float, or None when it is missing, null, non-numeric or not finite."""
    raw = line.get(key)
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        return None
    return float(raw) if math.isfinite(raw) else None


def read_results(path: str | Path) -> list[dict]:
    """One results file -> its lines, each with `_source` and `_run` (the run folder's name)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise AnalysisError(f"{path}: cannot read ({error.strerror or error})") from None
    lines = []
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
        except json.JSONDecodeError as error:
            raise AnalysisError(f"{path}:{number}: not a JSON object ({error.msg})") from None
        if not isinstance(line, dict):
            raise AnalysisError(f"{path}:{number}: not a JSON object (a {type(line).__name__})")
        if not isinstance(line.get("architecture"), str) or not line["architecture"]:
            raise AnalysisError(f"{path}:{number}: no 'architecture'; every results line names one")
        lines.append({**line, "_source": f"{path}:{number}", "_run": _run_label(path), "_folder": str(path.parent)})
    if not lines:
        raise AnalysisError(f"{path}: no results lines; run dictlearn compare or evaluate first")
    return lines


def _run_label(path: Path) -> str:
    """`runs/a/results.jsonl` -> "a"; a file with another name -> its stem."""
    if path.name == "results.jsonl" and path.parent.name:
        return path.parent.name
    return path.stem


def load_results(paths: list[str | Path]) -> list[dict]:
    """Several results files -> all their lines; runs with the same label get the file path."""
    if not paths:
        raise AnalysisError("no results files given")
    per_file = [read_results(path) for path in paths]
    labels = [lines[0]["_run"] for lines in per_file]
    if len(set(labels)) < len(labels):  # two runs both called "results": fall back to paths
        for path, lines in zip(paths, per_file):
            for line in lines:
                line["_run"] = str(path)
    return assign_series([line for lines in per_file for line in lines])


def from_records(records: list[dict], source: str = "results") -> list[dict]:
    """Lines already in memory (as `dictlearn compare` holds them) -> the same form as a file."""
    lines = []
    for number, record in enumerate(records, start=1):
        if not isinstance(record, dict) or not isinstance(record.get("architecture"), str):
            raise AnalysisError(f"{source}:{number}: not a results line with an 'architecture'")
        lines.append({**record, "_source": f"{source}:{number}", "_run": Path(source).parent.name or source,
                      "_folder": str(Path(source).parent)})
    if not lines:
        raise AnalysisError(f"{source}: no results lines")
    return assign_series(lines)


def site(line: dict) -> tuple[str, str]:
    """(model, hook) where the dictionary was trained; "?" for an unrecorded one."""
    return (str(line.get("model_name") or "?"), str(line.get("hook_name") or "?"))


def group_by_site(lines: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """Dictionaries of different models or hooks are never compared on one axis."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for line in lines:
        groups[site(line)].append(line)
    return dict(sorted(groups.items()))


def assign_series(lines: list[dict]) -> list[dict]:
    """Set each line's `_series`: (architecture, variant). The variant names the run when lines
    come from several runs and the width when a run has several, so no two curves merge. A
    dictionary the run did not train (`trained: false`, `dictlearn compare --include`) is a series
    of its own, named by `outside_label`; its width is not a variant of the run's."""
    runs = {line["_run"] for line in lines}
    widths = {line.get("d_sae") for line in lines if not is_outside(line)}
    for line in lines:
        parts = []
        if len(runs) > 1:
            parts.append(str(line["_run"]))
        if len(widths) > 1 and not is_outside(line):
            parts.append(f"d_sae {line.get('d_sae')}")
        line["_series"] = (outside_label(line) if is_outside(line) else line["architecture"], ", ".join(parts))
    return lines


#: how a dictionary the run did not train is marked in legends, tables and sentences
OUTSIDE_MARK = "not trained here"


def is_outside(line: dict) -> bool:
    """A dictionary evaluated by the run but trained elsewhere (`trained: false` in its line)."""
    return line.get("trained") is False


def outside_label(line: dict) -> str:
    """"mine (saelens, not trained here)": the included dictionary's name and format (the format
    once when it is the name: "saelens (not trained here)")."""
    name, format = line.get("name") or line["architecture"], line.get("format") or "unknown format"
    return f"{name} ({OUTSIDE_MARK})" if name == format else f"{name} ({format}, {OUTSIDE_MARK})"


def is_outside_series(series: Series) -> bool:
    return series[0].endswith(f"{OUTSIDE_MARK})")


def series_label(series: Series) -> str:
    architecture, variant = series
    return f"{architecture} ({variant})" if variant else architecture


def setting(line: dict):
    """What seeds of one dictionary share: the L0 target, else the sparsity setting reached."""
    if line.get("l0_target") is not None:
        return line["l0_target"]
    for key in ("k", "l1_coefficient", "l0_coefficient"):
        if line.get(key) is not None:
            return (key, line[key])
    return ("name", line.get("name") or line["_source"])


def missing(lines: list[dict], key: str) -> list[str]:
    """The names (or sources) of the lines without a usable `key`."""
    return [str(line.get("name") or line["_source"]) for line in lines if value(line, key) is None]
