"""`python -m dictlearn.analysis RESULTS.jsonl [RESULTS2.jsonl ...] --out DIR`: every figure and
the report.

Writes DIR/figures/*.png|svg, DIR/report.md and DIR/report.html; notes go to stderr, bad input
is one `analysis: error: ...` line and exit status 2. See docs/analysis.md.
"""

from __future__ import annotations

import sys

from dictlearn.analysis.cli import out_dir, parser, run
from dictlearn.analysis.report import analyse


def main(argv: list[str] | None = None) -> int:
    args = parser("Draw every figure of dictlearn results and write the report.").parse_args(argv)

    def report(args) -> int:
        print(analyse(args.results, out_dir(args)))
        return 0

    return run(report, args)


if __name__ == "__main__":
    sys.exit(main())
