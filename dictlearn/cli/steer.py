"""`dictlearn steer EXPORT --feature I --scale S --prompt TEXT [--tokens N] [--model M]`: the command
line of `dictlearn.interpret.steer.steer_export`; prints the clean and steered continuations side by
side and the measured effect."""

from __future__ import annotations

import argparse
import json

from dictlearn.cli.parsing import OneLineParser, finite_float, path_text, positive_int
from dictlearn.runtime import check_device

DEFAULT_TOKENS = 48  # dictlearn.interpret.steer's, repeated so --help does not import torch (tests check)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="dictlearn steer", description=(
        "Generate greedily with latent I clamped to S x its maximum observed activation at every position "
        "(the reconstruction error kept), beside the clean generation."))
    p.add_argument("export", type=path_text, metavar="EXPORT", help="export folder (or dictlearn checkpoint)")
    p.add_argument("--feature", type=int, required=True, help="the latent to clamp")
    p.add_argument("--scale", type=finite_float, required=True,
                   help="clamp value as a multiple of the latent's maximum activation (negative suppresses)")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--tokens", type=positive_int, default=DEFAULT_TOKENS, help=f"tokens to generate ({DEFAULT_TOKENS})")
    p.add_argument("--model", default=None, help="the language model (default: the export's)")
    p.add_argument("--data", default=None, help="measure the maximum on this HDF5 file (default: the maxima "
                   "dictlearn inspect recorded in the export, else the file the export was trained on)")
    p.add_argument("--input-key", default=None, help="with --data: the dataset the dictionary encodes")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--width", type=positive_int, default=48, help="characters per column (48)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object instead")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    check_device(args.device)
    from dictlearn.interpret.steer import steer_export

    result = steer_export(args.export, args.feature, args.scale, args.prompt, tokens=args.tokens, model=args.model,
                          data=args.data, input_key=args.input_key, device=args.device)
    if args.json:
        fields = ("feature", "scale", "value", "max_activation", "max_source", "prompt", "clean", "steered", "kl",
                  "positions", "promoted", "promoted_mass")
        print(json.dumps({name: getattr(result, name) for name in fields} | {"site": vars(result.site)}))
    else:
        print(result.side_by_side(args.width))
    return 0
