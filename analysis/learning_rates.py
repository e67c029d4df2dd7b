"""What each architecture trained with: the summary's sentence on learning rates and the table of
`dictlearn compare --tune-lr`'s search (`DIR/lr_search.json`, written by dictlearn/compare/tune.py).

A comparison trains every architecture with one optimiser unless `--tune-lr` chose a learning rate
per architecture on validation documents; the results lines say which (`optimizer`, `lr_tuned`),
and a verdict between architectures must be read with it.
"""

from __future__ import annotations

import json
from pathlib import Path

from dictlearn.analysis.render import Heading, Paragraph, Table
from dictlearn.analysis.style import series_order

SEARCH_FILE = "lr_search.json"


def _lr(line: dict) -> float | None:
    optimizer = line.get("optimizer")
    lr = optimizer.get("lr") if isinstance(optimizer, dict) else None
    return float(lr) if isinstance(lr, (int, float)) and not isinstance(lr, bool) else None


def _by_architecture(lines: list[dict]) -> dict[str, set[float]]:
    found: dict[str, set[float]] = {}
    for line in lines:
        if _lr(line) is not None:
            found.setdefault(str(line.get("architecture")), set()).add(_lr(line))
    return dict(sorted(found.items(), key=lambda item: series_order((item[0], ""))))


def sentences(lines: list[dict]) -> list[str]:
    """One sentence: the learning rate each architecture got, and how it was chosen."""
    lrs = _by_architecture(lines)
    if not lrs:
        return []
    listed = ", ".join(f"{architecture} {'/'.join(f'{lr:.3g}' for lr in sorted(values))}"
                       for architecture, values in lrs.items())
    if any(line.get("lr_tuned") is True for line in lines):
        return [f"Learning rates were chosen per architecture by `--tune-lr` on **validation documents** "
                f"(training-side documents held out of the search runs; the test documents these scores come from were never read "
                f"by the search): {listed}. See \"Learning-rate search\" in the setup."]
    every = {lr for values in lrs.values() for lr in values}
    if len(every) == 1:
        return [f"Every architecture trained with the same optimiser and learning rate ({every.pop():.3g})."]
    return [f"Learning rates differ between architectures ({listed}) and were not chosen by a search: a gap "
            "between them may be the learning rates'."]


def search_blocks(folder: Path, notes: list[str]) -> list:
    """The search table of `folder/lr_search.json`, or nothing when the run did not search."""
    path = folder / SEARCH_FILE
    if not path.is_file():
        return []
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        table, validation = record["table"], record["validation"]
        rows = tuple((str(r["architecture"]), f"{r['lr']:.3g}", f"{r['validation_fvu']:.4f}", f"{r['l0']:.1f}",
                      f"{r['score']:.4f}", "✔" if r.get("chosen") else "") for r in table)
        text = (f"`--tune-lr` trained each architecture once per learning rate at L0 target {record['l0_target']}, "
                f"d_sae {record['d_sae']}, seed {record['seed']}, {record['steps']:,} steps, on training rows without "
                f"its {validation['documents']:,} validation documents ({validation['rows']:,} rows, carved from the "
                f"training side), and scored them there ({record.get('train_seconds', 0):,.0f} s of training). "
                f"Criterion: {record['criterion']}.")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        notes.append(f"{path}: not a readable learning-rate search ({error.__class__.__name__}); its table left out")
        return []
    header = ("architecture", "lr", "validation FVU", "validation L0", "FVU bound at target", "chosen")
    blocks = [Heading(3, "Learning-rate search"), Paragraph(text), Table(header, rows, swatch_column=0)]
    edges = at_grid_edge(table)
    if edges:
        blocks.append(Paragraph(f"At the edge of the grid: {', '.join(edges)}. The best learning rate may lie beyond "
                                "it; widen `--lr-grid` to find out."))
    return blocks


def at_grid_edge(table: list[dict]) -> list[str]:
    """'<architecture> (the largest)' / '(the smallest)' for each architecture whose chosen LR is
    the largest or smallest it tried (of two or more)."""
    edges = []
    for architecture in dict.fromkeys(r["architecture"] for r in table):
        tried = sorted(r["lr"] for r in table if r["architecture"] == architecture)
        chosen = [r["lr"] for r in table if r["architecture"] == architecture and r.get("chosen")]
        if len(tried) > 1 and chosen and chosen[0] in (tried[0], tried[-1]):
            edges.append(f"{architecture} (the {'largest' if chosen[0] == tried[-1] else 'smallest'})")
    return edges
