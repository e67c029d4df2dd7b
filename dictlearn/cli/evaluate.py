"""`dictlearn evaluate EXPORT... --data FILE.h5 [--model M] [--out results.jsonl]`: the command line
of `dictlearn.evaluate.evaluate`; every flag is the `EvaluateOptions` field of the same name."""

from __future__ import annotations

import argparse
import json
import sys

from dictlearn.cli.parsing import OneLineParser, non_negative_int, path_text, positive_int
from dictlearn.io import check_writable_file
from dictlearn.runtime import check_device

# dictlearn.evaluate's defaults, repeated so that `dictlearn evaluate --help` does not import torch;
# tests/test_cli_errors_commands.py checks they agree.
DEFAULT_CONTEXTS, DEFAULT_BATCH_SIZE, DENSITY_ROWS = 64, 8, 65_536


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="dictlearn evaluate", description="Export(s) + HDF5 (+ model) -> one JSON line per export.")
    p.add_argument("exports", type=path_text, nargs="+", metavar="EXPORT",
                   help="export folders, dictlearn checkpoints, or SAELens / sparsify / dictionary_learning folders")
    p.add_argument("--data", type=path_text, required=True, help="HDF5 activation file; metrics use its held-out tail rows")
    p.add_argument("--model", default=None,
                   help="model for downstream metrics (name or folder; default: the export's, else the file's)")
    p.add_argument("--hook", default=None,
                   help="the site the dictionaries read, e.g. transformer.h.1 (default: the folder's recorded "
                        "hook, else the file's); also the default --input-key")
    p.add_argument("--hookpoint", default=None, help="which hookpoint of a sparsify run folder (its sub-folder name)")
    p.add_argument("--out", type=path_text, default=None, help="write the JSON lines here (atomically) instead of stdout")
    p.add_argument("--contexts", type=positive_int, default=DEFAULT_CONTEXTS, help="held-out corpus windows to splice")
    p.add_argument("--batch-size", type=positive_int, default=DEFAULT_BATCH_SIZE, help="windows per forward pass")
    p.add_argument("--context", type=positive_int, default=None,
                   help="window length (default: the export's context_size, else the file's)")
    p.add_argument("--corpus", default=None,
                   help="text file or folder (default: the corpus the file was harvested from)")
    p.add_argument("--input-key", default=None, help="input dataset (default: the export's)")
    p.add_argument("--target-key", default=None, help="transcoder target dataset (default: the export's)")
    p.add_argument("--val-rows", type=non_negative_int, default=None, help="held-out tail rows, as --data.val_rows in training")
    p.add_argument("--density-rows", type=non_negative_int, default=DENSITY_ROWS,
                   help=f"rows dead_fraction, dense_fraction and feature_density count over: the held-out tail, "
                        f"then seeded training rows (default {DENSITY_ROWS:,}; 0: the tail only)")
    p.add_argument("--block-size", type=positive_int, default=512, help="as --data.block_size in training")
    p.add_argument("--device", default="auto", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--no-interpret", dest="interpret", action="store_false",
                   help="skip the concept probes and coverage (computed when the file carries concept labels)")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.out is not None:  # before any work: a folder in the way, or no permission
        check_writable_file(args.out, "--out", example="results.jsonl")
    check_device(args.device, allow_auto=True)
    from dictlearn.data.h5 import check_activation_file
    from dictlearn.evaluate import EvaluateOptions, evaluate
    from dictlearn.io import atomic_write_text

    options = EvaluateOptions(
        model=args.model, hook=args.hook, hookpoint=args.hookpoint, corpus=args.corpus,
        input_key=args.input_key, target_key=args.target_key,
        contexts=args.contexts, batch_size=args.batch_size, context=args.context, val_rows=args.val_rows,
        block_size=args.block_size, device=args.device, interpret=args.interpret, density_rows=args.density_rows,
    )  # fmt: skip
    check_activation_file(args.data)
    records = evaluate(args.exports, args.data, options=options)
    text = "".join(json.dumps(record, default=str) + "\n" for record in records)
    if args.out is None:
        sys.stdout.write(text)
    else:
        atomic_write_text(args.out, text)
        print(f"dictlearn: {len(records)} result line(s) written to {args.out}")
    return 0
