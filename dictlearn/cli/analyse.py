"""`dictlearn analyse RESULTS.jsonl [RESULTS2.jsonl ...] --out DIR`: every figure and the report.

Writes DIR/figures/*.png|svg, DIR/report.md and DIR/report.html (docs/analysis.md); notes go to
stderr. Without --out, one results file's own folder takes them (as `dictlearn compare` wrote it).
"""

from __future__ import annotations

from pathlib import Path

from dictlearn.cli.parsing import OneLineParser
from dictlearn.io import check_writable_folder


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="dictlearn analyse",
                      description="Draw every figure of dictlearn results and write the report.")
    p.add_argument("results", nargs="+", type=Path,
                   help="results.jsonl file(s) of dictlearn compare or evaluate, one JSON line per dictionary")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for figures/ and the report (default: the folder of the one results file)")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    # the folder is checked before matplotlib loads and before any figure is drawn
    from dictlearn.analysis.cli import out_dir

    out = out_dir(args)
    check_writable_folder(out, "--out" if args.out is not None else "the results' folder", out)
    from dictlearn.analysis.report import analyse

    print(analyse(args.results, out))
    return 0
