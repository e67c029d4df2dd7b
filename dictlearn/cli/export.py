"""`dictlearn export SOURCE OUT`: a checkpoint, or a folder written by SAELens, sparsify or
dictionary_learning -> an export folder (SAELens layout, dictlearn's metadata)."""

from __future__ import annotations

from pathlib import Path

from dictlearn.cli.parsing import OneLineParser, check_output_folder, path_text
from dictlearn.errors import ConfigError


def main(argv: list[str]) -> int:
    p = OneLineParser(prog="dictlearn export", description="Checkpoint or outside folder -> export folder (SAELens layout).")
    p.add_argument("checkpoint", type=path_text, metavar="SOURCE",
                   help="a dictlearn Lightning checkpoint (.ckpt), or a SAELens, sparsify or dictionary_learning folder")
    p.add_argument("out", type=path_text, help="export folder to write: new, empty, or a previous export "
                   "(replaced atomically); a folder holding anything else is refused")
    p.add_argument("--member", default=None, help="which dictionary of a sweep's checkpoint")
    p.add_argument("--hookpoint", default=None, help="which hookpoint of a sparsify run folder")
    args = p.parse_args(argv)
    source = Path(args.checkpoint)
    if source.is_dir():
        from dictlearn.dictionaries.readers import detect

        if detect(source) == "dictlearn":
            raise ConfigError(f"SOURCE {args.checkpoint}: is already a dictlearn export, not a checkpoint file "
                              "(copy it); a run's checkpoints are under its checkpoints/")
    from dictlearn.export import export, is_export, load, load_with_config

    check_output_folder(args.out, "OUT", previous=is_export)
    if source.is_dir():  # another library's folder: its recorded model and hooks go along
        model, cfg = load_with_config(source, hookpoint=args.hookpoint)
        export(model, args.out, cfg["metadata"]["dictlearn"]["data"])
        print(f"dictlearn: {cfg['format']} folder {source} exported to {args.out}")
        return 0
    import torch

    model = load(args.checkpoint, member=args.member)
    checkpoint = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
    members = checkpoint.get("dictlearn_members") or {}
    record = members.get(args.member) if args.member else next(iter(members.values()), None)
    attrs = (record or {}).get("data") or checkpoint.get("dictlearn_data", {})
    export(model, args.out, attrs)
    print(f"dictlearn: export written to {args.out}")
    return 0
