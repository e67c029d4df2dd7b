"""`dictlearn inspect EXPORT --data FILE.h5 [--model M] [--features I,J] [--out FILE.html]`: the command
line of `dictlearn.interpret.dashboard.inspect`; every flag is the `InspectOptions` field of the same name."""

from __future__ import annotations

import argparse
from pathlib import Path

from dictlearn.cli.parsing import OneLineParser, count_or_all, path_text, positive_int
from dictlearn.io import check_writable_file
from dictlearn.runtime import check_device

# dictlearn.interpret.dashboard's defaults (DEFAULT_ROWS, InspectOptions.cards/.extremes), repeated so
# that `dictlearn inspect --help` does not import torch; tests/test_cli_errors_commands.py checks they agree.
DEFAULT_ROWS, CARDS, EXTREMES = 200_000, 32, 4


def _features(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected latent numbers separated by commas, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one latent number")
    return values


def _rows(text: str) -> int | None:
    value = count_or_all(text)
    return None if value == "all" else value


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="dictlearn inspect", description=(
        "Feature dashboards of a dictionary: one self-contained HTML file with an index of every alive latent "
        "and a card per chosen latent (top and interval contexts, histogram, logit lens, nearest latents)."))
    p.add_argument("export", type=path_text, metavar="EXPORT", help="export folder (or dictlearn checkpoint)")
    p.add_argument("--data", type=path_text, required=True, help="HDF5 activation file (a harvested one has the token text)")
    p.add_argument("--model", default=None, help="model for the logit lens and token text "
                   "(name or folder; default: the export's, else the file's)")
    p.add_argument("--features", type=_features, default=None,
                   help=f"latents to draw cards for, e.g. 3,17,250 (default: {CARDS} sampled alive latents plus "
                        f"the {EXTREMES} densest and {EXTREMES} rarest)")
    p.add_argument("--out", type=path_text, default=None, help="the HTML file (default: EXPORT's folder name + .html, here)")
    p.add_argument("--rows", type=_rows, default=DEFAULT_ROWS,
                   help=f"read the first N rows of the file, or 'all' (default: {DEFAULT_ROWS})")
    p.add_argument("--cards", type=positive_int, default=CARDS, help="sampled latents without --features")
    p.add_argument("--input-key", default=None, help="the dataset the dictionary encodes (default: the export's)")
    p.add_argument("--device", default="cpu", help="torch device for the dictionary (default: cpu)")
    p.add_argument("--no-record", dest="record", action="store_false",
                   help="do not write latent_statistics.safetensors (the maxima steering uses) into the export")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out) if args.out else Path(f"{Path(args.export).resolve().name}.html")
    check_writable_file(out, "--out", example="dashboard.html")
    check_device(args.device)
    from dictlearn.data.h5 import check_activation_file
    from dictlearn.interpret.dashboard import InspectOptions, inspect

    options = InspectOptions(features=args.features, cards=args.cards, rows=args.rows, model=args.model,
                             input_key=args.input_key, device=args.device, record=args.record)
    check_activation_file(args.data)
    inspect(args.export, args.data, out, options)
    return 0
