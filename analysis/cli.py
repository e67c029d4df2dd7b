"""The command-line front of every figure module; `dictlearn analyse` (dictlearn/cli/analyse.py)
draws them all and writes the report.

`python -m dictlearn.analysis.<module> RESULTS.jsonl [RESULTS2.jsonl ...] --out DIR` draws that
module's figures into DIR; notes (skipped figures, lines left out) go to stderr; bad input is one
`analysis: error: ...` line and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from dictlearn.analysis.results import AnalysisError, group_by_site, load_results
from dictlearn.errors import DictLearnError

#: draw(lines, out_dir, notes, site) -> list[Drawn]; `site` is None unless groups are several
DrawFunction = Callable


def _prog() -> str | None:
    """"python -m dictlearn.analysis.frontier" when run so, for the usage line (argparse would say
    __main__.py)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return f"python -m {spec.name.removesuffix('.__main__')}" if spec is not None else None


def parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=_prog(), description=description)
    parser.add_argument("results", nargs="+", type=Path, help="results.jsonl file(s), one JSON line per dictionary")
    parser.add_argument("--out", type=Path, help="output folder (default: the folder of the one results file)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return parser


def out_dir(args) -> Path:
    if args.out is not None:
        return args.out
    if len(args.results) > 1:
        raise DictLearnError("several results files: name the output folder with --out DIR")
    return args.results[0].parent


def checked_folder(out: Path) -> Path:
    """`out`, or one line naming it when it, or the nearest folder above it that exists, is a file
    (figures/ would fail to be made in it after the results were read)."""
    existing = out.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise AnalysisError(f"{out}: {existing} is a file, not a folder; name a folder for the figures and report")
    return out


def draw_groups(lines: list[dict], draw: DrawFunction, out: Path, notes: list[str]) -> list:
    """Draw every (model, hook) group apart; file names carry the group when there are several."""
    groups = group_by_site(lines)
    several = len(groups) > 1
    drawn = []
    for site, members in groups.items():
        drawn += draw(members, out, notes, site if several else None)
    return drawn


def run(main: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Call `main(args)`; a DictLearnError is one `analysis: error:` line and exit status 2."""
    try:
        return main(args)
    except DictLearnError as error:
        if args.debug:
            traceback.print_exc()
        print(f"analysis: error: {error}", file=sys.stderr)
        return 2


def module_main(draw: DrawFunction, description: str, argv: list[str] | None = None) -> int:
    """The `python -m dictlearn.analysis.<module>` entry: load, draw into --out, print notes and files."""
    args = parser(description).parse_args(argv)

    def main(args) -> int:
        lines, notes = load_results(args.results), []
        drawn = draw_groups(lines, draw, checked_folder(out_dir(args)), notes)
        print_notes(notes)
        for figure in drawn:
            print(figure.png)
        return 0

    return run(main, args)


def print_notes(notes: list[str]) -> None:
    for note in notes:
        print(f"analysis: note: {note}", file=sys.stderr)
