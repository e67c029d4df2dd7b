"""`dictlearn export CKPT OUT`: a checkpoint -> an export folder (SAELens layout)."""

from __future__ import annotations

from pathlib import Path

from dictlearn.cli.parsing import OneLineParser, check_output_folder, path_text
from dictlearn.errors import ConfigError


def main(argv: list[str]) -> int:
    p = OneLineParser(prog="dictlearn export", description="Checkpoint -> export folder (SAELens layout).")
    p.add_argument("checkpoint", type=path_text, help="a dictlearn Lightning checkpoint (.ckpt)")
    p.add_argument("out", type=path_text, help="export folder to write: new, empty, or a previous export "
                   "(replaced atomically); a folder holding anything else is refused")
    p.add_argument("--member", default=None, help="which dictionary of a sweep's checkpoint")
    args = p.parse_args(argv)
    if Path(args.checkpoint).is_dir():
        raise ConfigError(f"CKPT {args.checkpoint}: is a folder, not a checkpoint file; an export folder is "
                          "already exported (copy it), a run's checkpoints are under its checkpoints/")
    from dictlearn.export import export, is_export, load

    check_output_folder(args.out, "OUT", previous=is_export)
    import torch

    model = load(args.checkpoint, member=args.member)
    checkpoint = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
    members = checkpoint.get("dictlearn_members") or {}
    record = members.get(args.member) if args.member else next(iter(members.values()), None)
    attrs = (record or {}).get("data") or checkpoint.get("dictlearn_data", {})
    export(model, args.out, attrs)
    print(f"dictlearn: export written to {args.out}")
    return 0
